"""WebDataset shards of encoder features (local or s3://) and their Parquet index.

A sample is one clip, key = clip id: `{clip_id}.json` ({"clip_id", "duration_s", "split", "encoders":
{name: {"layers", "frame_rate", "width"}}}) then one `{clip_id}.{encoder}.npy` per encoder (sorted by
name), an array of shape (layers, frames, width) in the shard dtype. Members of a key are adjacent (ray
read_webdataset needs that, ray-project/ray#44068). Bytes are deterministic: fixed mtime/uid/mode, fixed
member order, so the same samples in the same order give a byte-identical tar.

A shard is written to a local temporary file and appears under its final name only when complete
(rename locally; one completed PUT / multipart upload on S3). Its index part `part-{split}-{n:06d}.parquet`
(one row per clip: clip_id, split, shard, duration_s, bytes, offset, frames) is written after the tar, so
"index part exists" means "shard finished".
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ralm import storage

INDEX_SCHEMA = pa.schema([
    pa.field("clip_id", pa.string(), nullable=False),
    pa.field("split", pa.string()),
    pa.field("shard", pa.string()),  # full URI of the tar
    pa.field("duration_s", pa.float64()),
    pa.field("bytes", pa.int64()),  # bytes of this sample inside the tar (headers + padding included)
    pa.field("offset", pa.int64()),  # byte offset of the sample's first tar header (random access)
    pa.field("frames", pa.map_(pa.string(), pa.int32())),  # frames per encoder
])

_BLOCK = 512
_DTYPES = {"float16": np.float16, "float32": np.float32}


def shard_name(split: str, n: int) -> str:
    return f"shard-{split}-{n:06d}.tar"


def index_name(split: str, n: int) -> str:
    return f"part-{split}-{n:06d}.parquet"


def finished_shards(index_dir: str) -> set[tuple[str, int]]:
    """(split, n) of every shard whose index part is committed: the shards that are complete."""
    done = set()
    for uri in storage.ls(index_dir, "part-*.parquet"):
        stem = uri.rsplit("/", 1)[-1][len("part-") : -len(".parquet")]
        split, _, n = stem.rpartition("-")
        if n.isdigit():
            done.add((split, int(n)))
    return done


def member_bytes(size: int) -> int:
    """Bytes a member of `size` bytes takes in a tar: one header block plus padded data blocks."""
    return _BLOCK + _BLOCK * math.ceil(size / _BLOCK)


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _meta_of(name: str, arr: np.ndarray, duration_s: float, meta: Any | None) -> dict[str, Any]:
    if meta is None:  # writer used without encoder metadata: infer what the array says
        return {"layers": list(range(arr.shape[0])), "frame_rate": round(arr.shape[1] / max(duration_s, 1e-9), 6),
                "width": int(arr.shape[2])}
    m = meta.to_dict() if hasattr(meta, "to_dict") else dict(meta)
    return {"layers": [int(x) for x in m["layers"]], "frame_rate": float(m["frame_rate"]), "width": int(m["width"])}


class ShardFile:
    """One tar being written to a local temporary file; `commit` moves it to `uri` atomically."""

    def __init__(self, uri: str, dtype: str = "float16"):
        if dtype not in _DTYPES:
            raise ValueError(f"shard dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.uri = uri
        self.dtype = _DTYPES[dtype]
        local_dir = None if storage.is_remote(uri) else os.path.dirname(storage.filesystem(uri)[1]) or "."
        if local_dir:
            os.makedirs(local_dir, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=".tmp-shard-", suffix=".tar", dir=local_dir)
        self._f = os.fdopen(fd, "wb")
        self._tar = tarfile.open(fileobj=self._f, mode="w", format=tarfile.GNU_FORMAT)
        self.rows: list[dict[str, Any]] = []
        self.size = 0

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def add(self, clip_id: str, duration_s: float, split: str, features: dict[str, np.ndarray],
            encoders: dict[str, Any] | None = None) -> int:
        """Append one clip; returns the bytes it took."""
        if "." in clip_id or "/" in clip_id:
            raise ValueError(f"clip id {clip_id!r} must not contain '.' or '/' (it is the WebDataset key)")
        names = sorted(features)
        arrays = {n: np.asarray(features[n]).astype(self.dtype, copy=False) for n in names}
        for n, a in arrays.items():
            if a.ndim != 3:
                raise ValueError(f"{clip_id}: features of {n!r} must be (layers, frames, width), got {a.shape}")
        head = {"clip_id": clip_id, "duration_s": float(duration_s), "split": split,
                "encoders": {n: _meta_of(n, arrays[n], duration_s, (encoders or {}).get(n)) for n in names}}
        members = [(f"{clip_id}.json", json.dumps(head, sort_keys=True, separators=(",", ":")).encode())]
        members += [(f"{clip_id}.{n}.npy", npy_bytes(arrays[n])) for n in names]
        offset = self._tar.offset
        for name, data in members:
            self._add_member(name, data)
        nbytes = self._tar.offset - offset
        self.size = self._tar.offset
        self.rows.append({"clip_id": clip_id, "split": split, "shard": self.uri, "duration_s": float(duration_s),
                          "bytes": nbytes, "offset": offset,
                          "frames": {n: int(arrays[n].shape[1]) for n in names}})
        return nbytes

    def commit(self) -> list[dict[str, Any]]:
        self._tar.close()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        storage.put_file_atomic(self.tmp, self.uri)
        return self.rows

    def abort(self) -> None:
        try:
            self._tar.close()
            self._f.close()
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)


def write_index(index_dir: str, split: str, n: int, rows: list[dict[str, Any]]) -> str:
    cols = {name: [r.get(name) for r in rows] for name in INDEX_SCHEMA.names}
    cols["frames"] = [sorted(r["frames"].items()) for r in rows]
    buf = io.BytesIO()
    pq.write_table(pa.table(cols, schema=INDEX_SCHEMA), buf, compression="zstd")
    uri = storage.join(index_dir, index_name(split, n))
    storage.makedirs(index_dir)
    storage.write_bytes_atomic(uri, buf.getvalue())
    return uri


class ShardWriter:
    """Rolling writer for one split: shards of about `target_mb`, numbered from `start`.

    `ShardWriter(dir_uri, split, target_mb, dtype).write(clip_id, duration_s, {enc: array})`, then
    `.close()` -> the shard URIs. With `index_dir`, each shard's Parquet index part is written after it.
    """

    def __init__(self, dir_uri: str, split: str = "train", target_mb: float = 64.0, dtype: str = "float16",
                 encoders: dict[str, Any] | None = None, index_dir: str | None = None, start: int = 0):
        self.dir_uri, self.split, self.dtype = dir_uri.rstrip("/"), split, dtype
        self.target = int(target_mb * 2**20)
        self.encoders, self.index_dir = encoders, index_dir
        self.n = start
        self.current: ShardFile | None = None
        self.uris: list[str] = []
        self.index_rows: list[dict[str, Any]] = []
        storage.makedirs(self.dir_uri)

    def write(self, clip_id: str, duration_s: float, features: dict[str, np.ndarray]) -> None:
        if self.current is None:
            self.current = ShardFile(storage.join(self.dir_uri, shard_name(self.split, self.n)), self.dtype)
        self.current.add(clip_id, duration_s, self.split, features, self.encoders)
        if self.current.size >= self.target:
            self._finish()

    def _finish(self) -> None:
        assert self.current is not None
        rows = self.current.commit()
        if self.index_dir:
            write_index(self.index_dir, self.split, self.n, rows)
        self.uris.append(self.current.uri)
        self.index_rows.extend(rows)
        self.current = None
        self.n += 1

    def close(self) -> list[str]:
        if self.current is not None and self.current.rows:
            self._finish()
        return list(self.uris)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        elif self.current is not None:  # never publish a half-written shard
            self.current.abort()


# ---------------------------------------------------------------------------------------------- readers
def iter_shard(uri: str, dtype: Any | None = None) -> Iterator[dict[str, Any]]:
    """Samples of one shard in order: {"clip_id", "duration_s", "split", "features": {encoder: array}}."""
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        current: dict[str, Any] | None = None
        for m in tar:
            if not m.isfile():
                continue
            key, _, ext = m.name.rpartition("/")[2].partition(".")
            data = tar.extractfile(m).read()  # type: ignore[union-attr]
            if current is None or current["clip_id"] != key:
                if current is not None:
                    yield current
                current = {"clip_id": key, "duration_s": None, "split": None, "features": {}}
            if ext == "json":
                head = json.loads(data)
                current["duration_s"], current["split"] = head["duration_s"], head["split"]
                current["encoders"] = head.get("encoders", {})
            elif ext.endswith(".npy"):
                arr = np.load(io.BytesIO(data), allow_pickle=False)
                current["features"][ext[: -len(".npy")]] = arr if dtype is None else arr.astype(dtype)
        if current is not None:
            yield current


def _shards_dir(features_uri: str) -> str:
    features_uri = features_uri.rstrip("/")
    enc_json = storage.join(features_uri, "encoders.json")
    if storage.exists(enc_json):
        return storage.read_json(enc_json).get("shards_uri") or storage.join(features_uri, "shards")
    if storage.ls(storage.join(features_uri, "shards"), "shard-*.tar"):
        return storage.join(features_uri, "shards")
    return features_uri


def list_shards(features_uri: str, split: str | None = None) -> list[str]:
    """Sorted shard URIs under a features stage folder (run_dir/features), or a shard folder itself."""
    return storage.ls(_shards_dir(features_uri), f"shard-{split}-*.tar" if split else "shard-*.tar")


def read_index(features_uri: str) -> pa.Table:
    """The shard index of a features stage (clip_id -> shard, duration_s, bytes, ...)."""
    from ralm import records

    return records.read_table(storage.join(features_uri.rstrip("/"), "data"), schema=INDEX_SCHEMA)


def read_encoders(features_uri: str) -> list[dict[str, Any]]:
    """Each encoder's name, model, layers, width, frame_rate, sample_rate (as written by the stage)."""
    return storage.read_json(storage.join(features_uri.rstrip("/"), "encoders.json"))["encoders"]


def register_webdataset_s3() -> None:
    """Let the `webdataset` library open s3:// URLs through s3fs (it has no s3 opener of its own)."""
    import sys

    import webdataset  # noqa: F401  (loads the gopen module)

    gopen_mod = sys.modules["webdataset.gopen"]

    def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192) -> Any:
        fs, path = storage.filesystem(url)
        return fs.open(path, mode)

    gopen_mod.gopen_schemes["s3"] = gopen_s3
