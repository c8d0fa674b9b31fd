"""Named model presets and the one loading path every model goes through.

* ``sdxl``: the public weights (REFERENCE.md section 1): SDXL base, CLIP ViT-bigG image encoder, MS-Diffusion's
  ``ms_adapter.bin``; hub ids or local copies of them.
* ``tiny``: every component at miniature width with random weights (``dreamrelation.tiny``), built once into a
  cache folder in the real formats and then loaded from there like any model folder.
* any folder laid out like ``build_tiny``'s output (a diffusers SDXL folder plus ``adapter/``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import ModelSpec

logger = logging.getLogger(__name__)

SDXL = ModelSpec(
    base="stabilityai/stable-diffusion-xl-base-1.0",
    image_encoder="laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",
    adapter="doge1516/MS-Diffusion/ms_adapter.bin",
)
PRESETS = ("tiny", "sdxl")


def cache_root() -> Path:
    """``$DREAMRELATION_HOME`` or ``~/.cache/dreamrelation``."""
    return Path(os.environ.get("DREAMRELATION_HOME", Path.home() / ".cache" / "dreamrelation"))


def build_once(target: Path, build: Callable[[Path], Any], done: Callable[[Path], bool]) -> Path:
    """``target``, built by ``build(folder)`` unless ``done(target)`` already; atomically: the build goes to a
    temporary sibling renamed into place, so a half-built folder is never visible and racing processes agree."""
    if done(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp / "build")
        try:
            (tmp / "build").rename(target)
        except OSError:  # another process finished first
            if not done(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def tiny_model_dir(seed: int = 0) -> Path:
    """The tiny model's folder, built on first use (atomically: a half-built folder is never visible)."""
    from .tiny import TINY_VERSION, build_tiny

    return build_once(cache_root() / f"tiny-v{TINY_VERSION}-seed{seed}", lambda folder: build_tiny(folder, seed=seed),
                      lambda folder: (folder / "adapter" / "ms_adapter.safetensors").is_file())


def resolve_spec(preset: str) -> ModelSpec:
    """``tiny`` | ``sdxl`` | a model folder -> ModelSpec. Unknown names give an error listing the choices."""
    if preset == "sdxl":
        return SDXL
    if preset == "tiny":
        folder = tiny_model_dir()
    else:
        folder = Path(preset)
        if not (folder / "model_index.json").is_file():
            raise ValueError(f"preset must be one of {list(PRESETS)} or a model folder holding model_index.json, "
                             f"got {preset!r}")
    return ModelSpec(base=str(folder), adapter=str(folder / "adapter"))


def _local_file(ref: str) -> Path:
    """A local path as is; ``owner/repo/filename`` through the hub cache (no download happens offline)."""
    path = Path(ref)
    if path.exists():
        return path
    repo, _, filename = ref.rpartition("/")
    if repo.count("/") != 1:
        raise FileNotFoundError(f"{ref!r} is neither a local path nor 'owner/repo/filename'")
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo, filename))


def load_pipeline(preset: str | ModelSpec = "tiny", device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, local_encoder: str | None = None):
    """Build a :class:`~dreamrelation.pipeline.DreamRelationPipeline` from a preset name, folder or ModelSpec."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPVisionModelWithProjection

    from .adapter import ImagePromptAdapter
    from .encoders import SubjectEncoder
    from .pipeline import DreamRelationPipeline

    spec = preset if isinstance(preset, ModelSpec) else resolve_spec(preset)
    base = StableDiffusionXLPipeline.from_pretrained(spec.base, dtype=dtype, add_watermarker=False)
    vision = base.image_encoder
    if spec.image_encoder is not None or vision is None:
        if spec.image_encoder is None:
            raise ValueError(f"model {spec.base!r} has no image_encoder/ folder and the spec names none")
        vision = CLIPVisionModelWithProjection.from_pretrained(spec.image_encoder, dtype=dtype)
    adapter_ref = _local_file(spec.adapter)
    adapter_dir = adapter_ref if adapter_ref.is_dir() else adapter_ref.parent
    weights = None if adapter_ref.is_dir() else adapter_ref
    adapter = ImagePromptAdapter.from_pretrained(adapter_dir, base.unet, weights=weights)
    adapter.encoder = SubjectEncoder(vision, adapter.config.encoder)
    local = local_encoder or spec.local_encoder
    if local:
        adapter.encoder.load_local_checkpoint(local)
    components = {k: v for k, v in base.components.items() if k not in ("image_encoder", "feature_extractor")}
    pipe = DreamRelationPipeline(**components, adapter=adapter.to(dtype=dtype))
    return pipe.to(device)
