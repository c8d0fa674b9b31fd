"""The plain cores of the data engine's actors: samples in, images written, outcomes out. No Ray here.

* :class:`GenerateStage` holds a generator (``dreamrelation.engine.generators.PipelineGenerator`` or ``APIGenerator``)
  and turns engine samples (``manifests.relation_spec.EngineSample``) into images written atomically to
  ``{output}/images/{sample_id}/subject_{j}.png`` and ``target.png`` (then ``generation.json``: what made them),
  returning one record per sample (the sample, the image URIs, or the generation error). With a LoRA registry
  (``EngineConfig.loras``) a relation that has a LoRA there gets its target from the pipeline with that LoRA on
  (recorded as ``target_lora``); the others, and every API target, come from the base adapter alone. A sample being
  judged again (other gates) keeps its images when they are still there.
* :class:`AnnotateStage` holds the annotators (``dreamrelation.engine.gates.Annotator``) and turns those records
  into one ``EngineOutcome`` per sample: ``made`` with its ``TripletRow`` (target masks written to ``mask_{j}.png``), or
  ``dropped`` with the stage, a reason code and the detail. :meth:`AnnotateStage.process_and_write` also writes the
  batch's outcomes to ``{output}/outcomes/part-{digest}.parquet`` (a name fixed by the batch's sample ids, written
  atomically), which is what a rerun reads to resume.

A failure of one sample (the generator raised, an annotator raised) becomes that sample's dropped outcome
(``generation_error`` / ``annotation_error``) and its batch-mates go on; a failure of the whole process (a model
that does not load, storage that refuses writes) raises.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from dreamrelation.engine.gates import (
    Annotation,
    Drop,
    GateConfig,
    KeypointConfig,
    default_gates,
)
from manifests import storage
from manifests.engine_outcome import EngineOutcome, write_outcomes
from manifests.relation_spec import EngineSample
from manifests.triplets import TripletRow

logger = logging.getLogger(__name__)

GENERATORS = ("pipeline", "api")
OUTCOMES_DIR = "outcomes"
GENERATION_FILE = "generation.json"  # beside a sample's images: what made them (written last)


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine actor needs to build its stage (plain data: it travels to Ray actors).

    ``generator``: "pipeline" (our stack, ``preset``) or "api" (``api_base``, the key from ``$api_key_env``,
    ``api_model``, ``api_size``). ``metrics``: score CLIP-R and DINO of each target (needed by the CLIP-R and
    copy-paste gates). ``gates``: None means the preset's (``engine.default_gates``: thresholds noise passes for
    "tiny"). ``keypoints``: which subjects get ViTPose keypoints (``engine.KeypointConfig``). ``loras``: a LoRA
    registry (``manifests.registry``); a relation with a LoRA there gets its targets made with it.
    """

    output: str
    preset: str = "tiny"
    generator: str = "pipeline"
    api_base: str | None = None
    api_key_env: str | None = "OPENAI_API_KEY"
    api_model: str = "gpt-image-1"
    api_size: str = "1024x1024"
    device: str = "auto"  # "auto": cuda when available, else cpu
    dtype: str = "auto"  # "auto": bfloat16 on cuda, float32 on cpu (the generator; annotators run in float32)
    guidance: float = 5.0
    scale: float = 0.6
    caption: bool = False
    metrics: bool = True
    feature_size: int | None = None  # DINOv2 input side (None: the preset's, see Annotator.from_preset)
    local_encoder: str | None = None  # the generator's distilled local encoder (None: the preset's)
    use_local_tokens: bool | None = None  # None: the preset's default
    gates: GateConfig | None = None
    keypoints: KeypointConfig = field(default_factory=KeypointConfig)
    loras: str | None = None

    def __post_init__(self) -> None:
        if self.generator not in GENERATORS:
            raise ValueError(f"generator must be one of {list(GENERATORS)}, got {self.generator!r}")
        if self.generator == "api" and not self.api_base:
            raise ValueError(f"generator 'api' needs api_base (the images API base URL), got {self.api_base!r}")
        if self.gates is None:
            object.__setattr__(self, "gates", default_gates(self.preset, self.metrics))
        for name in ("min_clip_r", "max_copy_paste_dino"):
            if getattr(self.gates, name) is not None and not self.metrics:
                raise ValueError(f"gates.{name}={getattr(self.gates, name)} needs metrics=True (it gates a metric)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineConfig:
        data = dict(data)
        gates = data.pop("gates", None)
        keypoints = data.pop("keypoints", None) or {}
        return cls(**data, gates=gates if gates is None or isinstance(gates, GateConfig) else GateConfig(**gates),
                   keypoints=keypoints if isinstance(keypoints, KeypointConfig) else KeypointConfig(**keypoints))

    def judging_digest(self) -> str:
        """A short digest of what judges a sample (gates, keypoint choices, annotators): an outcome judged under
        another digest is judged again by a rerun (``EngineOutcome.judged_with``)."""
        judged = {"gates": asdict(self.gates), "keypoints": asdict(self.keypoints), "preset": self.preset,
                  "feature_size": self.feature_size}
        return hashlib.sha1(json.dumps(judged, sort_keys=True).encode()).hexdigest()[:16]


def _device(config: EngineConfig) -> tuple[str, Any]:
    import torch

    device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = (getattr(torch, config.dtype) if config.dtype != "auto"
             else torch.bfloat16 if device.startswith("cuda") else torch.float32)
    return device, dtype


def build_generator(config: EngineConfig):
    """The generator ``config`` names (loads the pipeline, or makes an images API client)."""
    from dreamrelation.engine.generators import APIGenerator, PipelineGenerator

    if config.generator == "api":
        from dreamrelation.engine.images_api import from_env

        return APIGenerator(from_env(config.api_base, config.api_key_env, model=config.api_model,
                                     size=config.api_size))
    from dreamrelation.model.presets import load_pipeline

    device, dtype = _device(config)
    pipe = load_pipeline(config.preset, device=device, dtype=dtype, local_encoder=config.local_encoder,
                         use_local_tokens=config.use_local_tokens)
    pipe.set_progress_bar_config(disable=True)
    return PipelineGenerator(RelationPipe(pipe), guidance=config.guidance, scale=config.scale,
                             use_local_tokens=config.use_local_tokens)


class RelationPipe:
    """The pipeline, with the relation LoRA of the sample being made switched on for its target.

    ``PipelineGenerator`` calls the pipeline with ``relation=None`` (targets for relations that have no LoRA yet);
    :class:`GenerateStage` sets :attr:`relation` per sample when the registry has that relation's LoRA, and this
    wrapper passes it on. Everything else (``text_to_image``: subjects never get a LoRA) goes to the pipeline."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.relation: str | None = None

    def __call__(self, *args, **kwargs):
        kwargs["relation"] = self.relation
        return self.pipe(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.pipe, name)


def outcomes_uri(output: str, sample_ids: list[str]) -> str:
    """A deterministic name for the outcomes of a set of samples: a retried batch overwrites, never duplicates."""
    digest = hashlib.sha1("\n".join(sorted(sample_ids)).encode()).hexdigest()[:20]
    return storage.join(output, OUTCOMES_DIR, f"part-{digest}.parquet")


def sample_uri(output: str, sample_id: str, name: str) -> str:
    """``{output}/images/{sample_id}/{name}``: where a sample's images and masks go."""
    return storage.join(output, "images", sample_id, name)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _sample_digest(sample: EngineSample) -> str:
    """What a sample's images depend on (prompts, seeds, boxes, size, steps): a reused image must match it."""
    return hashlib.sha1(sample.model_dump_json().encode()).hexdigest()[:16]


def _read_image(uri: str) -> Image.Image:
    image = Image.open(io.BytesIO(storage.read_bytes(uri)))
    image.load()
    return image.convert("RGB")


# ------------------------------------------------------------------------------------------------------ generate

class GenerateStage:
    """Build once per process (it loads the generator); call :meth:`process` on lists of samples."""

    def __init__(self, config: EngineConfig, generator=None) -> None:
        """``generator``: an already built :class:`~dreamrelation.engine.generators.Generator` instead of
        ``config``'s."""
        self.config = config
        self.generator = generator if generator is not None else build_generator(config)
        self.registry = None
        if config.loras:
            from manifests.registry import LoRARegistry

            self.registry = LoRARegistry(config.loras)
        self._loaded: dict[str, str | None] = {}  # relation -> "relation@fingerprint" of its loaded LoRA, or None

    def target_lora(self, relation: str) -> str | None:
        """``"relation@fingerprint"`` of the relation LoRA this stage makes ``relation``'s targets with (loaded on
        first use), or None: no registry, no LoRA for it there, or a generator that cannot take one (an API)."""
        if relation in self._loaded:
            return self._loaded[relation]
        lora, pipe = None, getattr(self.generator, "pipe", None)
        if self.registry is not None and self.registry.has(relation):
            if not isinstance(pipe, RelationPipe):
                logger.warning("relation %r has a LoRA in %s, but generator %r takes no LoRA: its targets are "
                               "made without it", relation, self.config.loras, self.generator.name)
            else:  # a LoRA that does not load fails each of the relation's samples, never makes them without it
                from safetensors.torch import load as load_safetensors

                pipe.load_relation_lora(relation, load_safetensors(self.registry.read_bytes(relation)))
                lora = f"{relation}@{self.registry.fingerprint(relation)}"
                logger.info("targets of %r made with its LoRA %s", relation, lora)
        self._loaded[relation] = lora
        return lora

    def _reused(self, sample: EngineSample, record: dict[str, Any]) -> bool:
        """Fill ``record`` from the images a previous run made for ``sample`` when they are all there and were
        made for this very sample (``generation.json`` holds its digest); False otherwise."""
        out = self.config.output
        info_uri = sample_uri(out, sample.sample_id, GENERATION_FILE)
        if not storage.exists(info_uri):
            return False
        try:
            info = json.loads(storage.read_bytes(info_uri))
        except ValueError:
            return False
        uris = [sample_uri(out, sample.sample_id, f"subject_{j}.png") for j in range(len(sample.classes))]
        target = sample_uri(out, sample.sample_id, "target.png")
        if info.get("sample") != _sample_digest(sample) or not all(storage.exists(u) for u in [*uris, target]):
            return False
        record.update(generator=info.get("generator") or record["generator"], target_lora=info.get("target_lora"),
                      subject_uris=uris, target_uri=target, seconds_generate=0.0, reused=True)
        return True

    def process(self, samples: list[dict[str, Any] | EngineSample],
                reuse: Collection[str] = ()) -> list[dict[str, Any]]:
        """Samples -> one record each, in order: the sample's fields plus ``generator``, ``target_lora``,
        ``subject_uris``, ``target_uri`` and ``error`` (None, or why generation failed) and ``seconds_generate``.
        Samples named in ``reuse`` (judged again under other gates) keep the images they have (``reused``)."""
        records = []
        for raw in samples:
            sample = raw if isinstance(raw, EngineSample) else EngineSample.model_validate(raw)
            record = {**sample.model_dump(mode="json"), "generator": self.generator.name, "target_lora": None,
                      "subject_uris": [], "target_uri": None, "error": None}
            if sample.sample_id in reuse and self._reused(sample, record):
                records.append(record)
                continue
            t = time.perf_counter()
            size, steps = (sample.width, sample.height), sample.steps
            try:
                subjects = self.generator.subject_images(sample.subject_prompts, sample.subject_seeds, size, steps)
                if len(subjects) != len(sample.classes):
                    raise RuntimeError(f"the generator returned {len(subjects)} subject images for "
                                       f"{len(sample.classes)} subjects")
                record["target_lora"] = self.target_lora(sample.relation)
                pipe = getattr(self.generator, "pipe", None)
                if isinstance(pipe, RelationPipe):
                    pipe.relation = sample.relation if record["target_lora"] else None
                target = self.generator.target(sample.prompt, subjects, sample.classes, sample.boxes, sample.seed,
                                               size, steps)
            except Exception as exc:  # one sample's failure; its batch-mates go on
                logger.warning("sample %s: generation failed: %s: %s", sample.sample_id, type(exc).__name__, exc)
                record["error"] = f"{type(exc).__name__}: {exc}"
                record["seconds_generate"] = round(time.perf_counter() - t, 4)
                records.append(record)
                continue
            seconds = time.perf_counter() - t
            for j, image in enumerate(subjects):  # the target last: when it exists, the subjects do too
                uri = sample_uri(self.config.output, sample.sample_id, f"subject_{j}.png")
                storage.write_bytes_atomic(uri, _png(image.convert("RGB")))
                record["subject_uris"].append(uri)
            record["target_uri"] = sample_uri(self.config.output, sample.sample_id, "target.png")
            storage.write_bytes_atomic(record["target_uri"], _png(target.convert("RGB")))
            info = {"sample": _sample_digest(sample), "generator": record["generator"],
                    "target_lora": record["target_lora"]}
            storage.write_bytes_atomic(sample_uri(self.config.output, sample.sample_id, GENERATION_FILE),
                                       json.dumps(info).encode())
            record["seconds_generate"] = round(seconds, 4)
            records.append(record)
        return records


# ------------------------------------------------------------------------------------------------------ annotate

class AnnotateStage:
    """Build once per process (it loads the annotators); call :meth:`process` on generated records."""

    def __init__(self, config: EngineConfig, annotator=None) -> None:
        """``annotator``: an already built :class:`~dreamrelation.engine.gates.Annotator` instead of ``config``'s."""
        self.config = config
        if annotator is None:
            from dreamrelation.engine.gates import Annotator

            device, _ = _device(config)
            annotator = Annotator.from_preset(config.preset, gates=config.gates, device=device,
                                              caption=config.caption, metrics=config.metrics,
                                              feature_size=config.feature_size, keypoints=config.keypoints)
        self.annotator = annotator
        self.judged_with = config.judging_digest()

    def process(self, records: list[dict[str, Any]]) -> list[EngineOutcome]:
        """Generated records (:meth:`GenerateStage.process`) -> one outcome per sample, in order, each stamped
        with the settings that judged it (``EngineOutcome.judged_with``)."""
        return [self._one(r).model_copy(update={"judged_with": self.judged_with}) for r in records]

    def process_and_write(self, records: list[dict[str, Any]]) -> list[EngineOutcome]:
        """:meth:`process`, then the outcomes written atomically under ``{output}/outcomes/``."""
        outcomes = self.process(records)
        if outcomes:
            write_outcomes(outcomes, outcomes_uri(self.config.output, [o.sample_id for o in outcomes]))
        return outcomes

    def _one(self, record: dict[str, Any]) -> EngineOutcome:
        sample = EngineSample.model_validate({k: v for k, v in record.items() if k in EngineSample.model_fields})
        timing = {"seconds_generate": float(record.get("seconds_generate") or 0.0)}
        if record.get("error"):
            return _dropped(sample, "generate", "generation_error", record["error"], timing)
        t = time.perf_counter()
        phrase = sample.relation_phrase or _relation_phrase(sample)
        try:
            target = _read_image(record["target_uri"])
            subjects = [_read_image(u) for u in record["subject_uris"]]
            result = self.annotator.annotate(target, subjects, sample.classes, sample.boxes, sample.prompt, phrase)
        except Exception as exc:  # one sample's failure; its batch-mates go on
            logger.warning("sample %s: annotation failed: %s: %s", sample.sample_id, type(exc).__name__, exc)
            timing["seconds_annotate"] = round(time.perf_counter() - t, 4)
            return _dropped(sample, "annotate", "annotation_error", f"{type(exc).__name__}: {exc}", timing)
        timing["seconds_annotate"] = round(time.perf_counter() - t, 4)
        if isinstance(result, Drop):
            return _dropped(sample, result.stage, result.reason, result.detail, {**result.metrics, **timing})
        triplet = self._triplet(sample, record, phrase, result)
        return EngineOutcome(sample_id=sample.sample_id, relation=sample.relation, status="made", stage="gate",
                             reason=None, detail="", triplet=triplet.model_dump_json(),
                             metrics={**result.metrics, **timing})

    def _triplet(self, sample: EngineSample, record: dict[str, Any], phrase: str,
                 annotation: Annotation) -> TripletRow:
        """The kept sample as a TripletRow (target masks written beside its images)."""
        from dreamrelation.train.data import LAYOUTS_KEY

        subjects = []
        for j, s in enumerate(annotation.subjects):
            mask_uri = sample_uri(self.config.output, sample.sample_id, f"mask_{j}.png")
            storage.write_bytes_atomic(mask_uri, _png(Image.fromarray(s.target_mask.astype(np.uint8) * 255, "L")))
            subjects.append({
                "image": record["subject_uris"][j], "phrase": s.phrase, "box": [float(v) for v in s.box],
                "mask": mask_uri, "target_keypoints": s.target_keypoints.tolist(),
                "subject_keypoints": s.subject_keypoints.tolist(),
                "target_visibility": s.target_visibility.tolist(),
                "subject_visibility": None if s.subject_visibility is None else s.subject_visibility.tolist(),
            })
        metadata = {
            LAYOUTS_KEY: annotation.layouts,
            "seed": str(sample.seed),
            "subject_seeds": ",".join(str(s) for s in sample.subject_seeds),
            "generator": str(record.get("generator") or ""),
            "target_lora": str(record.get("target_lora") or ""),  # "relation@fingerprint"; "": the base adapter
            "keypoint_confidence": ",".join(f"{float(np.mean(s.confidence)):.4f}" for s in annotation.subjects),
            "layout_boxes": ";".join(",".join(f"{v:.4f}" for v in b) for b in sample.boxes),
        }
        if annotation.clip_r is not None:
            metadata["clip_r"] = f"{annotation.clip_r:.4f}"
        if annotation.caption:
            metadata["caption"] = annotation.caption
        return TripletRow.model_validate({
            "triplet_id": sample.sample_id, "relation": sample.relation, "target": record["target_uri"],
            "prompt": sample.prompt, "relation_phrase": phrase, "subjects": subjects,
            "source": f"engine:{metadata['generator']}", "metadata": metadata,
        })


def _relation_phrase(sample: EngineSample) -> str:
    from dreamrelation.relation_phrase import relation_phrase

    return relation_phrase(sample.prompt, list(sample.classes))


def _dropped(sample: EngineSample, stage: str, reason: str, detail: str, metrics: dict[str, float]) -> EngineOutcome:
    return EngineOutcome(sample_id=sample.sample_id, relation=sample.relation, status="dropped", stage=stage,
                         reason=reason, detail=detail, triplet=None,
                         metrics={k: float(v) for k, v in metrics.items()})
