"""The per-worker training function: a DeepSpeed engine over the ALM's trainable frontend.

The frozen LLM stays outside the engine (it is never partitioned, optimised or checkpointed); the
engine wraps only `ALM.frontend`, and the loss flows back through the frozen LLM into it.
Checkpoints hold the DeepSpeed state (adapter + optimizer + LR schedule, one optimizer shard per rank
under ZeRO), the data position and the loss history, plus an `adapter.safetensors` export; Ray Train
merges every rank's files into one checkpoint folder in the run's storage.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from ralm import storage
from ralm.config import RalmConfig
from ralm.model.alm import ALM
from ralm.train import data as D
from ralm.train.jit_ops import load_comm_op

log = logging.getLogger(__name__)
STATE = "state.json"
DS_TAG = "ds"


def warmup_cosine(total_steps: int, warmup: int, min_ratio: float = 0.0):
    """LR multiplier: linear warmup to 1, then cosine to `min_ratio` at `total_steps`."""

    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def ds_config(tc: Any, use_gpu: bool) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": tc.batch_size,
        "gradient_accumulation_steps": tc.grad_accum,
        "gradient_clipping": tc.grad_clip,
        "zero_optimization": {"stage": tc.zero_stage},
        # bf16 weights/grads on GPU; on CPU the engine stays fp32 (fp16 is refused there) and bf16 is autocast.
        "bf16": {"enabled": bool(use_gpu and tc.precision == "bf16")},
        "zero_allow_untested_optimizer": True,  # a torch.optim optimizer: no FusedAdam JIT build
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


@contextlib.contextmanager
def single_process_group(backend: str = "nccl") -> Iterator[None]:
    """A one-process torch.distributed group (rank 0 of 1, on 127.0.0.1) for a DeepSpeed engine outside
    Ray Train: benchmarks and single-GPU checks. Under Ray Train each worker's group is Ray's."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _Tensorboard:
    """Rank 0's TensorBoard writer; for remote run dirs it writes locally and uploads on `sync`."""

    def __init__(self, uri: str):
        from torch.utils.tensorboard import SummaryWriter

        self.uri = uri
        self.local = uri if not storage.is_remote(uri) else tempfile.mkdtemp(prefix="ralm-tb-")
        os.makedirs(self.local, exist_ok=True)
        self.writer = SummaryWriter(self.local)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def sync(self) -> None:
        self.writer.flush()
        if storage.is_remote(self.uri):
            fs, path = storage.filesystem(self.uri)
            fs.put(self.local.rstrip("/") + "/", path, recursive=True)

    def close(self) -> None:
        self.sync()
        self.writer.close()


def _all_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def _any(flag: bool) -> bool:
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def train_func(config: dict[str, Any]) -> None:
    """Ray Train worker entry point. `config`: cfg (dumped RalmConfig), run_dir, total_steps, shards,
    and optionally `crash` ({at_step, rank, marker}: a test hook that kills this worker process once)."""
    import deepspeed
    import ray.train

    cfg = RalmConfig.model_validate(config["cfg"])
    run_dir, tc = config["run_dir"], cfg.train
    storage.configure(cfg.storage)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(tc.torch_threads or max(1, int(tc.cpus_per_worker)))
    use_gpu = tc.use_gpu and torch.cuda.is_available()
    if tc.use_gpu and not use_gpu:
        log.warning("train.use_gpu is set but worker %d sees no CUDA device: training on the CPU", rank)
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if use_gpu else "cpu")
    autocast_bf16 = tc.precision == "bf16" and not use_gpu

    from ralm.llm.models import resolve_model

    alm = ALM.build(resolve_model(cfg.llm.model), config["encoders"], adapter=tc.adapter,
                    adapter_hidden=tc.adapter_hidden, fusion=tc.fusion, fusion_options=tc.fusion_options,
                    system_prompt=tc.system_prompt, llm_name=cfg.llm.model,
                    dtype=torch.bfloat16 if use_gpu and tc.precision == "bf16" else torch.float32,
                    device=device, seed=tc.seed)
    alm.assert_frozen()
    total_steps = int(config["total_steps"])
    opt = torch.optim.AdamW(alm.trainable_parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total_steps, tc.warmup_steps))
    load_comm_op()  # before DeepSpeed builds it: a lock left by a killed build would hang it forever
    engine, _, _, _ = deepspeed.initialize(model=alm.frontend, optimizer=opt, lr_scheduler=sched,
                                           config=ds_config(tc, use_gpu), dist_init_required=False)

    state: dict[str, Any] = {"epoch": 0, "micro_in_epoch": 0, "micro": 0, "step": 0, "world_size": world,
                             "samples": 0, "history": [], "first_loss": None, "restarts": 0,
                             "resumed_from_step": None, "resumes": []}
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(d, tag=DS_TAG)
            with open(os.path.join(d, STATE)) as f:
                state = json.load(f)
        state["restarts"] += 1
        state["resumed_from_step"] = state["step"]
        state["resumes"] = [*state.get("resumes", []), state["step"]]
        if state["world_size"] != world:
            log.warning("resuming with %d workers instead of %d: the current epoch's data restarts from its "
                        "beginning", world, state["world_size"])
            state["micro_in_epoch"] = 0
        state["world_size"] = world
        log.info("rank %d resumed at step %d (epoch %d)", rank, state["step"], state["epoch"])

    tb = _Tensorboard(storage.join(run_dir, "train", "tb")) if rank == 0 else None
    trace_dir = config.get("trace_dir")
    crash = config.get("crash") or {}
    targets = D.load_targets(cfg, run_dir, "train")
    pad = D.PaddingMeter()
    window: list[float] = [0.0, 0.0]  # loss sum, micro batches since the last step
    t_start, samples_here, samples_base = time.perf_counter(), 0, state["samples"]
    max_epochs = tc.epochs if tc.max_steps is None else 10**9
    warm_steps = int(config.get("warmup_steps_excluded", 2))  # steady-state throughput starts after these
    warm: tuple[float, float] | None = None  # (time, samples across workers) at the end of the warm-up

    def batches(epoch: int) -> Iterator[list[D.Example]]:
        plan = D.plan_epoch(config["shards"], rank, world, tc.seed, epoch)
        ex = D.iter_examples(plan, targets, alm.encode_text, alm.audio_token_count, len(alm.layout.prefix_ids),
                             tc.max_length)
        return D.bucket_batches(ex, tc.batch_size, tc.bucket_batches, seed=tc.seed * 1000003 + epoch * 7919 + rank)

    def checkpoint(engine: Any, metrics: dict[str, Any]) -> None:
        tmp = tempfile.mkdtemp(prefix=f"ralm-ckpt-r{rank}-")
        engine.save_checkpoint(tmp, tag=DS_TAG, exclude_frozen_parameters=True)
        if rank == 0:
            with open(os.path.join(tmp, STATE), "w") as f:
                json.dump(state, f)
            from ralm.model.export import export_adapter

            export_adapter(alm, tmp, state=_gathered_frontend_state(engine, tc.zero_stage))
        if tb:
            tb.sync()
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint-step{state['step']:08d}")  # one folder for all ranks
        shutil.rmtree(tmp, ignore_errors=True)

    done = state["step"] >= total_steps
    while not done and state["epoch"] < max_epochs:
        it = batches(state["epoch"])
        for _ in range(state["micro_in_epoch"]):  # the data position: skip what was trained on
            next(it, None)
        last: list[D.Example] | None = None
        while True:
            batch = next(it, None)
            if not _any(batch is not None):
                break
            weight = 1.0
            if batch is None:  # this worker's share is used up: a zero-weight step keeps the collectives aligned
                batch, weight = last or _borrow(config["shards"], targets, alm, tc), 0.0
            last = batch
            col = D.collate(batch)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
                loss, _ = alm.loss(col, frontend=engine, average=tc.loss_average)
            engine.backward(loss * weight)
            engine.step()
            state["micro"] += 1
            state["micro_in_epoch"] += 1
            if weight:
                pad.add(col["lengths"])
                samples_here += len(batch)
                window[0] += float(loss.detach())
                window[1] += 1
                if trace_dir:
                    with open(os.path.join(trace_dir, f"epoch{state['epoch']}-rank{rank}.txt"), "a") as f:
                        f.write("".join(f"{i}\n" for i in col["ids"]))
            if state["micro"] % tc.grad_accum:
                continue
            # ---- an optimizer step happened
            state["step"] += 1
            loss_sum, n, nsamp = _all_sum([window[0], window[1], float(samples_here)])
            state["samples"] = samples_base + int(nsamp)
            if warm is None and state["step"] - (state["resumed_from_step"] or 0) >= warm_steps:
                warm = (time.perf_counter(), nsamp)
            window = [0.0, 0.0]
            step_loss = loss_sum / max(n, 1)
            if state["first_loss"] is None:
                state["first_loss"] = step_loss
            state["history"].append([state["step"], round(step_loss, 6)])
            if crash and rank == crash.get("rank", 0) and state["step"] == crash["at_step"] \
                    and not os.path.exists(crash["marker"]):
                open(crash["marker"], "w").close()
                # Die a little after the last report, as a real step would: Ray Train registers a reported
                # checkpoint asynchronously, and one reported milliseconds before a death may be lost.
                time.sleep(float(crash.get("delay_s", 5.0)))
                os._exit(1)  # a real worker death: Ray Train restarts the group from the last checkpoint
            metrics = {"step": state["step"], "epoch": state["epoch"], "loss": step_loss,
                       "lr": sched.get_last_lr()[0], "padding_pct": pad.percent,
                       "samples_per_s": nsamp / max(1e-9, time.perf_counter() - t_start)}
            if tb:
                tb.scalars(state["step"], {"train/loss": step_loss, "train/lr": metrics["lr"],
                                           "train/padding_pct": pad.percent})
            done = state["step"] >= total_steps
            if done or state["step"] % tc.checkpoint_every == 0:
                checkpoint(engine, metrics)
            elif state["step"] % tc.log_every == 0:
                ray.train.report(metrics)
            if done:
                break
        if not done:
            state["epoch"] += 1
            state["micro_in_epoch"] = 0

    elapsed = time.perf_counter() - t_start
    real, padded, nsamp = _all_sum([float(pad.real), float(pad.padded), float(samples_here)])
    steady = None
    if warm is not None and nsamp > warm[1]:
        steady = (nsamp - warm[1]) / max(1e-9, time.perf_counter() - warm[0])
    if rank == 0:
        _finish(cfg, run_dir, alm, engine, state, config, elapsed, nsamp, real, padded, world, steady)
        tb.close()
    # gloo aborts at exit in ~30% of 2-process runs unless the group is torn down like this (stack.md #4)
    del engine
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _borrow(shards: list[str], targets: Any, alm: ALM, tc: Any) -> list[D.Example]:
    """A batch for a worker that got no data at all this epoch (only its shape matters: weight 0)."""
    ex = D.iter_examples(D.Plan(shards), targets, alm.encode_text, alm.audio_token_count,
                         len(alm.layout.prefix_ids), tc.max_length)
    first = next(ex, None)
    if first is None:
        raise RuntimeError("no training example at all: check the targets and the feature shards")
    return [first]


def _gathered_frontend_state(engine: Any, zero_stage: int) -> dict[str, torch.Tensor]:
    module = engine.module
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _finish(cfg: RalmConfig, run_dir: str, alm: ALM, engine: Any, state: dict[str, Any], config: dict[str, Any],
            elapsed: float, nsamp: float, real: float, padded: float, world: int,
            steady: float | None) -> None:
    from ralm.model.export import export_adapter

    stage = storage.join(run_dir, "train")
    export_adapter(alm, storage.join(stage, "export"),
                   state=_gathered_frontend_state(engine, cfg.train.zero_stage),
                   extra={"trained_steps": state["step"]})
    history = state["history"]
    device = next(alm.frontend.parameters()).device
    report = {
        "steps": state["step"],
        "planned_steps": config["total_steps"],
        "epochs_started": state["epoch"] + 1,
        "num_workers": world,
        "samples_seen": state["samples"],
        "samples_per_s": nsamp / max(elapsed, 1e-9),  # this attempt's throughput (after any resume)
        "samples_per_s_steady": steady,  # excluding the first steps (warm-up of caches and threads)
        "train_seconds": elapsed,
        "first_loss": state["first_loss"],
        "final_loss": history[-1][1] if history else None,
        "final_loss_avg5": sum(h[1] for h in history[-5:]) / max(1, len(history[-5:])),
        "padding_pct": 100.0 * (1 - real / padded) if padded else 0.0,
        "restarts": state["restarts"],
        "resumed_from_step": state["resumed_from_step"],
        "resumes": state.get("resumes", []),
        "train_examples": config["num_examples"],
        "zero_stage": cfg.train.zero_stage,
        "precision": cfg.train.precision,
        # where rank 0 trained: a use_gpu run that found no CUDA in its worker says "cpu" here
        "device": f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device),
        "loss_curve": history,
    }
    storage.write_json(storage.join(stage, "report.json"), report)
