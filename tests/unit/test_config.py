from pathlib import Path

import pytest

from ralm.config import ConfigError, apply_overrides, load_config, validate

ROOT = Path(__file__).resolve().parents[2]


def test_demo_config_loads_by_name_and_path():
    by_name = load_config("demo")
    by_path = load_config(ROOT / "configs" / "demo.yaml")
    assert by_name == by_path
    assert by_name.corpus.recipes[0].name == "demo"


def test_unknown_key_names_the_path():
    with pytest.raises(ConfigError) as e:
        validate({"train": {"learning_rate": 0.1}})
    assert "train.learning_rate: unknown key" in str(e.value)


def test_bad_value_names_path_and_expected_type():
    with pytest.raises(ConfigError) as e:
        load_config("demo", ["train.lr=fast"])
    msg = str(e.value)
    assert "train.lr" in msg and "valid number" in msg and "'fast'" in msg


def test_nested_list_error_path():
    with pytest.raises(ConfigError) as e:
        validate({"features": {"encoders": [{"name": "whisper", "model": "x", "batch_size": 0}]}})
    assert "features.encoders.0.batch_size" in str(e.value)


def test_overrides_are_typed_and_reach_lists():
    cfg = load_config("demo", ["train.lr=3e-4", "train.max_steps=7", "features.encoders.0.batch_size=2",
                               "storage.s3_endpoint_url=http://127.0.0.1:9000"])
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.max_steps == 7
    assert cfg.features.encoders[0].batch_size == 2
    assert cfg.storage.s3_endpoint_url == "http://127.0.0.1:9000"


@pytest.mark.parametrize("bad", ["novalue", "=3", "features.encoders.5.batch_size=1", "train.lr.x=1"])
def test_malformed_overrides(bad):
    with pytest.raises(ConfigError):
        load_config("demo", [bad])


def test_apply_overrides_does_not_mutate_input():
    data = {"train": {"lr": 1.0}}
    out = apply_overrides(data, ["train.lr=2"])
    assert data["train"]["lr"] == 1.0 and out["train"]["lr"] == 2


def test_invalid_yaml_and_non_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("no-such-config")


def test_autoscaling_bounds_checked():
    with pytest.raises(ConfigError, match="max_replicas"):
        validate({"llm": {"serve": {"autoscaling": {"min_replicas": 3, "max_replicas": 1}}}})


def test_alm_batches_fit_what_a_replica_is_sent():
    with pytest.raises(ConfigError, match=r"max_batch_size \(16\) > max_ongoing_requests \(8\)"):
        validate({"eval": {"serve": {"max_batch_size": 16, "max_ongoing_requests": 8}}})
    assert validate({"eval": {"serve": {"max_batch_size": 16, "max_ongoing_requests": 16}}}).eval.serve.max_batch_size == 16
    paper = load_config("alarm-4b").eval.serve
    assert paper.max_batch_size <= paper.max_ongoing_requests


def test_llm_client_capacity_is_what_the_replicas_take():
    from ralm.llm.client import capacity_gate, deployment_capacity

    fixed = validate({"llm": {"serve": {"num_replicas": 3, "max_ongoing_requests": 5}}})
    scaled = validate({"llm": {"serve": {"num_replicas": 1, "max_ongoing_requests": 4,
                                         "autoscaling": {"min_replicas": 1, "max_replicas": 6}}}})
    assert deployment_capacity(fixed) == 15 and deployment_capacity(scaled.llm) == 24  # at its largest
    assert capacity_gate(fixed) is capacity_gate(fixed.llm)  # one gate per app, shared by every caller


def test_llm_replicas_log_vllm_warnings_only_unless_asked(monkeypatch):
    from ralm.llm.serve import deployment_options

    llm = validate({}).llm
    monkeypatch.delenv("RALM_VERBOSE", raising=False)
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    env = deployment_options(llm)["ray_actor_options"]["runtime_env"]["env_vars"]
    assert env["VLLM_LOGGING_LEVEL"] == "WARNING" and env["HF_HUB_OFFLINE"] == "1"
    monkeypatch.setenv("RALM_VERBOSE", "1")
    assert deployment_options(llm)["ray_actor_options"]["runtime_env"]["env_vars"]["VLLM_LOGGING_LEVEL"] == "INFO"
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")  # a user's own setting wins
    assert deployment_options(llm)["ray_actor_options"]["runtime_env"]["env_vars"]["VLLM_LOGGING_LEVEL"] == "DEBUG"
