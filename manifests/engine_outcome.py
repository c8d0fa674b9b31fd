"""Engine outcomes (paper 3.3): what became of each sample of the data engine, stored as Parquet.

``EngineOutcome`` is what the engine reports per sample (``manifests.relation_spec.EngineSample``): ``made`` (with
the ``TripletRow`` as JSON) or ``dropped`` at a stage with a short reason code. ``write_outcomes`` /
``read_outcomes`` store them as Parquet (atomic writes; a folder of part files reads as one list), like
``manifests.io.write_results`` / ``read_results``. ``judged_with`` names the gate and annotation settings that
judged a sample, so that a rerun under other settings judges it again instead of taking the old verdict as done.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any, Literal, Optional, Union

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from manifests import storage
from manifests.io import conform, normalize_record, read_table, write_table
from manifests.schema import Float, Rejection, check_key
from manifests.triplets import TripletRow

__all__ = ["DROPPED_FILE", "ENGINE_OUTCOME_SCHEMA", "EngineOutcome", "SUMMARY_FILE", "read_outcomes", "write_outcomes"]

DROPPED_FILE = "dropped.parquet"  # {output}/ of a data engine run: the dropped samples' outcomes
SUMMARY_FILE = "engine.json"  # {output}/ of a data engine run: its summary (spec, counts, gates)

_REASON = re.compile(r"[a-z][a-z0-9_]{0,63}\Z")


class EngineOutcome(BaseModel):
    """What became of one sample: ``made`` (``triplet`` holds the ``TripletRow`` as JSON) or ``dropped`` at
    ``stage`` for ``reason`` (a short code such as ``subject_not_found``, ``low_clip_r``, ``generation_error``),
    with ``detail`` in words. ``metrics``: whatever was measured (CLIP-R, keypoint confidence, ...).
    ``judged_with``: a digest of the settings that judged it (gates, keypoints; None in files written before it
    existed: unknown settings)."""

    model_config = ConfigDict(extra="forbid")

    sample_id: str
    relation: str
    status: Literal["made", "dropped"]
    stage: Literal["generate", "annotate", "gate"]
    reason: Optional[str] = None
    detail: str = ""
    triplet: Optional[str] = None
    metrics: dict[str, Float] = Field(default_factory=dict)
    judged_with: Optional[str] = None

    @model_validator(mode="before")
    @classmethod
    def _nulls_mean_default(cls, data: Any) -> Any:
        """Parquet nulls in ``detail`` / ``metrics`` mean the defaults; an Arrow map (pairs) is a dict."""
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if not (v is None and k in ("detail", "metrics"))}
            metrics = data.get("metrics")
            if isinstance(metrics, list) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in metrics):
                data["metrics"] = dict(metrics)
        return data

    @field_validator("sample_id", "relation")
    @classmethod
    def _key(cls, value: str, info) -> str:
        return check_key(value, info.field_name)

    @field_validator("metrics")
    @classmethod
    def _finite(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in value.items() if not math.isfinite(v)}
        if bad:
            raise ValueError(f"metrics must be finite numbers (leave out what was not measured), got {bad!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "EngineOutcome":
        who = f"sample {self.sample_id!r}"
        if self.status == "dropped":
            if not self.reason or not _REASON.match(self.reason):
                raise ValueError(f"{who}: a dropped sample needs a reason code (lowercase letters, digits, '_'), "
                                 f"got {self.reason!r}")
            if self.triplet is not None:
                raise ValueError(f"{who}: a dropped sample has no triplet")
            return self
        if self.reason is not None:
            raise ValueError(f"{who}: a made sample has no reason, got {self.reason!r}")
        if not self.triplet:
            raise ValueError(f"{who}: a made sample needs its triplet (TripletRow JSON)")
        row = self.triplet_row()
        if row.relation != self.relation:
            raise ValueError(f"{who}: triplet relation {row.relation!r} differs from the outcome's {self.relation!r}")
        return self

    def triplet_row(self) -> TripletRow:
        """The made triplet (``ValueError`` naming the sample when the JSON is not a valid ``TripletRow``)."""
        if self.triplet is None:
            raise ValueError(f"sample {self.sample_id!r} was dropped ({self.reason}): it has no triplet")
        try:
            return TripletRow.model_validate_json(self.triplet)
        except ValidationError as e:
            r = Rejection.from_error(0, e)
            raise ValueError(f"sample {self.sample_id!r}: triplet is not a valid TripletRow: {r.field}: {r.reason}"
                             ) from None


ENGINE_OUTCOME_SCHEMA = pa.schema([
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("relation", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("triplet", pa.string()),
    ("metrics", pa.map_(pa.string(), pa.float64())),
    ("judged_with", pa.string()),
])


def write_outcomes(outcomes: Iterable[Union[EngineOutcome, dict]], uri: str) -> pa.Table:
    """Validate ``outcomes`` and write them as one Parquet file at ``uri`` (atomic). Returns the table written."""
    rows = [(o if isinstance(o, EngineOutcome) else EngineOutcome.model_validate(normalize_record(o))).model_dump()
            for o in outcomes]
    table = pa.Table.from_pylist(rows, schema=ENGINE_OUTCOME_SCHEMA)
    write_table(table, uri)
    return table


def read_outcomes(uri: str) -> list[EngineOutcome]:
    """The outcomes of one Parquet file, or of every ``*.parquet`` directly under a folder (part files, in name
    order); an absent folder gives ``[]``. Raises ``ValueError`` naming the file, row and field of a bad row."""
    fs, path = storage.filesystem(uri)
    files = [str(uri)] if fs.isfile(path) else storage.list_files(uri, ".parquet")
    outcomes = []
    for file in files:
        for index, record in enumerate(conform(read_table(file), ENGINE_OUTCOME_SCHEMA).to_pylist()):
            try:
                outcomes.append(EngineOutcome.model_validate(normalize_record(record)))
            except ValidationError as e:
                r = Rejection.from_error(index, e, row_id=record.get("sample_id"))
                raise ValueError(f"outcomes {file}: row {index} ({r.row_id}): {r.field}: {r.reason} "
                                 f"(value: {r.value})") from None
    return outcomes
