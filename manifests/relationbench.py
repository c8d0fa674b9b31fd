"""RelationBench (paper section 10, Table 10): the 25 prompt templates and a deterministic case builder.

Each template carries its relation id (the one name of a relation: manifest column, LoRA name, cache key), the
relation phrase CLIP-R scores, and a default layout: one normalized box for the 14 single-subject templates, two
for the 11 two-subject ones (side by side, overlapping for close contact, apart for chess / fencing, stacked for
carrying). The template texts are the paper's, verbatim (including "on the diving room").

    rows = build_cases(subjects_from_dir("manifests/examples/subjects"), n_single=100, n_multi=100, seed=0)

Cases may also come ready-made from a manifest (:func:`read_cases`, e.g. the toy world's RelationBench-style cases
of ``dreamrelation data toy-world --kind relationbench``); :func:`relation_sort_key` orders any relation id.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath

from dreamrelation.toy import world
from manifests import storage
from manifests.io import read_manifest
from manifests.schema import GenerationRow

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
KINDS = ("single", "multi")  # single-subject and two-subject cases (the paper's Single-object | Multi-object)

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Template:
    """One prompt of Table 10: ``text`` has one ``{}`` per subject."""

    number: int  # row of Table 10
    relation: str
    text: str
    phrase: str
    boxes: tuple[Box, ...]

    @property
    def num_subjects(self) -> int:
        return len(self.boxes)

    def prompt(self, names: list[str]) -> str:
        if len(names) != self.num_subjects:
            raise ValueError(f"template {self.relation!r} takes {self.num_subjects} subjects, got {names!r}")
        return self.text.format(*names)


# Layouts (x0, y0, x1, y1), normalized. Single subject: a centred figure, adjusted to the action.
_STANDING: Box = (0.28, 0.12, 0.72, 0.92)
_RIDING: Box = (0.3, 0.08, 0.7, 0.62)  # the rider sits above the bike / horse / motorbike (not a subject)
# Two subjects: left and right.
_SIDE_BY_SIDE = ((0.06, 0.18, 0.5, 0.92), (0.5, 0.18, 0.94, 0.92))
_CLOSE = ((0.14, 0.15, 0.56, 0.92), (0.44, 0.15, 0.86, 0.92))  # touching: hugging, kissing, wrestling, dancing
_APART = ((0.02, 0.25, 0.4, 0.92), (0.6, 0.25, 0.98, 0.92))  # a table / a piste between them
# Public layouts (one box per subject), the data engine's defaults (manifests.relation_spec).
STANDING_LAYOUT, SIDE_BY_SIDE_LAYOUT, CLOSE_LAYOUT = (_STANDING,), _SIDE_BY_SIDE, _CLOSE

TEMPLATES: tuple[Template, ...] = (
    Template(1, "playing_guitar", "A {} is playing guitar on a park bench.", "playing guitar", ((0.25, 0.2, 0.75, 0.9),)),
    Template(2, "playing_piano", "A {} is playing piano in a grand hall.", "playing piano", ((0.15, 0.2, 0.55, 0.88),)),
    Template(3, "eating_dinner", "A {} is eating dinner in a bustling restaurant.", "eating dinner",
             ((0.3, 0.15, 0.7, 0.75),)),
    Template(4, "dancing", "A {} is dancing in the moonlight.", "dancing", (_STANDING,)),
    Template(5, "lifting_weights", "A {} is lifting weights in a modern gym.", "lifting weights", (_STANDING,)),
    Template(6, "reading_book", "A {} is reading a book by the fireplace.", "reading a book", ((0.25, 0.25, 0.65, 0.88),)),
    Template(7, "skiing", "A {} is skiing down a steep slope in the Alps, with snowflakes falling gently.", "skiing",
             ((0.3, 0.25, 0.7, 0.85),)),
    Template(8, "sleeping_in_hammock", "A {} is sleeping peacefully in a hammock under the shade of a palm tree.",
             "sleeping in a hammock", ((0.15, 0.4, 0.85, 0.75),)),
    Template(9, "cooking_lunch", "A {} is cooking lunch in a kitchen.", "cooking lunch", (_STANDING,)),
    Template(10, "singing", "A {} is singing on stage during a vibrant music festival.", "singing on stage", (_STANDING,)),
    Template(11, "riding_bike", "A {} is riding a bike along the scenic countryside road.", "riding a bike", (_RIDING,)),
    Template(12, "riding_horse", "A {} is riding a horse on the grassland.", "riding a horse", (_RIDING,)),
    Template(13, "riding_motorbike", "A {} is riding a motorbike on the street.", "riding a motorbike", (_RIDING,)),
    Template(14, "playing_soccer", "A {} is playing soccer on football playground.", "playing soccer", (_STANDING,)),
    Template(15, "playing_chess", "A {} is playing chess with a {} under a tree.", "playing chess with", _APART),
    Template(16, "partner_dancing", "A {} is partner dancing with a {} in a vintage ballroom.", "partner dancing with",
             _CLOSE),
    # the carrier below, the carried one above it
    Template(17, "carrying", "A {} is carrying a {} on the diving room.", "carrying",
             ((0.2, 0.4, 0.8, 0.95), (0.3, 0.05, 0.7, 0.5))),
    Template(18, "fencing", "A {} is fencing with a {} in an elegant arena.", "fencing with", _APART),
    Template(19, "shaking_hands", "A {} shakes hands with a {} in the forest.", "shakes hands with", _SIDE_BY_SIDE),
    Template(20, "kissing", "A {} is kissing a {}.", "kissing", _CLOSE),
    Template(21, "playing_basketball", "A {} is playing basketball with a {} on a street court.",
             "playing basketball with", _SIDE_BY_SIDE),
    Template(22, "wrestling", "A {} is wrestling with a {} in a championship ring.", "wrestling with", _CLOSE),
    Template(23, "hugging", "A {} is hugging a {} in front of the mountain.", "hugging", _CLOSE),
    Template(24, "fighting", "A {} is fighting with a {} in a garden.", "fighting with", _SIDE_BY_SIDE),
    Template(25, "sitting_back_to_back", "A {} is sitting back to back with a {} on a hilltop.",
             "sitting back to back with", ((0.1, 0.25, 0.52, 0.92), (0.48, 0.25, 0.9, 0.92))),
)

SINGLE_TEMPLATES = tuple(t for t in TEMPLATES if t.num_subjects == 1)
MULTI_TEMPLATES = tuple(t for t in TEMPLATES if t.num_subjects == 2)
_BY_RELATION = {t.relation: t for t in TEMPLATES}


def template(relation: str) -> Template:
    """The template of a relation id (``ValueError`` listing the ids when unknown)."""
    try:
        return _BY_RELATION[relation]
    except KeyError:
        raise ValueError(f"--relations: {relation!r} is not a RelationBench relation id; "
                         f"expected one of {sorted(_BY_RELATION)}") from None


_TOY_ORDER = {r.id: i for i, r in enumerate(world.RELATIONS)}


def relation_sort_key(relation: str | None) -> tuple[int, int, str]:
    """The order of per-relation tables and plots, for any relation id: RelationBench ids by their Table 10 number,
    then the toy world's in ``world.RELATIONS`` order, then any other id alphabetically, then no relation."""
    if relation in _BY_RELATION:
        return (0, _BY_RELATION[relation].number, "")
    if relation in _TOY_ORDER:
        return (1, _TOY_ORDER[relation], "")
    return (2, 0, relation) if relation else (3, 0, "")


def subject_name(uri: str) -> str:
    """The subject's words from its file name: ``.../plushie_bear.png`` -> ``plushie bear``."""
    stem = PurePosixPath(str(uri).replace("\\", "/")).stem
    return " ".join(stem.replace("_", " ").replace("-", " ").split())


def subjects_from_dir(directory: str) -> list[tuple[str, str]]:
    """``(name, image URI)`` for every png / jpg / jpeg / webp directly under ``directory`` (any fsspec URL),
    sorted by URI."""
    uris = [u for u in storage.list_files(directory) if u.lower().endswith(IMAGE_SUFFIXES)]
    return [(subject_name(u), u) for u in sorted(uris)]


def _row(kind: str, i: int, tmpl: Template, chosen: list[tuple[str, str]], seed: int, options: dict) -> GenerationRow:
    names = [name for name, _ in chosen]
    return GenerationRow(
        row_id=f"rb-{kind}-{i:04d}",
        prompt=tmpl.prompt(names),
        relation=tmpl.relation,
        relation_phrase=tmpl.phrase,
        subjects=[{"image": uri, "phrase": name, "box": list(box)} for (name, uri), box in zip(chosen, tmpl.boxes)],
        seed=seed,
        **options,
        metadata={"benchmark": "relationbench", "kind": kind, "template": str(tmpl.number),
                  "subjects": ", ".join(names)},
    )


def case_kind(row: GenerationRow) -> str:
    """``"single"`` or ``"multi"``: the row's ``metadata["kind"]`` when set, else from its subject count."""
    kind = row.metadata.get("kind")
    if kind in KINDS:
        return kind
    return "single" if len(row.subjects) == 1 else "multi"


def _selected(relations: Iterable[str] | None) -> tuple[tuple[Template, ...], tuple[Template, ...]]:
    """(single, multi) templates, restricted to ``relations`` when given (each must be a RelationBench id)."""
    if relations is None:
        return SINGLE_TEMPLATES, MULTI_TEMPLATES
    wanted = list(relations)
    if not wanted:
        raise ValueError("--relations must name at least one RelationBench relation id (or be left out for all 25), "
                         "got none")
    keep = {template(r).relation for r in wanted}
    return (tuple(t for t in SINGLE_TEMPLATES if t.relation in keep),
            tuple(t for t in MULTI_TEMPLATES if t.relation in keep))


def build_cases(subjects: list[tuple[str, str]], n_single: int = 100, n_multi: int = 100, seed: int = 0,
                width: int = 1024, height: int = 1024, steps: int = 30, num_images: int = 1,
                relations: Iterable[str] | None = None) -> list[GenerationRow]:
    """RelationBench cases: ``n_single`` single-subject rows then ``n_multi`` two-subject rows.

    Templates are used round-robin (every template appears once ``n_single >= 14`` and ``n_multi >= 11``); subjects
    are drawn at random without replacement within a case (two distinct images for a two-subject template); each
    row gets its own generation seed. The same arguments give the same rows. ``steps``, ``num_images``, ``width``
    and ``height`` go to every row unchanged (they do not change the draw). ``relations`` keeps only those
    templates (e.g. the relations that have a LoRA); a kind with cases wanted but no template kept is an error.
    """
    if n_single < 0 or n_multi < 0:
        raise ValueError(f"--n-single and --n-multi must be >= 0, got {n_single} and {n_multi}")
    relations = None if relations is None else list(relations)
    singles, multis = _selected(relations)
    for n, kept, name in ((n_single, singles, "--n-single"), (n_multi, multis, "--n-multi")):
        if n and not kept:
            raise ValueError(f"--relations {','.join(sorted(relations or []))!r} hold no "
                             f"{'single' if name == '--n-single' else 'two'}-subject template, but {name} is {n}; "
                             f"pass {name} 0 or add such a relation")
    by_uri = list({str(uri): (str(name), str(uri)) for name, uri in subjects}.values())  # one entry per image
    if n_single and not by_uri:
        raise ValueError("SUBJECTS_DIR holds no subject image, but single-subject cases are wanted")
    if n_multi and len(by_uri) < 2:
        raise ValueError(f"two-subject cases (--n-multi) need at least 2 distinct subject images, got {by_uri!r}")
    options = {"width": width, "height": height, "steps": steps, "num_images": num_images}
    rng = random.Random(seed)
    rows = []
    for i in range(n_single):
        tmpl = singles[i % len(singles)]
        rows.append(_row("single", i, tmpl, [rng.choice(by_uri)], rng.randrange(2**31), options))
    for i in range(n_multi):
        tmpl = multis[i % len(multis)]
        rows.append(_row("multi", i, tmpl, rng.sample(by_uri, 2), rng.randrange(2**31), options))
    return rows


def read_cases(uri: str, relations: Iterable[str] | None = None, steps: int | None = None,
               num_images: int | None = None, width: int | None = None, height: int | None = None,
               ) -> list[GenerationRow]:
    """Ready-made cases: the rows of the manifest at ``uri`` (any relation ids, e.g. a toy world's
    ``relationbench.parquet``; relative subject paths resolved against its folder), in file order.

    ``relations`` keeps only rows whose relation is listed (``ValueError`` listing the ids the cases have when one
    is unknown); ``steps``, ``num_images``, ``width`` and ``height`` replace every row's own when given. Any rejected
    row is a ``ValueError`` naming the file and the first rejection; so is a file without rows."""
    rows, rejected = read_manifest(uri)
    if rejected:
        first = rejected[0]
        raise ValueError(f"--cases {uri}: {len(rejected)} invalid row(s); the first, row {first.index} "
                         f"({first.row_id}): {first.field}: {first.reason}")
    if not rows:
        raise ValueError(f"--cases {uri} holds no case")
    if relations is not None:
        wanted = list(dict.fromkeys(relations))
        have = sorted({r.relation for r in rows if r.relation}, key=relation_sort_key)
        unknown = [r for r in wanted if r not in have]
        if not wanted:
            raise ValueError(f"--relations must name at least one relation of --cases {uri} (or be left out for "
                             f"all), got none; they have {have}")
        if unknown:
            raise ValueError(f"--relations: {unknown} not among the relations of --cases {uri}; they have {have}")
        rows = [r for r in rows if r.relation in wanted]
    given = {"steps": steps, "num_images": num_images, "width": width, "height": height}
    update = {k: v for k, v in given.items() if v is not None}
    return [GenerationRow.model_validate({**r.model_dump(), **update}) for r in rows] if update else rows
