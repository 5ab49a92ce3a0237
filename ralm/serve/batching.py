"""Requests that arrive together are answered together: a replica's micro-batcher.

A frozen LLM decodes one token for 8 sequences in little more time than for one (on a GPU, and on a CPU
for a small model), so a replica that answers concurrent requests one by one wastes most of its engine.
`MicroBatcher.submit(item)` queues an item; one worker takes the oldest queued item and every queued item
with the same key (up to `max_batch`), runs them as one call of `run(items)` in a thread, and hands each
caller its own result. Items with different keys (other sampling settings, another system prompt) are
never mixed. Under load, requests queue while a batch runs and go together in the next; when fewer are
queued than the last batch held, the worker waits up to `wait_s` for the rest (busy clients send their
next requests as their answers arrive); a request on a quiet replica does not wait at all.

A caller that goes away (its await cancelled, as Serve does when the HTTP client disconnects) is dropped
from the queue; if its batch is already running, `Entry.gone` is set so `run` can stop it early. When a
batch fails, each of its items is retried alone, so one bad request fails alone.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(eq=False)
class Entry(Generic[T]):
    item: T
    key: Hashable
    future: asyncio.Future
    gone: threading.Event = field(default_factory=threading.Event)  # the caller left: `run` may stop early


class MicroBatcher(Generic[T, R]):
    """`await submit(item)` -> `run([entries])[i]` for that item; see the module docstring."""

    def __init__(self, run: Callable[[Sequence[Entry[T]]], Sequence[R]], key: Callable[[T], Hashable],
                 max_batch: int = 8, wait_s: float = 0.05) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.run, self.key, self.max_batch, self.wait_s = run, key, max_batch, max(0.0, wait_s)
        self._queue: list[Entry[T]] = []
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self.batch_sizes: Counter[int] = Counter()  # how many batches of each size have run
        self._last = 1  # the size of the last batch: how many requests to wait for (see `_gather`)

    def stats(self) -> dict[str, Any]:
        n = sum(self.batch_sizes.values())
        items = sum(k * v for k, v in self.batch_sizes.items())
        return {"batches": n, "requests": items, "mean_batch": round(items / n, 3) if n else 0.0,
                "max_batch": self.max_batch, "queued": len(self._queue),
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())}}

    async def submit(self, item: T) -> R:
        if self._worker is None or self._worker.done():
            self._wake = asyncio.Event()
            self._worker = asyncio.ensure_future(self._work())
        entry: Entry[T] = Entry(item, self.key(item), asyncio.get_running_loop().create_future())
        self._queue.append(entry)
        assert self._wake is not None
        self._wake.set()
        try:
            return await asyncio.shield(entry.future)
        except asyncio.CancelledError:
            entry.gone.set()
            entry.future.cancel()  # its result, if its batch is running, is dropped
            if entry in self._queue:
                self._queue.remove(entry)
            raise

    def _take(self) -> list[Entry[T]]:
        """The oldest entry and up to max_batch - 1 later ones with its key, in arrival order."""
        key = self._queue[0].key
        batch = [e for e in self._queue if e.key == key][: self.max_batch]
        for e in batch:
            self._queue.remove(e)
        return batch

    async def _work(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                await self._gather(self._queue[0].key)
                if not self._queue:  # the waiting requests were cancelled
                    break
                batch = self._take()
                self._last = len(batch)
                await self._run(batch)

    async def _gather(self, key: Hashable) -> None:
        """Wait up to wait_s for as many requests with `key` as the last batch held: the clients of a busy
        replica send their next requests as their answers arrive, a few ms apart, and would otherwise
        split into a big batch and a small one. A lone request on a quiet replica does not wait."""
        assert self._wake is not None
        await asyncio.sleep(0)  # one turn of the loop: requests already on their way join
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while sum(e.key == key for e in self._queue) < min(self._last, self.max_batch):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return

    async def _run(self, batch: list[Entry[T]]) -> None:
        self.batch_sizes[len(batch)] += 1
        try:
            results = await asyncio.to_thread(self.run, batch)
            if len(results) != len(batch):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
        except Exception as e:
            if len(batch) == 1:
                _settle(batch[0], error=e)
                return
            if all(entry.gone.is_set() for entry in batch):  # stopped because every caller left
                return
            log.warning("a batch of %d failed (%s: %s); running its requests one by one", len(batch),
                        type(e).__name__, e)
            for entry in batch:  # one bad request must not fail the others
                if not entry.gone.is_set():
                    await self._run([entry])
            return
        for entry, result in zip(batch, results, strict=True):
            _settle(entry, result=result)


def _settle(entry: Entry[Any], result: Any = None, error: BaseException | None = None) -> None:
    if entry.future.done():  # cancelled while its batch ran
        return
    if error is not None:
        entry.future.set_exception(error)
    else:
        entry.future.set_result(result)
