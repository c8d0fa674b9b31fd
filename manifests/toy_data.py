"""Toy-world data on disk: generation manifests, relation triplets and RelationBench-style cases, drawn from
``dreamrelation.toy.world`` (shapes with a colour and a pattern, acting out geometric relations at 64 x 64).

Every kind is a folder (any fsspec URL) whose rows name their images relative to it, so the folder moves whole::

    {out}/manifest.parquet         --kind manifest: one generation row per scene (GenerationRow)
    {out}/triplets.parquet         --kind triplets: one fine-tuning triplet per scene (what `train relations` reads)
    {out}/relationbench.parquet    --kind relationbench: rb-single-NNNN then rb-multi-NNNN cases
    {out}/relation_spec.yaml       --kind spec: relation specs of the data engine (`data generate`), n samples
                                   per relation of one or two subjects, each with its own subjects and layout
    {out}/subjects/{slug}.png      each identity alone, centred (its image prompt), written once, shared by rows
    {out}/references/{row_id}.png  the render a manifest / relationbench row describes (metadata "reference")
    {out}/images/{triplet_id}/     a triplet's target.png and mask{k}.png (visible pixels)

Scenes are deterministic: row ``i`` of a draw with ``seed`` is ``world.scene(relation, scene_seed, size)`` with the
relation and scene seed recorded in the row (``metadata["scene_seed"]``), so ``dreamrelation.toy.oracle`` can
judge a generated image against the row's phrases and relation. Relations are used round-robin in the order given.
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Callable, Iterable, Sequence

from PIL import Image

from dreamrelation.toy import world
from manifests import storage
from manifests.io import write_manifest
from manifests.schema import GenerationRow
from manifests.triplets import TripletRow, triplets_uri, write_triplets

logger = logging.getLogger(__name__)

__all__ = ["KINDS", "MANIFEST_FILE", "RELATIONBENCH_FILE", "SOURCE", "SPEC_FILE", "toy_relations",
           "write_toy_manifest", "write_toy_relationbench", "write_toy_spec", "write_toy_triplets", "write_toy_world"]

KINDS = ("manifest", "triplets", "relationbench", "spec")
MANIFEST_FILE = "manifest.parquet"
SPEC_FILE = "relation_spec.yaml"
SUBJECT_PROMPT = "A {class} is in the middle of the picture."  # the toy world's caption of a subject alone
RELATIONBENCH_FILE = "relationbench.parquet"
SOURCE = "toy-world"
KEYPOINT_LAYOUTS_KEY = "keypoint_layouts"  # == dreamrelation.train.data.LAYOUTS_KEY (no import: that module is the model's)


def toy_relations(relations: Iterable[str] | None = None, arities: Sequence[int] = (1, 2, 3)) -> list[str]:
    """The toy relation ids to draw from: ``relations`` (checked, in order) or every one, of the given arities."""
    if relations is None:
        return [r.id for r in world.RELATIONS if r.arity in arities]
    wanted = list(relations)
    if not wanted:
        raise ValueError(f"--relations must name at least one toy relation, expected some of "
                         f"{[r.id for r in world.RELATIONS]}, got none")
    known = [r.id for r in world.RELATIONS]
    unknown = [r for r in wanted if r not in known]
    if unknown:
        raise ValueError(f"--relations: {unknown[0]!r} is not a toy relation id; expected some of {known}")
    return [r for r in wanted if world.relation(r).arity in arities]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _check(n: int, what: str, size: int, minimum: int = 0) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < minimum:
        raise ValueError(f"{what} must be a whole number >= {minimum}, got {n!r}")
    world.check_size(size)


class _Writer:
    """Writes a kind's images under ``folder``: subject images once per identity."""

    def __init__(self, folder: str, size: int) -> None:
        self.folder, self.size = folder.rstrip("/"), size
        self.subjects: dict[world.Identity, tuple[str, list[list[float]]]] = {}

    def write(self, relative: str, image: Image.Image) -> str:
        """Write ``image`` as PNG at ``{folder}/{relative}``; returns ``relative``."""
        storage.write_bytes_atomic(storage.join(self.folder, relative), _png(image))
        return relative

    def subject(self, identity: world.Identity) -> tuple[str, list[list[float]]]:
        """The identity's portrait (relative path) and its 17 normalized keypoints."""
        if identity not in self.subjects:
            image, keypoints = world.portrait(identity, self.size)
            self.subjects[identity] = (self.write(f"subjects/{identity.slug}.png", image), keypoints.tolist())
        return self.subjects[identity]


def _draws(n: int, relations: Sequence[str], seed: int, size: int) -> list[tuple[int, world.Render]]:
    """``n`` (scene seed, render) pairs, relations round-robin, scene seeds drawn from ``seed``."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        scene_seed = rng.randrange(2**31)
        out.append((scene_seed, world.scene(relations[i % len(relations)], scene_seed, size)))
    return out


def _generation_row(writer: _Writer, row_id: str, scene_seed: int, render: world.Render,
                    metadata: dict[str, str], named: bool = True) -> GenerationRow:
    reference = writer.write(f"references/{row_id}.png", render.image)
    return GenerationRow(
        row_id=row_id, prompt=render.caption, relation=render.relation.id if named else None,
        relation_phrase=render.relation.phrase,
        subjects=[{"image": writer.subject(i)[0], "phrase": i.phrase, "box": box.tolist()}
                  for i, box in zip(render.identities, render.boxes)],
        seed=scene_seed, width=writer.size, height=writer.size,
        metadata={"source": SOURCE, "scene_seed": str(scene_seed), "reference": reference,
                  "toy_relation": render.relation.id, **metadata})


def write_toy_manifest(folder: str, n: int, seed: int = 0, relations: Iterable[str] | None = None,
                       size: int = world.SIZE, lora_relations: Iterable[str] | None = None) -> str:
    """``n`` generation rows ``toy-00000 ...`` to ``{folder}/manifest.parquet``; returns its URI.

    ``lora_relations``: the relations whose rows name their relation (so a batch job applies that relation's LoRA);
    the other rows leave ``relation`` empty (the model reads the relation from the prompt, as the toy preset does
    for the relations it was trained on). None: every row names its relation."""
    _check(n, "n", size)
    named = None if lora_relations is None else {world.relation(r).id for r in lora_relations}
    writer = _Writer(folder, size)
    rows = [_generation_row(writer, f"toy-{i:05d}", scene_seed, render, {},
                            named is None or render.relation.id in named)
            for i, (scene_seed, render) in enumerate(_draws(n, toy_relations(relations), seed, size))]
    uri = storage.join(folder, MANIFEST_FILE)
    write_manifest(rows, uri)
    logger.info("wrote %d toy rows to %s", len(rows), uri)
    return uri


def write_toy_relationbench(folder: str, n_single: int, n_multi: int, seed: int = 0,
                            size: int = world.SIZE) -> str:
    """RelationBench-style cases to ``{folder}/relationbench.parquet``: ``n_single`` rows ``rb-single-NNNN`` over
    the one-subject relations, then ``n_multi`` rows ``rb-multi-NNNN`` over the two- and three-subject ones, each
    relation's text its template (``metadata["template"]``: its number in ``world.RELATIONS``, from 1)."""
    _check(n_single, "n_single", size)
    _check(n_multi, "n_multi", size)
    writer = _Writer(folder, size)
    rng = random.Random(seed)
    rows = []
    for kind, n, arities in (("single", n_single, (1,)), ("multi", n_multi, (2, 3))):
        for i, (scene_seed, render) in enumerate(_draws(n, toy_relations(None, arities), rng.randrange(2**31), size)):
            number = [r.id for r in world.RELATIONS].index(render.relation.id) + 1
            rows.append(_generation_row(writer, f"rb-{kind}-{i:04d}", scene_seed, render, {
                "benchmark": "toy-relationbench", "kind": kind, "template": str(number),
                "subjects": ", ".join(identity.phrase for identity in render.identities)}))
    uri = storage.join(folder, RELATIONBENCH_FILE)
    write_manifest(rows, uri)
    logger.info("wrote %d toy RelationBench cases to %s", len(rows), uri)
    return uri


def write_toy_triplets(folder: str, n: int, seed: int = 0, relations: Iterable[str] | None = None,
                       size: int = world.SIZE) -> str:
    """``n`` triplets ``toy-00000 ...`` to ``{folder}/triplets.parquet``: the render as target, each identity's
    portrait as its subject image, visible masks, keypoints in both (``world.KEYPOINT_NAMES`` order, the "points"
    layout) and target visibilities (0 where a keypoint is hidden). Returns the Parquet file's URI."""
    _check(n, "n", size)
    writer = _Writer(folder, size)
    rows = []
    for i, (scene_seed, render) in enumerate(_draws(n, toy_relations(relations), seed, size)):
        tid = f"toy-{i:05d}"
        subjects = []
        for k, identity in enumerate(render.identities):
            image, keypoints = writer.subject(identity)
            mask = Image.fromarray(render.masks[k].astype("uint8") * 255, "L")
            subjects.append({
                "image": storage.join(writer.folder, image), "phrase": identity.phrase,
                "box": render.boxes[k].tolist(),
                "mask": storage.join(writer.folder, writer.write(f"images/{tid}/mask{k}.png", mask)),
                "target_keypoints": render.keypoints[k].tolist(), "subject_keypoints": keypoints,
                "target_visibility": render.visibility[k].tolist(), "subject_visibility": None})
        rows.append(TripletRow.model_validate({
            "triplet_id": tid, "relation": render.relation.id,
            "target": storage.join(writer.folder, writer.write(f"images/{tid}/target.png", render.image)),
            "prompt": render.caption, "relation_phrase": render.relation.phrase, "subjects": subjects,
            "source": SOURCE,
            "metadata": {"scene_seed": str(scene_seed),
                         KEYPOINT_LAYOUTS_KEY: ",".join([world.KEYPOINT_LAYOUT] * len(subjects))}}))
    write_triplets(rows, folder)  # paths inside the folder are stored relative to it
    logger.info("wrote %d toy triplets to %s", len(rows), triplets_uri(folder))
    return triplets_uri(folder)


def write_toy_spec(folder: str, n: int, seed: int = 0, relations: Iterable[str] | None = None,
                   size: int = world.SIZE, steps: int = 25) -> str:
    """Relation specs of the data engine to ``{folder}/relation_spec.yaml``: per toy relation of one or two
    subjects (the engine's templates name at most two), ``n`` samples ``{relation}-NNNNN``, sample ``i`` with the
    subjects and the layout of ``world.sample_layout(relation, scene seed i)`` (``class_sets`` and ``layouts`` of
    length ``n``, which the engine uses in step), the relation's caption as the template, and each subject image
    prompted as the world's caption of that subject alone (``SUBJECT_PROMPT``). Returns the file's URI."""
    from manifests.relation_spec import write_relation_specs

    _check(n, "n", size, minimum=1)
    rng = random.Random(seed)
    specs = []
    for relation_id in toy_relations(relations, arities=(1, 2)):
        rel = world.relation(relation_id)
        layouts = [world.sample_layout(rel.id, rng.randrange(2**31), size) for _ in range(n)]
        specs.append({
            "relation": rel.id, "templates": [rel.text.format(*(f"{{{k}}}" for k in range(rel.arity)))],
            "class_sets": [[i.phrase for i in layout.identities] for layout in layouts],
            "layouts": [[[float(v) / size for v in box] for box in layout.boxes] for layout in layouts],
            "relation_phrase": rel.phrase, "subject_prompt": SUBJECT_PROMPT, "count": n,
            "seed": rng.randrange(2**31), "width": size, "height": size, "steps": steps})
    if not specs:
        raise ValueError(f"--relations: the data engine makes relations of one or two subjects; "
                         f"{list(relations or [])} has none")
    uri = storage.join(folder, SPEC_FILE)
    write_relation_specs(specs, uri)
    logger.info("wrote %d toy relation specs (%d samples each) to %s", len(specs), n, uri)
    return uri


def write_toy_world(output: str, kind: str, n: int, seed: int = 0, relations: Iterable[str] | None = None,
                    size: int = world.SIZE, lora_relations: Iterable[str] | None = None) -> str:
    """One of ``KINDS`` to the folder ``output`` (``relationbench``: ``n`` cases of each kind, single and multi,
    as the paper's 100 + 100; ``spec``: ``n`` samples per relation; ``relations`` is for the other kinds). Returns
    the written file's URI."""
    writers: dict[str, Callable[[], str]] = {
        "manifest": lambda: write_toy_manifest(output, n, seed, relations, size, lora_relations),
        "triplets": lambda: write_toy_triplets(output, n, seed, relations, size),
        "relationbench": lambda: write_toy_relationbench(output, n, n, seed, size),
        "spec": lambda: write_toy_spec(output, n, seed, relations, size),
    }
    if kind not in writers:
        raise ValueError(f"--kind must be one of {list(KINDS)}, got {kind!r}")
    _check(n, "--n", size, minimum=1)
    if kind != "manifest" and lora_relations is not None:
        raise ValueError(f"--lora-relations applies to --kind manifest only, got it with --kind {kind}")
    if kind == "relationbench" and relations is not None:
        raise ValueError("--relations does not apply to --kind relationbench (it uses every toy relation, "
                         f"single then multi), got {list(relations)!r}")
    return writers[kind]()
