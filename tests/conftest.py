"""Shared fixtures: one local Ray per test session, audio file factories, GPU skipping."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.children import die_with_parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Dummy credentials for the session's local S3 server (moto), set before any Ray starts so that Ray
# workers (Ray Train, Ray Data actors) inherit them through ralm's runtime env as a real job's would.
for _key, _value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                     ("AWS_DEFAULT_REGION", "us-east-1")):
    os.environ.setdefault(_key, _value)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A real local Ray for the whole session (start-up ~3 s, so once)."""
    import ray

    from ralm.cluster import init_ray

    if not ray.is_initialized():
        init_ray(_RayCfg())
    yield
    ray.shutdown()


class _RayCfg:
    address = None
    num_cpus = 4
    object_store_memory_mb = 512
    include_dashboard = False
    namespace = "ralm-tests"


@pytest.fixture
def dead_store(monkeypatch):
    """S3 settings pointing at a port nothing listens on (the store is down, or the endpoint is wrong)."""
    from ralm import storage
    from ralm.config import StorageConfig

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("RALM_S3_ENDPOINT_URL", raising=False)
    storage.configure(StorageConfig(s3_endpoint_url="http://127.0.0.1:9"))
    yield
    monkeypatch.delenv("RALM_S3_ENDPOINT_URL", raising=False)
    storage.configure(None)


@pytest.fixture
def write_wav(tmp_path: Path) -> Callable[..., Path]:
    """write_wav(name, seconds=1.0, sr=16000, kind='tone'|'noise'|'zero', freq=440) -> path."""
    import soundfile as sf

    def make(name: str, seconds: float = 1.0, sr: int = 16000, kind: str = "tone", freq: float = 440.0,
             amplitude: float = 0.3, seed: int = 0) -> Path:
        n = int(seconds * sr)
        t = np.arange(n) / sr
        if kind == "tone":
            wav = amplitude * np.sin(2 * np.pi * freq * t)
        elif kind == "noise":
            wav = amplitude * np.random.default_rng(seed).uniform(-1, 1, n)
        elif kind == "zero":
            wav = np.zeros(n)
        else:
            raise ValueError(kind)
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), wav.astype(np.float32), sr)
        return path

    return make


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3 HTTP server (moto's server mode) on 127.0.0.1; yields its endpoint URL.

    Dummy credentials are set for the session; tests create their own buckets.
    """
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except Exception:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("moto_server did not start")
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server: str) -> Iterator[str]:
    """A fresh bucket on the local S3 server, with ralm.storage pointed at it; yields `s3://bucket`."""
    import uuid

    import s3fs

    from ralm import storage
    from ralm.config import StorageConfig

    name = f"ralm-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}).mkdir(name)
    storage.configure(StorageConfig(s3_endpoint_url=s3_server))
    yield f"s3://{name}"
    storage.configure(None)
    os.environ.pop("RALM_S3_ENDPOINT_URL", None)
