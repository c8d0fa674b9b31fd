"""The samples of a synthetic relation dataset: a batch run's final results, one sample per image.

A batch run folder (any fsspec URL) holds ``run.json``, ``results/`` (read through :mod:`manifests.ledger`: the
final ``ResultRow`` of each row) and ``images/{row_id}/{k}.png``. A result is self-contained: its ``request`` is the
manifest row it was generated from (prompt, subjects, boxes, size) and its provenance columns say what made its
images (model / adapter / local-encoder fingerprints, the relation LoRA file and the sha256 of its bytes). Every
sample carries that provenance, so an export describes the weights that made the images whatever the LoRA registry
or the model folders hold later.

Results of older runs have no ``request``: their rows come from ``{output}/manifest.parquet``, else from the manifest
run.json names (``manifest``; ``settings.manifest`` or ``configuration.manifest``; a relative path is resolved
against the run folder first, then taken as it was given).

Every image of a row with ``status == "ok"`` is a candidate sample ``(row_id, k)``. :class:`ExportFilter` keeps those
whose per-image metrics reach the thresholds (and, with ``passed_only``, whose row passed the quality gate). Each
candidate ends up as a sample or counted under exactly one reason (the first that applies, in this order):
``invalid_request`` (a recorded request that does not validate) or ``not_in_manifest`` (an older result whose row the
manifest lacks), ``gate_failed``, ``missing_image``, then ``no_{metric}`` / ``below_min_{metric}`` in the order of
:data:`METRICS`. So ``samples + sum(filtered_out.values()) == images``.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from pydantic import ValidationError

from manifests import run_record, storage
from manifests.io import ManifestError, read_manifest_table, validate_table
from manifests.ledger import ledger_records
from manifests.schema import GenerationRow

logger = logging.getLogger(__name__)

__all__ = [
    "LABELED_PROVENANCE", "METRICS", "MANIFEST_FILE", "PROVENANCE", "ExportError", "ExportFilter", "RunSamples",
    "Sample", "collect_samples", "final_seeds", "find_manifest", "locate", "read_run_json", "recorded_manifest",
    "run_setting", "sample_key",
]

METRICS = ("clip_t", "clip_r", "clip_i", "clip_i_crop", "dino")  # ResultRow per-image lists, x100
MANIFEST_FILE = "manifest.parquet"
# what made a sample's image, from its result row (labels of every sample; the card's model and LoRA versions)
PROVENANCE = ("model_preset", "model_fingerprint", "adapter_fingerprint", "local_encoder_fingerprint", "lora_uri",
              "lora_sha256")
LABELED_PROVENANCE = ("model_fingerprint", "adapter_fingerprint", "local_encoder_fingerprint", "lora_sha256")
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
    # provenance, from the result row (None: not recorded, a run of an older version; or no relation LoRA)
    model_preset: Optional[str] = None
    model_fingerprint: Optional[str] = None
    adapter_fingerprint: Optional[str] = None
    local_encoder_fingerprint: Optional[str] = None
    lora_uri: Optional[str] = None  # the relation LoRA file as loaded for the row
    lora_sha256: Optional[str] = None  # sha256 of that file's bytes, exactly as loaded

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
            **{p: getattr(self, p) for p in LABELED_PROVENANCE},
        }


@dataclass
class RunSamples:
    """What :func:`collect_samples` found in a run."""

    output: str
    run: dict[str, Any]  # run.json as written, any version ({} when absent)
    manifest: Optional[str]  # the manifest file read for results without a request, else the run's as recorded
    samples: list[Sample]
    rows_read: int  # result rows (one per row id)
    rows_error: int  # result rows with status "error" (they have no images)
    images: int  # images of ok rows (candidates)
    filtered_out: Counter = field(default_factory=Counter)  # reason -> images
    missing_images: list[str] = field(default_factory=list)  # URIs (the first MAX_REPORTED)
    rows_from_manifest: int = 0  # ok rows whose result has no request (older runs): rows read from ``manifest``


# ----------------------------------------------------------------------------------------------------- reading a run

def read_run_json(output: str) -> dict[str, Any]:
    """``{output}/run.json`` as a dict, any version (``manifests.run_record.read_run_json``), or {} when the run has
    none; :class:`ExportError` when it is not a JSON object."""
    try:
        return run_record.read_run_json(output)
    except run_record.RunFormatError as e:
        raise ExportError(str(e)) from None


def run_setting(run: dict[str, Any], key: str) -> Any:
    """A setting of the run as its run.json recorded it: ``settings`` (format 2), else ``configuration`` (older
    runs; also its ``worker`` section), else a top-level key; None when not recorded."""
    for section in (run.get("settings"), run.get("configuration"), (run.get("configuration") or {}).get("worker")):
        if isinstance(section, dict) and section.get(key) is not None:
            return section[key]
    return run.get(key)


def locate(output: str, path: str) -> Optional[str]:
    """A path recorded in run.json: resolved against the run folder when relative (like manifests.io resolves
    subject images), else as it was given (relative to where the run was submitted); None if neither exists."""
    for candidate in dict.fromkeys((storage.resolve(output, path), path)):
        if storage.exists(candidate):
            return candidate
    return None


def recorded_manifest(run: dict[str, Any]) -> Optional[str]:
    """The manifest run.json names: ``manifest`` (older runs), ``settings.manifest`` (format 2) or
    ``configuration.manifest``; None when it names none."""
    named = run.get("manifest") or run_setting(run, "manifest")
    return str(named) if named else None


def find_manifest(output: str, run: dict[str, Any]) -> str:
    """The URI of the rows of results without a ``request`` (older runs): ``{output}/manifest.parquet``, else the
    manifest run.json names (relative: against the run folder, then as given)."""
    own = storage.join(output, MANIFEST_FILE)
    if storage.exists(own):
        return own
    named = recorded_manifest(run)
    if not named:
        raise ExportError(f"run {output!r} has results without their request (a run of an older version), no "
                          f"{MANIFEST_FILE} and a run.json that names no manifest: the rows (prompts, subjects, "
                          f"boxes) of its results are unknown")
    found = locate(output, named)
    if found is not None:
        return found
    raise ExportError(f"run {output!r} has results without their request (a run of an older version), no "
                      f"{MANIFEST_FILE}, and the manifest its run.json names, {named!r}, was not found")


def read_run_rows(manifest_uri: str) -> dict[str, GenerationRow]:
    """The valid rows of the manifest by row id (relative subject paths resolved against its folder)."""
    accepted, rejected = validate_table(read_manifest_table(manifest_uri), base_uri=manifest_uri)
    if rejected:
        logger.warning("%s: %d rows do not validate; their results cannot be exported", manifest_uri, len(rejected))
    return {r.row_id: r for r in accepted}


def request_row(result: dict[str, Any]) -> Optional[GenerationRow]:
    """The manifest row a result was generated from (its ``request``), or None when it has none (older runs) or
    the request does not validate (logged)."""
    request = result.get("request")
    if not request:
        return None
    try:
        return GenerationRow.model_validate_json(request)
    except ValidationError as e:
        logger.warning("row %r: its recorded request does not validate (%s); it is not exported",
                       result.get("row_id"), e.errors(include_url=False)[0]["msg"])
        return None


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
    """The final results of the run at ``output`` (``manifests.ledger``) with their rows, keeping the images that
    pass ``filters``, sorted by (row_id, k).

    A result's row is its ``request``; results without one (older runs) are joined with the run's manifest
    (:func:`find_manifest`). ``relation_phrase(prompt, subject_phrases)``: the phrase of rows that give none (the
    worker's own rule, e.g. ``dreamrelation.relation_phrase.relation_phrase``); None leaves it None. Raises
    :class:`ExportError` when the run has no results or the rows of results without a request cannot be found.
    """
    filters = filters or ExportFilter()
    run = read_run_json(output)
    results = ledger_records(output)
    if not results:
        raise ExportError(f"no results found under {storage.join(output, 'results')!r}: is {output!r} the output "
                          f"folder of a batch run?")
    manifest_rows: Optional[dict[str, GenerationRow]] = None
    manifest = recorded_manifest(run)
    if any(r.get("status") == "ok" and not r.get("request") for r in results):
        manifest = find_manifest(output, run)
        try:
            manifest_rows = read_run_rows(manifest)
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
        if result.get("request"):
            row = request_row(result)
            reason = "invalid_request" if row is None else None
        else:
            found.rows_from_manifest += 1
            row = (manifest_rows or {}).get(result["row_id"])
            reason = "not_in_manifest" if row is None else None
        if reason is None and filters.passed_only and result.get("gate") == "failed":
            reason = "gate_failed"
        if reason:
            found.filtered_out[reason] += len(images)
            continue
        assert row is not None
        recorded = [int(v) for v in result.get("seeds") or []]
        seeds = recorded if len(recorded) == len(images) else final_seeds(result, row)
        provenance = {p: result.get(p) for p in PROVENANCE}
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
                width=row.width, height=row.height, metrics=metrics, gate=result.get("gate"), **provenance,
            ))
    return found
