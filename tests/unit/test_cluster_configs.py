"""The cluster/ and jobs/ files parse, and everything they name exists and agrees with the package."""

import importlib
import os
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from ralm.config import load_config

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
PINS = dict(re.match(r"([A-Za-z0-9_.\-\[\],]+)==(.+)", d).groups() for d in PYPROJECT["project"]["dependencies"]
            if "==" in d)
RAY_VERSION = PINS["ray[data,serve,train]"]
IMAGE = f"ghcr.io/ralm-project/ralm:{VERSION}-gpu"
KUBERAY = sorted((ROOT / "cluster" / "kuberay").glob("*.yaml"))


def _walk(node, key):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)


def _check_entrypoint(cmd: str) -> None:
    args = shlex.split(cmd)
    assert args[0] == "python" and (ROOT / args[1]).is_file(), cmd
    assert "--config" in args
    load_config(ROOT / args[args.index("--config") + 1])


def test_all_kinds_present():
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in KUBERAY}
    assert kinds == {"RayCluster", "RayJob", "RayService"}


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_consistent(path):
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    images = list(_walk(doc, "image"))
    assert images and set(images) == {IMAGE}
    assert set(_walk(doc, "rayVersion")) == {RAY_VERSION}
    assert all(v is True for v in _walk(doc, "enableInTreeAutoscaling"))
    groups = [g for gs in _walk(doc, "workerGroupSpecs") for g in gs]
    assert groups
    for g in groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, f"{g['groupName']} is a GPU group"
    heads = list(_walk(doc, "headGroupSpec"))
    assert heads and all(h["rayStartParams"]["num-cpus"] == "0" for h in heads)
    for entry in _walk(doc, "entrypoint"):
        _check_entrypoint(entry)
    for serve_cfg in _walk(doc, "serveConfigV2"):
        for app in yaml.safe_load(serve_cfg)["applications"]:
            module, attr = app["import_path"].split(":")
            assert callable(getattr(importlib.import_module(module), attr)), app["import_path"]
            load_config(ROOT / app["args"]["config"])


def test_launcher_config():
    doc = yaml.safe_load((ROOT / "cluster" / "launcher" / "aws.yaml").read_text())
    assert doc["docker"]["image"] == IMAGE
    assert doc["head_node_type"] in doc["available_node_types"]
    gpu_types = [n for n in doc["available_node_types"] if n != doc["head_node_type"]]
    assert len(gpu_types) >= 2
    for name in gpu_types:
        t = doc["available_node_types"][name]
        assert 0 <= t["min_workers"] <= t["max_workers"] <= doc["max_workers"]
    assert any("--dashboard-host=127.0.0.1" in c for c in doc["head_start_ray_commands"])


def test_dockerfile_matches_pins():
    text = (ROOT / "cluster" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{RAY_VERSION}-py311-gpu" in text
    assert IMAGE.split(":")[1] in text
    for path in re.findall(r"^COPY --chown=\S+ (.+) \./", text, re.M):
        for item in path.split():
            assert (ROOT / item).exists(), item


def test_runtime_envs():
    for name in ("runtime_env.yaml", "runtime_env.gpu.yaml"):
        env = yaml.safe_load((ROOT / "jobs" / name).read_text())
        assert (ROOT / "jobs" / env["working_dir"]).resolve() == ROOT
        assert ".venv/" in env["excludes"]
    gpu = yaml.safe_load((ROOT / "jobs" / "runtime_env.gpu.yaml").read_text())
    for req in gpu["pip"]["packages"]:
        name, version = req.split("==")
        if name == "vllm":
            assert f"vllm=={version}" in PYPROJECT["project"]["optional-dependencies"]["gpu"]
        else:
            assert PINS[name] == version, name
    assert (ROOT / "jobs" / "entrypoint.py").is_file()


def test_paper_preset_validates():
    cfg = load_config("alarm-4b")
    assert cfg.llm.model == "Qwen/Qwen3-4B-Thinking-2507" and cfg.train.fusion == "crossattention"
    names = [e.name for e in cfg.features.encoders]
    assert names == ["whisper", "w2v-bert", "sslam", "muq"]
    assert cfg.features.encoders[0].layers == [7, 15, 23, 31]
    t = cfg.train
    assert (t.lr, t.warmup_steps, t.grad_clip, t.epochs, t.precision, t.max_length) == (1e-4, 1500, 1.0, 2, "bf16", 4096)
    assert t.num_workers * t.batch_size * t.grad_accum == 64
    assert cfg.storage.run_dir.startswith("s3://") and cfg.generation.sampling.max_new_tokens == 512


def test_job_entrypoint_names_a_python_without_the_stack(tmp_path):
    """A cluster started outside the set-up environment runs the job with a `python` lacking ralm's stack:
    the entrypoint says so in one line (which python, what to do) instead of a traceback."""
    import subprocess
    import sys

    blocker = tmp_path / "pyarrow"  # a package that fails to import stands in for a missing dependency
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError(\"No module named 'pyarrow'\")\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "entrypoint.py"), "--help"], capture_output=True,
                         text=True, env=env, cwd=tmp_path)
    assert out.returncode == 1
    assert "cannot import ralm's dependencies" in out.stderr and sys.executable in out.stderr
    assert "Traceback" not in out.stderr
    ok = subprocess.run([sys.executable, str(ROOT / "jobs" / "entrypoint.py"), "--help"], capture_output=True,
                        text=True, cwd=tmp_path)
    assert ok.returncode == 0 and "usage" in ok.stdout
