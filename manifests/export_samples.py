"""The samples of a synthetic relation dataset: a batch run's rows joined with its results, one sample per image.

A batch run folder (any fsspec URL) holds ``manifest.parquet`` (the accepted rows, written by ``batch submit``),
``results/*.parquet`` (one ``ResultRow`` per row) and ``images/{row_id}/{k}.png``. Older runs have no
``manifest.parquet``; their ``run.json`` names the manifest they were made from (``manifest`` key; a relative path is
resolved against the run folder first, then taken as it was given).

Every image of a row with ``status == "ok"`` is a candidate sample ``(row_id, k)``. :class:`ExportFilter` keeps those
whose per-image metrics reach the thresholds (and, with ``passed_only``, whose row passed the quality gate). Each
candidate ends up as a sample or counted under exactly one reason (the first that applies, in this order):
``not_in_manifest``, ``gate_failed``, ``missing_image``, then ``no_{metric}`` / ``below_min_{metric}`` in the order of
:data:`METRICS`. So ``samples + sum(filtered_out.values()) == images``.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from manifests import storage
from manifests.io import ManifestError, read_manifest_table, read_table, validate_table
from manifests.schema import GenerationRow

logger = logging.getLogger(__name__)

__all__ = [
    "METRICS", "MANIFEST_FILE", "ExportError", "ExportFilter", "RunSamples", "Sample", "collect_samples",
    "final_seeds", "find_manifest", "locate", "read_result_records", "read_run_json", "sample_key",
]

METRICS = ("clip_t", "clip_r", "clip_i", "clip_i_crop", "dino")  # ResultRow per-image lists, x100
MANIFEST_FILE = "manifest.parquet"
MAX_REPORTED = 100  # missing image URIs listed in a summary

RelationPhraseFn = Callable[[str, list[str]], str]  # (prompt, subject phrases) -> relation words


class ExportError(ValueError):
    """The run cannot be exported (no results, no manifest, nothing left after the filters)."""


@dataclass(frozen=True)
class ExportFilter:
    """Which images become samples: per-image metric minimums (x100 scale; None: no threshold) and the gate."""

    min_clip_t: Optional[float] = None
    min_clip_r: Optional[float] = None
    min_clip_i: Optional[float] = None
    min_clip_i_crop: Optional[float] = None
    min_dino: Optional[float] = None
    passed_only: bool = False  # keep rows whose gate is "passed" (rows without a gate are all kept)

    def __post_init__(self) -> None:
        for metric in METRICS:
            value = getattr(self, f"min_{metric}")
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                      or not math.isfinite(value)):
                raise ValueError(f"min_{metric} must be a finite number or None, got {value!r}")
        if not isinstance(self.passed_only, bool):
            raise ValueError(f"passed_only must be a bool, got {self.passed_only!r}")

    def thresholds(self) -> dict[str, float]:
        """{metric: minimum} of the thresholds that are set, in :data:`METRICS` order."""
        return {m: float(getattr(self, f"min_{m}")) for m in METRICS if getattr(self, f"min_{m}") is not None}

    def describe(self) -> dict[str, Any]:
        """The filters that are set, by option name (``{"min_clip_r": 20.0, "passed_only": True}``)."""
        out: dict[str, Any] = {f"min_{m}": v for m, v in self.thresholds().items()}
        if self.passed_only:
            out["passed_only"] = True
        return out

    def metric_reason(self, metrics: dict[str, Optional[float]]) -> Optional[str]:
        """Why an image with these metrics is filtered out (``no_clip_r``: not computed; ``below_min_clip_r``),
        or None when it passes every threshold."""
        for metric, minimum in self.thresholds().items():
            value = metrics.get(metric)
            if value is None:
                return f"no_{metric}"
            if value < minimum:
                return f"below_min_{metric}"
        return None


def sample_key(row_id: str, k: int) -> str:
    """The key of image ``k`` of ``row_id`` in every format: ``{row_id}_{k}`` with '.' replaced by '~' (webdataset
    splits a member name at its first dot; '~' cannot occur in a row id, so keys stay unique)."""
    return f"{row_id.replace('.', '~')}_{int(k)}"


@dataclass(frozen=True)
class Sample:
    """One image of the dataset with its labels. Boxes: the layout boxes the image was generated with (normalized
    xyxy in [0, 1]), one per subject, in the order of ``subject_phrases``."""

    row_id: str
    k: int
    image: str  # URI of the PNG in the run
    prompt: str
    seed: int
    relation: Optional[str]
    relation_phrase: Optional[str]
    subject_phrases: tuple[str, ...]
    boxes: tuple[tuple[float, float, float, float], ...]
    width: int
    height: int
    metrics: dict[str, Optional[float]] = field(default_factory=dict)  # METRICS -> value x100 or None
    gate: Optional[str] = None

    @property
    def key(self) -> str:
        return sample_key(self.row_id, self.k)

    def pixel_boxes(self) -> list[list[float]]:
        """Boxes in pixels, xyxy, clipped to the image: (n_subjects, 4)."""
        w, h = self.width, self.height
        return [[round(min(max(x0 * w, 0.0), w), 3), round(min(max(y0 * h, 0.0), h), 3),
                 round(min(max(x1 * w, 0.0), w), 3), round(min(max(y1 * h, 0.0), h), 3)]
                for x0, y0, x1, y1 in self.boxes]

    def labels(self) -> dict[str, Any]:
        """Every label of the sample as plain JSON values (what webdataset's ``{key}.json`` holds)."""
        return {
            "key": self.key, "row_id": self.row_id, "k": self.k, "prompt": self.prompt, "seed": self.seed,
            "relation": self.relation, "relation_phrase": self.relation_phrase,
            "subject_phrases": list(self.subject_phrases), "boxes": [list(b) for b in self.boxes],
            "boxes_pixel": self.pixel_boxes(), "width": self.width, "height": self.height,
            **{m: self.metrics.get(m) for m in METRICS}, "gate": self.gate,
        }


@dataclass
class RunSamples:
    """What :func:`collect_samples` found in a run."""

    output: str
    run: dict[str, Any]  # run.json ({} when absent)
    manifest: str  # the URI the rows were read from
    samples: list[Sample]
    rows_read: int  # result rows (one per row id)
    rows_error: int  # result rows with status "error" (they have no images)
    images: int  # images of ok rows (candidates)
    filtered_out: Counter = field(default_factory=Counter)  # reason -> images
    missing_images: list[str] = field(default_factory=list)  # URIs (the first MAX_REPORTED)


# ----------------------------------------------------------------------------------------------------- reading a run

def read_run_json(output: str) -> dict[str, Any]:
    """``{output}/run.json`` as a dict, or {} when the run has none."""
    uri = storage.join(output, "run.json")
    if not storage.exists(uri):
        return {}
    try:
        return json.loads(storage.read_bytes(uri))
    except ValueError as e:
        raise ExportError(f"{uri} is not valid JSON: {e}") from None


def locate(output: str, path: str) -> Optional[str]:
    """A path recorded in run.json: resolved against the run folder when relative (like manifests.io resolves
    subject images), else as it was given (relative to where the run was submitted); None if neither exists."""
    for candidate in dict.fromkeys((storage.resolve(output, path), path)):
        if storage.exists(candidate):
            return candidate
    return None


def find_manifest(output: str, run: dict[str, Any]) -> str:
    """The URI of the run's rows: ``{output}/manifest.parquet``, else run.json's ``manifest`` (relative: against the
    run folder, then as given)."""
    own = storage.join(output, MANIFEST_FILE)
    if storage.exists(own):
        return own
    named = run.get("manifest")
    if not named:
        raise ExportError(f"run {output!r} has no {MANIFEST_FILE} and its run.json names no manifest: the rows "
                          f"(prompts, subjects, boxes) of its results are unknown")
    found = locate(output, str(named))
    if found is not None:
        return found
    raise ExportError(f"run {output!r} has no {MANIFEST_FILE}, and the manifest its run.json names, {named!r}, "
                      f"was not found")


def read_run_rows(manifest_uri: str) -> dict[str, GenerationRow]:
    """The valid rows of the manifest by row id (relative subject paths resolved against its folder)."""
    accepted, rejected = validate_table(read_manifest_table(manifest_uri), base_uri=manifest_uri)
    if rejected:
        logger.warning("%s: %d rows do not validate; their results cannot be exported", manifest_uri, len(rejected))
    return {r.row_id: r for r in accepted}


def read_result_records(output: str) -> list[dict[str, Any]]:
    """Result rows of a run as dicts, one per row id (the latest ``finished_at`` wins), sorted by row id. Files are
    read as they are, so columns newer than this reader (``gate``, ``attempts``) come through."""
    latest: dict[str, dict[str, Any]] = {}
    for uri in storage.list_files(storage.join(output, "results"), ".parquet"):
        for record in read_table(uri).to_pylist():
            rid = record.get("row_id")
            old = latest.get(rid)
            if old is None or str(record.get("finished_at") or "") >= str(old.get("finished_at") or ""):
                latest[rid] = record
    return [latest[rid] for rid in sorted(latest)]


def final_seeds(result: dict[str, Any], row: GenerationRow) -> list[int]:
    """The seed of each image k of ``result``: under the quality gate, the seed of the attempt recorded for k whose
    ``image`` is the final image ``images[k]`` (else of k's last attempt); without attempts, ``row.seed + k``."""
    images = result.get("images") or []
    seeds = [row.seed + k for k in range(len(images))]
    best: dict[int, tuple[bool, int]] = {}  # k -> (is the final image, attempt number) of the seed taken
    for attempt in result.get("attempts") or []:
        if not isinstance(attempt, dict) or attempt.get("k") is None or attempt.get("seed") is None:
            continue
        k = int(attempt["k"])
        if not 0 <= k < len(seeds):
            continue
        rank = (attempt.get("image") == images[k], int(attempt.get("attempt") or 0))
        if k not in best or rank >= best[k]:
            best[k] = rank
            seeds[k] = int(attempt["seed"])
    return seeds


def _image_lister(output: str) -> Callable[[str], bool]:
    """``exists(uri)`` for image URIs: one listing of ``{output}/images`` (cheap on object stores), a stat for
    URIs elsewhere."""
    fs, root = storage.filesystem(storage.join(output, "images"))
    root = root.rstrip("/")
    try:
        fs.invalidate_cache(root)
        listed = set(fs.find(root)) if fs.exists(root) else set()
    except FileNotFoundError:
        listed = set()

    def exists(uri: str) -> bool:
        ifs, path = storage.filesystem(uri)
        if type(ifs) is type(fs) and path.startswith(root + "/"):
            return path in listed
        return ifs.exists(path)

    return exists


def _metric(result: dict[str, Any], metric: str, k: int) -> Optional[float]:
    values = result.get(metric) or []
    return float(values[k]) if k < len(values) and values[k] is not None else None


def collect_samples(output: str, filters: ExportFilter | None = None,
                    relation_phrase: RelationPhraseFn | None = None) -> RunSamples:
    """Join the run at ``output`` with its rows and keep the images that pass ``filters``, sorted by (row_id, k).

    ``relation_phrase(prompt, subject_phrases)``: the phrase of rows whose manifest gives none (the worker's own
    rule, e.g. ``dreamrelation.relation_phrase.relation_phrase``); None leaves it None. Raises :class:`ExportError`
    when the run has no results or its rows cannot be found.
    """
    filters = filters or ExportFilter()
    results = read_result_records(output)
    run = read_run_json(output)
    if not results:
        raise ExportError(f"no results found under {storage.join(output, 'results')!r}: is {output!r} the output "
                          f"folder of a batch run?")
    manifest = find_manifest(output, run)
    try:
        rows = read_run_rows(manifest)
    except ManifestError as e:
        raise ExportError(f"run {output!r}: cannot read its rows: {e}") from e
    exists = _image_lister(output)
    found = RunSamples(output=output, run=run, manifest=manifest, samples=[], rows_read=len(results),
                       rows_error=0, images=0)
    for result in results:
        if result.get("status") != "ok":
            found.rows_error += 1
            continue
        images = result.get("images") or []
        found.images += len(images)
        row = rows.get(result["row_id"])
        reason = ("not_in_manifest" if row is None
                  else "gate_failed" if filters.passed_only and result.get("gate") == "failed" else None)
        if reason:
            found.filtered_out[reason] += len(images)
            continue
        seeds = final_seeds(result, row)
        phrases = [s.phrase for s in row.subjects]
        phrase = row.relation_phrase or (relation_phrase(row.prompt, phrases) if relation_phrase else None)
        for k, uri in enumerate(images):
            metrics = {m: _metric(result, m, k) for m in METRICS}
            if not exists(uri):
                reason = "missing_image"
                if len(found.missing_images) < MAX_REPORTED:
                    found.missing_images.append(uri)
                logger.warning("image %d of row %r is missing: %s (skipped)", k, row.row_id, uri)
            else:
                reason = filters.metric_reason(metrics)
            if reason:
                found.filtered_out[reason] += 1
                continue
            found.samples.append(Sample(
                row_id=row.row_id, k=k, image=uri, prompt=row.prompt, seed=seeds[k], relation=row.relation,
                relation_phrase=phrase, subject_phrases=tuple(phrases),
                boxes=tuple(tuple(float(v) for v in s.box) for s in row.subjects),  # type: ignore[misc]
                width=row.width, height=row.height, metrics=metrics, gate=result.get("gate"),
            ))
    return found

