"""RelationBench: the 25 templates of Table 10 and the deterministic case builder."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from manifests.io import check_image_file, read_manifest, write_manifest
from manifests.relationbench import (
    MULTI_TEMPLATES,
    SINGLE_TEMPLATES,
    TEMPLATES,
    build_cases,
    case_kind,
    subject_name,
    subjects_from_dir,
    template,
)
from manifests.schema import Subject

SUBJECTS_DIR = Path(__file__).resolve().parents[1] / "manifests" / "examples" / "subjects"


@pytest.fixture(scope="module")
def subjects() -> list[tuple[str, str]]:
    return subjects_from_dir(str(SUBJECTS_DIR))


def test_the_25_templates_of_table_10():
    assert len(TEMPLATES) == 25 and len(SINGLE_TEMPLATES) == 14 and len(MULTI_TEMPLATES) == 11
    assert [t.number for t in TEMPLATES] == list(range(1, 26))
    assert len({t.relation for t in TEMPLATES}) == 25
    assert template("playing_guitar").text == "A {} is playing guitar on a park bench."
    assert template("hugging").text == "A {} is hugging a {} in front of the mountain."
    assert template("hugging").prompt(["dog", "cat"]) == "A dog is hugging a cat in front of the mountain."
    for t in TEMPLATES:
        assert t.text.count("{}") == t.num_subjects
        assert t.phrase and t.phrase.split()[0].lower() in t.text.lower()
        for box in t.boxes:
            Subject(image="x.png", phrase="x", box=list(box))  # a valid layout
    carrying = template("carrying")
    assert carrying.boxes[1][3] <= carrying.boxes[0][3] and carrying.boxes[1][1] < carrying.boxes[0][1]
    with pytest.raises(ValueError, match="expected one of"):
        template("levitating")
    with pytest.raises(ValueError, match="takes 2 subjects"):
        template("hugging").prompt(["dog"])


def test_subjects_from_dir(subjects, tmp_path):
    assert [name for name, _ in subjects] == ["cat", "dog", "plushie bear", "robot", "teapot"]
    assert all(Path(uri).is_file() for _, uri in subjects)
    assert subject_name("s3://b/x/red-rubber_duck.JPG") == "red rubber duck"
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "a_b.JPEG").write_bytes(b"\xff\xd8\xff")
    assert subjects_from_dir(str(tmp_path)) == [("a b", str(tmp_path / "a_b.JPEG"))]


def test_build_cases_deterministic_and_complete(subjects):
    rows = build_cases(subjects, n_single=100, n_multi=100, seed=0)
    assert len(rows) == 200 and len({r.row_id for r in rows}) == 200
    assert rows[7].row_id == "rb-single-0007" and rows[100].row_id == "rb-multi-0000"
    assert build_cases(subjects, seed=0) == rows
    other = build_cases(subjects, seed=1)
    assert [r.model_dump() for r in other] != [r.model_dump() for r in rows]
    assert Counter(r.relation for r in rows).keys() == {t.relation for t in TEMPLATES}
    for r in rows:
        tmpl = template(r.relation)
        images = [s.image for s in r.subjects]
        assert len(images) == tmpl.num_subjects and len(set(images)) == len(images)
        assert r.prompt == tmpl.prompt([s.phrase for s in r.subjects])
        assert r.relation_phrase == tmpl.phrase
        assert [s.box for s in r.subjects] == [list(b) for b in tmpl.boxes]
        assert (r.width, r.height) == (1024, 1024)
    assert all(len(r.subjects) == 1 for r in rows[:100]) and all(len(r.subjects) == 2 for r in rows[100:])
    assert len({r.seed for r in rows}) > 190


def test_build_cases_needs_two_distinct_subjects_for_pairs(subjects):
    with pytest.raises(ValueError, match="2 distinct"):
        build_cases([subjects[0], subjects[0]], n_single=1, n_multi=1)
    rows = build_cases([subjects[0], subjects[0]], n_single=3, n_multi=0, width=128, height=128)
    assert len(rows) == 3 and rows[0].width == 128


def test_cases_round_trip_as_a_manifest(subjects, tmp_path):
    rows = build_cases(subjects, n_single=14, n_multi=11, seed=3, width=256, height=256)
    write_manifest(rows, str(tmp_path / "rb.parquet"))
    accepted, rejected = read_manifest(str(tmp_path / "rb.parquet"), check_image=check_image_file,
                                       known_relations={t.relation for t in TEMPLATES})
    assert rejected == [] and accepted == rows


def test_the_100_plus_100_cases_of_the_paper(subjects):
    """The done-when: 100 + 100 cases, deterministic for a seed, every template used, two-subject templates only
    with two (distinct) subjects; another seed draws other cases."""
    rows = build_cases(subjects, seed=5)
    single, multi = rows[:100], rows[100:]
    assert len(single) == len(multi) == 100
    assert {r.relation for r in single} == {t.relation for t in SINGLE_TEMPLATES}
    assert {r.relation for r in multi} == {t.relation for t in MULTI_TEMPLATES}
    assert all(len(r.subjects) == 1 and template(r.relation).num_subjects == 1 for r in single)
    assert all(len(r.subjects) == 2 and template(r.relation).num_subjects == 2 for r in multi)
    assert all(len({s.image for s in r.subjects}) == 2 for r in multi)
    assert [case_kind(r) for r in rows] == ["single"] * 100 + ["multi"] * 100
    assert build_cases(subjects, seed=5) == rows
    other = build_cases(subjects, seed=6)
    assert [(r.seed, [s.image for s in r.subjects]) for r in other] != [(r.seed, [s.image for s in r.subjects])
                                                                        for r in rows]
    drawn = Counter(s.image for r in rows for s in r.subjects)
    assert set(drawn) == {uri for _, uri in subjects}  # every subject gets drawn


def test_generation_settings_do_not_change_the_draw(subjects):
    rows = build_cases(subjects, n_single=14, n_multi=11, seed=2)
    tiny = build_cases(subjects, n_single=14, n_multi=11, seed=2, width=64, height=64, steps=2, num_images=3)
    assert all((r.steps, r.num_images, r.width, r.height) == (2, 3, 64, 64) for r in tiny)
    assert all(r.steps == 30 and r.num_images == 1 for r in rows)
    same = lambda r: r.model_copy(update=dict(steps=30, num_images=1, width=1024, height=1024))  # noqa: E731
    assert [same(r) for r in tiny] == rows


def test_relations_filter_keeps_only_their_templates(subjects):
    rows = build_cases(subjects, n_single=3, n_multi=4, relations=["hugging", "dancing", "shaking_hands"])
    assert [r.relation for r in rows] == ["dancing"] * 3 + ["shaking_hands", "hugging"] * 2
    assert [r.row_id for r in rows[3:5]] == ["rb-multi-0000", "rb-multi-0001"]
    assert build_cases(subjects, n_single=0, n_multi=2, relations=("hugging",))[1].relation == "hugging"
    with pytest.raises(ValueError, match=r"no single-subject template, but --n-single is 100"):
        build_cases(subjects, relations=["hugging"])
    with pytest.raises(ValueError, match="expected one of"):
        build_cases(subjects, relations=["levitating"])
    with pytest.raises(ValueError, match="at least one"):
        build_cases(subjects, relations=[])


def test_case_kind_from_metadata_or_subjects(subjects):
    single, multi = build_cases(subjects, n_single=1, n_multi=1)
    assert single.metadata["kind"] == "single" and multi.metadata["kind"] == "multi"
    assert case_kind(multi.model_copy(update={"metadata": {}})) == "multi"
    assert case_kind(single.model_copy(update={"metadata": {"kind": "other"}})) == "single"
