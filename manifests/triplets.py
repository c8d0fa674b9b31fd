"""Relation triplet datasets: the schema and Parquet I/O of relation-LoRA fine-tuning data (paper 3.4, issue 4).

A triplet is one fine-tuning example: a target image showing the relation, 1-4 subject (image-prompt) images, the
prompt and its relation phrase, and per subject its box (and optionally its binary mask) in the target plus 17
AP-10K keypoints in both the target and its own subject image. A dataset is a folder::

    {uri}/triplets.parquet          one row per triplet (TRIPLET_SCHEMA)
    {uri}/images/{triplet_id}/...   the images (optional: rows may point anywhere by URI)

Coordinates are normalized: boxes ``[x0, y0, x1, y1]`` in [0, 1] of the target image; keypoints ``[x, y]`` of the
image they belong to, 17 pairs in AP-10K order, accepted within [-0.05, 1.05] (detectors overshoot the border a
little; the loader clips to [0, 1]). Visibility is optional (None: every keypoint counts), else 17 weights in [0, 1].

Paths: like manifests, image / mask paths may be relative to the dataset folder; ``write_triplets`` stores paths
under the folder relative to it (so a folder copied to a bucket keeps working) and ``read_triplets`` resolves them,
so every row it returns carries absolute paths / URLs.

The model side (``dreamrelation.train.data``) never imports this module: rows cross over as plain dicts
(``TripletRow.to_record``), read there by ``dreamrelation.train.data.example_from_record``.
"""

from __future__ import annotations

import logging
import math
import numbers
import posixpath
from collections.abc import Iterable
from typing import Any, Optional

import pyarrow as pa
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from manifests import storage
from manifests.io import ManifestError, normalize_record, read_table, write_table
from manifests.schema import Rejection, Subject, check_key, non_empty

logger = logging.getLogger(__name__)

__all__ = [
    "KEYPOINT_RANGE", "MAX_TRIPLET_SUBJECTS", "NUM_KEYPOINTS", "TRIPLET_FILE", "TRIPLET_SCHEMA", "TripletRow",
    "TripletSubject", "copy_triplet_images", "read_triplets", "triplets_uri", "validate_triplets", "write_triplets",
]

NUM_KEYPOINTS = 17  # AP-10K animal keypoints (REFERENCE.md section 3)
KEYPOINT_RANGE = (-0.05, 1.05)  # accepted; the loader clips to [0, 1]
MAX_TRIPLET_SUBJECTS = 4
TRIPLET_FILE = "triplets.parquet"


# ------------------------------------------------------------------------------------------------------------ schema

def _as_list(value: Any) -> Any:
    """numpy / Arrow arrays as nested lists (what a JSON reader would give)."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _keypoints(value: Any, what: str) -> list[list[float]]:
    """17 ``[x, y]`` pairs of finite numbers within ``KEYPOINT_RANGE``."""
    value = _as_list(value)
    if not isinstance(value, list) or len(value) != NUM_KEYPOINTS:
        n = len(value) if isinstance(value, list) else type(value).__name__
        raise ValueError(f"{what} must be {NUM_KEYPOINTS} [x, y] pairs (AP-10K order), got {n}")
    out = []
    for j, pair in enumerate(value):
        pair = _as_list(pair)
        if not isinstance(pair, list) or len(pair) != 2 or not all(_is_number(v) for v in pair):
            raise ValueError(f"{what}[{j}] must be a pair [x, y] of numbers, got {pair!r}")
        x, y = float(pair[0]), float(pair[1])
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ValueError(f"{what}[{j}] must be finite, got {pair!r}")
        lo, hi = KEYPOINT_RANGE
        if not (lo <= x <= hi and lo <= y <= hi):
            raise ValueError(f"{what}[{j}] must be normalized coordinates within [{lo}, {hi}], got {pair!r}")
        out.append([x, y])
    return out


def _visibility(value: Any, what: str) -> Optional[list[float]]:
    """None, or 17 finite weights in [0, 1]."""
    value = _as_list(value)
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != NUM_KEYPOINTS:
        n = len(value) if isinstance(value, list) else type(value).__name__
        raise ValueError(f"{what} must be {NUM_KEYPOINTS} numbers in [0, 1] (or null), got {n}")
    if not all(_is_number(v) and math.isfinite(v) and 0.0 <= v <= 1.0 for v in value):
        raise ValueError(f"{what} must hold {NUM_KEYPOINTS} numbers in [0, 1], got {value!r}")
    return [float(v) for v in value]


class TripletSubject(Subject):
    """One subject of a triplet: ``image`` (URI of its subject / image-prompt image), ``phrase``, ``box`` (its
    normalized box in the TARGET image), ``mask`` (URI of its binary mask in the target, optional), 17 keypoints in
    the target and in its subject image, and optional visibilities."""

    model_config = ConfigDict(extra="forbid")

    mask: Optional[str] = None
    target_keypoints: list[list[float]]
    subject_keypoints: list[list[float]]
    target_visibility: Optional[list[float]] = None
    subject_visibility: Optional[list[float]] = None

    @field_validator("mask")
    @classmethod
    def _mask(cls, value: Optional[str]) -> Optional[str]:
        return value.strip() if value is not None and value.strip() else None

    @field_validator("target_keypoints", "subject_keypoints", mode="before")
    @classmethod
    def _keypoints(cls, value: Any, info) -> list[list[float]]:
        return _keypoints(value, info.field_name)

    @field_validator("target_visibility", "subject_visibility", mode="before")
    @classmethod
    def _visibility(cls, value: Any, info) -> Optional[list[float]]:
        return _visibility(value, info.field_name)


class TripletRow(BaseModel):
    """One relation triplet (a fine-tuning example). ``relation`` is the relation id (the LoRA's name)."""

    model_config = ConfigDict(extra="forbid")

    triplet_id: str
    relation: str
    target: str  # URI of the target image (the relation as it should look)
    prompt: str
    relation_phrase: str  # the relation words of the prompt ("hugging", "shakes hands with")
    subjects: list[TripletSubject] = Field(min_length=1, max_length=MAX_TRIPLET_SUBJECTS)
    source: Optional[str] = None  # where the triplet came from (importer, folder, generator)
    metadata: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _nulls_mean_default(cls, data: Any) -> Any:
        """A Parquet null in ``metadata`` means the default (empty)."""
        if isinstance(data, dict) and data.get("metadata", 0) is None:
            data = {k: v for k, v in data.items() if k != "metadata"}
        return data

    @field_validator("triplet_id", "relation")
    @classmethod
    def _key(cls, value: str, info) -> str:
        """Both become storage keys: ``images/{triplet_id}/``, the relation's LoRA folder (STYLE.md point 6)."""
        return check_key(value, info.field_name)

    @field_validator("target", "prompt", "relation_phrase")
    @classmethod
    def _not_empty(cls, value: str, info) -> str:
        return non_empty(value, info.field_name)

    def to_record(self) -> dict[str, Any]:
        """The row as a plain dict (lists, strings, floats): what ``dreamrelation.train.data.example_from_record``
        reads."""
        return self.model_dump()


# -------------------------------------------------------------------------------------------------------------- Arrow

_KEYPOINTS_TYPE = pa.list_(pa.list_(pa.float64()))
TRIPLET_SUBJECT_TYPE = pa.struct([
    ("image", pa.string()),
    ("phrase", pa.string()),
    ("box", pa.list_(pa.float64())),
    ("mask", pa.string()),
    ("target_keypoints", _KEYPOINTS_TYPE),
    ("subject_keypoints", _KEYPOINTS_TYPE),
    ("target_visibility", pa.list_(pa.float64())),
    ("subject_visibility", pa.list_(pa.float64())),
])

TRIPLET_SCHEMA = pa.schema([
    pa.field("triplet_id", pa.string(), nullable=False),
    ("relation", pa.string()),
    ("target", pa.string()),
    ("prompt", pa.string()),
    ("relation_phrase", pa.string()),
    ("subjects", pa.list_(TRIPLET_SUBJECT_TYPE)),
    ("source", pa.string()),
    ("metadata", pa.map_(pa.string(), pa.string())),
])

REQUIRED_COLUMNS = ("triplet_id", "relation", "target", "prompt", "relation_phrase", "subjects")


# ---------------------------------------------------------------------------------------------------------- paths

def triplets_uri(uri: str) -> str:
    """The Parquet file of the dataset at ``uri`` (a dataset folder, or the ``.parquet`` file itself)."""
    return str(uri) if str(uri).endswith(".parquet") else storage.join(uri, TRIPLET_FILE)


def _dataset_folder(uri: str) -> str:
    return storage.parent(uri) if str(uri).endswith(".parquet") else str(uri).rstrip("/")


def _absolute(uri: str) -> str:
    """Local paths as normalized absolute paths; URLs unchanged."""
    if "://" in uri:
        return uri
    return storage.resolve(".", uri) if storage.is_relative(uri) else posixpath.normpath(uri)


def _relative_to(uri: str, folder: str) -> str:
    """``uri`` relative to ``folder`` when it lies inside it (same scheme); unchanged otherwise."""
    path, base = _absolute(uri), _absolute(folder).rstrip("/")
    return path[len(base) + 1:] if path.startswith(base + "/") else uri


def _map_paths(record: dict[str, Any], fn) -> dict[str, Any]:
    """``record`` with ``fn`` applied to the target, every subject image and every mask (strings only)."""
    out = dict(record)
    if isinstance(out.get("target"), str) and out["target"].strip():
        out["target"] = fn(out["target"])
    if isinstance(out.get("subjects"), list):
        subjects = []
        for s in out["subjects"]:
            if isinstance(s, dict):
                s = dict(s)
                for key in ("image", "mask"):
                    if isinstance(s.get(key), str) and s[key].strip():
                        s[key] = fn(s[key])
            subjects.append(s)
        out["subjects"] = subjects
    return out


# ---------------------------------------------------------------------------------------------------------- validation

def validate_triplets(records: Iterable[Any], base_folder: str | None = None,
                      relation: str | None = None) -> tuple[list[TripletRow], list[Rejection]]:
    """Validate raw triplet rows (dicts). Each row is accepted, rejected (a ``Rejection`` naming the field) or, when
    ``relation`` is given, skipped because it belongs to another relation. Relative paths resolve against
    ``base_folder`` (None: left as they are). A repeated ``triplet_id`` is rejected after its first occurrence."""
    accepted: list[TripletRow] = []
    rejected: list[Rejection] = []
    first_seen: dict[str, int] = {}
    for index, record in enumerate(records):
        record = normalize_record(record)
        tid = record.get("triplet_id") if isinstance(record, dict) else None
        if relation is not None and isinstance(record, dict) and isinstance(record.get("relation"), str) \
                and record["relation"] != relation:
            continue
        if isinstance(tid, str):
            if tid in first_seen:
                rejected.append(Rejection.of(index, "triplet_id",
                                             f"duplicate triplet_id (first at row {first_seen[tid]})", tid,
                                             row_id=tid))
                continue
            first_seen[tid] = index
        if base_folder is not None and isinstance(record, dict):
            record = _map_paths(record, lambda p: storage.resolve(base_folder, p))
        try:
            accepted.append(TripletRow.model_validate(record))
        except ValidationError as e:
            rejected.append(Rejection.from_error(index, e, row_id=tid))
    return accepted, rejected


# ------------------------------------------------------------------------------------------------------------- I/O

def write_triplets(rows: Iterable[TripletRow | dict], uri: str) -> pa.Table:
    """Write triplets to ``{uri}/triplets.parquet`` (``uri`` a dataset folder, or a ``.parquet`` file), atomically.

    Every row is validated first; any invalid row (or repeated ``triplet_id``) raises ``ValueError`` naming the rows
    and fields, and nothing is written. Paths inside the dataset folder are stored relative to it. Returns the table.
    """
    records = [r.to_record() if isinstance(r, TripletRow) else r for r in rows]
    accepted, rejected = validate_triplets(records)
    if rejected:
        lines = [f"row {r.index} ({r.row_id}): {r.field}: {r.reason}" for r in rejected[:5]]
        more = f" (and {len(rejected) - 5} more)" if len(rejected) > 5 else ""
        raise ValueError(f"cannot write triplets to {uri}: {len(rejected)} invalid rows{more}:\n  "
                         + "\n  ".join(lines))
    folder = _dataset_folder(uri)
    stored = [_map_paths(r.to_record(), lambda p: _relative_to(p, folder)) for r in accepted]
    table = pa.Table.from_pylist(stored, schema=TRIPLET_SCHEMA)
    write_table(table, triplets_uri(uri))
    logger.info("wrote %d triplets to %s", table.num_rows, triplets_uri(uri))
    return table


def read_triplets(uri: str, relation: str | None = None) -> tuple[list[TripletRow], list[Rejection]]:
    """Read and validate the triplets of the dataset at ``uri`` (a folder or its ``triplets.parquet``).

    Returns (accepted rows with absolute paths, rejections). ``relation``: keep only that relation's rows (others are
    neither accepted nor rejected). Raises ``ManifestError`` when the file is missing, not Parquet, or lacks columns.
    """
    file = triplets_uri(uri)
    try:
        if not storage.exists(file):
            raise ManifestError(f"triplets {file}: not found")
        table = read_table(file)
    except ManifestError:
        raise
    except Exception as e:  # not Parquet, storage failures
        raise ManifestError(f"triplets {file}: not a readable Parquet file ({type(e).__name__}: {e})") from e
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    unknown = [c for c in table.column_names if c not in TRIPLET_SCHEMA.names]
    if missing or unknown:
        raise ManifestError(f"triplets {file}: missing columns {missing}, unknown columns {unknown}; expected "
                            f"{TRIPLET_SCHEMA.names}")
    return validate_triplets(table.to_pylist(), base_folder=_dataset_folder(uri), relation=relation)


def copy_triplet_images(rows: Iterable[TripletRow], dest: str) -> list[TripletRow]:
    """Copy every image and mask of ``rows`` to ``{dest}/images/{triplet_id}/`` (``target``, ``subject{k}``,
    ``mask{k}``, each keeping its extension) and return the rows pointing at the copies, e.g. to move a dataset
    from a laptop to a bucket: ``write_triplets(copy_triplet_images(rows, "s3://b/ds"), "s3://b/ds")``."""

    def copy(src: str, tid: str, name: str) -> str:
        ext = posixpath.splitext(src.rsplit("/", 1)[-1])[1] or ".png"
        out = storage.join(dest, "images", tid, name + ext)
        storage.write_bytes_atomic(out, storage.read_bytes(src))
        return out

    copied = []
    for row in rows:
        record = row.to_record()
        record["target"] = copy(row.target, row.triplet_id, "target")
        for k, s in enumerate(record["subjects"]):
            s["image"] = copy(s["image"], row.triplet_id, f"subject{k}")
            if s.get("mask"):
                s["mask"] = copy(s["mask"], row.triplet_id, f"mask{k}")
        copied.append(TripletRow.model_validate(record))
    return copied
