"""`ralm run` end to end on a tiny but real config (tests/e2e/tiny_pipeline.py), in subprocesses.

- an uninterrupted run completes: every stage `_SUCCESS`, `report.md`, no Ray process left behind;
- resume after a crash, on one run dir killed twice:
  1. SIGKILL of the driver's process group INSIDE `generate` (parts committed, no `_SUCCESS`), then
  2. a rerun that resumes generate and is SIGKILLed BETWEEN stages (right after `features/_SUCCESS`), then
  3. a rerun to completion.
  The resumed generate/rephrase datasets have no duplicate ids and the uninterrupted run's ids and texts
  (seeds derive from row ids); parts committed before the kill are never rewritten; stages complete
  before a kill are reported "complete, skipped" and their files stay untouched; no kill leaves a stray
  Ray cluster behind.

The uninterrupted run is the reference for the crashed one (module-scoped fixtures: 2 full runs in all).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ralm import records
from ralm.corpus import demo
from tests.e2e.tiny_pipeline import (
    CORPUS_LIMIT,
    STAGES,
    assert_complete,
    assert_no_stray_ray,
    parts,
    run_to_completion,
    snapshot,
    start_run,
    wait_for,
    write_config,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.ray,
    pytest.mark.skipif(
        demo.find_soundfont() is None or not all(demo.shutil.which(t) for t in demo.REQUIRED_TOOLS),
        reason="demo Debian packages not installed (scripts/setup.sh)"),
]

BEFORE_TRAIN = STAGES[:STAGES.index("train")]  # corpus .. features


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config(tmp_path_factory, "e2e")


@pytest.fixture(scope="module")
def clean_run(config: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One uninterrupted `ralm run`: (run dir, its output)."""
    base = tmp_path_factory.mktemp("clean")
    driver = run_to_completion(config, base / "run", base / "run.log")
    return base / "run", driver.output()


@pytest.fixture(scope="module")
def crashed_run(config: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One run dir through kill inside generate -> rerun killed after features -> rerun to completion."""
    base = tmp_path_factory.mktemp("crashed")
    run_dir = base / "run"
    gen = run_dir / "generate"
    out: dict = {"run_dir": run_dir}

    # 1. Kill inside generate: at least one part committed, the stage not finished.
    d1 = start_run(config, run_dir, base / "run1.log")
    wait_for(d1, lambda: parts(gen), "generate part", poll_s=0.02)
    d1.kill()
    assert not (gen / "_SUCCESS").exists(), "generate finished before the kill; the test needs more rows"
    assert_no_stray_ray(d1)
    at_kill = snapshot(gen / "data")
    out["generate_parts_at_kill"] = {p.name: at_kill[p.name] for p in parts(gen)}
    out["generate_ids_at_kill"] = records.done_ids(str(gen))

    # 2. Rerun; kill between stages, as soon as features is complete.
    d2 = start_run(config, run_dir, base / "run2.log")
    wait_for(d2, lambda: (run_dir / "features" / "_SUCCESS").exists(), "features/_SUCCESS", poll_s=0.02)
    d2.kill()
    assert not (run_dir / "train" / "_SUCCESS").exists()
    assert_no_stray_ray(d2)
    out["run2_output"] = d2.output()
    out["files_at_second_kill"] = {s: snapshot(run_dir / s) for s in BEFORE_TRAIN}

    # 3. Rerun to completion.
    d3 = run_to_completion(config, run_dir, base / "run3.log")
    out["run3_output"] = d3.output()
    return out


def _ids(stage_dir: Path) -> tuple[list[str], list[str]]:
    data = records.read_table(str(stage_dir / "data"), ["id"]).column("id").to_pylist()
    rejects = [r["id"] for r in records.read_rejects(str(stage_dir))]
    return data, rejects


def _texts(stage_dir: Path) -> dict[str, tuple]:
    rows = records.read_records(str(stage_dir / "data"), ["id", "response", "rephrased"])
    return {r["id"]: (r["response"], r["rephrased"]) for r in rows}


def _stage_lines(output: str) -> dict[str, list[str]]:
    """`[i/n] name: what` lines of the driver's output, per stage."""
    lines: dict[str, list[str]] = {}
    for m in re.finditer(r"^\[\d+/\d+\] (\w+): (.*)$", output, re.M):
        lines.setdefault(m.group(1), []).append(m.group(2))
    return lines


def test_uninterrupted_run_completes(clean_run: tuple[Path, str]) -> None:
    run_dir, output = clean_run
    assert_complete(run_dir)
    lines = _stage_lines(output)
    for stage in STAGES:
        assert any(line.startswith("done in") for line in lines.get(stage, [])), (stage, lines)
        assert not any("skipped" in line for line in lines[stage])
    assert f"run complete: {run_dir}" in output
    corpus = records.read_records(str(run_dir / "corpus" / "data"), ["id", "split", "domain"])
    assert len(corpus) == CORPUS_LIMIT and sum(r["split"] == "test" for r in corpus) >= 2
    assert {r["domain"] for r in corpus} == {"speech", "sound", "music", "instruction"}
    gen_data, _ = _ids(run_dir / "generate")
    assert gen_data and len(gen_data) == len(set(gen_data))
    report = (run_dir / "report.md").read_text()
    assert f"Stages complete: {', '.join(STAGES)}." in report and "## Evaluation" in report


def test_kill_inside_a_stage_then_resume(crashed_run: dict, clean_run: tuple[Path, str]) -> None:
    run_dir, ref_dir = crashed_run["run_dir"], clean_run[0]
    assert_complete(run_dir)
    # The first rerun resumed generate (not skipped, not restarted from scratch).
    run2 = _stage_lines(crashed_run["run2_output"])
    assert [run2[s][0].split(" (")[0] for s in ("corpus", "prompts")] == ["complete, skipped"] * 2
    assert not run2["generate"][0].startswith("complete")
    assert any(x.startswith("done in") for x in run2["generate"])
    at_kill = crashed_run["generate_ids_at_kill"]
    assert at_kill and at_kill < records.done_ids(str(run_dir / "generate"))

    for stage in ("generate", "rephrase"):
        data, rejects = _ids(run_dir / stage)
        assert len(data) == len(set(data)), f"{stage}: duplicate ids in data"
        assert len(rejects) == len(set(rejects)), f"{stage}: duplicate ids in rejects"
        assert not set(data) & set(rejects), f"{stage}: ids both accepted and rejected"
        ref_data, ref_rejects = _ids(ref_dir / stage)
        assert set(data) | set(rejects) == set(ref_data) | set(ref_rejects), stage
        assert set(data) == set(ref_data), stage
        # Seeds derive from row ids: a recomputed row got the text the uninterrupted run gave it.
        assert _texts(run_dir / stage) == _texts(ref_dir / stage), stage

    # Parts committed before the kill were kept as they were: same files, same bytes, same mtimes.
    now = snapshot(run_dir / "generate" / "data")
    for name, (sha, mtime) in crashed_run["generate_parts_at_kill"].items():
        assert name in now, f"part {name} committed before the kill is gone"
        assert now[name] == (sha, mtime), f"part {name} was rewritten"


def test_kill_between_stages_then_resume(crashed_run: dict) -> None:
    run_dir = crashed_run["run_dir"]
    assert_complete(run_dir)
    output = crashed_run["run3_output"]
    lines = _stage_lines(output)
    for stage in BEFORE_TRAIN:
        assert lines[stage] == [f"complete, skipped ({run_dir}/{stage})"], (stage, lines.get(stage))
        assert snapshot(run_dir / stage) == crashed_run["files_at_second_kill"][stage], f"{stage} changed"
    for stage in ("train", "eval"):
        assert any(line.startswith("done in") for line in lines[stage]), (stage, lines.get(stage))
    assert f"run complete: {run_dir}" in output


def test_rerun_with_other_settings_stops_and_names_them(clean_run: tuple[Path, str], config: Path,
                                                        tmp_path: Path) -> None:
    """A finished run rerun with another learning rate: train's output would be stale, so the run stops
    before any work, says what changed and how to start over, and leaves every stage as it was."""
    run_dir, _ = clean_run
    before = {stage: snapshot(run_dir / stage) for stage in STAGES}
    driver = start_run(config, run_dir, tmp_path / "changed.log", "train.lr=0.123")
    assert driver.wait(300) == 1, driver.tail()
    output = driver.output()
    assert "ralm run: error: train was finished" in output and "train.lr: " in output and "-> 0.123" in output
    assert "--redo train" in output and "Traceback" not in output
    assert {stage: snapshot(run_dir / stage) for stage in STAGES} == before
