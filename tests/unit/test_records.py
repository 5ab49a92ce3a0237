import pyarrow as pa
import pytest

from ralm import records


def test_clip_id_is_stable_and_segment_sensitive():
    a = records.clip_id("librispeech", "19/198/19-198-0001.flac")
    assert a == records.clip_id("librispeech", "19/198/19-198-0001.flac")
    assert a != records.clip_id("librispeech", "19/198/19-198-0001.flac", offset_s=30.0, duration_s=30.0)
    assert a != records.clip_id("esc50", "19/198/19-198-0001.flac")
    assert len(a) == 20


def test_make_record_rejects_unknown_fields():
    rec = records.make_record(id="x", domain="speech", metadata={"gender": "male"})
    assert rec["clip_id"] == "x" and rec["response"] is None
    with pytest.raises(KeyError):
        records.make_record(id="x", colour="red")


def test_parts_roundtrip_done_ids_and_rejects(tmp_path):
    stage = str(tmp_path / "stage")
    with records.PartWriter(records.data_uri(stage), part_rows=2) as w:
        for i in range(5):
            w.add(records.make_record(id=f"c{i}", domain="sound", metadata={"label": f"l{i}"}, prompts=["p"]))
    assert len(records.part_uris(records.data_uri(stage))) == 3
    records.write_part(records.rejects_uri(stage), [records.reject("bad", "corpus", "corrupt", "x")],
                       records.REJECT_SCHEMA)
    rows = records.read_records(records.data_uri(stage))
    assert [r["id"] for r in rows] == [f"c{i}" for i in range(5)]
    assert rows[3]["metadata"] == {"label": "l3"} and rows[0]["prompts"] == ["p"]
    assert records.done_ids(stage) == {"c0", "c1", "c2", "c3", "c4", "bad"}
    assert records.read_table(records.data_uri(stage)).schema.equals(records.RECORD_SCHEMA, check_metadata=False)
    assert not records.is_complete(stage)
    records.mark_success(stage, {"n": 5})
    assert records.is_complete(stage)


def test_writer_keeps_committed_rows_on_error(tmp_path):
    d = str(tmp_path / "d")
    with pytest.raises(RuntimeError), records.PartWriter(d, part_rows=10) as w:
        w.add(records.make_record(id="a"))
        raise RuntimeError("boom")
    assert records.read_ids(d) == {"a"}


def test_empty_dataset_reads_as_empty_table(tmp_path):
    t = records.read_table(str(tmp_path / "nothing"))
    assert isinstance(t, pa.Table) and t.num_rows == 0
    assert records.done_ids(str(tmp_path / "nothing")) == set()
