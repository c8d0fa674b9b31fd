"""Named model presets and the one loading path every model goes through.

* ``sdxl``: the public weights (REFERENCE.md section 1): SDXL base, CLIP ViT-bigG image encoder, MS-Diffusion's
  ``ms_adapter.bin``; hub ids or local copies of them. Its local tokens need the CLIPSelf-distilled local encoder
  (no public hub copy exists): pass ``local_encoder`` (``--local-encoder``: a ``train distill-encoder`` output or
  the authors' ``epoch_6.pt``) or turn local tokens off; the undistilled CLIP tower never stands in for it.
* ``tiny``: every component at miniature width with random weights (``dreamrelation.model.tiny``), built once into a
  cache folder in the real formats and then loaded from there like any model folder. Its local tokens come from
  its own (random, undistilled) image encoder unless a local encoder is given.
* ``toy``: the miniature model trained on the toy world, shipped in the package (``preset_names.TOY_MODEL_DIR``);
  loaded from there like any model folder.
* any folder laid out like ``build_tiny``'s output (a diffusers SDXL folder plus ``adapter/``), treated like
  ``tiny``; a ``local_encoder/`` subfolder in it (a ``train distill-encoder`` output) is its local encoder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .config import SDXL, AdapterConfig, EncoderConfig, ModelSpec
from .preset_names import PRESETS, toy_model_dir
from .local_encoder_ref import (  # check_local_tokens, local_encoder_ref: re-exported (torch-free home)
    check_local_tokens,
    is_hub_file,
    local_checkpoint_file,
    local_encoder_ref,  # noqa: F401
    pick_local_checkpoint,
)

logger = logging.getLogger(__name__)

LOCAL_ENCODER_DIR = "local_encoder"  # a model folder's own distilled local encoder (a train distill-encoder output)


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


def miniature_folder(preset: str | Path) -> Path | None:
    """The folder of a built-in miniature preset (``tiny``: built on first use; ``toy``: shipped), else None."""
    return {"tiny": tiny_model_dir, "toy": toy_model_dir}.get(str(preset), lambda: None)()


def resolve_spec(preset: str) -> ModelSpec:
    """``tiny`` | ``toy`` | ``sdxl`` | a model folder -> ModelSpec. Unknown names give an error listing the choices."""
    if preset == "sdxl":
        return SDXL
    folder = miniature_folder(preset)
    if folder is None:
        folder = Path(preset)
        if not (folder / "model_index.json").is_file():
            raise ValueError(f"preset must be one of {list(PRESETS)} or a model folder holding model_index.json, "
                             f"got {preset!r}")
    local = folder / LOCAL_ENCODER_DIR
    return ModelSpec(base=str(folder), adapter=str(folder / "adapter"),
                     local_encoder=str(local) if local.is_dir() else None, undistilled_local_tokens=True)


def _spec(preset: str | ModelSpec) -> ModelSpec:
    return preset if isinstance(preset, ModelSpec) else resolve_spec(preset)


def local_encoder_file(ref: str) -> Path:
    """The checkpoint file of a local-encoder reference: a local file, a local ``train distill-encoder`` output
    folder (``encoders.local_checkpoint_file``), a URL of either (``s3://``, ``gs://``, ...: fetched once into
    ``cache_root()/local-encoders``, so every worker of a cluster can read one copy on object storage), or
    ``owner/repo/filename`` through the hub cache."""
    if "://" in str(ref):
        return _fetch_local_encoder(str(ref))
    return local_checkpoint_file(ref if Path(ref).exists() else _local_file(ref))


def _fetch_local_encoder(url: str) -> Path:
    """A local copy of the checkpoint a URL names (a file, or a folder picked like a local one), keyed by the URL
    and the remote file's size and version, so that a changed remote file is fetched again."""
    import hashlib

    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    if fs.isdir(path):
        names = [Path(p).name for p in fs.ls(path, detail=False)]
        path = f"{path.rstrip('/')}/{pick_local_checkpoint(names, url)}"
    if not fs.isfile(path):
        raise ValueError(f"local encoder {url!r} is neither a checkpoint file nor a folder holding one")
    info = fs.info(path)
    version = next((str(info[k]) for k in ("ETag", "LastModified", "mtime", "created") if info.get(k)), "")
    key = hashlib.sha256(f"{url}\0{path}\0{info.get('size')}\0{version}".encode()).hexdigest()[:16]
    name = Path(path).name
    folder = build_once(cache_root() / "local-encoders" / key,
                        lambda target: (target.mkdir(parents=True), fs.get_file(path, str(target / name))),
                        lambda target: (target / name).is_file())
    return folder / name


def adapter_config(preset: str | ModelSpec) -> AdapterConfig:
    """The adapter's architecture: its folder's ``adapter_config.json``, else the public checkpoint's."""
    from .adapter import CONFIG_NAME

    adapter = Path(_spec(preset).adapter)
    folder = adapter if adapter.is_dir() else adapter.parent
    cfg = folder / CONFIG_NAME
    return AdapterConfig.from_dict(json.loads(cfg.read_text())) if cfg.is_file() else AdapterConfig()


def load_image_encoder(preset: str | ModelSpec = "tiny", device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32):
    """The model's CLIP image encoder alone (``CLIPVisionModelWithProjection``) and its ``EncoderConfig``: what
    ``train distill-encoder`` distils, without loading the UNet, the VAE and the text encoders."""
    from transformers import CLIPVisionModelWithProjection

    spec = _spec(preset)
    if spec.image_encoder is not None:
        vision = CLIPVisionModelWithProjection.from_pretrained(spec.image_encoder, dtype=dtype)
    else:
        vision = CLIPVisionModelWithProjection.from_pretrained(spec.base, subfolder="image_encoder", dtype=dtype)
    encoder: EncoderConfig = adapter_config(spec).encoder
    return vision.to(device), encoder


def _local_file(ref: str) -> Path:
    """A local path as is; ``owner/repo/filename`` through the hub cache (no download happens offline)."""
    path = Path(ref)
    if path.exists():
        return path
    repo, _, filename = ref.rpartition("/")
    if not is_hub_file(ref):
        raise FileNotFoundError(f"{ref!r} is neither a local path nor 'owner/repo/filename'")
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo, filename))


def load_pipeline(preset: str | ModelSpec = "tiny", device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, local_encoder: str | None = None,
                  use_local_tokens: bool | None = None):
    """Build a :class:`~dreamrelation.model.pipeline.DreamRelationPipeline` from a preset name, folder or ModelSpec.

    ``local_encoder`` (default: the spec's) is the distilled local tower (``local_encoder_file``).
    ``use_local_tokens`` sets the pipeline's default; True on a model without a local encoder that may not use its
    undistilled image encoder (``sdxl``) raises ``ValueError`` before anything loads (``check_local_tokens``);
    None keeps the adapter's default, and such a model then raises when it first makes local tokens.
    """
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPVisionModelWithProjection

    from .adapter import ImagePromptAdapter
    from .encoders import SubjectEncoder
    from .pipeline import DreamRelationPipeline

    spec = _spec(preset)
    if use_local_tokens is not None:
        check_local_tokens(preset, local_encoder, use_local_tokens)
    local = local_encoder or spec.local_encoder
    local_path = local_encoder_file(local) if local else None  # a bad reference fails before the big weights load
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
    encoder_config = adapter.config.encoder
    if use_local_tokens is not None and use_local_tokens != encoder_config.use_local_tokens:
        encoder_config = replace(encoder_config, use_local_tokens=use_local_tokens)
        adapter.config = replace(adapter.config, encoder=encoder_config)
    adapter.encoder = SubjectEncoder(vision, encoder_config, require_local_model=not spec.undistilled_local_tokens)
    if local_path is not None:
        adapter.encoder.load_local_checkpoint(local_path)
    components = {k: v for k, v in base.components.items() if k not in ("image_encoder", "feature_extractor")}
    pipe = DreamRelationPipeline(**components, adapter=adapter.to(dtype=dtype))
    return pipe.to(device)
