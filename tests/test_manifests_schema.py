"""Row schemas: defaults, strict types, and errors that name the field and quote the value."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from manifests.schema import DEFAULT_NEGATIVE_PROMPT, GenerationRow, Rejection, ResultRow, Subject

SUBJECT = {"image": "s3://bucket/dog.png", "phrase": "dog", "box": [0.1, 0.2, 0.5, 0.9]}


def good_row(**overrides) -> dict:
    row = {"row_id": "row-1", "prompt": "A dog is hugging a cat.", "subjects": [SUBJECT]}
    row.update(overrides)
    return row


def rejection(**overrides) -> Rejection:
    data = good_row(**overrides)
    with pytest.raises(ValidationError) as info:
        GenerationRow.model_validate(data)
    return Rejection.from_error(7, info.value, row_id=data.get("row_id"))


def test_good_row_gets_every_default():
    row = GenerationRow.model_validate(good_row())
    assert (row.relation, row.relation_phrase) == (None, None)
    assert (row.seed, row.num_images, row.steps, row.guidance, row.scale) == (0, 1, 30, 5.0, 0.6)
    assert (row.width, row.height, row.metadata) == (1024, 1024, {})
    assert row.negative_prompt == DEFAULT_NEGATIVE_PROMPT
    assert row.subjects == [Subject(**SUBJECT)]


def test_nulls_mean_default_and_empty_relation_means_none():
    row = GenerationRow.model_validate(good_row(seed=None, steps=None, guidance=None, width=None, metadata=None,
                                                negative_prompt=None, relation="", relation_phrase="  "))
    assert (row.seed, row.steps, row.guidance, row.width, row.metadata) == (0, 30, 5.0, 1024, {})
    assert row.negative_prompt == DEFAULT_NEGATIVE_PROMPT
    assert row.relation is None and row.relation_phrase is None


def test_numpy_values_from_ray_batches_are_accepted():
    row = GenerationRow.model_validate(good_row(seed=np.int64(5), guidance=np.float64(3.5),
                                                subjects=[{**SUBJECT, "box": np.array([0.1, 0.2, 0.5, 0.9])}]))
    assert row.seed == 5 and type(row.seed) is int and row.subjects[0].box == [0.1, 0.2, 0.5, 0.9]


CASES = [
    # (overrides, field named, words in the reason)
    ({"subjects": [{**SUBJECT, "box": [0.1, 0.2, 1.5, 0.9]}]}, "subjects.0.box", "inside [0, 1]"),
    ({"subjects": [{**SUBJECT, "box": [-0.1, 0.2, 0.5, 0.9]}]}, "subjects.0.box", "inside [0, 1]"),
    ({"subjects": [{**SUBJECT, "box": [0.5, 0.2, 0.5, 0.9]}]}, "subjects.0.box", "x0 < x1"),
    ({"subjects": [{**SUBJECT, "box": [0.1, 0.9, 0.5, 0.2]}]}, "subjects.0.box", "y0 < y1"),
    ({"subjects": [{**SUBJECT, "box": [0.1, math.nan, 0.5, 0.9]}]}, "subjects.0.box", "finite"),
    ({"subjects": [{**SUBJECT, "box": [0.1, 0.2, 0.5]}]}, "subjects.0.box", "4 numbers"),
    ({"subjects": [{**SUBJECT, "box": ["0.1", 0.2, 0.5, 0.9]}]}, "subjects.0.box", "no strings"),
    ({"subjects": [{**SUBJECT, "box": [True, 0.2, 0.5, 0.9]}]}, "subjects.0.box", "bools"),
    ({"subjects": [SUBJECT, {**SUBJECT, "phrase": " "}]}, "subjects.1.phrase", "must not be empty"),
    ({"subjects": [{**SUBJECT, "image": ""}]}, "subjects.0.image", "must not be empty"),
    ({"subjects": [{**SUBJECT, "color": "red"}]}, "subjects.0.color", "unknown field"),
    ({"subjects": []}, "subjects", "at least 1"),
    ({"subjects": [SUBJECT] * 9}, "subjects", "at most 8"),
    ({"seed": "abc"}, "seed", "integer"),
    ({"seed": True}, "seed", "integer"),
    ({"seed": -1}, "seed", "greater than or equal"),
    ({"seed": 2**63}, "seed", "less than"),
    ({"steps": 2.5}, "steps", "integer"),
    ({"steps": 0}, "steps", "greater than or equal"),
    ({"num_images": 17}, "num_images", "less than or equal"),
    ({"guidance": "high"}, "guidance", "number"),
    ({"guidance": math.inf}, "guidance", "finite"),
    ({"scale": 11.0}, "scale", "less than or equal"),
    ({"width": 100}, "width", "multiple of 8"),
    ({"height": 8}, "height", "greater than or equal"),
    ({"prompt": "   "}, "prompt", "must not be empty"),
    ({"row_id": ""}, "row_id", "storage key"),
    ({"row_id": "a/b"}, "row_id", "storage key"),
    ({"row_id": ".."}, "row_id", "storage key"),
    ({"row_id": "x" * 129}, "row_id", "storage key"),
    ({"row_id": 12}, "row_id", "valid string"),
    ({"relation": "hug ging"}, "relation", "storage key"),
    ({"metadata": {"k": 1}}, "metadata.k", "valid string"),
    ({"colour": "red"}, "colour", "unknown field"),
]


@pytest.mark.parametrize("overrides, field, words", CASES, ids=[c[1] + ":" + c[2] for c in CASES])
def test_bad_rows_name_the_field(overrides, field, words):
    r = rejection(**overrides)
    assert r.field == field, r
    assert words in r.reason, r
    assert r.index == 7


def test_rejection_quotes_the_value_and_truncates_it():
    r = rejection(subjects=[{**SUBJECT, "box": [0.5, 0.2, 0.5, 0.9]}])
    assert r.value == "[0.5, 0.2, 0.5, 0.9]" and "[0.5, 0.2, 0.5, 0.9]" in r.reason
    assert rejection(seed="abc").value == "'abc'"
    long = Rejection.of(0, "prompt", "too long", "x" * 1000)
    assert len(long.value) == 200 and long.value.endswith("...")


def test_several_errors_become_one_rejection_listing_all():
    r = rejection(seed="abc", steps=0)
    assert r.field == "seed" and "also steps:" in r.reason


def test_validation_error_message_names_field_and_value():
    with pytest.raises(ValidationError) as info:
        GenerationRow.model_validate(good_row(subjects=[{**SUBJECT, "box": [0.1, 0.2, 1.5, 0.9]}]))
    text = str(info.value)
    assert "subjects.0.box" in text and "1.5" in text


def test_batch_and_subject_keys():
    a = GenerationRow.model_validate(good_row(relation="hugging", seed=1, prompt="one"))
    b = GenerationRow.model_validate(good_row(relation="hugging", seed=2, prompt="two", row_id="row-2"))
    c = GenerationRow.model_validate(good_row(steps=10, row_id="row-3"))
    assert a.batch_key() == b.batch_key() == ("hugging", 1, 30, 1024, 1024, 5.0)
    assert c.batch_key()[0] == "" and c.batch_key() != a.batch_key()
    two = GenerationRow.model_validate(good_row(subjects=[SUBJECT, {**SUBJECT, "image": "cat.png"}]))
    swapped = GenerationRow.model_validate(good_row(subjects=[{**SUBJECT, "image": "cat.png"}, SUBJECT]))
    assert two.subject_key() != swapped.subject_key()  # order matters: it is the layout's order
    assert a.subject_key() == b.subject_key() == SUBJECT["image"]


def test_result_row():
    ok = ResultRow(row_id="r", status="ok", images=["a.png", "b.png"], clip_t=[30.0, 31.0])
    assert ok.attempt == 1 and ok.finished_at.endswith("+00:00") and ok.clip_r == []
    with pytest.raises(ValidationError, match="needs an error message"):
        ResultRow(row_id="r", status="error")
    with pytest.raises(ValidationError, match="clip_t has 1 values for 2 images"):
        ResultRow(row_id="r", status="ok", images=["a.png", "b.png"], clip_t=[30.0])
    with pytest.raises(ValidationError, match="status"):
        ResultRow(row_id="r", status="done")
    with pytest.raises(ValidationError, match="extra"):
        ResultRow(row_id="r", status="ok", bogus=1)
