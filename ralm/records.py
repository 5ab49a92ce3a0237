"""The one record schema that flows through every stage, and its Parquet part writer/reader.

A dataset is `<stage_uri>/data/part-*.parquet` (rows keyed by `id`), `<stage_uri>/rejects/part-*.parquet`
(rows that could not be processed, with a reason) and `<stage_uri>/report.json`. Parts are committed
atomically, so a reader never sees half a part; a stage asks `done_ids()` and skips what is committed
(accepted or rejected), so a rerun after a crash neither redoes nor duplicates work. `_SUCCESS` marks a
finished stage.
"""

from __future__ import annotations

import hashlib
import io
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ralm import storage

DOMAINS = ("speech", "sound", "music", "instruction")
SPLITS = ("train", "valid", "test")

_STR = pa.string()
_MAP = pa.map_(pa.string(), pa.string())

# Corpus fields, then what later stages add (null until then). One schema: every dataset conforms to it.
RECORD_SCHEMA = pa.schema(
    [
        pa.field("id", _STR, nullable=False),  # row key: the clip id, or clip id + "/p<k>" per prompt
        pa.field("clip_id", _STR, nullable=False),  # the clip: features are keyed by this
        pa.field("source", _STR),  # dataset / recipe name
        pa.field("split", _STR),  # train | valid | test
        pa.field("domain", _STR),  # speech | sound | music | instruction
        pa.field("audio_uri", _STR),  # local path or s3://
        pa.field("offset_s", pa.float64()),
        pa.field("duration_s", pa.float64()),
        pa.field("sample_rate", pa.int32()),  # the file's native rate
        pa.field("surrogate", _STR),  # ALARM's textual surrogate of the clip
        pa.field("metadata", _MAP),  # original metadata only (gender, label, key, ...)
        pa.field("prompts", pa.list_(_STR)),  # candidate task prompts
        # --- prompts / generate / rephrase
        pa.field("prompt", _STR),  # the task prompt of this row
        pa.field("task", _STR),  # which fact the prompt asks about (verifiable when in metadata)
        pa.field("response", _STR),  # the frozen LLM's self-generated answer (thinking included)
        pa.field("response_tokens", pa.int32()),
        pa.field("finish_reason", _STR),
        pa.field("rephrased", _STR),  # the audio-perception rewrite (the training target)
        pa.field("rephrased_tokens", pa.int32()),
        pa.field("verdicts", _MAP),  # filter / verifier / judge outcomes
    ]
)

REJECT_SCHEMA = pa.schema(
    [
        pa.field("id", _STR, nullable=False),
        pa.field("stage", _STR),
        pa.field("source", _STR),
        pa.field("audio_uri", _STR),
        pa.field("reason", _STR),  # a short machine-readable reason (corrupt, empty, silent, too_long...)
        pa.field("detail", _STR),  # the human-readable explanation
    ]
)

FIELD_NAMES = tuple(RECORD_SCHEMA.names)


def clip_id(source: str, path: str, offset_s: float = 0.0, duration_s: float | None = None) -> str:
    """Stable id: hash of source + path + segment. Same inputs -> same id on every machine."""
    seg = f"{offset_s:.3f}:{'' if duration_s is None else f'{duration_s:.3f}'}"
    return hashlib.sha1(f"{source}|{path}|{seg}".encode()).hexdigest()[:20]


def make_record(**fields: Any) -> dict[str, Any]:
    """A full record dict: missing fields are None; unknown fields are an error."""
    unknown = set(fields) - set(FIELD_NAMES)
    if unknown:
        raise KeyError(f"not in the record schema: {sorted(unknown)}")
    rec = dict.fromkeys(FIELD_NAMES)
    rec.update(fields)
    if rec.get("clip_id") is None:
        rec["clip_id"] = rec["id"]
    return rec


def _to_map(value: Any) -> Any:
    if isinstance(value, dict):
        return [(str(k), None if v is None else str(v)) for k, v in sorted(value.items())]
    return value


def to_table(rows: Iterable[dict[str, Any]], schema: pa.Schema = RECORD_SCHEMA) -> pa.Table:
    rows = list(rows)
    cols: dict[str, list[Any]] = {name: [] for name in schema.names}
    for row in rows:
        for name in schema.names:
            v = row.get(name)
            cols[name].append(_to_map(v) if pa.types.is_map(schema.field(name).type) else v)
    return pa.table(cols, schema=schema)


def map_to_dict(value: Any) -> dict[str, str]:
    """Arrow map values come back as lists of (key, value) tuples; make them dicts."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    return dict(value)


def from_table(table: pa.Table) -> list[dict[str, Any]]:
    out = table.to_pylist(maps_as_pydicts="lossy") if _supports_pydict_maps() else table.to_pylist()
    for row in out:
        for name in ("metadata", "verdicts"):
            if name in row:
                row[name] = map_to_dict(row[name])
    return out


def _supports_pydict_maps() -> bool:
    try:
        pa.table({"m": pa.array([[("a", "b")]], type=_MAP)}).to_pylist(maps_as_pydicts="lossy")
        return True
    except TypeError:
        return False


# ---------------------------------------------------------------------------------------------- datasets
def data_uri(stage_uri: str) -> str:
    return storage.join(stage_uri, "data")


def rejects_uri(stage_uri: str) -> str:
    return storage.join(stage_uri, "rejects")


class PartWriter:
    """Buffers rows and commits them as atomic Parquet parts of `part_rows` rows."""

    def __init__(self, dir_uri: str, schema: pa.Schema = RECORD_SCHEMA, part_rows: int = 256):
        self.dir_uri = dir_uri
        self.schema = schema
        self.part_rows = part_rows
        self.buffer: list[dict[str, Any]] = []
        self.committed = 0
        storage.makedirs(dir_uri)

    def add(self, row: dict[str, Any]) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= self.part_rows:
            self.flush()

    def extend(self, rows: Iterable[dict[str, Any]]) -> None:
        for r in rows:
            self.add(r)

    def flush(self) -> None:
        if not self.buffer:
            return
        write_part(self.dir_uri, self.buffer, self.schema)
        self.committed += len(self.buffer)
        self.buffer = []

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        # On an exception keep what was complete so far: committed rows are never lost.
        self.flush()


def write_part(dir_uri: str, rows: list[dict[str, Any]], schema: pa.Schema = RECORD_SCHEMA) -> str:
    table = to_table(rows, schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    # Time-ordered names keep `ls` in commit order; the random suffix avoids clashes between writers.
    name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
    uri = storage.join(dir_uri, name)
    storage.write_bytes_atomic(uri, buf.getvalue())
    return uri


def part_uris(dir_uri: str) -> list[str]:
    return storage.ls(dir_uri, "part-*.parquet")


def read_table(dir_uri: str, columns: list[str] | None = None, schema: pa.Schema = RECORD_SCHEMA) -> pa.Table:
    tables = list(iter_tables(dir_uri, columns))
    if not tables:
        return schema.empty_table() if columns is None else schema.empty_table().select(columns)
    return pa.concat_tables(tables, promote_options="default")


def read_records(dir_uri: str, columns: list[str] | None = None) -> list[dict[str, Any]]:
    return from_table(read_table(dir_uri, columns))


def iter_tables(dir_uri: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """Stream a dataset one part (Arrow table) at a time (the driver never holds a whole large dataset)."""
    for uri in part_uris(dir_uri):
        fs, path = storage.filesystem(uri)
        with fs.open(path, "rb") as f:
            yield pq.read_table(f, columns=columns)


def iter_records(dir_uri: str, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Stream records part by part."""
    for table in iter_tables(dir_uri, columns):
        yield from from_table(table)


def read_ids(dir_uri: str) -> set[str]:
    return set(read_table(dir_uri, columns=["id"]).column("id").to_pylist()) if part_uris(dir_uri) else set()


def done_ids(stage_uri: str) -> set[str]:
    """Ids a stage has finished: accepted rows and rejected rows. A rerun skips them."""
    return read_ids(data_uri(stage_uri)) | (
        set(read_table(rejects_uri(stage_uri), ["id"], REJECT_SCHEMA).column("id").to_pylist())
        if part_uris(rejects_uri(stage_uri))
        else set()
    )


def reject(row_id: str, stage: str, reason: str, detail: str = "", source: str | None = None,
           audio_uri: str | None = None) -> dict[str, Any]:
    return {"id": row_id, "stage": stage, "source": source, "audio_uri": audio_uri, "reason": reason,
            "detail": detail[:2000]}


def read_rejects(stage_uri: str) -> list[dict[str, Any]]:
    return read_table(rejects_uri(stage_uri), schema=REJECT_SCHEMA).to_pylist()


def mark_success(stage_uri: str, info: dict[str, Any] | None = None) -> None:
    storage.write_json(storage.join(stage_uri, "_SUCCESS"), info or {})


def is_complete(stage_uri: str) -> bool:
    return storage.exists(storage.join(stage_uri, "_SUCCESS"))


def clear_success(stage_uri: str) -> None:
    storage.remove(storage.join(stage_uri, "_SUCCESS"))
