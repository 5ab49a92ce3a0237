"""Batch client: stream rows through the LLM Serve deployment with bounded in-flight requests.

The one function stages call:

    for row, comps in complete_rows(rows, make_messages, cfg, sampling=cfg.generation.sampling, n=1):
        ...   # comps: list[Completion] (n of them); error ones have .ok False, .reason in
              # {"prompt_too_long", "timeout", "replica_died", "engine_error", "bad_request"}

- `rows`: any iterable of dicts (a list, a generator, `ds.iter_rows()`), or a `ray.data.Dataset` (streamed
  with `iter_rows`). Rows are pulled lazily: at most `cfg.llm.serve.max_in_flight` requests are pending,
  so driver memory does not grow with the corpus (backpressure). Across all calls in a process (a stage's
  parts run at once), at most `deployment_capacity` requests are sent at a time: what the replicas accept.
- `make_messages(row)` returns the chat messages (list of {"role", "content"}), or a `ChatRequest` for
  per-row sampling/n. If it raises, the row gets a `bad_request` error result.
- Results come back in completion order (not input order): key them by the row's id.
- A request whose replica dies, or that times out (`serve.request_timeout_s`), is re-sent up to
  `serve.max_retries` times (Serve routes it to a live replica); after that the row gets an error
  result. Nothing raises for a per-row failure.
- `handle`: a Serve DeploymentHandle; default: the running app named `cfg.llm.serve.app_name`
  (start it with `ralm.llm.serve.start_llm_service(cfg)`).

For Ray Data pipelines, `ChatBatch` is the same client as a `map_batches` callable class: it adds a
`completions` column (per row a list of Completion dicts), keeping row order:

    ds.map_batches(ChatBatch, fn_constructor_args=(cfg_dict, make_messages), batch_size=64,
                   compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.25)

`score_nll(conversations, targets, cfg)` gives the frozen LLM's mean per-token NLL of each target through
the deployment (for the rephrase report).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from ralm.llm.engines import ChatRequest, Completion, Sampling

log = logging.getLogger(__name__)

MakeMessages = Callable[[dict], "list[dict] | ChatRequest"]


def _llm_cfg(cfg: Any) -> Any:
    return getattr(cfg, "llm", cfg)


def _classify(e: BaseException) -> str:
    from ray import exceptions as rex

    if isinstance(e, TimeoutError | rex.GetTimeoutError):
        return "timeout"
    if isinstance(e, rex.RayActorError | rex.ActorDiedError | rex.ActorUnavailableError):
        return "replica_died"
    return "engine_error"


def deployment_capacity(llm_cfg: Any) -> int:
    """Requests the LLM deployment takes at once: replicas (autoscaling: its maximum) x max_ongoing_requests."""
    s = _llm_cfg(llm_cfg).serve
    return (s.autoscaling.max_replicas if s.autoscaling is not None else s.num_replicas) * s.max_ongoing_requests


_GATES: dict[tuple[str, int], threading.BoundedSemaphore] = {}
_GATES_LOCK = threading.Lock()
_NO_GATE = contextlib.nullcontext()


def capacity_gate(llm_cfg: Any) -> threading.BoundedSemaphore:
    """The process-wide limit on requests sent to one app. A request beyond what the replicas accept waits
    in Serve's router, which retries it with backoff and probes every replica's queue length each time:
    with the replicas' CPUs busy the probes miss their 0.1 s deadline and the router floods the log with
    warnings (measured, demo on 2 cores: 2 parts x 32 in flight vs 2 replicas x 16). Waiting here costs
    nothing and keeps the probes off the busy replicas."""
    key = (_llm_cfg(llm_cfg).serve.app_name, deployment_capacity(llm_cfg))
    with _GATES_LOCK:
        return _GATES.setdefault(key, threading.BoundedSemaphore(key[1]))


def send(handle: Any, req: ChatRequest, timeout_s: float, max_retries: int,
         gate: contextlib.AbstractContextManager = _NO_GATE) -> list[Completion]:
    """One request with retries; never raises for a request-level failure. With `gate`, each attempt holds
    one of its slots while the request is out (not while backing off)."""
    last = "engine_error: unknown"
    for attempt in range(max_retries + 1):
        resp = None
        try:
            with gate:
                resp = handle.chat.remote(req.to_dict())
                return [Completion.from_dict(d) for d in resp.result(timeout_s=timeout_s)]
        except Exception as e:  # noqa: BLE001 - every failure becomes a retry, then an error result
            kind = _classify(e)
            last = f"{kind}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            log.warning("LLM request failed (attempt %d/%d): %s", attempt + 1, max_retries + 1, last)
            if resp is not None and kind == "timeout":
                try:
                    resp.cancel()
                except Exception:  # noqa: BLE001
                    pass
            time.sleep(min(0.5 * 2**attempt, 5.0))
    return [Completion.failed(last) for _ in range(req.n)]


def _as_request(row: dict, make_messages: MakeMessages, sampling: Sampling, n: int) -> ChatRequest:
    msgs = make_messages(row)
    return msgs if isinstance(msgs, ChatRequest) else ChatRequest(list(msgs), sampling, n)


def complete_rows(
    rows: Iterable[dict] | Any,
    make_messages: MakeMessages,
    cfg: Any,
    sampling: Any = None,
    n: int = 1,
    handle: Any = None,
    progress: bool = False,
) -> Iterator[tuple[dict, list[Completion]]]:
    """Yield (row, completions) for every row, with at most `max_in_flight` requests pending."""
    llm = _llm_cfg(cfg)
    s = llm.serve
    if handle is None:
        from ralm.llm.serve import get_llm_handle

        handle = get_llm_handle(llm)
    if hasattr(rows, "iter_rows") and not isinstance(rows, list | tuple):
        rows = rows.iter_rows()
    samp = Sampling.of(sampling)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="llm requests", unit="req")
    it = iter(rows)
    pending: dict[Future, dict] = {}
    gate = capacity_gate(llm)
    pool = ThreadPoolExecutor(max_workers=s.max_in_flight, thread_name_prefix="ralm-llm-client")
    try:
        exhausted = False
        while True:
            while not exhausted and len(pending) < s.max_in_flight:
                try:
                    row = next(it)
                except StopIteration:
                    exhausted = True
                    break
                try:
                    req = _as_request(row, make_messages, samp, n)
                except Exception as e:  # noqa: BLE001 - a row we cannot even phrase is a reject
                    f: Future = Future()
                    f.set_result([Completion.failed(f"bad_request: {type(e).__name__}: {e}") for _ in range(n)])
                    pending[f] = row
                    continue
                pending[pool.submit(send, handle, req, s.request_timeout_s, s.max_retries, gate)] = row
            if not pending:
                break
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for f in done:
                row = pending.pop(f)
                if bar is not None:
                    bar.update(1)
                yield row, f.result()
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=False, cancel_futures=True)
        if bar is not None:
            bar.close()


class ChatBatch:
    """`map_batches` callable class: adds column `completions` (list of Completion dicts per row)."""

    def __init__(self, cfg: Any, make_messages: MakeMessages, sampling: Any = None, n: int = 1,
                 column: str = "completions") -> None:
        from ralm.config import RalmConfig

        self.cfg = RalmConfig.model_validate(cfg) if isinstance(cfg, dict) else cfg
        self.make_messages, self.sampling, self.n, self.column = make_messages, sampling, n, column
        from ralm.llm.serve import get_llm_handle

        self.handle = get_llm_handle(self.cfg)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        keys = list(batch)
        size = len(batch[keys[0]]) if keys else 0
        rows = [{"__i": i, **{k: batch[k][i] for k in keys}} for i in range(size)]
        out: list[Any] = [None] * size
        for row, comps in complete_rows(rows, self.make_messages, self.cfg, self.sampling, self.n, self.handle):
            out[row["__i"]] = [c.to_dict() for c in comps]
        return {**batch, self.column: out}


def score_nll(conversations: list[list[dict]], targets: list[str], cfg: Any, handle: Any = None,
              chunk: int = 16) -> list[float]:
    """Mean per-token NLL of each target as the reply to its conversation, computed by the deployment."""
    if handle is None:
        from ralm.llm.serve import get_llm_handle

        handle = get_llm_handle(cfg)
    s = _llm_cfg(cfg).serve
    out: list[float] = []
    starts = list(range(0, len(targets), chunk))
    window = max(1, min(s.max_in_flight, deployment_capacity(cfg)))
    for w in range(0, len(starts), window):  # bounded: at most `window` chunks pending
        responses = [handle.nll.remote(conversations[i:i + chunk], targets[i:i + chunk])
                     for i in starts[w:w + window]]
        out.extend(x for r in responses for x in r.result(timeout_s=s.request_timeout_s))
    return out
