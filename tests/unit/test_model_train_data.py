"""Training data plumbing (no Ray): shard dealing, joins, bucketing, schedule, target source."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from ralm import records
from ralm.train import data as D
from ralm.train.loop import warmup_cosine
from ralm.train.toy import make_toy_run, toy_config


@pytest.mark.parametrize("n_shards,world", [(7, 2), (2, 3), (1, 2), (4, 4)])
def test_each_sample_dealt_to_exactly_one_worker(n_shards: int, world: int):
    shards = [f"s{i}" for i in range(n_shards)]
    per_sample = {}  # (shard, position) -> workers that read it
    for epoch in (0, 1):
        per_sample.clear()
        for rank in range(world):
            plan = D.plan_epoch(shards, rank, world, seed=0, epoch=epoch)
            index = -1
            for s in plan.shards:
                for pos in range(5):
                    index += 1
                    if index % plan.stride == plan.offset:
                        per_sample.setdefault((s, pos), []).append(rank)
        assert len(per_sample) == n_shards * 5
        assert all(len(r) == 1 for r in per_sample.values())
    assert D.plan_epoch(shards, 0, world, 0, 0) == D.plan_epoch(shards, 0, world, 0, 0)  # deterministic


def _ex(i: int, length: int) -> D.Example:
    return D.Example(f"id{i}", "c", {}, [], [], length)


def test_bucketing_covers_everything_once_with_less_padding():
    rng = np.random.default_rng(0)
    exs = [_ex(i, int(rng.integers(10, 200))) for i in range(103)]
    batches = list(D.bucket_batches(exs, batch_size=8, buffer_batches=4, seed=1))
    assert sorted(e.id for b in batches for e in b) == sorted(e.id for e in exs)
    bucketed, naive = D.PaddingMeter(), D.PaddingMeter()
    for b in batches:
        bucketed.add([e.length for e in b])
    for i in range(0, len(exs), 8):
        naive.add([e.length for e in exs[i: i + 8]])
    assert bucketed.percent < naive.percent / 2
    again = list(D.bucket_batches(exs, batch_size=8, buffer_batches=4, seed=1))
    assert [[e.id for e in b] for b in again] == [[e.id for e in b] for b in batches]


def test_warmup_cosine_schedule():
    f = warmup_cosine(total_steps=10, warmup=2)
    assert f(0) == 0.5 and f(1) == 1.0
    assert math.isclose(f(6), 0.5, abs_tol=1e-9) and f(10) == pytest.approx(0.0)
    assert all(f(i) >= f(i + 1) for i in range(1, 10))


def test_shards_join_targets_and_fall_back_to_generate(tmp_path: Path):
    from ralm.llm.models import make_tiny_llm
    from ralm.model.alm import ALM

    llm = make_tiny_llm(str(tmp_path / "llm"))
    run_dir = str(tmp_path / "run")
    info = make_toy_run(run_dir, llm, n_train=6, n_test=2, shard_clips=4)
    cfg = toy_config(run_dir, llm)
    shards = D.shard_uris(cfg, run_dir, "train")
    assert len(shards) == 2 and all("shard-train-" in s for s in shards)
    targets = D.load_targets(cfg, run_dir, "train")
    assert set(targets) == {c["clip_id"] for c in info["clips"] if c["split"] == "train"}
    assert D.count_samples(shards, targets) == 6
    alm = ALM.build(llm, D.read_encoders(cfg, run_dir), adapter_hidden=16)
    exs = list(D.iter_examples(D.Plan(shards), targets, alm.encode_text, alm.audio_token_count,
                               len(alm.layout.prefix_ids), max_length=256))
    assert sorted(e.id for e in exs) == sorted(info["train_ids"])
    batch = D.collate(exs[:3])
    assert batch["features"]["enc_a"].shape[:2] == (3, 2)
    assert batch["feature_lens"]["enc_a"].tolist() == [e.features["enc_a"].shape[1] for e in exs[:3]]
    # Too-long samples: targets are truncated, never the audio.
    stats: dict[str, int] = {}
    short = list(D.iter_examples(D.Plan(shards), targets, alm.encode_text, alm.audio_token_count,
                                 len(alm.layout.prefix_ids), max_length=40, stats=stats))
    assert all(e.length <= 40 for e in short) and stats

    # Without rephrase data, `auto` takes the generate stage's responses.
    rows = records.read_records(records.data_uri(f"{run_dir}/rephrase"))
    records.write_part(f"{run_dir}/generate/data", [{**r, "response": "GEN " + r["response"]} for r in rows])
    shutil.rmtree(f"{run_dir}/rephrase")
    assert D.target_source(cfg, run_dir) == (f"{run_dir}/generate", "response")
    assert next(iter(D.load_targets(cfg, run_dir).values()))[0].target.startswith("GEN ")
    with pytest.raises(FileNotFoundError, match="no targets"):
        D.load_targets(toy_config(run_dir, llm, targets="rephrase"), run_dir)
