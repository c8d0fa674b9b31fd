"""The ledger (``manifests.ledger``) and the run records (``manifests.run_record``), without Ray or models: result
files written by hand in the layout the actors write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from manifests import storage
from manifests.io import write_results
from manifests.ledger import (
    compact,
    done_row_ids,
    ledger_counts,
    ledger_records,
    part_uri,
    read_files,
    read_ledger,
    result_files,
)
from manifests.run_record import (
    AttemptRecord,
    RunFormatError,
    RunRecord,
    differences,
    next_attempt_id,
    read_run,
    write_attempt,
    write_run,
)
from manifests.schema import ResultRow


def result(row_id: str, status: str = "ok", attempt: str = "0001", at: str = "2026-12-01T10:00:00.000000+00:00",
           images: int = 1) -> ResultRow:
    if status == "error":
        return ResultRow(row_id=row_id, status="error", error="boom", attempt_id=attempt, finished_at=at)
    return ResultRow(row_id=row_id, status="ok", images=[f"images/{row_id}/{k}.png" for k in range(images)],
                     attempt_id=attempt, finished_at=at)


def write(out: str, attempt: str, results: list[ResultRow], generation: int = 0) -> None:
    if attempt:
        write_attempt(out, AttemptRecord(attempt_id=attempt, generation=generation))
    write_results(results, part_uri(out, attempt, [r.row_id for r in results]))


@pytest.fixture(params=["local", "memory"])
def out(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "run")
    import uuid

    return f"memory://ledger-{uuid.uuid4().hex[:8]}"


def test_the_latest_finished_attempt_wins_never_the_file_name(out):
    # attempt 0002 finished later than 0001 for row a; for row b, 0001's result is the later one
    write(out, "0002", [result("a", "ok", "0002", "2026-12-01T11:00:00.000001+00:00"),
                        result("b", "error", "0002", "2026-12-01T09:00:00.000000+00:00")])
    write(out, "0001", [result("a", "error", "0001", "2026-12-01T11:00:00.000000+00:00"),
                        result("b", "ok", "0001", "2026-12-01T10:00:00.000000+00:00")])
    # same finished_at: the higher attempt id wins
    write(out, "0003", [result("c", "error", "0003", "2026-12-01T12:00:00.000000+00:00")])
    write(out, "0004", [result("c", "ok", "0004", "2026-12-01T12:00:00.000000+00:00")])
    final = {r["row_id"]: (r["status"], r["attempt_id"]) for r in read_ledger(out).to_pylist()}
    assert final == {"a": ("ok", "0002"), "b": ("ok", "0001"), "c": ("ok", "0004")}
    assert ledger_counts(out) == dict(rows=3, ok=3, error=0, images=3, gate_passed=0, gate_failed=0)
    assert done_row_ids(out).to_pylist() == ["a", "b", "c"]


def test_image_keys_resolve_under_where_the_run_is_now(out):
    write(out, "0001", [result("a", images=2)])
    (record,) = ledger_records(out)
    assert record["images"] == [storage.join(out, "images", "a", "0.png"), storage.join(out, "images", "a", "1.png")]
    # results of older versions stored absolute URIs: left as they are
    write(out, "", [ResultRow(row_id="old", status="ok", images=["/elsewhere/old/0.png"],
                              finished_at="2026-01-01T00:00:00+00:00")])
    assert {r["row_id"]: r["images"] for r in ledger_records(out)}["old"] == ["/elsewhere/old/0.png"]


def test_retry_errors_leaves_error_rows_out_of_the_done_ids(out):
    write(out, "0001", [result("a"), result("b", "error")])
    assert done_row_ids(out).to_pylist() == ["a", "b"]
    assert done_row_ids(out, retry_errors=True).to_pylist() == ["a"]


def test_only_the_current_generation_counts(out):
    write(out, "0001", [result("a"), result("b")], generation=0)
    write(out, "0002", [result("a", at="2026-12-02T00:00:00.000000+00:00", attempt="0002")], generation=1)
    write_run(out, RunRecord(output=out, settings={}, generation=1, attempts=["0001", "0002"]))
    assert [r["row_id"] for r in ledger_records(out)] == ["a"]
    assert [r["row_id"] for r in ledger_records(out, generation=0)] == ["a", "b"]
    assert len(result_files(out, generation=0)) == 1


def test_compaction_merges_parts_and_keeps_every_result(out):
    rows = [result(f"r{i}") for i in range(10)]
    write_attempt(out, AttemptRecord(attempt_id="0001"))
    for i in range(0, 10, 2):
        write_results(rows[i:i + 2], part_uri(out, "0001", [r.row_id for r in rows[i:i + 2]]))
    before = read_ledger(out).to_pylist()
    assert len(result_files(out)) == 5
    stale = Path(out) / "results" / "0001" / "part-killed.parquet.tmp-0123"  # a local writer killed mid-write
    if "://" not in out:
        stale.write_bytes(b"PAR1 half a file")
    assert compact(out, "0001", rows_per_file=4) == 5
    assert not stale.exists(), "the finished attempt's folder keeps no half-written file"
    files = result_files(out)
    assert len(files) == 3 and all(f.rsplit("/", 1)[-1].startswith("merged-") for f in files)
    assert read_ledger(out).to_pylist() == before
    assert compact(out, "0001", rows_per_file=4) == 3  # merged files merge again into fewer: still one result a row
    assert read_ledger(out).to_pylist() == before
    assert read_files(result_files(out)).num_rows == 10


def test_results_of_older_versions_still_read(tmp_path):
    """Files directly under results/ (a Worker used directly, versions before attempts) are attempt ""."""
    out = str(tmp_path)
    write(out, "", [ResultRow(row_id="x", status="ok", images=["images/x/0.png"])])
    write(out, "0001", [result("y")])
    assert [r["attempt_id"] for r in read_ledger(out).to_pylist()] == ["", "0001"]


# ---- run records ------------------------------------------------------------------------------------------------
def test_differences_name_each_key_with_both_values():
    assert differences({"preset": "tiny", "gate": None, "same": 1}, {"preset": "sdxl", "gate": {"a": 1}, "same": 1}) \
        == ['gate: None in the run, {"a": 1} now', "preset: 'tiny' in the run, 'sdxl' now"]
    assert differences({"a": 1}, {"a": 1}) == []


def test_attempt_ids_count_up_from_the_records(tmp_path):
    out = str(tmp_path)
    assert next_attempt_id(out) == "0001"
    write_attempt(out, AttemptRecord(attempt_id="0001"))
    write_attempt(out, AttemptRecord(attempt_id="0009"))
    assert next_attempt_id(out) == "0010"


def test_run_json_of_an_older_version_is_refused_by_name(tmp_path):
    out = str(tmp_path)
    assert read_run(out) is None
    storage.write_bytes_atomic(storage.join(out, "run.json"), json.dumps({"read": 3, "configuration": {}}).encode())
    with pytest.raises(RunFormatError, match="run.json was written by an older version.*new --output"):
        read_run(out)
    storage.write_bytes_atomic(storage.join(out, "run.json"), b"{not json")
    with pytest.raises(RunFormatError, match="run.json is not valid JSON"):
        read_run(out)
    record = RunRecord(output=out, settings={"preset": "tiny"}, attempts=["0001"])
    write_run(out, record)
    assert read_run(out) == record


# ---- the validation stage of the pipeline, without Ray -----------------------------------------------------------
def test_batch_validation_skips_done_rows_rejects_duplicates_and_numbers_rejections(tmp_path):
    from pathlib import Path

    import numpy as np
    import pyarrow as pa

    from batch.pipeline import ROW_HASH, BatchValidator, RowIndex, combine_rejections
    from manifests.validation import Checks
    from manifests.io import MANIFEST_SCHEMA, read_manifest

    example = Path(__file__).resolve().parents[1] / "manifests" / "examples" / "example.parquet"
    rows, _ = read_manifest(str(example))
    records = [r.model_dump() for r in rows[:5]]
    records[3] = {**records[0]}  # row 3 repeats row 0's id
    records[4] = {**records[4], "prompt": "  "}  # row 4 is invalid
    hashes = np.array([91, 17, 55, 3, 40], dtype=np.uint64)  # any distinct values: the tests' row hashes
    table = pa.Table.from_pylist(records, schema=MANIFEST_SCHEMA).append_column(ROW_HASH, pa.array(hashes))
    order = np.argsort(hashes)
    index = RowIndex(read=5, duplicates={3: (records[0]["row_id"], 0)}, hashes=hashes[order], numbers=order)
    out = str(tmp_path / "run")
    validator = BatchValidator(str(example), out, "0001", str(example.parent / "loras"), Checks(), index.duplicates,
                               pa.array([records[1]["row_id"]]))  # row 1 is done
    accepted = validator(table)
    assert sorted(accepted["row_id"].to_pylist()) == sorted([records[0]["row_id"], records[2]["row_id"]])
    assert accepted.schema == MANIFEST_SCHEMA
    relations = [r or "" for r in accepted["relation"].to_pylist()]
    assert relations == sorted(relations)  # sorted by relation within the batch
    rejected = combine_rejections(out, "0001", index).to_pylist()
    assert [(r["index"], r["field"]) for r in rejected] == [(3, "row_id"), (4, "prompt")]
    assert rejected[0]["reason"] == "duplicate row_id (first at row 0)"
    # a batch validated twice (a retried task) writes the same file: still one rejection per row
    validator(table)
    assert len(combine_rejections(out, "0001", index)) == 2



def test_the_first_rows_of_a_big_ledger_are_read_whole_and_alone(out):
    """A report of a huge run reads the keys of every result, then whole rows for the first N row ids only."""
    write(out, "0001", [result(f"r{i}", images=2) for i in range(0, 10, 2)])
    write(out, "0002", [result(f"r{i}", at="2026-12-02T00:00:00.000000+00:00", attempt="0002") for i in range(10)])
    every = ledger_records(out)
    first = ledger_records(out, limit=4)
    assert first == every[:4] and [r["row_id"] for r in first] == ["r0", "r1", "r2", "r3"]
    assert {r["attempt_id"] for r in first} == {"0002"}  # the latest result, not the first file's
