"""A tiny, learnable, fully offline training set-up for tests and `bench/train.py`.

Builds a run dir with what the train stage reads: a tiny random LLM, `features/encoders.json`, WebDataset
feature shards (via `ralm.features.shards.ShardWriter`) and `rephrase/data` targets. Each clip belongs to
one of a few classes whose pattern is written into its features; the target names the class, so an
adapter that listens to the audio can drive the loss down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ralm import records, storage

CLASSES = ("a dog barking", "a church bell", "heavy rain")
PROMPT = "What do you hear in this recording?"


def make_toy_llm(out_dir: str, scale: float = 3.0, seed: int = 0) -> str:
    """`ralm.llm.models.make_tiny_llm` with its (tied) embeddings scaled up.

    A random tiny LLM's logits are nearly flat (embedding std 0.02 after an RMS norm), so no input can move
    its loss far from ln(vocab); scaled embeddings give it a learnable output range. Still frozen in training.
    """
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ralm.llm.models import make_tiny_llm

    out = Path(out_dir)
    if (out / ".ralm-complete").exists():
        return str(out)
    base = make_tiny_llm(str(out) + "-base", seed=seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(scale)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    (out / ".ralm-complete").write_text(json.dumps({"model": "toy-llama", "scale": scale}))
    return str(out)


def toy_encoders(two: bool = False) -> list[dict[str, Any]]:
    encs = [{"name": "enc_a", "model": "toy", "layers": [1, 2], "width": 16, "frame_rate": 50.0,
             "sample_rate": 16000}]
    if two:
        encs.append({"name": "enc_b", "model": "toy", "layers": [3], "width": 8, "frame_rate": 100.0,
                     "sample_rate": 16000})
    return encs


def toy_features(label: int, frames: int, encoders: list[dict[str, Any]], rng: np.random.Generator
                 ) -> dict[str, np.ndarray]:
    out = {}
    for e in encoders:
        n = max(2, int(round(frames * e["frame_rate"] / 50.0)))
        x = rng.normal(0, 0.5, (len(e["layers"]), n, e["width"])).astype(np.float32)
        x[:, :, label % e["width"]] += 2.0  # the class is audible in every frame
        out[e["name"]] = x.astype(np.float16)
    return out


def make_toy_run(run_dir: str, llm_dir: str, n_train: int = 24, n_test: int = 4, shard_clips: int = 4,
                 two_encoders: bool = False, seed: int = 0, min_frames: int = 16, max_frames: int = 48,
                 long_answers: bool = False, encoders: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write the toy inputs under `run_dir`; returns {"clips", "train_ids", "encoders"}."""
    from ralm.features.shards import ShardWriter

    rng = np.random.default_rng(seed)
    encs = encoders or toy_encoders(two_encoders)
    feat_uri = storage.join(run_dir, "features")
    storage.makedirs(feat_uri)
    storage.write_json(storage.join(feat_uri, "encoders.json"), {"encoders": encs})
    rows, train_ids, clips = [], [], []
    for split, n in (("train", n_train), ("test", n_test)):
        with ShardWriter(storage.join(feat_uri, "shards"), split, target_mb=1e-9, dtype="float16",
                         encoders={e["name"]: e for e in encs}, index_dir=storage.join(feat_uri, "data")) as w:
            # target_mb ~0: every clip closes its shard; group `shard_clips` clips per shard instead.
            w.target = 10**12
            for i in range(n):
                clip = f"{split}{i:04d}"
                label = int(rng.integers(len(CLASSES)))
                frames = int(rng.integers(min_frames, max_frames + 1))
                w.write(clip, frames / 50.0, toy_features(label, frames, encs, rng))
                if (i + 1) % shard_clips == 0:
                    w._finish()
                answer = f"I hear {CLASSES[label]}."
                if long_answers:
                    answer = f"<think>The sound is {CLASSES[label]}.</think> I hear {CLASSES[label]}, clearly."
                rid = f"{clip}/p0"
                rows.append(records.make_record(id=rid, clip_id=clip, split=split, domain="sound", prompt=PROMPT,
                                                response=answer, rephrased=answer))
                clips.append({"clip_id": clip, "label": label, "split": split})
                if split == "train":
                    train_ids.append(rid)
    records.write_part(storage.join(run_dir, "rephrase", "data"), rows)
    return {"clips": clips, "train_ids": train_ids, "encoders": encs, "llm_dir": str(Path(llm_dir))}


def toy_config(run_dir: str, llm_dir: str, **train: Any) -> Any:
    from ralm.config import validate

    defaults = {"adapter_hidden": 32, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "max_steps": 12,
                "checkpoint_every": 4, "log_every": 2, "num_workers": 2, "torch_threads": 1,
                "cpus_per_worker": 1, "bucket_batches": 2, "max_length": 256}
    defaults.update(train)
    return validate({"storage": {"run_dir": run_dir}, "llm": {"model": llm_dir}, "train": defaults})
