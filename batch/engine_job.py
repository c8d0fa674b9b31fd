"""The data engine on Ray Data: relation specs -> samples -> generation actors -> annotation actors -> triplets.

The driver reads the specs and expands them into samples (``manifests.relation_spec.expand_specs``, deterministic),
skips the samples that already have an outcome under ``{output}/outcomes/`` judged with the same gates and keypoint
settings (resume; one judged under other settings is judged again, on the images it has), and hands the rest, in
chunks, to two fixed actor pools chained by ``map_batches``: :class:`GenerateActor` (one generator each: the
pipeline or an images API client) writes the subject and target images, :class:`AnnotateActor` (one annotator set
each) writes the masks and the batch's outcomes. When the pools are done the driver gathers every outcome of the planned samples
and writes the dataset:

    {output}/triplets.parquet     the kept triplets (``manifests.triplets``; what ``train relations`` reads)
    {output}/dropped.parquet      the dropped samples with stage, reason code, detail and metrics
    {output}/engine.json          planned = made + dropped + skipped, drops by reason, timings, the gates and
                                  keypoint choices in force, keypoint layouts and relation LoRAs of the triplets

Every planned sample is accounted for: one the pools did not return is listed as ``missing`` in engine.json and
raises :class:`EngineJobError`. ``executor="local"`` runs the same stages in this process, without Ray (debugging,
small runs, tests).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from dreamrelation.engine.gates import calibration_note, resolve_keypoints
from dreamrelation.train.data import LAYOUTS_KEY
from manifests import storage
from manifests.engine_outcome import DROPPED_FILE, SUMMARY_FILE, EngineOutcome, read_outcomes, write_outcomes
from manifests.relation_spec import expand_specs, read_relation_specs
from manifests.runtime import ray_init_args
from manifests.triplets import TRIPLET_FILE, write_triplets

from .engine_worker import OUTCOMES_DIR, EngineConfig

logger = logging.getLogger(__name__)

EXECUTORS = ("ray", "local")
ERROR_REASONS = ("generation_error", "annotation_error")  # failures, not quality decisions: --retry-errors reruns them


@dataclass(frozen=True)
class EngineJobConfig:
    """``dreamrelation data generate`` options. ``engine.output`` is replaced by ``output``."""

    spec: str
    output: str = "outputs/engine"
    engine: EngineConfig | None = None  # None: EngineConfig(output)
    generate_actors: int = 1
    annotate_actors: int = 1
    batch_size: int = 4  # samples per actor call (and per outcome file)
    gpus_per_actor: float | None = None  # None: 0.5 when the cluster has GPUs (both pools share a GPU), else 0
    cpus_per_actor: float | None = None  # None: 0.5 without GPUs (Ray Data deadlocks if actors take every CPU)
    address: str | None = None  # None: a local Ray started in-process
    resume: bool = True
    retry_errors: bool = False  # resume reruns samples dropped for an error (generation_error, annotation_error)
    executor: str = "ray"

    def __post_init__(self) -> None:
        for name in ("generate_actors", "annotate_actors", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {list(EXECUTORS)}, got {self.executor!r}")

    def engine_config(self) -> EngineConfig:
        return replace(self.engine or EngineConfig(output=self.output), output=self.output)


class EngineJobError(RuntimeError):
    """A failure of the whole run: planned samples that got no outcome."""


class GenerateActor:
    """Ray actor: one :class:`~batch.engine_worker.GenerateStage` (generator loaded once) serving chunks."""

    def __init__(self, config: dict) -> None:
        from .engine_worker import GenerateStage

        self.stage = GenerateStage(EngineConfig.from_dict(config))

    def __call__(self, batch: dict) -> dict:
        records = [r for chunk, reuse in zip(batch["samples"], batch["reuse"])
                   for r in self.stage.process(json.loads(chunk), reuse=set(json.loads(reuse)))]
        return {"records": [json.dumps(records)]}


class AnnotateActor:
    """Ray actor: one :class:`~batch.engine_worker.AnnotateStage` (annotators loaded once) serving chunks."""

    def __init__(self, config: dict) -> None:
        from .engine_worker import AnnotateStage

        self.stage = AnnotateStage(EngineConfig.from_dict(config))

    def __call__(self, batch: dict) -> dict:
        outcomes = [o for chunk in batch["records"] for o in self.stage.process_and_write(json.loads(chunk))]
        return {"outcome": [o.model_dump_json() for o in outcomes]}


def run(config: EngineJobConfig, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Run the engine; returns the summary also written to ``{output}/engine.json``.

    ``progress(done, total)`` is called as outcomes arrive (total: the samples this run processes).
    """
    t_start = time.perf_counter()
    # user paths as absolute URIs: they cross into Ray, and engine.json names them for `data judge` from anywhere
    config = replace(config, spec=storage.absolute(config.spec), output=storage.absolute(config.output))
    out = config.output
    engine = config.engine_config()
    # 1. plan on the driver: a bad spec fails here, before Ray starts or a model loads (ids are unique: a relation
    #    appears once per spec file); the keypoint choices resolved once, for every actor
    samples = expand_specs(read_relation_specs(config.spec))
    ids = [s.sample_id for s in samples]
    keypoints, keypoint_notes = resolve_keypoints(engine.keypoints, engine.preset)
    engine = replace(engine, keypoints=keypoints)
    digest = engine.judging_digest()
    # 2. resume: samples that already have an outcome judged with these settings are done (errors too, unless
    #    retried); one judged under other gates or keypoint settings is judged again, keeping its images;
    #    --no-resume starts over
    outcomes_dir = storage.join(out, OUTCOMES_DIR)
    if not config.resume:
        _remove_outcomes(outcomes_dir)
    previous = _latest(read_outcomes(outcomes_dir), digest) if config.resume else {}
    planned = set(ids)
    rejudge = {i for i in ids if i in previous and previous[i].reason not in ERROR_REASONS
               and previous[i].judged_with != digest}
    todo = [s for s in samples if s.sample_id not in previous or s.sample_id in rejudge
            or (config.retry_errors and previous[s.sample_id].reason in ERROR_REASONS)]
    chunks = [todo[i:i + config.batch_size] for i in range(0, len(todo), config.batch_size)]
    # 3. generate + annotate
    t_run = time.perf_counter()
    fresh: list[EngineOutcome] = []
    if chunks:
        runner = _run_local if config.executor == "local" else _run_ray
        fresh = runner(config, engine, _items(chunks, rejudge), len(todo), progress)
    wall = time.perf_counter() - t_run
    # 4. gather: this run's outcomes win over older ones; every planned sample must have one
    done = {**{k: v for k, v in previous.items() if k in planned}, **{o.sample_id: o for o in fresh}}
    missing = [i for i in ids if i not in done]
    ordered = [done[i] for i in ids if i in done]
    made = [o for o in ordered if o.status == "made"]
    dropped = [o for o in ordered if o.status != "made"]
    rows = [o.triplet_row() for o in made]
    write_triplets(rows, storage.join(out, TRIPLET_FILE))
    write_outcomes(dropped, storage.join(out, DROPPED_FILE))
    summary = _summary(config, engine, ids, todo, fresh, made, dropped, missing, wall, rows)
    summary.update(rejudged=len(rejudge), judged_with=digest, keypoint_notes=keypoint_notes)
    summary["seconds_total"] = round(time.perf_counter() - t_start, 3)
    storage.write_bytes_atomic(storage.join(out, SUMMARY_FILE), json.dumps(summary, indent=2).encode())
    if missing:
        raise EngineJobError(f"{len(missing)} planned samples got no outcome (listed in "
                             f"{storage.join(out, SUMMARY_FILE)}): {missing[:5]}")
    return summary


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """What ``data generate`` tells the user about a run (from :func:`run`'s summary): counts, drops by reason,
    what resume skipped or judged again, keypoint fallbacks, which targets had a relation LoRA, where files are."""
    total = summary["total"]
    lines = [f"planned {summary['planned']}  made {summary['made']}  dropped {summary['dropped']}  "
             f"skipped {summary['skipped']}  ({total['made']} triplets in the dataset)"]
    lines += [f"  dropped {n}: {reason}" for reason, n in summary["dropped_by_reason"].items()]
    if summary.get("rejudged"):
        lines.append(f"judged again: {summary['rejudged']} samples decided under other gate or keypoint settings "
                     "(their images reused)")
    if summary["skipped"]:
        lines.append(f"skipped {summary['skipped']} samples already judged with these gates in "
                     f"{summary['output']} (resume; --no-resume starts over, --retry-errors reruns errors)")
    lines += list(summary.get("keypoint_notes") or [])
    if summary.get("keypoint_layouts"):
        lines.append("keypoints of the dataset's subjects: " + ", ".join(
            f"{n} {layout}" for layout, n in summary["keypoint_layouts"].items()))
    with_lora = summary.get("target_loras") or {}
    if with_lora:
        lines.append(f"targets made with a relation LoRA: {sum(with_lora.values())} ("
                     + ", ".join(sorted(with_lora)) + f"); without: {summary.get('targets_without_lora', 0)}")
    elif total["made"]:
        maker = "the images API" if summary.get("generator") == "api" else "the base adapter"
        lines.append(f"targets made by {maker} without a relation LoRA"
                     + ("" if summary.get("loras") or maker != "the base adapter" else " (no --loras registry)")
                     + ": the copy-paste gate checks them")
    lines.append(f"triplets: {summary['triplets']}")
    if total["dropped"]:
        lines.append(f"dropped samples and reasons: {summary['dropped_file']}")
    return lines


def _remove_outcomes(folder: str) -> None:
    """Start over: delete the outcome part files of earlier runs (images are overwritten as samples rerun)."""
    files = storage.list_files(folder, ".parquet")
    if files:
        logger.info("--no-resume: removing %d outcome files under %s", len(files), folder)
        fs, _ = storage.filesystem(folder)
        for uri in files:
            fs.rm(storage.filesystem(uri)[1])


def _latest(outcomes: list[EngineOutcome], digest: str | None = None) -> dict[str, EngineOutcome]:
    """Outcomes by sample id. A sample retried after an error, or judged again under other settings, has several:
    a verdict beats an error, and among verdicts (or errors) the one judged with ``digest`` (this run's settings)
    beats the others; ties keep the one read last."""
    out: dict[str, EngineOutcome] = {}
    rank = lambda o: (o.reason not in ERROR_REASONS, o.judged_with == digest)  # noqa: E731
    for o in outcomes:
        old = out.get(o.sample_id)
        if old is None or rank(o) >= rank(old):
            out[o.sample_id] = o
    return out


def _items(chunks: list[list], reuse: set[str] = frozenset()) -> list[dict[str, str]]:
    """One item per actor call: a JSON list of samples (nested rows travel as text, not as Arrow structs) and the
    ids among them judged again (their images are reused)."""
    return [{"samples": json.dumps([s.model_dump(mode="json") for s in chunk]),
             "reuse": json.dumps(sorted(s.sample_id for s in chunk if s.sample_id in reuse))} for chunk in chunks]


def _run_local(config: EngineJobConfig, engine: EngineConfig, items: list[dict[str, str]], total: int,
               progress: Callable[[int, int], None] | None) -> list[EngineOutcome]:
    """Both stages in this process, chunk by chunk (no Ray)."""
    from .engine_worker import AnnotateStage, GenerateStage

    generate, annotate = GenerateStage(engine), AnnotateStage(engine)
    outcomes: list[EngineOutcome] = []
    for item in items:
        records = generate.process(json.loads(item["samples"]), reuse=set(json.loads(item["reuse"])))
        outcomes.extend(annotate.process_and_write(records))
        if progress:
            progress(len(outcomes), total)
    return outcomes


def _run_ray(config: EngineJobConfig, engine: EngineConfig, items: list[dict[str, str]], total: int,
             progress: Callable[[int, int], None] | None) -> list[EngineOutcome]:
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init(**ray_init_args(config.address))
    has_gpu = ray.cluster_resources().get("GPU", 0) > 0
    gpus = config.gpus_per_actor if config.gpus_per_actor is not None else (0.5 if has_gpu else 0.0)
    cpus = config.cpus_per_actor if config.cpus_per_actor is not None else (1.0 if gpus else 0.5)
    if not gpus and engine.device == "auto":
        engine = replace(engine, device="cpu")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(GenerateActor, fn_constructor_kwargs={"config": engine.to_dict()},
                        compute=ray.data.ActorPoolStrategy(size=config.generate_actors), batch_size=1,
                        num_gpus=gpus if engine.generator == "pipeline" else 0.0, num_cpus=cpus)
    ds = ds.map_batches(AnnotateActor, fn_constructor_kwargs={"config": engine.to_dict()},
                        compute=ray.data.ActorPoolStrategy(size=config.annotate_actors), batch_size=1,
                        num_gpus=gpus, num_cpus=cpus)
    outcomes: list[EngineOutcome] = []
    for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
        outcomes.extend(EngineOutcome.model_validate_json(text) for text in batch["outcome"])
        if progress:
            progress(len(outcomes), total)
    return outcomes


def _summary(config: EngineJobConfig, engine: EngineConfig, ids: list[str], todo: list, fresh: list[EngineOutcome],
             made: list[EngineOutcome], dropped: list[EngineOutcome], missing: list[str],
             wall: float, rows: list) -> dict[str, Any]:
    """engine.json: this run's counts (planned = made + dropped + skipped + missing) and the dataset's totals
    (``rows``: the made triplets); the gates and keypoint choices in force."""
    run_made = [o for o in fresh if o.status == "made"]
    run_dropped = [o for o in fresh if o.status != "made"]
    seconds: dict[str, float] = {}
    for o in fresh:
        for k, v in o.metrics.items():
            if k.startswith("seconds_"):
                seconds[k.removeprefix("seconds_")] = seconds.get(k.removeprefix("seconds_"), 0.0) + float(v)
    by_reason = lambda rows: dict(sorted(Counter(o.reason for o in rows).items()))  # noqa: E731
    layouts = Counter(name for r in rows for name in r.metadata.get(LAYOUTS_KEY, "").split(",") if name)
    loras = Counter(r.metadata.get("target_lora") or "" for r in rows)
    return dict(
        spec=config.spec, output=config.output, planned=len(ids), made=len(run_made), dropped=len(run_dropped),
        skipped=len(ids) - len(todo), missing=missing,
        dropped_by_reason=by_reason(run_dropped),
        total=dict(made=len(made), dropped=len(dropped), dropped_by_reason=by_reason(dropped),
                   made_by_relation=dict(sorted(Counter(o.relation for o in made).items()))),
        drops=[{"sample_id": o.sample_id, "stage": o.stage, "reason": o.reason, "detail": o.detail}
               for o in run_dropped][:200],
        gates=asdict(engine.gates),
        gates_note=calibration_note(engine.preset, engine.gates),
        keypoints=asdict(engine.keypoints),
        keypoint_layouts=dict(sorted(layouts.items())),  # over the dataset's subjects
        target_loras=dict(sorted((k, v) for k, v in loras.items() if k)),  # "relation@fingerprint": targets
        targets_without_lora=loras.get("", 0),
        generator=engine.generator, loras=engine.loras,
        seconds_run=round(wall, 3),
        samples_per_second=round(len(fresh) / wall, 4) if wall > 0 and fresh else 0.0,
        seconds_per_stage={k: round(v, 3) for k, v in sorted(seconds.items())},
        triplets=storage.join(config.output, TRIPLET_FILE), dropped_file=storage.join(config.output, DROPPED_FILE),
        configuration={**{k: v for k, v in asdict(config).items() if k != "engine"}, "engine": engine.to_dict()},
    )
