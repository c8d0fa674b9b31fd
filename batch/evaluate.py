"""RelationBench evaluation: the cases, one ``batch submit`` per configuration, and the aggregation of Tables 2 / 3.

A configuration is a named switch of the generation stack (``--config`` of ``dreamrelation eval relationbench``):

- ``base``: the image-prompt adapter alone, without a relation LoRA (every row's ``relation`` set to None);
- ``lora``: the relation LoRAs of the ``--loras`` registry;
- ``no-local-tokens``: the same LoRAs, without local token injection (``WorkerConfig(use_local_tokens=False)``);
- ``NAME=URI``: the LoRAs at ``URI``, a registry root (e.g. LoRAs trained without KML by ``train relations``) or
  one LoRA folder / ``.safetensors`` file (its relation from its ``card.json``, else its folder / file name);
  ``NAME=URI:no-local-tokens`` turns local tokens off as well.

The cases are built once (``{out}/cases.parquet``) from the 25 templates and a folder of subject images, or read
from a cases manifest (``--cases``: e.g. the toy world's RelationBench-style cases, ``dreamrelation data toy-world
--kind relationbench``), and every configuration runs them through
:func:`batch.job.submit` into ``{out}/runs/{name}``, so a rerun resumes each configuration where it stopped. The
aggregation is plain Python over the result rows: per configuration and case kind (single | multi) the mean of each
metric over images, the number of images and a percentile bootstrap confidence interval (error rows excluded and
counted). Toy-world cases add the toy world's oracle (:mod:`batch.toy_oracle`) on each image: ``oracle_identity``
(every subject's shape, colour and pattern right) and ``oracle_relation`` (the asked relation holds), 100 or 0 per
image, so that their means are accuracies in percent with the same bootstrap intervals. :mod:`batch.eval_report`
renders the tables, plots and gallery.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from manifests import storage
from manifests.access import AccessPolicy
from manifests.io import read_table, table_to_rows, write_manifest
from manifests.registry import CARD_NAME, REGISTRY_FILE, WEIGHTS_NAME, LoRARegistry
from manifests.relationbench import (
    KINDS,
    build_cases,
    case_kind,
    read_cases,
    relation_sort_key,
    subjects_from_dir,
)
from manifests.run_record import RunFormatError, differences, read_run
from manifests.schema import GenerationRow, check_key

if TYPE_CHECKING:
    from .toy_oracle import Question

logger = logging.getLogger(__name__)

METRICS = ("clip_t", "clip_r", "clip_i", "dino")  # the columns of the paper's Tables 2 and 3, in order
ORACLE_METRICS = ("oracle_identity", "oracle_relation")  # toy-world cases only: the oracle per image, 100 or 0
ALL_METRICS = METRICS + ORACLE_METRICS
DEFAULT_SIZE = 1024  # the templates' image width and height unless --size
RELATIONBENCH = "RelationBench"
TOY_BENCHMARK = "toy-world cases (oracle-judged)"
BASE, LORA, NO_LOCAL_TOKENS = "base", "lora", "no-local-tokens"
SWITCHES = (BASE, LORA, NO_LOCAL_TOKENS)
CASES_FILE = "cases.parquet"


@dataclass(frozen=True)
class Configuration:
    """One column set of the tables: which relation LoRAs (a registry root, None for none) and local tokens."""

    name: str
    loras: str | None
    use_local_tokens: bool = True


def parse_configuration(spec: str, loras: str | None) -> Configuration:
    """``base`` | ``lora`` | ``no-local-tokens`` | ``NAME=URI`` | ``NAME=URI:no-local-tokens`` -> Configuration.

    ``loras`` is the registry that ``lora`` and ``no-local-tokens`` use (``--loras``)."""
    text = str(spec).strip()
    if "=" not in text:
        if text not in SWITCHES:
            raise ValueError(f"--config must be one of {list(SWITCHES)} or NAME=URI[:{NO_LOCAL_TOKENS}], got {spec!r}")
        if text == BASE:
            return Configuration(BASE, None)
        if not loras:
            raise ValueError(f"--config {text!r} needs a LoRA registry: pass --loras URI (--loras is {loras!r})")
        return Configuration(text, storage.absolute(loras), use_local_tokens=text != NO_LOCAL_TOKENS)
    name, uri = (part.strip() for part in text.split("=", 1))
    check_key(name, f"config name in {spec!r}")
    local = True
    if uri.endswith(f":{NO_LOCAL_TOKENS}"):
        uri, local = uri[: -len(NO_LOCAL_TOKENS) - 1], False
    if not uri:
        raise ValueError(f"--config {spec!r} must name a LoRA registry or folder after '=', got nothing")
    return Configuration(name, storage.absolute(uri), use_local_tokens=local)


def parse_configurations(specs: Sequence[str], loras: str | None) -> list[Configuration]:
    """Every ``--config``, in order; names must be unique."""
    if not specs:
        raise ValueError(f"--config must name at least one configuration (e.g. {BASE!r}, {LORA!r}), got {specs!r}")
    configs = [parse_configuration(s, loras) for s in specs]
    seen = Counter(c.name for c in configs)
    dups = sorted(n for n, k in seen.items() if k > 1)
    if dups:
        raise ValueError(f"--config must have distinct names, got {dups} more than once in {list(specs)!r}")
    return configs


@dataclass(frozen=True)
class EvalConfig:
    """``dreamrelation eval relationbench`` options: the cases come from exactly one of ``subjects_dir`` (the 25
    templates drawn over its subject images: ``n_single``, ``n_multi``, ``seed``) or ``cases`` (a cases manifest
    as is; ``n_single``, ``n_multi`` and ``seed`` unused). ``steps`` and ``num_images`` go to every case; ``width``
    and ``height`` too when given, else ``DEFAULT_SIZE`` for the templates and each case's own for ``cases``."""

    subjects_dir: str | None = None
    output: str = "outputs/relationbench"
    configs: tuple[str, ...] = (BASE, LORA)
    loras: str | None = None
    n_single: int = 100
    n_multi: int = 100
    seed: int = 0  # the case draw
    relations: tuple[str, ...] | None = None  # keep only these templates (cases: rows of these relations)
    preset: str = "tiny"
    local_encoder: str | None = None  # the distilled local image encoder (None: the preset's)
    local_grid: int | None = None  # local tokens per subject, n x n (None: the preset's); must match the LoRAs
    steps: int = 30
    width: int | None = None  # None: DEFAULT_SIZE for the templates, each case's own for --cases
    height: int | None = None
    num_images: int = 1
    allow_missing: bool = False  # rows whose relation has no LoRA run without one (recorded) instead of failing
    allow_external_loras: bool = False  # registry.json entries may name files outside their registry
    actors: int = 1
    batch_size: int = 4
    max_batch_images: int = 4
    gpus_per_actor: float | None = None
    cpus_per_actor: float | None = None
    device: str = "auto"
    address: str | None = None
    resume: bool = True
    resamples: int = 1000
    confidence: float = 0.95
    cases: str | None = None  # a cases manifest (path or URL) instead of subjects_dir

    def __post_init__(self) -> None:
        if (self.subjects_dir is None) == (self.cases is None):
            raise ValueError(f"give exactly one of SUBJECTS_DIR and --cases, got "
                             f"{'both' if self.cases else 'neither'} (SUBJECTS_DIR {self.subjects_dir!r}, "
                             f"--cases {self.cases!r})")
        for name in ("subjects_dir", "cases", "output", "loras", "local_encoder"):  # user paths mean the same in
            if getattr(self, name) is not None:  # every process and in every file written
                object.__setattr__(self, name, storage.absolute(getattr(self, name)))


@dataclass(frozen=True)
class PlannedRun:
    """One configuration's ``batch submit``: its rows (relations nulled where it has no LoRA) and where it goes."""

    configuration: Configuration
    rows: tuple[GenerationRow, ...]
    output: str
    without_lora: tuple[str, ...] = ()  # relations run without a LoRA (base: all; --allow-missing: the missing)
    registry_file: dict[str, str] | None = None  # registry.json to write for a single LoRA folder


# ---------------------------------------------------------------------------------------------------- planning

def _single_lora(uri: str) -> str | None:
    """The weights file when ``uri`` is one LoRA (a ``.safetensors`` file or a folder holding one), else None."""
    if uri.endswith(".safetensors"):
        return uri if storage.exists(uri) else None
    weights = storage.join(uri, WEIGHTS_NAME)
    return weights if storage.exists(weights) else None


def _single_lora_relation(uri: str, weights: str) -> str:
    """A single LoRA's relation id: ``card.json``'s ``relation``, else its folder name (or file stem)."""
    folder = uri if not uri.endswith(".safetensors") else storage.parent(uri)
    card_uri = storage.join(folder, CARD_NAME)
    if storage.exists(card_uri):
        relation = json.loads(storage.read_bytes(card_uri)).get("relation")
        if relation:
            return check_key(relation, f"{card_uri}: relation")
    name = weights.rstrip("/").rsplit("/", 1)[-1].removesuffix(".safetensors")
    if name == WEIGHTS_NAME.removesuffix(".safetensors"):
        name = folder.rstrip("/").rsplit("/", 1)[-1]
    return check_key(name, f"relation id of the LoRA at {uri!r}")


def plan(config: EvalConfig) -> tuple[list[GenerationRow], list[PlannedRun]]:
    """The cases and one run per configuration; raises ``ValueError`` before anything runs when a configuration
    lacks a relation LoRA the cases need (unless ``allow_missing``)."""
    configs = parse_configurations(config.configs, config.loras)
    cases = build(config)
    needed = Counter(r.relation for r in cases)
    runs = []
    for conf in configs:
        out = storage.join(config.output, "runs", conf.name)
        if conf.loras is None:
            rows = [r.model_copy(update={"relation": None}) for r in cases]
            runs.append(PlannedRun(conf, tuple(rows), out, tuple(sorted(needed))))
            continue
        registry_file = None
        weights = _single_lora(conf.loras)
        if weights is not None:
            relation = _single_lora_relation(conf.loras, weights)
            registry_file = {relation: storage.absolute(weights)}
            root = storage.join(config.output, "loras", conf.name)
            conf = replace(conf, loras=root)
            has = lambda r, known=frozenset(registry_file): r in known  # noqa: E731
            where = f"{weights} (one LoRA, relation {relation!r})"
            why = lambda r: f"it is not a LoRA of {r!r}"  # noqa: E731
        else:
            registry = LoRARegistry(conf.loras, access=AccessPolicy(allow_external_loras=config.allow_external_loras))
            has, where, why = registry.has, f"the LoRA registry at {conf.loras!r}", registry.problem
        missing = sorted(r for r in needed if not has(r))
        if missing and not config.allow_missing:
            reasons = "; ".join(why(r) for r in missing[:3]) + ("; ..." if len(missing) > 3 else "")
            raise ValueError(
                f"config {conf.name!r}: {where} has no usable LoRA for relation(s) {missing} "
                f"({sum(needed[r] for r in missing)} of {len(cases)} cases): {reasons}. Train them "
                "(`dreamrelation train relations`), keep only covered cases with --relations, or pass "
                "--allow-missing to run those rows without a LoRA")
        rows = [r.model_copy(update={"relation": None}) if r.relation in missing else r for r in cases]
        runs.append(PlannedRun(conf, tuple(rows), out, tuple(missing), registry_file))
    return cases, runs


def build(config: EvalConfig) -> list[GenerationRow]:
    """The cases: the templates over ``config.subjects_dir``'s images, or the rows of ``config.cases``."""
    if config.cases is not None:
        return read_cases(config.cases, relations=config.relations, steps=config.steps,
                          num_images=config.num_images, width=config.width, height=config.height)
    subjects = subjects_from_dir(config.subjects_dir)
    if not subjects:
        raise ValueError(f"SUBJECTS_DIR {config.subjects_dir!r} holds no subject images (.png, .jpg, .jpeg, .webp)")
    cases = build_cases(subjects, n_single=config.n_single, n_multi=config.n_multi, seed=config.seed,
                        width=config.width or DEFAULT_SIZE, height=config.height or DEFAULT_SIZE,
                        steps=config.steps, num_images=config.num_images, relations=config.relations)
    if not cases:
        raise ValueError("--n-single and --n-multi are both 0: no case to evaluate")
    return cases


def benchmark(cases: Sequence[GenerationRow]) -> str:
    """What the cases are, for the reports' titles: ``TOY_BENCHMARK`` when every case is a toy-world row the oracle
    judges, ``RELATIONBENCH`` otherwise (with the number of oracle-judged cases when some are)."""
    from .toy_oracle import toy_question

    toy = sum(toy_question(c) is not None for c in cases)
    if cases and toy == len(cases):
        return TOY_BENCHMARK
    return f"{RELATIONBENCH} + toy-world ({toy} of {len(cases)} cases oracle-judged)" if toy else RELATIONBENCH


# ----------------------------------------------------------------------------------------------------- running

def _prepare_output(config: EvalConfig, cases: list[GenerationRow], runs: list[PlannedRun]) -> dict[str, str]:
    """Write the cases (once), each run's manifest and single-LoRA registry file; returns {config: manifest URI}.

    A resumed output must hold the same cases and the same configuration settings, or results would mix."""
    cases_uri = storage.join(config.output, CASES_FILE)
    have_cases = storage.exists(cases_uri)
    if have_cases and table_to_rows(read_table(cases_uri)) != cases:
        raise ValueError(f"--output {config.output!r} already holds different cases ({cases_uri}: other seed, "
                         "counts, subjects, --cases file, relations, size or steps); use a new --output")
    # base, or --allow-missing: the cases with some relations nulled, in a manifest of their own
    manifests = {r.configuration.name: cases_uri if list(r.rows) == cases
                 else storage.join(config.output, "manifests", f"{r.configuration.name}.parquet") for r in runs}
    for run in runs:  # every check before the first write
        _check_previous_run(run, config, manifests[run.configuration.name])
    from dreamrelation.model.local_encoder_ref import check_local_tokens

    for run in runs:  # local tokens on a real preset need its distilled local encoder (--local-encoder)
        check_local_tokens(config.preset, config.local_encoder, run.configuration.use_local_tokens)
    if not have_cases:
        write_manifest(cases, cases_uri)
    for run in runs:
        conf = run.configuration
        if run.registry_file is not None:
            storage.write_bytes_atomic(storage.join(conf.loras, REGISTRY_FILE),
                                       json.dumps({"relations": run.registry_file}, indent=2).encode())
        if manifests[conf.name] != cases_uri:
            write_manifest(run.rows, manifests[conf.name])
    return manifests


def _check_previous_run(run: PlannedRun, config: EvalConfig, manifest: str) -> None:
    """A resumed configuration must have run with the settings it would run with now (``batch.job``'s rule)."""
    if not config.resume:
        return
    try:
        previous = read_run(run.output)
    except RunFormatError as e:
        raise ValueError(f"config {run.configuration.name!r}: {e}") from None
    if previous is None:
        return
    changed = differences(previous.settings, job_config(config, run, manifest).absolute().settings())
    if changed:
        raise ValueError(f"config {run.configuration.name!r}: {run.output} was run with other settings "
                         f"({'; '.join(changed)}); use a new --output or another config name")


def job_config(config: EvalConfig, run: PlannedRun, manifest: str):
    """The ``batch submit`` of one configuration: its manifest, LoRAs, local-token switch and output."""
    from .job import JobConfig
    from .worker import WorkerConfig

    conf = run.configuration
    worker = WorkerConfig(output=run.output, preset=config.preset, loras=conf.loras, device=config.device,
                          max_batch_images=config.max_batch_images, use_local_tokens=conf.use_local_tokens,
                          local_encoder=config.local_encoder, local_grid=config.local_grid,
                          # a single LoRA folder runs through a registry.json the evaluation writes itself
                          access=AccessPolicy(allow_external_loras=config.allow_external_loras
                                              or run.registry_file is not None))
    return JobConfig(manifest=manifest, output=run.output, worker=worker, preset=config.preset, loras=conf.loras,
                     actors=config.actors, gpus_per_actor=config.gpus_per_actor, cpus_per_actor=config.cpus_per_actor,
                     batch_size=config.batch_size, address=config.address, resume=config.resume,
                     new_attempt=True)  # a rerun may use other actors or batch sizes: finished rows stay valid


def run_evaluation(config: EvalConfig,
                   progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Plan, run every configuration through ``batch.job.submit``, aggregate and write the reports.

    ``progress(config_name, rows_done, rows_total)``. Returns the summary also written to ``{output}/eval.json``."""
    from .job import submit

    t0 = time.perf_counter()
    cases, runs = plan(config)
    manifests = _prepare_output(config, cases, runs)
    submitted: dict[str, dict] = {}
    for run in runs:
        conf = run.configuration
        job = job_config(config, run, manifests[conf.name])
        logger.info("config %r: %d cases -> %s", conf.name, len(run.rows), run.output)
        callback = (lambda done, total, name=conf.name: progress(name, done, total)) if progress else None
        summary = submit(job, progress=callback)
        submitted[conf.name] = {"attempt": summary["attempt"]["attempt_id"], **summary["attempt"]["counts"],
                                "seconds": summary["attempt"]["seconds"], "run_rows": summary["run"]["rows"]}
    without = {r.configuration.name: list(r.without_lora) for r in runs if r.configuration.loras is not None
               and r.without_lora}
    report = aggregate(config.output, [r.configuration.name for r in runs], cases, preset=config.preset,
                       without_lora=without, resamples=config.resamples, confidence=config.confidence)
    summary = {
        "output": config.output, "benchmark": report["benchmark"], "cases": len(cases),
        "kinds": dict(Counter(case_kind(r) for r in cases)),
        "configs": [{"name": r.configuration.name, "loras": r.configuration.loras,
                     "use_local_tokens": r.configuration.use_local_tokens,
                     "manifest": manifests[r.configuration.name], "output": r.output,
                     "run": submitted[r.configuration.name]} for r in runs],
        "without_lora": without, "rows": report["rows"], "table": report["table"],
        "per_relation": report["per_relation"], "files": report["files"], "settings": asdict(config),
        "seconds_total": round(time.perf_counter() - t0, 3),
    }
    storage.write_bytes_atomic(storage.join(config.output, "eval.json"), json.dumps(summary, indent=2).encode())
    return summary


# ------------------------------------------------------------------------------------------------- aggregation

def aggregate(output: str, configs: Sequence[str], cases: Sequence[GenerationRow], *, preset: str,
              without_lora: dict[str, list[str]] | None = None, resamples: int = 1000,
              confidence: float = 0.95) -> dict[str, Any]:
    """Read the results of each configuration's run (``{output}/runs/{name}``), compute the table cells and the
    per-relation cells (the oracle's too on toy-world cases), and write the reports
    (:func:`batch.eval_report.write_reports`).

    Returns ``{benchmark, rows: row_counts, table: cells, per_relation: cells, files: {name: URI}}``."""
    from . import eval_report
    from .report import load_run

    results = {name: load_run(storage.join(output, "runs", name))[1] for name in configs}
    records = image_records(cases, results)
    counts = row_counts(cases, results)
    cells = summarize(records, ("config", "kind"), resamples=resamples, confidence=confidence)
    per_relation = summarize(records, ("config", "kind", "relation"), resamples=resamples, confidence=confidence)
    title = benchmark(cases)
    files = eval_report.write_reports(output, configs=list(configs), cases=cases, results=results, cells=cells,
                                      per_relation=per_relation, counts=counts, preset=preset,
                                      without_lora=without_lora, records=records, benchmark=title)
    return {"benchmark": title, "rows": counts, "table": cells, "per_relation": per_relation, "files": files}


def image_records(cases: Sequence[GenerationRow], results: dict[str, Iterable[dict]]) -> list[dict[str, Any]]:
    """One record per scored image: ``config, row_id, kind, relation, k, image`` and each metric (None when that
    metric is absent). Only ``ok`` rows of known cases count; relation and kind come from the case, not the run.

    A toy-world case (:func:`batch.toy_oracle.toy_question`) also gets the oracle's verdict on each image, read
    from the image URI of its result: ``oracle_identity`` 100 when every subject's shape, colour and pattern is
    right, else 0; ``oracle_relation`` 100 when the relation holds, else 0 (None for other cases, and for an image
    the oracle cannot read: logged)."""
    from .toy_oracle import toy_question

    by_id = {r.row_id: r for r in cases}
    questions = {r.row_id: toy_question(r) for r in cases}
    records = []
    for name, rows in results.items():
        for res in sorted(rows, key=lambda r: r["row_id"]):
            case = by_id.get(res["row_id"])
            if case is None or res["status"] != "ok":
                continue
            for k, image in enumerate(res.get("images") or []):
                rec = {"config": name, "row_id": case.row_id, "kind": case_kind(case), "relation": case.relation,
                       "k": k, "image": image}
                for m in METRICS:
                    values = res.get(m) or []
                    rec[m] = float(values[k]) if k < len(values) and values[k] is not None else None
                if questions[case.row_id] is not None:
                    rec.update(_oracle_metrics(image, questions[case.row_id]))
                records.append(rec)
    return records


def _oracle_metrics(image: str, question: Question) -> dict[str, float | None]:
    """``{oracle_identity, oracle_relation}`` of the image at ``image`` (100.0 or 0.0; None when unreadable)."""
    from .toy_oracle import judge_uri

    try:
        verdict = judge_uri(image, question)
    except (OSError, ValueError) as exc:  # a missing file, not an image, or not a toy-world size
        logger.warning("the oracle cannot judge %s: %s", image, exc)
        return dict.fromkeys(ORACLE_METRICS)
    return {"oracle_identity": 100.0 * all(verdict.identity), "oracle_relation": 100.0 * verdict.relation}


def row_counts(cases: Sequence[GenerationRow], results: dict[str, Iterable[dict]]) -> dict[str, dict[str, dict]]:
    """``{config: {kind: {cases, ok, error, missing}}}``: error rows are excluded from the means and counted here;
    ``missing`` are cases without a result (rejected or not run)."""
    kinds = {r.row_id: case_kind(r) for r in cases}
    out: dict[str, dict[str, dict]] = {}
    for name, rows in results.items():
        status = {r["row_id"]: r["status"] for r in rows if r["row_id"] in kinds}
        per = {kind: {"cases": 0, "ok": 0, "error": 0, "missing": 0} for kind in KINDS if kind in kinds.values()}
        for row_id, kind in kinds.items():
            per[kind]["cases"] += 1
            per[kind][{"ok": "ok", "error": "error"}.get(status.get(row_id, ""), "missing")] += 1
        out[name] = per
    return out


def mean(values: Sequence[float]) -> float:
    """The exactly rounded mean (``math.fsum``): independent of the order the values come in."""
    if not len(values):
        raise ValueError("values must not be empty (no mean of nothing)")
    return math.fsum(values) / len(values)


def bootstrap_ci(values: Sequence[float], resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean: ``resamples`` draws of ``len(values)`` values with
    replacement (numpy ``default_rng(seed)``, so the same values give the same interval)."""
    x = np.asarray(values, dtype=np.float64)  # (n,)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence, got shape {x.shape}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    step = max(1, 4_000_000 // x.size)  # rows of the (resamples, n) index matrix held at once
    for start in range(0, resamples, step):
        stop = min(resamples, start + step)
        means[start:stop] = x[rng.integers(0, x.size, size=(stop - start, x.size))].mean(axis=1)  # (s, n) -> (s,)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def _sort_key(field: str, value: Any, order: dict[str, int]) -> tuple:
    if field == "kind":
        return (KINDS.index(value),)
    if field == "relation":
        return relation_sort_key(value)
    return (order.get(value, len(order)), str(value))


def summarize(records: Sequence[dict[str, Any]], by: Sequence[str], resamples: int = 1000,
              confidence: float = 0.95, seed: int = 0, digits: int = 4) -> list[dict[str, Any]]:
    """Cells ``{*by, metric, mean, ci_low, ci_high, n}`` grouped by the ``by`` fields (e.g. ``("config", "kind")``),
    one per metric that has values (``ALL_METRICS``: the paper's four, then the oracle's); numbers rounded to
    ``digits`` decimals. Configurations keep the order they first appear in; kinds go single, multi; relations by
    ``relation_sort_key`` (RelationBench's by their Table 10 number, then the toy world's, then others)."""
    groups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    order: dict[str, int] = {}
    for rec in records:
        order.setdefault(rec["config"], len(order))
        key = tuple(rec[f] for f in by)
        for m in ALL_METRICS:
            if rec.get(m) is not None:
                groups[key][m].append(float(rec[m]))
    cells = []
    for key in sorted(groups, key=lambda k: tuple(x for f, v in zip(by, k) for x in _sort_key(f, v, order))):
        for m in ALL_METRICS:
            values = groups[key].get(m)
            if not values:
                continue
            low, high = bootstrap_ci(values, resamples, confidence, seed)
            cells.append({**dict(zip(by, key)), "metric": m, "mean": round(mean(values), digits),
                          "ci_low": round(low, digits), "ci_high": round(high, digits), "n": len(values)})
    return cells
