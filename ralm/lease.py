"""One writer per run dir: a lease file that a second run (a job submitted twice, a rerun started while the
first still works) finds and refuses on, instead of both writing the same shards.

The lease is a small JSON object in the run dir (local or S3), so it works wherever the run dir lives. Its
holder rewrites the heartbeat every `HEARTBEAT_S`; a lease is stale when its heartbeat is older than
`STALE_AFTER_S`, or at once when its holder ran on this host and that process is gone (a killed driver's
rerun need not wait).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from ralm import storage

log = logging.getLogger(__name__)

LEASE_FILE = "_LEASE.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 150.0  # five missed heartbeats: a slow store or a long GC pause is not a dead run


class RunDirBusy(RuntimeError):
    """Another live run holds the run dir."""


_held: set[str] = set()  # run dirs this process holds (run_all holds one around each run_stage)


def _alive_here(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    try:  # a killed driver its parent has not reaped yet is a zombie: gone for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def holder_gone(lease: dict[str, Any], now: float, stale_after_s: float) -> str | None:
    """Why the lease no longer holds (None: its holder may still be running)."""
    if lease.get("host") == socket.gethostname() and not _alive_here(int(lease.get("pid", -1))):
        return f"process {lease.get('pid')} on this host has exited"
    age = now - float(lease.get("heartbeat", 0))
    if age > stale_after_s:
        return f"no heartbeat for {age:.0f} s"
    return None


def describe(lease: dict[str, Any], now: float) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(lease.get("started", 0))))
    return (f"`ralm {lease.get('command', '?')}` (pid {lease.get('pid', '?')} on {lease.get('host', '?')}, "
            f"started {started}, last heartbeat {now - float(lease.get('heartbeat', 0)):.0f} s ago)")


def current_lease(run_dir: str) -> dict[str, Any] | None:
    """The lease on `run_dir` as its holder last wrote it, or None."""
    return _read(storage.join(run_dir, LEASE_FILE))


def _read(uri: str, attempts: int = 5) -> dict[str, Any] | None:
    fs, path = storage.filesystem(uri)
    for attempt in range(attempts):
        fs.invalidate_cache(path)  # another process rewrites it: never trust s3fs's cached size or listing
        try:
            with fs.open(path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):  # torn or hand-edited: treat as no lease rather than block forever
            log.warning("ignoring an unreadable lease file %s", uri)
            return None
        except OSError:  # S3: rewritten between the HEAD and the GET (s3fs's FileExpired): read it again
            if attempt == attempts - 1:
                raise
            time.sleep(0.1 * (attempt + 1))
    return None


@contextlib.contextmanager
def run_lease(run_dir: str, command: str, *, heartbeat_s: float = HEARTBEAT_S,
              stale_after_s: float = STALE_AFTER_S) -> Iterator[None]:
    """Hold the run dir's lease for the block; RunDirBusy if a live run holds it. Reentrant in a process."""
    if run_dir in _held:  # nested: the outermost holder renews and releases it
        yield
        return

    uri = storage.join(run_dir, LEASE_FILE)
    now = time.time()
    current = _read(uri)
    if current is not None:
        gone = holder_gone(current, now, stale_after_s)
        if gone is None:
            raise RunDirBusy(f"{run_dir} is in use by {describe(current, now)}: wait for it to finish or stop "
                             f"it; if it is gone for good, remove {uri} (a lease without heartbeat for "
                             f"{stale_after_s:.0f} s is taken over by itself)")
        log.warning("taking over %s from %s: %s", run_dir, describe(current, now), gone)
    token = uuid.uuid4().hex
    lease = {"token": token, "command": command, "host": socket.gethostname(), "pid": os.getpid(),
             "started": now, "heartbeat": now}
    storage.write_bytes_atomic(uri, json.dumps(lease).encode())
    mine = _read(uri)
    if mine is None or mine.get("token") != token:  # two starts in the same instant: the last write won
        raise RunDirBusy(f"{run_dir} was taken by another run starting at the same time"
                         + (f": {describe(mine, time.time())}" if mine else ""))
    _held.add(run_dir)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(uri, lease, stop, heartbeat_s), name="ralm-lease",
                            daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join(timeout=60)
        _held.discard(run_dir)
        current = _read(uri)
        if current is not None and current.get("token") == token:
            with contextlib.suppress(Exception):  # a store gone at exit: the heartbeat runs out by itself
                storage.remove(uri)


def _heartbeat(uri: str, lease: dict[str, Any], stop: threading.Event, every_s: float) -> None:
    while not stop.wait(every_s):
        try:
            current = _read(uri)
            if current is not None and current.get("token") != lease["token"]:
                log.error("the lease on %s was taken over by %s; this run's writes may now collide with it",
                          uri, describe(current, time.time()))
                return
            lease["heartbeat"] = time.time()
            storage.write_bytes_atomic(uri, json.dumps(lease).encode())
        except Exception as e:  # a flaky store must not stop the heartbeat; a long outage lets it go stale
            log.warning("could not renew the lease %s: %s", uri, e)
