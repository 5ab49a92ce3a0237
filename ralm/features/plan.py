"""The shard plan of `ralm features`: which clips go to which shard, and the work list in shard order.

A clip goes to shard `hash(clip_id) % n` of its split, where `n` comes from the projected bytes of the
split and `shards.target_mb`, so a shard's content is a pure function of the corpus: a rerun skips
shards whose index part exists, recomputes only the others, and writes the same bytes.

The work list is the clips still to encode, one row per clip, sorted by (split, shard, clip_id) and
written as Parquet parts; the Ray Data pipeline reads it in order, so shards complete one after another
and the writer holds one open shard. The driver builds it with an external sort: one streaming pass over
the corpus, sorted runs of `chunk_rows` rows spilled to local disk and merged, so its memory is one chunk
whatever the corpus size. (Ray Data's own sort costs ~12 s of task start-up on a small corpus, and inside
the streaming pipeline it fed the encoder pools one batch at a time: measured, bench/RESULTS.md.)
"""

from __future__ import annotations

import hashlib
import heapq
import math
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from ralm import records, storage

if TYPE_CHECKING:
    from ralm.config import RalmConfig
    from ralm.encoders import EncoderInfo

TAR_OVERHEAD = 1536  # per-sample bytes beyond the arrays: json member + one header per member (approx.)
ITEMSIZE = {"float16": 2, "float32": 4}
CORPUS_COLUMNS = ["clip_id", "split", "source", "audio_uri", "offset_s", "duration_s"]
WORK_SCHEMA = pa.schema([("split", pa.string()), ("shard", pa.int64()), ("clip_id", pa.string()),
                         ("source", pa.string()), ("audio_uri", pa.string()), ("offset_s", pa.float64()),
                         ("duration_s", pa.float64())])
_ORDER = [("split", "ascending"), ("shard", "ascending"), ("clip_id", "ascending")]


def shard_of(clip_id: str, n_shards: int) -> int:
    return int(hashlib.sha1(clip_id.encode()).hexdigest()[:12], 16) % max(1, n_shards)


def clip_bytes(duration_s: float, infos: list[EncoderInfo], itemsize: int) -> int:
    return TAR_OVERHEAD + sum(i.num_frames(duration_s) * len(i.layers) * i.width * itemsize + 128 for i in infos)


def plan_shards(cfg: RalmConfig, corpus_data: str, infos: list[EncoderInfo]) -> tuple[dict[str, int], dict[str, Any]]:
    """Shards per split from one streaming pass over the corpus (only sums are kept)."""
    item = ITEMSIZE[cfg.shards.dtype]
    seconds: Counter[str] = Counter()
    clips: Counter[str] = Counter()
    projected: Counter[str] = Counter()
    for r in records.iter_records(corpus_data, ["clip_id", "split", "duration_s"]):
        if r["split"] not in cfg.features.splits:
            continue
        d = float(r["duration_s"] or 0.0)
        seconds[r["split"]] += d
        clips[r["split"]] += 1
        projected[r["split"]] += clip_bytes(d, infos, item)
    target = cfg.shards.target_mb * 2**20
    n_shards = {s: max(1, math.ceil(projected[s] / target)) for s in clips}
    stats = {"clips": dict(clips), "seconds": dict(seconds), "projected_bytes": dict(projected)}
    return n_shards, stats


def assign_shards(table: pa.Table, n_shards: dict[str, int], skip_shards: set[tuple[str, int]],
                  skip_ids: set[str]) -> pa.Table:
    """Corpus rows -> work rows: each gets its shard; rows of unplanned splits, of finished shards and
    already-rejected clips are dropped. A row without a clip id (a corpus written outside ralm) is its own clip."""
    ids = table.column("id").to_pylist() if "id" in table.column_names else [None] * table.num_rows
    clip_ids = [c if c is not None else i for c, i in zip(table.column("clip_id").to_pylist(), ids, strict=True)]
    table = table.set_column(table.column_names.index("clip_id"), "clip_id", pa.array(clip_ids, pa.string()))
    splits = table.column("split").to_pylist()
    shards = [shard_of(c, n_shards[s]) if s in n_shards else -1 for c, s in zip(clip_ids, splits, strict=True)]
    keep = [n >= 0 and c not in skip_ids and (s, n) not in skip_shards
            for c, s, n in zip(clip_ids, splits, shards, strict=True)]
    out = table.append_column("shard", pa.array(shards, pa.int64())).filter(pa.array(keep, pa.bool_()))
    return out.select(WORK_SCHEMA.names).cast(WORK_SCHEMA)


def write_work_list(corpus_data: str, work_dir: str, n_shards: dict[str, int], skip_shards: set[tuple[str, int]],
                    skip_ids: set[str], chunk_rows: int = 100_000, part_rows: int = 4096) -> tuple[list[str], int]:
    """Write the clips to encode, in shard order and once per (split, clip id), as Parquet parts under
    `work_dir` (replacing an older list); returns the part URIs in order and the number of clips."""
    storage.remove(work_dir, recursive=True)
    with tempfile.TemporaryDirectory(prefix="ralm-work-") as spill:
        runs: list[str] = []
        chunk: list[pa.Table] = []
        rows = 0
        for table in records.iter_tables(corpus_data, ["id", *CORPUS_COLUMNS]):
            work = assign_shards(table, n_shards, skip_shards, skip_ids)
            chunk.append(work)
            rows += work.num_rows
            if rows >= chunk_rows:  # spill a sorted run; memory stays at one chunk
                runs.append(_spill(chunk, os.path.join(spill, f"run-{len(runs):06d}.parquet")))
                chunk, rows = [], 0
        if runs and chunk:
            runs.append(_spill(chunk, os.path.join(spill, f"run-{len(runs):06d}.parquet")))
        ordered = heapq.merge(*(_iter_rows(r) for r in runs), key=_key) if runs else _iter_sorted(chunk)
        with records.PartWriter(work_dir, schema=WORK_SCHEMA, part_rows=part_rows) as writer:
            writer.extend(_unique(ordered))
    return records.part_uris(work_dir), writer.committed


def _key(row: dict[str, Any]) -> tuple[str, int, str]:
    return row["split"], row["shard"], row["clip_id"]


def _sorted(chunk: list[pa.Table]) -> pa.Table:
    return pa.concat_tables(chunk).sort_by(_ORDER) if chunk else WORK_SCHEMA.empty_table()


def _iter_sorted(chunk: list[pa.Table]) -> Iterator[dict[str, Any]]:
    for batch in _sorted(chunk).to_batches(max_chunksize=4096):
        yield from batch.to_pylist()


def _spill(chunk: list[pa.Table], path: str) -> str:
    pq.write_table(_sorted(chunk), path)
    return path


def _iter_rows(path: str) -> Iterator[dict[str, Any]]:
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):  # x runs in memory while merging
        yield from batch.to_pylist()


def _unique(rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """A clip listed twice in the corpus is encoded once (sorted input: duplicates are neighbours)."""
    last = None
    for row in rows:
        if (row["split"], row["clip_id"]) != last:
            last = (row["split"], row["clip_id"])
            yield row
