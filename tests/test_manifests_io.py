"""Parquet manifests through fsspec: round trips (local, file://, memory://, a moto S3 server), whole-file errors,
per-row validation, CSV / JSONL build, results and rejections, the example manifest."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from manifests import storage
from manifests.io import (
    MANIFEST_SCHEMA,
    REJECTED_SCHEMA,
    RESULT_SCHEMA,
    ManifestError,
    check_image_file,
    image_uri,
    manifest_from_records,
    manifest_report,
    read_manifest,
    read_manifest_table,
    read_results,
    read_table,
    rows_to_table,
    table_to_rows,
    validate_records,
    validate_table,
    write_manifest,
    write_rejections,
    write_results,
    write_table,
)
from manifests.schema import GenerationRow, Rejection, ResultRow

EXAMPLES = Path(__file__).resolve().parents[1] / "manifests" / "examples"
SUBJECTS = EXAMPLES / "subjects"


def row(i: int, **overrides) -> dict:
    data = {
        "row_id": f"r{i}",
        "prompt": f"A dog is hugging a cat, take {i}.",
        "relation": "hugging",
        "subjects": [{"image": "subjects/dog.png", "phrase": "dog", "box": [0.05, 0.1, 0.5, 0.9]},
                     {"image": "subjects/cat.png", "phrase": "cat", "box": [0.5, 0.1, 0.95, 0.9]}],
        "seed": i,
        "width": 128,
        "height": 128,
        "metadata": {"i": str(i)},
    }
    data.update(overrides)
    return data


def copy_subjects(folder_uri: str) -> None:
    for name in ("dog", "cat"):
        storage.write_bytes_atomic(storage.join(folder_uri, "subjects", f"{name}.png"),
                                   (SUBJECTS / f"{name}.png").read_bytes())


def check_round_trip(folder_uri: str) -> None:
    """Manifest + subject images under ``folder_uri``: written, read back, images resolved into the same store."""
    copy_subjects(folder_uri)
    uri = storage.join(folder_uri, "manifest.parquet")
    rows = [row(i) for i in range(4)]
    write_manifest(rows, uri)
    accepted, rejected = read_manifest(uri, check_image=check_image_file, known_relations={"hugging"})
    assert rejected == []
    assert [r.row_id for r in accepted] == ["r0", "r1", "r2", "r3"]
    assert accepted[2].subjects[1].image == storage.join(folder_uri, "subjects", "cat.png")
    assert accepted[2].metadata == {"i": "2"} and accepted[2].seed == 2
    expected = [GenerationRow.model_validate(r).model_dump(exclude={"subjects"}) for r in rows]
    assert [r.model_dump(exclude={"subjects"}) for r in accepted] == expected

    results = [ResultRow(row_id="r0", status="ok", images=[image_uri(folder_uri, "r0", 0)], clip_t=[31.5]),
               ResultRow(row_id="r1", status="error", error="CUDA out of memory")]
    write_results(results, storage.join(folder_uri, "results", "part-0.parquet"))
    write_results([{"row_id": "r2", "status": "ok"}], storage.join(folder_uri, "results", "part-1.parquet"))
    table = read_results(storage.join(folder_uri, "results"))
    assert table.schema == RESULT_SCHEMA
    assert sorted(table.column("row_id").to_pylist()) == ["r0", "r1", "r2"]
    assert not [u for u in storage.list_files(storage.join(folder_uri, "results")) if not u.endswith(".parquet")]


# --------------------------------------------------------------------------------------------------- round trips

def test_round_trip_local(tmp_path):
    check_round_trip(str(tmp_path))
    assert not list(tmp_path.rglob("*.tmp-*")), "atomic writes leave no temporary files"


def test_round_trip_file_url(tmp_path):
    check_round_trip(f"file://{tmp_path}")


def test_round_trip_memory():
    check_round_trip(f"memory://manifests-{uuid.uuid4().hex}")


def test_round_trip_s3(s3_bucket):
    check_round_trip(storage.join(s3_bucket, "jobs", "one"))


def test_s3_missing_image_and_not_parquet(s3_bucket):
    folder = storage.join(s3_bucket, "jobs", "two")
    uri = storage.join(folder, "manifest.parquet")
    write_manifest([row(0)], uri)  # no subject images uploaded
    accepted, rejected = read_manifest(uri, check_image=check_image_file)
    assert accepted == [] and rejected[0].field == "subjects.0.image" and "not found" in rejected[0].reason
    bad = storage.join(folder, "bad.parquet")
    storage.write_bytes_atomic(bad, b"row_id,prompt\n1,x\n")
    with pytest.raises(ManifestError, match="not a readable Parquet file"):
        read_manifest_table(bad)


# ------------------------------------------------------------------------------------------ whole-file problems

def test_not_parquet_fails_fast_naming_the_uri(tmp_path):
    path = tmp_path / "manifest.parquet"
    path.write_text("row_id,prompt,subjects\nr0,hello,[]\n")
    with pytest.raises(ManifestError, match="not a readable Parquet file") as info:
        read_manifest(str(path))
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(str(tmp_path / "nope.parquet"))


def test_missing_and_unknown_columns_are_named_before_data_is_read(tmp_path, monkeypatch):
    path = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"row_id": ["a"], "caption": ["x"]}), path)

    def no_data(*args, **kwargs):
        raise AssertionError("the data was read before the columns were checked")

    monkeypatch.setattr(pq.ParquetFile, "read", no_data)
    with pytest.raises(ManifestError) as info:
        read_manifest_table(str(path))
    message = str(info.value)
    assert "missing required columns ['prompt', 'subjects']" in message
    assert "unknown columns ['caption']" in message and str(path) in message


def test_only_required_columns_and_nulls_mean_defaults(tmp_path):
    path = tmp_path / "m.parquet"
    subjects = [[{"image": "/x/dog.png", "phrase": "dog", "box": [0.1, 0.1, 0.9, 0.9]}]] * 2
    pq.write_table(pa.table({"row_id": ["a", "b"], "prompt": ["p", "q"], "subjects": subjects}), path)
    accepted, rejected = read_manifest(str(path))
    assert rejected == [] and [r.steps for r in accepted] == [30, 30]

    full = pa.Table.from_pylist([{"row_id": "c", "prompt": "p", "subjects": subjects[0], "seed": None,
                                  "steps": None, "guidance": None, "metadata": None, "relation": None}],
                                schema=MANIFEST_SCHEMA)
    write_table(full, str(path))
    (only,), rejected = read_manifest(str(path))
    assert rejected == [] and (only.seed, only.steps, only.guidance, only.metadata) == (0, 30, 5.0, {})


def test_a_folder_of_parquet_files_is_one_manifest(tmp_path):
    write_manifest([row(0, subjects=[{"image": "/abs/dog.png", "phrase": "dog", "box": [0, 0, 1, 1]}])],
                   str(tmp_path / "m" / "part-0.parquet"))
    write_manifest([row(1)], str(tmp_path / "m" / "part-1.parquet"))
    accepted, rejected = read_manifest(str(tmp_path / "m"))
    assert [r.row_id for r in accepted] == ["r0", "r1"] and rejected == []
    assert accepted[0].subjects[0].image == "/abs/dog.png"  # absolute paths are left alone
    assert accepted[1].subjects[0].image == str(tmp_path / "m" / "subjects" / "dog.png")


# ------------------------------------------------------------------------------------------------ row problems

def test_wrong_column_type_rejects_rows_not_the_file(tmp_path):
    subjects = [[{"image": "/x/dog.png", "phrase": "dog", "box": [0.1, 0.1, 0.9, 0.9]}]] * 2
    table = pa.table({"row_id": ["a", "b"], "prompt": ["p", "q"], "subjects": subjects, "seed": ["abc", "3"]})
    accepted, rejected = validate_table(table)
    assert accepted == [] and [r.field for r in rejected] == ["seed", "seed"]
    assert rejected[0].value == "'abc'" and "integer" in rejected[0].reason


def test_validate_table_every_row_is_accounted_for(tmp_path):
    bad_box = [{"image": "subjects/dog.png", "phrase": "dog", "box": [0.5, 0.1, 0.2, 0.9]}]
    nan_box = [{"image": "subjects/dog.png", "phrase": "dog", "box": [0.1, float("nan"), 0.2, 0.9]}]
    records = [
        row(0),
        row(1, relation="levitating"),  # unknown relation
        row(0, prompt="again"),  # duplicate of row 0
        row(3, subjects=bad_box),
        row(4, subjects=nan_box),
        row(5, prompt=""),
        row(6, seed=-1),  # (a string in an int column cannot exist in Parquet: see the test above)
        row(7, subjects=[{"image": "subjects/missing.png", "phrase": "x", "box": [0, 0, 1, 1]}]),
        row(8, subjects=[{"image": "subjects/notes.png", "phrase": "x", "box": [0, 0, 1, 1]}]),
        row(0, prompt="third"),  # duplicate again
        row(10, relation=None),
        row(11),
    ]
    copy_subjects(str(tmp_path))
    (tmp_path / "subjects" / "notes.png").write_text("not an image")
    calls = []

    def check(uri):
        calls.append(uri)
        return check_image_file(uri)

    table = pa.Table.from_pylist(records)
    accepted, rejected = validate_table(table, check_image=check, known_relations={"hugging"},
                                        base_uri=str(tmp_path))
    assert len(accepted) + len(rejected) == table.num_rows
    assert [r.row_id for r in accepted] == ["r0", "r10", "r11"]
    by_index = {r.index: r for r in rejected}
    assert by_index[1].field == "relation"
    assert by_index[1].reason == "unknown relation 'levitating': no LoRA in the registry"
    assert by_index[2].field == "row_id" and by_index[2].reason == "duplicate row_id (first at row 0)"
    assert by_index[9].reason == "duplicate row_id (first at row 0)"
    assert by_index[3].field == "subjects.0.box" and "x0 < x1" in by_index[3].reason
    assert by_index[4].field == "subjects.0.box" and "finite" in by_index[4].reason
    assert by_index[5].field == "prompt"
    assert by_index[6].field == "seed"
    assert by_index[7].field == "subjects.0.image" and "not found" in by_index[7].reason
    assert by_index[8].field == "subjects.0.image" and "not an image" in by_index[8].reason
    assert len(calls) == len(set(calls)) == 4, "check_image is called once per distinct URI"

    # a predicate works like a set
    accepted2, rejected2 = validate_table(table, known_relations=lambda r: r == "hugging")
    assert [r.index for r in rejected2 if r.field == "relation"] == [1]

    report = manifest_report(accepted, rejected)
    lines = report.splitlines()
    assert len(lines) == table.num_rows + 1
    assert "r0  OK" in lines[0] and "REJECTED relation: unknown relation 'levitating'" in lines[1]
    assert lines[-1].startswith("12 rows: 3 accepted, 9 rejected")


def test_rows_to_table_and_back():
    rows = [row(0), GenerationRow.model_validate(row(1))]
    table = rows_to_table(rows)
    assert table.schema == MANIFEST_SCHEMA and table.num_rows == 2
    assert table_to_rows(table)[1] == rows[1]
    with pytest.raises(ValueError, match=r"row 1 \(r0\): row_id: duplicate row_id \(first at row 0\)"):
        rows_to_table([row(0), row(0)])
    with pytest.raises(ValueError, match="subjects.0.box"):
        write_manifest([row(0, subjects=[{"image": "a.png", "phrase": "a", "box": [0, 0, 2, 1]}])], "memory://x.pq")


def test_rejections_and_results_files(tmp_path):
    rejections = [Rejection.of(3, "subjects.0.box", "box must lie inside [0, 1]", [0, 0, 2, 1], row_id="r3")]
    write_rejections(rejections, str(tmp_path / "rejected.parquet"))
    table = read_table(str(tmp_path / "rejected.parquet"))
    assert table.schema == REJECTED_SCHEMA
    assert table.to_pylist() == [r.model_dump() for r in rejections]

    assert read_results(str(tmp_path / "absent")).schema == RESULT_SCHEMA
    assert read_results(str(tmp_path / "absent")).num_rows == 0
    # a file from another writer (fewer columns, other int width) still concatenates
    (tmp_path / "results").mkdir()
    pq.write_table(pa.table({"row_id": ["x"], "status": ["ok"], "attempt": pa.array([2], pa.int64())}),
                   tmp_path / "results" / "other.parquet")
    write_results([ResultRow(row_id="y", status="ok")], str(tmp_path / "results" / "ours.parquet"))
    table = read_results(str(tmp_path / "results"))
    assert table.schema == RESULT_SCHEMA
    assert sorted(zip(table.column("row_id").to_pylist(), table.column("attempt").to_pylist())) == [("x", 2), ("y", 1)]


# ---------------------------------------------------------------------------------------------------- CSV / JSONL

def test_csv_with_flat_subject_columns(tmp_path):
    (tmp_path / "in.csv").write_text(
        "row_id,prompt,relation,seed,guidance,subject1_image,subject1_phrase,subject1_box,"
        "subject2_image,subject2_phrase,subject2_box,metadata\n"
        'a,A dog hugs a cat.,hugging,7,4.5,img/dog.png,dog,"0.1,0.1,0.5,0.9",img/cat.png,cat,"0.5,0.1,0.9,0.9",'
        '"{""k"": ""v""}"\n'
        'b,A dog alone.,,,,/abs/dog.png,dog,"0,0,1,1",,,,\n'
        'c,Bad box.,,abc,,img/dog.png,dog,"0.1,zero,0.5,0.9",,,,\n')
    records = manifest_from_records(str(tmp_path / "in.csv"))
    assert records[0]["seed"] == 7 and records[0]["guidance"] == 4.5 and records[0]["metadata"] == {"k": "v"}
    assert records[0]["subjects"][1] == {"image": str(tmp_path / "img" / "cat.png"), "phrase": "cat",
                                         "box": [0.5, 0.1, 0.9, 0.9]}
    assert records[1]["subjects"] == [{"image": "/abs/dog.png", "phrase": "dog", "box": [0.0, 0.0, 1.0, 1.0]}]
    assert "relation" not in records[1]  # empty cell: default
    accepted, rejected = validate_records(records)
    assert [r.row_id for r in accepted] == ["a", "b"]
    assert rejected[0].field in ("seed", "subjects.0.box") and "also" in rejected[0].reason


def test_csv_with_json_subjects_column_and_conflicts(tmp_path):
    subjects = json.dumps([{"image": "dog.png", "phrase": "dog", "box": [0, 0, 1, 1]}]).replace('"', '""')
    (tmp_path / "in.csv").write_text(f'row_id,prompt,subjects\na,A dog.,"{subjects}"\n')
    (record,) = manifest_from_records(str(tmp_path / "in.csv"))
    assert record["subjects"][0]["image"] == str(tmp_path / "dog.png")
    (tmp_path / "both.csv").write_text(f'row_id,prompt,subjects,subject1_image\na,A dog.,"{subjects}",x.png\n')
    with pytest.raises(ValueError, match="both"):
        manifest_from_records(str(tmp_path / "both.csv"))
    (tmp_path / "badjson.csv").write_text('row_id,prompt,subjects\na,A dog.,"[{oops"\n')
    with pytest.raises(ValueError, match="line 2: column 'subjects' is not valid JSON"):
        manifest_from_records(str(tmp_path / "badjson.csv"))


def test_jsonl(tmp_path):
    lines = [json.dumps(row(0)), "", json.dumps(row(1, steps=5))]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    records = manifest_from_records(str(tmp_path / "in.jsonl"))
    assert [r["row_id"] for r in records] == ["r0", "r1"]
    assert records[1]["subjects"][0]["image"] == str(tmp_path / "subjects" / "dog.png")
    (tmp_path / "bad.jsonl").write_text(json.dumps(row(0)) + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        manifest_from_records(str(tmp_path / "bad.jsonl"))
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="line 1 must be a JSON object"):
        manifest_from_records(str(tmp_path / "list.jsonl"))
    with pytest.raises(ValueError, match="expected .csv or .jsonl"):
        manifest_from_records(str(tmp_path / "list.jsonl").replace(".jsonl", ".txt"))


# ------------------------------------------------------------------------------------------ the example manifest

def test_example_manifest_is_valid_and_matches_its_csv_and_jsonl():
    accepted, rejected = read_manifest(str(EXAMPLES / "example.parquet"), check_image=check_image_file,
                                       known_relations={"hugging", "shaking_hands", "riding"})
    assert rejected == []
    assert len(accepted) >= 16
    assert len({r.relation for r in accepted if r.relation}) >= 3
    assert any(r.relation is None for r in accepted)
    assert {len(r.subjects) for r in accepted} == {1, 2, 3}
    assert len({r.seed for r in accepted}) == len(accepted)
    assert all(r.width == r.height == 128 and r.steps == 4 and r.num_images in (1, 2) for r in accepted)
    assert all(Path(s.image).is_file() for r in accepted for s in r.subjects)
    for name in ("example.csv", "example.jsonl"):
        rows, bad = validate_records(manifest_from_records(str(EXAMPLES / name)))
        assert bad == [] and rows == accepted, name


def test_example_manifest_moves_with_its_folder(tmp_path):
    """Subject paths are relative to the manifest: a copied folder reads with its own images."""
    shutil.copytree(EXAMPLES, tmp_path / "ex", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    accepted, rejected = read_manifest(str(tmp_path / "ex" / "example.parquet"), check_image=check_image_file)
    assert rejected == [] and accepted[0].subjects[0].image.startswith(str(tmp_path / "ex" / "subjects"))


def test_base_uri_is_the_manifest_or_its_folder(tmp_path):
    table = rows_to_table([row(0)])
    expected = str(tmp_path / "subjects" / "dog.png")
    (tmp_path / "m.parquet").write_bytes(b"")  # base given as the manifest file: its folder is used
    for base in (str(tmp_path / "m.parquet"), str(tmp_path), str(tmp_path) + "/"):
        (accepted,), _ = validate_table(table, base_uri=base)
        assert accepted.subjects[0].image == expected, base
    assert table_to_rows(table, base_uri=str(tmp_path / "m.parquet"))[0].subjects[0].image == expected
    assert table_to_rows(table)[0].subjects[0].image == "subjects/dog.png"  # no base: left as written
    (accepted,), _ = validate_table(table, base_uri="memory://")
    assert accepted.subjects[0].image == "memory://subjects/dog.png"
