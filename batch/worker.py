"""The plain core of a generation actor: manifest rows in, images written, result rows out. No Ray here.

A :class:`Worker` holds the pipeline, a relation-LoRA cache, a subject-encoding cache and the metric models. For a
list of rows it groups those that can denoise together (same relation, subject count, steps, size, guidance),
generates, scores, writes every image atomically to ``{output}/images/{row_id}/{k}.png``, and returns one
:class:`~manifests.schema.ResultRow` per row. A failing row becomes a result with ``status="error"`` and the
reason; its batch-mates go on. A failure of the whole process (model load, storage auth) raises.

Quality gate (``WorkerConfig.gate``, a :class:`~manifests.schema.GateSpec`): after each pass, every image under a
minimum score is made again with the next seed of its row's schedule (``GenerationRow.image_seed(k, attempt)``),
batched across the group's rows like the first pass (per-row generators keep an image independent of its
batch-mates), until it passes or ``max_attempts`` images were made for it. A rejected attempt is kept at
``images/{row_id}/attempts/{k}-{a}.png``; ``{k}.png`` is the first passing attempt, else the last one. Every attempt
is recorded in ``ResultRow.attempts``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from manifests import storage
from manifests.access import AccessPolicy
from manifests.io import image_key, read_table, write_results
from manifests.ledger import part_uri
from manifests.registry import LoRARegistry
from manifests.run_record import RunMismatch, differences
from manifests.schema import (
    GATE_METRICS,
    GateAttempt,
    GateSpec,
    GenerationRow,
    ResultRow,
    gate_option,
    utc_now,
)
from manifests.validation import DEFAULT_MAX_IMAGE_PIXELS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    """Everything an actor needs to build its worker (plain data: it travels to Ray actors)."""

    output: str
    preset: str = "tiny"
    loras: str | None = None
    device: str = "auto"  # "auto": cuda when available, else cpu
    dtype: str = "auto"  # "auto": bfloat16 on cuda, float32 on cpu
    max_batch_images: int = 4  # images denoised together in one pipeline call
    lora_cache_size: int = 8
    subject_cache_size: int = 256
    metrics: bool = True
    use_local_tokens: bool = True
    local_encoder: str | None = None  # a distilled local image encoder checkpoint (None: the preset's, if any)
    local_grid: int | None = None  # local tokens per subject: n x n (None: the preset's, 4); LoRAs must match it
    compile_unet: bool = False
    gate: GateSpec | dict[str, Any] | None = None  # quality gate; stored as GateSpec.model_dump() (JSON, picklable)
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # subject images larger than this are refused, not decoded
    access: AccessPolicy | dict[str, Any] = field(default_factory=AccessPolicy)  # what rows may make it fetch
    row_timeout: float | None = None  # seconds a row may take (per image batch it is part of); None: no limit
    max_row_kills: int = 2  # a row that killed its actor this many times becomes an error row ("poison row")
    crash_on_rows: tuple[str, ...] = ()  # fault injection for tests: the process exits when it starts these rows
    attempt_id: str = ""  # the run attempt the results belong to ("" outside a run: results/part-*.parquet)
    # the fingerprints of the weights the run started with: an actor whose weights differ refuses to start
    expect_fingerprints: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.access, dict):  # a config that travelled as plain data
            object.__setattr__(self, "access", AccessPolicy(**self.access))
        if self.local_grid is not None and not (isinstance(self.local_grid, int) and 1 <= self.local_grid <= 16):
            raise ValueError(f"--local-grid must be an integer from 1 to 16, got {self.local_grid!r}")
        if self.row_timeout is not None and not self.row_timeout > 0:
            raise ValueError(f"--row-timeout must be a positive number of seconds, got {self.row_timeout!r}")
        if self.gate is None:
            return
        spec = self.gate if isinstance(self.gate, GateSpec) else GateSpec.model_validate(self.gate)
        if not self.metrics:
            options = " ".join(f"{gate_option(m)} {v:g}" for m, v in spec.thresholds.items())
            raise ValueError(f"a quality gate ({options}) needs metrics, but metrics are off (--no-metrics, "
                             f"WorkerConfig.metrics=False)")
        object.__setattr__(self, "gate", spec.model_dump())

    def gate_spec(self) -> GateSpec | None:
        return GateSpec.model_validate(self.gate) if self.gate is not None else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Item:
    """One image to make: image index k of its row, gate attempt (0-based), its seed."""

    k: int
    attempt: int
    seed: int


@dataclass
class _Final:
    """The image kept for slot k: where it was written, its scores (None without metrics), its gate verdict."""

    key: str  # relative to the output root (manifests.io.image_key)
    scores: dict | None
    attempt: int
    passed: bool
    seed: int


@dataclass
class _RowState:
    row: GenerationRow
    relation_phrase: str
    subject_images: list = field(default_factory=list)
    subject_tokens: Any = None
    subject_hits: int = 0
    fresh: list = field(default_factory=list)  # (_Item, PIL) pairs made in the current pass
    final: dict = field(default_factory=dict)  # k -> _Final
    attempts: list = field(default_factory=list)  # GateAttempt records (gate only)
    error: str | None = None
    seconds: dict = field(default_factory=lambda: defaultdict(float))
    lora_hit: bool | None = None
    lora: tuple[str, str] | None = None  # (uri, sha256) of the relation LoRA file loaded for the row


class Worker:
    """Build once per process (it loads the models); call :meth:`process` on lists of rows."""

    def __init__(self, config: WorkerConfig, pipe=None, scorer=None):
        """``pipe`` / ``scorer``: already built models to use instead of loading ``config.preset`` (benchmarks)."""
        import torch

        from dreamrelation.model.presets import load_pipeline

        from .cache import LoRACache, SubjectEncodingCache

        self.config = config
        self.gate = config.gate_spec()  # WorkerConfig checked it (and that metrics are on)
        device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = (getattr(torch, config.dtype) if config.dtype != "auto"
                 else torch.bfloat16 if device.startswith("cuda") else torch.float32)
        self.device = device
        self.fingerprints = self._fingerprints(pipe is not None)
        self.pipe = pipe if pipe is not None else load_pipeline(config.preset, device=device, dtype=dtype,
                                                                local_encoder=config.local_encoder)
        self.pipe.set_progress_bar_config(disable=True)
        if config.local_grid is not None:
            self.pipe.adapter.encoder.set_local_grid(config.local_grid)
        self._grid_problems: dict[str, str | None] = {}
        if config.compile_unet:
            self.pipe.unet = torch.compile(self.pipe.unet)
        self.registry = LoRARegistry(config.loras, config.access)
        self.loras = LoRACache(self.pipe, self.registry, capacity=config.lora_cache_size)
        self.subjects = SubjectEncodingCache.for_pipeline(self.pipe, capacity=config.subject_cache_size,
                                                          use_local_tokens=config.use_local_tokens)
        self.scorer = scorer
        if config.metrics and scorer is None:
            from dreamrelation.metrics import get_metric_models, metric_model_refs

            self.scorer = get_metric_models(*metric_model_refs(config.preset), device=device)

    def _grid_problem(self, relation: str) -> str | None:
        """Why rows of ``relation`` cannot run here: its LoRA was trained with another local grid than this run's
        (its card's ``config.local_grid``; paper Table 6), with local tokens on. None when they match or the LoRA
        has no card; read once per relation."""
        if relation not in self._grid_problems:
            problem = None
            try:
                card = self.registry.card(relation) or {}
            except Exception:  # noqa: BLE001 - an unreadable card: the LoRA itself is still checked on load
                card = {}
            config = card.get("config") if isinstance(card.get("config"), dict) else {}
            trained = config.get("local_grid")
            grid = self.pipe.adapter.encoder.config.local_grid
            if self.config.use_local_tokens and config.get("use_local_tokens", True) and trained not in (None, grid):
                problem = (f"relation {relation!r}: its LoRA was trained with --local-grid {trained}, this run "
                           f"generates with {grid} local tokens per side: pass --local-grid {trained}")
            self._grid_problems[relation] = problem
        return self._grid_problems[relation]

    def _fingerprints(self, given_pipe: bool) -> dict[str, str | None]:
        """The weights' fingerprints (provenance of every result row); checked against the run's, if it has any."""
        from dreamrelation.provenance import model_fingerprints

        try:
            found = model_fingerprints(self.config.preset, self.config.local_encoder, metrics=self.config.metrics)
        except (OSError, ValueError) as exc:
            if not given_pipe:
                raise
            logger.warning("no fingerprints for preset %r (%s): results carry none", self.config.preset, exc)
            return {}
        expected = self.config.expect_fingerprints
        if expected:
            changed = differences({k: v for k, v in expected.items() if k in found},
                                  {k: v for k, v in found.items() if k in expected})
            if changed:
                raise RunMismatch(f"the weights of preset {self.config.preset!r} changed since the run started "
                                  f"({'; '.join(changed)}); restore them or use a new --output")
        return found

    # ---- public ---------------------------------------------------------------------------------------------
    def process(self, records: list[dict[str, Any]]) -> list[ResultRow]:
        """Rows (dicts in the manifest schema) -> one ResultRow each, in the input order."""
        states: list[_RowState | ResultRow] = []
        for rec in records:
            try:
                row = rec if isinstance(rec, GenerationRow) else GenerationRow.model_validate(rec)
            except Exception as exc:  # the driver validated already; this guards direct callers
                states.append(_error_result(str(rec.get("row_id", "?")), f"invalid row: {exc}", rec.get("relation"),
                                            attempt_id=self.config.attempt_id))
                continue
            states.append(_RowState(row=row, relation_phrase=self._relation_phrase(row)))
        live = [s for s in states if isinstance(s, _RowState)]
        for s in live:  # what an actor killed while writing this row left; this actor now owns the row
            storage.remove_temporaries(storage.join(self.config.output, "images", s.row.row_id))
        if any(s.row.row_id in self.config.crash_on_rows for s in live):
            os._exit(17)  # fault injection (tests): dies as an out-of-memory kill or a native crash would
        groups: dict[tuple, list[_RowState]] = defaultdict(list)
        for s in live:
            groups[s.row.batch_key()].append(s)
        for key, group in groups.items():
            self._run_group(group)
        return [s if isinstance(s, ResultRow) else self._result(s) for s in states]

    def process_and_write(self, records: list[dict[str, Any]]) -> list[ResultRow]:
        """:meth:`process`, then the batch's result rows written atomically under ``{output}/results/``."""
        results = self.process(records)
        if results:
            write_results(results, part_uri(self.config.output, self.config.attempt_id, [r.row_id for r in results]))
        return results

    def stats(self) -> dict[str, Any]:
        return {"lora_cache": self.loras.stats(), "subject_cache": self.subjects.stats()}

    # ---- steps ----------------------------------------------------------------------------------------------
    def _relation_phrase(self, row: GenerationRow) -> str:
        if row.relation_phrase:
            return row.relation_phrase
        from dreamrelation.relation_phrase import relation_phrase

        return relation_phrase(row.prompt, [s.phrase for s in row.subjects])

    def _load_subjects(self, s: _RowState) -> None:
        """Read the subject images and encode them (through the content-hash cache)."""

        t = time.perf_counter()
        items = []
        for j, subject in enumerate(s.row.subjects):
            try:
                refused = self.config.access.reason(subject.image)
                if refused:  # the rows were validated; this guards a Worker used directly
                    raise ValueError(refused)
                data = storage.read_bytes(subject.image)
                image = decode_subject(data, self.config.max_image_pixels)
            except Exception as exc:
                raise RowError(f"subjects[{j}].image {subject.image!r} could not be read as an image: {exc}") from exc
            s.subject_images.append(image)
            items.append((self.subjects.key(data), image))
        s.subject_tokens, s.subject_hits = self.subjects.get(items)  # (N, T, W)
        s.seconds["load"] += time.perf_counter() - t

    def _run_group(self, group: list[_RowState]) -> None:
        """Rows sharing a batch key: one relation LoRA, then chunks of up to ``max_batch_images`` images; under
        the gate, further passes over the images that failed it (the rows' retries denoise together too)."""
        relation = group[0].row.relation or None
        problem = self._grid_problem(relation) if relation else None
        if problem:
            for s in group:
                s.error = problem
            return
        t = time.perf_counter()
        try:
            hit = self.loras.activate(relation)
        except Exception as exc:
            for s in group:
                s.error = f"relation {relation!r}: could not load its LoRA: {exc}"
            return
        swap = time.perf_counter() - t
        source = self.loras.source(relation)
        for s in group:
            s.lora_hit, s.lora = hit, source
            s.seconds["lora"] += swap / len(group)
        ready = []
        for s in group:
            try:
                self._load_subjects(s)
                ready.append(s)
            except RowError as exc:
                s.error = str(exc)
        passes = self.gate.max_attempts if self.gate else 1
        items = [(s, _Item(k, 0, s.row.image_seed(k))) for s in ready for k in range(s.row.num_images)]
        for attempt in range(passes):
            self._generate_items(items, relation)
            retry = []
            for s in ready:  # rows in order; a row that failed in this pass becomes an error row (the images
                # of its earlier passes stay on disk, overwritten by a rerun)
                if s.fresh and s.error is None:
                    retry += [(s, item) for item in self._score_and_write(s, last=attempt == passes - 1)]
                s.fresh = []
            items = retry
            if not items:
                break

    def _generate_items(self, items: list[tuple[_RowState, _Item]], relation: str | None) -> None:
        """Images in chunks of up to ``max_batch_images``; a failing chunk is retried row by row, so one bad row
        fails alone (its ``error`` is set) while its batch-mates go on."""
        size = max(1, self.config.max_batch_images)
        for start in range(0, len(items), size):
            chunk = items[start:start + size]
            try:
                self._generate(chunk, relation)
            except Exception as exc:  # retry one row at a time so that one bad row does not fail its batch-mates
                if len({id(s) for s, _ in chunk}) == 1:
                    chunk[0][0].error = _generation_error(exc, chunk[0][1])
                    continue
                logger.warning("batch of %d images failed (%s); retrying row by row", len(chunk), exc)
                by_row: dict[int, list] = defaultdict(list)
                for s, item in chunk:
                    by_row[id(s)].append((s, item))
                for sub in by_row.values():
                    try:
                        self._generate(sub, relation)
                    except Exception as exc2:
                        sub[0][0].error = _generation_error(exc2, sub[0][1])

    def _deadline(self, rows: int):
        """A step callback enforcing ``row_timeout`` for a pipeline call of ``rows`` rows (None without a limit): a
        call that overruns fails, and its rows are retried one by one, so only the slow row fails on its own."""
        if self.config.row_timeout is None:
            return None
        limit = self.config.row_timeout * rows
        start = time.perf_counter()

        def check(step: int, total: int) -> None:
            elapsed = time.perf_counter() - start
            if elapsed > limit:
                raise RowTimeout(f"over the time limit of {self.config.row_timeout:g} s per row (--row-timeout): "
                                 f"{elapsed:.1f} s for {rows} row(s), at step {step} of {total}")

        return check

    def process_guarded(self, records: list[dict[str, Any]]) -> list[ResultRow]:
        """:meth:`process_and_write` for an actor whose process a row may kill (out of memory, a crash in native
        code): a call is marked in flight under ``attempts/{id}/inflight/`` while it runs. A call found marked was
        started before and killed its process; its rows then run one at a time, each marked in flight too, and a
        row that was killed ``max_row_kills`` times becomes an error row instead of running again. Rows already
        finished alone are read back, not made again. Needs ``attempt_id`` (a run)."""
        out, attempt = self.config.output, self.config.attempt_id
        if not attempt:
            return self.process_and_write(records)
        marker = inflight_uri(out, attempt, [str(r.get("row_id")) for r in records])
        if bump(marker) == 1:
            results = self.process_and_write(records)
            storage.remove(marker)
            return results
        results = []
        for record in records:
            rid = str(record.get("row_id"))
            done = part_uri(out, attempt, [rid])
            if storage.exists(done):
                results += [ResultRow.model_validate(r) for r in read_table(done).to_pylist()]
                continue
            row_marker = inflight_uri(out, attempt, [rid])
            kills = bump(row_marker)  # the call's crash, plus each crash of this row alone
            if kills > self.config.max_row_kills:
                result = _error_result(rid, f"poison row: killed its actor {kills - 1} times", record.get("relation"),
                                       attempt_id=attempt)
                write_results([result], done)
            else:
                (result,) = self.process_and_write([record])
            storage.remove(row_marker)
            results.append(result)
        storage.remove(marker)
        return results

    def _generate(self, chunk: list[tuple[_RowState, _Item]], relation: str | None) -> None:
        import torch

        row0 = chunk[0][0].row
        t = time.perf_counter()
        out = self.pipe(
            [s.row.prompt for s, _ in chunk],
            subject_phrases=[[sub.phrase for sub in s.row.subjects] for s, _ in chunk],
            boxes=[[list(sub.box) for sub in s.row.subjects] for s, _ in chunk],
            subject_embeds=torch.stack([s.subject_tokens for s, _ in chunk]),  # (B, N, T, W)
            relation=self.loras.relation_arg(relation),
            seed=[item.seed for _, item in chunk],
            num_inference_steps=row0.steps, guidance_scale=row0.guidance,
            scale=[s.row.scale for s, _ in chunk], height=row0.height, width=row0.width,
            negative_prompt=[s.row.negative_prompt for s, _ in chunk],
            use_local_tokens=self.config.use_local_tokens, progress=False,
            step_callback=self._deadline(len({id(s) for s, _ in chunk})),
        )
        per_image = (time.perf_counter() - t) / len(chunk)
        for (s, item), image in zip(chunk, out.images):
            s.fresh.append((item, image))
            s.seconds["generate"] += per_image

    def _score(self, s: _RowState, images: list) -> list[dict | None]:
        """Scores (x100, rounded to 4 decimals as recorded) of images of one row; Nones without metrics."""
        if self.scorer is None:
            return [None] * len(images)
        t = time.perf_counter()
        n = len(images)
        scores = self.scorer.score(
            images, [s.row.prompt] * n, [s.relation_phrase] * n, [s.subject_images] * n,
            [[list(sub.box) for sub in s.row.subjects]] * n,
        )
        s.seconds["metrics"] += time.perf_counter() - t
        return [{m: None if sc.get(m) is None else round(float(sc[m]), 4) for m in GATE_METRICS} for sc in scores]

    def _score_and_write(self, s: _RowState, last: bool) -> list[_Item]:
        """Score this pass's images of a row, judge them, write each to its key; returns the images to make again.

        Without a gate every image is final. Under the gate an image is final when it passes or when ``last`` (the
        pass used the last attempt); a rejected one goes to ``attempts/{k}-{a}.png`` and its slot gets the next
        seed of the schedule."""
        fresh = sorted(s.fresh, key=lambda pair: pair[0].k)
        scores = self._score(s, [image for _, image in fresh])
        retry = []
        t = time.perf_counter()
        for (item, image), sc in zip(fresh, scores):
            failed = self.gate.failed(sc or {}) if self.gate else []
            final = not failed or last
            key = image_key(s.row.row_id, item.k, None if final else item.attempt)
            buf = io.BytesIO()
            image.save(buf, format="PNG", compress_level=1)  # level 6 costs ~0.2 s per 1024 px image
            storage.write_bytes_atomic(storage.join(self.config.output, key), buf.getvalue())
            if self.gate:
                s.attempts.append(GateAttempt(k=item.k, attempt=item.attempt, seed=item.seed, image=key, **(sc or {}),
                                              passed=not failed, failed=failed))
            if final:
                s.final[item.k] = _Final(key, sc, item.attempt, not failed, item.seed)
            else:
                nxt = item.attempt + 1
                retry.append(_Item(item.k, nxt, s.row.image_seed(item.k, nxt)))
        s.seconds["write"] += time.perf_counter() - t
        return retry

    def _provenance(self, s: _RowState) -> dict[str, Any]:
        """What made this row's images: the weights' fingerprints, the relation LoRA file, the attempt."""
        fp = self.fingerprints
        return dict(attempt_id=self.config.attempt_id, request=s.row.model_dump_json(), model_preset=self.config.preset, model_fingerprint=fp.get("model"),
                    adapter_fingerprint=fp.get("adapter"), local_encoder_fingerprint=fp.get("local_encoder"),
                    lora_uri=s.lora[0] if s.lora else None, lora_sha256=s.lora[1] if s.lora else None)

    def _result(self, s: _RowState) -> ResultRow:
        if s.error is not None:
            return _error_result(s.row.row_id, s.error, s.row.relation, s.seconds, s.lora_hit, s.subject_hits,
                                 **self._provenance(s))
        finals = [s.final[k] for k in sorted(s.final)]
        scored = [f.scores for f in finals if f.scores is not None]
        pick = lambda name: [sc[name] for sc in scored]  # noqa: E731
        gate = None if self.gate is None else "passed" if all(f.passed for f in finals) else "failed"
        return ResultRow(
            row_id=s.row.row_id, status="ok", error=None, images=[f.key for f in finals], relation=s.row.relation,
            clip_t=pick("clip_t"), clip_r=pick("clip_r"), clip_i=pick("clip_i"), clip_i_crop=pick("clip_i_crop"),
            dino=pick("dino"), **_timings(s.seconds), lora_cache_hit=s.lora_hit, subject_cache_hits=s.subject_hits,
            attempt=1 + max((f.attempt for f in finals), default=0), gate=gate,
            attempts=sorted(s.attempts, key=lambda a: (a.k, a.attempt)), seeds=[f.seed for f in finals],
            **self._provenance(s),
        )


SUBJECT_DECODE_SIZE = 1024  # the encoders need 896 px at most (local tokens); larger JPEGs decode reduced


def decode_subject(data: bytes, max_pixels: int):
    """A subject image's bytes as an RGB PIL image: the header is checked against ``max_pixels`` before any pixel is
    decoded (a decompression bomb never is), and a large JPEG is reduced while decoding (``draft``) to about
    :data:`SUBJECT_DECODE_SIZE` px. ``ValueError`` naming the dimensions when over the cap."""
    from PIL import Image

    from manifests.validation import image_header, pixel_cap_reason

    _, width, height = image_header(io.BytesIO(data))
    too_big = pixel_cap_reason(width, height, max_pixels)
    if too_big:
        raise ValueError(too_big)
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (SUBJECT_DECODE_SIZE, SUBJECT_DECODE_SIZE))  # JPEG only: decodes at 1/2, 1/4 or 1/8 scale
    image.load()
    return image.convert("RGB")


class RowError(Exception):
    """A problem with one row's inputs (its batch-mates go on)."""


class RowTimeout(RuntimeError):
    """A row (or a batch of rows) ran past ``--row-timeout``."""


def inflight_uri(output: str, attempt_id: str, row_ids: list[str]) -> str:
    """The in-flight marker of an actor call (or of one row): named like its results file (``ledger.part_uri``)."""
    name = part_uri(output, attempt_id, row_ids).rsplit("/", 1)[-1].replace(".parquet", ".json")
    return storage.join(output, "attempts", attempt_id, "inflight", name)


def bump(uri: str) -> int:
    """Count one more start in the marker at ``uri``; returns the count (1 for a fresh marker)."""
    starts = json.loads(storage.read_bytes(uri))["starts"] + 1 if storage.exists(uri) else 1
    storage.write_bytes_atomic(uri, json.dumps({"starts": starts}).encode())
    return starts


def _generation_error(exc: Exception, item: _Item) -> str:
    where = f" (attempt {item.attempt + 1} of the quality gate)" if item.attempt else ""
    return f"generation failed{where}: {type(exc).__name__}: {exc}"


def _timings(seconds: dict) -> dict[str, float]:
    return {f"seconds_{k}": round(float(seconds.get(k, 0.0)), 4) for k in ("load", "lora", "generate", "write",
                                                                              "metrics")}


def _error_result(row_id: str, error: str, relation: str | None, seconds: dict | None = None,
                  lora_hit: bool | None = None, subject_hits: int = 0, **provenance: Any) -> ResultRow:
    return ResultRow(row_id=row_id, status="error", error=error, images=[], relation=relation, clip_t=[], clip_r=[],
                     clip_i=[], clip_i_crop=[], dino=[], **_timings(seconds or {}), lora_cache_hit=lora_hit,
                     subject_cache_hits=subject_hits, finished_at=utc_now(), **provenance)
