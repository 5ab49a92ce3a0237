"""Shared fixtures: one local Ray per test session, audio file factories, GPU skipping."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
