"""One writer per run dir: a second run is refused while the first lives, and takes over once it is gone."""

import json
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ralm import lease, storage
from ralm.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _plant(run_dir: str, **fields) -> None:
    now = time.time()
    body = {"token": "theirs", "command": "run", "host": "node-7", "pid": 4242, "started": now - 600,
            "heartbeat": now, **fields}
    storage.write_bytes_atomic(storage.join(run_dir, lease.LEASE_FILE), json.dumps(body).encode())


def test_a_live_run_keeps_the_run_dir_and_a_killed_one_gives_it_up(tmp_path, caplog):
    run_dir = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from ralm.lease import run_lease\n"
        f"with run_lease({run_dir!r}, 'features'):\n    print('held', flush=True); time.sleep(600)")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(lease.RunDirBusy, match=rf"`ralm features` \(pid {holder.pid} on "):
            with lease.run_lease(run_dir, "run"):
                pass
    except BaseException:
        holder.kill()
        raise
    holder.kill()  # SIGKILL: no cleanup, the lease file stays behind; not reaped yet (a zombie)
    deadline = time.time() + 30
    while lease._alive_here(holder.pid) and time.time() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "run" / lease.LEASE_FILE).exists()
    with caplog.at_level(logging.WARNING, logger="ralm.lease"):
        with lease.run_lease(run_dir, "run"):  # same host, holder gone: no need to wait for staleness
            held = json.loads((tmp_path / "run" / lease.LEASE_FILE).read_text())
            assert held["command"] == "run" and held["host"] == socket.gethostname()
    holder.wait()
    assert f"process {holder.pid} on this host has exited" in caplog.text
    assert not (tmp_path / "run" / lease.LEASE_FILE).exists()  # released on exit


def test_another_hosts_lease_holds_until_its_heartbeat_stops(tmp_path):
    run_dir = str(tmp_path / "run")
    _plant(run_dir)
    with pytest.raises(lease.RunDirBusy, match=r"pid 4242 on node-7.*remove .*_LEASE\.json"):
        with lease.run_lease(run_dir, "run"):
            pass
    _plant(run_dir, heartbeat=time.time() - lease.STALE_AFTER_S - 5)
    with lease.run_lease(run_dir, "run"):
        assert json.loads((tmp_path / "run" / lease.LEASE_FILE).read_text())["token"] != "theirs"


def test_the_holder_renews_its_heartbeat_and_may_nest(tmp_path):
    run_dir = str(tmp_path / "run")
    path = tmp_path / "run" / lease.LEASE_FILE
    with lease.run_lease(run_dir, "run", heartbeat_s=0.05):
        first = json.loads(path.read_text())
        with lease.run_lease(run_dir, "train"):  # run_all holds it around each run_stage
            pass
        assert path.exists(), "the nested exit released the outer lease"
        deadline = time.time() + 20
        while json.loads(path.read_text())["heartbeat"] == first["heartbeat"] and time.time() < deadline:
            time.sleep(0.05)
        renewed = json.loads(path.read_text())
        assert renewed["heartbeat"] > first["heartbeat"] and renewed["token"] == first["token"]
    assert not path.exists()


def test_a_second_ralm_run_is_refused_with_who_holds_it(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _plant(str(run_dir), command="run", host="head-0", pid=77)
    rc = main(["run", "--config", "configs/demo.yaml", "--run-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "is in use by `ralm run` (pid 77 on head-0" in err
    assert not (run_dir / "corpus").exists()  # refused before any stage wrote anything


def test_the_lease_lives_on_s3_too(s3_bucket):
    run_dir = f"{s3_bucket}/runs/a"
    _plant(run_dir)
    with pytest.raises(lease.RunDirBusy):
        with lease.run_lease(run_dir, "run"):
            pass
    _plant(run_dir, heartbeat=0)
    with lease.run_lease(run_dir, "run", heartbeat_s=0.1):
        first = lease.current_lease(run_dir)
        for _ in range(40):  # reads race the heartbeat's rewrites on purpose (each one a new ETag on S3)
            renewed = lease.current_lease(run_dir)
            time.sleep(0.01)
        assert renewed["host"] == socket.gethostname() and renewed["heartbeat"] > first["heartbeat"]
    assert not storage.exists(f"{run_dir}/{lease.LEASE_FILE}")
