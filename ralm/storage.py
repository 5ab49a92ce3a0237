"""URIs -> fsspec filesystems (local paths or s3:// through s3fs), and atomic writes on both."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import fsspec
from fsspec.core import url_to_fs

_S3_OPTIONS: dict[str, Any] = {}


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
    prefix = uri.split("://", 1)[0] + "://" if is_remote(uri) else ""
    return sorted(prefix + f if prefix and not f.startswith(prefix) else f for f in found)


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
