"""`ralm train`: Ray Train `TorchTrainer` running `loop.train_func` (DeepSpeed) on every worker.

Inputs: `run_dir/features/` (encoders.json + shards) and the (prompt, target) pairs of the rephrase stage
(or the generate stage, per `train.targets`). Outputs under `run_dir/train/`: `ray/` (Ray Train's run
storage: checkpoints, restored on a relaunch with the same run dir), `tb/` (TensorBoard), `export/`
(the adapter for inference: `ralm.model.export.load_alm`), `report.json` + `report.md`, `_SUCCESS`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

from ralm import records, storage
from ralm.cluster import init_ray
from ralm.config import RalmConfig
from ralm.train import data as D
from ralm.train.loop import train_func

log = logging.getLogger(__name__)
STAGE = "train"
RAY_RUN_NAME = "ray"


def plan_steps(num_examples: int, tc: Any, world: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps) for `num_examples` split over `world` workers."""
    micro = math.ceil(num_examples / world / tc.batch_size)
    per_epoch = max(1, math.ceil(micro / tc.grad_accum))
    return per_epoch, tc.max_steps or tc.epochs * per_epoch


def _ray_storage(stage_uri: str) -> tuple[str, Any]:
    """Ray Train's storage_path (+ filesystem for S3, built on our fsspec options)."""
    if not storage.is_remote(stage_uri):
        return os.path.abspath(stage_uri), None
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(stage_uri)
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def build_trainer(cfg: RalmConfig, run_dir: str, *, crash: dict[str, Any] | None = None,
                  trace_dir: str | None = None, warmup_steps_excluded: int = 2) -> tuple[Any, dict[str, Any]]:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    tc = cfg.train
    encoders = D.read_encoders(cfg, run_dir)
    shards = D.shard_uris(cfg, run_dir, "train")
    targets = D.load_targets(cfg, run_dir, "train")
    n = D.count_samples(shards, targets)
    if n == 0:
        raise ValueError(f"no training examples: none of the {sum(map(len, targets.values()))} train targets "
                         f"has features in the {len(shards)} shards")
    if n < tc.num_workers:
        raise ValueError(f"{n} training examples cannot feed {tc.num_workers} workers")
    per_epoch, total = plan_steps(n, tc, tc.num_workers)
    loop_config = {"cfg": cfg.model_dump(mode="json"), "run_dir": run_dir, "encoders": encoders,
                   "shards": shards, "total_steps": total, "num_examples": n, "crash": crash,
                   "trace_dir": trace_dir, "warmup_steps_excluded": warmup_steps_excluded}
    workers: int | tuple[int, int] = tc.num_workers
    if tc.min_workers is not None and tc.min_workers < tc.num_workers:
        workers = (tc.min_workers, tc.num_workers)  # elastic (Ray Train v2)
    path, fs = _ray_storage(cfg.stage_uri(STAGE, run_dir))
    trainer = TorchTrainer(
        train_func,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=RunConfig(name=RAY_RUN_NAME, storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=tc.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints)),
    )
    return trainer, {"examples": n, "steps_per_epoch": per_epoch, "total_steps": total, "shards": len(shards)}


def run(cfg: RalmConfig, run_dir: str, *, crash: dict[str, Any] | None = None,
        trace_dir: str | None = None, warmup_steps_excluded: int = 2) -> str:
    """Train the adapter; returns `run_dir/train`. A relaunch with the same run dir resumes from the latest
    checkpoint (Ray Train restores its run state from storage); a finished stage is skipped.

    Test/bench hooks: `crash` ({at_step, rank, marker}) kills a worker process once at that step;
    `trace_dir` logs every trained sample id per epoch and rank; `warmup_steps_excluded` sets where the
    report's steady-state samples/s starts."""
    stage = cfg.stage_uri(STAGE, run_dir)
    if records.is_complete(stage):
        log.info("train: already complete at %s", stage)
        return stage
    storage.configure(cfg.storage)
    init_ray(cfg.ray)
    t0 = time.time()
    trainer, plan = build_trainer(cfg, run_dir, crash=crash, trace_dir=trace_dir,
                                  warmup_steps_excluded=warmup_steps_excluded)
    log.info("train: %d examples in %d shards, %d steps (%d per epoch)", plan["examples"], plan["shards"],
             plan["total_steps"], plan["steps_per_epoch"])
    result = trainer.fit()
    report_uri = storage.join(stage, "report.json")
    report = storage.read_json(report_uri)
    report.update({"wall_seconds": time.time() - t0, "plan": plan,
                   "latest_checkpoint": result.checkpoint.path if result.checkpoint else None,
                   "export": storage.join(stage, "export"), "tensorboard": storage.join(stage, "tb")})
    storage.write_json(report_uri, report)
    storage.write_text(storage.join(stage, "report.md"), render_report(report))
    records.mark_success(stage, {"steps": report["steps"], "final_loss": report["final_loss"]})
    return stage


def render_report(r: dict[str, Any]) -> str:
    def f(x: Any) -> str:
        return f"{x:.4f}" if isinstance(x, float) else "—" if x is None else str(x)

    rows = ["steps", "planned_steps", "num_workers", "samples_seen", "samples_per_s", "first_loss", "final_loss",
            "final_loss_avg5", "padding_pct", "restarts", "resumed_from_step", "zero_stage", "precision", "device"]
    lines = ["# Adapter training", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {f(r.get(k))} |" for k in rows]
    lines += ["", f"Adapter export: `{r.get('export')}` (load with `ralm.model.export.load_alm`).",
              f"TensorBoard: `tensorboard --logdir {r.get('tensorboard')}`", ""]
    return "\n".join(lines)
