"""The ordered stages of a ralm run. Each is `run(cfg, run_dir) -> stage URI`; a stage with `_SUCCESS`
is skipped, so rerunning after a crash picks up where it stopped.

Each stage also records the config it ran with (`DIR/<stage>/stage_config.json`: the settings that decide
its output and those of the stages it reads). Rerun with other settings, a started or finished stage is
not silently kept or mixed with new rows: the run stops and names what changed, and `--redo STAGE`
starts that stage and the ones built on it over. Settings that only say how to run (resources, batch
sizes, replicas) may change freely between reruns."""

from __future__ import annotations

import fnmatch
import importlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from ralm import records, storage
from ralm.config import RalmConfig
from ralm.lease import run_lease

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    name: str
    target: str  # "module:function"
    help: str
    after: tuple[str, ...] = ()  # stages whose output this one reads
    reads: tuple[str, ...] = ()  # config sections that decide its output
    # A changed config: "refuse" (the output would be stale or mixed) or "rerun" (eval keeps each
    # benchmark/adapter combination's predictions apart, so it simply runs again).
    on_change: Literal["refuse", "rerun"] = "refuse"

    def load(self) -> Callable[..., str]:
        module, func = self.target.split(":")
        try:
            return getattr(importlib.import_module(module), func)
        except ModuleNotFoundError as e:
            raise RuntimeError(f"stage {self.name!r} is not available in this build ({e})") from None


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("corpus", "ralm.corpus.build:run", "recipes -> validated clip records with surrogates",
              reads=("corpus",)),
        Stage("prompts", "ralm.selfgen.prompts:run", "task prompts per clip (LLM-proposed, checked)",
              after=("corpus",), reads=("prompts",)),
        Stage("generate", "ralm.selfgen.generate:run", "self-generation: the frozen LLM answers from the surrogate",
              after=("prompts",), reads=("generation", "llm")),
        Stage("rephrase", "ralm.selfgen.rephrase:run", "self-rephrasing into audio-perception targets",
              after=("generate",), reads=("rephrase", "llm")),
        Stage("features", "ralm.features.pipeline:run", "frozen encoders -> WebDataset feature shards",
              after=("corpus",), reads=("features", "shards")),
        Stage("train", "ralm.train.trainer:run", "adapter training with Ray Train + DeepSpeed",
              after=("rephrase", "features"), reads=("train", "llm")),
        Stage("eval", "ralm.eval.run:run", "held-out MCQ evaluation with controls",
              after=("train",), reads=("eval", "llm"), on_change="rerun"),
    )
}
ORDER = tuple(STAGES)

# Settings that change how a stage runs, not what it writes: free to change between reruns.
HOW_TO_RUN = (
    "corpus.batch_size", "corpus.part_rows", "prompts.part_rows", "generation.part_rows", "generation.backend",
    "rephrase.part_rows", "rephrase.audit_nll_samples",
    "llm.serve.*", "llm.engine", "llm.dtype", "llm.tensor_parallel_size", "llm.gpu_memory_utilization",
    "llm.cpu_kvcache_gb", "llm.enable_prefix_caching", "llm.enforce_eager", "llm.allow_network",
    "features.decode_*", "features.encoders.*.batch_size", "features.encoders.*.pool", "features.encoders.*.pool_min",
    "features.encoders.*.pool_max", "features.encoders.*.num_cpus", "features.encoders.*.num_gpus",
    "features.encoders.*.concurrent_batches", "features.encoders.*.options.threads",
    # the worker count too: training is elastic (a resumed run may have fewer workers than it started with)
    "train.num_workers", "train.min_workers", "train.zero_stage", "train.use_gpu", "train.cpus_per_worker", "train.max_failures", "train.log_every",
    "train.torch_threads", "train.trace_samples", "train.checkpoint_every", "train.keep_checkpoints",
    "eval.backend", "eval.batch_size", "eval.concurrency", "eval.num_cpus", "eval.num_gpus", "eval.serve.*",
)
CONFIG_FILE = "stage_config.json"


class StageConfigChanged(RuntimeError):
    """A stage's recorded config differs from the one it is asked to run (or skip) with."""


def _flat(value: Any, prefix: str) -> Iterable[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            yield from _flat(v, f"{prefix}.{k}")
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, v in enumerate(value):
            yield from _flat(v, f"{prefix}.{i}")
    else:
        yield prefix, value


def _sections(cfg: RalmConfig, name: str) -> set[str]:
    """The config sections behind a stage's output: its own and, through them, every upstream stage's."""
    stage = STAGES[name]
    own = set(stage.reads) | ({"llm"} if name == "prompts" and cfg.prompts.source == "llm" else set())
    for up in stage.after:
        own |= _sections(cfg, up)
    return own


def stage_config(cfg: RalmConfig, name: str) -> dict[str, Any]:
    """The flat settings (`section.key` -> value) a stage's output depends on."""
    dumped = json.loads(cfg.model_dump_json())
    flat = (kv for section in sorted(_sections(cfg, name)) for kv in _flat(dumped[section], section))
    return {k: v for k, v in flat if not any(fnmatch.fnmatchcase(k, p) for p in HOW_TO_RUN)}


def has_output(cfg: RalmConfig, run_dir: str, name: str) -> bool:
    """Whether a stage finished or committed anything (rows, rejects, a training checkpoint): an attempt
    that failed before that leaves nothing a new config could mix with."""
    uri = cfg.stage_uri(name, run_dir)
    return (records.is_complete(uri) or bool(records.part_uris(records.data_uri(uri)))
            or bool(records.part_uris(records.rejects_uri(uri)))
            or (name == "train" and bool(storage.ls(storage.join(uri, "ray"), "checkpoint*"))))


def config_changes(cfg: RalmConfig, run_dir: str, name: str) -> list[str]:
    """`key: old -> new` for every setting that differs from the one the stage ran with (empty: none, the
    stage has no output yet, or its output predates the record)."""
    uri = storage.join(cfg.stage_uri(name, run_dir), CONFIG_FILE)
    if not storage.exists(uri) or not has_output(cfg, run_dir, name):
        return []
    before, now = storage.read_json(uri), stage_config(cfg, name)

    def shown(settings: dict[str, Any], key: str) -> str:
        return repr(settings[key]) if key in settings else "(unset)"

    return [f"{k}: {shown(before, k)} -> {shown(now, k)}" for k in sorted(set(before) | set(now))
            if k not in before or k not in now or before[k] != now[k]]


def _refuse(cfg: RalmConfig, run_dir: str, name: str, changes: list[str]) -> StageConfigChanged:
    shown = "\n  ".join(changes[:12]) + (f"\n  ... and {len(changes) - 12} more" if len(changes) > 12 else "")
    finished = records.is_complete(cfg.stage_uri(name, run_dir))
    why = ("its output does not match these settings" if finished
           else "resuming it would mix rows made with two configs")
    return StageConfigChanged(
        f"{name} was {'finished' if finished else 'started'} in {run_dir} with other settings:\n  {shown}\n"
        f"Not continuing: {why}. Start {name} and the stages built on it over with `ralm run --redo {name}` "
        f"(or `ralm {'corpus build' if name == 'corpus' else name} --redo`), or use another --run-dir.")


def downstream(names: Iterable[str]) -> list[str]:
    """`names` and every stage that reads their output, directly or not, in run order."""
    chosen = set(names)
    for name in ORDER:
        if set(STAGES[name].after) & chosen:
            chosen.add(name)
    return [n for n in ORDER if n in chosen]


def redo(cfg: RalmConfig, run_dir: str, names: Iterable[str]) -> list[str]:
    """Delete the outputs of `names` and of every stage built on them; returns the stages cleared."""
    cleared = []
    for name in downstream(names):
        uri = cfg.stage_uri(name, run_dir)
        if not storage.exists(uri):
            continue
        if name == "features":
            _remove_external_shards(uri)
        storage.remove(uri, recursive=True)
        cleared.append(name)
    if cleared:
        print(f"redo: removed the outputs of {', '.join(cleared)} under {run_dir}", flush=True)
    return cleared


def _remove_external_shards(stage_uri: str) -> None:
    """Shards written outside the stage dir (`shards.uri`): remove the ones its index lists, nothing else."""
    meta_uri = storage.join(stage_uri, "encoders.json")
    if not storage.exists(meta_uri):
        return
    shards_dir = storage.read_json(meta_uri).get("shards_uri", "")
    if not shards_dir or shards_dir.startswith(stage_uri.rstrip("/") + "/"):
        return
    from ralm.features.shards import finished_shards, shard_name

    for split, n in finished_shards(records.data_uri(stage_uri)):
        storage.remove(storage.join(shards_dir, shard_name(split, n)))


def _check_inputs(cfg: RalmConfig, run_dir: str, selected: list[str]) -> None:
    """Before any work (an LLM service takes a minute to start): every stage's inputs are finished or made
    earlier in this run."""
    for i, name in enumerate(selected):
        if name == "eval" and cfg.eval.adapters:  # evaluates given adapters, not this run's training
            continue
        for up in STAGES[name].after:
            if up not in selected[:i] and not records.is_complete(cfg.stage_uri(up, run_dir)):
                raise RuntimeError(f"{name} reads the output of {up}, which has not finished in {run_dir}: add "
                                   f"{up} to --stages (or leave --stages out to run every stage)")


def _record_config(cfg: RalmConfig, run_dir: str, name: str) -> None:
    storage.write_json(storage.join(cfg.stage_uri(name, run_dir), CONFIG_FILE), stage_config(cfg, name))


def run_stage(name: str, cfg: RalmConfig, run_dir: str | None = None, *, redo_first: bool = False,
              **kwargs: Any) -> str:
    """Run one stage (`redo_first`: after clearing it and the stages built on it). A stage started or
    finished with other settings is refused (StageConfigChanged), unless it is one that reruns."""
    run_dir = storage.absolute(run_dir or cfg.storage.run_dir)
    storage.configure(cfg.storage)
    with run_lease(run_dir, name):
        if name in STAGES:
            if redo_first:
                redo(cfg, run_dir, [name])
            changes = config_changes(cfg, run_dir, name)
            if changes and STAGES[name].on_change == "refuse":
                raise _refuse(cfg, run_dir, name, changes)
            _record_config(cfg, run_dir, name)
        return STAGES[name].load()(cfg, run_dir, **kwargs)


def _uses_llm_service(cfg: RalmConfig, name: str) -> bool:
    """Whether a stage talks to the LLM on Ray Serve (so consecutive ones can share one service)."""
    if cfg.generation.backend != "serve":
        return False
    return {"prompts": cfg.prompts.source == "llm", "generate": True, "rephrase": cfg.rephrase.enabled}.get(name, False)


class _SharedLLMService:
    """Keeps the LLM service up across consecutive text stages (each would otherwise start and stop its
    own: ~1 min of model loading per stage on CPU) and takes it down before the audio stages."""

    def __init__(self, cfg: RalmConfig) -> None:
        self.cfg, self.started = cfg, False

    def need(self, yes: bool) -> None:
        from ralm.llm.serve import start_llm_service, stop_llm_service

        if yes and not self.started:
            from ralm.cluster import init_ray

            init_ray(self.cfg.ray)
            start_llm_service(self.cfg)
            self.started = True
        elif not yes and self.started:
            stop_llm_service(self.cfg)
            self.started = False


def run_all(cfg: RalmConfig, run_dir: str | None = None, stages: list[str] | None = None,
            redo_stages: list[str] | None = None) -> dict[str, Any]:
    """Run the stages in order, skipping complete ones (after clearing `redo_stages` and the stages built on
    them); returns wall time per stage. Stops before any work if a stage's settings changed."""
    run_dir = storage.absolute(run_dir or cfg.storage.run_dir)
    storage.configure(cfg.storage)
    with run_lease(run_dir, "run"):
        return _run_all(cfg, run_dir, stages, redo_stages)


def _run_all(cfg: RalmConfig, run_dir: str, stages: list[str] | None,
             redo_stages: list[str] | None) -> dict[str, Any]:
    selected = stages or list(ORDER)
    if redo_stages:
        redo(cfg, run_dir, redo_stages)
    changed = {name: config_changes(cfg, run_dir, name) for name in selected}
    stale = next((n for n in selected if changed[n] and STAGES[n].on_change == "refuse"), None)
    if stale is not None:
        raise _refuse(cfg, run_dir, stale, changed[stale])
    _check_inputs(cfg, run_dir, selected)
    timings: dict[str, Any] = {}
    timings_uri = storage.join(run_dir, "timings.json")
    if storage.exists(timings_uri):
        timings = storage.read_json(timings_uri)
    llm = _SharedLLMService(cfg)
    try:
        for i, name in enumerate(selected, 1):
            uri = cfg.stage_uri(name, run_dir)
            if records.is_complete(uri) and not changed[name]:
                print(f"[{i}/{len(selected)}] {name}: complete, skipped ({uri})", flush=True)
                continue
            if changed[name]:
                print(f"[{i}/{len(selected)}] {name}: settings changed ({'; '.join(changed[name])}), running again",
                      flush=True)
            print(f"[{i}/{len(selected)}] {name}: {STAGES[name].help}", flush=True)
            t0 = time.time()
            llm.need(_uses_llm_service(cfg, name))
            run_stage(name, cfg, run_dir)
            timings[name] = round(time.time() - t0, 1)
            storage.write_json(timings_uri, timings)
            print(f"[{i}/{len(selected)}] {name}: done in {timings[name]:.0f}s", flush=True)
            _refresh_report(run_dir)  # a crash later still leaves a report of what finished
    finally:
        llm.need(False)
    report = _refresh_report(run_dir)
    print(f"report: {report}", flush=True)
    return timings


def _refresh_report(run_dir: str) -> str:
    from ralm.report import write_report

    return write_report(run_dir)
