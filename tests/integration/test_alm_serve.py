"""The trained-ALM side on a real local Ray: the Serve endpoint (stock `openai` client over HTTP on
127.0.0.1, malformed and over-long audio included) and the eval stage (Ray Data inference, controls,
report, official-format predictions, resume). Tiny random LLM + tiny random adapter, real Whisper tiny."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import soundfile as sf

from ralm import records, storage
from ralm.config import RalmConfig
from ralm.eval.scoring import string_match
from tests.fixtures.tiny_alm import make_tiny_export

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> str:
    return make_tiny_export(tmp_path_factory.mktemp("alm"))


def _wav_bytes(seconds: float, fmt: str = "WAV", freq: float = 440.0) -> bytes:
    t = np.arange(int(seconds * 16000)) / 16000
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000, format=fmt)
    return buf.getvalue()


def _audio_msg(data: bytes | str, fmt: str = "wav", text: str = "What do you hear?") -> list[dict]:
    b64 = data if isinstance(data, str) else base64.b64encode(data).decode()
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "input_audio", "input_audio": {"data": b64, "format": fmt}}]}]


# ---------------------------------------------------------------------------------------------- Serve
def test_serve_openai_client(ray_local, tiny_export, tmp_path):
    import openai

    from ralm.serve.alm_app import serve_alm, stop_alm

    cfg = RalmConfig()
    cfg.eval.adapters = [tiny_export]
    cfg.eval.serve.port = 18731
    cfg.eval.serve.max_audio_seconds = 2.0
    cfg.eval.serve.max_audio_mb = 0.25
    cfg.eval.serve.num_cpus = 0.5
    svc = serve_alm(cfg, str(tmp_path))
    try:
        assert svc.url.startswith("http://127.0.0.1:")
        client = openai.OpenAI(base_url=svc.url, api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == [svc.model]
        assert client.models.retrieve(svc.model).id == svc.model
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            client.models.retrieve("gpt-4o")

        ok = client.chat.completions.create(model=svc.model, messages=_audio_msg(_wav_bytes(1.0)), max_tokens=6)
        assert ok.choices[0].message.role == "assistant" and ok.choices[0].message.content
        assert ok.usage.completion_tokens == 6 and ok.choices[0].finish_reason == "length"
        flac = client.chat.completions.create(model=svc.model, messages=_audio_msg(_wav_bytes(0.5, "FLAC"), "flac"),
                                              max_tokens=4)
        assert flac.usage.completion_tokens == 4
        # mp3 is OpenAI's other input_audio format (decoded like the corpus decodes mp3)
        mp3 = client.chat.completions.create(model=svc.model, messages=_audio_msg(_wav_bytes(1.0, "MP3"), "mp3"),
                                             max_tokens=4)
        assert mp3.usage.completion_tokens == 4 and mp3.usage.prompt_tokens == ok.usage.prompt_tokens
        # Greedy by default: the same clip and question give the same answer; another clip changes the prompt.
        again = client.chat.completions.create(model=svc.model, messages=_audio_msg(_wav_bytes(1.0)), max_tokens=6)
        assert again.choices[0].message.content == ok.choices[0].message.content
        assert again.usage.prompt_tokens == ok.usage.prompt_tokens
        # `n` answers: the greedy answer n times (generated once); sampled answers with seeds seed, seed + 1...,
        # so choice i is what a request with seed + i gets; streamed, token by token under its index.
        three = client.chat.completions.create(model=svc.model, messages=_audio_msg(_wav_bytes(1.0)), max_tokens=6, n=3)
        assert [c.index for c in three.choices] == [0, 1, 2]
        assert [c.message.content for c in three.choices] == [ok.choices[0].message.content] * 3
        assert three.usage.completion_tokens == 18 and three.usage.prompt_tokens == ok.usage.prompt_tokens
        sampled = client.chat.completions.create(model=svc.model, messages=_audio_msg(_wav_bytes(1.0)), max_tokens=6,
                                                 n=3, temperature=1.5, seed=7)
        texts = [c.message.content for c in sampled.choices]
        assert len(set(texts)) > 1
        seed8 = client.chat.completions.create(model=svc.model, messages=_audio_msg(_wav_bytes(1.0)), max_tokens=6,
                                               temperature=1.5, seed=8)
        assert seed8.choices[0].message.content == texts[1]
        by_index: dict[int, list[str]] = {}
        for chunk in client.chat.completions.create(model=svc.model, messages=_audio_msg(_wav_bytes(1.0)),
                                                    max_tokens=6, n=2, temperature=1.5, seed=7, stream=True):
            for choice in chunk.choices:
                by_index.setdefault(choice.index, []).append(choice.delta.content or "")
        assert {i: "".join(p) for i, p in by_index.items()} == {0: texts[0], 1: texts[1]}
        assert all(sum(bool(p) for p in pieces) > 1 for pieces in by_index.values())  # token by token
        with pytest.raises(openai.BadRequestError, match="n must be an integer from 1 to 8"):
            client.chat.completions.create(model=svc.model, messages=_audio_msg(_wav_bytes(1.0)), max_tokens=4, n=9)

        text_only = client.chat.completions.create(
            model=svc.model, messages=[{"role": "user", "content": "Hello"}], max_tokens=4)
        assert text_only.usage.prompt_tokens < ok.usage.prompt_tokens

        # vLLM-style audio_url parts with a data URL: the same clip, the same answer
        url = "data:audio/wav;base64," + base64.b64encode(_wav_bytes(1.0)).decode()
        as_url = client.chat.completions.create(model=svc.model, max_tokens=6, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What do you hear?"}, {"type": "audio_url", "audio_url": {"url": url}}]}])
        assert as_url.choices[0].message.content == ok.choices[0].message.content

        # Streaming: server-sent chunks as the tokens come, joining to the same greedy answer.
        chunks = list(client.chat.completions.create(model=svc.model, messages=_audio_msg(_wav_bytes(1.0)),
                                                     max_tokens=6, stream=True, stream_options={"include_usage": True}))
        deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert "".join(deltas) == ok.choices[0].message.content and len(deltas) > 1
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
        assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.prompt_tokens == ok.usage.prompt_tokens
        assert len({c.id for c in chunks}) == 1

        # Concurrent clients, streaming or not: answered in shared engine calls (the replica's /stats
        # counts them), each with the answer it gets alone.
        import urllib.request
        from concurrent.futures import ThreadPoolExecutor

        def ask(freq: float, stream: bool = False) -> str:
            r = client.chat.completions.create(model=svc.model, messages=_audio_msg(_wav_bytes(1.0, freq=freq)),
                                               max_tokens=6, stream=stream)
            if stream:
                return "".join(c.choices[0].delta.content or "" for c in r if c.choices)
            return r.choices[0].message.content

        freqs = [220.0, 330.0, 440.0, 660.0, 880.0, 1320.0]
        alone = [ask(f) for f in freqs]
        stats_url = svc.url[: -len("/v1")] + "/stats"
        before = json.loads(urllib.request.urlopen(stats_url, timeout=30).read())
        with ThreadPoolExecutor(len(freqs)) as pool:  # every other client streams
            together = list(pool.map(ask, freqs, [i % 2 == 1 for i in range(len(freqs))]))
        after = json.loads(urllib.request.urlopen(stats_url, timeout=30).read())
        assert together == alone and len(set(alone)) > 1
        assert after["requests"] - before["requests"] == len(freqs)
        assert after["batches"] - before["batches"] < len(freqs)  # some went together

        # OpenAI's `stop`: the answer ends where a stop string appears, without it (streamed or not).
        text = ok.choices[0].message.content
        stop = text[-3:]
        stopped = client.chat.completions.create(model=svc.model, messages=_audio_msg(_wav_bytes(1.0)), max_tokens=6,
                                                 stop=[stop, "\x00"])
        assert stopped.choices[0].message.content == text[: text.index(stop)]
        assert stopped.choices[0].finish_reason == "stop"
        stopped_stream = client.chat.completions.create(model=svc.model, messages=_audio_msg(_wav_bytes(1.0)),
                                                        max_tokens=6, stop=stop, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stopped_stream if c.choices) == text[: text.index(stop)]

        # A system message becomes the prompt's system turn (clients often send one).
        system = [{"role": "system", "content": "Answer briefly."}]
        sys_reply = client.chat.completions.create(model=svc.model, messages=system + _audio_msg(_wav_bytes(1.0)),
                                                   max_tokens=6)
        assert sys_reply.usage.prompt_tokens > ok.usage.prompt_tokens and sys_reply.usage.completion_tokens == 6

        bad_cases = [
            (_audio_msg(b"RIFF....WAVEfmt this is not audio at all" * 10), 400, "could not be decoded"),
            (_audio_msg("!!!not base64!!!"), 400, "not valid base64"),
            (_audio_msg(_wav_bytes(3.0)), 400, "> limit 2 s"),  # 3 s clip, limit 2 s (96 KB: under the MB limit)
            (_audio_msg(_wav_bytes(1.0), "aiff"), 400, "not supported"),
            # over the tiny LLM's 2048-token context: a 400 both ways (odd indices stream)
            ([{"role": "user", "content": "word " * 2100}], 400, "over the LLM's context"),
            ([{"role": "user", "content": "word " * 2100}], 400, "over the LLM's context"),
            ([{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "http://169.254.169.254/a.wav"}}]}],
             400, "does not fetch"),
            (_audio_msg(_wav_bytes(1.0)) + [{"role": "assistant", "content": "a tone"}], 400, "user first and last"),
            (_audio_msg(_wav_bytes(1.0)) + [{"role": "assistant", "content": None},
                                            {"role": "user", "content": "louder?"}], 400, "must be text"),
            (_audio_msg(_wav_bytes(1.0)) * 2, 400, "at most one audio"),
            (_audio_msg(b"\0" * 400_000), 413, "MB > limit"),  # over the byte limit, refused before decoding
            ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], 400, "not supported"),
        ]
        with pytest.raises(openai.BadRequestError, match="up to 4 strings"):
            client.chat.completions.create(model=svc.model, messages=_audio_msg(_wav_bytes(1.0)), max_tokens=4,
                                           stop=["a", "b", "c", "d", "e"])
        for i, (messages, status, text) in enumerate(bad_cases):
            with pytest.raises(openai.APIStatusError) as err:  # a streamed request is refused the same way
                client.chat.completions.create(model=svc.model, messages=messages, max_tokens=4, stream=i % 2 == 1)
            assert err.value.status_code == status, err.value
            assert text in err.value.message

        # Options that change what an answer is and that the ALM does not implement: refused by name, never
        # silently ignored; their default values pass.
        for option, name in [({"logprobs": True, "top_logprobs": 2}, "logprobs, top_logprobs"),
                             ({"response_format": {"type": "json_object"}}, "response_format"),
                             ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
                             ({"presence_penalty": 0.5}, "presence_penalty"),
                             ({"extra_body": {"top_k": 5, "repetition_penalty": 1.2}}, "top_k, repetition_penalty")]:
            with pytest.raises(openai.BadRequestError, match=f"not supported by this server: {name}"):
                client.chat.completions.create(model=svc.model, messages=_audio_msg(_wav_bytes(1.0)), max_tokens=4,
                                               **option)
        defaults = client.chat.completions.create(model=svc.model, messages=_audio_msg(_wav_bytes(1.0)), max_tokens=6,
                                                  logprobs=False, presence_penalty=0, response_format={"type": "text"},
                                                  extra_body={"top_k": -1, "repetition_penalty": 1.0})
        assert defaults.choices[0].message.content == ok.choices[0].message.content

        # A follow-up question about the clip: the whole conversation reaches the LLM, streamed or not.
        talk = _audio_msg(_wav_bytes(1.0)) + [{"role": "assistant", "content": text},
                                              {"role": "user", "content": [{"type": "text", "text": "Louder?"}]}]
        cache_before = json.loads(urllib.request.urlopen(stats_url, timeout=30).read())["feature_cache"]
        follow = client.chat.completions.create(model=svc.model, messages=talk, max_tokens=6)
        assert follow.choices[0].message.content and follow.usage.prompt_tokens > ok.usage.prompt_tokens
        # The clip came with the first question already: the follow-up is not encoded again.
        cache_after = json.loads(urllib.request.urlopen(stats_url, timeout=30).read())["feature_cache"]
        assert cache_after["hits"] == cache_before["hits"] + 1 and cache_after["misses"] == cache_before["misses"]
        streamed = client.chat.completions.create(model=svc.model, messages=talk, max_tokens=6, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
            follow.choices[0].message.content

        # The replica keeps serving after the bad requests.
        after = client.chat.completions.create(model=svc.model, messages=_audio_msg(_wav_bytes(1.0)), max_tokens=6)
        assert after.choices[0].message.content == ok.choices[0].message.content
    finally:
        stop_alm(svc, shutdown=True)


# ---------------------------------------------------------------------------------------------- eval stage
def _make_corpus(run_dir, write_wav) -> None:
    """A corpus stage with a few held-out clips (and training clips for distractor values)."""
    specs = [
        ("s1", "speech", "test", {"gender": "female", "transcript": "bring seven apples tomorrow"}, 440, "tone"),
        ("s2", "speech", "train", {"gender": "male", "transcript": "the lazy river flows"}, 300, "tone"),
        ("n1", "sound", "test", {"label": "white noise", "noise_colour": "white"}, 0, "noise"),
        ("n2", "sound", "test", {"label": "beeps", "beep_count": "3", "pitch_register": "high"}, 1200, "tone"),
        ("m1", "music", "test", {"instrument": "violin", "tempo": "fast"}, 660, "tone"),
        ("m2", "music", "train", {"instrument": "piano", "tempo": "slow"}, 220, "tone"),
    ]
    rows = []
    for cid, domain, split, meta, freq, kind in specs:
        path = write_wav(f"assets/{cid}.wav", seconds=0.8, kind=kind, freq=freq or 440)
        rows.append(records.make_record(id=cid, source="demo", split=split, domain=domain, audio_uri=str(path),
                                        duration_s=0.8, sample_rate=16000, metadata=meta))
    records.write_part(records.data_uri(storage.join(run_dir, "corpus")), rows)


def test_eval_stage_demo_with_controls_and_resume(ray_local, tiny_export, tmp_path, write_wav):
    from ralm.eval.run import run

    run_dir = str(tmp_path / "run")
    _make_corpus(run_dir, write_wav)
    cfg = RalmConfig()
    cfg.eval.adapters = [tiny_export]
    cfg.eval.max_new_tokens = 4
    cfg.eval.batch_size = 4
    cfg.eval.num_cpus = 0.5
    cfg.eval.mcq_per_clip = 1
    stage = run(cfg, run_dir)
    assert stage == f"{run_dir}/eval" and records.is_complete(stage)

    mcq = json.loads((tmp_path / "run/eval/demo_mcq.json").read_text())
    assert {it["clip_id"] for it in mcq} == {"s1", "n1", "n2", "m1"}  # held-out clips only
    report = json.loads((tmp_path / "run/eval/report.json").read_text())
    assert report["benchmark"] == "demo" and report["items"] == len(mcq)
    assert set(report["conditions"]) == {"audio", "shuffled", "silence"}
    assert set(report["controls"]) == {"shuffled", "silence"}
    # Every control is compared item by item with the real audio (paired over all items).
    assert set(report["vs_controls"]) == {"shuffled", "silence"}
    assert all(c["n"] == len(mcq) for c in report["vs_controls"].values())
    assert 0 <= report["p_above_chance"] <= 1
    assert 0 < report["chance"] < 1 and report["unparsed_rate"] is not None
    assert set(report["by_domain"]) <= {"speech", "sound", "music", "instruction"}
    assert report["text_preserved"]["passed"] is True
    md = (tmp_path / "run/eval/report.md").read_text()
    assert "| shuffled |" in md and "| silence |" in md and "| chance |" in md and "Text preserved" in md
    assert "audio vs shuffled:" in md and "95% CI" in md

    # The official-shape file: the items + model_output, scored by the official rule = our accuracy.
    preds = json.loads((tmp_path / "run/eval/demo_predictions.json").read_text())
    assert [p["id"] for p in preds] == [it["id"] for it in mcq]
    official = sum(string_match(p["answer"], p["model_output"], p["choices"]) for p in preds) / len(preds)
    assert official == pytest.approx(report["overall"])
    assert all(p["model_output"] in ("", *p["choices"]) for p in preds)

    # Rerun: everything is committed, nothing is generated again.
    pred_dir = report["predictions_dir"]
    parts = records.part_uris(records.data_uri(pred_dir))
    assert len(records.read_ids(records.data_uri(pred_dir))) == 3 * len(mcq)
    run(cfg, run_dir)
    assert records.part_uris(records.data_uri(pred_dir)) == parts

    # Two questions per clip: the MCQ file is rebuilt and answered anew (not the old answers under old ids).
    cfg.eval.mcq_per_clip = 2
    run(cfg, run_dir)
    more = json.loads((tmp_path / "run/eval/demo_mcq.json").read_text())
    assert len(more) > len(mcq) and {it["clip_id"] for it in more} == {it["clip_id"] for it in mcq}
    again = json.loads((tmp_path / "run/eval/report.json").read_text())
    assert again["items"] == len(more) and again["predictions_dir"] != pred_dir
    assert len(records.read_ids(records.data_uri(again["predictions_dir"]))) == 3 * len(more)


def test_eval_stage_mmau_rejects_bad_items_and_audio(ray_local, tiny_export, tmp_path, write_wav):
    from ralm.eval.run import run

    for name, freq in (("a", 300), ("b", 900), ("c", 1500)):
        write_wav(f"audio/{name}.wav", seconds=0.6, freq=freq)
    items = json.loads(open("tests/fixtures/eval/mmau-mini.json").read())
    items[0]["audio_id"], items[1]["audio_id"] = "./audio/a.wav", "./audio/b.wav"
    items[2]["audio_id"] = "./audio/missing.wav"  # -> an audio reject, scored wrong, reported as an error
    items.append({**items[0], "id": "mmau-4", "audio_id": "./audio/c.wav"})
    data = tmp_path / "mmau.json"
    data.write_text(json.dumps(items))
    cfg = RalmConfig()
    cfg.eval.benchmark = "mmau"
    cfg.eval.data = str(data)
    cfg.eval.audio_root = str(tmp_path)
    cfg.eval.adapters = [tiny_export]
    cfg.eval.max_new_tokens = 3
    cfg.eval.controls = ["shuffled"]
    cfg.eval.text_check = False
    cfg.eval.num_cpus = 0.5
    run(cfg, str(tmp_path / "run"))
    report = json.loads((tmp_path / "run/eval/mmau.report.json").read_text())
    assert report["items"] == 4 and report["rejected_items"] == 1
    assert report["rejects_by_reason"] == {"answer_not_in_choices": 1}
    assert report["conditions"]["audio"]["errors"] == {"missing": 1}
    assert set(report["conditions"]) == {"audio", "shuffled"}
    assert report["by_domain"].keys() == {"music", "speech", "sound"}
    rejects = records.read_rejects(report["predictions_dir"])
    # The missing clip fails in the audio condition and wherever the shuffled control hands it to an item.
    assert {r["reason"] for r in rejects} == {"missing"} and len(rejects) == 2
    assert sorted(r["id"].split("/")[0] for r in rejects) == ["audio", "shuffled"]
    assert "audio/mmau-3" in {r["id"] for r in rejects}
    assert (tmp_path / "run/eval/mmau_predictions.json").exists()
    assert (tmp_path / "run/eval/mmau_predictions.shuffled.json").exists()


def test_eval_stage_on_any_multiple_choice_file_mapped_in_the_config(ray_local, tiny_export, tmp_path, write_wav):
    """`eval.benchmark: mcq`: a CSV laid out as no registered benchmark is, its columns named in eval.fields."""
    from ralm.config import McqFields
    from ralm.eval.run import run

    for name, freq in (("a", 300), ("b", 900)):
        write_wav(f"clips/{name}.wav", seconds=0.6, freq=freq)
    data = tmp_path / "mine.csv"
    data.write_text("key,file,ask,c1,c2,c3,right,kind\n"
                    "k1,clips/a.wav,Low or high?,low,high,,1,pitch\n"
                    "k2,clips/b.wav,Low or high?,low,high,,2,pitch\n"
                    "k3,clips/b.wav,How many?,one,two,three,7,count\n")
    cfg = RalmConfig()
    cfg.eval.benchmark, cfg.eval.data = "mcq", str(data)
    cfg.eval.fields = McqFields(id="key", audio="file", question="ask", choices=["c1", "c2", "c3"], answer="right",
                                answer_format="index1", group_by=["kind"])
    cfg.eval.adapters = [tiny_export]
    cfg.eval.max_new_tokens, cfg.eval.controls, cfg.eval.text_check, cfg.eval.num_cpus = 2, [], False, 0.5
    run(cfg, str(tmp_path / "run"))
    report = json.loads((tmp_path / "run/eval/mcq.report.json").read_text())
    assert report["benchmark"] == "mcq" and report["items"] == 2 and report["rejected_items"] == 1
    assert report["rejects_by_reason"] == {"answer_not_in_choices": 1}
    assert set(report["conditions"]["audio"]["by_kind"]) == {"pitch"}
    preds = json.loads((tmp_path / "run/eval/mcq_predictions.json").read_text())
    assert sorted(p["key"] for p in preds) == ["k1", "k2"]  # the file's own rows, with the predictions
    assert all(p["model_prediction"] in ("", "low", "high") for p in preds)
    assert "## By kind" in (tmp_path / "run/eval/report.md").read_text()


def test_eval_stage_stops_on_a_store_that_is_down_and_rejects_nothing(ray_local, tiny_export, tmp_path, write_wav,
                                                                     monkeypatch):
    """A benchmark clip whose store does not answer is not a bad item: the stage stops with the store's error
    (one line, from the Ray actor), and no prediction or reject is kept for it (a rerun would skip those)."""
    from ralm.eval.run import run

    monkeypatch.delenv("RALM_S3_ENDPOINT_URL", raising=False)  # restored after the test: the dead endpoint goes
    write_wav("audio/a.wav", seconds=0.6, freq=300)
    items = json.loads(open("tests/fixtures/eval/mmau-mini.json").read())[:2]
    items[0]["audio_id"], items[1]["audio_id"] = "./audio/a.wav", "s3://down/b.wav"
    data = tmp_path / "mmau.json"
    data.write_text(json.dumps(items))
    cfg = RalmConfig()
    cfg.storage.s3_endpoint_url = "http://127.0.0.1:9"
    cfg.eval.benchmark, cfg.eval.data, cfg.eval.audio_root = "mmau", str(data), str(tmp_path)
    cfg.eval.adapters = [tiny_export]
    cfg.eval.max_new_tokens, cfg.eval.controls, cfg.eval.text_check, cfg.eval.num_cpus = 2, [], False, 0.5
    try:
        with pytest.raises(storage.StorageError, match="cannot read s3://down/b.wav: EndpointConnectionError"):
            run(cfg, str(tmp_path / "run"))
    finally:
        storage.configure(None)
    assert (tmp_path / "run/eval").exists()  # the stage got as far as the items
    assert not list((tmp_path / "run/eval").rglob("rejects/*.parquet"))


def test_eval_stage_likelihood_mode_picks_the_most_likely_choice(ray_local, tiny_export, tmp_path, write_wav):
    from ralm.eval.inference import ALMInference
    from ralm.eval.run import run

    for name, freq in (("a", 300), ("b", 900)):
        write_wav(f"audio/{name}.wav", seconds=0.6, freq=freq)
    items = json.loads(open("tests/fixtures/eval/mmau-mini.json").read())[:3]
    items[0]["audio_id"], items[1]["audio_id"] = "./audio/a.wav", "./audio/b.wav"
    items[2]["audio_id"] = "./audio/missing.wav"
    data = tmp_path / "mmau.json"
    data.write_text(json.dumps(items))
    cfg = RalmConfig()
    cfg.eval.benchmark, cfg.eval.data, cfg.eval.audio_root = "mmau", str(data), str(tmp_path)
    cfg.eval.adapters = [tiny_export]
    cfg.eval.answer_mode = "likelihood"
    cfg.eval.controls = ["silence"]
    cfg.eval.text_check = False
    cfg.eval.num_cpus = 0.5
    run(cfg, str(tmp_path / "run"))
    report = json.loads((tmp_path / "run/eval/mmau.report.json").read_text())
    assert report["answer_mode"] == "likelihood"
    assert report["conditions"]["audio"]["errors"] == {"missing": 1}
    assert report["unparsed_rate"] == pytest.approx(1 / 3)  # only the missing clip has no answer
    preds = {p["id"]: p for p in json.loads((tmp_path / "run/eval/mmau_predictions.json").read_text())}
    engine = ALMInference([tiny_export])
    for it in items[:2]:  # the committed answer is the argmax of an independent scoring of the same item
        scores = engine.choice_logprobs([(str(tmp_path / it["audio_id"]), it["question"], it["choices"])])[0]
        best = max(range(len(scores)), key=scores.__getitem__)
        assert preds[it["id"]]["model_output"] == it["choices"][best]
    assert "Answers by likelihood" in (tmp_path / "run/eval/report.md").read_text()
