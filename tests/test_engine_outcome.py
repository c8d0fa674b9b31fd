"""manifests.engine_outcome: engine outcomes through Parquet (local folder, part files, S3), validation errors."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pytest
from pydantic import ValidationError

from manifests import storage
from manifests.engine_outcome import ENGINE_OUTCOME_SCHEMA, EngineOutcome, read_outcomes, write_outcomes
from manifests.io import read_table, write_table
from manifests.triplets import TripletRow


def triplet_json(sample_id: str, relation: str = "hugging") -> str:
    kp = [[0.1 + 0.04 * j, 0.2 + 0.03 * j] for j in range(17)]
    return TripletRow.model_validate({
        "triplet_id": sample_id, "relation": relation, "target": f"s3://b/images/{sample_id}/target.png",
        "prompt": "A dog is hugging a cat.", "relation_phrase": "hugging",
        "subjects": [{"image": f"s3://b/images/{sample_id}/subject{k}.png", "phrase": p,
                      "box": [0.1 + 0.3 * k, 0.1, 0.5 + 0.3 * k, 0.9], "target_keypoints": kp,
                      "subject_keypoints": kp} for k, p in enumerate(["dog", "cat"])],
        "metadata": {"keypoint_layouts": "points,points"}}).model_dump_json()


def outcomes(prefix: str = "hugging", n: int = 4) -> list[EngineOutcome]:
    out = []
    for i in range(n):
        sid = f"{prefix}-{i:05d}"
        if i % 2 == 0:
            out.append(EngineOutcome(sample_id=sid, relation="hugging", status="made", stage="gate",
                                     triplet=triplet_json(sid), metrics={"clip_r": 21.5 + i, "keypoint_conf": 0.8}))
        else:
            out.append(EngineOutcome(sample_id=sid, relation="hugging", status="dropped", stage="annotate",
                                     reason="subject_found_twice", detail=f"'dog' found 2 times in sample {i}"))
    return out


def test_outcomes_round_trip_local_file(tmp_path):
    rows = outcomes()
    uri = str(tmp_path / "out" / "engine" / "dropped.parquet")
    table = write_outcomes(rows, uri)
    assert table.schema == ENGINE_OUTCOME_SCHEMA and table.num_rows == 4
    back = read_outcomes(uri)
    assert back == rows
    assert back[0].metrics == {"clip_r": 21.5, "keypoint_conf": 0.8}
    assert back[0].triplet_row().subjects[1].phrase == "cat"
    assert back[1].detail == "'dog' found 2 times in sample 1" and back[1].triplet is None
    assert not list((tmp_path / "out" / "engine").glob("*.tmp-*"))


def test_outcomes_folder_of_part_files_on_s3(s3_bucket):
    folder = f"{s3_bucket}/run/outcomes"
    write_outcomes(outcomes("hugging", 3), f"{folder}/part-00000.parquet")
    write_outcomes(outcomes("hugging-b", 2), f"{folder}/part-00001.parquet")
    storage.write_bytes_atomic(f"{folder}/notes.txt", b"not a part file")
    back = read_outcomes(folder)
    assert [o.sample_id for o in back] == ["hugging-00000", "hugging-00001", "hugging-00002",
                                         "hugging-b-00000", "hugging-b-00001"]
    assert Counter(o.status for o in back) == {"made": 3, "dropped": 2}
    assert read_outcomes(f"{folder}/part-00001.parquet") == outcomes("hugging-b", 2)
    assert read_outcomes(f"{s3_bucket}/run/absent") == []


def test_outcomes_folder_with_nulls_and_missing_columns(tmp_path):
    # a part file written by another writer (e.g. Ray Data): no metrics column, null detail
    table = pa.Table.from_pylist([{"sample_id": "hugging-00007", "relation": "hugging", "status": "dropped",
                                   "stage": "generate", "reason": "generation_error", "detail": None}])
    write_table(table, str(tmp_path / "parts" / "a.parquet"))
    write_outcomes(outcomes(n=2), str(tmp_path / "parts" / "b.parquet"))
    back = read_outcomes(str(tmp_path / "parts"))
    assert [o.sample_id for o in back] == ["hugging-00007", "hugging-00000", "hugging-00001"]
    assert (back[0].detail, back[0].metrics, back[0].reason) == ("", {}, "generation_error")
    assert back[0].judged_with is None  # written before the column existed: judged under unknown settings


def test_outcomes_keep_the_settings_that_judged_them(tmp_path):
    rows = [o.model_copy(update={"judged_with": "0123abcd4567ef89"}) for o in outcomes(n=2)]
    write_outcomes(rows, str(tmp_path / "a.parquet"))
    back = read_outcomes(str(tmp_path / "a.parquet"))
    assert back == rows and [o.judged_with for o in back] == ["0123abcd4567ef89"] * 2
    assert read_table(str(tmp_path / "a.parquet")).schema.field("judged_with").type == pa.string()


@pytest.mark.parametrize("changes, words", [
    (dict(status="dropped", triplet=None, reason=None), "a dropped sample needs a reason code"),
    (dict(status="dropped", reason="Not A Code"), "a dropped sample needs a reason code"),
    (dict(status="dropped", reason="low_clip_r"), "a dropped sample has no triplet"),
    (dict(triplet=None), "a made sample needs its triplet"),
    (dict(reason="low_clip_r"), "a made sample has no reason"),
    (dict(triplet='{"triplet_id": "x"}'), "triplet is not a valid TripletRow"),
    (dict(relation="kissing"), "triplet relation 'hugging' differs from the outcome's 'kissing'"),
    (dict(stage="render"), "stage"),
    (dict(metrics={"clip_r": float("nan")}), "metrics must be finite"),
    (dict(sample_id="a/b"), "sample_id must be"),
])
def test_outcome_errors(changes, words):
    good = outcomes(n=1)[0].model_dump()
    with pytest.raises(ValidationError, match=words.replace("(", r"\(").replace(")", r"\)")):
        EngineOutcome.model_validate({**good, **changes})


def test_read_outcomes_names_the_bad_row(tmp_path):
    rows = [o.model_dump() for o in outcomes(n=2)]
    rows[1]["reason"] = "Bad Reason"
    write_table(pa.Table.from_pylist(rows, schema=ENGINE_OUTCOME_SCHEMA), str(tmp_path / "bad.parquet"))
    with pytest.raises(ValueError, match=r"bad.parquet: row 1 \(hugging-00001\):.*needs a reason code"):
        read_outcomes(str(tmp_path / "bad.parquet"))
    assert read_table(str(tmp_path / "bad.parquet")).num_rows == 2
