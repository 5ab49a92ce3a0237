"""The local Ray that `init_ray` starts: what it leaves running between stages."""

from __future__ import annotations

import os
import time

import pytest

pytestmark = pytest.mark.ray


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_idle_workers_exit_after_a_few_seconds(ray_local):
    """Ray would keep one idle worker per logical CPU for good, each waking 100 times a second; ralm's
    local Ray lets the workers of finished tasks go (`_local_ray_env`)."""
    import ray

    if ray._private.worker._global_node is None or not os.path.isdir("/proc"):
        pytest.skip("attached to a Ray this process did not start, or no /proc")

    @ray.remote(num_cpus=1)
    def worker_pid(i: int) -> int:
        time.sleep(0.5)  # hold the worker so the four tasks need several
        return os.getpid()

    pids = set(ray.get([worker_pid.remote(i) for i in range(4)]))
    assert pids and all(_alive(p) for p in pids)
    deadline = time.monotonic() + 40  # 5 s idle + the raylet's periodic check, on a busy 2-core machine
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(_alive(p) for p in pids), f"idle workers still running: {[p for p in pids if _alive(p)]}"
