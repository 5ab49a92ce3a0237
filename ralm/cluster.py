"""Attach to a running Ray cluster or start a local one sized for this machine. Every stage calls `init_ray`."""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

# Environment variables that Ray workers must see (storage endpoint, thread caps, offline hubs).
_FORWARDED_ENV = ("RALM_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                  "AWS_DEFAULT_REGION", "RALM_CACHE_DIR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                  "VLLM_LOGGING_LEVEL")


def runtime_env_vars() -> dict[str, str]:
    env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    # Nothing downloads from a model hub at run time in the embedded default.
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def local_num_cpus(requested: int | None = None) -> int:
    # On a 2-core machine Ray Data deadlocks when an actor pool takes every CPU and read tasks starve
    # (stack.md gotcha 3): advertise at least 4 logical CPUs; actors use fractional CPUs anyway.
    return requested or max(4, os.cpu_count() or 1)


def init_ray(ray_cfg: Any | None = None, **overrides: Any) -> Any:
    """Return the Ray context, connecting or starting as configured. Idempotent."""
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    address = (getattr(ray_cfg, "address", None) if ray_cfg else None) or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {
        "namespace": getattr(ray_cfg, "namespace", "ralm") if ray_cfg else "ralm",
        "log_to_driver": True,
        "ignore_reinit_error": True,
    }
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        # Inside a submitted Ray job the job's runtime env already reaches every worker, and Ray refuses
        # a driver runtime env that sets the same keys: only fill in what the job did not set.
        for key, value in runtime_env_vars().items():
            os.environ.setdefault(key, value)
    else:
        kwargs["runtime_env"] = {"env_vars": runtime_env_vars()}
    if address:
        log.info("attaching to Ray at %s", address)
        ray.init(address=address, **kwargs, **overrides)
    else:
        num_cpus = local_num_cpus(getattr(ray_cfg, "num_cpus", None) if ray_cfg else None)
        obj_mb = getattr(ray_cfg, "object_store_memory_mb", None) if ray_cfg else None
        log.info("starting a local Ray with %d logical CPUs", num_cpus)
        if "runtime_env" in kwargs:  # every local worker imports ralm (same interpreter); a remote one may not
            kwargs["runtime_env"]["worker_process_setup_hook"] = "ralm.cluster.quiet_worker_logs"
        dashboard = bool(getattr(ray_cfg, "include_dashboard", False)) if ray_cfg else False
        for key, value in _local_ray_env(dashboard).items():
            os.environ.setdefault(key, value)
        running = _running_local_cluster()
        if running:
            log.warning("a Ray cluster started with `ray start` runs on this machine (%s); starting a separate "
                        "local Ray as configured (set ray.address: auto, or RAY_ADDRESS, to run on that one)",
                        running)
        ray.init(
            address="local",  # never attach by accident: Ray's default joins a `ray start` cluster it finds
            num_cpus=num_cpus,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            object_store_memory=obj_mb * 1024 * 1024 if obj_mb else None,
            **kwargs,
            **overrides,
        )
    _quiet_ray_data()
    return ray.get_runtime_context()


def _running_local_cluster() -> str | None:
    """The address Ray's own lookup would attach to (the last `ray start` on this machine), if any."""
    try:
        from ray._private.utils import read_ray_address

        return read_ray_address()
    except Exception:  # a private helper: its absence only costs the warning
        return None


def _local_ray_env(dashboard: bool) -> dict[str, str]:
    """Background work a local Ray can skip. On 2 cores every idle helper process counts: measured with
    bench/train.py, the Ray Train run went from 5.9 to 6.2 samples/s without these (plain loop: 6.9)."""
    env = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}  # watches spot-node draining; a laptop has none
    # Ray Data's read_parquet starts 32 FooterReader actors (a worker process each) to read footers over a
    # network; local files need one. Measured on 2 cores: 6-7 of them started before the read killed them,
    # ~1.4 CPU-s each, the encoder actors' start-up 5 s later.
    env["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] = "1"
    if not dashboard:
        env["RAY_enable_metrics_collection"] = "0"  # Prometheus metrics nobody reads without the dashboard
    # Idle worker processes are not free: each wakes 100 times a second to check for signals (~0.85% of a
    # core). Ray prestarts one per logical CPU when the driver connects (4 here, ~1 CPU-s each, while the
    # first stage starts) and keeps as many idle; locally, start them on demand and let an idle one go
    # after 5 s (long enough to serve the next task of a stage; measured on 2 cores: three idle workers
    # were 1% of the machine through a whole features run).
    env["RAY_prestart_worker_first_driver"] = "0"
    env["RAY_num_workers_soft_limit"] = "0"
    env["RAY_idle_worker_killing_time_threshold_ms"] = "5000"
    return env


def quiet_worker_logs() -> None:
    """Ray worker setup hook of local runs. Without the dashboard (off by default locally) Ray Train's
    placement-group cleaner cannot reach the state API and warns once a second for the whole run about
    something no user can act on; everything else keeps its level."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def _quiet_ray_data() -> None:
    # Stages show their own progress bar; Ray Data's per-operator log lines would drown it.
    if os.environ.get("RALM_VERBOSE"):
        return
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
    except Exception:  # pragma: no cover - cosmetic only
        pass


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def wait_serve_app(app_name: str, wait_s: float, what: str = "Serve app") -> None:
    """Block until a Serve application is RUNNING; a failed deploy or the deadline raises with the reason."""
    import time

    from ray import serve
    from ray.serve.schema import ApplicationStatus

    deadline = time.monotonic() + wait_s
    while True:
        st = serve.status().applications.get(app_name)
        if st is not None and st.status == ApplicationStatus.RUNNING:
            return
        if st is not None and st.status in (ApplicationStatus.DEPLOY_FAILED, ApplicationStatus.UNHEALTHY):
            raise RuntimeError(f"{what} {app_name!r} failed to start: {st.message}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} {app_name!r} not running after {wait_s:.0f} s")
        time.sleep(0.5)


def delete_serve_app(app_name: str, shutdown: bool = False) -> None:
    """Delete a Serve application (all its replicas) if it exists; `shutdown` also stops Serve itself."""
    from ray import serve

    try:
        serve.delete(app_name)
    except Exception as e:  # already gone
        log.debug("serve.delete(%s): %s", app_name, e)
    if shutdown:
        serve.shutdown()
