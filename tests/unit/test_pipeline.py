"""A stage's recorded settings: a rerun with other settings that decide its output is refused (or, for
eval, run again) instead of silently keeping or mixing outputs; `--redo` starts a stage and the stages
built on it over; settings that only say how to run change freely."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from ralm import pipeline, records
from ralm.cli import main
from ralm.config import load_config


def _probe(cfg, run_dir):  # stands in for a stage: notes in the run dir that it ran (imported apart from this module)
    with open(f"{run_dir}/calls.jsonl", "a") as f:
        f.write(json.dumps([cfg.train.lr, run_dir]) + "\n")
    return run_dir


def _calls(run_dir: Path) -> list[list]:
    path = run_dir / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _finished(cfg, run_dir: Path, names=pipeline.ORDER) -> None:
    """Every stage in `names` finished with `cfg` (its record and `_SUCCESS`, plus a file of output)."""
    for name in names:
        stage = run_dir / name
        stage.mkdir(parents=True, exist_ok=True)
        (stage / "output.bin").write_bytes(b"x")
        (stage / pipeline.CONFIG_FILE).write_text(json.dumps(pipeline.stage_config(cfg, name)))
        records.mark_success(str(stage))


def _changed(cfg, run_dir: Path) -> set[str]:
    return {n for n in pipeline.ORDER if pipeline.config_changes(cfg, str(run_dir), n)}


def test_changes_reach_the_stage_and_every_stage_built_on_it(tmp_path):
    base = load_config("demo")
    _finished(base, tmp_path)
    assert _changed(base, tmp_path) == set()
    cases = {
        "train.lr=0.1": {"train", "eval"},
        "corpus.max_seconds=30": set(pipeline.ORDER),
        "features.encoders.0.layers=[1]": {"features", "train", "eval"},
        "llm.model=other-llm": {"generate", "rephrase", "train", "eval"},  # template prompts do not use it
        "rephrase.sampling.temperature=0.9": {"rephrase", "train", "eval"},
        "eval.mcq_per_clip=5": {"eval"},
        # how to run, not what comes out
        "features.encoders.0.batch_size=1": set(),
        "features.encoders.1.num_cpus=0.25": set(),
        "llm.serve.num_replicas=4": set(),
        "train.checkpoint_every=7": set(),
        "train.num_workers=4": set(),  # elastic: a resumed run may have fewer workers
        "eval.concurrency=1": set(),
        "corpus.part_rows=9": set(),
    }
    for override, expected in cases.items():
        assert _changed(load_config("demo", [override]), tmp_path) == expected, override
    # LLM-written prompts do depend on the LLM.
    llm_prompts = load_config("demo", ["prompts.source=llm"])
    _finished(llm_prompts, tmp_path / "llm")
    assert "prompts" in _changed(load_config("demo", ["prompts.source=llm", "llm.model=x"]), tmp_path / "llm")


def test_a_changed_stage_is_refused_with_what_changed_and_how_to_redo(tmp_path, monkeypatch):
    base = load_config("demo")
    _finished(base, tmp_path)
    monkeypatch.setitem(pipeline.STAGES, "train",
                        dataclasses.replace(pipeline.STAGES["train"], target="tests.unit.test_pipeline:_probe"))
    changed = load_config("demo", ["train.lr=0.1"])
    with pytest.raises(pipeline.StageConfigChanged) as err:
        pipeline.run_stage("train", changed, str(tmp_path))
    message = str(err.value)
    assert "train was finished" in message and "train.lr: 0.002 -> 0.1" in message and "--redo train" in message
    assert (tmp_path / "train" / "output.bin").exists() and (tmp_path / "eval" / "output.bin").exists()

    # A partly done stage (a checkpoint, no _SUCCESS) is refused too: resuming would mix two configs.
    (tmp_path / "train" / "_SUCCESS").unlink()
    (tmp_path / "train" / "ray" / "checkpoint-step00000005").mkdir(parents=True)
    with pytest.raises(pipeline.StageConfigChanged, match="train was started"):
        pipeline.run_stage("train", changed, str(tmp_path))
    # An attempt that failed before committing anything simply runs with the new settings.
    shutil.rmtree(tmp_path / "train" / "ray")
    pipeline.run_stage("train", changed, str(tmp_path))
    assert _calls(tmp_path) == [[0.1, str(tmp_path)]]
    assert json.loads((tmp_path / "train" / pipeline.CONFIG_FILE).read_text())["train.lr"] == 0.1

    # --redo: train and eval (built on it) start over; features and the rest stay as they were.
    records.mark_success(str(tmp_path / "train"))
    again = load_config("demo", ["train.lr=0.2"])
    assert pipeline.run_stage("train", again, str(tmp_path), redo_first=True) == str(tmp_path)
    assert _calls(tmp_path)[-1] == [0.2, str(tmp_path)]
    assert not (tmp_path / "train" / "output.bin").exists() and not (tmp_path / "eval").exists()
    assert json.loads((tmp_path / "train" / pipeline.CONFIG_FILE).read_text())["train.lr"] == 0.2
    assert all((tmp_path / s / "output.bin").exists() for s in ("corpus", "generate", "features"))
    # Settings that only say how to run may change on a rerun.
    records.mark_success(str(tmp_path / "train"))
    pipeline.run_stage("train", load_config("demo", ["train.lr=0.2", "train.log_every=3"]), str(tmp_path))
    assert len(_calls(tmp_path)) == 3


def test_committed_rows_make_a_stage_started_and_missing_inputs_stop_a_run_early(tmp_path, monkeypatch):
    for name in pipeline.ORDER:
        monkeypatch.setitem(pipeline.STAGES, name,
                            dataclasses.replace(pipeline.STAGES[name], target="tests.unit.test_pipeline:_probe"))
    monkeypatch.setattr(pipeline, "_refresh_report", lambda run_dir: f"{run_dir}/report.md")
    monkeypatch.setattr(pipeline, "_uses_llm_service", lambda cfg, name: False)
    base = load_config("demo")
    with pytest.raises(RuntimeError, match="generate reads the output of prompts, which has not finished"):
        pipeline.run_all(base, str(tmp_path), ["generate"])
    assert _calls(tmp_path) == []
    _finished(base, tmp_path, ["corpus", "prompts"])
    (tmp_path / "generate" / "data").mkdir(parents=True)
    (tmp_path / "generate" / pipeline.CONFIG_FILE).write_text(json.dumps(pipeline.stage_config(base, "generate")))
    other = load_config("demo", ["generation.best_of_n=2"])
    assert not pipeline.has_output(base, str(tmp_path), "generate")
    assert pipeline.config_changes(other, str(tmp_path), "generate") == []  # nothing committed yet
    records.write_part(records.data_uri(str(tmp_path / "generate")), [records.make_record(id="c0", domain="sound")])
    assert pipeline.has_output(base, str(tmp_path), "generate")
    assert pipeline.config_changes(other, str(tmp_path), "generate") == ["generation.best_of_n: 1 -> 2"]
    pipeline.run_all(base, str(tmp_path), ["prompts", "generate"])  # prompts finished: skipped; generate resumes
    assert len(_calls(tmp_path)) == 1


def test_run_stops_before_any_work_and_reruns_a_changed_eval(tmp_path, monkeypatch):
    base = load_config("demo")
    _finished(base, tmp_path)
    for name in pipeline.ORDER:
        monkeypatch.setitem(pipeline.STAGES, name,
                            dataclasses.replace(pipeline.STAGES[name], target="tests.unit.test_pipeline:_probe"))
    monkeypatch.setattr(pipeline, "_refresh_report", lambda run_dir: f"{run_dir}/report.md")
    monkeypatch.setattr(pipeline, "_uses_llm_service", lambda cfg, name: False)  # the probes need no LLM
    with pytest.raises(pipeline.StageConfigChanged, match="generate was finished"):
        pipeline.run_all(load_config("demo", ["generation.best_of_n=3"]), str(tmp_path))
    assert _calls(tmp_path) == []
    # eval keeps each benchmark/adapter combination apart: a changed eval simply runs again.
    pipeline.run_all(load_config("demo", ["eval.mcq_per_clip=5"]), str(tmp_path))
    assert len(_calls(tmp_path)) == 1
    assert json.loads((tmp_path / "eval" / pipeline.CONFIG_FILE).read_text())["eval.mcq_per_clip"] == 5
    # --redo generate: generate, rephrase, train and eval run; corpus, prompts and features are skipped.
    timings = pipeline.run_all(load_config("demo", ["generation.best_of_n=3", "eval.mcq_per_clip=5"]),
                               str(tmp_path), redo_stages=["generate"])
    assert len(_calls(tmp_path)) == 1 + 4 and set(timings) == {"generate", "rephrase", "train", "eval"}
    assert all((tmp_path / s / "output.bin").exists() for s in ("corpus", "prompts", "features"))


def test_redo_features_removes_its_shards_kept_elsewhere_and_nothing_else(tmp_path):
    cfg = load_config("demo")
    run_dir, shards = tmp_path / "run", tmp_path / "bucket"
    _finished(cfg, run_dir)
    shards.mkdir()
    for name in ("shard-train-000000.tar", "shard-test-000000.tar", "someone-elses.tar"):
        (shards / name).write_bytes(b"t")
    (run_dir / "features" / "data").mkdir()
    (run_dir / "features" / "data" / "part-train-000000.parquet").write_bytes(b"p")
    (run_dir / "features" / "encoders.json").write_text(json.dumps({"shards_uri": str(shards)}))
    assert pipeline.redo(cfg, str(run_dir), ["features"]) == ["features", "train", "eval"]
    assert sorted(p.name for p in shards.iterdir()) == ["shard-test-000000.tar", "someone-elses.tar"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["corpus", "generate", "prompts", "rephrase"]


def test_cli_says_what_changed_and_checks_redo_names(tmp_path, capsys):
    _finished(load_config("demo"), tmp_path)
    assert main(["train", "--run-dir", str(tmp_path), "train.max_steps=300"]) == 1
    err = capsys.readouterr().err
    assert "ralm train: error: train was finished" in err and "train.max_steps: 100 -> 300" in err
    assert "--redo train" in err and "Traceback" not in err
    assert main(["run", "--run-dir", str(tmp_path), "--redo", "train,bogus"]) == 2
    assert (tmp_path / "train" / "output.bin").exists()
