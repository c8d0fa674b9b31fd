"""Parallel relation-LoRA fine-tuning on Ray: one Tune trial per relation, or DDP for one relation on many GPUs.

Each trial loads the model, reads its relation's triplets, and runs :func:`dreamrelation.training.
train_relation_lora`. Every checkpoint of the training loop is reported to Tune, which keeps it in the run's
storage (any fsspec URL); a trial that fails is retried from its last checkpoint (``max_failures``), and a driver
that crashed is resumed with ``Tuner.restore`` because runs have stable names (no timestamps). A finished LoRA is
registered in the LoRA registry that ``batch submit`` reads, under its relation id.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from manifests import storage
from manifests.registry import LoRARegistry
from manifests.runtime import is_secret, ray_init_args
from manifests.triplets import read_triplets

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainJobConfig:
    """``dreamrelation train relations`` options."""

    data: str  # triplet dataset root (``{data}/triplets.parquet`` + images), any fsspec URL
    relations: tuple[str, ...]
    output: str = "outputs/train"  # Tune run storage: {output}/{name}/...
    loras: str | None = None  # LoRA registry root; default {output}/loras
    preset: str = "tiny"
    profile: str = "paper"
    steps: int = 500
    batch_size: int = 8
    resolution: int | None = None  # default: 1024 (sdxl) or 64 (tiny)
    checkpoint_every: int = 100
    seed: int = 0
    name: str = "train-relations"  # a stable run name: the same name resumes
    gpus_per_trial: float | None = None  # default: 1 when the cluster has GPUs, else 0
    cpus_per_trial: float | None = None  # default: 1 with GPUs, else 0.5
    workers_per_relation: int = 1  # > 1: one TorchTrainer (DDP) per relation instead of a Tune trial
    max_failures: int = 2
    address: str | None = None
    fail_once: tuple[str, ...] = ()  # fault injection: these relations' trials raise once after a checkpoint

    def registry_root(self) -> str:
        return self.loras or storage.join(self.output, "loras")

    def train_config(self, relation: str):
        from dreamrelation.config import TrainConfig

        resolution = self.resolution or (64 if self.preset == "tiny" else 1024)
        return TrainConfig(relation=relation, steps=self.steps, batch_size=self.batch_size, resolution=resolution,
                           profile=self.profile, checkpoint_every=self.checkpoint_every, seed=self.seed)


def load_examples(data: str, relation: str) -> list:
    """The relation's triplets as training examples (images read through fsspec)."""
    import io

    from PIL import Image

    from dreamrelation.data import example_from_record

    rows, rejected = read_triplets(data, relation=relation)
    if rejected:
        logger.warning("%d triplets of %r rejected: %s", len(rejected), relation, rejected[0].reason)
    if not rows:
        raise ValueError(f"no valid triplets for relation {relation!r} in {data!r}")

    def load_image(uri: str):
        return Image.open(io.BytesIO(storage.read_bytes(uri))).convert("RGB")

    return [example_from_record(r.model_dump(), load_image) for r in rows]


def _fault_marker(config: TrainJobConfig, relation: str) -> str:
    return storage.join(config.output, config.name, "_faults", relation)


def _train_relation(relation: str, config: TrainJobConfig, workdir: Path, report, grad_sync=None,
                    rank: int = 0) -> dict:
    """One relation, in one process: load, resume from ``workdir/checkpoints``, train, return the card."""
    import torch

    from dreamrelation.presets import load_pipeline
    from dreamrelation.training import train_relation_lora

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = load_pipeline(config.preset, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    examples = load_examples(config.data, relation)
    train_cfg = config.train_config(relation)
    if rank:  # DDP: each worker draws its own examples
        from dataclasses import replace

        train_cfg = replace(train_cfg, seed=train_cfg.seed + 1000 * rank)

    def callback(step: int, parts: dict) -> None:
        ckpt = workdir / "checkpoints" / f"step-{step:06d}.pt"
        report(step, parts, ckpt if ckpt.is_file() else None)
        if relation in config.fail_once and ckpt.is_file() and not storage.exists(_fault_marker(config, relation)):
            storage.write_bytes_atomic(_fault_marker(config, relation), b"failed once on purpose\n")
            raise RuntimeError(f"injected failure of {relation!r} after step {step} (fail_once)")

    result = train_relation_lora(pipe, examples, train_cfg, workdir, callback=callback, base_model=config.preset,
                                 grad_sync=grad_sync, save=rank == 0)
    return {"card": result.card, "lora_path": str(result.lora_path), "resumed_from": result.resumed_from}


def _restore_checkpoint(workdir: Path) -> None:
    """Copy Tune's last reported checkpoint (if any) into ``workdir/checkpoints`` so training resumes from it."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return
    with checkpoint.as_directory() as folder:
        (workdir / "checkpoints").mkdir(parents=True, exist_ok=True)
        for f in Path(folder).glob("step-*.pt"):
            shutil.copy(f, workdir / "checkpoints" / f.name)


def tune_trial(params: dict) -> None:
    """The Tune trainable: one relation."""
    from ray import tune

    config = TrainJobConfig(**{**params["job"], "relations": tuple(params["job"]["relations"]),
                               "fail_once": tuple(params["job"]["fail_once"])})
    relation = params["relation"]
    workdir = Path(tempfile.mkdtemp(prefix=f"train-{relation}-"))
    _restore_checkpoint(workdir)

    def report(step: int, parts: dict, ckpt: Path | None) -> None:
        metrics = {"step": step, **parts}
        if ckpt is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(ckpt, Path(tmp) / ckpt.name)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

    out = _train_relation(relation, config, workdir, report)
    uri = LoRARegistry(config.registry_root()).register(relation, out["lora_path"], card=out["card"])
    tune.report({**out["card"]["final_losses"], "step": config.steps, "done": 1, "lora_uri": uri,
                 "resumed_from": out["resumed_from"]})


def keep_secrets_out_of_tune() -> None:
    """Ray Tune copies ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN`` from the driver into
    every trial's runtime environment, which Ray writes into ``runtime_env_agent.log``. Drop every secret from the
    list it copies: a local Ray's trials inherit the driver's environment anyway, and on a cluster credentials come
    from the nodes (``docs/cluster.md``)."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = {v for v in class_cache.ENV_VARS_TO_PROPAGATE if not is_secret(v)}


def _ddp_loop(job: dict) -> None:
    """TorchTrainer worker: every rank trains on its own draws; LoRA gradients are averaged (gloo or NCCL)."""
    import torch.distributed as dist
    from ray import train

    config = TrainJobConfig(**{**job, "relations": tuple(job["relations"]), "fail_once": tuple(job["fail_once"])})
    relation = config.relations[0]
    rank, world = train.get_context().get_world_rank(), train.get_context().get_world_size()
    workdir = Path(tempfile.mkdtemp(prefix=f"ddp-{relation}-{rank}-"))

    def grad_sync(params) -> None:
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad /= world

    def report(step: int, parts: dict, ckpt: Path | None) -> None:
        train.report({"step": step, **parts})

    out = _train_relation(relation, config, workdir, report, grad_sync=grad_sync, rank=rank)
    if rank == 0:
        LoRARegistry(config.registry_root()).register(relation, out["lora_path"], card=out["card"])


def _init_ray(address: str | None) -> None:
    """Join ``address`` or start a local Ray (workers inherit the driver's storage and model settings)."""
    import ray

    if not ray.is_initialized():
        ray.init(**ray_init_args(address))


def _storage(uri: str):
    """(pyarrow filesystem, path) for Tune's storage, from any fsspec URL."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def run(config: TrainJobConfig) -> dict[str, Any]:
    """Fine-tune every relation of ``config``; returns ``{relation: {"status", "lora_uri", ...}}``."""
    if not config.relations:
        raise ValueError("relations must name at least one relation id")
    for relation in config.relations:  # fail fast: data present for every relation, before Ray starts
        rows, _ = read_triplets(config.data, relation=relation)
        if not rows:
            raise ValueError(f"no valid triplets for relation {relation!r} in {config.data!r}")
    import ray

    _init_ray(config.address)
    has_gpu = ray.cluster_resources().get("GPU", 0) > 0
    gpus = config.gpus_per_trial if config.gpus_per_trial is not None else (1.0 if has_gpu else 0.0)
    cpus = config.cpus_per_trial if config.cpus_per_trial is not None else (1.0 if gpus else 0.5)
    job = {**asdict(config), "relations": list(config.relations), "fail_once": list(config.fail_once)}
    fs, path = _storage(config.output)
    summary: dict[str, Any] = {}
    if config.workers_per_relation > 1:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        for relation in config.relations:
            trainer = TorchTrainer(
                _ddp_loop, train_loop_config={**job, "relations": [relation]},
                scaling_config=ScalingConfig(num_workers=config.workers_per_relation, use_gpu=gpus > 0,
                                             resources_per_worker={"CPU": cpus, **({"GPU": gpus} if gpus else {})}),
                run_config=RunConfig(name=f"{config.name}-{relation}", storage_path=path, storage_filesystem=fs),
            )
            result = trainer.fit()
            summary[relation] = {"status": "ok" if result.error is None else "error",
                                 "error": str(result.error) if result.error else None,
                                 "lora_uri": _registered(config, relation)}
        return summary

    from ray import tune

    keep_secrets_out_of_tune()
    trainable = tune.with_resources(tune_trial, {"cpu": cpus, "gpu": gpus})
    run_path = storage.join(path, config.name)
    param_space = {"relation": tune.grid_search(list(config.relations)), "job": job}
    if tune.Tuner.can_restore(run_path, storage_filesystem=fs):
        logger.info("resuming run %s", run_path)
        tuner = tune.Tuner.restore(run_path, trainable, resume_errored=True, param_space=param_space,
                                   storage_filesystem=fs)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            run_config=tune.RunConfig(name=config.name, storage_path=path, storage_filesystem=fs,
                                      failure_config=tune.FailureConfig(max_failures=config.max_failures),
                                      verbose=0),
        )
    results = tuner.fit()
    for result in results:
        relation = result.config["relation"]
        summary[relation] = {"status": "ok" if result.error is None else "error",
                             "error": str(result.error) if result.error else None,
                             "lora_uri": _registered(config, relation),
                             "final": {k: v for k, v in (result.metrics or {}).items()
                                       if k in ("loss", "denoise", "kml", "attention", "step", "resumed_from")}}
    storage.write_bytes_atomic(storage.join(config.output, config.name, "summary.json"),
                               json.dumps(summary, indent=2).encode())
    return summary


def _registered(config: TrainJobConfig, relation: str) -> str | None:
    registry = LoRARegistry(config.registry_root())
    return registry.uri(relation) if registry.has(relation) else None
