"""A tiny but real `ralm run`: the demo config scaled down, and helpers to run/kill it in a subprocess.

Shared by tests/e2e/test_run_pipeline.py and the `ralm submit run` test in tests/integration/test_submit.py.
Everything is offline: the demo recipe (synthesized once per test session into a shared assets folder),
the tiny random Llama from `make_tiny_llm` as the frozen LLM behind one Ray Serve replica (transformers
engine), Whisper tiny.en (CTranslate2 weights) as the encoder, a few DeepSpeed steps on one worker.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.children import die_with_parent

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("corpus", "prompts", "generate", "rephrase", "features", "train", "eval")

# The demo recipe interleaves its domains: the first 32 clips are 8 of each, 3 of them (a sound, a speech
# and a music clip) in the demo's held-out test split (enough for the shuffled-audio control).
CORPUS_LIMIT = 32

OVERRIDES: dict[str, Any] = {
    "name": "e2e-tiny",
    "ray": {"num_cpus": 4, "object_store_memory_mb": 512},
    "corpus": {"part_rows": 8},
    "llm": {"engine": "transformers", "max_model_len": 1024, "thinking": {"budget_tokens": None},
            "serve": {"num_replicas": 1, "num_cpus": 0.5}},
    "prompts": {"per_clip": 1, "part_rows": 8},
    # One row per committed part: the kill test can stop generate between two commits.
    "generation": {"best_of_n": 2, "part_rows": 1, "sampling": {"max_new_tokens": 8}},
    "rephrase": {"part_rows": 1, "max_attempts": 1, "audit_nll_samples": 2,
                 "sampling": {"max_new_tokens": 8}},
    # features.encoders: the demo's first encoder (Whisper tiny.en) with one actor, see write_config
    "train": {"adapter_hidden": 32, "num_workers": 1, "torch_threads": 1, "precision": "fp32", "max_steps": 3,
              "warmup_steps": 0, "batch_size": 4, "checkpoint_every": 2, "log_every": 1, "max_length": 512},
    "eval": {"benchmark": "demo", "mcq_per_clip": 1, "max_new_tokens": 4, "concurrency": 1},
}
ENCODER: dict[str, Any] = {"batch_size": 4, "pool_min": 1, "pool_max": 1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder per test session for what every tiny run reuses (the tiny LLM, the demo's audio)."""
    path = tmp_path_factory.getbasetemp() / "e2e-shared"
    path.mkdir(exist_ok=True)
    return path


def write_config(tmp_path_factory: pytest.TempPathFactory, name: str, serve_port: int | None = None) -> Path:
    """configs/demo.yaml scaled down (OVERRIDES), every path absolute under the session's tmp; returns it.

    The run dir is passed with --run-dir; `storage.run_dir` points under tmp too (nothing lands in runs/)."""
    from ralm.config import load_config
    from ralm.llm.models import make_tiny_llm

    shared = shared_dir(tmp_path_factory)
    tiny = make_tiny_llm(shared / "tiny-llm")  # reuses a finished folder
    data = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    data = _merge(data, OVERRIDES)
    whisper = data["features"]["encoders"][0]
    assert whisper["model"] == "whisper-tiny.en-ct2", "configs/demo.yaml: the first encoder is not Whisper tiny.en"
    data["features"]["encoders"] = [_merge(whisper, ENCODER)]
    data = _merge(data, {
        "storage": {"run_dir": str(shared / f"{name}-default-run")},
        "corpus": {"recipes": [{"name": "demo", "limit": CORPUS_LIMIT}],
                   "assets_dir": str(shared / "demo-assets")},
        "llm": {"model": tiny, "serve": {"port": serve_port or free_port(), "app_name": f"ralm-{name}"}},
    })
    path = tmp_path_factory.mktemp(f"cfg-{name}") / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    load_config(path)  # a schema error shows here, not as a failed subprocess
    return path


# ---------------------------------------------------------------------------------------------- subprocess
@dataclass
class Driver:
    """One `ralm run` in its own session (process group), with its own Ray temp dir and an env marker
    that every process it starts (Ray's GCS, raylet, workers, Serve replicas) inherits."""

    proc: subprocess.Popen
    log: Path
    marker: str
    ray_tmp: str
    started: float = field(default_factory=time.time)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, n: int = 6000) -> str:
        return self.output()[-n:]

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"`ralm run` still running after {timeout:.0f} s; log tail:\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL the driver's whole process group (the driver and the local Ray it started)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)


def start_run(config: Path, run_dir: Path, log: Path, *extra: str) -> Driver:
    marker = uuid.uuid4().hex
    ray_tmp = tempfile.mkdtemp(prefix="re", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, RALM_E2E_MARKER=marker, PYTHONPATH=str(ROOT),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)  # a local Ray of its own, never someone else's cluster
    cmd = [sys.executable, "-m", "ralm.cli", "run", "--config", str(config), "--run-dir", str(run_dir),
           *extra]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
    return Driver(proc, log, marker, ray_tmp)


def marked_processes(marker: str) -> dict[int, str]:
    """Live processes whose environment holds RALM_E2E_MARKER=marker: pid -> command line."""
    needle = f"RALM_E2E_MARKER={marker}".encode()
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                found[int(pid)] = f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
        except OSError:  # gone meanwhile, or a zombie
            continue
    return found


def assert_no_stray_ray(driver: Driver, grace_s: float = 60.0) -> None:
    """Every process the run started is gone within `grace_s`; stragglers are killed, then the test fails."""
    deadline = time.time() + grace_s
    left = marked_processes(driver.marker)
    while left and time.time() < deadline:
        time.sleep(1)
        left = marked_processes(driver.marker)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"processes of the run outlived it by {grace_s:.0f} s: {left}"
    shutil.rmtree(driver.ray_tmp, ignore_errors=True)  # Ray's session logs: kept only when something was left


def run_to_completion(config: Path, run_dir: Path, log: Path, timeout: float = 900) -> Driver:
    driver = start_run(config, run_dir, log)
    rc = driver.wait(timeout)
    assert rc == 0, f"`ralm run` exited {rc}; log tail:\n{driver.tail()}"
    assert_no_stray_ray(driver)
    return driver


def wait_for(driver: Driver, condition: Any, what: str, timeout: float = 900, poll_s: float = 0.05) -> None:
    """Poll `condition()` until true; fails if the driver exits first or the deadline passes."""
    deadline = time.time() + timeout
    while not condition():
        if driver.proc.poll() is not None:
            pytest.fail(f"`ralm run` exited ({driver.proc.returncode}) before {what}; "
                        f"log tail:\n{driver.tail()}")
        if time.time() > deadline:
            driver.kill()
            pytest.fail(f"no {what} after {timeout:.0f} s; log tail:\n{driver.tail()}")
        time.sleep(poll_s)


# ---------------------------------------------------------------------------------------------- run dirs
def parts(stage_dir: Path, sub: str = "data") -> list[Path]:
    return sorted((stage_dir / sub).glob("part-*.parquet"))


def snapshot(path: Path) -> dict[str, tuple[str, int]]:
    """Every file under `path`: relative name -> (sha256, mtime_ns)."""
    out = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        out[str(f.relative_to(path))] = (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns)
    return out


def assert_complete(run_dir: Path) -> None:
    for stage in STAGES:
        assert (run_dir / stage / "_SUCCESS").is_file(), f"{stage} has no _SUCCESS in {run_dir}"
    assert (run_dir / "report.md").is_file()
