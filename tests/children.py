"""Child processes that cannot outlive the test run that started them."""

from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """`preexec_fn` for Popen: the kernel SIGKILLs the child when the test process dies without its
    teardown (a CI timeout, a killed session), so no Ray head, pipeline driver or S3 server lingers to hold
    the machine's CPUs, ports or locks for whatever runs next."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
