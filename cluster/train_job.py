"""Parallel relation-LoRA fine-tuning on Ray: one Tune trial per relation, or DDP for one relation on many GPUs.

Each trial loads the model, reads its relation's triplets, and runs :func:`dreamrelation.train.training.
train_relation_lora` in a scratch folder it removes when it ends. A run lives in ``{output}/{name}/`` (any fsspec
URL; stable names, no timestamps) next to Tune's own files::

    train.json                          the settings that fix what the run trains, and its status
    checkpoints/{relation}/step-N.pt    each relation's newest checkpoint (written by the trial itself)
    metrics.jsonl                       per-step losses: {"relation", "step", "loss", "denoise", "kml", "attention"}
    loss-{relation}.png                 each relation's loss curves, drawn at the end
    summary.json                        each relation's status, LoRA URI and final losses

A trial that fails is retried (``max_failures``) and a driver that crashed is resumed by rerunning the same command
(``Tuner.restore``); either way a trial resumes from the newest checkpoint on storage, whatever Tune recorded. A
rerun with other settings is refused (naming each difference); a rerun of a finished run trains nothing and reports
its LoRAs. A finished LoRA is registered in the LoRA registry that ``batch submit`` reads, under its relation id.
User paths are made absolute first: a trial runs in a folder of Ray's, not the shell's.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dreamrelation.model.preset_names import is_named, training_resolution
from manifests import storage
from manifests.errors import one_line
from manifests.registry import LoRARegistry
from manifests.run_record import RunMismatch, differences
from manifests.runtime import is_secret, ray_init_args
from manifests.schema import utc_now
from manifests.triplets import read_triplets

logger = logging.getLogger(__name__)

RUN_FILE = "train.json"
METRICS_FILE = "metrics.jsonl"
LOSS_PARTS = ("loss", "denoise", "kml", "attention")  # what train_relation_lora's callback reports per step
# where and how a run runs, not what it trains: free to change when an unfinished run is resumed
EXECUTION_FIELDS = ("output", "name", "gpus_per_trial", "cpus_per_trial", "max_failures", "address", "fail_once")
_CHECKPOINT = re.compile(r"step-(\d+)\.pt$")
TRAIN_KNOBS = ("learning_rate", "rank", "kml_weight", "kml_t_max", "attention_weight", "augment", "local_grid",
               "use_local_tokens")  # TrainJobConfig fields passed on to TrainConfig as they are


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
    resolution: int | None = None  # default: training_resolution(preset): 64 for tiny and toy, else 1024
    checkpoint_every: int = 100
    seed: int = 0
    name: str = "train-relations"  # a stable run name: the same name resumes
    gpus_per_trial: float | None = None  # default: 1 when the cluster has GPUs, else 0
    cpus_per_trial: float | None = None  # default: 1 with GPUs, else 0.5
    workers_per_relation: int = 1  # > 1: one TorchTrainer (DDP) per relation instead of a Tune trial
    max_failures: int = 2
    address: str | None = None
    fail_once: tuple[str, ...] = ()  # fault injection: these relations' trials raise once after a checkpoint
    # ablation knobs: TrainConfig fields of the same names (TRAIN_KNOBS; None: the profile's or TrainConfig's)
    learning_rate: float | None = None
    rank: int | None = None
    kml_weight: float | None = None
    kml_t_max: int | None = None
    attention_weight: float | None = None
    augment: bool | None = None
    local_grid: int | None = None
    use_local_tokens: bool = True
    local_encoder: str | None = None  # the distilled local image encoder (None: the preset's)

    def absolute(self) -> TrainJobConfig:
        """Every user path as an absolute URI: a Tune trial runs in a folder of Ray's, not the shell's."""
        preset = self.preset if is_named(self.preset) else storage.absolute(self.preset)
        return replace(self, data=storage.absolute(self.data).rstrip("/"),
                       output=storage.absolute(self.output).rstrip("/"), preset=preset,
                       loras=storage.absolute(self.loras).rstrip("/") if self.loras else None,
                       local_encoder=_local_or_hub(self.local_encoder))

    def registry_root(self) -> str:
        return self.loras or storage.join(self.output, "loras")

    def run_uri(self, *parts: str) -> str:
        """The run folder ``{output}/{name}`` (or a file in it)."""
        return storage.join(self.output, self.name, *parts)

    def metrics_uri(self) -> str:
        return self.run_uri(METRICS_FILE)

    def loss_curve_uri(self, relation: str) -> str:
        return self.run_uri(f"loss-{relation}.png")

    def checkpoints_uri(self, relation: str) -> str:
        return self.run_uri("checkpoints", relation)

    def settings(self) -> dict[str, Any]:
        """What the run trains, fixed by its first start: every option but :data:`EXECUTION_FIELDS`, the recipe as
        ``TrainConfig`` fills it in (an option left unset equals its default given), relations in any order."""
        recipe = self.train_config(self.relations[0] if self.relations else "_").to_dict()
        del recipe["relation"]
        out = {k: v for k, v in asdict(self).items() if k not in EXECUTION_FIELDS}
        return {**out, **recipe, "relations": sorted(self.relations), "loras": self.registry_root()}

    def execution(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k in EXECUTION_FIELDS and k != "fail_once"}

    def _resolution(self) -> int:
        return self.resolution or training_resolution(self.preset)

    def train_config(self, relation: str):
        from dreamrelation.model.config import TrainConfig

        return TrainConfig(relation=relation, steps=self.steps, batch_size=self.batch_size,
                           resolution=self._resolution(), profile=self.profile,
                           checkpoint_every=self.checkpoint_every, seed=self.seed,
                           **{k: getattr(self, k) for k in TRAIN_KNOBS if getattr(self, k) is not None})


def _local_or_hub(ref: str | None) -> str | None:
    """An existing local path made absolute; anything else (a URL, a hub ``owner/repo/file``) unchanged."""
    return storage.absolute(ref) if ref and storage.is_relative(ref) and Path(ref).exists() else ref


class TrainRun(BaseModel):
    """``{output}/{name}/train.json``: a run's settings (a rerun must match them), execution options and status."""

    model_config = ConfigDict(extra="forbid")

    format: int = 1
    name: str
    settings: dict[str, Any]
    execution: dict[str, Any] = Field(default_factory=dict)  # of the latest start (informative)
    status: Literal["running", "finished", "failed"] = "running"
    started_at: str = Field(default_factory=utc_now)
    updated_at: str = Field(default_factory=utc_now)


def read_run(config: TrainJobConfig) -> TrainRun | None:
    """The run's ``train.json`` (None: no run of this name yet); a ValueError naming the file if it is unreadable."""
    uri = config.run_uri(RUN_FILE)
    if not storage.exists(uri):
        return None
    try:
        return TrainRun.model_validate_json(storage.read_bytes(uri))
    except ValueError as exc:
        raise ValueError(f"{uri} is not a train.json of this version ({one_line(exc)}): pass another --name") from None


def _write_run(config: TrainJobConfig, run: TrainRun) -> None:
    run.updated_at = utc_now()
    storage.write_bytes_atomic(config.run_uri(RUN_FILE), run.model_dump_json(indent=2).encode())


def load_examples(data: str, relation: str) -> list:
    """The relation's triplets as training examples (images read through fsspec)."""
    from PIL import Image

    from dreamrelation.train.data import example_from_record

    rows, rejected = read_triplets(data, relation=relation)
    if rejected:
        logger.warning("%d triplets of %r rejected: %s", len(rejected), relation, rejected[0].reason)
    if not rows:
        raise ValueError(f"no valid triplets for relation {relation!r} in {data!r}")

    def load_image(uri: str):
        return Image.open(io.BytesIO(storage.read_bytes(uri))).convert("RGB")

    return [example_from_record(r.model_dump(), load_image) for r in rows]


def _job_config(job: dict) -> TrainJobConfig:
    """The config a trial gets as a plain dict (Tune's param space) back as a TrainJobConfig."""
    return TrainJobConfig(**{**job, "relations": tuple(job["relations"]), "fail_once": tuple(job["fail_once"])})


def _fault_marker(config: TrainJobConfig, relation: str) -> str:
    return storage.join(config.output, config.name, "_faults", relation)


# ------------------------------------------------------------------------------------------------- checkpoints

def _step_of(uri: str) -> int:
    match = _CHECKPOINT.search(uri)
    return int(match.group(1)) if match else -1


def newest_checkpoint(config: TrainJobConfig, relation: str) -> str | None:
    """The URI of ``relation``'s newest checkpoint in the run (None: none yet)."""
    found = [u for u in storage.list_files(config.checkpoints_uri(relation), ".pt") if _step_of(u) >= 0]
    return max(found, key=_step_of, default=None)


def _save_checkpoint(config: TrainJobConfig, relation: str, local: Path) -> None:
    """Copy a checkpoint the training loop just wrote to the run's storage, then drop the older ones there."""
    folder = config.checkpoints_uri(relation)
    storage.write_bytes_atomic(storage.join(folder, local.name), local.read_bytes())
    for old in storage.list_files(folder, ".pt"):
        if 0 <= _step_of(old) < _step_of(local.name):
            storage.remove(old)


def _restore_checkpoint(config: TrainJobConfig, relation: str, workdir: Path) -> int:
    """Put the run's newest checkpoint of ``relation`` into ``workdir/checkpoints``, where the training loop resumes
    from; returns its step (0: none). Storage, not Tune's record: a restored Tune run knows only the checkpoints of
    its last saved state, which can be ``checkpoint_every`` steps or more behind."""
    uri = newest_checkpoint(config, relation)
    if uri is None:
        return 0
    (workdir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (workdir / "checkpoints" / uri.rsplit("/", 1)[-1]).write_bytes(storage.read_bytes(uri))
    return _step_of(uri)


# ---------------------------------------------------------------------------------------------------- metrics

class MetricsLog:
    """The run's per-step losses, ``metrics.jsonl``: one JSON object per line (relation, step, each loss part).

    One writer per run: during :func:`run`, a small Ray actor that the trials send their steps to. Object stores
    cannot append, so the file is rewritten atomically, at most every ``every_s`` seconds and after every step that
    saved a checkpoint (so a resumed trial leaves no gap before its checkpoint). A rerun reads the file back; a step
    trained again after a resume replaces its line.
    """

    def __init__(self, uri: str, every_s: float = 2.0):
        self.uri, self.every_s = uri, every_s
        self.rows: dict[tuple[str, int], dict[str, Any]] = {}
        self.current: dict[str, int] = {}  # relation -> the step it reported last
        self.last: dict[str, Any] | None = None  # the newest row
        if storage.exists(uri):
            for line in storage.read_bytes(uri).decode().splitlines():
                try:
                    row = json.loads(line)
                    self.rows[(str(row["relation"]), int(row["step"]))] = row
                except (ValueError, KeyError, TypeError):
                    logger.warning("%s: skipped a line that is not a metrics row: %.80r", uri, line)
            for relation, step in sorted(self.rows):
                self.current[relation] = step
        self.written, self.dirty = time.monotonic(), False

    def add(self, row: dict[str, Any], checkpoint: bool = False) -> None:
        key = (str(row["relation"]), int(row["step"]))
        self.rows[key], self.current[key[0]], self.last, self.dirty = row, key[1], row, True
        if checkpoint:
            self.flush()

    def flush(self) -> None:
        if self.dirty:
            lines = "".join(json.dumps(self.rows[k]) + "\n" for k in sorted(self.rows))
            storage.write_bytes_atomic(self.uri, lines.encode())
        self.written, self.dirty = time.monotonic(), False

    def progress(self) -> tuple[dict[str, int], dict[str, Any] | None]:
        """({relation: its last step}, the newest row); writes the file if ``every_s`` passed since the last time."""
        if self.dirty and time.monotonic() - self.written >= self.every_s:
            self.flush()
        return dict(self.current), self.last

    def history(self, relation: str) -> list[dict[str, Any]]:
        return [self.rows[k] for k in sorted(self.rows) if k[0] == relation]


def _tag(*parts: object) -> str:
    import hashlib

    return hashlib.sha1("\0".join(map(str, parts)).encode()).hexdigest()[:12]


def _sink_name(config: TrainJobConfig) -> str:
    return f"dreamrelation-train-metrics-{config.name}-{_tag(config.run_uri())}"


def _metrics_sink(config: TrainJobConfig):
    """The run's :class:`MetricsLog` actor (None, with a warning, if the driver started none)."""
    import ray

    if not ray.is_initialized():  # a trial's function called outside Ray (tests)
        return None
    try:
        return ray.get_actor(_sink_name(config))
    except ValueError:
        logger.warning("no metrics log for run %s: its losses are not recorded in %s", config.run_uri(), METRICS_FILE)
        return None


def plot_losses(rows: list[dict[str, Any]], relation: str) -> bytes:
    """A PNG: each loss part of ``relation`` by step, one panel each (their scales differ by orders of magnitude);
    parts that are 0 at every step (their weight is 0 in this profile) are left out."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    parts = [k for k in LOSS_PARTS if any(k in r for r in rows)]
    parts += sorted({k for r in rows for k in r if k not in (*LOSS_PARTS, "relation", "step")})
    parts = [k for k in parts if k == "loss" or any(r.get(k) for r in rows)]
    fig = Figure(figsize=(3.2 * max(1, len(parts)), 3.0), dpi=100)
    FigureCanvasAgg(fig)
    for i, part in enumerate(parts):
        ax = fig.add_subplot(1, len(parts), i + 1)
        points = [(r["step"], r[part]) for r in rows if isinstance(r.get(part), (int, float))]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None)
        ax.set_title(part if part != "loss" else "loss (total)", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
    fig.suptitle(f"{relation}: training losses", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------------ trials

def _train_relation(relation: str, config: TrainJobConfig, workdir: Path, report, grad_sync=None,
                    rank: int = 0) -> dict:
    """One relation, in one process: load, resume from the run's newest checkpoint, train, return the card."""
    import ray
    import torch

    from dreamrelation.model.presets import load_pipeline
    from dreamrelation.train.training import train_relation_lora

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = load_pipeline(config.preset, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32,
                         local_encoder=config.local_encoder)
    examples = load_examples(config.data, relation)
    train_cfg = config.train_config(relation)
    if rank:  # DDP: each worker draws its own examples
        train_cfg = replace(train_cfg, seed=train_cfg.seed + 1000 * rank)
    _restore_checkpoint(config, relation, workdir)
    sink = _metrics_sink(config) if rank == 0 else None

    def callback(step: int, parts: dict) -> None:
        ckpt = workdir / "checkpoints" / f"step-{step:06d}.pt"
        saved = ckpt.is_file()
        if saved and rank == 0:
            _save_checkpoint(config, relation, ckpt)
        if sink is not None:  # a checkpoint's step waits until its line is written: a resume leaves no gap
            sent = sink.add.remote({"relation": relation, "step": step, **{k: float(v) for k, v in parts.items()}},
                                   checkpoint=saved)
            if saved:
                ray.get(sent)
        report(step, parts)
        if relation in config.fail_once and saved and not storage.exists(_fault_marker(config, relation)):
            storage.write_bytes_atomic(_fault_marker(config, relation), b"failed once on purpose\n")
            raise RuntimeError(f"injected failure of {relation!r} after step {step} (fail_once)")

    result = train_relation_lora(pipe, examples, train_cfg, workdir, callback=callback, base_model=config.preset,
                                 grad_sync=grad_sync, save=rank == 0)
    if sink is not None:
        ray.get(sink.flush.remote())  # every step's line delivered before this process may end
    return {"card": result.card, "lora_path": str(result.lora_path), "resumed_from": result.resumed_from}


def scratch_prefix(config: TrainJobConfig, relation: str, rank: int | None = None) -> str:
    """The name prefix of a trial's local scratch folders: one per run, relation and rank."""
    return f"dreamrelation-train-{relation}-{_tag(config.run_uri(), relation, rank)}-"


def _scratch(config: TrainJobConfig, relation: str, rank: int | None = None) -> Path:
    """A trial's local scratch folder (the training loop's files), removed when the trial ends. One trial per run
    and relation (and rank) runs at a time, so a folder of the same prefix is a killed attempt's: removed too."""
    prefix = scratch_prefix(config, relation, rank)
    for stale in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        logger.info("removing the scratch folder of a killed attempt: %s", stale)
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=prefix))


def tune_trial(params: dict) -> None:
    """The Tune trainable: one relation."""
    from ray import tune

    config = _job_config(params["job"])
    relation = params["relation"]
    workdir = _scratch(config, relation)
    try:
        out = _train_relation(relation, config, workdir, lambda step, parts: tune.report({"step": step, **parts}))
        uri = LoRARegistry(config.registry_root()).register(relation, out["lora_path"], card=out["card"])
        tune.report({**out["card"]["final_losses"], "step": config.steps, "done": 1, "lora_uri": uri,
                     "resumed_from": out["resumed_from"]})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


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

    config = _job_config(job)
    relation = config.relations[0]
    rank, world = train.get_context().get_world_rank(), train.get_context().get_world_size()
    workdir = _scratch(config, relation, rank)

    def grad_sync(params) -> None:
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad /= world

    try:
        out = _train_relation(relation, config, workdir, lambda step, parts: train.report({"step": step, **parts}),
                              grad_sync=grad_sync, rank=rank)
        if rank == 0:
            LoRARegistry(config.registry_root()).register(relation, out["lora_path"], card=out["card"])
        train.report({**out["card"]["final_losses"], "step": config.steps, "resumed_from": out["resumed_from"]})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


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


FINAL_KEYS = (*LOSS_PARTS, "step", "resumed_from")


def run(config: TrainJobConfig,
        progress: Callable[[int, int, dict[str, Any] | None], None] | None = None) -> dict[str, Any]:
    """Fine-tune every relation of ``config``; returns ``{relation: {"status", "error", "lora_uri", "loss_curve",
    "final"}}``, status ``ok``, ``error``, or ``done`` (a finished run of this name and settings: nothing trained).

    ``progress(done, total, row)``: steps done over all relations, of ``total``, and the newest metrics row; called
    from a thread while the trials train. A :class:`RunMismatch` (a ValueError) names every setting that differs
    from the run's first start; nothing starts then.
    """
    config = config.absolute()
    if not config.relations:
        raise ValueError("relations must name at least one relation id")
    if not config.name or config.name in (".", "..") or any(c in config.name for c in "/\\"):
        raise ValueError(f"name must be a run name without '/', got {config.name!r}")
    previous = read_run(config)
    if previous is not None:
        changed = differences(previous.settings, config.settings())
        if changed:
            raise RunMismatch(f"run {config.name!r} in {config.output} was started with other settings "
                              f"({'; '.join(changed)}): pass another --name to train these")
        if previous.status == "finished":
            return _finished(config)
    elif _has_tune_run(config):
        raise RunMismatch(f"run {config.name!r} in {config.output} has no {RUN_FILE} (a run of an older version): "
                          f"its settings are unknown; pass another --name")
    for relation in config.relations:  # fail fast: data present for every relation, before Ray starts
        rows, _ = read_triplets(config.data, relation=relation)
        if not rows:
            raise ValueError(f"no valid triplets for relation {relation!r} in {config.data!r}")
    import ray

    _init_ray(config.address)
    record = previous or TrainRun(name=config.name, settings=config.settings())
    record.status, record.execution = "running", config.execution()
    _write_run(config, record)
    has_gpu = ray.cluster_resources().get("GPU", 0) > 0
    gpus = config.gpus_per_trial if config.gpus_per_trial is not None else (1.0 if has_gpu else 0.0)
    cpus = config.cpus_per_trial if config.cpus_per_trial is not None else (1.0 if gpus else 0.5)
    try:
        sink = ray.remote(num_cpus=0)(MetricsLog).options(name=_sink_name(config)).remote(config.metrics_uri())
    except ValueError:
        raise RuntimeError(f"run {config.name!r} in {config.output} is being trained by another driver on this "
                           f"cluster") from None
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(sink, config, progress, stop), daemon=True)
    if progress is not None:
        watcher.start()
    try:
        fit = _fit_ddp if config.workers_per_relation > 1 else _fit_tune
        outcome = fit(config, gpus, cpus)
        histories = {r: ray.get(sink.history.remote(r)) for r in config.relations}
    finally:
        stop.set()
        if watcher.is_alive():
            watcher.join()
        try:
            ray.get(sink.flush.remote(), timeout=60)
        finally:
            ray.kill(sink)
    summary = {}
    for relation in config.relations:
        error, final = outcome.get(relation, ("no result (the trial did not run)", {}))
        curve = None
        if histories.get(relation):
            curve = config.loss_curve_uri(relation)
            storage.write_bytes_atomic(curve, plot_losses(histories[relation], relation))
        summary[relation] = _entry(config, relation, error, final, curve)
    storage.write_bytes_atomic(config.run_uri("summary.json"), json.dumps(summary, indent=2).encode())
    record.status = "finished" if all(s["status"] == "ok" for s in summary.values()) else "failed"
    _write_run(config, record)
    return summary


def _fit_tune(config: TrainJobConfig, gpus: float, cpus: float) -> dict[str, tuple[str | None, dict]]:
    """One Tune trial per relation (a new run, or the run of this name restored); ``{relation: (error, final)}``."""
    from ray import tune

    keep_secrets_out_of_tune()
    trainable = tune.with_resources(tune_trial, {"cpu": cpus, "gpu": gpus})
    fs, path = _storage(config.output)
    run_path = storage.join(path, config.name)
    job = {**asdict(config), "relations": list(config.relations), "fail_once": list(config.fail_once)}
    if tune.Tuner.can_restore(run_path, storage_filesystem=fs):
        logger.info("resuming run %s", run_path)  # its trials keep their configs: the settings matched train.json
        tuner = tune.Tuner.restore(run_path, trainable, resume_errored=True, storage_filesystem=fs)
    else:
        tuner = tune.Tuner(
            trainable, param_space={"relation": tune.grid_search(list(config.relations)), "job": job},
            run_config=tune.RunConfig(name=config.name, storage_path=path, storage_filesystem=fs,
                                      failure_config=tune.FailureConfig(max_failures=config.max_failures),
                                      verbose=0),
        )
    return {result.config["relation"]: (one_line(result.error) if result.error is not None else None,
                                        {k: v for k, v in (result.metrics or {}).items() if k in FINAL_KEYS})
            for result in tuner.fit()}


def _fit_ddp(config: TrainJobConfig, gpus: float, cpus: float) -> dict[str, tuple[str | None, dict]]:
    """One TorchTrainer (DDP on ``workers_per_relation`` workers) per relation, one after the other."""
    from ray.train import RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    fs, path = _storage(config.output)
    job = {**asdict(config), "fail_once": list(config.fail_once)}
    out = {}
    for relation in config.relations:
        trainer = TorchTrainer(
            _ddp_loop, train_loop_config={**job, "relations": [relation]},
            scaling_config=ScalingConfig(num_workers=config.workers_per_relation, use_gpu=gpus > 0,
                                         resources_per_worker={"CPU": cpus, **({"GPU": gpus} if gpus else {})}),
            run_config=RunConfig(name=f"{config.name}-{relation}", storage_path=path, storage_filesystem=fs),
        )
        try:
            result = trainer.fit()
        except TrainingFailedError as exc:  # Ray Train v2 raises where v1 returned result.error
            out[relation] = (one_line(exc), {})
            continue
        out[relation] = (one_line(result.error) if result.error is not None else None,
                         {k: v for k, v in (result.metrics or {}).items() if k in FINAL_KEYS})
    return out


def _watch(sink, config: TrainJobConfig, progress, stop: threading.Event) -> None:
    """Poll the metrics log for ``progress`` until ``stop`` (then once more)."""
    import ray

    total, seen = config.steps * len(config.relations), None
    while True:
        stopping = stop.wait(0.5)
        try:
            current, last = ray.get(sink.progress.remote(), timeout=30)
        except ray.exceptions.RayError as exc:  # the watcher never ends the run
            logger.debug("metrics log not reachable: %s", one_line(exc))
        else:
            state = (sorted(current.items()), last)
            if state != seen:
                seen = state
                progress(sum(min(current.get(r, 0), config.steps) for r in config.relations), total, last)
        if stopping:
            return


def _entry(config: TrainJobConfig, relation: str, error: str | None, final: dict, curve: str | None,
           status: str = "ok") -> dict[str, Any]:
    """A relation's line of the summary; "ok" only with its LoRA in the registry."""
    uri = _registered(config, relation)
    if error is None and uri is None:
        error = f"trained, but the registry {config.registry_root()} holds no LoRA for it"
    return {"status": status if error is None else "error", "error": error, "lora_uri": uri, "loss_curve": curve,
            "final": final}


def _finished(config: TrainJobConfig) -> dict[str, Any]:
    """The summary of a run that already finished (nothing is trained again)."""
    uri = config.run_uri("summary.json")
    before = json.loads(storage.read_bytes(uri)) if storage.exists(uri) else {}
    summary = {}
    for relation in config.relations:
        curve = config.loss_curve_uri(relation)
        final = (before.get(relation) or {}).get("final") or {}
        summary[relation] = _entry(config, relation, None, final, curve if storage.exists(curve) else None, "done")
        if summary[relation]["status"] == "error":
            summary[relation]["error"] = (f"the run finished, but the registry {config.registry_root()} no longer "
                                          f"holds its LoRA: pass another --name to train it again")
    return summary


def _has_tune_run(config: TrainJobConfig) -> bool:
    from ray import tune

    fs, path = _storage(config.output)
    return tune.Tuner.can_restore(storage.join(path, config.name), storage_filesystem=fs)


def _registered(config: TrainJobConfig, relation: str) -> str | None:
    registry = LoRARegistry(config.registry_root())
    return registry.uri(relation) if registry.has(relation) else None
