"""The exactly-once batch loop the text stages share.

    run_batches(stage_uri, pending_rows, process, part_rows)

- `pending_rows` streams the input rows whose ids are not committed yet (accepted or rejected);
- `process(batch) -> (rows, rejects)` handles one batch (the LLM calls happen inside it);
- each batch is committed as one data part and then one reject part, each atomic (temp file + rename,
  or one S3 PUT). A kill at any moment loses at most the batch in progress; a rerun recomputes exactly
  the rows that are in neither data nor rejects. Rows of one key group (a clip's prompts) are kept in
  one batch, so a group is never half committed.
- Sampling seeds derive from the row id and the attempt (`row_seed`), so a recomputed row gets the same
  text it would have got in an uninterrupted run (on the same engine and batch composition-independent
  sampler: vLLM's per-request seeds and the transformers engine's per-request reseeding).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ralm import records

log = logging.getLogger(__name__)

Process = Callable[[list[dict]], tuple[list[dict], list[dict]]]


def row_seed(base: int, row_id: str, attempt: int = 0) -> int:
    digest = hashlib.sha1(f"{row_id}|{attempt}".encode()).digest()
    return (base + int.from_bytes(digest[:4], "big")) % (2**31 - 1)


def pending(input_data_uri: str, done: set[str], splits: Iterable[str] | None = None,
            key: Callable[[dict], str] = lambda r: r["id"]) -> Iterator[dict]:
    """Input rows (streamed part by part) whose key is not done, optionally only from some splits."""
    keep = set(splits) if splits is not None else None
    for row in records.iter_records(input_data_uri):
        if keep is not None and row.get("split") not in keep:
            continue
        if key(row) in done:
            continue
        yield row


def batched(rows: Iterable[dict], size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for r in rows:
        batch.append(r)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_batches(stage_uri: str, rows: Iterable[dict], process: Process, part_rows: int,
                total: int | None = None, desc: str = "", parts_in_flight: int = 1) -> dict[str, int]:
    """Process and commit batches; returns counts of this run (rows, rejects, batches).

    `parts_in_flight` > 1 processes that many batches at once (threads; `process` must be thread-safe), so
    one batch's retry rounds overlap the next batch's first round instead of idling the replicas. Each batch
    is still committed on its own as it finishes, so exactly-once holds whatever the completion order.
    """
    from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

    from tqdm import tqdm

    data, rej = records.data_uri(stage_uri), records.rejects_uri(stage_uri)
    counts = {"rows": 0, "rejects": 0, "batches": 0, "inputs": 0}

    def commit(batch: list[dict], out: list[dict], rejects: list[dict]) -> None:
        # Data first, then rejects: a kill in between only recomputes this batch's rejects.
        if out:
            records.write_part(data, out)
        if rejects:
            records.write_part(rej, rejects, records.REJECT_SCHEMA)
        counts["rows"] += len(out)
        counts["rejects"] += len(rejects)
        counts["batches"] += 1
        counts["inputs"] += len(batch)
        bar.update(len(batch))

    with tqdm(total=total, desc=desc or stage_uri.rsplit("/", 1)[-1], unit="row") as bar, \
            ThreadPoolExecutor(max_workers=max(1, parts_in_flight), thread_name_prefix="ralm-part") as pool:
        running: dict[Future, list[dict]] = {}

        def drain(until: int) -> None:
            while len(running) > until:
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for fut in finished:
                    commit(running.pop(fut), *fut.result())  # a failed batch raises here, uncommitted

        for batch in batched(rows, part_rows):
            running[pool.submit(process, batch)] = batch
            drain(max(1, parts_in_flight) - 1)
        drain(0)
    return counts


def count_pending(input_data_uri: str, done: set[str], splits: Iterable[str] | None,
                  key: Callable[[dict], str] = lambda r: r["id"]) -> int:
    """How many input rows are still to do (reads only the id/clip/split columns)."""
    cols = ["id", "clip_id", "split"]
    n = 0
    keep = set(splits) if splits is not None else None
    for row in records.iter_records(input_data_uri, columns=cols):
        if (keep is None or row.get("split") in keep) and key(row) not in done:
            n += 1
    return n


def carry(row: dict[str, Any], **updates: Any) -> dict[str, Any]:
    """A copy of an input row with stage fields set (every field of the record schema kept)."""
    out = records.make_record(**{k: row.get(k) for k in records.FIELD_NAMES})
    out.update(updates)
    return out
