"""``batch submit``: one attempt of a run, kept honest by a lease, a settings check, attempt records and the ledger.

A run is an output root. :func:`submit`:

1. resolves every path to an absolute URI (workers never see the submitting shell's folder) and reads the manifest's
   Parquet footers (a bad file fails here, before anything is written);
2. takes the output's lease (``manifests.lease``: one writer at a time; a second submit refuses, naming the holder);
3. checks the submission against ``run.json`` (``manifests.run_record``): settings that change images must be the
   run's, LoRA files must be the ones the run used, other execution settings need ``--new-attempt``;
4. records the attempt (``attempts/{id}.json``) and streams the manifest through :mod:`batch.pipeline`; rows that
   already have a final result in the ledger are skipped (resume), errors too unless ``--retry-errors``;
   ``--no-resume`` starts a new generation of results instead;
5. however it ends (done, Ctrl-C, a failure), writes ``rejected.parquet`` (completed attempts), compacts the
   attempt's result files, and writes the attempt record and ``run.json`` (cumulative counts from the ledger),
   releases the lease and shuts down the Ray it started.

Work that reads whole files (row ids, the ledger) runs in Ray tasks, so the driver's memory stays flat.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any

from dreamrelation.model.preset_names import is_named
from manifests import storage
from manifests.access import AccessPolicy
from manifests.errors import one_line
from manifests.io import manifest_row_count, parquet_rows, write_table
from manifests.lease import Lease, LeaseHeld
from manifests.ledger import attempt_folders, compact_all, done_row_ids, ledger_counts
from manifests.registry import LoRARegistry
from manifests.run_record import (
    AttemptRecord,
    RunFormatError,
    RunMismatch,
    RunRecord,
    differences,
    next_attempt_id,
    package_versions,
    read_run,
    write_attempt,
    write_run,
)
from manifests.runtime import ray_init_args
from manifests.schema import utc_now
from manifests.validation import DEFAULT_MAX_ROW_COST, Checks

from . import pipeline
from .worker import WorkerConfig

logger = logging.getLogger(__name__)

TASK_CPUS = 0.25  # the small whole-file tasks (row ids, ledger): a fraction, beside the actors
TOTAL_WAIT_S = 5.0  # how long the driver waits for the count of rows to check before starting the pipeline


@dataclass(frozen=True)
class JobConfig:
    """``dreamrelation batch submit`` options. The quality gate and the other per-actor settings live in
    ``worker`` (a :class:`WorkerConfig`; its ``gate`` is a ``manifests.schema.GateSpec``)."""

    manifest: str
    output: str = "outputs/batch"
    worker: WorkerConfig | None = None  # built from the fields below when None
    preset: str = "tiny"
    loras: str | None = None
    actors: int = 1
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float | None = None  # None: 0.5 without GPUs (Ray Data deadlocks if actors take every CPU)
    batch_size: int = 4  # rows per actor call
    address: str | None = None  # None: a local Ray started in-process
    resume: bool = True  # False: a new generation of results (the old ones stay under their attempts)
    retry_errors: bool = False  # rows whose final result is an error run again
    new_attempt: bool = False  # accept other execution settings (actors, batch size, ...) than the run's
    check_images: bool = True
    max_row_cost: float | None = DEFAULT_MAX_ROW_COST  # megapixel-steps a row may ask for (None: no budget)
    lease_timeout: float = 300.0  # seconds without a heartbeat after which a lease may be stolen
    steal_lease: bool = False
    create_bucket: bool = False  # an output bucket must exist unless this says to create it

    def worker_config(self) -> WorkerConfig:
        base = self.worker or WorkerConfig(output=self.output, preset=self.preset, loras=self.loras)
        return replace(base, output=self.output, preset=self.preset, loras=self.loras)

    def absolute(self) -> "JobConfig":
        """Every user path as an absolute URI (a worker's folder is not the shell's)."""
        worker = self.worker_config()
        preset = self.preset if is_named(self.preset) else storage.absolute(self.preset)
        loras = storage.absolute(self.loras) if self.loras else None
        output = storage.absolute(self.output).rstrip("/")
        local = worker.local_encoder  # a local path made absolute; a URL or a hub ref owner/repo/file as is
        if local and "://" not in local and os.path.exists(os.path.expanduser(local)):
            local = storage.absolute(local)
        worker = replace(worker, output=output, preset=preset, loras=loras, local_encoder=local)
        return replace(self, manifest=storage.absolute(self.manifest), output=output, preset=preset, loras=loras,
                       worker=worker)

    def checks(self) -> Checks:
        """The row checks the validation actors run (the pixel cap and access policy are the worker's too)."""
        w = self.worker_config()
        return Checks(check_images=self.check_images, max_image_pixels=w.max_image_pixels,
                      max_row_cost=self.max_row_cost, access=w.access)

    def settings(self) -> dict[str, Any]:
        """What changes a row's images: fixed by the run's first submission."""
        w = self.worker_config()
        grid = {"local_grid": w.local_grid} if w.local_grid is not None else {}  # runs made before it: the same
        return dict(manifest=self.manifest, preset=w.preset, local_encoder=w.local_encoder, loras=w.loras,
                    use_local_tokens=w.use_local_tokens, dtype=w.dtype, metrics=w.metrics, gate=w.gate, **grid)

    def execution(self) -> dict[str, Any]:
        """How rows are made, not what they become: may change between attempts with ``--new-attempt``."""
        w = self.worker_config()
        return dict(actors=self.actors, gpus_per_actor=self.gpus_per_actor, cpus_per_actor=self.cpus_per_actor,
                    batch_size=self.batch_size, max_batch_images=w.max_batch_images, address=self.address,
                    lora_cache_size=w.lora_cache_size, subject_cache_size=w.subject_cache_size, device=w.device,
                    compile_unet=w.compile_unet, check_images=self.check_images, max_row_cost=self.max_row_cost,
                    max_image_pixels=w.max_image_pixels, row_timeout=w.row_timeout, access=asdict(w.access))


class JobError(RuntimeError):
    """A failure of the whole job (storage, cluster, a model that does not load): one line, naming what failed."""


class JobInterrupted(RuntimeError):
    """The attempt was stopped (Ctrl-C, SIGTERM); its record and run.json were written. ``summary``: as submit's."""

    def __init__(self, summary: dict[str, Any]):
        super().__init__(f"attempt {summary['attempt']['attempt_id']} interrupted")
        self.summary = summary


def lora_fingerprints(loras: str | None) -> dict[str, str]:
    """{relation: fingerprint of its LoRA file} for every relation in the registry (one stat each, in parallel)."""
    if not loras:
        return {}
    registry = LoRARegistry(loras, AccessPolicy(allow_external_loras=True))  # fingerprints only: nothing is read
    relations = registry.relations()
    with ThreadPoolExecutor(16) as pool:
        return dict(zip(relations, pool.map(registry.fingerprint, relations)))


# ------------------------------------------------------------------------------------------------------- the run
def _check_run(config: JobConfig, run: RunRecord | None, registry: dict[str, str]) -> RunRecord:
    """The run this submission continues (or starts); RunMismatch naming every difference that forbids it."""
    out = config.output
    if run is None:
        if attempt_folders(out):
            raise RunMismatch(f"output {out} holds results but no run.json of this version (a run of an older "
                              f"version?): its rows cannot be resumed safely; use a new --output")
        return RunRecord(output=out, settings=config.settings(), execution=config.execution(),
                         lora_fingerprints=registry)
    changed = differences(run.settings, config.settings())
    if changed:
        raise RunMismatch(f"output {out} holds a run made with other settings ({'; '.join(changed)}); these change "
                          f"the images: submit to a new --output")
    replaced = [f"{r}: {run.lora_fingerprints[r]} in the run, {fp} now" for r, fp in sorted(registry.items())
                if r in run.lora_fingerprints and run.lora_fingerprints[r] != fp]
    if replaced:
        raise RunMismatch(f"output {out}: relation LoRA files in {config.loras} changed since the run used them "
                          f"({'; '.join(replaced)}); restore them or submit to a new --output")
    other = differences(run.execution, config.execution())
    if other and not config.new_attempt:
        raise RunMismatch(f"output {out} was run with other execution settings ({'; '.join(other)}); they do not "
                          f"change finished rows: pass --new-attempt to go on with these")
    run.lora_fingerprints = {**registry, **run.lora_fingerprints}
    return run


def _init_ray(address: str | None) -> bool:
    """Join ``address`` or start a local Ray; True when this call started it (the job shuts it down again)."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(**ray_init_args(address))
    return True


def _remote(fn: Callable, *args: Any, num_returns: int = 1) -> Any:
    """``fn(*args)`` as a Ray task on a fraction of a CPU; object refs back (the driver fetches only what it needs)."""
    import ray

    return ray.remote(num_cpus=TASK_CPUS, num_returns=num_returns)(fn).remote(*args)


def _on_worker(fn: Callable, *args: Any) -> Any:
    """``fn(*args)`` in a Ray task when Ray is up (its value back), else here."""
    import ray

    return ray.get(_remote(fn, *args)) if ray.is_initialized() else fn(*args)


def _index_task(manifest: str) -> tuple[int, dict, pipeline.RowIndex]:
    index = pipeline.index_rows(manifest)
    return index.read, index.duplicates, index


def _ledger_task(output: str, earlier: list[str], resume: bool, retry_errors: bool):
    """Compact earlier attempts' result files, then the row ids that need no new result (None: no resume)."""
    compact_all(output, earlier)
    return done_row_ids(output, retry_errors) if resume else None


def _to_check_task(index: pipeline.RowIndex, done) -> int:
    """Rows of the manifest the pipeline must look at: all but the first occurrences of done row ids."""
    return index.read - (index.count_in(done) if done is not None else 0)


def _close_task(output: str, attempt_id: str, index, completed: bool) -> tuple[int | None, dict[str, int]]:
    """The attempt's rejected rows (replacing rejected.parquet when it completed), compaction, the ledger counts."""
    rejected = None
    if index is not None:
        table = pipeline.combine_rejections(output, attempt_id, index)
        rejected = table.num_rows
        if completed:
            write_table(table, storage.join(output, pipeline.REJECTED_FILE))
    compact_all(output, [attempt_id])
    return rejected, ledger_counts(output)


def submit(config: JobConfig, progress: Callable[[int, int | None], None] | None = None) -> dict[str, Any]:
    """Run one attempt of the run at ``config.output``; returns ``{"attempt": ..., "run": ...}`` (the attempt record
    and run.json as written). Raises ManifestError (bad manifest file), RunMismatch (settings), JobError (lease,
    storage, cluster, actors), JobInterrupted (Ctrl-C / SIGTERM, after writing the records)."""
    config = config.absolute()
    out = config.output
    read = manifest_row_count(config.manifest)
    lease = Lease(out, owner="starting", timeout=config.lease_timeout)
    try:
        storage.check_bucket(out, create=config.create_bucket)
        stolen = lease.acquire(steal=config.steal_lease)
    except FileNotFoundError:  # a mistyped bucket: the user's error, named
        raise
    except LeaseHeld as e:
        raise JobError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - storage down, no permission, a file where a folder should be
        raise JobError(f"cannot write to output {out}: {one_line(e)}") from e
    del stolen  # the lease logs a take-over itself
    try:
        try:
            run = _check_run(config, read_run(out), lora_fingerprints(config.loras))
        except RunFormatError as e:
            raise RunMismatch(str(e)) from None
        new_generation = not config.resume and bool(run.attempts)
        attempt = AttemptRecord(attempt_id=next_attempt_id(out), generation=run.generation + new_generation,
                                execution=config.execution(), package_versions=package_versions(),
                                flags=dict(resume=config.resume, retry_errors=config.retry_errors,
                                           new_attempt=config.new_attempt))
        lease.owner = attempt.attempt_id
        lease.heartbeat()
        lease.start_heartbeat()
        earlier = attempt_folders(out)
        run.generation, run.execution, run.status = attempt.generation, attempt.execution, "running"
        run.attempts.append(attempt.attempt_id)
        write_attempt(out, attempt)
        write_run(out, run)
        return _attempt(config, run, attempt, read, earlier, lease, progress)
    finally:
        lease.release()


def _attempt(config: JobConfig, run: RunRecord, attempt: AttemptRecord, read: int, earlier: list[str], lease: Lease,
             progress: Callable[[int, int | None], None] | None) -> dict[str, Any]:
    import ray

    out = config.output
    t0 = time.perf_counter()
    tally = pipeline.Tally()
    index_ref = None
    status, reason, error = "completed", None, None
    started_ray = False
    try:
        started_ray = _init_ray(config.address)
        _, duplicates_ref, index_ref = _remote(_index_task, config.manifest, num_returns=3)
        done_ref = _remote(_ledger_task, out, earlier, config.resume, config.retry_errors)
        to_check_ref = _remote(_to_check_task, index_ref, done_ref)
        # nothing to do (a finished run resubmitted): known within seconds, and then no actor loads a model;
        # otherwise the pipeline starts at once (actors load their models meanwhile) and the total comes later
        ready, _ = ray.wait([to_check_ref], timeout=TOTAL_WAIT_S)
        to_check: int | None = ray.get(to_check_ref) if ready else None
        has_gpu = ray.cluster_resources().get("GPU", 0) > 0
        gpus = config.gpus_per_actor if config.gpus_per_actor is not None else (1.0 if has_gpu else 0.0)
        cpus = config.cpus_per_actor if config.cpus_per_actor is not None else (1.0 if gpus else 0.5)
        worker = replace(config.worker_config(), attempt_id=attempt.attempt_id,
                         expect_fingerprints=run.fingerprints or None)
        if not gpus and worker.device == "auto":
            worker = replace(worker, device="cpu")
        free = ray.cluster_resources().get("CPU", 1) - config.actors * cpus
        done = 0

        def step(rows: int) -> None:
            nonlocal done, to_check
            if lease.lost:  # another submission took the output over (--steal-lease): stop writing into it
                raise JobError(f"lost the lease of {out} to another submission; stopping")
            done += rows
            if to_check is None and ray.wait([to_check_ref], timeout=0)[0]:
                to_check = ray.get(to_check_ref)
            if progress:
                progress(done, to_check)

        step(0)
        if to_check != 0:
            pipeline.run_pipeline(
                config.manifest, out, attempt.attempt_id, worker.to_dict(), loras=config.loras,
                checks=config.checks(), duplicates_ref=duplicates_ref, done_ref=done_ref,
                actors=config.actors, batch_size=config.batch_size, gpus=gpus, cpus=cpus,
                validators=int(max(1, min(8, free // 1.5))), tally=tally, progress=step)
    except KeyboardInterrupt:
        status, reason = "interrupted", "interrupted (Ctrl-C or SIGTERM): rows in flight were abandoned"
    except RunMismatch as e:
        status, reason, error = "failed", str(e), e
    except Exception as e:  # noqa: BLE001 - recorded, then raised as one line
        status, reason, error = "failed", one_line(e), e
    try:
        summary = _close(config, run, attempt, read, tally, index_ref, status, reason, time.perf_counter() - t0,
                         write_run_json=not lease.lost)
    finally:
        if started_ray:
            ray.shutdown()
    if status == "interrupted":
        raise JobInterrupted(summary)
    if isinstance(error, RunMismatch):
        raise error
    if error is not None:
        raise JobError(f"attempt {attempt.attempt_id} failed: {reason}") from error
    return summary


def _close(config: JobConfig, run: RunRecord, attempt: AttemptRecord, read: int, tally: pipeline.Tally, index_ref,
           status: str, reason: str | None, seconds: float, write_run_json: bool = True) -> dict[str, Any]:
    """Write the attempt record and run.json (best effort when the store itself failed: logged, not raised; not
    run.json when the lease was lost: the run belongs to its new holder)."""
    out = config.output
    rejected, totals = None, None
    try:
        rejected, totals = _on_worker(_close_task, out, attempt.attempt_id, index_ref, status == "completed")
    except BaseException as e:  # noqa: BLE001 - a store that is down: the records below say what is known
        logger.warning("could not read the run's results back from %s: %s", out, one_line(e))
    completed = status == "completed"
    attempt.status, attempt.exit_reason, attempt.ended_at = status, reason, utc_now()
    attempt.seconds = round(seconds, 3)
    attempt.counts = dict(read=read, rejected=rejected, processed=tally.rows, ok=tally.ok, error=tally.error,
                          images=tally.images,
                          skipped=read - rejected - tally.rows if completed and rejected is not None else None)
    attempt.seconds_per_stage = {k: round(v, 3) for k, v in sorted(tally.seconds_per_stage.items())}
    attempt.images_per_second = round(tally.images / seconds, 4) if seconds > 0 and tally.images else 0.0
    attempt.gate = (dict(thresholds=dict(config.worker_config().gate_spec().thresholds),
                         max_attempts=config.worker_config().gate_spec().max_attempts, passed=tally.gate_passed,
                         failed=tally.gate_failed, attempts=tally.gate_images,
                         extra_images=tally.gate_images - tally.images) if config.worker_config().gate else None)
    attempt.cache = dict(
        lora_hit_rate=round(tally.lora_hits / tally.lora_lookups, 4) if tally.lora_lookups else None,
        subject_hit_rate=round(tally.subject_hits / tally.subjects, 4) if tally.subjects else None)
    attempt.workers = [json.loads(s) for s in sorted(tally.setups)]
    attempt.error_samples = tally.errors
    run.status = status
    if not run.fingerprints and tally.fingerprints():
        run.fingerprints = tally.fingerprints()
    run.seconds = round(run.seconds + seconds, 3)
    for stage, value in attempt.seconds_per_stage.items():
        run.seconds_per_stage[stage] = round(run.seconds_per_stage.get(stage, 0.0) + value, 3)
    if totals is not None:
        rejected_now = parquet_rows(storage.join(out, pipeline.REJECTED_FILE))
        run.rows = dict(read=read, ok=totals["ok"], error=totals["error"], rejected=rejected_now,
                        pending=max(0, read - totals["ok"] - totals["error"] - rejected_now))
        run.images = totals["images"]
        run.gate = (dict(passed=totals["gate_passed"], failed=totals["gate_failed"])
                    if config.worker_config().gate else None)
    run.package_versions = attempt.package_versions
    run.last_attempt = dict(attempt_id=attempt.attempt_id, status=status, exit_reason=reason, counts=attempt.counts)
    try:
        write_attempt(out, attempt)
        if write_run_json:
            write_run(out, run)
    except Exception as e:  # noqa: BLE001 - the store is down: say so, the caller still reports the failure
        logger.error("could not write the attempt record or run.json under %s: %s", out, one_line(e))
    return {"attempt": attempt.model_dump(), "run": run.model_dump()}
