"""manifests.relation_spec: spec files (YAML / JSONL), deterministic expansion, validation errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from manifests import storage
from manifests.relationbench import CLOSE_LAYOUT, SIDE_BY_SIDE_LAYOUT, STANDING_LAYOUT
from manifests.relation_spec import (
    DEFAULT_SUBJECT_PROMPT,
    EngineSample,
    RelationSpec,
    expand_specs,
    read_relation_specs,
    write_relation_specs,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "manifests" / "examples" / "relation_spec.yaml"


def spec(**changes) -> dict:
    record = {"relation": "hugging", "templates": ["A {0} is hugging a {1}.", "A {1} and a {0} hug on a sofa."],
              "classes": ["dog", "cat", "teddy bear", "plush rabbit"], "count": 12, "width": 64, "height": 64,
              "steps": 2}
    record.update(changes)
    return {k: v for k, v in record.items() if v is not None}


def spec_error(record: dict) -> str:
    with pytest.raises(ValidationError) as info:
        RelationSpec.model_validate(record)
    return str(info.value)


# ------------------------------------------------------------------------------------------------------------ files

def test_example_file_reads_and_expands():
    specs = read_relation_specs(str(EXAMPLE))
    assert [s.relation for s in specs] == ["hugging", "shaking_hands"]
    assert all((s.count, s.width, s.height, s.steps) == (3, 64, 64, 2) for s in specs)
    samples = expand_specs(specs)
    assert [s.sample_id for s in samples] == [f"{r}-{i:05d}" for r in ("hugging", "shaking_hands") for i in range(3)]
    hand = [s for s in samples if s.relation == "shaking_hands"]
    assert [s.classes for s in hand] == [["person", "robot"], ["monkey", "teddy bear"], ["robot", "monkey"]]
    assert hand[0].prompt == "A person shakes hands with a robot in the forest."
    assert hand[0].subject_prompts[1] == "a photo of a robot, full body, standing, plain background"
    assert hand[0].relation_phrase == "shakes hands with"


@pytest.mark.parametrize("name", ["specs.yaml", "specs.jsonl", "specs.json"])
def test_round_trip(tmp_path, name):
    specs = [RelationSpec.model_validate(spec()),
             RelationSpec.model_validate(spec(relation="dancing", templates=["A {0} is dancing."], classes=None,
                                               class_sets=[["robot"], ["dog"]], layouts=[[[0.2, 0.1, 0.8, 0.9]]],
                                               relation_phrase="dancing", seed=7))]
    uri = str(tmp_path / name)
    write_relation_specs(specs, uri)
    assert read_relation_specs(uri) == specs
    assert expand_specs(read_relation_specs(uri)) == expand_specs(specs)


def test_yaml_list_and_memory_url():
    storage.write_bytes_atomic("memory://specs/list.yaml",
                               b"- relation: kissing\n  templates: ['A {0} is kissing a {1}.']\n"
                               b"  class_sets: [[dog, cat]]\n  count: 2\n")
    [s] = read_relation_specs("memory://specs/list.yaml")
    assert (s.relation, s.count, s.subject_prompt, s.width) == ("kissing", 2, DEFAULT_SUBJECT_PROMPT, 1024)


def test_file_errors_name_spec_relation_field_and_value(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("relations:\n"
                    "  - relation: hugging\n    templates: ['A {0} hugs a {1}.']\n    classes: [dog, cat]\n"
                    "    count: 3\n"
                    "  - relation: waving\n    templates: ['A {0} waves.']\n    classes: [dog]\n    count: 0\n")
    with pytest.raises(ValueError, match=r"spec 1 \(relation waving\): count: .*greater than or equal to 1.*"
                                         r"\(value: 0\)"):
        read_relation_specs(str(path))

    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text(json.dumps(spec()) + "\n\n" + json.dumps(spec(relation="x", classes=["dog", ""])) + "\n")
    with pytest.raises(ValueError, match=r"spec 1 \(line 3\) \(relation x\): classes: classes\[1\] must not be "
                                         r"empty, got ''"):
        read_relation_specs(str(jsonl))

    jsonl.write_text(json.dumps(spec()) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"line 2 is not valid JSON"):
        read_relation_specs(str(jsonl))

    other = tmp_path / "bad2.yaml"
    other.write_text("specs: []\n")
    with pytest.raises(ValueError, match=r"single key 'relations'.*\['specs'\]"):
        read_relation_specs(str(other))
    other.write_text("relations: []\n")
    with pytest.raises(ValueError, match=r"no relation specs"):
        read_relation_specs(str(other))
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        read_relation_specs(str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match=r"unsupported file type"):
        read_relation_specs(str(tmp_path / "specs.txt"))


def test_a_relation_given_twice_is_refused(tmp_path):
    path = tmp_path / "twice.jsonl"
    path.write_text(json.dumps(spec()) + "\n" + json.dumps(spec(seed=3)) + "\n")
    with pytest.raises(ValueError, match=r"spec 1 \(line 2\) \(relation hugging\): relation: repeats spec 0 "
                                         r"\(line 1\)"):
        read_relation_specs(str(path))
    with pytest.raises(ValueError, match=r"repeats spec 0"):
        expand_specs([spec(), spec(seed=3)])


# ------------------------------------------------------------------------------------------------------ validation

@pytest.mark.parametrize("changes, field, words", [
    (dict(relation="../up"), "relation", "'../up'"),
    (dict(templates=[]), "templates", "at least 1 item"),
    (dict(templates=["A dog is hugging."]), "templates", "templates[0] must name its subjects with {0}"),
    (dict(templates=["A {} hugs a {}."]), "templates", "placeholders ['{}', '{}']"),
    (dict(templates=["A {0} hugs a {2}."]), "templates", "placeholders ['{2}']"),
    (dict(templates=["A {1} is alone."]), "templates", "templates[0] must use every subject placeholder from {0}"),
    (dict(templates=["A {0} hugs a {name}."]), "templates", "placeholders ['{name}']"),
    (dict(templates=["A {0!r} hugs a {1}."]), "templates", "no conversion or format spec"),
    (dict(templates=["A {0} hugs a {1"]), "templates", "unbalanced braces"),
    (dict(templates=["A {0} hugs a {1}.", "A {0} waves."]), "templates",
     "templates[0] names 2, templates[1] names 1"),
    (dict(classes=["dog"]), "classes", "at least 2 classes"),
    (dict(classes=["dog", "cat", "dog"]), "classes", "got 'dog' twice"),
    (dict(classes=["dog", 3]), "classes", "classes[1] must be a string"),
    (dict(classes=None, class_sets=[["dog", "cat"], ["dog"]]), "class_sets",
     "class_sets[1] must hold 2 classes for templates naming 2 subjects, got ['dog']"),
    (dict(classes=None, class_sets=[["dog", "dog"]]), "class_sets", "class_sets[0] must hold distinct classes"),
    (dict(class_sets=[["dog", "cat"]]), "(row)", "exactly one of classes"),
    (dict(classes=None), "(row)", "exactly one of classes"),
    (dict(count=0), "count", "greater than or equal to 1"),
    (dict(count=100_001), "count", "less than or equal to 100000"),
    (dict(count="3"), "count", "must be an integer, got '3'"),
    (dict(count=True), "count", "must be an integer, got True"),
    (dict(layouts=[[[0.1, 0.1, 0.5, 0.9]]]), "layouts", "layouts[0] must be a list of 2 boxes"),
    (dict(layouts=[[[0.1, 0.1, 0.5, 0.9], [0.6, 0.9, 0.9, 0.2]]]), "layouts",
     "layouts[0][1]: box must have x0 < x1 and y0 < y1, got [0.6, 0.9, 0.9, 0.2]"),
    (dict(layouts=[[[0.1, 0.1, 0.5, 0.9], [0.5, 0.1, 1.5, 0.9]]]), "layouts", "layouts[0][1]: box must lie inside"),
    (dict(layouts=[]), "layouts", "non-empty list of layouts"),
    (dict(subject_prompt="a photo"), "subject_prompt", "must name the subject with {class}"),
    (dict(subject_prompt="a {class} in {place}"), "subject_prompt", "no other placeholder"),
    (dict(width=100), "width", "multiple of 8, got 100"),
    (dict(steps=0), "steps", "greater than or equal to 1"),
    (dict(seed=-1), "seed", "greater than or equal to 0"),
    (dict(colour="red"), "colour", "unknown field"),
])
def test_spec_errors_name_field_and_value(changes, field, words):
    with pytest.raises(ValueError) as info:
        expand_specs([spec(**changes)])
    message = str(info.value)
    assert f"spec 0 (relation {changes.get('relation', 'hugging')}): {field}: " in message
    assert words in message


# --------------------------------------------------------------------------------------------------------- expansion

def test_expansion_is_deterministic_and_seed_dependent():
    first = expand_specs([spec()])
    again = expand_specs([RelationSpec.model_validate(spec())])
    assert first == again
    assert len(first) == 12 and len({s.sample_id for s in first}) == 12
    other = expand_specs([spec(seed=1)])
    assert [s.seed for s in other] != [s.seed for s in first]
    assert [s.classes for s in other] != [s.classes for s in first]
    # the samples of a relation do not depend on the other specs beside it
    both = expand_specs([spec(relation="kissing", templates=["A {0} kisses a {1}."]), spec()])
    assert both[1:] != first and [s for s in both if s.relation == "hugging"] == first


def test_samples_follow_templates_classes_and_prompts():
    s = RelationSpec.model_validate(spec(count=40))
    samples = expand_specs([s])
    pool = set(s.classes)
    counts = Counter()
    for k, sample in enumerate(samples):
        template = s.templates[k % 2]
        assert sample.prompt == template.format(*sample.classes)
        assert len(sample.classes) == 2 and sample.classes[0] != sample.classes[1]
        assert set(sample.classes) <= pool
        assert sample.subject_prompts == [f"a photo of a {c}, full body, plain background" for c in sample.classes]
        assert len(sample.subject_seeds) == 2 and all(0 <= x < 2**32 for x in [sample.seed, *sample.subject_seeds])
        assert (sample.width, sample.height, sample.steps, sample.relation_phrase) == (64, 64, 2, None)
        counts[template] += 1
    assert counts == {s.templates[0]: 20, s.templates[1]: 20}  # every template, in turn
    assert set().union(*(x.classes for x in samples)) == pool  # the pool is used, not a fixed pair
    assert len({tuple(x.classes) for x in samples}) > 4
    assert len({x.seed for x in samples}) == 40


def test_class_sets_rotate_in_order():
    samples = expand_specs([spec(classes=None, class_sets=[["dog", "cat"], ["robot", "bear"], ["fox", "owl"]],
                                 count=7)])
    assert [s.classes[0] for s in samples] == ["dog", "robot", "fox", "dog", "robot", "fox", "dog"]


def test_layouts_are_respected_and_cross_every_template():
    layouts = [[[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]], [[0.1, 0.2, 0.6, 0.8], [0.4, 0.2, 0.9, 0.8]],
               [[0.0, 0.5, 0.4, 1.0], [0.6, 0.5, 1.0, 1.0]]]
    samples = expand_specs([spec(layouts=layouts, count=12)])
    templates = spec()["templates"]
    pairs = Counter((templates.index(next(t for t in templates if s.prompt == t.format(*s.classes))),
                     layouts.index(s.boxes)) for s in samples)
    assert pairs == {(t, l): 2 for t in range(2) for l in range(3)}  # 6 combinations, twice each in 12 samples


def test_default_layouts_per_subject_count():
    two = expand_specs([spec(count=4)])
    assert [s.boxes for s in two] == [[list(b) for b in layout]
                                      for layout in (SIDE_BY_SIDE_LAYOUT, SIDE_BY_SIDE_LAYOUT,
                                                     CLOSE_LAYOUT, CLOSE_LAYOUT)]
    one = expand_specs([spec(relation="waving", templates=["A {0} is waving."], classes=["dog", "cat"], count=3)])
    assert all(s.boxes == [list(STANDING_LAYOUT[0])] for s in one)
    x0, _, x1, _ = STANDING_LAYOUT[0]
    assert abs((x0 + x1) / 2 - 0.5) < 1e-9  # centred
    assert all(len(s.classes) == 1 for s in one)


def test_engine_sample_checks_one_entry_per_subject():
    sample = expand_specs([spec(count=1)])[0].model_dump()
    assert EngineSample.model_validate(sample).sample_id == "hugging-00000"
    as_numpy = {k: np.asarray(v) if isinstance(v, list) else v for k, v in sample.items()}  # a Ray batch row
    assert EngineSample.model_validate(as_numpy).model_dump() == sample
    with pytest.raises(ValidationError, match="subject_seeds has 1 entries for 2 classes"):
        EngineSample.model_validate({**sample, "subject_seeds": [1]})
    with pytest.raises(ValidationError, match=r"boxes\[0\]: box must"):
        EngineSample.model_validate({**sample, "boxes": [[0.5, 0.5, 0.1, 0.1], [0.1, 0.1, 0.5, 0.5]]})
