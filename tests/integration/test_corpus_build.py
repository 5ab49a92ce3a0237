"""The corpus stage on a real local Ray over every recipe layout, with bad files planted in each."""

import collections
import json
import os

import pyarrow.parquet as pq
import pytest

from ralm import records
from ralm.config import load_config
from ralm.corpus import build
from tests import fixture_trees

pytestmark = pytest.mark.usefixtures("ray_local")


# Each recipe's options, where it needs some: the `table` recipe is declared whole in the config (LJSpeech here).
OPTIONS = {
    "table": "{manifest: metadata.csv, delimiter: '|', columns: [id, text, norm], quotes: false, "
             "audio: 'wavs/{id}.wav', transcript: norm, domain: speech}",
    "folder": "{domain: sound}",
}
TREES = {"librispeech": "librispeech", "esc50": "esc50", "captions": "captions", "manifest": "manifest",
         "commonvoice": "commonvoice", "table": "ljspeech", "folder": "folder"}


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("trees")
    return {name: str(getattr(fixture_trees, tree)(base / name)) for name, tree in TREES.items()}


def _cfg(trees, run_dir):
    recipes = ", ".join(f"{{name: {n}, root: {r}, options: {OPTIONS.get(n, '{}')}}}" for n, r in trees.items())
    return load_config("demo", [f"corpus.recipes=[{recipes}]", "corpus.test_fraction=0.3",
                                f"storage.run_dir={run_dir}", "corpus.part_rows=3"])


def test_build_rejects_bad_inputs_and_finishes(trees, tmp_path):
    cfg = _cfg(trees, tmp_path / "run")
    uri = build.run(cfg, str(tmp_path / "run"), progress=False)
    rows = records.read_records(records.data_uri(uri))
    rejects = records.read_rejects(uri)
    by_source = collections.Counter(r["source"] for r in rows)
    assert by_source == {"librispeech": 3, "esc50": 3, "captions": 2, "manifest": 2, "commonvoice": 3, "table": 2,
                         "folder": 3}
    reasons = collections.Counter((r["source"], r["reason"]) for r in rejects)
    for src in trees:
        # Each layout: one corrupt, one empty, one all-zero file and one malformed row, each with a reason
        # (a folder has no rows to be malformed).
        assert reasons[(src, "corrupt")] == 1, (src, reasons)
        assert reasons[(src, "empty")] == 1
        assert reasons[(src, "silent")] == 1
        assert reasons[(src, "malformed_row")] == (src != "folder")
    assert all(r["detail"] for r in rejects)
    by_id = {r["source"]: r for r in rows}
    assert by_id["esc50"]["surrogate"].startswith("[00:00-00:02] (duration: 2s, label: ")
    multi = next(r for r in rows if r["split"] == "test" and r["source"] == "manifest")
    assert "[00:00-00:01, the first speaker] Hi. [00:01-00:02, the second speaker] Hey." in multi["surrogate"]
    assert all(r["prompts"] for r in rows) and all(r["split"] in ("train", "valid", "test") for r in rows)
    assert records.is_complete(uri)
    report = build.summarize(uri)
    assert report["records"] == 18 and report["rejects"] == 27
    # Common Voice: mp3s decoded, dev.tsv is the valid split, the voice's gender a fact of the surrogate.
    cv = {r["metadata"]["transcript"]: r for r in rows if r["source"] == "commonvoice"}
    assert cv['He said "yes 1.']["split"] == "valid" and cv['He said "yes 0.']["split"] == "train"
    assert "gender: male" in cv['He said "yes 0.']["surrogate"] and abs(cv['He said "yes 0.']["duration_s"] - 1.5) < 0.1
    folder = {r["metadata"].get("label"): r for r in rows if r["source"] == "folder"}
    assert folder["rain"]["split"] == "test" and "label: dog bark" in folder["dog bark"]["surrogate"]
    assert folder[None]["metadata"]["transcript"] == "a spoken note" and "a spoken note" in folder[None]["surrogate"]


def test_same_config_gives_same_ids_and_resume_skips_done_work(trees, tmp_path):
    a = build.run(_cfg(trees, tmp_path / "a"), str(tmp_path / "a"), progress=False)
    b_dir = tmp_path / "b"
    b = build.run(_cfg(trees, b_dir), str(b_dir), progress=False)
    ids_a = records.read_ids(records.data_uri(a))
    assert ids_a == records.read_ids(records.data_uri(b))
    # Simulate a crash that lost the last data part and the success marker: a rerun redoes only that part.
    parts = records.part_uris(records.data_uri(b))
    last = parts[-1]
    lost = set(pq.read_table(last, columns=["id"]).column("id").to_pylist())
    os.remove(last)
    records.clear_success(b)
    kept_parts = set(records.part_uris(records.data_uri(b)))
    build.run(_cfg(trees, b_dir), str(b_dir), progress=False)
    new_parts = set(records.part_uris(records.data_uri(b))) - kept_parts
    redone = set().union(*(set(pq.read_table(p, columns=["id"]).column("id").to_pylist()) for p in new_parts))
    assert redone == lost
    table = records.read_table(records.data_uri(b), ["id"])
    assert table.num_rows == len(ids_a) and set(table.column("id").to_pylist()) == ids_a


def test_local_ray_workers_run_the_log_setup_hook(ray_local):
    """Local workers get ralm's setup hook: Ray Train's placement-group cleaner, which cannot reach the
    state API without the dashboard, no longer warns once a second; other loggers keep their level."""
    import logging

    import ray

    @ray.remote(num_cpus=0.1)
    def levels() -> tuple[int, int]:
        cleaner = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
        return logging.getLogger(cleaner).getEffectiveLevel(), logging.getLogger("ray.train").getEffectiveLevel()

    cleaner, train = ray.get(levels.remote())
    assert cleaner == logging.ERROR
    assert train < logging.ERROR
    # and the local Ray skips background work a laptop has no use for (env read by Ray at start)
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert os.environ["RAY_enable_metrics_collection"] == "0"


def test_recipes_read_a_dataset_on_s3_as_on_disk(trees, tmp_path, s3_bucket, s3_server):
    """The same trees copied to an S3 bucket: manifests, folders and audio read through s3fs by the Ray
    tasks give the same clip ids (ids hash the path below the root), records and rejects."""
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    remote = {}
    for name in ("librispeech", "commonvoice", "table", "folder"):  # `**` globs, fixed names, a walk
        fs.put(trees[name], f"{s3_bucket[5:]}/data/{name}", recursive=True)
        remote[name] = f"{s3_bucket}/data/{name}"
    local = {n: trees[n] for n in remote}

    def build_from(roots, run):
        cfg = _cfg(roots, tmp_path / run)
        cfg.storage.s3_endpoint_url = s3_server
        uri = build.run(cfg, str(tmp_path / run), progress=False)
        rows = {r["id"]: r for r in records.read_records(records.data_uri(uri))}
        return rows, sorted((r["id"], r["reason"]) for r in records.read_rejects(uri))

    rows_disk, rejects_disk = build_from(local, "disk")
    rows_s3, rejects_s3 = build_from(remote, "s3")
    assert sorted(rows_s3) == sorted(rows_disk) and len(rows_s3) == 11
    assert rejects_s3 == rejects_disk and len(rejects_s3) == 15
    for cid, row in rows_s3.items():
        assert row["audio_uri"].startswith(f"{s3_bucket}/data/")
        assert {k: row[k] for k in ("surrogate", "split", "duration_s", "metadata")} == \
            {k: rows_disk[cid][k] for k in ("surrogate", "split", "duration_s", "metadata")}


def test_a_store_that_is_down_fails_the_stage_rejects_nothing_and_a_rerun_resumes(tmp_path, s3_bucket, s3_server):
    import s3fs

    fixture_trees._tone(tmp_path / "up.wav")
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}).put(str(tmp_path / "up.wav"),
                                                                       f"{s3_bucket[5:]}/audio/up.wav")
    root = tmp_path / "data"
    fixture_trees._tone(root / "local.wav", freq=300)
    rows = [{"audio": f"{s3_bucket}/audio/up.wav", "domain": "sound"}, {"audio": "local.wav", "domain": "sound"}]
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"

    def cfg(endpoint):
        return load_config("demo", [f"corpus.recipes=[{{name: manifest, root: {root}}}]", f"storage.run_dir={run}",
                                    f"storage.s3_endpoint_url={endpoint}"])

    with pytest.raises(Exception, match=f"cannot read {s3_bucket}/audio/up.wav: EndpointConnectionError"):
        build.run(cfg("http://127.0.0.1:9"), str(run), progress=False)  # the store's endpoint is wrong
    assert not records.read_rejects(str(run / "corpus")) and not records.is_complete(str(run / "corpus"))
    uri = build.run(cfg(s3_server), str(run), progress=False)
    got = sorted(r["audio_uri"] for r in records.read_records(records.data_uri(uri)))
    assert got == sorted([f"{s3_bucket}/audio/up.wav", str(root / "local.wav")]) and not records.read_rejects(uri)


def test_a_corpus_with_no_clips_stops_and_says_why(tmp_path):
    """A recipe that finds nothing (wrong extensions) or whose every clip is rejected (a wrong audio pattern)
    stops the corpus stage with the reason, instead of a finished empty corpus that the next stage trips on."""
    tree = fixture_trees.esc50(tmp_path / "esc50")
    specs = [f"{{name: folder, root: {tree}, options: {{domain: sound, extensions: [opus]}}}}",
             f"{{name: esc50, root: {tree}, options: {{audio: 'wavs/{{filename}}'}}}}"]
    run = tmp_path / "run"
    cfg = load_config("demo", [f"corpus.recipes=[{', '.join(specs)}]", f"storage.run_dir={run}"])
    with pytest.raises(ValueError, match="the corpus has no clips") as err:
        build.run(cfg, str(run), progress=False)
    message = str(err.value)
    assert f"recipe folder at {tree} found nothing" in message
    assert "6 rejected as missing, e.g. " in message and "wavs/1-0-A-0.wav does not exist" in message
    assert not records.is_complete(str(run / "corpus"))
