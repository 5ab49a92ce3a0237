"""The replica's micro-batcher: real asyncio and threads, a batch function that records what it was given."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from ralm.serve.batching import MicroBatcher


class Recorder:
    """Doubles each item, remembers each call's items; fails a call that holds "bad"."""

    def __init__(self, hold: threading.Event | None = None) -> None:
        self.calls: list[list] = []
        self.hold = hold

    def __call__(self, entries):
        items = [e.item for e in entries]
        self.calls.append(items)
        if self.hold is not None:
            self.hold.wait(10)
        if "bad" in items:
            raise ValueError("bad item in the batch")
        return [i * 2 for i in items]


def test_requests_sent_together_run_together_and_each_gets_its_own_result():
    run = Recorder()

    async def main():
        b = MicroBatcher(run, key=lambda i: 0, max_batch=4, wait_s=0.05)
        out = await asyncio.gather(*(b.submit(i) for i in range(6)))
        return out, b.stats()

    out, stats = asyncio.run(main())
    assert out == [0, 2, 4, 6, 8, 10]
    assert run.calls == [[0, 1, 2, 3], [4, 5]]  # arrival order kept, capped at max_batch
    assert stats["batches"] == 2 and stats["requests"] == 6 and stats["batch_sizes"] == {"2": 1, "4": 1}


def test_items_with_different_keys_are_never_mixed():
    run = Recorder()

    async def main():
        b = MicroBatcher(run, key=lambda s: s[0], max_batch=8, wait_s=0.02)
        return await asyncio.gather(*(b.submit(s) for s in ["a1", "b1", "a2", "b2", "a3"]))

    assert asyncio.run(main()) == ["a1a1", "b1b1", "a2a2", "b2b2", "a3a3"]
    assert run.calls == [["a1", "a2", "a3"], ["b1", "b2"]]


def test_a_busy_replica_waits_for_its_clients_next_requests_and_a_quiet_one_does_not_wait():
    run = Recorder()

    async def staggered(b, items, gap_s=0.03):
        tasks = []
        for i in items:
            tasks.append(asyncio.ensure_future(b.submit(i)))
            await asyncio.sleep(gap_s)
        return await asyncio.gather(*tasks)

    async def main():
        b = MicroBatcher(run, key=lambda i: 0, max_batch=8, wait_s=2.0)
        # Quiet (the last batch held one): each request runs at once, however long wait_s is.
        await staggered(b, [1, 2])
        # Four clients at once, then their next requests a few ms apart: gathered into one batch again.
        await asyncio.gather(*(b.submit(i) for i in (10, 11, 12, 13)))
        return await staggered(b, [20, 21, 22, 23])

    assert asyncio.run(main()) == [40, 42, 44, 46]
    assert run.calls == [[1], [2], [10, 11, 12, 13], [20, 21, 22, 23]]


def test_a_failing_batch_is_retried_one_by_one_so_only_the_bad_request_fails():
    run = Recorder()

    async def main():
        b = MicroBatcher(run, key=lambda i: 0, max_batch=8, wait_s=0.02)
        return await asyncio.gather(*(b.submit(i) for i in ["x", "bad", "y"]), return_exceptions=True)

    good1, bad, good2 = asyncio.run(main())
    assert (good1, good2) == ("xx", "yy")
    assert isinstance(bad, ValueError) and "bad item" in str(bad)
    assert run.calls == [["x", "bad", "y"], ["x"], ["bad"], ["y"]]


def test_requests_queue_while_a_batch_runs_and_a_cancelled_one_is_dropped_or_told_to_stop():
    hold = threading.Event()
    run = Recorder(hold)

    async def main():
        b = MicroBatcher(run, key=lambda i: 0, max_batch=8, wait_s=0)
        first = asyncio.ensure_future(b.submit(1))
        while not run.calls:  # the first batch is running (held)
            await asyncio.sleep(0.01)
        later = [asyncio.ensure_future(b.submit(i)) for i in (2, 3, 4)]
        await asyncio.sleep(0.05)
        later[1].cancel()  # a client that leaves while queued: its request never runs
        await asyncio.sleep(0.05)
        hold.set()
        results = [await first, await later[0], await later[2]]
        with pytest.raises(asyncio.CancelledError):
            await later[1]
        # A client that leaves while its batch runs: the batch function sees `gone` and may stop.
        hold.clear()
        seen = {}

        def watch(entries):
            seen["entry"] = entries[0]
            deadline = time.time() + 10
            while not entries[0].gone.is_set() and time.time() < deadline:
                time.sleep(0.01)
            return ["stopped"]

        b2 = MicroBatcher(watch, key=lambda i: 0, max_batch=2, wait_s=0)
        running = asyncio.ensure_future(b2.submit(5))
        while "entry" not in seen:
            await asyncio.sleep(0.01)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        await asyncio.sleep(0.05)
        return results, seen["entry"].gone.is_set(), b.stats()

    results, gone, stats = asyncio.run(main())
    assert results == [2, 4, 8]
    assert run.calls == [[1], [2, 4]]  # 3 never ran; 2 and 4 queued behind the first batch, then ran together
    assert gone and stats["requests"] == 3


def test_max_batch_must_be_positive():
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(Recorder(), key=lambda i: 0, max_batch=0)
