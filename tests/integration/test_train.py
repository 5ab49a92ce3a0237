"""Adapter training through real Ray Train + DeepSpeed (gloo, 2 CPU workers) on real WebDataset shards.

Two training runs share one local Ray: a clean run (learning, frozen LLM, once-per-epoch sampling, export)
and a crash run (driver failure -> relaunch resumes; worker death -> Ray Train restarts from checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ralm import storage
from ralm.train import trainer
from ralm.train.toy import make_toy_llm, make_toy_run, toy_config, toy_features

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def toy_llm(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_toy_llm(str(tmp_path_factory.mktemp("llm") / "toy"))


def test_training_learns_only_the_adapter_and_sees_each_sample_once(ray_local, toy_llm, tmp_path: Path):
    run_dir = str(tmp_path / "run")
    info = make_toy_run(run_dir, toy_llm, n_train=24, shard_clips=4, two_encoders=True)
    trace = tmp_path / "trace"
    trace.mkdir()
    # 24 examples / 2 workers / batch 4 = 3 steps per epoch; 2 epochs.
    cfg = toy_config(run_dir, toy_llm, max_steps=None, epochs=2, checkpoint_every=3, lr=1e-2)
    trainer.run(cfg, run_dir, trace_dir=str(trace))

    stage = Path(run_dir) / "train"
    report = storage.read_json(str(stage / "report.json"))
    assert (stage / "_SUCCESS").exists()
    assert report["steps"] == report["planned_steps"] == 6
    assert report["samples_seen"] == 48
    assert report["samples_per_s"] > 0 and 0 <= report["padding_pct"] < 50
    assert report["device"] == "cpu" and "| device | cpu |" in (stage / "report.md").read_text()
    assert len(report["loss_curve"]) == 6
    # The loss goes down on the learnable toy task.
    assert report["final_loss_avg5"] < report["first_loss"] - 0.05, report["loss_curve"]
    assert list((stage / "tb").glob("events.out.tfevents.*"))

    # Every train sample exactly once per epoch across both workers.
    for epoch in (0, 1):
        seen = [line for f in sorted(trace.glob(f"epoch{epoch}-rank*.txt")) for line in f.read_text().split()]
        assert len(seen) == len(set(seen)) == len(info["train_ids"])
        assert set(seen) == set(info["train_ids"])
        assert len(list(trace.glob(f"epoch{epoch}-rank*.txt"))) == 2

    # Only the adapter changed: the exported ALM's LLM is bit-identical to the frozen folder's weights,
    # and the adapter differs from its (seeded) initialisation.
    from ralm.model.alm import ALM
    from ralm.model.export import load_alm

    alm = load_alm(str(stage / "export"))
    fresh = ALM.build(toy_llm, info["encoders"], adapter_hidden=32, seed=cfg.train.seed)
    for (name, a), (_, b) in zip(alm.llm.state_dict().items(), fresh.llm.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    init = fresh.frontend.state_dict()
    changed = {n for n, p in alm.frontend.state_dict().items() if not torch.equal(p, init[n])}
    # (a one-layer mix has a single softmax weight: it cannot change, its gradient is zero)
    assert changed == {n for n, p in init.items() if not (n.startswith("mixers.") and p.numel() == 1)}

    # Checkpoints and the export hold no LLM weights.
    llm_bytes = sum(f.stat().st_size for f in Path(toy_llm).glob("*.safetensors"))
    for ckpt in (stage / "ray").glob("checkpoint_*"):
        assert sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) < llm_bytes / 4
    keys = load_file(str(stage / "export" / "adapter.safetensors")).keys()
    assert keys and not any("llm" in k or "embed_tokens" in k for k in keys)

    # The exported model answers (greedy generation through the adapter).
    clip = next(iter(info["clips"]))
    feats = toy_features(clip["label"], 30, info["encoders"], np.random.default_rng(1))
    assert isinstance(alm.generate(feats, "What do you hear?", max_new_tokens=4), str)

    # A finished stage is skipped on relaunch.
    mtime = (stage / "report.json").stat().st_mtime
    trainer.run(cfg, run_dir)
    assert (stage / "report.json").stat().st_mtime == mtime


def test_driver_relaunch_and_worker_death_resume_from_checkpoints(ray_local, toy_llm, tmp_path: Path):
    run_dir = str(tmp_path / "run")
    make_toy_run(run_dir, toy_llm, n_train=16, shard_clips=4)
    # 16 examples / 2 workers / batch 2 = 4 steps per epoch; 6 planned steps, checkpoints at 2, 4, 6.
    base = {"max_steps": 6, "checkpoint_every": 2, "batch_size": 2}

    # 1) A worker dies at step 3 and no retries are allowed: the driver fails after the step-2 checkpoint.
    cfg = toy_config(run_dir, toy_llm, max_failures=0, **base)
    with pytest.raises(Exception):  # noqa: B017 - Ray Train's TrainingFailedError
        trainer.run(cfg, run_dir, crash={"at_step": 3, "rank": 1, "marker": str(tmp_path / "crash1")})
    assert (tmp_path / "crash1").exists()
    assert not (Path(run_dir) / "train" / "_SUCCESS").exists()

    # 2) Relaunching the driver resumes from step 2 (not 0); a worker then dies at step 5 and Ray Train
    #    restarts the group from the step-4 checkpoint; the planned 6 steps finish.
    cfg = toy_config(run_dir, toy_llm, max_failures=1, **base)
    trainer.run(cfg, run_dir, crash={"at_step": 5, "rank": 1, "marker": str(tmp_path / "crash2")})
    assert (tmp_path / "crash2").exists()
    report = storage.read_json(str(Path(run_dir) / "train" / "report.json"))
    assert report["resumes"] == [2, 4]
    assert report["steps"] == report["planned_steps"] == 6
    assert [s for s, _ in report["loss_curve"]] == [1, 2, 3, 4, 5, 6]
    assert (Path(run_dir) / "train" / "export" / "adapter.safetensors").exists()


def test_training_with_the_run_dir_on_s3_checkpoints_there_and_resumes(ray_local, toy_llm, s3_bucket, s3_server):
    """Shards, targets, Ray Train checkpoints, the export and the report all live on a real S3 server."""
    run_dir = f"{s3_bucket}/run"
    make_toy_run(run_dir, toy_llm, n_train=8, shard_clips=4)
    cfg = toy_config(run_dir, toy_llm, max_steps=4, checkpoint_every=2, num_workers=1)
    cfg.storage.s3_endpoint_url = s3_server  # the workers configure their own storage from the config
    trainer.run(cfg, run_dir)
    stage = f"{run_dir}/train"
    report = storage.read_json(f"{stage}/report.json")
    assert report["steps"] == 4 and report["restarts"] == 0
    assert storage.exists(f"{stage}/_SUCCESS") and storage.exists(f"{stage}/export/adapter.safetensors")
    fs, path = storage.filesystem(stage)
    ckpts = sorted(p for p in fs.find(path) if "/checkpoint-step" in p and p.endswith("state.json"))
    assert [p.split("/checkpoint-step")[1][:8] for p in ckpts] == ["00000002", "00000004"]
    # A relaunch with more planned steps resumes from the step-4 checkpoint on S3 instead of restarting.
    fs.rm(f"{path}/_SUCCESS")
    cfg.train.max_steps = 6
    trainer.run(cfg, run_dir)
    report = storage.read_json(f"{stage}/report.json")
    assert report["steps"] == 6 and report["resumed_from_step"] == 4
