"""Benchmark loaders on fixture files, the demo MCQ builder, and the controls."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ralm.eval.benchmarks import BENCHMARKS, load_benchmark, read_items
from ralm.eval.controls import SILENCE_PREFIX, apply_control, chance, load_item_audio
from ralm.eval.mcq import build_demo_mcq, content_words
from ralm.eval.scoring import string_match

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "eval"


def test_registry_has_the_benchmarks():
    assert {"mmau", "mmsu", "mmar", "demo"} <= set(BENCHMARKS)
    with pytest.raises(KeyError, match="registered"):
        load_benchmark("nope", str(FIX / "mmau-mini.json"))


def test_mmau_loader(tmp_path):
    got = load_benchmark("mmau", str(FIX / "mmau-mini.json"), audio_root=str(tmp_path))
    assert [it.id for it in got.items] == ["mmau-1", "mmau-2", "mmau-3"]
    first = got.items[0]
    assert first.audio == str(tmp_path / "audios" / "a.wav")
    assert first.answer == "Violin" and first.answer_index == 0
    assert (first.domain, first.category, first.difficulty) == ("music", "Instrument Identification", "easy")
    assert got.items[2].answer == "Car horn"  # "Car horn " in the file: whitespace-insensitive
    assert got.rejects == [{"id": "mmau-bad", "reason": "answer_not_in_choices",
                            "detail": "answer 'maybe' is not one of the choices ['yes', 'no']"}]
    # Default audio root: the data file's folder.
    default = load_benchmark("mmau", str(FIX / "mmau-mini.json"))
    assert default.items[0].audio == str(FIX / "audios" / "a.wav")
    assert len(load_benchmark("mmau", str(FIX / "mmau-mini.json"), limit=2).items) == 2


def test_mmsu_loader_letter_and_text_answers(tmp_path):
    got = load_benchmark("mmsu", str(FIX / "mmsu-mini.jsonl"), audio_root=str(tmp_path))
    assert len(got.items) == 2
    a, b = got.items
    assert a.choices == ["I", "never", "said", "that"] and a.answer_index == 1  # answer_gt as text
    assert b.answer_index == 2 and b.answer == "a greeting"  # answer_gt as a letter
    assert a.domain == "speech" and a.category == "perception" and a.subcategory == "phonology"
    assert a.group_value("task") == "stress_detection"
    assert got.rejects[0]["id"] == "mmsu-3" and got.rejects[0]["reason"] == "too_few_choices"
    assert BENCHMARKS["mmsu"].scorer == "letter"
    row = BENCHMARKS["mmsu"]().submission_row(b, 2, "<answer>3</answer>")
    assert row["predicted_answer"] == "C" and row["model_prediction"] == "a greeting"


def test_mmar_loader(tmp_path):
    got = load_benchmark("mmar", str(FIX / "mmar-mini.jsonl"), audio_root=str(tmp_path))
    assert [it.answer for it in got.items] == ["Two", "Jazz"]
    assert got.items[1].domain == "mix-music-speech" and got.items[1].category == "Cultural Layer"
    assert got.items[0].audio == str(tmp_path / "audio" / "x.wav")


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_items(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON line"):
        read_items(str(bad))


def test_submission_row_is_official_shape():
    bench = BENCHMARKS["mmau"]()
    item = load_benchmark("mmau", str(FIX / "mmau-mini.json")).items[0]
    row = bench.submission_row(item, 1, "<answer>2</answer>")
    assert row["model_output"] == "Electric violin" and row["model_prediction"] == "Electric violin"
    assert row["id"] == "mmau-1" and row["choices"] == item.choices  # the original item is echoed
    assert bench.submission_row(item, None, "no idea")["model_output"] == ""


# ---------------------------------------------------------------------------------------------- demo MCQ
def _rec(i, domain, split="test", **meta):
    return {"id": f"c{i}", "clip_id": f"c{i}", "split": split, "domain": domain, "audio_uri": f"/a/c{i}.wav",
            "metadata": {k: str(v) for k, v in meta.items() if v is not None}}


CORPUS = [
    _rec(1, "speech", gender="female", transcript="The quick brown fox jumps over the lazy dog"),
    _rec(2, "speech", "train", gender="male", transcript="Please bring seven apples tomorrow morning"),
    _rec(3, "sound", label="bell", pitch_register="high", beep_count=None),
    _rec(4, "sound", label="beeps", beep_count="3", pitch_register="low", frequency_hz="220"),
    _rec(5, "sound", "train", label="white noise", noise_colour="white"),
    _rec(6, "music", instrument="violin", tempo="fast", key="C major", mode="major"),
    _rec(7, "music", "train", instrument="acoustic guitar", tempo="slow"),
    _rec(8, "instruction", transcript="What is three plus four?", answer="7", gender="male"),
]


def test_demo_mcq_builder():
    tests = [r for r in CORPUS if r["split"] == "test"]
    items = build_demo_mcq(tests, pool_records=CORPUS, per_clip=3, seed=0)
    assert items == build_demo_mcq(tests, pool_records=CORPUS, per_clip=3, seed=0)  # deterministic
    by_clip: dict[str, list] = {}
    for it in items:
        by_clip.setdefault(it["clip_id"], []).append(it)
        # One correct choice, distractors no word-token scorer can confuse with it.
        assert it["answer"] in it["choices"] and len(set(it["choices"])) == len(it["choices"])
        others = [c for c in it["choices"] if c != it["answer"]]
        assert all(not string_match(it["answer"], o, it["choices"]) for o in others)
        assert it["task"] in {"speech", "sound", "music"} and it["difficulty"] in {"easy", "medium", "hard"}
        assert 2 <= len(it["choices"]) <= 4
    assert set(by_clip) == {"c1", "c3", "c4", "c6", "c8"}  # train clips never asked about
    assert all(len(v) <= 3 for v in by_clip.values())
    for it in [it for it in items if it["category"] == "transcript_word" and it["clip_id"] == "c1"]:
        # The spoken word: other words of the same transcript are never distractors.
        spoken = set(content_words(CORPUS[0]["metadata"]["transcript"]))
        assert it["answer"] in spoken and not spoken & (set(it["choices"]) - {it["answer"]})
    gender = [it for it in items if it["category"] == "gender"]
    assert all(sorted(it["choices"]) == ["female", "male"] for it in gender)  # honest 2-way choice
    beeps = [it for it in items if it["category"] == "beep_count"]
    assert all(it["answer"] == "3 beeps" and len(it["choices"]) == 4 for it in beeps)
    arithmetic = [it for it in items if it["category"] == "answer"]
    assert all(it["answer"] == "7" and it["task"] == "speech" for it in arithmetic)


def test_demo_mcq_loads_as_benchmark(tmp_path):
    out = tmp_path / "eval" / "demo_mcq.json"
    items = build_demo_mcq([r for r in CORPUS if r["split"] == "test"], str(out), pool_records=CORPUS)
    assert json.loads(out.read_text()) == items
    loaded = load_benchmark("demo", str(out))
    assert not loaded.rejects and len(loaded.items) == len(items)
    assert loaded.items[0].audio.startswith("/a/")  # absolute corpus URIs kept
    assert {it.domain for it in loaded.items} <= {"speech", "sound", "music", "instruction"}
    with pytest.raises(KeyError, match="unknown MCQ facts"):
        build_demo_mcq(CORPUS, facts=["nope"])


# ---------------------------------------------------------------------------------------------- controls
def test_controls(tmp_path):
    for name in "abc":
        sf.write(tmp_path / f"{name}.wav", np.full(8000, 0.1, dtype=np.float32), 16000)
    mmau = json.loads((FIX / "mmau-mini.json").read_text())[:3]
    for it, name in zip(mmau, "abc", strict=True):
        it["audio_id"] = f"{name}.wav"
    mmau.append({**mmau[0], "id": "mmau-1b", "question": "Same clip, second question"})
    (tmp_path / "set.json").write_text(json.dumps(mmau))
    items = load_benchmark("mmau", str(tmp_path / "set.json")).items
    shuffled = apply_control("shuffled", items, seed=1)
    assert [s.id for s in shuffled] == [it.id for it in items]
    assert all(s.audio != it.audio for s, it in zip(shuffled, items, strict=True))  # never its own clip
    assert sorted({s.audio for s in shuffled}) == sorted({it.audio for it in items})
    assert shuffled[0].audio == shuffled[3].audio  # one clip -> one replacement
    silent = apply_control("silence", items)
    assert all(s.audio == SILENCE_PREFIX + it.audio for s, it in zip(silent, items, strict=True))
    wav = load_item_audio(silent[0].audio, 16000)
    assert wav.shape == (8000,) and not wav.any()
    assert load_item_audio(items[0].audio, 16000).max() == pytest.approx(0.1, abs=1e-3)
    assert chance(items) == pytest.approx((0.25 + 0.25 + 1 / 3 + 0.25) / 4)
    with pytest.raises(ValueError, match="at least 2 different clips"):
        apply_control("shuffled", items[:1])


def _mcq(path, fields: dict | None = None, audio_root=None):
    from ralm.config import McqFields

    return load_benchmark("mcq", str(path), audio_root=audio_root, fields=McqFields(**(fields or {})))


def test_mcq_benchmark_maps_a_csv_with_a_column_per_choice_and_letter_answers(tmp_path):
    (tmp_path / "bench.csv").write_text(
        "qid,wav,prompt,opt1,opt2,opt3,gold,area,level\n"
        "q1,clips/a.wav,What plays?,Violin,Piano,,B,music,easy\n"      # two choices (empty third skipped)
        "q2,/abs/b.wav,Who speaks?,a man,a woman,a child,a woman,speech,hard\n"  # the text itself
        "q3,clips/c.wav,Loud?,yes,no,,D,sound,easy\n"                   # D: no fourth choice
        "q4,,Empty audio?,yes,no,,A,sound,easy\n")
    got = _mcq(tmp_path / "bench.csv", {"id": "qid", "audio": "wav", "question": "prompt",
                                        "choices": ["opt1", "opt2", "opt3"], "answer": "gold", "domain": "area",
                                        "group_by": ["level"]})
    a, b = got.items
    assert (a.id, a.choices, a.answer, a.domain) == ("q1", ["Violin", "Piano"], "Piano", "music")
    assert a.audio == str(tmp_path / "clips" / "a.wav") and b.audio == "/abs/b.wav"
    assert b.answer_index == 1 and a.group_value("level") == "easy"
    assert {r["id"]: r["reason"] for r in got.rejects} == {"q3": "answer_not_in_choices", "q4": "missing_field"}
    assert BENCHMARKS["mcq"]().group_keys == ()  # nothing to group by unless mapped
    from ralm.config import McqFields

    assert get_mcq_groups(McqFields(domain="area", group_by=["level", "area"])) == ("domain", "level", "area")


def get_mcq_groups(fields) -> tuple:
    from ralm.eval.benchmarks import get_benchmark

    return get_benchmark("mcq", fields).group_keys


def test_mcq_benchmark_reads_list_columns_and_indices_from_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": 7, "audio": "x.wav", "question": "Which?", "choices": ["cat", "dog", "bird"], "answer": 3},
            {"id": 8, "audio": "y.wav", "question": "Which?", "choices": ["cat", "dog"], "answer": 5}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "b.parquet")
    for name in ("b.jsonl", "b.parquet"):
        got = _mcq(tmp_path / name, {"answer_format": "index1"}, audio_root="s3://bucket/clips")
        assert [(it.id, it.answer) for it in got.items] == [("7", "bird")]
        assert got.items[0].audio == "s3://bucket/clips/x.wav"
        assert got.rejects[0]["reason"] == "answer_not_in_choices" and "index1" in got.rejects[0]["detail"]
        # Without saying the answers are indices, a number is not guessed at: the reject says what to set.
        auto = _mcq(tmp_path / name)
        assert not auto.items and "answer_format" in auto.rejects[0]["detail"]
    # A CSV's list cell, written as JSON or as Python writes a list.
    (tmp_path / "c.csv").write_text('audio,question,choices,answer\n'
                                    'x.wav,Which?,"[""cat"", ""dog""]",dog\n'
                                    "y.wav,Which?,\"['up', 'down']\",A\n"
                                    "z.wav,Which?,cat or dog,cat\n")
    got = _mcq(tmp_path / "c.csv")
    assert [(it.id, it.answer) for it in got.items] == [("0", "dog"), ("1", "up")]
    assert got.rejects == [{"id": "2", "reason": "bad_choices", "detail": "column 'choices' is not a list: 'cat or dog'"}]


def test_audio_embedded_in_a_parquet_file_is_written_out_once(tmp_path, monkeypatch):
    """A Hugging Face Parquet export holds each clip in the row ({"bytes", "path"}): the eval stage writes
    them to files named by content, which the workers then read like any clip."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ralm.audio import load_audio

    def wav_bytes(freq: float) -> bytes:
        buf = io.BytesIO()
        sf.write(buf, 0.3 * np.sin(2 * np.pi * freq * np.arange(8000) / 16000).astype(np.float32), 16000,
                 format="WAV")
        return buf.getvalue()

    clips = [wav_bytes(300), wav_bytes(900)]
    rows = [{"id": f"i{k}", "audio_id": {"bytes": clips[k % 2], "path": f"orig/{k}.wav"}, "question": "Q?",
             "choices": ["a", "b"], "answer": "a"} for k in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "hf.parquet")
    assert not _mcq(tmp_path / "hf.parquet", {"audio": "audio_id"}).items  # no place to write them: rejects
    monkeypatch.chdir(tmp_path)
    got = load_benchmark("mmau", str(tmp_path / "hf.parquet"), audio_dir="run/eval/audio")  # a relative run dir
    paths = [it.audio for it in got.items]
    assert len(paths) == 3 and paths[0] == paths[2] != paths[1] and all(p.startswith(str(tmp_path)) for p in paths)
    assert len(list((tmp_path / "run/eval/audio").iterdir())) == 2  # one file per distinct clip
    wav, _ = sf.read(io.BytesIO(clips[1]), dtype="float32")
    assert np.array_equal(load_audio(paths[1], 16000), wav)
    assert got.items[0].raw["audio_id"] == paths[0]  # the predictions file holds the path, not the bytes
    mtime = os.path.getmtime(paths[0])
    load_benchmark("mmau", str(tmp_path / "hf.parquet"), audio_dir="run/eval/audio")
    assert os.path.getmtime(paths[0]) == mtime  # a rerun writes nothing again


def test_a_parquet_file_of_embedded_clips_is_read_a_batch_at_a_time(tmp_path):
    """A benchmark's clips embedded in its Parquet file can be larger than memory: the stage holds one batch
    of rows at a time (the clips are written out and dropped), not the file."""
    import tracemalloc

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    clip_bytes, n = 100_000, 240  # 24 MB of clips
    rows = [{"id": f"i{k}", "audio_id": {"bytes": rng.bytes(clip_bytes), "path": f"{k}.wav"}, "question": "Q?",
             "choices": ["a", "b"], "answer": "a"} for k in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "hf.parquet", row_group_size=32)
    del rows
    tracemalloc.start()
    try:
        got = load_benchmark("mmau", str(tmp_path / "hf.parquet"), audio_dir=str(tmp_path / "audio"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(got.items) == n and len(list((tmp_path / "audio").iterdir())) == n
    assert peak < n * clip_bytes / 2, f"peak {peak / 1e6:.1f} MB of Python objects for a 24 MB file"


def test_eval_stage_on_a_file_it_cannot_use_says_why_before_any_work(tmp_path):
    from ralm.config import RalmConfig
    from ralm.eval.run import run

    (tmp_path / "b.csv").write_text("wav,question,choices,answer\nx.wav,Q?,\"['a', 'b']\",a\n")
    cfg = RalmConfig()
    cfg.eval.benchmark, cfg.eval.data = "mcq", str(tmp_path / "b.csv")  # eval.fields.audio is still "audio"
    with pytest.raises(ValueError, match=r"no usable mcq items \(1 rejected: .*missing_column.*item 0: no column "
                       r"'audio' in the file \(it has: wav, question, choices, answer\)"):
        run(cfg, str(tmp_path / "run"))
