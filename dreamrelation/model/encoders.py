"""Subject image encoder: global CLIP tokens plus DreamRelation's local tokens (REFERENCE.md section 2; paper 3.4.3).

For each subject image (RGB, resized to 512x512):

* global tokens: ``hidden_states[-2]`` of the CLIP vision tower at 224 px -> (1 + P, width) (257 for bigG);
* local tokens: the CLIPSelf-distilled tower at 896 px, whose last block is run MaskCLIP style (value path
  only, no q.k attention), CLS dropped, ``post_layernorm``, L2-normalized, reshaped to the (g, g) patch grid
  and roi-aligned (1x1, aligned=True) over an n x n grid of equal boxes (``local_grid``, 4 by default)
  -> n*n tokens of width ``width`` (16 for the paper's 4x4; its Table 6 also tries 2x2 and 8x8).

The local tower is the CLIPSelf-distilled checkpoint (``load_local_checkpoint``: a ``train distill-encoder``
output or the authors' ``epoch_6.pt``). Without one, the local tokens come from the global tower itself, which
only the tiny preset allows (``require_local_model=False``); the real model raises instead of silently using an
undistilled tower.

Every image is pooled on its own feature map (the public code hands all images subject 0's boxes and tokens).
The 16 boxes follow the public ``generate_bboxes`` order (x outer, y inner); the Resampler has no positional
embedding, so the order does not change its output.
"""

from __future__ import annotations

import copy
from dataclasses import replace
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import CLIPVisionModelWithProjection

from .config import LOCAL_GRID, EncoderConfig
from .local_encoder_ref import (
    LOCAL_CHECKPOINT_NAME,
    local_checkpoint_file,
    pick_local_checkpoint,
)

logger = logging.getLogger(__name__)

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "LOCAL_CHECKPOINT_NAME",
    "SubjectEncoder",
    "local_checkpoint_file",
    "local_grid_boxes",
    "pick_local_checkpoint",
    "open_clip_visual_to_hf",
    "roi_align_1x1",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------------- roi align
def _axis_weights(start: torch.Tensor, length: torch.Tensor, grid: torch.Tensor, size: int) -> torch.Tensor:
    """Summed bilinear weights of the samples along one axis, as torchvision's roi_align places them.

    start, length, grid: (K, M) sample span and sample count per box; returns (K, M, size) where entry i is the
    total weight that the box's samples along this axis give to pixel i (out-of-range samples count zero).
    """
    n = max(int(grid.max().item()), 1) if grid.numel() else 1
    idx = torch.arange(n, device=start.device, dtype=start.dtype)  # (G,)
    # (K, M, 1) + (G,) -> (K, M, G) sample coordinates
    pos = start[..., None] + (idx + 0.5) * (length / grid.clamp(min=1))[..., None]
    valid = (idx < grid[..., None]) & (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0.0)
    low = pos.floor().long()
    at_edge = low >= size - 1
    low = low.clamp(max=size - 1)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(pos), pos - low.to(pos.dtype))
    w_low = (1.0 - frac) * valid
    w_high = frac * valid
    out = torch.zeros(*start.shape, size, device=start.device, dtype=start.dtype)  # (K, M, size)
    return out.scatter_add_(-1, low, w_low).scatter_add_(-1, high, w_high)


def roi_align_1x1(features: torch.Tensor, boxes: torch.Tensor, aligned: bool = True) -> torch.Tensor:
    """torchvision ``roi_align(features, boxes, output_size=1, spatial_scale=1, sampling_ratio=-1, aligned)``.

    Each box is averaged over ``ceil(h) x ceil(w)`` bilinear samples (adaptive sampling ratio); with
    ``aligned=True`` pixel i covers [i, i+1) so a box on pixel edges averages exactly the pixels inside it.
    Bilinear sampling is separable, so the average is ``Wy^T F Wx`` per box.

    Args:
        features: (K, C, H, W).
        boxes: (K, M, 4) xyxy in feature-pixel coordinates; image k's boxes pool image k's map only.
    Returns:
        (K, M, C).
    """
    if features.ndim != 4:
        raise ValueError(f"features must be (K, C, H, W), got shape {tuple(features.shape)}")
    if boxes.ndim != 3 or boxes.shape[0] != features.shape[0] or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (K={features.shape[0]}, M, 4), got shape {tuple(boxes.shape)}")
    _, _, h, w = features.shape
    dtype = torch.float32 if features.dtype in (torch.float16, torch.bfloat16) else features.dtype
    boxes = boxes.to(device=features.device, dtype=dtype)
    offset = 0.5 if aligned else 0.0
    x0, y0, x1, y1 = (boxes[..., i] - offset for i in range(4))  # each (K, M)
    bw, bh = x1 - x0, y1 - y0
    if not aligned:  # legacy behaviour: boxes are at least one pixel
        bw, bh = bw.clamp(min=1.0), bh.clamp(min=1.0)
    grid_w, grid_h = bw.ceil().clamp(min=0), bh.ceil().clamp(min=0)  # samples per axis, (K, M)
    wy = _axis_weights(y0, bh, grid_h, h)  # (K, M, H)
    wx = _axis_weights(x0, bw, grid_w, w)  # (K, M, W)
    count = (grid_h * grid_w).clamp(min=1)  # (K, M)
    pooled = torch.einsum("kmh,kchw,kmw->kmc", wy, features.to(dtype), wx)  # (K, M, C)
    return (pooled / count[..., None]).to(features.dtype)


def local_grid_boxes(n: int = LOCAL_GRID) -> torch.Tensor:
    """The n x n equal boxes of the unit square, normalized xyxy, (n*n, 4); x outer, y inner (public order)."""
    step = 1.0 / n
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")  # i: x index, j: y index
    x0, y0 = i.flatten() * step, j.flatten() * step  # (n*n,)
    return torch.stack((x0, y0, x0 + step, y0 + step), dim=-1).float()


# --------------------------------------------------------------------------------- OpenCLIP -> HF keys
_BLOCK_RENAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_TOP_RENAMES = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
_RESBLOCK = "visual.transformer.resblocks."


def open_clip_visual_to_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP ``visual.*`` keys -> ``CLIPVisionModelWithProjection`` keys; other keys (text tower) are dropped.

    ``attn.in_proj_{weight,bias}`` (3W, ...) is split into q/k/v; ``visual.proj`` (W, P) is transposed into
    ``visual_projection.weight`` (P, W). Unknown ``visual.*`` keys raise ``ValueError`` naming them.
    """
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        if not key.startswith("visual."):
            continue
        if key in _TOP_RENAMES:
            out[_TOP_RENAMES[key]] = value
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.t().contiguous()  # (W, P) -> (P, W)
        elif key.startswith(_RESBLOCK):
            layer, _, rest = key[len(_RESBLOCK):].partition(".")
            prefix = f"vision_model.encoder.layers.{layer}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[-1]  # weight | bias
                # (3W, ...) -> 3 x (W, ...) in q, k, v order
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}.{kind}"] = part.contiguous()
                continue
            module, _, param = rest.rpartition(".")
            if module not in _BLOCK_RENAMES:
                unknown.append(key)
                continue
            out[f"{prefix}{_BLOCK_RENAMES[module]}.{param}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"state_dict has OpenCLIP visual keys with no HF counterpart: {sorted(unknown)}")
    return out


_TOP_INVERSE = {hf: oc for oc, hf in _TOP_RENAMES.items()}
_BLOCK_INVERSE = {hf: oc for oc, hf in _BLOCK_RENAMES.items()}
_LAYERS = "vision_model.encoder.layers."


def hf_to_open_clip_visual(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``CLIPVisionModelWithProjection`` keys -> OpenCLIP ``visual.*`` keys; inverse of ``open_clip_visual_to_hf``.

    q/k/v (W, ...) each are concatenated into ``attn.in_proj_{weight,bias}`` (3W, ...); ``visual_projection.weight``
    (P, W) is transposed into ``visual.proj`` (W, P); ``position_ids`` is dropped. Unknown keys raise
    ``ValueError`` naming them, as do layers with only some of q/k/v.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (layer, weight|bias) -> {q|k|v: tensor}
    unknown: list[str] = []
    for key, value in state_dict.items():
        if key.endswith("position_ids"):
            continue
        if key in _TOP_INVERSE:
            out[_TOP_INVERSE[key]] = value
        elif key == "visual_projection.weight":
            out["visual.proj"] = value.t().contiguous()  # (P, W) -> (W, P)
        elif key.startswith(_LAYERS):
            layer, _, rest = key[len(_LAYERS):].partition(".")
            module, _, param = rest.rpartition(".")
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((layer, param), {})[module[len("self_attn.")]] = value
            elif module in _BLOCK_INVERSE:
                out[f"{_RESBLOCK}{layer}.{_BLOCK_INVERSE[module]}.{param}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    for (layer, param), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            unknown.append(f"{_LAYERS}{layer}.self_attn.{{q,k,v}}_proj.{param} (only {sorted(parts)})")
            continue
        # 3 x (W, ...) -> (3W, ...) in q, k, v order
        out[f"{_RESBLOCK}{layer}.attn.in_proj_{param}"] = torch.cat([parts[n] for n in "qkv"], dim=0)
    if unknown:
        raise ValueError(f"state_dict has keys with no OpenCLIP visual counterpart: {sorted(unknown)}")
    return out


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A flat state dict from safetensors or a (CLIPSelf / OpenCLIP) torch checkpoint, ``module.`` stripped."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialization cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and "state_dict" in state:
            state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"path {str(path)!r} holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


# ------------------------------------------------------------------------------------------ the encoder
class SubjectEncoder(nn.Module):
    """Subject images -> (K, 1 + P [+ 16], width) tokens for the Resampler.

    Args:
        vision_model: the CLIP vision tower of the global tokens (ViT-bigG for the real model).
        config: image sizes, the local grid and whether local tokens are on by default.
        local_model: the CLIPSelf-distilled tower of the local tokens; None shares ``vision_model`` until
            ``load_local_checkpoint`` installs a separate copy.
        require_local_model: local tokens need a distilled ``local_model``: computing them without one raises
            (the real model); False lets ``vision_model`` stand in (the tiny preset).
    """

    def __init__(
        self,
        vision_model: CLIPVisionModelWithProjection,
        config: EncoderConfig,
        local_model: CLIPVisionModelWithProjection | None = None,
        require_local_model: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.vision_model = vision_model
        self.local_model = None if local_model is vision_model else local_model
        self.require_local_model = require_local_model
        self.local_source: str | None = None  # the checkpoint the local tower was loaded from (provenance)
        if self.local_model is not None:
            self._check_local_width(self.local_model)

    @property
    def width(self) -> int:
        """Width of the image tokens (1664 for bigG)."""
        return int(self.vision_model.config.hidden_size)

    @property
    def local_encoder(self) -> CLIPVisionModelWithProjection:
        """The tower that produces local tokens (``vision_model`` when no local checkpoint is loaded and
        ``require_local_model`` is off)."""
        self.check_local_encoder()
        return self.vision_model if self.local_model is None else self.local_model

    def set_local_grid(self, n: int) -> None:
        """Local tokens per subject: ``n`` x ``n`` roi cells (4 in the paper; 2 and 8 in its Table 6). A relation
        LoRA is meant to be used with the grid it was trained with (its card's ``config.local_grid``)."""
        if self.config.local_grid != n:
            self.config = replace(self.config, local_grid=n)

    def check_local_encoder(self) -> None:
        """Raise ``ValueError`` if local tokens cannot be made: a real model with no distilled local tower."""
        if self.local_model is None and self.require_local_model:
            raise ValueError(
                "local tokens are on but no distilled local encoder is loaded (local_encoder=None): pass "
                "--local-encoder (a `train distill-encoder` output or the authors' epoch_6.pt), or turn local "
                "tokens off (--no-local-tokens, use_local_tokens=False)")

    def _check_local_width(self, model: CLIPVisionModelWithProjection) -> None:
        if model.config.hidden_size != self.width:
            raise ValueError(
                f"local_model width {model.config.hidden_size} must equal vision_model width {self.width}"
            )

    # ------------------------------------------------------------------------------ preprocessing
    def preprocess(self, images: Sequence[Image.Image], size: int) -> torch.Tensor:
        """RGB -> bicubic resize to ``subject_resize`` square -> bicubic resize to ``size`` -> OpenAI CLIP norm.

        Equals ``CLIPImageProcessor(size=size, crop_size=size)`` (PIL backend) on the 512x512 image, as in the
        public inference script. Returns float32 (K, 3, size, size) on the CPU.
        """
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        if len(images) == 0:
            raise ValueError("images must hold at least one PIL image, got an empty sequence")
        side = self.config.subject_resize
        batch = []
        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise ValueError(f"images[{i}] must be a PIL.Image.Image, got {type(image).__name__}")
            image = image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
            image = image.resize((size, size), Image.Resampling.BICUBIC)
            batch.append(np.asarray(image, dtype=np.float32) / 255.0)  # (size, size, 3)
        # (K, size, size, 3) -> (K, 3, size, size)
        pixels = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
        mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
        return ((pixels - mean) / std).contiguous()

    # ------------------------------------------------------------------------------------ tokens
    @staticmethod
    def _last_block_input(model: CLIPVisionModelWithProjection, pixel_values: torch.Tensor) -> torch.Tensor:
        """Input of the last encoder layer, i.e. ``hidden_states[-2]``: (K, 1 + P, width).

        Captured with a pre-hook on the last layer so that the 49 hidden states of bigG at 896 px are not all
        kept in memory.
        """
        captured: list[torch.Tensor] = []

        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured.append(args[0] if args else kwargs["hidden_states"])

        tower = model.vision_model
        param = next(model.parameters())
        pixel_values = pixel_values.to(device=param.device, dtype=param.dtype)
        handle = tower.encoder.layers[-1].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            model(pixel_values=pixel_values, interpolate_pos_encoding=True)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(f"expected the last CLIP layer to run once, it ran {len(captured)} times")
        return captured[0]

    def global_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(K, 3, S, S) at ``image_size`` -> (K, 1 + P, width): penultimate hidden states of ``vision_model``."""
        return self._last_block_input(self.vision_model, pixel_values)

    def dense_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(K, 3, S, S) -> (K, width, g, g) L2-normalized MaskCLIP-style patch features of the local tower."""
        model = self.local_encoder
        tower = model.vision_model
        x = self._last_block_input(model, pixel_values)  # (K, 1 + g*g, width)
        block = tower.encoder.layers[-1]
        # value path only: no q.k attention, so every token keeps its own (local) content
        x = x + block.self_attn.out_proj(block.self_attn.v_proj(block.layer_norm1(x)))
        x = x + block.mlp(block.layer_norm2(x))
        patches = F.normalize(tower.post_layernorm(x[:, 1:]), dim=-1)  # (K, g*g, width), CLS dropped
        k, n, c = patches.shape
        g = math.isqrt(n)
        if g * g != n:
            raise ValueError(f"pixel_values must give a square patch grid, got {n} patches")
        # (K, g*g, C) -> (K, g, g, C) -> (K, C, g, g)
        return patches.view(k, g, g, c).permute(0, 3, 1, 2)

    def local_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(K, 3, S, S) at ``local_image_size`` -> (K, n*n, width), n = ``config.local_grid``: roi-aligned cells
        of each image's own map."""
        features = self.dense_features(pixel_values)  # (K, C, g, g)
        k, _, h, w = features.shape
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=features.device)
        # (n*n, 4) normalized -> (K, n*n, 4) feature pixels: one box list per image
        boxes = (local_grid_boxes(self.config.local_grid).to(features.device) * scale).expand(k, -1, -1)
        return roi_align_1x1(features, boxes, aligned=True)

    def forward(self, images: Sequence[Image.Image], use_local_tokens: bool | None = None) -> torch.Tensor:
        """K subject images -> (K, T, width); T = 1 + P, plus ``local_grid**2`` (16) local tokens when
        ``use_local_tokens`` (default ``config.use_local_tokens``)."""
        use_local = self.config.use_local_tokens if use_local_tokens is None else use_local_tokens
        if use_local:
            self.check_local_encoder()  # before any work: the real model has no undistilled fallback
        tokens = self.global_tokens(self.preprocess(images, self.config.image_size))  # (K, 1 + P, width)
        if not use_local:
            return tokens
        local = self.local_tokens(self.preprocess(images, self.config.local_image_size))  # (K, n*n, width)
        return torch.cat((tokens, local.to(tokens.dtype)), dim=1)

    # ------------------------------------------------------------------------------------ loading
    def load_local_checkpoint(self, path: str | Path) -> CLIPVisionModelWithProjection:
        """Install the CLIPSelf local tower from ``path`` and return it.

        Accepts a CLIPSelf / OpenCLIP torch checkpoint (``{"epoch", "name", "state_dict", "optimizer"}``, keys
        maybe prefixed ``module.``; only ``visual.*`` keys are used: the authors' ``epoch_6.pt`` with its text
        tower and optimizer state loads as is), a safetensors file in HF key names, or a ``train distill-encoder``
        output folder (``local_checkpoint_file``). The weights go, with a strict key and shape check, into a copy
        of ``vision_model`` (same device and dtype) unless a separate ``local_model`` is already installed.
        """
        path = local_checkpoint_file(path)
        state = _read_checkpoint(path)
        if any(k.startswith("visual.") for k in state):
            state = open_clip_visual_to_hf(state)
        state = {k: v for k, v in state.items() if not k.endswith("position_ids")}  # non-persistent buffer

        target = self.local_model if self.local_model is not None else copy.deepcopy(self.vision_model)
        expected = target.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        mis_shaped = sorted(
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in set(state) & set(expected)
            if state[k].shape != expected[k].shape
        )
        if missing or unexpected or mis_shaped:
            raise ValueError(
                f"local checkpoint {str(path)!r} does not fit the vision model: missing keys {missing}, "
                f"unexpected keys {unexpected}, mis-shaped keys {mis_shaped}"
            )
        target.load_state_dict(state, strict=True)
        self.local_model = target
        self.local_source = str(path)
        logger.info("loaded local image encoder from %s (%d tensors)", path, len(state))
        return target
