"""How the text stages reach the frozen LLM: Ray Serve replicas (default) or an in-process engine.

Both answer `chat(requests) -> completions` in request order and `nll(conversations, targets)`, so the
stages don't care which. Selected by `generation.backend` (shared by prompts, generate and rephrase):
- `serve`: the LLM app on Ray Serve (`ralm.llm.serve`), reached through the batch client
  (`ralm.llm.client.complete_rows`) with at most `llm.serve.max_in_flight` requests pending; started here
  when it is not running yet, and stopped again at the end only if this stage started it.
- `engine`: `build_engine(cfg.llm)` in this process (tests, or a single machine without Serve).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ralm.llm.engines import ChatRequest, Completion

log = logging.getLogger(__name__)


class Backend:
    max_model_len: int | None = None

    def chat(self, requests: Sequence[ChatRequest]) -> list[list[Completion]]:
        raise NotImplementedError

    def nll(self, conversations: Sequence[list[dict]], targets: Sequence[str]) -> list[float]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


BACKENDS: dict[str, Callable[[Any], Backend]] = {}


def register(name: str) -> Callable[[Callable[[Any], Backend]], Callable[[Any], Backend]]:
    def deco(factory: Callable[[Any], Backend]) -> Callable[[Any], Backend]:
        BACKENDS[name] = factory
        return factory

    return deco


@register("engine")
class EngineBackend(Backend):
    def __init__(self, cfg: Any, chunk: int = 64) -> None:
        from ralm.llm.engines import build_engine

        self.engine = build_engine(cfg.llm)
        self.max_model_len = self.engine.max_model_len
        self.chunk = chunk
        self._lock = threading.Lock()  # one in-process engine; the stages may call from several threads

    def chat(self, requests: Sequence[ChatRequest]) -> list[list[Completion]]:
        out: list[list[Completion]] = []
        for i in range(0, len(requests), self.chunk):
            with self._lock:
                out.extend(self.engine.chat_requests(list(requests[i:i + self.chunk])))
        return out

    def nll(self, conversations: Sequence[list[dict]], targets: Sequence[str]) -> list[float]:
        with self._lock:
            return self.engine.nll(list(conversations), list(targets))

    def close(self) -> None:
        self.engine.close()


@register("serve")
class ServeBackend(Backend):
    def __init__(self, cfg: Any) -> None:
        from ray import serve

        from ralm.cluster import init_ray
        from ralm.llm.serve import get_llm_handle, start_llm_service

        self.cfg = cfg
        init_ray(cfg.ray)
        self.started = False
        try:
            running = cfg.llm.serve.app_name in serve.status().applications
        except Exception:  # noqa: BLE001 - Serve not started yet
            running = False
        if running:
            self.handle = get_llm_handle(cfg)
        else:
            log.info("starting the LLM service (%s)", cfg.llm.model)
            self.handle = start_llm_service(cfg).handle
            self.started = True
        try:
            self.max_model_len = int(self.handle.info.remote().result(timeout_s=60)["max_model_len"])
        except Exception:  # noqa: BLE001 - only used for messages
            self.max_model_len = None

    def chat(self, requests: Sequence[ChatRequest]) -> list[list[Completion]]:
        from ralm.llm.client import complete_rows

        out: list[list[Completion] | None] = [None] * len(requests)
        rows = [{"i": i} for i in range(len(requests))]
        for row, comps in complete_rows(rows, lambda r: requests[r["i"]], self.cfg, handle=self.handle):
            out[row["i"]] = comps
        return [o if o is not None else [Completion.failed("engine_error: no result")] for o in out]

    def nll(self, conversations: Sequence[list[dict]], targets: Sequence[str]) -> list[float]:
        from ralm.llm.client import score_nll

        return score_nll(list(conversations), list(targets), self.cfg, handle=self.handle)

    def close(self) -> None:
        if self.started:
            from ralm.llm.serve import stop_llm_service

            stop_llm_service(self.cfg)


def open_backend(cfg: Any) -> Backend:
    return BACKENDS[cfg.generation.backend](cfg)
