"""The ordered stages of a ralm run. Each is `run(cfg, run_dir) -> stage URI`; a stage with `_SUCCESS`
is skipped, so rerunning after a crash picks up where it stopped."""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ralm import records, storage
from ralm.config import RalmConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    name: str
    target: str  # "module:function"
    help: str

    def load(self) -> Callable[..., str]:
        module, func = self.target.split(":")
        try:
            return getattr(importlib.import_module(module), func)
        except ModuleNotFoundError as e:
            raise RuntimeError(f"stage {self.name!r} is not available in this build ({e})") from None


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("corpus", "ralm.corpus.build:run", "recipes -> validated clip records with surrogates"),
        Stage("prompts", "ralm.selfgen.prompts:run", "task prompts per clip (LLM-proposed, checked)"),
        Stage("generate", "ralm.selfgen.generate:run", "self-generation: the frozen LLM answers from the surrogate"),
        Stage("rephrase", "ralm.selfgen.rephrase:run", "self-rephrasing into audio-perception targets"),
        Stage("features", "ralm.features.pipeline:run", "frozen encoders -> WebDataset feature shards"),
        Stage("train", "ralm.train.trainer:run", "adapter training with Ray Train + DeepSpeed"),
        Stage("eval", "ralm.eval.run:run", "held-out MCQ evaluation with controls"),
    )
}
ORDER = tuple(STAGES)


def run_stage(name: str, cfg: RalmConfig, run_dir: str | None = None, **kwargs: Any) -> str:
    run_dir = storage.absolute(run_dir or cfg.storage.run_dir)
    storage.configure(cfg.storage)
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


def run_all(cfg: RalmConfig, run_dir: str | None = None, stages: list[str] | None = None) -> dict[str, Any]:
    """Run the stages in order, skipping complete ones; returns wall time per stage."""
    run_dir = storage.absolute(run_dir or cfg.storage.run_dir)
    storage.configure(cfg.storage)
    timings: dict[str, Any] = {}
    timings_uri = storage.join(run_dir, "timings.json")
    if storage.exists(timings_uri):
        timings = storage.read_json(timings_uri)
    selected = stages or list(ORDER)
    llm = _SharedLLMService(cfg)
    try:
        for i, name in enumerate(selected, 1):
            uri = cfg.stage_uri(name, run_dir)
            if records.is_complete(uri):
                print(f"[{i}/{len(selected)}] {name}: complete, skipped ({uri})", flush=True)
                continue
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
