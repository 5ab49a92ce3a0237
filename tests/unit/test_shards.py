"""WebDataset shard writer/readers: round trip, deterministic bytes, rolling size, index, atomicity."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest

from ralm.features import shards as sh


def _features(i: int, frames: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(i)
    return {"whisper": rng.standard_normal((2, frames, 16)).astype(np.float32),
            "crepe": rng.standard_normal((1, frames, 8)).astype(np.float32)}


def _write(dir_, target_mb=64.0, n=5, index_dir=None):
    with sh.ShardWriter(str(dir_), "train", target_mb=target_mb, dtype="float16", index_dir=index_dir) as w:
        for i in range(n):
            w.write(f"clip{i:03d}", 0.02 * (i + 1), _features(i, i + 1))
    return w


def test_round_trip_and_sample_layout(tmp_path):
    w = _write(tmp_path / "a")
    uris = w.close()
    assert [u.rsplit("/", 1)[-1] for u in uris] == ["shard-train-000000.tar"]
    with tarfile.open(uris[0]) as t:
        names = t.getnames()
        assert all(m.mtime == 0 and m.uid == 0 and m.mode == 0o644 for m in t.getmembers())
    assert names[:3] == ["clip000.json", "clip000.crepe.npy", "clip000.whisper.npy"]  # one key, adjacent
    samples = list(sh.iter_shard(uris[0]))
    assert [s["clip_id"] for s in samples] == [f"clip{i:03d}" for i in range(5)]
    for i, s in enumerate(samples):
        for name, arr in _features(i, i + 1).items():
            assert s["features"][name].dtype == np.float16
            np.testing.assert_array_equal(s["features"][name], arr.astype(np.float16))
        assert s["split"] == "train" and s["duration_s"] == pytest.approx(0.02 * (i + 1))
        assert s["encoders"]["whisper"]["layers"] == [0, 1] and s["encoders"]["whisper"]["width"] == 16


def test_same_input_same_bytes(tmp_path):
    a = _write(tmp_path / "a").close()
    b = _write(tmp_path / "b").close()
    assert open(a[0], "rb").read() == open(b[0], "rb").read()


def test_rolls_over_at_target_size_and_writes_index(tmp_path):
    w = _write(tmp_path / "s", target_mb=150 / 2**20, n=6, index_dir=str(tmp_path / "idx"))
    uris = w.close()
    assert len(uris) > 1 and all(u.endswith(".tar") for u in uris)
    assert sorted(sh.list_shards(str(tmp_path / "s"))) == sorted(uris)
    assert sh.list_shards(str(tmp_path / "s"), split="test") == []
    from ralm import records

    index = records.read_table(str(tmp_path / "idx"), schema=sh.INDEX_SCHEMA).to_pylist()
    assert sorted(r["clip_id"] for r in index) == [f"clip{i:03d}" for i in range(6)]
    # offsets + bytes let a reader seek straight to a sample
    row = next(r for r in index if r["clip_id"] == "clip004")
    with open(row["shard"], "rb") as f:
        f.seek(row["offset"])
        blob = f.read(row["bytes"])
    with tarfile.open(fileobj=__import__("io").BytesIO(blob + b"\0" * 1024)) as t:
        assert t.getnames()[0] == "clip004.json"
    assert dict(row["frames"]) == {"crepe": 5, "whisper": 5}


def test_failed_writer_publishes_nothing_and_bad_keys_are_refused(tmp_path):
    with pytest.raises(RuntimeError), sh.ShardWriter(str(tmp_path), "train") as w:
        w.write("c1", 1.0, _features(0, 3))
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []  # neither a shard nor a temp file is left
    with pytest.raises(ValueError, match="must not contain"):
        sh.ShardWriter(str(tmp_path), "train").write("a.b", 1.0, _features(0, 3))
    with pytest.raises(ValueError, match="dtype"):
        sh.ShardFile(str(tmp_path / "x.tar"), "bfloat16")


def test_webdataset_library_reads_our_shards(tmp_path):
    import webdataset as wds

    uris = _write(tmp_path / "w").close()
    got = list(wds.WebDataset(uris, shardshuffle=False).decode())
    assert [g["__key__"] for g in got] == [f"clip{i:03d}" for i in range(5)]
    for i, g in enumerate(got):
        np.testing.assert_array_equal(g["whisper.npy"], _features(i, i + 1)["whisper"].astype(np.float16))
        assert g["json"]["clip_id"] == f"clip{i:03d}"


def test_storage_math_and_shard_plan_are_pure_functions():
    import pyarrow as pa

    from ralm.encoders import EncoderInfo
    from ralm.features import pipeline, plan

    whisper = EncoderInfo("whisper", "whisper-large-v3", [7, 15, 23, 31], 1280, 50.0, 16000, 30.0)
    m = pipeline.storage_math([whisper], "float16", hours=19000)
    assert m["bytes_per_audio_hour"] == 50 * 3600 * 4 * 1280 * 2  # 1.84 GB per audio-hour
    assert m["projected_bytes"] == m["bytes_per_audio_hour"] * 19000
    assert plan.shard_of("abc", 7) == plan.shard_of("abc", 7) == int(
        __import__("hashlib").sha1(b"abc").hexdigest()[:12], 16) % 7
    table = pa.table({"clip_id": ["a", "b", "c", "d"], "split": ["train", "train", "valid", "train"],
                      "source": ["s"] * 4, "audio_uri": ["u"] * 4, "offset_s": [0.0] * 4, "duration_s": [1.0] * 4})
    n = {"train": 2}
    out = plan.assign_shards(table, n, skip_shards={("train", plan.shard_of("a", 2))}, skip_ids={"d"})
    kept = set(out.column("clip_id").to_pylist())
    assert "a" not in kept and "c" not in kept and "d" not in kept  # finished shard, other split, rejected
    assert kept <= {"b"} and out.column("shard").to_pylist() == [plan.shard_of(c, 2) for c in kept]
    no_clip_id = table.append_column("id", pa.array(["r1", "r2", "r3", "r4"])).set_column(
        0, "clip_id", pa.array(["a", None, None, "d"], pa.string()))
    out = plan.assign_shards(no_clip_id, {"train": 1, "valid": 1}, set(), set())
    assert out.column("clip_id").to_pylist() == ["a", "r2", "r3", "d"]  # a row without a clip id is its own clip


@pytest.mark.parametrize("chunk_rows", [3, 10**6])  # spilled runs + k-way merge, and one in-memory chunk
def test_work_list_is_sorted_by_shard_once_per_clip(tmp_path, chunk_rows):
    from ralm import records
    from ralm.features import plan

    rng = np.random.default_rng(1)
    ids = [f"clip{int(i):03d}" for i in rng.integers(0, 40, size=60)]  # duplicates on purpose
    splits = ["test" if int(c[4:]) % 5 == 0 else "train" for c in ids]
    corpus = records.data_uri(str(tmp_path / "corpus"))
    with records.PartWriter(corpus, part_rows=7) as w:
        w.extend(records.make_record(id=f"r{k}", clip_id=c, source="t", split=s, audio_uri=f"/a/{c}.wav",
                                     offset_s=0.0, duration_s=1.0, sample_rate=16000)
                 for k, (c, s) in enumerate(zip(ids, splits, strict=True)))
    n_shards = {"train": 3, "test": 2}
    done = {("train", plan.shard_of("clip001", 3))}
    parts, n = plan.write_work_list(corpus, str(tmp_path / "work"), n_shards, done, {"clip002"},
                                    chunk_rows=chunk_rows, part_rows=5)
    rows = [r for t in records.iter_tables(str(tmp_path / "work")) for r in t.to_pylist()]
    expected = sorted({(s, plan.shard_of(c, n_shards[s]), c) for c, s in zip(ids, splits, strict=True)
                       if c != "clip002" and (s, plan.shard_of(c, n_shards[s])) not in done})
    assert [(r["split"], r["shard"], r["clip_id"]) for r in rows] == expected and n == len(expected)
    assert all(r["audio_uri"] == f"/a/{r['clip_id']}.wav" for r in rows) and len(parts) == -(-n // 5)
    # A second plan replaces the first list (never appends to it).
    parts2, n2 = plan.write_work_list(corpus, str(tmp_path / "work"), n_shards, done, {"clip002"},
                                      chunk_rows=chunk_rows, part_rows=5)
    assert n2 == n and len(records.part_uris(str(tmp_path / "work"))) == len(parts2) == len(parts)
