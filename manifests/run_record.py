"""A run and its attempts: ``run.json`` (what fixes a run's outputs, and its cumulative state) and
``attempts/{id}.json`` (what each submission did).

The output root of ``batch submit`` holds one run. Its first submission fixes the settings that change what a row's
images are (:attr:`RunRecord.settings`: manifest, preset, local encoder, LoRA registry, local tokens, dtype, metrics,
gate) and, once the actors have loaded them, the fingerprints of those weights; a later submission must match them
(:func:`differences` names each mismatch). Execution settings (actors, batch size, ...) do not change finished rows;
a submission that changes them says so with ``--new-attempt``.

Every submission is an *attempt*, recorded at its start and again at its end under ``attempts/{id}.json``: when and
where it ran, its execution settings, how it ended and what it did. ``run.json`` is the cumulative state of the run:
rows ok / error (from the ledger), rejected and pending, images, and time per stage summed over attempts, so a
resubmission that finds nothing to do still reports the whole run.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
from importlib import metadata
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from manifests import storage
from manifests.schema import utc_now

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
ATTEMPTS_DIR = "attempts"
RUN_FORMAT = 2  # run.json of versions before attempts had no "format"
PACKAGES = ("dreamrelation", "torch", "diffusers", "transformers", "peft", "ray", "pyarrow", "pydantic", "fsspec",
            "s3fs", "safetensors", "pillow")

AttemptStatus = Literal["running", "completed", "interrupted", "failed"]


class RunFormatError(ValueError):
    """run.json or an attempt record cannot be read as one of this version's records."""


class RunMismatch(ValueError):
    """A submission whose settings differ from the run's (or weights that changed since the run started)."""


class AttemptRecord(BaseModel):
    """One submission of a run (``attempts/{attempt_id}.json``)."""

    model_config = ConfigDict(extra="forbid")

    attempt_id: str
    generation: int = 0
    status: AttemptStatus = "running"
    exit_reason: Optional[str] = None  # why it stopped, one line (interrupted, failed: the error)
    started_at: str = Field(default_factory=utc_now)
    ended_at: Optional[str] = None
    host: str = Field(default_factory=socket.gethostname)
    pid: int = Field(default_factory=os.getpid)
    user: str = Field(default_factory=lambda: _user())
    execution: dict[str, Any] = Field(default_factory=dict)  # actors, batch size, ... of this submission
    flags: dict[str, Any] = Field(default_factory=dict)  # resume, retry_errors, new_attempt
    # read / rejected / skipped / processed / ok / error / images of this attempt (None: not known, it was stopped)
    counts: dict[str, Optional[int]] = Field(default_factory=dict)
    gate: Optional[dict[str, Any]] = None
    seconds: Optional[float] = None  # wall time of the attempt
    seconds_per_stage: dict[str, float] = Field(default_factory=dict)  # actor time per stage, summed over rows
    images_per_second: Optional[float] = None
    cache: dict[str, Any] = Field(default_factory=dict)  # LoRA / subject cache hit rates
    workers: list[dict[str, Any]] = Field(default_factory=list)  # each distinct actor setup: host, fingerprints
    error_samples: list[list[str]] = Field(default_factory=list)  # (row_id, error) of the first 100 error rows
    package_versions: dict[str, str] = Field(default_factory=dict)


class RunRecord(BaseModel):
    """``run.json``: the run's fixed settings and its cumulative state over every attempt."""

    model_config = ConfigDict(extra="forbid")

    format: int = RUN_FORMAT
    output: str
    created_at: str = Field(default_factory=utc_now)
    settings: dict[str, Any]  # fixed by the first submission: what changes outputs
    fingerprints: dict[str, Optional[str]] = Field(default_factory=dict)  # the weights, from the first actors
    lora_fingerprints: dict[str, str] = Field(default_factory=dict)  # relation -> its LoRA file when first used
    execution: dict[str, Any] = Field(default_factory=dict)  # of the latest attempt
    generation: int = 0  # bumped by --no-resume: older results stay under their attempts, out of the ledger
    attempts: list[str] = Field(default_factory=list)
    status: AttemptStatus = "running"  # of the latest attempt
    rows: dict[str, int] = Field(default_factory=dict)  # read, ok, error, rejected, pending (whole run)
    images: int = 0
    gate: Optional[dict[str, Any]] = None  # rows passed / failed (whole run)
    seconds: float = 0.0  # wall time summed over attempts
    seconds_per_stage: dict[str, float] = Field(default_factory=dict)  # summed over attempts
    last_attempt: dict[str, Any] = Field(default_factory=dict)  # id, status, counts of the latest attempt
    package_versions: dict[str, str] = Field(default_factory=dict)  # of the latest attempt's driver


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return str(os.getuid()) if hasattr(os, "getuid") else "?"


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that make the images (a missing one is left out)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def run_uri(output: str) -> str:
    return storage.join(output, RUN_FILE)


def attempt_uri(output: str, attempt_id: str) -> str:
    return storage.join(output, ATTEMPTS_DIR, f"{attempt_id}.json")


def read_run_json(output: str) -> dict[str, Any]:
    """``run.json`` as plain JSON (``{}`` when there is none); any version."""
    uri = run_uri(output)
    if not storage.exists(uri):
        return {}
    try:
        data = json.loads(storage.read_bytes(uri))
    except ValueError as e:
        raise RunFormatError(f"{uri} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise RunFormatError(f"{uri} must hold a JSON object, got {type(data).__name__}")
    return data


def read_run(output: str) -> RunRecord | None:
    """The run at ``output`` (None when there is none). A run.json of an older version, or one that does not parse,
    raises :class:`RunFormatError` naming the file."""
    data = read_run_json(output)
    if not data:
        return None
    if data.get("format") != RUN_FORMAT:
        raise RunFormatError(f"{run_uri(output)} was written by an older version of dreamrelation (no run "
                             f"settings or attempts): its rows cannot be resumed safely; use a new --output")
    try:
        return RunRecord.model_validate(data)
    except ValidationError as e:
        raise RunFormatError(f"{run_uri(output)} is not a run record: {e.errors(include_url=False)[0]['msg']}") \
            from None


def write_run(output: str, record: RunRecord) -> None:
    storage.write_bytes_atomic(run_uri(output), record.model_dump_json(indent=2).encode())


def current_generation(output: str) -> int:
    """The run's current generation of results (0 for a run folder without a run.json of this version)."""
    data = read_run_json(output)
    return int(data.get("generation", 0)) if data.get("format") == RUN_FORMAT else 0


def read_attempts(output: str) -> list[AttemptRecord]:
    """Every attempt record of the run, oldest first (an unreadable record is skipped with its name logged)."""
    records = []
    for uri in storage.list_files(storage.join(output, ATTEMPTS_DIR), ".json"):
        try:
            records.append(AttemptRecord.model_validate_json(storage.read_bytes(uri)))
        except (ValidationError, ValueError) as e:
            logger.warning("skipping unreadable attempt record %s (%s)", uri, e)
    return sorted(records, key=lambda a: a.attempt_id)


def write_attempt(output: str, record: AttemptRecord) -> None:
    storage.write_bytes_atomic(attempt_uri(output, record.attempt_id), record.model_dump_json(indent=2).encode())


def next_attempt_id(output: str) -> str:
    """``0001``, ``0002``, ...: one more than the highest attempt recorded (ids sort in submission order)."""
    seen = [int(a.attempt_id) for a in read_attempts(output) if a.attempt_id.isdigit()]
    return f"{max(seen, default=0) + 1:04d}"


def _show(value: Any) -> str:
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else repr(value)


def differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``["preset: 'tiny' in the run, 'sdxl' now", ...]`` for every key whose value differs (sorted by key)."""
    out = []
    for key in sorted(set(before) | set(now)):
        if before.get(key) != now.get(key):
            out.append(f"{key}: {_show(before.get(key))} in the run, {_show(now.get(key))} now")
    return out
