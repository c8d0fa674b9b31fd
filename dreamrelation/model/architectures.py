"""The real SDXL / CLIP architectures as configs, for building the true shapes without downloading weights.

Used to prove that the public checkpoints fit our modules (on the ``meta`` device: no memory is allocated) and by
the GPU benchmark (real architecture, random weights). Values are those of the public ``config.json`` files of
``stabilityai/stable-diffusion-xl-base-1.0`` and ``laion/CLIP-ViT-bigG-14-laion2B-39B-b160k``.
"""

from __future__ import annotations

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn", attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)

SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=1024, scaling_factor=0.13025, force_upcast=True,
)

CLIP_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG_TEXT = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                      num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
CLIP_BIGG_VISION = dict(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48, num_attention_heads=16,
                        image_size=224, patch_size=14, projection_dim=1280, hidden_act="gelu")


def sdxl_unet(device: str = "meta"):
    """The SDXL base UNet (2.6B parameters) with random weights, built on ``device`` ("meta" allocates nothing)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(**SDXL_UNET)


def sdxl_components(device: str = "meta", dtype=None) -> dict:
    """Every SDXL component at its real size with random weights (tokenizers: the tiny byte-level one)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from .tiny import build_tokenizer

    tokenizer = build_tokenizer()
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    with torch.device(device):
        parts = dict(
            unet=sdxl_unet(device), vae=AutoencoderKL(**SDXL_VAE),
            text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT, **ids)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG_TEXT, **ids)),
            image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_BIGG_VISION)),
        )
    if dtype is not None:
        parts = {k: v.to(dtype) for k, v in parts.items()}
    parts.update(tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading",
        steps_offset=1, num_train_timesteps=1000))
    return parts
