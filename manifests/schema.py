"""Row schemas of the batch system (pydantic v2), the contract at every file and process boundary.

- ``GenerationRow``: one manifest row, "these subjects, in this relation, in this layout".
- ``ResultRow``: what the batch worker reports for one row (images, per-image metrics, timings, gate attempts).
- ``GateSpec`` / ``GateAttempt``: the quality gate of ``batch submit`` (minimum scores, attempts) and one attempt.
- ``Rejection``: a manifest row that did not validate, with the field at fault and why.

Every model forbids unknown fields. Numbers are checked strictly: ``True`` is not a seed and ``"3"`` is not a
step count, so a mistyped column is rejected instead of silently coerced; numpy scalars (Ray batches) are accepted.
Errors name the field (pydantic's ``loc``) and quote the value.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, Optional

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

# Characters safe in a storage key and a folder name: the row id becomes `{out}/images/{row_id}/`, the relation id
# a LoRA folder, an adapter name and a cache key (STYLE.md point 6).
KEY_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}\Z")  # safe in a storage key; no leading "."
MAX_SUBJECTS = 8
DEFAULT_NEGATIVE_PROMPT = "monochrome, lowres, bad anatomy, worst quality, low quality"
MAX_VALUE_CHARS = 200
GATE_METRICS = ("clip_t", "clip_r", "clip_i", "clip_i_crop", "dino")  # scores x100, as in metrics.py
MAX_ATTEMPTS = 20


def _as_int(value: Any) -> int:
    """An integer, strictly: bools, strings and floats are rejected (numpy integers are fine)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"must be an integer, got {value!r}")
    return int(value)


def _as_float(value: Any) -> float:
    """A real number, strictly: bools and strings are rejected; NaN / inf are left to the ``allow_inf_nan`` check."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"must be a number, got {value!r}")
    return float(value)


Int = Annotated[int, BeforeValidator(_as_int)]
Float = Annotated[float, BeforeValidator(_as_float)]


def check_key(value: str, what: str) -> str:
    if not isinstance(value, str) or not KEY_PATTERN.match(value):
        raise ValueError(f"{what} must be 1-128 characters from letters, digits and '-_.', not starting with '.' "
                         f"(safe in a storage key), got {value!r}")
    return value


def non_empty(value: str, what: str) -> str:
    if not value.strip():
        raise ValueError(f"{what} must not be empty, got {value!r}")
    return value.strip()


def _nulls_mean_default(model: type[BaseModel], data: Any) -> Any:
    """Drop ``None`` for fields that have a default, so a Parquet null falls back to it."""
    if isinstance(data, dict):
        optional = {name for name, f in model.model_fields.items() if not f.is_required()}
        data = {k: v for k, v in data.items() if not (v is None and k in optional)}
    return data


class Subject(BaseModel):
    """One subject: its reference image, the words naming it, and where it goes (normalized box)."""

    model_config = ConfigDict(extra="forbid")

    image: str
    phrase: str
    box: list[float]

    @field_validator("image", "phrase")
    @classmethod
    def _not_empty(cls, value: str, info) -> str:
        return non_empty(value, info.field_name)

    @field_validator("box", mode="before")
    @classmethod
    def _box(cls, value: Any) -> list[float]:
        """``[x0, y0, x1, y1]``: four finite numbers in [0, 1] with x0 < x1 and y0 < y1."""
        if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
            value = value.tolist()  # numpy arrays from Ray batches
        if not isinstance(value, (list, tuple)) or len(value) != 4:
            raise ValueError(f"box must be a list [x0, y0, x1, y1] of 4 numbers, got {value!r}")
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value):
            raise ValueError(f"box must hold 4 numbers (no strings or bools), got {value!r}")
        box = [float(v) for v in value]
        if not all(math.isfinite(v) for v in box):
            raise ValueError(f"box must hold 4 finite numbers (no NaN or inf), got {value!r}")
        if not all(0.0 <= v <= 1.0 for v in box):
            raise ValueError(f"box must lie inside [0, 1] (normalized coordinates), got {value!r}")
        x0, y0, x1, y1 = box
        if x0 >= x1 or y0 >= y1:
            raise ValueError(f"box must have x0 < x1 and y0 < y1, got {value!r}")
        return box


class GenerationRow(BaseModel):
    """One manifest row. ``None`` in an optional field (a Parquet null) means "use the default"."""

    model_config = ConfigDict(extra="forbid")

    row_id: str
    prompt: str
    relation: Optional[str] = None  # relation id (LoRA name); None = no relation LoRA
    relation_phrase: Optional[str] = None  # the words CLIP-R scores; None = derived from the prompt by the worker
    subjects: list[Subject] = Field(min_length=1, max_length=MAX_SUBJECTS)
    seed: Int = Field(0, ge=0, lt=2**63)
    num_images: Int = Field(1, ge=1, le=16)
    steps: Int = Field(30, ge=1, le=200)
    guidance: Float = Field(5.0, ge=0.0, allow_inf_nan=False)
    scale: Float = Field(0.6, ge=0.0, le=10.0, allow_inf_nan=False)
    width: Int = Field(1024, ge=64, le=4096)
    height: Int = Field(1024, ge=64, le=4096)
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    metadata: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _nulls_mean_default(cls, data: Any) -> Any:
        return _nulls_mean_default(cls, data)

    @field_validator("row_id")
    @classmethod
    def _row_id(cls, value: str) -> str:
        return check_key(value, "row_id")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        return non_empty(value, "prompt")

    @field_validator("relation")
    @classmethod
    def _relation(cls, value: Optional[str]) -> Optional[str]:
        if value is None or not value.strip():
            return None
        return check_key(value.strip(), "relation")

    @field_validator("relation_phrase")
    @classmethod
    def _relation_phrase(cls, value: Optional[str]) -> Optional[str]:
        return value.strip() if value is not None and value.strip() else None

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int, info) -> int:
        if value % 8:
            raise ValueError(f"{info.field_name} must be a multiple of 8, got {value}")
        return value

    def batch_key(self) -> tuple[str, int, int, int, int, float]:
        """Rows with equal keys can denoise together: (relation or "", subjects, steps, width, height, guidance)."""
        return (self.relation or "", len(self.subjects), self.steps, self.width, self.height, self.guidance)

    def subject_key(self) -> str:
        """The ordered subject image set, for ordering rows so repeated subjects hit the encoding cache."""
        return "\n".join(s.image for s in self.subjects)

    def image_seed(self, k: int, attempt: int = 0) -> int:
        """The seed of image ``k`` at quality-gate attempt ``attempt`` (0-based): ``seed + k + attempt * num_images``.

        Attempt 0 is the row's own block of seeds (``seed .. seed + num_images - 1``); each retry takes the next
        block, so no two (image, attempt) pairs of a row share a seed and a rerun regenerates the same images."""
        if not 0 <= k < self.num_images:
            raise ValueError(f"k must be in [0, num_images={self.num_images}), got {k!r}")
        if not 0 <= attempt < MAX_ATTEMPTS:
            raise ValueError(f"attempt must be in [0, {MAX_ATTEMPTS}), got {attempt!r}")
        return self.seed + k + attempt * self.num_images


def utc_now() -> str:
    """Now, ISO 8601 in UTC with microseconds: strings of this form sort in time order."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def gate_option(metric: str) -> str:
    """The ``batch submit`` option of a gate metric: ``clip_i_crop`` -> ``--min-clip-i-crop``."""
    return "--min-" + metric.replace("_", "-")


def _messages(error: ValidationError) -> str:
    msgs = [d["msg"].removeprefix("Value error, ") for d in error.errors(include_url=False)]
    return "; ".join(msgs)


class GateSpec(BaseModel):
    """The quality gate of ``batch submit``: an image under any minimum score is regenerated with the next seed of
    its row's schedule (``GenerationRow.image_seed``) until it passes or ``max_attempts`` images were made for it.

    ``thresholds``: metric name (one of ``GATE_METRICS``) -> minimum score (x100, like the metrics); at least one.
    ``max_attempts``: images made at most per image slot, 1..20 (1: score and label only, never regenerate).
    Errors name the ``batch submit`` option at fault (``--min-clip-i``, ``--max-attempts``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    thresholds: dict[str, float]
    max_attempts: int = 1

    @field_validator("thresholds", mode="before")
    @classmethod
    def _thresholds(cls, value: Any) -> dict[str, float]:
        if not isinstance(value, Mapping):
            raise ValueError(f"thresholds must map metric names to minimum scores, got {value!r}")
        out = {}
        for name, minimum in value.items():
            if name not in GATE_METRICS:
                raise ValueError(f"unknown gate metric {name!r}: known metrics are {list(GATE_METRICS)} "
                                 f"(options {', '.join(gate_option(m) for m in GATE_METRICS)})")
            if isinstance(minimum, bool) or not isinstance(minimum, numbers.Real) or not math.isfinite(minimum):
                raise ValueError(f"{gate_option(name)} must be a finite number (a score x100, as the metrics), "
                                 f"got {minimum!r}")
            out[name] = float(minimum)
        if not out:
            raise ValueError("a quality gate needs at least one threshold: "
                             + ", ".join(gate_option(m) for m in GATE_METRICS))
        return {name: out[name] for name in GATE_METRICS if name in out}

    @field_validator("max_attempts", mode="before")
    @classmethod
    def _max_attempts(cls, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= MAX_ATTEMPTS:
            raise ValueError(f"--max-attempts must be an integer in [1, {MAX_ATTEMPTS}], got {value!r}")
        return int(value)

    @classmethod
    def from_options(cls, max_attempts: int = 1, **minimums: float | None) -> "GateSpec | None":
        """``batch submit`` options (``min_clip_t=..., min_dino=..., max_attempts=...``) -> a gate, or None when no
        minimum is given. Raises ``ValueError`` naming the option (``--max-attempts 3`` alone is an error: there
        would be nothing to regenerate for)."""
        thresholds = {name.removeprefix("min_"): v for name, v in minimums.items() if v is not None}
        if not thresholds:
            if max_attempts != 1:
                raise ValueError(f"--max-attempts {max_attempts} needs a threshold to retry for: "
                                 + ", ".join(gate_option(m) for m in GATE_METRICS))
            return None
        try:
            return cls(thresholds=thresholds, max_attempts=max_attempts)
        except ValidationError as exc:
            raise ValueError(_messages(exc)) from None

    def failed(self, scores: Mapping[str, float | None]) -> list[str]:
        """The metrics of one image's ``scores`` under their minimum, in ``GATE_METRICS`` order (a missing score
        fails: an image that cannot be scored does not pass)."""
        return [name for name, minimum in self.thresholds.items()
                if scores.get(name) is None or scores[name] < minimum]  # type: ignore[operator]


class GateAttempt(BaseModel):
    """One image made for slot ``k`` of a row under the gate: attempt ``attempt`` (0-based) with seed
    ``GenerationRow.image_seed(k, attempt)``, its scores, whether it passed and the metrics that failed. ``image``
    is where it was written: ``{out}/images/{row_id}/{k}.png`` when it is the slot's final image (the first passing
    attempt, else the last one), else ``{out}/images/{row_id}/attempts/{k}-{attempt}.png``."""

    model_config = ConfigDict(extra="forbid")

    k: Int = Field(ge=0)
    attempt: Int = Field(ge=0, lt=MAX_ATTEMPTS)
    seed: Int = Field(ge=0)
    image: str
    clip_t: Optional[float] = None
    clip_r: Optional[float] = None
    clip_i: Optional[float] = None
    clip_i_crop: Optional[float] = None
    dino: Optional[float] = None
    passed: bool
    failed: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> "GateAttempt":
        if self.passed == bool(self.failed):
            raise ValueError(f"attempt {self.attempt} of image {self.k}: passed={self.passed} but "
                             f"failed={self.failed} (passed means no failed metric)")
        return self


class ResultRow(BaseModel):
    """What happened to one accepted row. Metric lists hold one value per (final) image (scores x100, as in the
    paper); CLIP-I and DINO are the mean over the row's subjects. A list is empty when that metric was not computed.
    ``images`` (and ``GateAttempt.image``) are keys relative to the run's output root (``images/{row_id}/0.png``), so
    a run folder can be moved or copied to a bucket; ``manifests.ledger`` resolves them to URIs.

    Under a quality gate, ``gate`` says whether every final image passed and ``attempts`` records every image made
    (sorted by ``k``, then ``attempt``); ``attempt`` is the number of attempts of the most-tried image (1 without a
    gate). ``None`` in a field with a default (a column missing from an older results file) means the default."""

    model_config = ConfigDict(extra="forbid")

    row_id: str
    status: Literal["ok", "error"]
    error: Optional[str] = None
    images: list[str] = Field(default_factory=list)
    clip_t: list[float] = Field(default_factory=list)
    clip_r: list[float] = Field(default_factory=list)
    clip_i: list[float] = Field(default_factory=list)
    clip_i_crop: list[float] = Field(default_factory=list)
    dino: list[float] = Field(default_factory=list)
    relation: Optional[str] = None
    seconds_load: float = Field(0.0, ge=0.0)
    seconds_lora: float = Field(0.0, ge=0.0)  # relation LoRA load / swap (cache misses cost here)
    seconds_generate: float = Field(0.0, ge=0.0)
    seconds_write: float = Field(0.0, ge=0.0)
    seconds_metrics: float = Field(0.0, ge=0.0)
    lora_cache_hit: Optional[bool] = None
    subject_cache_hits: Int = Field(0, ge=0)
    attempt: Int = Field(1, ge=1, le=MAX_ATTEMPTS)  # attempts of the most-tried image
    gate: Optional[Literal["passed", "failed"]] = None  # None: no gate (or the row failed)
    attempts: list[GateAttempt] = Field(default_factory=list)  # every image made under the gate
    finished_at: str = Field(default_factory=utc_now)  # ISO 8601, UTC, microseconds
    # the ledger: which submission made this result (``manifests.ledger``: the latest finished attempt wins)
    attempt_id: str = ""  # "" for results written outside a run (a Worker used directly, runs of older versions)
    request: Optional[str] = None  # the manifest row as generated (GenerationRow JSON): the ledger is self-contained
    # provenance: what made the images, whatever the registry or the model folders hold later
    seeds: list[int] = Field(default_factory=list)  # the seed of each final image
    model_preset: Optional[str] = None
    model_fingerprint: Optional[str] = None  # dreamrelation.provenance: weights and configs of the SDXL parts
    adapter_fingerprint: Optional[str] = None
    local_encoder_fingerprint: Optional[str] = None  # None: no local encoder checkpoint (the CLIP tower itself)
    lora_uri: Optional[str] = None  # the relation LoRA file loaded for this row (None: no relation)
    lora_sha256: Optional[str] = None  # sha256 of that file's bytes, exactly as loaded

    @model_validator(mode="before")
    @classmethod
    def _nulls_mean_default(cls, data: Any) -> Any:
        return _nulls_mean_default(cls, data)

    @model_validator(mode="after")
    def _consistent(self) -> "ResultRow":
        if self.status == "error" and not self.error:
            raise ValueError(f"row {self.row_id!r}: status 'error' needs an error message")
        if self.gate is not None and self.status != "ok":
            raise ValueError(f"row {self.row_id!r}: gate {self.gate!r} on a row with status {self.status!r}")
        if self.attempts and self.attempt != 1 + max(a.attempt for a in self.attempts):
            raise ValueError(f"row {self.row_id!r}: attempt={self.attempt} but its attempts go up to index "
                             f"{max(a.attempt for a in self.attempts)} (attempt counts them, from 1)")
        for name in ("clip_t", "clip_r", "clip_i", "clip_i_crop", "dino", "seeds"):
            values = getattr(self, name)
            if values and len(values) != len(self.images):
                raise ValueError(f"row {self.row_id!r}: {name} has {len(values)} values for "
                                 f"{len(self.images)} images (one per image, or none)")
        return self


class Rejection(BaseModel):
    """A manifest row that was not accepted: which row, which field (dotted path such as ``subjects.0.box``), why,
    and the offending value (its repr, truncated)."""

    model_config = ConfigDict(extra="forbid")

    row_id: Optional[str] = None
    index: int  # row number in the manifest, from 0
    field: str
    reason: str
    value: str = ""

    @field_validator("value", mode="before")
    @classmethod
    def _truncate(cls, value: Any) -> str:
        text = value if isinstance(value, str) else repr(value)
        return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 3] + "..."

    @classmethod
    def of(cls, index: int, field: str, reason: str, value: Any, row_id: Any = None) -> "Rejection":
        """A rejection quoting ``repr(value)``; a non-string ``row_id`` (itself invalid) is kept as its repr."""
        rid = row_id if isinstance(row_id, str) or row_id is None else repr(row_id)
        return cls(row_id=rid, index=index, field=field, reason=reason, value=repr(value))

    @classmethod
    def from_error(cls, index: int, error: ValidationError, row_id: Any = None) -> "Rejection":
        """One rejection for a row's pydantic errors: the first error names the field; the others are appended."""
        details = error.errors(include_url=False)

        def field_of(d: dict) -> str:
            return ".".join(str(p) for p in d["loc"]) or "(row)"

        def reason_of(d: dict) -> str:
            if d["type"] == "extra_forbidden":
                return "unknown field (not in the row schema)"
            msg = d["msg"]
            return msg[len("Value error, "):] if msg.startswith("Value error, ") else msg

        first = details[0]
        reason = reason_of(first)
        if len(details) > 1:
            reason += "; also " + "; ".join(f"{field_of(d)}: {reason_of(d)}" for d in details[1:])
        return cls.of(index, field_of(first), reason, first.get("input"), row_id=row_id)
