"""`ralm submit STAGE|run --address http://HOST:8265 --config FILE [--follow]`: run ralm as a Ray job.

The job's working dir is this checkout (configs travel with it), its runtime env comes from
`jobs/runtime_env.yaml` (or `--runtime-env FILE`), and its entrypoint is `jobs/entrypoint.py`, which is
the `ralm` CLI. The equivalent plain Ray command:

    ray job submit --address http://HOST:8265 --runtime-env jobs/runtime_env.yaml --working-dir . \\
        -- python jobs/entrypoint.py run --config configs/demo.yaml
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUNTIME_ENV = REPO_ROOT / "jobs" / "runtime_env.yaml"
ENTRYPOINT = "jobs/entrypoint.py"


def load_runtime_env(path: str | Path | None = None, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    p = Path(path) if path else DEFAULT_RUNTIME_ENV
    env = yaml.safe_load(p.read_text()) or {}
    if not isinstance(env, dict):
        raise ValueError(f"{p}: a runtime env must be a mapping")
    env.setdefault("working_dir", str(REPO_ROOT))
    wd = env["working_dir"]
    if isinstance(wd, str) and "://" not in wd and not os.path.isabs(wd):
        env["working_dir"] = str((p.parent / wd).resolve())
    env_vars = dict(env.get("env_vars") or {})
    env_vars.update(extra_env or {})
    env["env_vars"] = {k: str(v) for k, v in env_vars.items()}
    return env


def build_entrypoint(command: str, config: str, run_dir: str | None, overrides: list[str],
                     redo: str | None = None) -> str:
    args = ["python", ENTRYPOINT]  # the cluster's python (the image's), not this machine's
    args += ["corpus", "build"] if command == "corpus" else [command]
    args += ["--config", config]
    if run_dir:
        args += ["--run-dir", run_dir]
    if redo:  # `run --redo a,b`; a single stage's flag takes no value
        args += ["--redo", redo] if command == "run" else ["--redo"]
    args += overrides
    return shlex.join(args)


def auth_headers() -> dict[str, str]:
    """Ray 2.60 clusters started locally require a token; `ray.init` finds it by itself, the job client
    only when RAY_AUTH_MODE=token is set before Ray is imported. Send the user's token explicitly instead
    (unless they chose RAY_AUTH_MODE=disabled). The token itself is never printed or logged."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN")
    token_path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if not token and token_path.is_file():
        token = token_path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def job_client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address, headers=auth_headers())


def submit(command: str, address: str, config: str, run_dir: str | None = None, overrides: list[str] | None = None,
           runtime_env: str | None = None, follow: bool = False, submission_id: str | None = None,
           entrypoint_num_cpus: float | None = None, redo: str | None = None) -> tuple[str, str | None]:
    """Submit; returns (job id, final status or None when not following)."""
    from ray.job_submission import JobStatus

    client = job_client(address)
    env = load_runtime_env(runtime_env)
    cfg_path = Path(config)
    if cfg_path.exists() and cfg_path.resolve().is_relative_to(REPO_ROOT):
        config = str(cfg_path.resolve().relative_to(REPO_ROOT))  # the job sees the uploaded copy
    entrypoint = build_entrypoint(command, config, run_dir, overrides or [], redo)
    deadline = time.time() + 120
    while True:
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=env, submission_id=submission_id,
                                       entrypoint_num_cpus=entrypoint_num_cpus,
                                       metadata={"ralm_command": command, "ralm_config": config})
            break
        except RuntimeError as e:
            # A freshly started head answers before its job agent is up; that passes within seconds.
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)
    print(f"submitted job {job_id}: {entrypoint}", flush=True)
    if not follow:
        print(f"follow it with: ray job logs --address {address} --follow {job_id}")
        return job_id, None

    async def _tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(_tail())
    status = client.get_job_status(job_id)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        time.sleep(1)
        status = client.get_job_status(job_id)
    print(f"job {job_id}: {status}", flush=True)
    return job_id, str(status.value if hasattr(status, "value") else status)
