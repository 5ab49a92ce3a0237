"""URIs -> fsspec filesystems (local paths or s3:// through s3fs), and atomic writes on both."""

from __future__ import annotations

import glob as pyglob
import json
import os
import posixpath
import re
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.core import url_to_fs

_S3_OPTIONS: dict[str, Any] = {}


class StorageError(OSError):
    """The store itself failed (an endpoint that does not answer, no or wrong credentials): not a file's
    fault, so never a reject row, which a rerun would skip. A Ray task that meets it marks its rows
    `UNREACHABLE` (s3fs has already retried); the driver stops the stage with this error after committing
    what is done, and a rerun once the store is back resumes."""


UNREACHABLE = "store_unreachable"  # a row's error when its store failed: the stage stops, nothing is rejected


def configure(storage_cfg: Any | None) -> None:
    """Remember S3 endpoint/region from the config; credentials stay in the environment."""
    _S3_OPTIONS.clear()
    if storage_cfg is None:
        return
    client_kwargs: dict[str, Any] = {}
    if getattr(storage_cfg, "s3_endpoint_url", None):
        client_kwargs["endpoint_url"] = storage_cfg.s3_endpoint_url
    if getattr(storage_cfg, "s3_region", None):
        client_kwargs["region_name"] = storage_cfg.s3_region
    if client_kwargs:
        _S3_OPTIONS["client_kwargs"] = client_kwargs
    if getattr(storage_cfg, "anon", False):
        _S3_OPTIONS["anon"] = True
    # Ray workers inherit these through the environment (see cluster.runtime_env_vars).
    if storage_cfg.s3_endpoint_url:
        os.environ["RALM_S3_ENDPOINT_URL"] = storage_cfg.s3_endpoint_url


def storage_options(uri: str) -> dict[str, Any]:
    if not is_remote(uri):
        return {}
    opts = dict(_S3_OPTIONS)
    endpoint = os.environ.get("RALM_S3_ENDPOINT_URL")
    if endpoint and "client_kwargs" not in opts:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    return opts


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def absolute(uri: str) -> str:
    """A local path made absolute (Ray workers do not share the driver's working directory); URIs as given."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = url_to_fs(uri, **storage_options(uri))
    return fs, path


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    if not is_remote(uri):
        fs.makedirs(path, exist_ok=True)


def ls(uri: str, pattern: str = "*") -> list[str]:
    """Sorted full URIs of files matching `pattern` directly under `uri` (empty if it does not exist)."""
    fs, path = filesystem(uri)
    found = fs.glob(f"{path.rstrip('/')}/{pattern}")
    return sorted(_with_scheme(uri, f) for f in found)


def isdir(uri: str) -> bool:
    fs, path = filesystem(uri)
    try:
        return fs.isdir(path)
    except Exception as e:
        if not is_remote(uri):
            raise
        raise unreachable(uri, e) from e


def unreachable(uri: str, err: Exception) -> StorageError:
    """The error for a remote store that failed on `uri`, with what to check."""
    if isinstance(err, PermissionError):
        return StorageError(f"cannot read {uri}: access denied ({err}); check the credentials in the environment "
                            "(AWS_ACCESS_KEY_ID, ...) or the instance role")
    return StorageError(f"cannot read {uri}: {type(err).__name__}: {err} (is storage.s3_endpoint_url right, and is "
                        "the store up?)")


def glob(uri: str, pattern: str) -> list[str]:
    """Sorted full URIs of files under `uri` matching `pattern` (`**` spans folders), local or remote."""
    if not is_remote(uri):
        return sorted(f for f in pyglob.glob(os.path.join(uri, pattern), recursive=True) if os.path.isfile(f))
    fs, path = filesystem(uri)
    found = fs.glob(f"{path.rstrip('/')}/{pattern}", detail=True)  # one listing, no request per file
    return sorted(_with_scheme(uri, f) for f, info in found.items() if info.get("type") != "directory")


def walk(uri: str) -> Iterator[tuple[str, list[str]]]:
    """(folder URI, sorted file names in it) for `uri` and every folder below it, in a stable order; hidden
    folders are skipped. Local trees are streamed folder by folder."""
    fs, path = filesystem(uri)
    walker = os.walk(path) if not is_remote(uri) else fs.walk(path, topdown=True)
    for folder, dirs, files in walker:
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield _with_scheme(uri, folder), sorted(files)


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def resolve(base: str, rel: str) -> str:
    """`rel` (a path from a manifest) against the folder `base`; absolute paths and URIs are kept."""
    if _SCHEME.match(rel):
        return rel
    if is_remote(base):
        scheme, path = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(path, rel))}"
    return os.path.normpath(os.path.join(base, rel))


def relative(uri: str, root: str) -> str:
    """`uri`'s path below `root` (the same for a tree on disk and its copy on S3); the whole URI if outside."""
    if not is_remote(root):
        return uri if is_remote(uri) else os.path.relpath(uri, root)
    prefix = root.rstrip("/") + "/"
    return uri[len(prefix):] if uri.startswith(prefix) else uri


def _with_scheme(uri: str, path: str) -> str:
    """fsspec answers remote paths without their scheme (`bucket/key`): give it back."""
    if not is_remote(uri):
        return path
    prefix = uri.split("://", 1)[0] + "://"
    return path if path.startswith(prefix) else prefix + path


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Local: write a temp file then rename. S3: one PUT is atomic (an object appears whole or not)."""
    fs, path = filesystem(uri)
    if is_remote(uri):
        with fs.open(path, "wb") as f:
            f.write(data)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def put_file_atomic(local_path: str, uri: str) -> None:
    """Move a finished local file to `uri` so that it appears only when complete."""
    fs, path = filesystem(uri)
    if is_remote(uri):
        fs.put_file(local_path, path)  # multipart uploads complete atomically
        os.remove(local_path)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    os.replace(local_path, path)


def open_text(uri: str) -> Any:
    """A text file opened for streaming, local or remote: UTF-8 (a byte-order mark, as spreadsheets write,
    is dropped), undecodable bytes replaced, newlines kept for the csv module."""
    fs, path = filesystem(uri)
    return fs.open(path, "rt", encoding="utf-8-sig", errors="replace", newline="")


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def write_json(uri: str, obj: Any) -> None:
    write_bytes_atomic(uri, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_text(uri: str, text: str) -> None:
    write_bytes_atomic(uri, text.encode())


def remove(uri: str, recursive: bool = False) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)
