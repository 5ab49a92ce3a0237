"""The text stages' exactly-once batch loop with several parts in flight."""

from __future__ import annotations

import threading

import pytest

from ralm import records
from ralm.selfgen.stage import run_batches


def _rows(n: int) -> list[dict]:
    return [records.make_record(id=f"r{i:03d}", clip_id=f"c{i:03d}", source="t", split="train") for i in range(n)]


def test_parts_in_flight_overlap_and_commit_every_row_once(tmp_path):
    second_started = threading.Event()
    overlapped: list[bool] = []

    def process(batch: list[dict]) -> tuple[list[dict], list[dict]]:
        if batch[0]["id"] == "r000":
            # The first part only finishes once the second has started: proof that they overlap.
            overlapped.append(second_started.wait(timeout=20))
        elif batch[0]["id"] == "r004":
            second_started.set()
        keep = [r for r in batch if not r["id"].endswith("7")]
        bad = [records.reject(r["id"], "t", "odd", "ends in 7") for r in batch if r["id"].endswith("7")]
        return keep, bad

    uri = str(tmp_path / "stage")
    counts = run_batches(uri, iter(_rows(22)), process, part_rows=4, total=22, parts_in_flight=2)
    assert overlapped == [True]
    assert counts == {"rows": 20, "rejects": 2, "batches": 6, "inputs": 22}
    ids = records.read_ids(records.data_uri(uri))
    assert sorted(ids) == sorted(f"r{i:03d}" for i in range(22) if i % 10 != 7) and len(set(ids)) == len(ids)
    assert sorted(r["id"] for r in records.read_rejects(uri)) == ["r007", "r017"]


def test_a_failing_part_does_not_commit_and_raises(tmp_path):
    def process(batch: list[dict]) -> tuple[list[dict], list[dict]]:
        if batch[0]["id"] == "r004":
            raise RuntimeError("replica exploded")
        return batch, []

    uri = str(tmp_path / "stage")
    with pytest.raises(RuntimeError, match="replica exploded"):
        run_batches(uri, iter(_rows(12)), process, part_rows=4, parts_in_flight=2)
    ids = set(records.read_ids(records.data_uri(uri)))
    assert not ids & {"r004", "r005", "r006", "r007"}  # the failed part left nothing behind
