"""`ralm features` on a real local Ray: a tiny corpus (sines, noise, a corrupt file) -> shards, local and S3."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ralm import records, storage
from ralm.config import RalmConfig
from ralm.features import pipeline
from ralm.features import shards as sh

pytestmark = pytest.mark.ray

ENCODERS = [
    {"name": "whisper", "model": "whisper-tiny.en-ct2", "layers": [2, 4], "batch_size": 4, "pool_max": 2},
    {"name": "crepe", "model": "crepe-tiny", "layers": [5], "batch_size": 4, "pool_max": 1},
]


def _corpus(root: Path) -> str:
    """Seven clips (16 kHz and 22.05 kHz, stereo, noise, a segment of a longer file) + one corrupt file."""
    rng = np.random.default_rng(0)
    audio = root / "audio"
    audio.mkdir(parents=True)
    rows = []
    specs = [("tone440", 16000, 1.0, "train"), ("tone880", 22050, 1.5, "train"), ("noise", 16000, 0.8, "train"),
             ("chirp", 16000, 2.0, "test"), ("stereo", 16000, 1.2, "train"), ("tone220", 16000, 0.6, "test")]
    for name, sr, secs, split in specs:
        t = np.arange(int(sr * secs)) / sr
        wav = 0.3 * np.sin(2 * np.pi * {"tone440": 440, "tone880": 880, "tone220": 220}.get(name, 330) * t)
        if name == "noise":
            wav = 0.2 * rng.uniform(-1, 1, len(t))
        if name == "chirp":
            wav = 0.3 * np.sin(2 * np.pi * (200 + 400 * t) * t)
        if name == "stereo":
            wav = np.stack([wav, 0.5 * wav], axis=1)
        sf.write(str(audio / f"{name}.wav"), wav.astype(np.float32), sr)
        rows.append(records.make_record(id=name, clip_id=name, source="test", split=split, domain="sound",
                                        audio_uri=str(audio / f"{name}.wav"), offset_s=0.0, duration_s=secs,
                                        sample_rate=sr))
    # a 1 s segment at 0.5 s inside tone440.wav
    rows.append(records.make_record(id="segment", clip_id="segment", source="test", split="train", domain="sound",
                                    audio_uri=str(audio / "tone440.wav"), offset_s=0.5, duration_s=0.5,
                                    sample_rate=16000))
    (audio / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" * 10)
    rows.append(records.make_record(id="corrupt", clip_id="corrupt", source="test", split="train", domain="sound",
                                    audio_uri=str(audio / "corrupt.wav"), offset_s=0.0, duration_s=1.0,
                                    sample_rate=16000))
    run_dir = str(root / "run")
    with records.PartWriter(records.data_uri(f"{run_dir}/corpus"), part_rows=4) as w:
        w.extend(rows)
    return run_dir


def _cfg(**shards) -> RalmConfig:
    return RalmConfig.model_validate({
        "features": {"encoders": ENCODERS, "decode_batch_size": 4},
        "shards": {"target_mb": 0.12, **shards},
    })


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, ray_local):
    run_dir = _corpus(tmp_path_factory.mktemp("feat"))
    stage = pipeline.run(_cfg(), run_dir)
    return run_dir, stage


def _bytes(uris):
    return {u.rsplit("/", 1)[-1]: storage.read_bytes(u) for u in uris}


def test_shards_index_report_and_reject(local_run):
    run_dir, stage = local_run
    assert stage == f"{run_dir}/features" and records.is_complete(stage)
    uris = sh.list_shards(stage)
    assert len(uris) >= 2 and {u.rsplit("/", 1)[-1].split("-")[1] for u in uris} == {"train", "test"}
    samples = {s["clip_id"]: s for u in uris for s in sh.iter_shard(u)}
    assert set(samples) == {"tone440", "tone880", "noise", "chirp", "stereo", "tone220", "segment"}
    rejects = records.read_rejects(stage)
    assert [(r["id"], r["reason"]) for r in rejects] == [("corrupt", "corrupt")]
    index = sh.read_index(stage).to_pylist()
    assert sorted(r["clip_id"] for r in index) == sorted(samples)
    assert all(r["shard"] in uris and r["bytes"] > 0 for r in index)
    s = samples["tone880"]
    assert s["split"] == "train" and s["duration_s"] == pytest.approx(1.5, abs=1e-3)
    assert s["features"]["whisper"].shape == (2, 75, 384) and s["features"]["whisper"].dtype == np.float16
    assert s["features"]["crepe"].shape == (1, 75, 256)
    assert samples["segment"]["features"]["whisper"].shape == (2, 25, 384)
    encs = sh.read_encoders(stage)
    assert [(e["name"], e["width"], e["frame_rate"], e["sample_rate"]) for e in encs] == [
        ("whisper", 384, 50.0, 16000), ("crepe", 256, 50.0, 16000)]
    report = storage.read_json(f"{stage}/report.json")
    assert report["clips_in_shards"] == 7 and report["rejects_by_reason"] == {"corrupt": 1}
    assert report["storage"]["bytes_per_audio_hour"] == pytest.approx(3600 * 50 * (2 * 384 + 256) * 2)
    assert os.path.exists(f"{stage}/report.md")


def test_features_match_the_encoder_run_directly(local_run):
    from ralm.audio import load_audio
    from ralm.config import EncoderSpec
    from ralm.encoders import build_encoder

    run_dir, stage = local_run
    enc = build_encoder(EncoderSpec(**ENCODERS[0]))
    got = {s["clip_id"]: s for u in sh.list_shards(stage) for s in sh.iter_shard(u)}
    for cid, off, dur in [("stereo", 0.0, 1.2), ("segment", 0.5, 0.5)]:
        uri = str(Path(run_dir).parent / "audio" / f"{'tone440' if cid == 'segment' else cid}.wav")
        want = enc.encode([load_audio(uri, 16000, off, dur)])[0].astype(np.float16)
        np.testing.assert_allclose(got[cid]["features"]["whisper"].astype(np.float32), want.astype(np.float32),
                                   atol=2e-2, rtol=2e-2)


def test_both_readers_read_our_shards_exactly(local_run):
    import ray
    import webdataset as wds

    _, stage = local_run
    uris = sh.list_shards(stage)
    ours = {s["clip_id"]: s["features"] for u in uris for s in sh.iter_shard(u)}
    lib = {g["__key__"]: g for g in wds.WebDataset(uris, shardshuffle=False).decode()}
    rows = ray.data.read_webdataset(uris).take_all()
    by_ray = {r["__key__"]: r for r in rows}
    assert set(lib) == set(ours) == set(by_ray) and len(rows) == len(ours)
    for cid, feats in ours.items():
        for name, arr in feats.items():
            np.testing.assert_array_equal(lib[cid][f"{name}.npy"], arr)
            np.testing.assert_array_equal(np.asarray(by_ray[cid][f"{name}.npy"]), arr)
        assert by_ray[cid]["json"]["clip_id"] == cid


def test_rerun_skips_finished_shards_and_rewrites_the_same_bytes(local_run):
    run_dir, stage = local_run
    before = _bytes(sh.list_shards(stage))
    mtimes = {u: os.path.getmtime(u) for u in sh.list_shards(stage)}
    # nothing to do: every shard is finished
    pipeline.run(_cfg(), run_dir)
    assert storage.read_json(f"{stage}/report.json")["encoded_this_run"] == 0
    # "kill" mid-stage: one shard and its index part are gone, a stray temp file is left behind
    victim = sorted(before)[0]
    split, n = victim[len("shard-"):-len(".tar")].rsplit("-", 1)
    os.remove(f"{stage}/shards/{victim}")
    os.remove(f"{stage}/data/{sh.index_name(split, int(n))}")
    Path(f"{stage}/shards/.tmp-shard-dead.tar").write_bytes(b"partial")
    pipeline.run(_cfg(), run_dir)
    report = storage.read_json(f"{stage}/report.json")
    assert report["shards_written_this_run"] == 1 and report["shards_skipped_finished"] == len(before) - 1
    assert _bytes(sh.list_shards(stage)) == before
    assert not list(Path(f"{stage}/shards").glob(".tmp-*"))  # the killed run's temp file is cleaned up
    assert all(os.path.getmtime(u) == t for u, t in mtimes.items() if not u.endswith(victim))
    assert len(records.read_rejects(stage)) == 1  # the corrupt clip is not rejected twice
    with pytest.raises(ValueError, match="another features config"):  # never mix shards of two plans
        pipeline.run(_cfg(target_mb=0.5), run_dir)
    assert records.is_complete(stage)
    assert sorted(r["clip_id"] for r in sh.read_index(stage).to_pylist()) == sorted(
        ["tone440", "tone880", "noise", "chirp", "stereo", "tone220", "segment"])


def test_shards_to_s3_read_back_identical(local_run, s3_bucket, s3_server, tmp_path):
    run_dir, stage = local_run
    import shutil

    run2 = str(tmp_path / "run")
    shutil.copytree(f"{run_dir}/corpus", f"{run2}/corpus")
    cfg = _cfg(uri=f"{s3_bucket}/feat/shards")
    cfg.storage.s3_endpoint_url = s3_server
    pipeline.run(cfg, run2)
    remote = sh.list_shards(f"{run2}/features")
    assert remote and all(u.startswith("s3://") for u in remote)
    assert _bytes(remote) == _bytes(sh.list_shards(stage))
    got = [s["clip_id"] for u in remote for s in sh.iter_shard(u)]
    assert sorted(got) == sorted(r["clip_id"] for r in sh.read_index(stage).to_pylist())
    sh.register_webdataset_s3()
    import webdataset as wds

    assert len(list(wds.WebDataset(remote, shardshuffle=False))) == len(got)


def _assert_same_shards_on_a_copy(local_run, tmp_path, cfg: RalmConfig) -> None:
    """Run the stage with `cfg` on a copy of local_run's corpus: the same shard bytes and rejects."""
    import shutil

    run_dir, stage = local_run
    run2 = str(tmp_path / "run")
    shutil.copytree(f"{run_dir}/corpus", f"{run2}/corpus")
    pipeline.run(cfg, run2)
    assert _bytes(sh.list_shards(f"{run2}/features")) == _bytes(sh.list_shards(stage))
    assert [(r["id"], r["reason"]) for r in records.read_rejects(f"{run2}/features")] == [("corrupt", "corrupt")]


def _actor_classes() -> list[str]:
    import ray._private.state  # the GCS actor table (the state API needs the dashboard, off in tests)

    return [a["ActorClassName"] for a in ray._private.state.actors().values()]


def test_one_shared_pool_with_concurrent_batches_writes_the_same_shards(local_run, tmp_path):
    """Both encoders in one pool, one actor encoding two batches at once on two threads: the same bytes as a
    pool per encoder, and the local Ray reads the work list with one FooterReader actor, not Ray Data's 32."""
    cfg = _cfg()
    for spec in cfg.features.encoders:
        spec.pool, spec.pool_min, spec.pool_max, spec.concurrent_batches = "cpu", 1, 1, 2
    before = _actor_classes()
    _assert_same_shards_on_a_copy(local_run, tmp_path, cfg)
    new = Counter(_actor_classes()) - Counter(before)
    assert new["MapWorker(MapBatches(EncoderActor))"] == 1 and new["FooterReader"] <= 1, new


def test_decoding_in_tasks_writes_the_same_shards_as_in_the_actors(local_run, tmp_path):
    """On CPU actors the first pool decodes its rows itself (the default); decode tasks (GPU actors' way)
    give the same bytes and the same rejects."""
    cfg = _cfg()
    assert pipeline.decode_in_actor(cfg.features, pipeline.encoder_pools(cfg.features.encoders))  # local_run's way
    cfg.features.decode_in_actor = False
    _assert_same_shards_on_a_copy(local_run, tmp_path, cfg)


def test_decoding_goes_to_cpu_actors_and_stays_in_tasks_beside_gpu_actors():
    from ralm.config import FeaturesConfig

    cpu = FeaturesConfig.model_validate({"encoders": [{"name": "a", "model": "m"}, {"name": "b", "model": "m"}]})
    gpu = FeaturesConfig.model_validate({"encoders": [{"name": "a", "model": "m", "num_gpus": 0.5},
                                                      {"name": "b", "model": "m"}]})
    assert pipeline.decode_in_actor(cpu, pipeline.encoder_pools(cpu.encoders))
    assert not pipeline.decode_in_actor(gpu, pipeline.encoder_pools(gpu.encoders))
    # the first pool decides: a CPU pool ahead of a GPU one decodes for both
    assert pipeline.decode_in_actor(gpu, pipeline.encoder_pools(gpu.encoders[::-1]))
    for setting in (True, False):
        forced = cpu.model_copy(update={"decode_in_actor": setting})
        assert pipeline.decode_in_actor(forced, pipeline.encoder_pools(forced.encoders)) is setting


def test_encoder_pools_group_by_pool_name():
    from ralm.config import EncoderSpec

    specs = [EncoderSpec(name="a", model="m", batch_size=8, pool_max=3, num_cpus=1, pool="p"),
             EncoderSpec(name="b", model="m", batch_size=4, num_gpus=0.5, concurrent_batches=2, pool="p"),
             EncoderSpec(name="c", model="m", num_cpus=2)]
    pools = pipeline.encoder_pools(specs)
    assert [(p.name, [s.name for s in p.specs]) for p in pools] == [("p", ["a", "b"]), ("c", ["c"])]
    shared, alone = pools
    assert (shared.size, shared.batch_size, shared.num_cpus, shared.num_gpus, shared.concurrent_batches) == (
        (1, 3), 4, 1, 0.5, 2)
    assert shared.threads == 1 and alone.threads == 2  # the actor's CPUs over its concurrent batches


def test_decode_tasks_do_not_import_torch(tmp_path):
    """Ray's decode tasks import the pipeline module: it must not pull torch (via the encoders or a
    resampler) into every such worker (seconds of start-up and ~250 MB each); only encoder actors need it."""
    import subprocess
    import sys

    path = tmp_path / "c.wav"
    sf.write(str(path), 0.3 * np.sin(2 * np.pi * 440 * np.arange(22050) / 22050), 22050)  # needs resampling
    code = ("import sys, numpy as np; from ralm.features import pipeline;"
            f"d = pipeline.decode_batch({{'clip_id': np.array(['a']), 'audio_uri': np.array([{str(path)!r}]),"
            " 'offset_s': np.array([0.0]), 'duration_s': np.array([1.0])}, [16000]);"
            "assert d['error'][0] == '' and abs(len(d['wav_16000'][0]) - 16000) <= 1, d['detail'];"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_run_dir_on_s3(local_run, s3_bucket, s3_server):
    """The whole run dir on S3 (corpus, work list, index, shards) and the audio too: Ray workers read the
    work list and decode the clips from S3, and the shards match the local run byte for byte."""
    run_dir, stage = local_run
    remote_run = f"{s3_bucket}/run"
    rows = records.read_records(records.data_uri(f"{run_dir}/corpus"))
    for uri in {r["audio_uri"] for r in rows}:
        storage.write_bytes_atomic(f"{s3_bucket}/audio/{os.path.basename(uri)}", storage.read_bytes(uri))
    with records.PartWriter(records.data_uri(f"{remote_run}/corpus"), part_rows=4) as w:
        w.extend([r | {"audio_uri": f"{s3_bucket}/audio/{os.path.basename(r['audio_uri'])}"} for r in rows])
    cfg = _cfg()
    cfg.storage.s3_endpoint_url = s3_server
    remote_stage = pipeline.run(cfg, remote_run)
    assert remote_stage.startswith("s3://") and records.is_complete(remote_stage)
    assert _bytes(sh.list_shards(remote_stage)) == _bytes(sh.list_shards(stage))
    assert [r["id"] for r in records.read_rejects(remote_stage)] == ["corrupt"]


def test_a_store_that_is_down_stops_the_stage_and_rejects_nothing(ray_local, tmp_path, monkeypatch):
    """Clips whose store does not answer are not bad clips: the stage stops with the store's error and keeps
    no reject for them (a rerun would skip those for good)."""
    monkeypatch.delenv("RALM_S3_ENDPOINT_URL", raising=False)  # restored after the test: the dead endpoint goes

    run2 = _corpus(tmp_path)
    rows = records.read_records(records.data_uri(f"{run2}/corpus"))
    assert "tone880" in {r["id"] for r in rows}
    for part in records.part_uris(records.data_uri(f"{run2}/corpus")):
        os.remove(part)
    with records.PartWriter(records.data_uri(f"{run2}/corpus")) as w:  # one clip now lives on a store that is down
        w.extend([r | {"audio_uri": "s3://down/tone880.wav"} if r["id"] == "tone880" else r for r in rows])
    cfg = _cfg()
    cfg.storage.s3_endpoint_url = "http://127.0.0.1:9"
    with pytest.raises(storage.StorageError, match="cannot read s3://down/tone880.wav"):
        pipeline.run(cfg, run2)
    assert "tone880" not in {r["id"] for r in records.read_rejects(f"{run2}/features")}
    assert not records.is_complete(f"{run2}/features")
    storage.configure(None)
