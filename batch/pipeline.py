"""The Ray Data pipeline of one attempt: manifest -> validation on the workers -> GPU actor pool -> counters.

One streaming execution; the driver holds counters, never rows, so its memory does not grow with the manifest::

    read_parquet(manifest)                    any fsspec URL; a few hundred rows per block, so the first rows reach
                                              the actors while the rest is still being read
    -> map_batches(ValidateRows)              the pure checks of ``manifests.validation`` on the workers; rows whose id
                                              is a later duplicate, and rows already done (the resume anti-join against
                                              the ledger's row ids), never reach the checks; each worker writes the rows
                                              it rejects; accepted rows leave sorted by relation and subject set
    -> repartition(batch_size rows/block)     one block per actor call
    -> map_batches(GenerationActor)           each actor holds a :class:`batch.worker.Worker` (model, relation-LoRA
                                              cache); writes images and one results file per call, returns one
                                              counter row per call

What needs the whole manifest runs before, on a worker, over the smallest projection that serves: the row ids and
Ray Data's row hashes, read in order (:func:`index_rows`: duplicates and row numbers). Everything here is a thin shell
over Ray-free code (``manifests``, ``batch.worker``) that tests call directly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from manifests import storage
from manifests.io import MANIFEST_SCHEMA, REJECTED_SCHEMA, read_table, write_table
from manifests.schema import GenerationRow, Rejection
from manifests.validation import Checks, duplicate_rejection, normalize_record

logger = logging.getLogger(__name__)

ROW_HASH = "row_hash"  # Ray Data's deterministic per-row hash (source file, position in it): include_row_hash=True
VALIDATE_BATCH = 1024  # rows per validation call; accepted rows are sorted within it (LoRA / subject locality)
BLOCK_BYTES = 512 * 1024  # target block size: blocks of ~1000 manifest rows stream into validation early
REJECTED_PARTS = "rejected"  # {out}/attempts/{id}/rejected/part-*.parquet, combined into {out}/rejected.parquet
REJECTED_FILE = "rejected.parquet"
ACTOR_RESTARTS = 64  # times one generation actor may be restarted after its process died


def configure_data_context() -> None:
    """Ray Data settings of this job (per process: the driver and every worker task that reads the manifest)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.target_max_block_size = BLOCK_BYTES
    # The V1 Parquet reader: its first block of a 100k-row manifest arrives in ~0.2 s here, the V2 reader's in ~7 s.
    ctx.use_datasource_v2 = False


def read_manifest_rows(manifest: str, columns: list[str] | None = None):
    """The manifest as a Ray Data dataset with :data:`ROW_HASH` (``columns``: a projection)."""
    import ray.data

    ds = ray.data.read_parquet(manifest, include_row_hash=True, num_cpus=0.25)
    return ds.select_columns([*columns, ROW_HASH]) if columns else ds


# ---------------------------------------------------------------------------------------- the ordered row-id pass
@dataclass
class RowIndex:
    """What needs the whole manifest, from its ``row_id`` column alone (see :func:`index_rows`)."""

    read: int  # rows in the manifest
    duplicates: dict[int, tuple[str, int]]  # row hash of each later occurrence -> (row_id, row number of the first)
    hashes: np.ndarray  # (read,) uint64 row hashes, sorted
    numbers: np.ndarray  # (read,) int64 row number of each sorted hash

    ids: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))  # distinct row ids

    def count_in(self, row_ids: pa.Array) -> int:
        """How many of the manifest's distinct row ids are in ``row_ids``."""
        return int(pc.sum(pc.is_in(self.ids, value_set=row_ids)).as_py() or 0) if len(self.ids) else 0

    def numbers_of(self, hashes: np.ndarray) -> np.ndarray:
        """Row numbers (from 0, in manifest order) of rows given by their hashes."""
        return self.numbers[np.searchsorted(self.hashes, hashes)]


def index_rows(manifest: str) -> RowIndex:
    """One ordered pass over ``row_id`` and the row hashes: the row number of every row and the later occurrences of
    duplicated ids. Runs on a worker (the arrays are ~16 bytes a row; the driver never holds them)."""
    import ray.data

    configure_data_context()
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ids, hashes = [], []
    for batch in read_manifest_rows(manifest, ["row_id"]).iter_batches(batch_size=None, batch_format="pyarrow"):
        ids.append(batch["row_id"].cast(pa.string()))
        hashes.append(batch[ROW_HASH].to_numpy())
    all_ids = pa.chunked_array(ids, type=pa.string()) if ids else pa.chunked_array([], type=pa.string())
    all_hashes = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    duplicates: dict[int, tuple[str, int]] = {}
    counts = pc.value_counts(all_ids.drop_null())
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(repeated):
        positions = np.flatnonzero(pc.is_in(all_ids, value_set=repeated).to_numpy(zero_copy_only=False))
        first: dict[str, int] = {}
        for pos in positions.tolist():
            row_id = all_ids[pos].as_py()
            if row_id in first:
                duplicates[int(all_hashes[pos])] = (row_id, first[row_id])
            else:
                first[row_id] = pos
    order = np.argsort(all_hashes, kind="stable")
    return RowIndex(read=len(all_hashes), duplicates=duplicates, hashes=all_hashes[order], numbers=order,
                    ids=counts.field("values"))


# ------------------------------------------------------------------------------------------------------ validation
def rejected_part_uri(output: str, attempt_id: str, hashes: np.ndarray) -> str:
    """A deterministic file per validated batch: a retried task overwrites its own rejections."""
    digest = hashlib.sha1(np.sort(hashes).tobytes()).hexdigest()[:20]
    return storage.join(output, "attempts", attempt_id, REJECTED_PARTS, f"part-{digest}.parquet")


class BatchValidator:
    """Manifest batches (with :data:`ROW_HASH`) in, accepted rows (``MANIFEST_SCHEMA``, sorted by relation and
    subject set) out; rejected rows written under ``{out}/attempts/{id}/rejected/`` with their row hash (row
    numbers are filled in when they are combined, :func:`combine_rejections`). ``duplicates``: later occurrences of
    repeated row ids, by row hash (:func:`index_rows`); ``done``: row ids with a final result (skipped)."""

    def __init__(self, manifest: str, output: str, attempt_id: str, loras: str | None, checks: Checks,
                 duplicates: dict[int, tuple[str, int]], done: pa.Array | None):
        self.output, self.attempt_id = output, attempt_id
        self.duplicates = duplicates
        self.done = frozenset(done.to_pylist()) if done is not None else frozenset()
        self.validator = checks.validator(manifest, loras)

    def __call__(self, batch: pa.Table) -> pa.Table:
        hashes = batch[ROW_HASH].to_numpy()
        records = batch.drop_columns([ROW_HASH]).to_pylist()
        rejected: list[tuple[int, Rejection]] = []
        todo: list[tuple[int, Any]] = []  # (row hash, record)
        for h, record in zip(hashes.tolist(), records):
            if h in self.duplicates:
                row_id, first = self.duplicates[h]
                rejected.append((h, duplicate_rejection(-1, row_id, first)))
            elif record.get("row_id") not in self.done:
                todo.append((h, record))
        accepted = []
        for (h, _), result in zip(todo, self.validator.check([(-1, r) for _, r in todo])):
            if isinstance(result, GenerationRow):
                accepted.append(result)
            else:
                rejected.append((h, result))
        if rejected:
            part = pa.Table.from_pylist([r.model_dump() for _, r in rejected], schema=REJECTED_SCHEMA)
            part = part.append_column(ROW_HASH, pa.array([h for h, _ in rejected], pa.uint64()))
            write_table(part, rejected_part_uri(self.output, self.attempt_id, part[ROW_HASH].to_numpy()))
        accepted.sort(key=lambda r: (r.relation or "", r.subject_key(), r.batch_key(), r.row_id))
        return pa.Table.from_pylist([r.model_dump() for r in accepted], schema=MANIFEST_SCHEMA)


class ValidateRows(BatchValidator):
    """The Ray Data shell of :class:`BatchValidator`: the duplicates and the done row ids come as object refs."""

    def __init__(self, manifest: str, output: str, attempt_id: str, loras: str | None, checks: Checks,
                 refs: list):
        import ray

        duplicates_ref, done_ref = refs
        super().__init__(manifest, output, attempt_id, loras, checks, ray.get(duplicates_ref), ray.get(done_ref))


def combine_rejections(output: str, attempt_id: str, index: RowIndex) -> pa.Table:
    """This attempt's rejected rows, one per row, with their row numbers, sorted by them (REJECTED_SCHEMA)."""
    files = storage.list_files(storage.join(output, "attempts", attempt_id, REJECTED_PARTS), ".parquet")
    if not files:
        return REJECTED_SCHEMA.empty_table()
    table = pa.concat_tables([read_table(f) for f in files])
    hashes = table[ROW_HASH].to_numpy()
    _, unique = np.unique(hashes, return_index=True)  # a retried batch may have written its rows twice
    table = table.take(pa.array(unique))
    numbers = index.numbers_of(table[ROW_HASH].to_numpy())
    table = table.drop_columns([ROW_HASH]).set_column(REJECTED_SCHEMA.get_field_index("index"), "index",
                                                      pa.array(numbers, pa.int64()))
    return table.take(pc.sort_indices(table, [("index", "ascending")])).cast(REJECTED_SCHEMA)


# ------------------------------------------------------------------------------------------------------ generation
class GenerationActor:
    """Ray actor: builds one :class:`batch.worker.Worker` (models, caches) and serves calls of ``batch_size`` rows;
    returns one counter row per call (the results themselves are written by the worker)."""

    def __init__(self, config: dict):
        from .worker import Worker, WorkerConfig

        self.worker = Worker(WorkerConfig(**config))
        self.setup = json.dumps({"host": socket.gethostname(), "fingerprints": self.worker.fingerprints},
                                sort_keys=True)

    def __call__(self, batch: pa.Table) -> dict[str, list]:
        records = [normalize_record(r) for r in batch.to_pylist()]
        results = self.worker.process_guarded(records)
        ok = [r for r in results if r.status == "ok"]
        stages: Counter = Counter()
        for r in results:
            stages.update({k.removeprefix("seconds_"): getattr(r, k) for k in r.model_fields if k.startswith("seconds_")})
        lora = [r.lora_cache_hit for r in results if r.lora_cache_hit is not None]
        return {
            "rows": [len(results)], "ok": [len(ok)], "error": [len(results) - len(ok)],
            "images": [sum(len(r.images) for r in ok)],
            "gate_passed": [sum(r.gate == "passed" for r in ok)], "gate_failed": [sum(r.gate == "failed" for r in ok)],
            "gate_images": [sum(len(r.attempts) for r in ok if r.gate)],
            "lora_hits": [sum(lora)], "lora_lookups": [len(lora)],
            "subject_hits": [sum(r.subject_cache_hits for r in results)],
            "subjects": [sum(len(rec.get("subjects") or []) for rec in records)],
            "seconds": [json.dumps(dict(stages))],
            "errors": [json.dumps([[r.row_id, r.error] for r in results if r.status != "ok"][:5])],
            "setup": [self.setup],
        }


@dataclass
class Tally:
    """The driver's counters of an attempt: sums of the actors' counter rows (never the rows themselves)."""

    rows: int = 0
    ok: int = 0
    error: int = 0
    images: int = 0
    gate_passed: int = 0
    gate_failed: int = 0
    gate_images: int = 0
    lora_hits: int = 0
    lora_lookups: int = 0
    subject_hits: int = 0
    subjects: int = 0
    seconds_per_stage: Counter = field(default_factory=Counter)
    errors: list = field(default_factory=list)  # (row_id, error), the first 100
    setups: set = field(default_factory=set)  # distinct actor setups (host, fingerprints) as JSON

    def add(self, batch: pa.Table) -> int:
        """Add a batch of counter rows; returns the rows they account for."""
        cols = batch.to_pydict()
        for name in ("rows", "ok", "error", "images", "gate_passed", "gate_failed", "gate_images", "lora_hits",
                     "lora_lookups", "subject_hits", "subjects"):
            setattr(self, name, getattr(self, name) + int(sum(cols[name])))
        for seconds in cols["seconds"]:
            self.seconds_per_stage.update(json.loads(seconds))
        for errors in cols["errors"]:
            self.errors.extend(json.loads(errors)[: max(0, 100 - len(self.errors))])
        self.setups.update(cols["setup"])
        return int(sum(cols["rows"]))

    def fingerprints(self) -> dict[str, Any] | None:
        """The weights' fingerprints the actors reported (None before the first call)."""
        return json.loads(sorted(self.setups)[0])["fingerprints"] if self.setups else None


def run_pipeline(manifest: str, output: str, attempt_id: str, worker: dict, *, loras: str | None, checks: Checks,
                 duplicates_ref, done_ref, actors: int, batch_size: int, gpus: float, cpus: float, validators: int,
                 tally: Tally, progress: Callable[[int], None] | None = None) -> Tally:
    """Stream the manifest through validation and the actor pool, adding the actors' counters to ``tally`` as
    they come (so an interrupted run still knows what it did); ``progress(rows)`` after each call. Raises what Ray
    Data raises (the caller names the cause)."""
    import ray.data

    configure_data_context()
    ds = read_manifest_rows(manifest)
    ds = ds.map_batches(
        ValidateRows, batch_size=VALIDATE_BATCH, batch_format="pyarrow", num_cpus=0.25,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, validators)),
        fn_constructor_kwargs=dict(manifest=manifest, output=output, attempt_id=attempt_id, loras=loras,
                                   checks=checks, refs=[duplicates_ref, done_ref]),
    )
    ds = ds.repartition(target_num_rows_per_block=batch_size)
    ds = ds.map_batches(
        GenerationActor, batch_size=batch_size, batch_format="pyarrow", num_gpus=gpus, num_cpus=cpus,
        compute=ray.data.ActorPoolStrategy(size=actors), fn_constructor_kwargs={"config": worker},
        # bounded, never Ray Data's default of forever: a row that kills its actor is retried up to
        # max_row_kills times, then becomes an error row (Worker.process_guarded)
        max_restarts=ACTOR_RESTARTS, max_task_retries=worker["max_row_kills"] + 2,
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        done = tally.add(batch)
        if progress:
            progress(done)
    return tally
