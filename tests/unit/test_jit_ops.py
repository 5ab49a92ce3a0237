"""A lock left by a killed JIT build of DeepSpeed's comm op must not hang training (it hung every later
run on the machine, silently, until it was removed by hand)."""

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ralm.train import jit_ops


def test_a_lock_with_no_build_running_is_removed(tmp_path):
    (tmp_path / "lock").touch()
    assert jit_ops.building_in(tmp_path) is False
    assert jit_ops.clear_stale_lock(tmp_path, stale_after_s=0.2, poll_s=0.05)
    assert not (tmp_path / "lock").exists()
    assert not jit_ops.clear_stale_lock(tmp_path)  # no lock: nothing to do, no wait


def test_a_running_build_keeps_its_lock_until_it_is_gone(tmp_path):
    (tmp_path / "lock").touch()
    builder = subprocess.Popen(["sleep", "600"], cwd=tmp_path)  # a compiler at work in the build dir
    try:
        assert jit_ops.building_in(tmp_path) is True
        removed: list[bool] = []
        waiter = threading.Thread(target=lambda: removed.append(
            jit_ops.clear_stale_lock(tmp_path, stale_after_s=0.2, poll_s=0.05)))
        waiter.start()
        waiter.join(timeout=2.0)
        assert waiter.is_alive() and (tmp_path / "lock").exists(), "a live build's lock was taken"
    finally:
        builder.send_signal(signal.SIGKILL)
        builder.wait()
    waiter.join(timeout=30)
    assert removed == [True] and not (tmp_path / "lock").exists()


def test_the_flock_is_released_when_its_holder_is_killed(tmp_path):
    path = tmp_path / ".ralm.flock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from ralm.train.jit_ops import exclusive\n"
        f"with exclusive(Path({str(path)!r})):\n    print('held', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        got: list[bool] = []

        def take() -> None:
            with jit_ops.exclusive(path):
                got.append(True)

        taker = threading.Thread(target=take, daemon=True)
        taker.start()
        taker.join(timeout=1.0)
        assert not got, "the lock was taken while another process held it"
    finally:
        holder.kill()
        holder.wait()
    taker.join(timeout=30)
    assert got == [True]


@pytest.mark.timeout(600)
def test_training_start_survives_a_killed_build(tmp_path):
    """The real op, a planted stale lock: DeepSpeed's own loader (what `deepspeed.initialize` runs on a
    CPU) returns after `load_comm_op` instead of waiting forever."""
    builder = jit_ops.comm_op_builder()
    if builder is None:
        pytest.skip("DeepSpeed loads no JIT comm op on this accelerator")
    from torch.utils.cpp_extension import _get_build_directory

    cached = Path(_get_build_directory(builder.name, verbose=False))
    build_dir = tmp_path / "ext" / builder.name  # TORCH_EXTENSIONS_DIR/<name>
    if any(cached.glob("*.so")):  # the machine's build: reuse it (a fresh one compiles for ~1 min)
        shutil.copytree(cached, build_dir, ignore=shutil.ignore_patterns("lock", ".*lock"))
    else:
        build_dir.mkdir(parents=True)
    (build_dir / "lock").touch()
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(build_dir.parent))
    code = ("import logging; logging.basicConfig(level=logging.INFO)\n"
            "from ralm.train.jit_ops import load_comm_op\nload_comm_op()\n"
            "from deepspeed.comm.torch import build_shm_op\nassert build_shm_op() is not None\nprint('loaded')")
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             timeout=540)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the load hung on the stale lock: {e.stderr}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "loaded" in out.stdout
    assert "a build of this op was killed" in out.stderr
    assert not (build_dir / "lock").exists()
    assert any(build_dir.glob("*.so"))


def test_without_a_compiler_training_falls_back_to_gloo(tmp_path):
    """A worker image with no C++ compiler: the op cannot be built, DeepSpeed must not try again (it
    would raise inside `deepspeed.initialize`), and its comm backend starts without it."""
    if jit_ops.comm_op_builder() is None:
        pytest.skip("DeepSpeed loads no JIT comm op on this accelerator")
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), CXX=str(tmp_path / "no-such-c++"))
    code = ("import logging; logging.basicConfig(level=logging.INFO)\n"
            "from ralm.train.jit_ops import load_comm_op\nassert load_comm_op() is None\n"
            "from deepspeed.comm.torch import build_shm_op\nassert build_shm_op() is None\nprint('fallback')")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fallback" in out.stdout and "training goes on with torch's gloo all-reduce" in out.stderr
