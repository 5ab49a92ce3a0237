"""Datasets as Parquet parts on S3 (s3fs against a real local S3 server)."""

from ralm import records, storage


def test_parts_on_s3_roundtrip_and_resume(s3_bucket):
    stage = f"{s3_bucket}/run/corpus"
    with records.PartWriter(records.data_uri(stage), part_rows=2) as w:
        for i in range(3):
            w.add(records.make_record(id=f"c{i}", domain="music", metadata={"key": "C major"}))
    records.write_part(records.rejects_uri(stage), [records.reject("bad", "corpus", "empty", "0 bytes")],
                       records.REJECT_SCHEMA)
    assert len(records.part_uris(records.data_uri(stage))) == 2
    assert all(u.startswith("s3://") for u in records.part_uris(records.data_uri(stage)))
    rows = records.read_records(records.data_uri(stage))
    assert [r["id"] for r in rows] == ["c0", "c1", "c2"] and rows[2]["metadata"] == {"key": "C major"}
    assert records.done_ids(stage) == {"c0", "c1", "c2", "bad"}
    records.mark_success(stage)
    assert records.is_complete(stage)
    storage.write_json(f"{stage}/report.json", {"records": 3})
    assert storage.read_json(f"{stage}/report.json") == {"records": 3}
