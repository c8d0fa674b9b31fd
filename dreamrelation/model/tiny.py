"""The ``tiny`` preset: every component of the real model at miniature width, random weights, fixed seed.

Built in code in a few seconds and saved in the real formats (a diffusers SDXL folder, a CLIP vision model,
the adapter in the ``ms_adapter`` key layout), so that the tiny model travels the same loading path as the real
one. Its images are noise: it exists to exercise every code path on a CPU, never to judge quality.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .config import AdapterConfig, EncoderConfig, ResamplerConfig

logger = logging.getLogger(__name__)

TINY_SEED = 0
TINY_VERSION = 2  # bump whenever the build changes: cached tiny folders are keyed by it
TEXT_WIDTH = 32  # both tiny text encoders; the UNet cross-attention width is their concatenation
VISION_WIDTH = 32

TINY_ADAPTER = AdapterConfig(
    resampler=ResamplerConfig(
        dim=32, depth=1, dim_head=8, heads=4, embedding_dim=VISION_WIDTH, output_dim=2 * TEXT_WIDTH,
        ff_mult=2, phrase_dim=TEXT_WIDTH,
    ),
    encoder=EncoderConfig(image_size=32, local_image_size=128, subject_resize=64),
)


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (CLIP, GPT-2)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + i) for i in range(len(extra))]


def build_tokenizer():
    """A real CLIP BPE tokenizer with a byte-level vocabulary and no merges (words become characters)."""
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def text_config(tokenizer):
    """The tiny text encoders' config (width ``TEXT_WIDTH``, 2 layers) for ``tokenizer``'s vocabulary."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )


def tiny_unet_config() -> dict:
    """SDXL-shaped UNet (text_time conditioning, linear projections, cross-attention at the lower level)."""
    return dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + TEXT_WIDTH, cross_attention_dim=2 * TEXT_WIDTH,
        norm_num_groups=8,
    )


def build_tiny_components(seed: int = TINY_SEED) -> dict:
    """The tiny SDXL components (diffusers pipeline kwargs) plus ``image_encoder``; deterministic for ``seed``."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import (
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    unet = UNet2DConditionModel(**tiny_unet_config())
    vae = AutoencoderKL(  # four levels: the same x8 latent downsampling as SDXL's VAE
        block_out_channels=(8, 8, 16, 16), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8, sample_size=128,
    )
    text_encoder = CLIPTextModel(text_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer))
    enc = TINY_ADAPTER.encoder
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=VISION_WIDTH, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=enc.image_size, patch_size=8, projection_dim=16,
    ))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading",
        steps_offset=1, num_train_timesteps=1000,
    )
    return dict(
        unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, scheduler=scheduler, image_encoder=image_encoder,
    )


def build_tiny(directory: str | Path, seed: int = TINY_SEED) -> Path:
    """Build the tiny model and save it to ``directory`` in the real formats; returns the folder.

    Layout: a diffusers SDXL folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder{,_2}/``,
    ``tokenizer{,_2}/``, ``scheduler/``, ``image_encoder/``) plus ``adapter/`` (``adapter_config.json`` and
    ``ms_adapter.safetensors`` in MS-Diffusion's key layout) plus ``metrics/clip`` and ``metrics/dino`` (the tiny
    CLIP and DINO that score images in the batch job).
    """
    from diffusers import StableDiffusionXLPipeline

    from ..metrics import METRICS_SUBDIR, build_tiny_metric_models
    from .adapter import ImagePromptAdapter

    directory = Path(directory)
    components = build_tiny_components(seed)
    base = StableDiffusionXLPipeline(**components, add_watermarker=False)
    base.save_pretrained(directory, safe_serialization=True)
    torch.manual_seed(seed + 1)
    adapter = ImagePromptAdapter(TINY_ADAPTER, components["unet"])
    adapter.save_pretrained(directory / "adapter")
    build_tiny_metric_models(directory / METRICS_SUBDIR, seed=seed)
    logger.info("tiny model written to %s", directory)
    return directory
