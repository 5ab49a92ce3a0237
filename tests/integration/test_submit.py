"""`ralm submit` against a real local cluster started with `ray start --head` on 127.0.0.1: one stage
(corpus) and the whole tiny pipeline (`ralm submit run`, tests/e2e/tiny_pipeline.py) as Ray jobs."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ralm import records
from ralm.cli import main
from tests import fixture_trees
from tests.children import die_with_parent
from tests.e2e.tiny_pipeline import STAGES, assert_complete, write_config

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head_node():
    """A separate head node (its own ports and temp dir); --block ties its life to this process. Yields
    its dashboard address and the RAY_TMPDIR under which Ray's lookup finds it (as `ray start` with no
    options is found under /tmp)."""
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    gcs, dash, agent, agent_grpc, renv, metrics = (_free_port() for _ in range(6))
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    ray_temp = os.path.join(temp, "ray")
    proc = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=4", "--include-dashboard=true",
         f"--temp-dir={ray_temp}", "--disable-usage-stats",
         # Every port explicit: other Ray clusters on this machine (tests, other users) hold the defaults.
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={renv}", f"--metrics-export-port={metrics}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        preexec_fn=die_with_parent)  # and its reaper takes the head's processes down with it
    address = f"http://127.0.0.1:{dash}"
    from ralm.submit import job_client

    deadline = time.time() + 90
    while True:
        try:
            job_client(address).list_jobs()
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("ray start --head did not come up")
            time.sleep(1)
    yield address, temp
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
    shutil.rmtree(temp, ignore_errors=True)  # the head's session logs and sockets


@pytest.fixture(scope="module")
def ray_head(ray_head_node) -> str:
    return ray_head_node[0]


_INIT = """
import json, ray
from ralm.cluster import init_ray
from ralm.config import RayConfig
init_ray(RayConfig(address={address!r}, num_cpus=2))
print(json.dumps({{"cpus": ray.cluster_resources()["CPU"], "gcs": ray.get_runtime_context().gcs_address}}))
"""


def test_a_local_run_never_attaches_to_a_ray_start_cluster_by_accident(ray_head_node):
    """Ray's default joins the last `ray start` cluster on the machine, where ralm's sizing arguments
    are refused ("When connecting to an existing cluster, num_cpus ... must not be provided"): every
    local run crashed while one was up. Unset, ralm starts its own local Ray (and says so); `auto`
    attaches."""
    import json

    _, ray_tmpdir = ray_head_node
    env = dict(os.environ, RAY_TMPDIR=ray_tmpdir, RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    address_file = Path(ray_tmpdir, "ray", "ray_current_cluster")  # `ray start` writes it once it is up
    deadline = time.time() + 60
    while not address_file.exists() and time.time() < deadline:
        time.sleep(0.5)
    head_gcs = address_file.read_text().strip()

    def init(address: str | None) -> tuple[dict, str]:
        out = subprocess.run([sys.executable, "-c", _INIT.format(address=address)], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr

    local, log = init(None)
    assert local["cpus"] == 2 and local["gcs"] != head_gcs
    assert "starting a separate local Ray" in log and head_gcs in log
    attached, _ = init("auto")
    assert attached["cpus"] == 4 and attached["gcs"] == head_gcs


def test_submit_corpus_stage_as_ray_job(ray_head, tmp_path, capsys):
    data = fixture_trees.manifest(tmp_path / "data")
    run_dir = tmp_path / "run"
    rc = main(["submit", "corpus", "--address", ray_head, "--follow", "--config", "configs/demo.yaml",
               "--run-dir", str(run_dir), f"corpus.recipes=[{{name: manifest, root: {data}}}]"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "submitted job" in out and "SUCCEEDED" in out
    uri = str(run_dir / "corpus")
    assert records.is_complete(uri)
    assert len(records.read_ids(records.data_uri(uri))) == 2
    assert {r["reason"] for r in records.read_rejects(uri)} == {"corrupt", "empty", "silent", "malformed_row"}


def test_submit_rejects_a_bad_config_before_submitting(ray_head, capsys):
    assert main(["submit", "corpus", "--address", ray_head, "train.lr=oops"]) == 2
    assert "train.lr" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(1800)  # --follow waits for the job's end: never forever
def test_submit_run_completes_the_tiny_pipeline_as_a_ray_job(ray_head, tmp_path_factory, capsys):
    """The job sees the config, the tiny LLM and the run dir by absolute paths under tmp (one machine)."""
    config = write_config(tmp_path_factory, "submit")
    run_dir = tmp_path_factory.mktemp("submit-run") / "run"
    rc = main(["submit", "run", "--address", ray_head, "--config", str(config), "--run-dir", str(run_dir),
               "--follow"])
    out = capsys.readouterr().out
    assert rc == 0, out[-6000:]
    job_id = out.split("submitted job ", 1)[1].split(":", 1)[0]
    from ray.job_submission import JobStatus

    from ralm.submit import job_client

    assert job_client(ray_head).get_job_status(job_id) == JobStatus.SUCCEEDED
    assert f"job {job_id}: SUCCEEDED" in out
    for i, stage in enumerate(STAGES, 1):
        assert f"[{i}/{len(STAGES)}] {stage}: done in" in out, stage
    assert f"run complete: {run_dir}" in out
    assert_complete(run_dir)
