"""manifests.triplets: the triplet schema (errors name the field), Parquet round trips (local, memory://, S3)."""

from __future__ import annotations

import copy
import io
import uuid

import pyarrow as pa
import pytest
from PIL import Image
from pydantic import ValidationError

from manifests import storage
from manifests.io import ManifestError, read_table, write_table
from manifests.triplets import (
    TRIPLET_SCHEMA,
    TripletRow,
    copy_triplet_images,
    read_triplets,
    triplets_uri,
    validate_triplets,
    write_triplets,
)


def keypoints(offset: float = 0.0) -> list[list[float]]:
    return [[0.1 + 0.04 * j + offset, 0.2 + 0.03 * j] for j in range(17)]


def subject(k: int, folder: str = "images/t0") -> dict:
    return {"image": f"{folder}/subject{k}.png", "phrase": ["dog", "cat", "bear", "fox"][k],
            "box": [0.1 + 0.1 * k, 0.1, 0.5 + 0.1 * k, 0.9], "mask": f"{folder}/mask{k}.png",
            "target_keypoints": keypoints(0.01 * k), "subject_keypoints": keypoints(),
            "target_visibility": None, "subject_visibility": [1.0] * 16 + [0.0]}


def row(tid: str = "t0", relation: str = "hugging", n: int = 2) -> dict:
    return {"triplet_id": tid, "relation": relation, "target": f"images/{tid}/target.png",
            "prompt": "A dog is hugging a cat.", "relation_phrase": "hugging",
            "subjects": [subject(k, f"images/{tid}") for k in range(n)], "source": "test", "metadata": {"k": "v"}}


def error_fields(record: dict) -> list[str]:
    with pytest.raises(ValidationError) as e:
        TripletRow.model_validate(record)
    return [".".join(str(p) for p in d["loc"]) for d in e.value.errors()]


# ------------------------------------------------------------------------------------------------------------ schema

def test_valid_row_and_plain_record():
    r = TripletRow.model_validate(row())
    assert len(r.subjects) == 2 and r.subjects[0].target_keypoints[16] == pytest.approx([0.74, 0.68])
    record = r.to_record()
    assert isinstance(record, dict) and isinstance(record["subjects"][0], dict)
    assert TripletRow.model_validate(record) == r


def test_keypoints_slightly_outside_are_accepted_far_outside_rejected():
    ok = row()
    ok["subjects"][0]["target_keypoints"][0] = [-0.04, 1.04]
    TripletRow.model_validate(ok)
    bad = row()
    bad["subjects"][1]["subject_keypoints"][3] = [0.5, 1.2]
    assert error_fields(bad) == ["subjects.1.subject_keypoints"]


@pytest.mark.parametrize("edit, field, words", [
    (lambda r: r["subjects"][0].__setitem__("target_keypoints", keypoints()[:16]), "subjects.0.target_keypoints",
     "17"),
    (lambda r: r["subjects"][1]["subject_keypoints"].__setitem__(2, [0.1]), "subjects.1.subject_keypoints",
     "pair"),
    (lambda r: r["subjects"][0]["target_keypoints"].__setitem__(0, [float("nan"), 0.1]),
     "subjects.0.target_keypoints", "finite"),
    (lambda r: r["subjects"][0]["target_keypoints"].__setitem__(0, ["0.1", 0.1]), "subjects.0.target_keypoints",
     "numbers"),
    (lambda r: r["subjects"][0].__setitem__("box", [0.5, 0.1, 0.4, 0.9]), "subjects.0.box", "x0 < x1"),
    (lambda r: r["subjects"][1].__setitem__("box", [0.1, 0.1, 1.3, 0.9]), "subjects.1.box", "[0, 1]"),
    (lambda r: r.pop("relation"), "relation", "required"),
    (lambda r: r.__setitem__("relation", "hug/ging"), "relation", "storage key"),
    (lambda r: r.__setitem__("triplet_id", "a b"), "triplet_id", "storage key"),
    (lambda r: r.__setitem__("relation_phrase", "  "), "relation_phrase", "empty"),
    (lambda r: r["subjects"][0].__setitem__("target_visibility", [1.0] * 3), "subjects.0.target_visibility", "17"),
    (lambda r: r["subjects"][0].__setitem__("subject_visibility", [2.0] * 17), "subjects.0.subject_visibility",
     "[0, 1]"),
    (lambda r: r.__setitem__("subjects", []), "subjects", "at least 1"),
    (lambda r: r.__setitem__("subjects", [subject(k % 4) for k in range(5)]), "subjects", "at most 4"),
    (lambda r: r["subjects"][0].__setitem__("colour", "red"), "subjects.0.colour", "unknown field"),
])
def test_schema_errors_name_the_field(edit, field, words):
    bad = row()
    edit(bad)
    accepted, rejected = validate_triplets([bad])
    assert accepted == [] and len(rejected) == 1
    assert rejected[0].field == field
    assert words.lower() in rejected[0].reason.lower(), rejected[0].reason


def test_validate_triplets_duplicates_and_relation_filter():
    records = [row("a"), row("b", relation="riding"), row("a"), row("c")]
    accepted, rejected = validate_triplets(records)
    assert [r.triplet_id for r in accepted] == ["a", "b", "c"]
    assert [(r.index, r.field) for r in rejected] == [(2, "triplet_id")] and "duplicate" in rejected[0].reason
    accepted, rejected = validate_triplets(records, relation="riding")
    assert [r.triplet_id for r in accepted] == ["b"] and rejected == []


# ----------------------------------------------------------------------------------------------------------- Parquet

def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def _dataset(folder: str, n_rows: int = 3) -> list[dict]:
    """Rows whose images live inside ``folder`` (absolute URIs), and the image files themselves."""
    rows = []
    for i in range(n_rows):
        r = row(f"t{i}")
        r = {**r, "target": storage.join(folder, r["target"]),
             "subjects": [{**s, "image": storage.join(folder, s["image"]), "mask": storage.join(folder, s["mask"])}
                          for s in r["subjects"]]}
        for uri in [r["target"], *[s["image"] for s in r["subjects"]], *[s["mask"] for s in r["subjects"]]]:
            storage.write_bytes_atomic(uri, _png())
        rows.append(r)
    if n_rows == 3:
        rows[1]["metadata"] = {}
        rows[2]["subjects"][0]["mask"] = None
    return rows


def _round_trip(folder: str) -> None:
    rows = _dataset(folder)
    table = write_triplets(rows, folder)
    assert table.schema == TRIPLET_SCHEMA and table.num_rows == 3
    stored = read_table(triplets_uri(folder)).to_pylist()
    assert stored[0]["target"] == "images/t0/target.png"  # inside the folder: stored relative (the folder moves)
    assert stored[0]["subjects"][1]["mask"] == "images/t0/mask1.png"
    back, rejected = read_triplets(folder)
    assert rejected == []
    assert [r.to_record() for r in back] == [TripletRow.model_validate(r).to_record() for r in rows]
    for r in back:  # every path resolves to a readable file again
        assert storage.read_bytes(r.target) == _png()
        assert all(storage.exists(s.image) for s in r.subjects)
    only, _ = read_triplets(triplets_uri(folder), relation="riding")
    assert only == []


def test_round_trip_local(tmp_path):
    _round_trip(str(tmp_path / "ds"))


def test_round_trip_memory():
    _round_trip(f"memory://triplets-{uuid.uuid4().hex[:8]}")


def test_round_trip_s3(s3_bucket):
    _round_trip(f"{s3_bucket}/datasets/hugging")


def test_paths_outside_the_folder_stay_absolute(tmp_path):
    rows = _dataset(str(tmp_path / "elsewhere"), n_rows=1)
    write_triplets(rows, str(tmp_path / "ds"))
    assert read_table(triplets_uri(str(tmp_path / "ds"))).column("target")[0].as_py() == rows[0]["target"]
    back, _ = read_triplets(str(tmp_path / "ds"))
    assert back[0].target == rows[0]["target"]


def test_write_rejects_invalid_rows_and_writes_nothing(tmp_path):
    bad = row("t1")
    bad["subjects"][0]["target_keypoints"] = keypoints()[:5]
    with pytest.raises(ValueError, match=r"subjects\.0\.target_keypoints"):
        write_triplets([row("t0"), bad], str(tmp_path))
    assert not (tmp_path / "triplets.parquet").exists()


def test_read_reports_bad_rows_as_rejections(tmp_path):
    good = [TripletRow.model_validate(row(f"t{i}")).to_record() for i in range(3)]
    bad = copy.deepcopy(good[1])
    bad["subjects"][0]["target_keypoints"] = bad["subjects"][0]["target_keypoints"][:16]
    records = [good[0], bad, good[2], good[0]]
    write_table(pa.Table.from_pylist(records, schema=TRIPLET_SCHEMA), triplets_uri(str(tmp_path)))
    accepted, rejected = read_triplets(str(tmp_path))
    assert [r.triplet_id for r in accepted] == ["t0", "t2"]
    assert [(r.index, r.row_id, r.field) for r in rejected] == [(1, "t1", "subjects.0.target_keypoints"),
                                                                 (3, "t0", "triplet_id")]
    assert accepted[0].target == str(tmp_path / "images/t0/target.png")  # relative -> resolved


def test_read_whole_file_problems(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        read_triplets(str(tmp_path / "missing"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "triplets.parquet").write_bytes(b"not parquet")
    with pytest.raises(ManifestError, match="not a readable Parquet"):
        read_triplets(str(tmp_path / "bad"))
    write_table(pa.table({"triplet_id": ["a"], "colour": ["red"]}), triplets_uri(str(tmp_path / "cols")))
    with pytest.raises(ManifestError, match=r"missing columns \['relation'.*unknown columns \['colour'\]"):
        read_triplets(str(tmp_path / "cols"))


def test_copy_triplet_images_to_memory(tmp_path):
    rows = [TripletRow.model_validate(r) for r in _dataset(str(tmp_path / "src"), n_rows=2)]
    dest = f"memory://copy-{uuid.uuid4().hex[:8]}"
    copied = copy_triplet_images(rows, dest)
    assert copied[0].target == f"{dest}/images/t0/target.png"
    assert copied[1].subjects[1].mask == f"{dest}/images/t1/mask1.png"
    assert storage.read_bytes(copied[1].subjects[0].image) == _png()
    write_triplets(copied, dest)
    back, rejected = read_triplets(dest)
    assert rejected == [] and back == copied
