"""Relation LoRA (paper 3.4.1): peft LoRA of rank 4 on the text-facing projections of every cross-attention.

Targets ``attn2.to_q``, ``attn2.to_k``, ``attn2.to_v`` and ``attn2.to_out.0`` of the UNet only; ``to_k_ip`` /
``to_v_ip`` of the image branch stay frozen. Files are in the diffusers format
(``unet.<module>.lora.down.weight`` / ``.lora.up.weight`` in ``pytorch_lora_weights.safetensors``), so the public
relation LoRAs load into our pipeline and ours load into a plain diffusers SDXL pipeline with ``load_lora_weights``.
The adapter name of a relation LoRA is its relation id.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from .config import LoRAConfig

logger = logging.getLogger(__name__)

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def peft_config(config: LoRAConfig = LoRAConfig()):
    """The peft ``LoraConfig`` for a relation LoRA."""
    from peft import LoraConfig

    return LoraConfig(r=config.rank, lora_alpha=config.alpha, init_lora_weights=config.init,
                      target_modules=list(config.target_modules))


def add_relation_lora(unet: nn.Module, relation: str, config: LoRAConfig = LoRAConfig()) -> int:
    """Add a fresh relation LoRA named ``relation`` to ``unet``; returns its number of parameters."""
    if not relation:
        raise ValueError(f"relation must be a non-empty id, got {relation!r}")
    unet.add_adapter(peft_config(config), adapter_name=relation)
    return lora_parameter_count(unet, relation)


def lora_parameter_count(unet: nn.Module, relation: str) -> int:
    """Number of LoRA parameters of adapter ``relation`` (3,143,680 on the real SDXL UNet at rank 4)."""
    return sum(p.numel() for n, p in unet.named_parameters() if f".{relation}." in n and ".lora_" in n)


def relation_lora_state_dict(unet: nn.Module, relation: str) -> dict[str, torch.Tensor]:
    """The LoRA of ``relation`` in diffusers' UNet key format (without the ``unet.`` prefix)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=relation))


def save_relation_lora(unet: nn.Module, relation: str, directory: str | Path) -> Path:
    """Write ``directory/pytorch_lora_weights.safetensors`` (diffusers format); returns the file path."""
    from diffusers import StableDiffusionXLPipeline

    directory = Path(directory)
    layers = {k: v.detach().contiguous().cpu() for k, v in relation_lora_state_dict(unet, relation).items()}
    StableDiffusionXLPipeline.save_lora_weights(directory, unet_lora_layers=layers, safe_serialization=True)
    return directory / LORA_WEIGHTS_NAME


def read_lora_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a LoRA state dict from a ``.safetensors`` file or a folder holding ``pytorch_lora_weights.safetensors``."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"relation LoRA not found: {path}")
    if path.suffix != ".safetensors":
        raise ValueError(f"relation LoRA must be a .safetensors file, got {path.name!r}")
    state = load_file(str(path))
    if not any("lora" in k for k in state):
        raise ValueError(f"{path} holds no LoRA tensors (no key contains 'lora'; first keys: {list(state)[:3]})")
    return state
