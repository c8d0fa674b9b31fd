"""Relation specs of the data engine (paper 3.3): what triplets to make, expanded into deterministic samples.

A ``RelationSpec`` says "make ``count`` triplets of this relation": prompt templates whose placeholders ``{0}``,
``{1}`` name the subject classes, a pool of classes (``classes``, two distinct ones drawn per sample) or fixed
combinations (``class_sets``, used in order), layouts (one normalized box per subject), the text prompt of each
subject image, and the generation settings. A spec file is YAML (a list, or ``{"relations": [...]}``) or JSONL
(one spec per line), on any fsspec URL; ``manifests/examples/relation_spec.yaml`` explains every field.

``expand_specs`` turns specs into ``EngineSample`` rows, one per triplet wanted, named ``{relation}-{i:05d}``.
Expansion is a pure function of the specs: sample ``i`` draws from ``random.Random(f"{seed}:{relation}:{i}")``
(string seeding hashes with SHA-512, so it is stable across processes, unlike ``hash()``), templates rotate, and
layouts rotate once per template cycle (every template meets every layout within ``len(templates) *
len(layouts)`` samples). A rerun, or a resumed job, therefore sees the same samples under the same ids.

What became of each sample is ``manifests.engine_outcome.EngineOutcome``.
"""

from __future__ import annotations

import json
import logging
import random
import string
from collections.abc import Iterable, Sequence
from typing import Any, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from manifests import storage
from manifests.io import normalize_record
from manifests.relationbench import CLOSE_LAYOUT, SIDE_BY_SIDE_LAYOUT, STANDING_LAYOUT
from manifests.schema import Int, Rejection, Subject, check_key, non_empty

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LAYOUTS", "DEFAULT_SUBJECT_PROMPT", "EngineSample", "MAX_COUNT", "RelationSpec", "expand_specs",
    "read_relation_specs", "write_relation_specs",
]

DEFAULT_SUBJECT_PROMPT = "a photo of a {class}, full body, plain background"
MAX_COUNT = 100_000  # samples per spec: ids are `{relation}-{i:05d}`
MAX_SUBJECTS = 2
# Default layouts per subject count (normalized xyxy per subject), rotated when a spec gives none.
DEFAULT_LAYOUTS: dict[int, tuple[tuple[tuple[float, ...], ...], ...]] = {
    1: (STANDING_LAYOUT,),
    2: (SIDE_BY_SIDE_LAYOUT, CLOSE_LAYOUT),
}
_SEED_LIMIT = 2**32  # per-sample seeds fit numpy, torch and every API
_YAML_SUFFIXES = (".yaml", ".yml", ".json")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")


# ----------------------------------------------------------------------------------------------------------- helpers

def _placeholders(text: str, what: str) -> list[str]:
    """The field names of the ``{...}`` placeholders of ``text`` (``ValueError`` for broken braces, ``!r`` or
    ``:spec`` parts)."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:
        raise ValueError(f"{what} has unbalanced braces ({e}; write '{{{{' for a literal brace), got {text!r}") \
            from None
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if spec or conversion:
            raise ValueError(f"{what} placeholders take no conversion or format spec, got {text!r}")
        names.append(name)
    return names


def _template_subjects(text: str, what: str) -> int:
    """How many subjects ``text`` names: it must use exactly ``{0}`` .. ``{n-1}``, n in 1..MAX_SUBJECTS."""
    text = non_empty(text, what)
    names = _placeholders(text, what)
    allowed = [str(k) for k in range(MAX_SUBJECTS)]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ValueError(f"{what} must name its subjects with {{0}} (and {{1}} for a second subject), "
                         f"got {text!r}" + (f" with placeholders {['{' + b + '}' for b in bad]}" if bad else ""))
    used = sorted({int(n) for n in names})
    if used != list(range(len(used))):
        raise ValueError(f"{what} must use every subject placeholder from {{0}} up (uses "
                         f"{['{' + str(u) + '}' for u in used]}), got {text!r}")
    return len(used)


def _class_list(value: Any, what: str, n: Optional[int], exact: bool) -> list[str]:
    """Distinct, non-empty class names (the annotator finds each subject by its class): exactly ``n`` of them
    when ``exact``, else at least ``n`` (``n`` None: the templates did not validate, no count check)."""
    value = _as_list(value)
    if not isinstance(value, list) or not value:
        raise ValueError(f"{what} must be a non-empty list of subject classes, got {value!r}")
    names = []
    for k, c in enumerate(value):
        if not isinstance(c, str):
            raise ValueError(f"{what}[{k}] must be a string (a subject class such as 'dog'), got {c!r}")
        names.append(" ".join(non_empty(c, f"{what}[{k}]").split()))
    twice = [c for k, c in enumerate(names) if c in names[:k]]
    if twice:
        raise ValueError(f"{what} must hold distinct classes (the annotator finds each subject by its class), "
                         f"got {twice[0]!r} twice in {names!r}")
    if n is not None and (len(names) != n if exact else len(names) < n):
        raise ValueError(f"{what} must hold {'' if exact else 'at least '}{n} classes for templates naming {n} "
                         f"subjects, got {names!r}")
    return names


def _box(value: Any, what: str) -> list[float]:
    """One normalized box, checked by the manifest's own box validator (``Subject``)."""
    try:
        return Subject._box(value)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


def _as_list(value: Any) -> Any:
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return value.tolist()
    return list(value) if isinstance(value, tuple) else value


def _optional_list(value: Any, what: str) -> Optional[list]:
    """``value`` as a list (None stays None); ``ValueError`` saying ``what`` it must be when not a non-empty list."""
    value = _as_list(value)
    if value is not None and (not isinstance(value, list) or not value):
        raise ValueError(f"{what}, got {value!r}")
    return value


# -------------------------------------------------------------------------------------------------------------- spec

class RelationSpec(BaseModel):
    """What to make for one relation. Exactly one of ``classes`` (a pool; each sample draws distinct classes) and
    ``class_sets`` (fixed combinations, used in order). Every template names the same number of subjects (1 or 2)
    with ``{0}`` / ``{1}``; every layout has one normalized ``[x0, y0, x1, y1]`` box per subject."""

    model_config = ConfigDict(extra="forbid")

    relation: str
    templates: list[str] = Field(min_length=1)
    classes: Optional[list[str]] = None
    class_sets: Optional[list[list[str]]] = None
    count: Int = Field(ge=1, le=MAX_COUNT)
    relation_phrase: Optional[str] = None  # the words CLIP-R scores; None: derived from the prompt downstream
    layouts: Optional[list[list[list[float]]]] = None  # None: DEFAULT_LAYOUTS[number of subjects]
    subject_prompt: str = DEFAULT_SUBJECT_PROMPT
    seed: Int = Field(0, ge=0, lt=2**63)
    width: Int = Field(1024, ge=64, le=4096)
    height: Int = Field(1024, ge=64, le=4096)
    steps: Int = Field(30, ge=1, le=200)

    @field_validator("relation")
    @classmethod
    def _relation(cls, value: str) -> str:
        check_key(value, "relation")
        if len(value) > 122:
            raise ValueError(f"relation must be at most 122 characters (sample ids append '-NNNNN'), got {value!r}")
        return value

    @field_validator("templates")
    @classmethod
    def _templates(cls, value: list[str]) -> list[str]:
        counts = [_template_subjects(t, f"templates[{k}]") for k, t in enumerate(value)]
        if len(set(counts)) > 1:
            k = next(k for k, c in enumerate(counts) if c != counts[0])
            raise ValueError(f"all templates must name the same number of subjects: templates[0] names {counts[0]}, "
                             f"templates[{k}] names {counts[k]} ({value[k]!r})")
        return [t.strip() for t in value]

    @field_validator("classes", mode="before")
    @classmethod
    def _classes(cls, value: Any, info) -> Any:
        return None if value is None else _class_list(value, "classes", cls._num_subjects(info), exact=False)

    @field_validator("class_sets", mode="before")
    @classmethod
    def _class_sets(cls, value: Any, info) -> Any:
        value = _optional_list(value, "class_sets must be a non-empty list of class lists")
        if value is None:
            return None
        n = cls._num_subjects(info)
        return [_class_list(item, f"class_sets[{k}]", n, exact=True) for k, item in enumerate(value)]

    @field_validator("layouts", mode="before")
    @classmethod
    def _layouts(cls, value: Any, info) -> Any:
        value = _optional_list(value, "layouts must be a non-empty list of layouts (one box per subject)")
        if value is None:
            return None
        n = cls._num_subjects(info)
        out = []
        for k, layout in enumerate(value):
            layout = _as_list(layout)
            if not isinstance(layout, list) or (n is not None and len(layout) != n):
                raise ValueError(f"layouts[{k}] must be a list of {n or 'one per subject'} boxes "
                                 f"[x0, y0, x1, y1], got {layout!r}")
            out.append([_box(_as_list(b), f"layouts[{k}][{j}]") for j, b in enumerate(layout)])
        return out

    @field_validator("relation_phrase")
    @classmethod
    def _phrase(cls, value: Optional[str]) -> Optional[str]:
        return " ".join(value.split()) if value is not None and value.strip() else None

    @field_validator("subject_prompt")
    @classmethod
    def _subject_prompt(cls, value: str) -> str:
        names = _placeholders(non_empty(value, "subject_prompt"), "subject_prompt")
        if set(names) != {"class"}:
            raise ValueError(f"subject_prompt must name the subject with {{class}} and no other placeholder, "
                             f"got {value!r}")
        return value.strip()

    @field_validator("width", "height")
    @classmethod
    def _size(cls, value: int, info) -> int:
        if value % 8:
            raise ValueError(f"{info.field_name} must be a multiple of 8, got {value}")
        return value

    @model_validator(mode="after")
    def _one_class_source(self) -> "RelationSpec":
        if (self.classes is None) == (self.class_sets is None):
            raise ValueError(f"give exactly one of classes (a pool) or class_sets (fixed combinations), got "
                             f"classes={self.classes!r} and class_sets={self.class_sets!r}")
        return self

    @staticmethod
    def _num_subjects(info) -> Optional[int]:
        """The subject count of the templates when they validated (fields validate in order), else None."""
        templates = info.data.get("templates")
        return _template_subjects(templates[0], "templates[0]") if templates else None

    @property
    def num_subjects(self) -> int:
        return _template_subjects(self.templates[0], "templates[0]")

    def resolved_layouts(self) -> list[list[list[float]]]:
        """The spec's layouts, or the defaults for its subject count."""
        if self.layouts is not None:
            return self.layouts
        return [[list(box) for box in layout] for layout in DEFAULT_LAYOUTS[self.num_subjects]]


def _spec_errors(index: int, label: str, record: Any, error: ValidationError) -> str:
    relation = record.get("relation") if isinstance(record, dict) else None
    r = Rejection.from_error(index, error, row_id=relation)
    return f"{label} (relation {r.row_id or '?'}): {r.field}: {r.reason} (value: {r.value})"


def _check_unique(specs: Sequence[RelationSpec], labels: Sequence[str]) -> None:
    first: dict[str, str] = {}
    for spec, label in zip(specs, labels):
        if spec.relation in first:
            raise ValueError(f"{label} (relation {spec.relation}): relation: repeats {first[spec.relation]}; "
                             f"sample ids ({spec.relation}-NNNNN) would collide; merge them into one spec "
                             f"(class_sets / templates / layouts take lists)")
        first[spec.relation] = label


def _validate_specs(items: Sequence[tuple[str, Any]], source: str) -> list[RelationSpec]:
    """Validate ``(label, record)`` pairs; one ``ValueError`` lists every problem (spec, relation, field)."""
    specs, labels, problems = [], [], []
    for index, (label, record) in enumerate(items):
        if isinstance(record, RelationSpec):
            specs.append(record)
            labels.append(label)
            continue
        if not isinstance(record, dict):
            problems.append(f"{label}: must be a mapping of spec fields, got {type(record).__name__} {record!r}")
            continue
        try:
            specs.append(RelationSpec.model_validate(normalize_record(record)))
            labels.append(label)
        except ValidationError as e:
            problems.append(_spec_errors(index, label, record, e))
    if problems:
        more = f" (showing 10 of {len(problems)})" if len(problems) > 10 else ""
        raise ValueError(f"{source}: {len(problems)} invalid relation specs{more}:\n  " + "\n  ".join(problems[:10]))
    if not specs:
        raise ValueError(f"{source}: no relation specs")
    _check_unique(specs, labels)
    return specs


def read_relation_specs(uri: str) -> list[RelationSpec]:
    """Relation specs from a YAML file (``.yaml`` / ``.yml`` / ``.json``: a list, or ``{"relations": [...]}``) or a
    JSONL file (``.jsonl`` / ``.ndjson``: one spec per line), on any fsspec URL. Raises ``FileNotFoundError`` for a
    missing file and ``ValueError`` naming the spec (index, JSONL line, relation), field and value otherwise."""
    uri = str(uri)
    lower = uri.lower()
    if not lower.endswith(_YAML_SUFFIXES + _JSONL_SUFFIXES):
        raise ValueError(f"relation specs {uri}: unsupported file type; expected .yaml, .yml, .json or .jsonl")
    if not storage.exists(uri):
        raise FileNotFoundError(f"relation specs {uri}: not found")
    text = storage.read_bytes(uri).decode("utf-8-sig")
    items: list[tuple[str, Any]] = []
    if lower.endswith(_JSONL_SUFFIXES):
        for line, content in enumerate(text.splitlines(), start=1):
            if content.strip():
                try:
                    items.append((f"spec {len(items)} (line {line})", json.loads(content)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"relation specs {uri}: line {line} is not valid JSON ({e.msg}): "
                                     f"{content[:200]!r}") from None
    else:
        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"relation specs {uri}: not valid YAML ({e})") from None
        if isinstance(document, dict):
            if set(document) != {"relations"}:
                raise ValueError(f"relation specs {uri}: a mapping must have the single key 'relations' (a list of "
                                 f"specs), got keys {sorted(map(str, document))}")
            document = document["relations"]
        if not isinstance(document, list):
            raise ValueError(f"relation specs {uri}: expected a list of specs (or {{relations: [...]}}), got "
                             f"{type(document).__name__}")
        items = [(f"spec {k}", record) for k, record in enumerate(document)]
    specs = _validate_specs(items, f"relation specs {uri}")
    logger.info("read %d relation specs (%d samples) from %s", len(specs), sum(s.count for s in specs), uri)
    return specs


def write_relation_specs(specs: Iterable[Union[RelationSpec, dict]], uri: str) -> None:
    """Write specs as YAML (``{"relations": [...]}``) or JSONL, by ``uri``'s suffix (atomic); unset optional
    fields are left out."""
    uri = str(uri)
    items = list(specs)
    validated = _validate_specs([(f"spec {k}", s) for k, s in enumerate(items)], f"relation specs {uri}")
    records = [s.model_dump(exclude_none=True) for s in validated]
    if uri.lower().endswith(_JSONL_SUFFIXES):
        text = "".join(json.dumps(r) + "\n" for r in records)
    elif uri.lower().endswith(_YAML_SUFFIXES):
        text = yaml.safe_dump({"relations": records}, sort_keys=False, allow_unicode=True)
    else:
        raise ValueError(f"relation specs {uri}: unsupported file type; expected .yaml, .yml, .json or .jsonl")
    storage.write_bytes_atomic(uri, text.encode("utf-8"))


# ----------------------------------------------------------------------------------------------------------- samples

class EngineSample(BaseModel):
    """One triplet to make: the target prompt, per subject its class, image prompt, seed and box (normalized xyxy
    in the target), and the target's seed and size. ``relation_phrase`` None: derive it from the prompt."""

    model_config = ConfigDict(extra="forbid")

    sample_id: str
    relation: str
    relation_phrase: Optional[str] = None
    prompt: str
    classes: list[str] = Field(min_length=1, max_length=MAX_SUBJECTS)
    subject_prompts: list[str]
    boxes: list[list[float]]
    seed: Int = Field(ge=0, lt=_SEED_LIMIT)
    subject_seeds: list[Int]
    width: Int = Field(ge=64, le=4096)
    height: Int = Field(ge=64, le=4096)
    steps: Int = Field(ge=1, le=200)

    @model_validator(mode="before")
    @classmethod
    def _plain(cls, data: Any) -> Any:
        """Rows of a Ray batch carry numpy arrays: read them as lists."""
        return normalize_record(data)

    @field_validator("sample_id", "relation")
    @classmethod
    def _key(cls, value: str, info) -> str:
        return check_key(value, info.field_name)

    @field_validator("boxes", mode="before")
    @classmethod
    def _boxes(cls, value: Any) -> Any:
        value = _as_list(value)
        if not isinstance(value, list):
            raise ValueError(f"boxes must be a list of [x0, y0, x1, y1] boxes, got {value!r}")
        return [_box(_as_list(b), f"boxes[{k}]") for k, b in enumerate(value)]

    @model_validator(mode="after")
    def _one_per_subject(self) -> "EngineSample":
        n = len(self.classes)
        for name in ("subject_prompts", "boxes", "subject_seeds"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"sample {self.sample_id!r}: {name} has {len(getattr(self, name))} entries for "
                                 f"{n} classes (one per subject)")
        return self


def _sample(spec: RelationSpec, i: int, layouts: list[list[list[float]]]) -> EngineSample:
    n = spec.num_subjects
    rng = random.Random(f"{spec.seed}:{spec.relation}:{i}")
    template = spec.templates[i % len(spec.templates)]
    layout = layouts[(i // len(spec.templates)) % len(layouts)]
    classes = spec.class_sets[i % len(spec.class_sets)] if spec.class_sets is not None else rng.sample(spec.classes, n)
    seed = rng.randrange(_SEED_LIMIT)
    return EngineSample(
        sample_id=f"{spec.relation}-{i:05d}",
        relation=spec.relation,
        relation_phrase=spec.relation_phrase,
        prompt=template.format(*classes),
        classes=list(classes),
        subject_prompts=[spec.subject_prompt.format(**{"class": c}) for c in classes],
        boxes=[list(box) for box in layout],
        seed=seed,
        subject_seeds=[rng.randrange(_SEED_LIMIT) for _ in classes],
        width=spec.width,
        height=spec.height,
        steps=spec.steps,
    )


def expand_specs(specs: Iterable[Union[RelationSpec, dict]]) -> list[EngineSample]:
    """Every sample of ``specs``, spec by spec, ``{relation}-00000`` upward. Deterministic (see module docstring);
    raises ``ValueError`` for invalid specs or a relation given twice."""
    validated = _validate_specs([(f"spec {k}", s) for k, s in enumerate(specs)], "relation specs")
    samples = []
    for spec in validated:
        layouts = spec.resolved_layouts()
        samples.extend(_sample(spec, i, layouts) for i in range(spec.count))
    return samples
