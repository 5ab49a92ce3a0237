import json

import pytest

from ralm import plan
from ralm.cli import main
from ralm.config import load_config


def test_shard_storage_is_exact_arithmetic():
    cfg = load_config("alarm-4b")
    est = plan.estimate(cfg, hours=10, instances=1000)
    # whisper-large-v3: 4 taps x 50 frames/s x 1280 wide x 2 bytes (fp16) per second of audio.
    assert est.shard_bytes_by_encoder["whisper"] == pytest.approx(4 * 50 * 1280 * 2 * 3600 * 10)
    assert est.shard_bytes_total == pytest.approx(sum(est.shard_bytes_by_encoder.values()))
    fp32 = plan.estimate(load_config("alarm-4b", ["shards.dtype=float32"]), hours=10, instances=1000)
    assert fp32.shard_bytes_total == pytest.approx(2 * est.shard_bytes_total)


def test_training_reproduces_the_paper_calibration():
    # 6.08M instances x 2 epochs with fusion on 4 GPUs took ~10.5 days in the paper.
    est = plan.estimate(load_config("alarm-4b"), hours=18900, instances=6_080_000)
    assert est.gpu_hours["train"] / 4 / 24 == pytest.approx(10.5, rel=0.01)
    single = plan.estimate(load_config("alarm-4b", ["train.fusion=sum"]), hours=18900, instances=6_080_000)
    assert single.gpu_hours["train"] / 4 / 24 == pytest.approx(7.5, rel=0.01)


def test_tokens_and_gpu_hours_scale_linearly():
    cfg = load_config("alarm-4b")
    a = plan.estimate(cfg, hours=100, instances=10_000)
    b = plan.estimate(cfg, hours=200, instances=20_000)
    assert a.tokens_generated["generate"] == 10_000 * plan.ASSUMPTIONS["generate_tokens_per_instance"][0]
    for stage in ("features", "generate", "rephrase", "train"):
        assert b.gpu_hours[stage] == pytest.approx(2 * a.gpu_hours[stage])
    no_rephrase = plan.estimate(load_config("alarm-4b", ["rephrase.enabled=false"]), hours=100, instances=10_000)
    assert no_rephrase.tokens_generated["rephrase"] == 0 and no_rephrase.gpu_hours["rephrase"] == 0


def test_invalid_sizes():
    with pytest.raises(ValueError):
        plan.estimate(load_config("demo"), hours=0, instances=10)


def test_cli_plan_json(capsys):
    assert main(["plan", "--config", "alarm-4b", "--hours", "18900", "--instances", "6080000", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total_gpu_hours"] == pytest.approx(sum(out["gpu_hours"].values()))
    assert all("source" in v for v in out["assumptions"].values())


def test_instances_default_to_the_papers_ratio_and_odd_counts_get_a_note(capsys):
    cfg = load_config("alarm-4b")
    paper = plan.estimate(cfg, hours=18900)
    assert paper.instances == pytest.approx(6_080_000, rel=0.001) and not paper.notes
    assert "instances_per_audio_hour" in paper.assumptions_used
    assert not plan.estimate(cfg, hours=18900, instances=6_080_000).notes
    # "8 instances" reads like 8 machines: the plan says what the number means instead of projecting 8 samples
    odd = plan.estimate(cfg, hours=19000, instances=8)
    assert len(odd.notes) == 1 and "not machines" in odd.notes[0]
    assert main(["plan", "--config", "alarm-4b", "--hours", "19000", "--instances", "8"]) == 0
    out = capsys.readouterr().out
    assert "note:" in out and "not machines" in out
    assert main(["plan", "--config", "alarm-4b", "--hours", "100"]) == 0
    assert "32,170 training instances" in capsys.readouterr().out
