"""ImagePromptAdapter: the MS-Diffusion image branch (Resampler + dummy tokens + per-layer to_k_ip / to_v_ip).

It installs a :class:`~dreamrelation.model.attention.MaskedParallelAttnProcessor` on every attention layer of an
SDXL-shaped UNet (the 140-entry processor list of ``ms_adapter.bin``: self-attention entries carry no weights, the
cross-attention ones own ``to_k_ip`` / ``to_v_ip``), turns per-subject CLIP tokens into the image tokens the
processors read, and loads / saves weights:

* MS-Diffusion's ``ms_adapter.bin`` (a torch pickle ``{"image_proj", "ms_adapter", "dummy_image_tokens"}``), read
  with ``torch.load(weights_only=True)``;
* our safetensors file with the same keys flattened (``image_proj.*``, ``ms_adapter.*``, ``dummy_image_tokens``).

Every load is strict: a mismatch raises :class:`AdapterStateDictError` listing the missing, unexpected and
mis-shaped keys.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .attention import MaskedParallelAttnProcessor
from .config import AdapterConfig
from .resampler import Resampler

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "ms_adapter.safetensors"
CONFIG_NAME = "adapter_config.json"
SECTIONS = ("image_proj", "ms_adapter", "dummy_image_tokens")


class AdapterStateDictError(ValueError):
    """A checkpoint whose keys or shapes do not match the adapter; the message lists every difference."""

    def __init__(self, missing: list[str], unexpected: list[str], mismatched: list[tuple[str, tuple, tuple]]):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_preview(unexpected)}")
        if mismatched:
            shown = [f"{k}: checkpoint {tuple(got)} vs model {tuple(want)}" for k, got, want in mismatched]
            parts.append(f"mis-shaped keys ({len(mismatched)}): {_preview(shown)}")
        super().__init__("adapter checkpoint does not match the model: " + "; ".join(parts))


def _preview(items: list[str], limit: int = 12) -> str:
    head = ", ".join(items[:limit])
    return head + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def check_state_dict(expected: Mapping[str, torch.Size], state_dict: Mapping[str, torch.Tensor]) -> None:
    """Strict key and shape check of a flat state dict (works on ``meta`` tensors: nothing is allocated)."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        (k, tuple(state_dict[k].shape), tuple(expected[k]))
        for k in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[k].shape) != tuple(expected[k])
    ]
    if missing or unexpected or mismatched:
        raise AdapterStateDictError(missing, unexpected, mismatched)


def flatten_ms_checkpoint(checkpoint: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """``{"image_proj": {...}, "ms_adapter": {...}, "dummy_image_tokens": T}`` -> flat ``section.key`` dict."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"adapter checkpoint must be a dict, got {type(checkpoint).__name__}")
    if any("." in k for k in checkpoint) or not set(checkpoint) & set(SECTIONS):
        return dict(checkpoint)  # already flat (our safetensors) or foreign: let the strict check report it
    flat: dict[str, torch.Tensor] = {}
    for section, value in checkpoint.items():
        if isinstance(value, Mapping):
            flat.update({f"{section}.{k}": v for k, v in value.items()})
        else:
            flat[section] = value  # dummy_image_tokens, or an unknown entry for the check to name
    return flat


def attention_layers(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """(processor name, Attention module) in ``unet.attn_processors`` order: the index order of ``ms_adapter``."""
    by_name = dict(unet.named_modules())
    return [(name, by_name[name.removesuffix(".processor")]) for name in unet.attn_processors]


class ImagePromptAdapter(nn.Module):
    """Resampler + dummy tokens + one processor per UNet attention layer, installed on ``unet`` at construction.

    Args:
        config: architecture (Resampler, encoder settings, gamma).
        unet: an SDXL-shaped ``UNet2DConditionModel`` (real, tiny, or on the ``meta`` device).
        encoder: optional :class:`~dreamrelation.model.encoders.SubjectEncoder`; kept apart from the adapter's weights.
    """

    def __init__(self, config: AdapterConfig, unet: nn.Module, encoder: nn.Module | None = None):
        super().__init__()
        self.config = config
        cross_dim = config.resampler.output_dim
        if unet.config.cross_attention_dim != cross_dim:
            raise ValueError(
                f"resampler.output_dim ({cross_dim}) must equal unet.config.cross_attention_dim "
                f"({unet.config.cross_attention_dim})"
            )
        device = next(unet.parameters()).device
        with torch.device(device):
            self.resampler = Resampler(config.resampler)
            self.dummy_image_tokens = nn.Parameter(torch.randn(1, config.num_dummy_tokens, cross_dim))
            names, processors = [], []
            for name, attn in attention_layers(unet):
                if attn.is_cross_attention:
                    # (B, T_img, cross_dim) -> (B, T_img, inner_dim), the shape of the text keys / values
                    proc = MaskedParallelAttnProcessor(attn.to_k.out_features, attn.to_k.in_features, config.scale)
                else:
                    proc = MaskedParallelAttnProcessor(scale=config.scale)
                names.append(name)
                processors.append(proc)
        self.processor_names = names
        self.processors = nn.ModuleList(processors)
        self.encoder = encoder
        unet.set_attn_processor(dict(zip(names, processors)))

    @property
    def dtype(self) -> torch.dtype:
        return self.dummy_image_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.dummy_image_tokens.device

    # ---- weights ------------------------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The flat checkpoint (``image_proj.*``, ``ms_adapter.{i}.to_{k,v}_ip.weight``, ``dummy_image_tokens``)."""
        sd = {f"image_proj.{k}": v for k, v in self.resampler.state_dict().items()}
        sd.update({f"ms_adapter.{k}": v for k, v in self.processors.state_dict().items()})
        sd["dummy_image_tokens"] = self.dummy_image_tokens.data
        return sd

    def expected_shapes(self) -> dict[str, torch.Size]:
        return {k: v.shape for k, v in self.adapter_state_dict().items()}

    def load_adapter_state_dict(self, state_dict: Mapping[str, object]) -> None:
        """Load a nested (``ms_adapter.bin``) or flat checkpoint after a strict key and shape check."""
        flat = flatten_ms_checkpoint(state_dict)
        check_state_dict(self.expected_shapes(), flat)
        assign = self.dummy_image_tokens.is_meta
        self.resampler.load_state_dict(_section(flat, "image_proj"), strict=True, assign=assign)
        self.processors.load_state_dict(_section(flat, "ms_adapter"), strict=True, assign=assign)
        with torch.no_grad():
            if assign:
                self.dummy_image_tokens = nn.Parameter(flat["dummy_image_tokens"])
            else:
                self.dummy_image_tokens.copy_(flat["dummy_image_tokens"])

    def load_checkpoint(self, path: str | Path) -> None:
        """Load ``ms_adapter.bin`` (torch pickle, weights only) or our ``.safetensors``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"adapter checkpoint not found: {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        self.load_adapter_state_dict(state)
        logger.info("adapter weights loaded from %s", path)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``adapter_config.json`` and ``ms_adapter.safetensors`` to ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.adapter_state_dict().items()},
                  str(directory / WEIGHTS_NAME))
        (directory / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, unet: nn.Module, encoder: nn.Module | None = None,
                        weights: str | Path | None = None) -> "ImagePromptAdapter":
        """Build from ``adapter_config.json`` (default: the real config) and load ``weights``
        (default: ``ms_adapter.safetensors``, else ``ms_adapter.bin`` in ``directory``)."""
        directory = Path(directory)
        cfg_path = directory / CONFIG_NAME
        config = AdapterConfig.from_dict(json.loads(cfg_path.read_text())) if cfg_path.is_file() else AdapterConfig()
        adapter = cls(config, unet, encoder)
        if weights is None:
            candidates = [directory / WEIGHTS_NAME, directory / "ms_adapter.bin"]
            weights = next((c for c in candidates if c.is_file()), None)
            if weights is None:
                raise FileNotFoundError(f"no adapter weights in {directory}: expected one of "
                                        f"{[c.name for c in candidates]}")
        adapter.load_checkpoint(weights)
        return adapter

    # ---- tokens -------------------------------------------------------------------------------------------
    def set_scale(self, scale: float) -> None:
        """gamma of paper eq. 4 for every layer (a per-call ``ip_scale`` overrides it)."""
        for proc in self.processors:
            proc.scale = float(scale)

    def image_tokens(self, subject_tokens: torch.Tensor, phrase_embeds: torch.Tensor | None,
                     boxes: torch.Tensor | None) -> torch.Tensor:
        """Per-subject CLIP tokens -> the image tokens every cross-attention reads.

        subject_tokens (B, N, T, embedding_dim); phrase_embeds (B, N, phrase_dim); boxes (B, N, 4)
        -> (B, num_dummy + N * 16, cross_dim): [4 dummy | 16 tokens of subject 0 | 16 of subject 1 | ...].
        """
        b = subject_tokens.shape[0]
        subjects = self.resampler(subject_tokens, phrase_embeds, boxes)  # (B, N*16, D)
        dummy = self.dummy_image_tokens.to(subjects.dtype).expand(b, -1, -1)  # (1, 4, D) -> (B, 4, D)
        return torch.cat([dummy, subjects], dim=1)


def _section(flat: Mapping[str, torch.Tensor], section: str) -> dict[str, torch.Tensor]:
    prefix = section + "."
    return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
