"""The Ray paths on a CUDA GPU (skipped without one): the features stage's encoder actors on a GPU through
Ray Data, and adapter training through Ray Train + DeepSpeed bf16 over NCCL.

The CPU suite runs both stages end to end (test_features.py, test_train.py); these check what only a GPU
cluster runs: actors that ask for a fraction of a GPU (`features.encoders[].num_gpus`) and the encoder
they build on it, and Ray Train's GPU workers (`train.use_gpu`) with the bf16 engine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from ralm import records, storage

pytestmark = [pytest.mark.gpu, pytest.mark.ray]


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.fixtures.random_whisper import make_random_whisper

    return make_random_whisper(tmp_path_factory.mktemp("whisper") / "tiny-random")


def _corpus(root: Path, n: int = 10) -> tuple[str, dict[str, np.ndarray]]:
    """`n` noise clips of 0.5-4 s at 16 kHz plus one corrupt file; returns the run dir and the clips."""
    rng = np.random.default_rng(0)
    (root / "audio").mkdir(parents=True)
    rows, clips = [], {}
    for i in range(n):
        cid, secs = f"clip{i:02d}", float(rng.uniform(0.5, 4.0))
        wav = (0.1 * rng.standard_normal(int(secs * 16000))).astype(np.float32)
        sf.write(str(root / "audio" / f"{cid}.wav"), wav, 16000)
        clips[cid] = wav
        rows.append(records.make_record(id=cid, clip_id=cid, source="gpu", split="train", domain="sound",
                                        audio_uri=str(root / "audio" / f"{cid}.wav"), offset_s=0.0,
                                        duration_s=len(wav) / 16000, sample_rate=16000))
    (root / "audio" / "bad.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" * 10)
    rows.append(records.make_record(id="bad", clip_id="bad", source="gpu", split="train", domain="sound",
                                    audio_uri=str(root / "audio" / "bad.wav"), offset_s=0.0, duration_s=1.0,
                                    sample_rate=16000))
    run_dir = str(root / "run")
    with records.PartWriter(records.data_uri(f"{run_dir}/corpus"), part_rows=4) as w:
        w.extend(rows)
    return run_dir, clips


@pytest.mark.parametrize("window", ["30s", "clip"])
def test_features_stage_encodes_on_the_gpu_in_fractional_gpu_actors(ray_local, whisper_dir, tmp_path, window):
    import ray

    from ralm.config import EncoderSpec, RalmConfig
    from ralm.encoders import build_encoder
    from ralm.features import pipeline
    from ralm.features import shards as sh

    if ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the local Ray sees no GPU")
    run_dir, clips = _corpus(tmp_path)
    # Two actors share the one GPU (0.5 each); fp16, as the paper preset encodes.
    spec = {"name": "whisper", "model": whisper_dir, "layers": [2, 4], "batch_size": 4, "pool_min": 2,
            "pool_max": 2, "num_gpus": 0.5, "options": {"dtype": "float16", "window": window}}
    cfg = RalmConfig.model_validate({"features": {"encoders": [spec], "decode_batch_size": 4},
                                     "shards": {"target_mb": 0.2}})
    stage = pipeline.run(cfg, run_dir)

    assert records.is_complete(stage)
    got = {s["clip_id"]: s for u in sh.list_shards(stage) for s in sh.iter_shard(u)}
    assert set(got) == set(clips)
    assert [(r["id"], r["reason"]) for r in records.read_rejects(stage)] == [("bad", "corrupt")]
    # Bit-identical to the same encoder run on the GPU in this process (on a GPU a clip's features do not
    # depend on its batch), and close to the CPU float32 encoder: the actors really encoded on the GPU.
    gpu = build_encoder(EncoderSpec(**spec))
    cpu = build_encoder(EncoderSpec(**{**spec, "num_gpus": 0.0, "options": {"window": window}}))
    assert gpu.device.type == "cuda" and cpu.device.type == "cpu"
    for cid in ("clip00", "clip05", "clip09"):
        feats = got[cid]["features"]["whisper"]
        want = gpu.encode([clips[cid]])[0]
        assert feats.dtype == np.float16 and feats.shape == want.shape
        np.testing.assert_array_equal(feats, want.astype(np.float16))
        ref = cpu.encode([clips[cid]])[0]
        err = np.abs(feats.astype(np.float32) - ref).max() / np.abs(ref).max()
        assert err < 2e-2, (cid, err)


def test_ray_train_deepspeed_bf16_on_gpu_workers(ray_local, tmp_path):
    import ray
    from safetensors.torch import load_file

    from ralm.train import trainer
    from ralm.train.toy import make_toy_llm, make_toy_run, toy_config

    if ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the local Ray sees no GPU")
    llm = make_toy_llm(str(tmp_path / "llm"))
    run_dir = str(tmp_path / "run")
    make_toy_run(run_dir, llm, n_train=24, shard_clips=4)
    cfg = toy_config(run_dir, llm, num_workers=1, use_gpu=True, precision="bf16", batch_size=4, max_steps=None,
                     epochs=4, checkpoint_every=6, lr=1e-2)
    stage = trainer.run(cfg, run_dir)

    report = storage.read_json(f"{stage}/report.json")
    assert report["device"].startswith("cuda:0"), report["device"]
    assert report["precision"] == "bf16" and report["num_workers"] == 1
    assert report["steps"] == report["planned_steps"] == 24 and report["samples_seen"] == 96
    assert report["final_loss_avg5"] < report["first_loss"] - 0.05, report["loss_curve"]
    assert list((Path(stage) / "ray").glob("checkpoint-step*"))
    # The export is the adapter alone, in full precision for any device to load.
    weights = load_file(f"{stage}/export/adapter.safetensors")
    assert weights and not any("llm" in k or "embed_tokens" in k for k in weights)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())
