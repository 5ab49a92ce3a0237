"""The corpus stage on a real local Ray over every recipe layout, with bad files planted in each."""

import collections
import os

import pyarrow.parquet as pq
import pytest

from ralm import records
from ralm.config import load_config
from ralm.corpus import build
from tests import fixture_trees

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("trees")
    return {name: str(getattr(fixture_trees, name)(base / name))
            for name in ("librispeech", "esc50", "captions", "manifest")}


def _cfg(trees, run_dir):
    recipes = ", ".join(f"{{name: {n}, root: {r}}}" for n, r in trees.items())
    return load_config("demo", [f"corpus.recipes=[{recipes}]", "corpus.test_fraction=0.3",
                                f"storage.run_dir={run_dir}", "corpus.part_rows=3"])


def test_build_rejects_bad_inputs_and_finishes(trees, tmp_path):
    cfg = _cfg(trees, tmp_path / "run")
    uri = build.run(cfg, str(tmp_path / "run"), progress=False)
    rows = records.read_records(records.data_uri(uri))
    rejects = records.read_rejects(uri)
    by_source = collections.Counter(r["source"] for r in rows)
    assert by_source == {"librispeech": 3, "esc50": 3, "captions": 2, "manifest": 2}
    reasons = collections.Counter((r["source"], r["reason"]) for r in rejects)
    for src in trees:
        # Each layout: one corrupt, one empty, one all-zero file and one malformed row, each with a reason.
        assert reasons[(src, "corrupt")] == 1, (src, reasons)
        assert reasons[(src, "empty")] == 1
        assert reasons[(src, "silent")] == 1
        assert reasons[(src, "malformed_row")] == 1
    assert all(r["detail"] for r in rejects)
    by_id = {r["source"]: r for r in rows}
    assert by_id["esc50"]["surrogate"].startswith("[00:00-00:02] (duration: 2s, label: ")
    multi = next(r for r in rows if r["split"] == "test" and r["source"] == "manifest")
    assert "[00:00-00:01, the first speaker] Hi. [00:01-00:02, the second speaker] Hey." in multi["surrogate"]
    assert all(r["prompts"] for r in rows) and all(r["split"] in ("train", "test") for r in rows)
    assert records.is_complete(uri)
    report = build.summarize(uri)
    assert report["records"] == 10 and report["rejects"] == 16


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
