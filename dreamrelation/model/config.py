"""Frozen configuration dataclasses of the model library.

Each component's architecture is a small dataclass, validated in ``__post_init__`` with errors that name the
argument at fault. ``real()`` gives the public checkpoint's numbers (REFERENCE.md section 2); the tiny preset
builds the same classes at miniature width (``dreamrelation.model.tiny``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# Token layout fed to every UNet cross-attention: [77 text | 4 dummy | 16 per subject].
NUM_DUMMY_TOKENS = 4
TOKENS_PER_SUBJECT = 16
LOCAL_GRID = 4  # 4x4 roi pooling -> 16 local tokens per subject image (paper Table 6 also tries 2 and 8)
# Relation-LoRA training profiles (their loss weights and augmentation: dreamrelation.train.training.PROFILES)
TRAIN_PROFILES = ("paper", "public-code", "no-kml")
NUM_TRAIN_TIMESTEPS = 1000  # SDXL's DDPM schedule: t in 0..999, so kml_t_max 999 applies KML at every t


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class _Dict:
    """to_dict / from_dict for JSON files (unknown keys are an error that names them)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**data)


@dataclass(frozen=True)
class ResamplerConfig(_Dict):
    """Grounding Resampler (MS-Diffusion ID extractor). Defaults are the public checkpoint's."""

    dim: int = 1280
    depth: int = 4
    dim_head: int = 64
    heads: int = 20
    num_queries: int = TOKENS_PER_SUBJECT
    embedding_dim: int = 1664  # width of the image tokens coming in (CLIP ViT-bigG)
    output_dim: int = 2048  # UNet cross-attention width
    ff_mult: int = 4
    phrase_dim: int = 768  # CLIP-L pooler_output of the subject phrase
    fourier_freqs: int = 8

    def __post_init__(self) -> None:
        for f in fields(self):
            _positive(f.name, getattr(self, f.name))


@dataclass(frozen=True)
class EncoderConfig(_Dict):
    """Subject image encoder: global CLIP tokens at ``image_size``, local tokens at ``local_image_size``."""

    image_size: int = 224
    local_image_size: int = 896
    subject_resize: int = 512  # subject images are resized to this square before the CLIP processor
    use_local_tokens: bool = True
    local_grid: int = LOCAL_GRID  # local tokens per subject: local_grid x local_grid roi cells

    def __post_init__(self) -> None:
        for name in ("image_size", "local_image_size", "subject_resize", "local_grid"):
            _positive(name, getattr(self, name))


@dataclass(frozen=True)
class AdapterConfig(_Dict):
    """ImagePromptAdapter = Resampler + dummy tokens + per-layer to_k_ip / to_v_ip."""

    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    num_dummy_tokens: int = NUM_DUMMY_TOKENS
    scale: float = 0.6

    def __post_init__(self) -> None:
        _positive("num_dummy_tokens", self.num_dummy_tokens)
        if not 0.0 <= float(self.scale) <= 10.0:
            raise ValueError(f"scale must be in [0, 10], got {self.scale!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        data = dict(data)
        unknown = sorted(set(data) - {"resampler", "encoder", "num_dummy_tokens", "scale"})
        if unknown:
            raise ValueError(f"AdapterConfig: unknown keys {unknown}")
        return cls(
            resampler=ResamplerConfig.from_dict(data.pop("resampler", {})),
            encoder=EncoderConfig.from_dict(data.pop("encoder", {})),
            **data,
        )


@dataclass(frozen=True)
class LoRAConfig(_Dict):
    """Relation LoRA: rank 4 on the text-facing projections of every cross-attention (paper 3.4.1)."""

    rank: int = 4
    alpha: float = 4.0
    target_modules: tuple[str, ...] = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
    init: str = "gaussian"

    def __post_init__(self) -> None:
        _positive("rank", self.rank)
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module, got ()")


@dataclass(frozen=True)
class SamplingConfig(_Dict):
    """Inference defaults (REFERENCE.md section 2; the paper's evaluation settings)."""

    steps: int = 30
    guidance: float = 5.0
    scale: float = 0.6
    width: int = 1024
    height: int = 1024
    negative_prompt: str = "monochrome, lowres, bad anatomy, worst quality, low quality"

    def __post_init__(self) -> None:
        _positive("steps", self.steps)
        for name in ("width", "height"):
            v = getattr(self, name)
            _positive(name, v)
            if v % 8:
                raise ValueError(f"{name} must be divisible by 8, got {v}")


@dataclass(frozen=True)
class ModelSpec(_Dict):
    """Where the weights of a model come from: hub ids or local paths.

    ``base`` is a diffusers SDXL folder or hub id; ``image_encoder`` a CLIPVisionModelWithProjection folder or hub id
    (None: the base folder's ``image_encoder/``); ``adapter`` a folder with ``adapter_config.json`` + weights, a
    checkpoint file, or ``hub_id/filename``; ``local_encoder`` the distilled (CLIPSelf) tower of the local tokens:
    a ``train distill-encoder`` output folder, its ``local_encoder.safetensors`` or ``epoch_N.pt``, or the
    authors' ``epoch_6.pt``. ``undistilled_local_tokens``: without a ``local_encoder``, local tokens may come from
    the image encoder itself (only the tiny preset and tiny-like folders, whose towers are random anyway); when
    False (the real weights), asking for local tokens without a local encoder is an error.
    """

    base: str
    adapter: str
    image_encoder: str | None = None
    local_encoder: str | None = None
    undistilled_local_tokens: bool = False


@dataclass(frozen=True)
class TrainConfig(_Dict):
    """Relation-LoRA fine-tuning (paper 3.4 and section 4): LoRA only, AdamW 1e-4, 500 steps, batch 8 by accumulation.

    ``profile`` names the defaults of the loss weights, the KML gate and augmentation (``TRAIN_PROFILES``; their
    values: ``dreamrelation.train.training.PROFILES``): ``paper`` (KML 1e-3 at every t, no attention loss, no
    augmentation), ``public-code`` (KML 0.1 for t <= 333, relation-attention loss 1e-3, flip + crop) and ``no-kml``
    (the paper's without KML). ``kml_weight``, ``kml_t_max``, ``attention_weight`` and ``augment`` left None take
    the profile's value; set, they override it (``kml_t_max`` 999 applies KML at every t).
    ``dreamrelation.train.training.resolve_train_config`` fills them in; the LoRA's card records the filled-in values.
    """

    relation: str
    steps: int = 500
    learning_rate: float = 1e-4
    batch_size: int = 8  # total per optimizer step, reached by gradient accumulation of single examples
    resolution: int = 1024
    rank: int = 4
    profile: str = "paper"
    checkpoint_every: int = 100
    seed: int = 0
    mixed_precision: str = "auto"  # "auto": bf16 autocast on CUDA, none on CPU; "no"; "bf16"
    use_local_tokens: bool = True  # the paper feeds local tokens in fine-tuning (the public code does not)
    augment: bool | None = None  # None: the profile's (flip + crop for public-code only)
    scale: float = 0.6
    kml_weight: float | None = None  # lambda of eq. 7; None: the profile's
    kml_t_max: int | None = None  # KML only for t <= kml_t_max; None: the profile's (999: every t)
    attention_weight: float | None = None  # relation-attention loss weight; None: the profile's
    local_grid: int = LOCAL_GRID  # local tokens per subject: local_grid x local_grid (paper Table 6: 2, 4, 8)

    def __post_init__(self) -> None:
        if not self.relation:
            raise ValueError(f"relation must be a non-empty id, got {self.relation!r}")
        if self.profile not in TRAIN_PROFILES:
            raise ValueError(f"profile must be one of {list(TRAIN_PROFILES)}, got {self.profile!r}")
        for name in ("steps", "batch_size", "resolution", "rank", "checkpoint_every", "local_grid"):
            _positive(name, getattr(self, name))
        if self.resolution % 8:
            raise ValueError(f"resolution must be divisible by 8, got {self.resolution}")
        if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate)
                and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a finite number > 0, got {self.learning_rate!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        for name in ("kml_weight", "attention_weight"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        t_max = self.kml_t_max
        if t_max is not None and (isinstance(t_max, bool) or not isinstance(t_max, int)
                                  or not 0 <= t_max < NUM_TRAIN_TIMESTEPS):
            raise ValueError(f"kml_t_max must be an integer in [0, {NUM_TRAIN_TIMESTEPS - 1}], got {t_max!r}")
        if self.mixed_precision not in ("auto", "no", "bf16"):
            raise ValueError(f"mixed_precision must be 'auto', 'no' or 'bf16', got {self.mixed_precision!r}")


SDXL = ModelSpec(
    base="stabilityai/stable-diffusion-xl-base-1.0",
    image_encoder="laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",
    adapter="doge1516/MS-Diffusion/ms_adapter.bin",
)  # the public weights (``--preset sdxl``); its local tokens need a distilled local encoder
