"""DeepSpeed's just-in-time built ops, loaded so that one killed build cannot hang every later run.

On a CPU DeepSpeed compiles its shared-memory all-reduce op (`deepspeed_shm_comm`) with torch's JIT
extension loader the first time a process starts its communication backend. Torch guards the build
directory with a bare `lock` file: a process killed while it held it (Ctrl-C, a SIGKILLed or OOM-killed
job, a preempted node) leaves it behind, and from then on every process on that machine waits on it
forever, printing nothing. Here the load runs under an `flock`, which the kernel drops when its holder
dies; a `lock` still there with no compiler working in the directory is stale and is removed, loudly.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# How long a `lock` must stay with no build process in its directory before it counts as stale: a live
# holder writes its build file for a few milliseconds before the compiler starts.
STALE_AFTER_S = 5.0
# Where processes cannot be seen, a lock this old is stale (no op of DeepSpeed's takes as long to build).
BLIND_STALE_AFTER_S = 1800.0


def comm_op_builder() -> Any | None:
    """The op builder DeepSpeed's torch comm backend loads on this accelerator, or None when it loads
    nothing (as `deepspeed.comm.torch.build_shm_op` decides)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    return builder


def load_comm_op() -> Any | None:
    """Load (building once per machine) the comm op before `deepspeed.initialize` asks for it: DeepSpeed
    then reuses this process's loaded module and never touches the lock itself."""
    builder = comm_op_builder()
    if builder is None:
        return None
    from torch.utils.cpp_extension import _get_build_directory

    build_dir = Path(_get_build_directory(builder.name, verbose=False))
    with exclusive(build_dir / ".ralm.flock"):
        clear_stale_lock(build_dir)
        fresh = not any(build_dir.glob("*.so"))
        if fresh:
            log.warning("compiling DeepSpeed's %s op for this machine (once; cached in %s)", builder.name,
                        build_dir)
        start = time.monotonic()
        try:
            module = builder.load(verbose=False)
        except Exception as e:  # no compiler in the image, say: gloo's own all-reduce still works
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__[builder.NAME] = False  # DeepSpeed then skips it too
            log.warning("could not build DeepSpeed's %s op (%s: %s); training goes on with torch's gloo "
                        "all-reduce (slower between CPU workers on one node; install g++ and ninja to "
                        "build it)", builder.name, type(e).__name__, (str(e).strip().splitlines() or [""])[-1])
            return None
        if fresh:
            log.warning("compiled %s in %.0f s", builder.name, time.monotonic() - start)
    return module


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path`, released by the kernel if this process dies holding it."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def clear_stale_lock(build_dir: Path, stale_after_s: float = STALE_AFTER_S, poll_s: float = 0.5) -> bool:
    """Wait while a build is running in `build_dir`; remove its `lock` once it has stood for
    `stale_after_s` with nothing building there. True when a stale lock was removed."""
    lock = build_dir / "lock"
    idle_since: float | None = None
    while lock.exists():
        now = time.monotonic()
        busy = building_in(build_dir)
        if busy is None:  # no /proc to look at: only the lock's age can tell
            with contextlib.suppress(FileNotFoundError):
                busy = time.time() - lock.stat().st_mtime < BLIND_STALE_AFTER_S
        if busy:
            idle_since = None
        elif idle_since is None:
            idle_since = now
        elif now - idle_since >= stale_after_s:
            log.warning("removing %s: a build of this op was killed and left its lock behind (every later "
                        "load would have waited on it forever)", lock)
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            return True
        time.sleep(poll_s)
    return False


def building_in(build_dir: Path) -> bool | None:
    """Whether a live process other than this one works in `build_dir` (torch runs ninja and the
    compiler there); None without a /proc to look in."""
    target = os.path.realpath(build_dir)
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]
    except OSError:
        return None
    for pid in pids:
        try:
            if os.readlink(f"/proc/{pid}/cwd") == target:
                return True
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return False
