"""The batch job on Ray Data: manifest -> validation -> resume -> plan -> GPU actor pool -> results + run.json.

The only module of the project that speaks Ray Data. The driver reads and validates the manifest itself (it is
metadata, a few MB for 50,000 rows, and duplicate row ids need the whole table), writes the rejected rows with
their reasons and the accepted ones to ``{out}/manifest.parquet`` (the rows of the run, which export and evaluation
read), skips rows that already have a result (resume), orders the rest by relation and subject set (LoRA
and subject-cache locality), and hands them to ``map_batches`` on a fixed ``ActorPoolStrategy``. Each actor is a
thin shell over :class:`batch.worker.Worker`: it writes images and a results file per batch itself, atomically and
under deterministic names, so a killed driver or actor never leaves partial files and a retried batch never
duplicates a result. A quality gate (``WorkerConfig.gate``) runs inside the actors; run.json counts its outcome.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from manifests import storage
from manifests.io import (
    check_image_file,
    read_manifest_table,
    read_results,
    validate_table,
    write_manifest,
    write_rejections,
)
from manifests.registry import LoRARegistry
from manifests.runtime import ray_init_args
from manifests.schema import GateSpec

from .worker import WorkerConfig

logger = logging.getLogger(__name__)

RUN_MANIFEST = "manifest.parquet"  # {out}/manifest.parquet: the accepted rows of the run


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
    resume: bool = True
    check_images: bool = True

    def worker_config(self) -> WorkerConfig:
        base = self.worker or WorkerConfig(output=self.output, preset=self.preset, loras=self.loras)
        return replace(base, output=self.output, preset=self.preset, loras=self.loras)


class JobError(RuntimeError):
    """A failure of the whole job (bad manifest file, storage, cluster): stops before or during the run."""


def _init_ray(address: str | None) -> None:
    """Join ``address`` or start a local Ray (workers inherit the driver's storage and model settings)."""
    import ray

    if not ray.is_initialized():
        ray.init(**ray_init_args(address))


class GenerationActor:
    """Ray actor: builds one :class:`Worker` (models, caches) and serves batches of rows."""

    def __init__(self, config: dict):
        from .worker import Worker

        self.worker = Worker(WorkerConfig(**config))

    def __call__(self, batch: dict) -> dict:
        records = [row for chunk in batch["rows"] for row in json.loads(chunk)]
        results = self.worker.process_and_write(records)
        return {
            "row_id": [r.row_id for r in results],
            "status": [r.status for r in results],
            "error": [r.error or "" for r in results],
            "images": [len(r.images) for r in results],
            "relation": [r.relation or "" for r in results],
            "lora_cache_hit": [-1 if r.lora_cache_hit is None else int(r.lora_cache_hit) for r in results],
            "subject_cache_hits": [r.subject_cache_hits for r in results],
            "subjects": [len(records[i]["subjects"]) for i in range(len(results))],
            "gate": [r.gate or "" for r in results],
            "attempts": [len(r.attempts) for r in results],  # images made under the gate, final ones included
            "seconds": [json.dumps({k: getattr(r, k) for k in r.model_fields if k.startswith("seconds_")})
                        for r in results],
        }


def submit(config: JobConfig, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Run the job; returns the run summary that is also written to ``{output}/run.json``."""
    t_start = time.perf_counter()
    out = config.output
    gate = config.worker_config().gate_spec()  # WorkerConfig checked it, and that metrics are on
    # 1. read + validate on the driver; file-level problems fail here, before Ray starts or a model loads
    table = read_manifest_table(config.manifest)
    registry = LoRARegistry(config.loras)
    rows, rejected = validate_table(
        table, check_image=check_image_file if config.check_images else None,
        known_relations=registry.has, base_uri=config.manifest,
    )
    write_rejections(rejected, storage.join(out, "rejected.parquet"))
    _write_run_manifest(rows, config.manifest, storage.join(out, RUN_MANIFEST))
    # 2. resume: rows that already have a result are done
    done: set[str] = set()
    if config.resume:
        done = set(read_results(storage.join(out, "results")).column("row_id").to_pylist())
    todo = [r for r in rows if r.row_id not in done]
    # 3. plan: chunks of rows that share a relation, ordered by subject set (LoRA and subject-cache locality)
    chunks = plan_chunks(todo, config.batch_size)
    summary: dict[str, Any] = dict(
        manifest=config.manifest, output=out, read=table.num_rows, accepted=len(rows), rejected=len(rejected),
        skipped=len(rows) - len(todo), ok=0, error=0, images=0,
    )
    results: list[dict] = []
    t_run = time.perf_counter()
    if chunks:
        results = _run_actors(config, chunks, len(todo), progress)
    wall = time.perf_counter() - t_run
    summary.update(_summarize(results, wall))
    summary["gate"] = _gate_summary(results, gate) if gate else None
    summary["seconds_total"] = round(time.perf_counter() - t_start, 3)
    summary["configuration"] = {**{k: v for k, v in asdict(config).items() if k != "worker"},
                                "worker": config.worker_config().to_dict()}
    storage.write_bytes_atomic(storage.join(out, "run.json"), json.dumps(summary, indent=2).encode())
    return summary


def _write_run_manifest(rows: list, source: str, uri: str) -> None:
    """The accepted rows (subject images as absolute URIs) at ``uri``; a manifest that is that file already is
    left as it is (a rerun over a run folder's own manifest)."""
    fs_a, path_a = storage.filesystem(source)
    fs_b, path_b = storage.filesystem(uri)
    if type(fs_a) is type(fs_b) and path_a.rstrip("/") == path_b.rstrip("/"):
        logger.warning("the manifest is %s itself: not overwritten with the accepted rows", uri)
        return
    write_manifest(rows, uri)


def _gate_summary(results: list[dict], gate: GateSpec) -> dict[str, Any]:
    """Gate counts of this submission's rows: passed / failed rows, images made under the gate, extra images."""
    ok = [r for r in results if r["status"] == "ok"]
    attempts = sum(int(r["attempts"]) for r in ok)
    return dict(thresholds=dict(gate.thresholds), max_attempts=gate.max_attempts,
                passed=sum(r["gate"] == "passed" for r in ok), failed=sum(r["gate"] == "failed" for r in ok),
                attempts=attempts, extra_images=attempts - sum(int(r["images"]) for r in ok))


def plan_chunks(rows: list, batch_size: int) -> list[list]:
    """Rows -> actor calls: sorted by (relation, subject set, batch key); a call never mixes relations, so an
    actor activates one relation LoRA per call, and rows that can denoise together sit side by side."""
    ordered = sorted(rows, key=lambda r: (r.relation or "", r.subject_key(), r.batch_key(), r.row_id))
    chunks: list[list] = []
    for row in ordered:
        if chunks and len(chunks[-1]) < batch_size and (chunks[-1][0].relation or "") == (row.relation or ""):
            chunks[-1].append(row)
        else:
            chunks.append([row])
    return chunks


def _run_actors(config: JobConfig, chunks: list[list], total: int,
                progress: Callable[[int, int], None] | None) -> list[dict]:
    import ray
    import ray.data

    _init_ray(config.address)
    has_gpu = ray.cluster_resources().get("GPU", 0) > 0
    gpus = config.gpus_per_actor if config.gpus_per_actor is not None else (1.0 if has_gpu else 0.0)
    cpus = config.cpus_per_actor if config.cpus_per_actor is not None else (1.0 if gpus else 0.5)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    worker = config.worker_config()
    if not gpus and worker.device == "auto":
        worker = replace(worker, device="cpu")
    # one item per actor call: a JSON list of rows (nested manifest rows travel as text, not as Arrow structs)
    items = [{"rows": json.dumps([r.model_dump(mode="json") for r in chunk])} for chunk in chunks]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        GenerationActor,
        fn_constructor_kwargs={"config": worker.to_dict()},
        compute=ray.data.ActorPoolStrategy(size=config.actors),
        batch_size=1,
        num_gpus=gpus,
        num_cpus=cpus,
    )
    results: list[dict] = []
    for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
        results.extend(batch.to_dict("records"))
        if progress:
            progress(len(results), total)
    return results


def _summarize(results: list[dict], wall: float) -> dict[str, Any]:
    ok = [r for r in results if r["status"] == "ok"]
    images = sum(int(r["images"]) for r in ok)
    stages: dict[str, float] = {}
    for r in results:
        for k, v in json.loads(r["seconds"]).items():
            stages[k.removeprefix("seconds_")] = stages.get(k.removeprefix("seconds_"), 0.0) + float(v)
    lora = [int(r["lora_cache_hit"]) for r in results if int(r["lora_cache_hit"]) >= 0]
    return dict(
        ok=len(ok), error=len(results) - len(ok), images=images,
        seconds_run=round(wall, 3), images_per_second=round(images / wall, 4) if wall > 0 and images else 0.0,
        seconds_per_stage={k: round(v, 3) for k, v in sorted(stages.items())},
        lora_cache_hit_rate=round(sum(lora) / len(lora), 4) if lora else None,
        subject_cache_hits=int(sum(int(r["subject_cache_hits"]) for r in results)),
        subject_cache_hit_rate=(round(sum(int(r["subject_cache_hits"]) for r in results)
                                      / max(1, sum(int(r["subjects"]) for r in results)), 4)),
        errors=[{"row_id": r["row_id"], "error": r["error"]} for r in results if r["status"] != "ok"][:100],
    )
