"""Masked parallel cross-attention (MS-Diffusion layout attention, DreamRelation paper eq. 4).

Every UNet cross-attention sees the text tokens and, as a separate named argument, the image tokens
``[4 dummy | 16 per subject]`` (REFERENCE.md section 2)::

    out = to_out(softmax(Q K_t^T) V_t + gamma * inside_any * softmax(Q K_i^T + bias) V_i)

``bias`` is -10000 where a latent pixel may not see an image token: subject j's tokens are visible only inside
box j, the dummy tokens only outside every box; ``inside_any`` zeroes the image term outside every box. Boxes are
rasterised on each layer's own (h, w) grid, derived from the UNet input latent size, so non-square latents work
(the public code takes ``sqrt(L)``).

Opt-in attention capture (training's relation-attention loss): attach an :class:`AttentionCapture` to the
processors (``proc.capture = capture``, or the :func:`capture_attention` context manager) and every text
cross-attention at a wanted (h, w) also records the softmax probabilities of chosen text tokens, averaged over
heads and tokens, as a (B, h, w) map with its graph. Without a capture nothing changes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .config import NUM_DUMMY_TOKENS, TOKENS_PER_SUBJECT

MASK_VALUE = -10000.0  # additive bias of a hidden image token (as in MS-Diffusion)
GRID_EPS = 1e-4  # box edges within this many pixels of a grid line are snapped to it (float noise)

__all__ = [
    "GRID_EPS",
    "MASK_VALUE",
    "AttentionCapture",
    "MaskedParallelAttnProcessor",
    "box_masks",
    "capture_attention",
    "image_attention_bias",
    "layer_hw",
    "text_attention_probs",
]


def layer_hw(latent_hw: Sequence[int] | None, seq_len: int) -> tuple[int, int]:
    """(h, w) of a UNet layer holding ``seq_len`` pixels, for a UNet input latent of size ``latent_hw``.

    diffusers' stride-2 downsampling maps a side s to ceil(s / 2), so the latent size is halved with ceil until
    h * w == seq_len. With ``latent_hw=None`` the layer is assumed square.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    if latent_hw is None:
        side = math.isqrt(seq_len)
        if side * side != seq_len:
            raise ValueError(
                f"latent_hw is None, so the layer is assumed square, but L={seq_len} is not a square number; "
                "pass latent_hw=(H, W) of the UNet input latent"
            )
        return side, side
    try:
        h, w = (int(v) for v in latent_hw)
    except (TypeError, ValueError):
        raise ValueError(f"latent_hw must be a pair (H, W) of positive integers, got {latent_hw!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"latent_hw must be a pair (H, W) of positive integers, got {latent_hw!r}")
    while h * w > seq_len and (h, w) != (1, 1):
        h, w = (h + 1) // 2, (w + 1) // 2  # ceil(s / 2): conv k=3, stride 2, padding 1
    if h * w != seq_len:
        raise ValueError(
            f"latent_hw={tuple(latent_hw)!r} has no stride-2 level with L={seq_len} tokens; "
            "latent_hw must be the (H, W) of the UNet input latent"
        )
    return h, w


def box_masks(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Rasterise normalised xyxy boxes (B, N, 4) on an h x w grid -> bool (B, N, h*w), row-major.

    Pixel columns ``floor(x0 * w) <= c < ceil(x1 * w)`` and rows likewise with h (REFERENCE.md section 2).
    Products within ``GRID_EPS`` of a grid line snap to it, so float noise (``float32(7/13) * 13 = 7.0000005``)
    does not add a column. An all-zero box covers no pixel.
    """
    if not isinstance(boxes, torch.Tensor) or boxes.ndim != 3 or boxes.shape[-1] != 4:
        shape = tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__
        raise ValueError(f"boxes must be a tensor of shape (B, N, 4) in normalised xyxy, got {shape}")
    boxes = boxes.float()
    x0, y0, x1, y1 = boxes.unbind(-1)  # each (B, N)
    xs, xe = torch.floor(x0 * w + GRID_EPS).clamp(0, w), torch.ceil(x1 * w - GRID_EPS).clamp(0, w)
    ys, ye = torch.floor(y0 * h + GRID_EPS).clamp(0, h), torch.ceil(y1 * h - GRID_EPS).clamp(0, h)
    cols = torch.arange(w, device=boxes.device, dtype=boxes.dtype)  # (w,)
    rows = torch.arange(h, device=boxes.device, dtype=boxes.dtype)  # (h,)
    in_x = (cols >= xs[..., None]) & (cols < xe[..., None])  # (B, N, w)
    in_y = (rows >= ys[..., None]) & (rows < ye[..., None])  # (B, N, h)
    grid = in_y[..., :, None] & in_x[..., None, :]  # (B, N, h, w)
    return grid.flatten(2)  # (B, N, h, w) -> (B, N, h*w)


def image_attention_bias(
    boxes: torch.Tensor,
    h: int,
    w: int,
    num_dummy: int = NUM_DUMMY_TOKENS,
    tokens_per_subject: int = TOKENS_PER_SUBJECT,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive attention bias of latent pixels over image tokens, and the in-any-box mask.

    Returns ``bias`` (B, 1, L, T) with 0 where visible and -10000 elsewhere (T = num_dummy + tokens_per_subject * N;
    subject j only inside box j, dummy tokens only outside every box) and ``inside_any`` (B, L, 1), 1.0 for pixels
    inside at least one box. Every pixel sees at least one token, so the softmax is always defined.
    """
    masks = box_masks(boxes, h, w)  # (B, N, L)
    inside_any = masks.any(dim=1)  # (B, L)
    dummy = (~inside_any)[..., None].expand(-1, -1, num_dummy)  # (B, L) -> (B, L, num_dummy)
    subjects = masks.transpose(1, 2).repeat_interleave(tokens_per_subject, dim=2)  # (B, N, L) -> (B, L, N*16)
    visible = torch.cat([dummy, subjects], dim=2)  # (B, L, T)
    bias = torch.zeros(visible.shape, dtype=dtype, device=boxes.device).masked_fill_(~visible, MASK_VALUE)
    return bias[:, None], inside_any[..., None].to(dtype)  # (B, 1, L, T), (B, L, 1)


def layout_masks(
    boxes: torch.Tensor, latent_hw: Sequence[int], dtype: torch.dtype = torch.float32, levels: int = 4
) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """:func:`image_attention_bias` for the latent grid and each of its ``levels`` halvings, keyed by (h, w).

    A pipeline computes these once per call and passes them as ``ip_masks``, so that the 70 attention layers of
    every denoising step reuse them instead of rebuilding the masks (on a GPU at batch 1 the small mask kernels
    otherwise cost as much as the attention itself).
    """
    h, w = int(latent_hw[0]), int(latent_hw[1])
    out = {}
    for _ in range(levels + 1):
        out[(h, w)] = image_attention_bias(boxes, h, w, dtype=dtype)
        h, w = -(-h // 2), -(-w // 2)  # ceil: diffusers' stride-2 downsampling
    return out


def _gamma(
    ip_scale: float | torch.Tensor | None, default: float, batch: int, device: torch.device, dtype: torch.dtype
) -> float | torch.Tensor:
    """Image-branch weight: a float, or a (B, 1, 1) tensor for a per-sample gamma."""
    if ip_scale is None:
        return default
    if isinstance(ip_scale, torch.Tensor):
        if ip_scale.numel() == 1:
            return ip_scale.reshape(1, 1, 1).to(device=device, dtype=dtype)
        if ip_scale.ndim != 1 or ip_scale.shape[0] != batch:
            raise ValueError(f"ip_scale must be a float or a ({batch},) tensor, got shape {tuple(ip_scale.shape)}")
        return ip_scale.to(device=device, dtype=dtype).view(batch, 1, 1)  # (B,) -> (B, 1, 1)
    return float(ip_scale)


class MaskedParallelAttnProcessor(nn.Module):
    """diffusers attention processor: text attention + gamma * box-masked image attention (paper eq. 4).

    With ``hidden_size`` and ``cross_attention_dim`` it owns ``to_k_ip`` / ``to_v_ip`` (the MS-Diffusion
    ``ms_adapter`` keys); without them it has no parameters and computes plain attention, ignoring the image
    arguments (installed on the self-attention layers so the processor list matches the checkpoint's 140 entries).
    """

    def __init__(self, hidden_size: int | None = None, cross_attention_dim: int | None = None, scale: float = 0.6):
        super().__init__()
        if (hidden_size is None) != (cross_attention_dim is None):
            raise ValueError(
                "hidden_size and cross_attention_dim must be given together, got "
                f"hidden_size={hidden_size!r}, cross_attention_dim={cross_attention_dim!r}"
            )
        for name, value in (("hidden_size", hidden_size), ("cross_attention_dim", cross_attention_dim)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        self.hidden_size = hidden_size
        self.cross_attention_dim = cross_attention_dim
        self.scale = float(scale)
        self.capture: AttentionCapture | None = None  # opt-in recording of text attention maps (training)
        self.to_k_ip: nn.Linear | None = None
        self.to_v_ip: nn.Linear | None = None
        if hidden_size is not None and cross_attention_dim is not None:
            self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
            self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)

    @property
    def has_image_branch(self) -> bool:
        return self.to_k_ip is not None

    # Defined directly (as diffusers' IPAdapterAttnProcessor2_0): Attention.forward passes only the
    # cross_attention_kwargs named in this signature.
    def __call__(  # type: ignore[override]
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        ip_hidden_states: torch.Tensor | None = None,
        ip_boxes: torch.Tensor | None = None,
        latent_hw: Sequence[int] | None = None,
        ip_scale: float | torch.Tensor | None = None,
        ip_masks: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Attention of ``attn`` on ``hidden_states``; image tokens (B, 4 + 16N, D) and boxes (B, N, 4) optional.

        ``ip_masks``: optional :func:`layout_masks` of ``ip_boxes`` (precomputed once per pipeline call).
        """
        residual = hidden_states
        is_cross = encoder_hidden_states is not None
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            # (B, C, H, W) -> (B, H*W, C)
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            # (B*heads, 1 or L, S) -> (B, heads, 1 or L, S)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)  # (B, L, C)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)  # (B, S, C)
        value = attn.to_v(encoder_hidden_states)  # (B, S, C)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, L, C) -> (B, heads, L, d)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, S, C) -> (B, heads, S, d)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, S, C) -> (B, heads, S, d)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        capture = getattr(self, "capture", None)
        if capture is not None and is_cross:
            grid = (height, width) if input_ndim == 4 else layer_hw(latent_hw, query.shape[2])
            if capture.wants(grid):
                capture.record(text_attention_probs(query, key, attention_mask), grid)

        # text (or self) attention over every token of encoder_hidden_states -> (B, heads, L, d)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)  # (B, heads, L, d) -> (B, L, C)
        out = out.to(query.dtype)

        if self.has_image_branch and ip_hidden_states is not None:
            gamma = _gamma(ip_scale, self.scale, batch_size, query.device, query.dtype)
            if not (isinstance(gamma, float) and gamma == 0.0):
                # a 4-d input carries its own grid; a sequence needs latent_hw to recover it
                grid = (height, width) if input_ndim == 4 else layer_hw(latent_hw, query.shape[2])
                masks = ip_masks.get(grid) if ip_masks else None
                out = out + gamma * self._image_attention(attn, query, ip_hidden_states, ip_boxes, grid, head_dim,
                                                          masks)

        out = attn.to_out[0](out)  # linear proj
        out = attn.to_out[1](out)  # dropout
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)  # (B, L, C) -> (B, C, H, W)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _image_attention(
        self,
        attn: nn.Module,
        query: torch.Tensor,
        ip_hidden_states: torch.Tensor,
        ip_boxes: torch.Tensor | None,
        grid: tuple[int, int],
        head_dim: int,
        masks: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """inside_any * box-masked image attention on the layer's (h, w) ``grid``: (B, L, C), before to_out."""
        assert self.to_k_ip is not None and self.to_v_ip is not None
        batch_size = query.shape[0]
        if ip_hidden_states.ndim != 3 or ip_hidden_states.shape[0] != batch_size:
            raise ValueError(
                f"ip_hidden_states must have shape ({batch_size}, 4 + 16 * N, D), got {tuple(ip_hidden_states.shape)}"
            )
        if ip_boxes is None:
            raise ValueError("ip_boxes is None, but ip_hidden_states was given; pass boxes of shape (B, N, 4)")
        if not isinstance(ip_boxes, torch.Tensor):
            ip_boxes = torch.as_tensor(ip_boxes, dtype=torch.float32)
        if ip_boxes.ndim != 3 or ip_boxes.shape[0] != batch_size or ip_boxes.shape[-1] != 4:
            raise ValueError(f"ip_boxes must have shape ({batch_size}, N, 4), got {tuple(ip_boxes.shape)}")
        num_tokens = NUM_DUMMY_TOKENS + TOKENS_PER_SUBJECT * ip_boxes.shape[1]
        if ip_hidden_states.shape[1] != num_tokens:
            raise ValueError(
                f"ip_hidden_states has {ip_hidden_states.shape[1]} tokens, but ip_boxes holds {ip_boxes.shape[1]} "
                f"subjects, which needs {NUM_DUMMY_TOKENS} + {TOKENS_PER_SUBJECT} * {ip_boxes.shape[1]} = {num_tokens}"
            )

        if masks is None:
            masks = image_attention_bias(ip_boxes.to(query.device), *grid, dtype=query.dtype)
        bias, inside_any = masks  # (B, 1, L, T), (B, L, 1)

        ip_hidden_states = ip_hidden_states.to(dtype=self.to_k_ip.weight.dtype)
        ip_key = self.to_k_ip(ip_hidden_states).to(query.dtype)  # (B, T, C)
        ip_value = self.to_v_ip(ip_hidden_states).to(query.dtype)  # (B, T, C)
        ip_key = ip_key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, T, C) -> (B, heads, T, d)
        ip_value = ip_value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, T, C) -> (B, heads, T, d)

        # bias broadcasts over heads -> (B, heads, L, d)
        ip_out = F.scaled_dot_product_attention(query, ip_key, ip_value, attn_mask=bias, dropout_p=0.0)
        ip_out = ip_out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)  # (B, heads, L, d) -> (B, L, C)
        return ip_out.to(query.dtype) * inside_any  # zero outside every box (and for all-zero boxes)


# ------------------------------------------------------------------------------------------------ attention capture
def text_attention_probs(
    query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The probabilities the text attention uses: ``softmax(Q K^T / sqrt(d) + mask)`` over the tokens, in float32.

    query (B, heads, L, d), key (B, heads, S, d), attention_mask broadcastable to (B, heads, L, S) (additive, or
    bool with True = attend, as SDPA takes it) -> (B, heads, L, S). Computed explicitly: SDPA returns no weights.
    """
    logits = query.float() @ key.float().transpose(-1, -2) * query.shape[-1] ** -0.5  # (B, heads, L, S)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attention_mask, float("-inf"))
        else:
            logits = logits + attention_mask.float()
    return logits.softmax(dim=-1)


class AttentionCapture:
    """Collects text cross-attention maps of chosen tokens, with gradients, from :class:`MaskedParallelAttnProcessor`.

    Args:
        token_indices: positions in the text sequence (BOS at 0), e.g. from
            :func:`dreamrelation.train.losses.relation_token_indices`: a list of ints (every sample), one list per
            sample (lengths may differ) or an integer tensor (n,) or (B, n).
        resolutions: the layer grids (h, w) to record (the public code: the 32 x 32 layers of a 128 x 128 latent);
            ``None`` records every text cross-attention.

    Each recorded layer appends (B, h, w) float32 to :attr:`maps`: the probability of the chosen tokens, averaged
    over heads and tokens; :attr:`grids` holds the matching (h, w).
    """

    def __init__(
        self,
        token_indices: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
        resolutions: Iterable[tuple[int, int]] | None = None,
    ):
        self.index, self.weight = self._index_table(token_indices)  # (B or 1, n) long, (B or 1, n) float
        self.resolutions: frozenset[tuple[int, int]] | None = None
        if resolutions is not None:
            try:
                self.resolutions = frozenset((int(h), int(w)) for h, w in resolutions)
            except (TypeError, ValueError):
                raise ValueError(f"resolutions must be (h, w) pairs or None, got {resolutions!r}") from None
        self.maps: list[torch.Tensor] = []
        self.grids: list[tuple[int, int]] = []
        self.seen: set[tuple[int, int]] = set()

    @staticmethod
    def _index_table(token_indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Token positions -> a padded (B or 1, n) index table and its (B or 1, n) 0/1 weights."""
        if isinstance(token_indices, torch.Tensor):
            if token_indices.is_floating_point() or token_indices.ndim not in (1, 2) or token_indices.numel() == 0:
                raise ValueError(
                    f"token_indices must be a non-empty integer tensor (n,) or (B, n), got "
                    f"{token_indices.dtype} {tuple(token_indices.shape)}"
                )
            rows = token_indices.long().reshape(-1, token_indices.shape[-1]).tolist()  # (n,) -> (1, n)
        else:
            rows = list(token_indices)
            if rows and all(isinstance(i, int) and not isinstance(i, bool) for i in rows):
                rows = [rows]
            rows = [list(r) if isinstance(r, (list, tuple)) else r for r in rows]
            if not rows or any(not isinstance(r, list) or not r for r in rows):
                raise ValueError(
                    f"token_indices must be a non-empty list of ints or of int lists, got {token_indices!r}"
                )
        width = max(len(r) for r in rows)
        index = torch.zeros(len(rows), width, dtype=torch.long)
        weight = torch.zeros(len(rows), width)
        for b, r in enumerate(rows):
            if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in r):
                raise ValueError(f"token_indices must hold integers >= 0, got {r!r}")
            index[b, : len(r)] = torch.tensor(r, dtype=torch.long)
            weight[b, : len(r)] = 1.0
        return index, weight

    def wants(self, grid: tuple[int, int]) -> bool:
        self.seen.add(grid)
        return self.resolutions is None or grid in self.resolutions

    def record(self, probs: torch.Tensor, grid: tuple[int, int]) -> None:
        """Append the map of the chosen tokens: probs (B, heads, L, S) -> (B, h, w)."""
        b, _, length, num_tokens = probs.shape
        h, w = grid
        if h * w != length:
            raise ValueError(f"grid {grid} does not hold the {length} query positions of the attention")
        if self.index.shape[0] not in (1, b):
            raise ValueError(
                f"token_indices has {self.index.shape[0]} rows, but the attention batch is {b} "
                "(classifier-free guidance doubles it); pass one row per sample or a single list"
            )
        if int(self.index.max()) >= num_tokens:
            raise ValueError(f"token_indices reach {int(self.index.max())}, but the text has {num_tokens} tokens")
        index = self.index.to(probs.device).expand(b, -1)  # (B, n)
        weight = self.weight.to(probs.device).expand(b, -1)  # (B, n)
        mean_heads = probs.mean(dim=1)  # (B, heads, L, S) -> (B, L, S)
        cols = torch.gather(mean_heads, 2, index[:, None, :].expand(-1, length, -1))  # (B, L, n)
        per_pixel = (cols * weight[:, None, :]).sum(-1) / weight.sum(-1, keepdim=True)  # (B, L)
        self.maps.append(per_pixel.view(b, h, w))  # row-major (B, L) -> (B, h, w)
        self.grids.append((h, w))

    def clear(self) -> None:
        self.maps.clear()
        self.grids.clear()

    def mean_map(self, size: tuple[int, int] | None = None) -> torch.Tensor:
        """The mean of the recorded maps, each resized (bilinear) to ``size`` (default: the largest grid): (B, h, w)."""
        if not self.maps:
            raise ValueError(
                f"no attention map was recorded: wanted resolutions {sorted(self.resolutions or [])}, "
                f"text cross-attention layers seen {sorted(self.seen)}"
            )
        if size is None:
            size = max(self.grids, key=lambda g: g[0] * g[1])
        size = (int(size[0]), int(size[1]))
        resized = [
            m if tuple(m.shape[-2:]) == size
            else F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
            for m in self.maps
        ]
        return torch.stack(resized).mean(dim=0)


def _processors(target) -> list[MaskedParallelAttnProcessor]:
    """The MaskedParallelAttnProcessor instances of a UNet / adapter (any nn.Module), a dict or an iterable."""
    if isinstance(target, nn.Module):
        found = [m for m in target.modules() if isinstance(m, MaskedParallelAttnProcessor)]
        if not found and hasattr(target, "attn_processors"):
            found = [p for p in target.attn_processors.values() if isinstance(p, MaskedParallelAttnProcessor)]
    elif isinstance(target, dict):
        found = [p for p in target.values() if isinstance(p, MaskedParallelAttnProcessor)]
    else:
        found = [p for p in target if isinstance(p, MaskedParallelAttnProcessor)]
    return list({id(p): p for p in found}.values())


@contextmanager
def capture_attention(
    unet_or_processors,
    token_indices: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    resolutions: Iterable[tuple[int, int]] | None = None,
) -> Iterator[AttentionCapture]:
    """Attach a fresh :class:`AttentionCapture` to every MaskedParallelAttnProcessor for the ``with`` block.

    ``unet_or_processors``: a UNet with the adapter installed, the adapter, a dict or a list of processors. The
    self-attention processors hold the capture too but never record. On exit the previous captures come back.
    Non-square latents need ``latent_hw`` in the UNet's ``cross_attention_kwargs``.
    """
    processors = _processors(unet_or_processors)
    if not processors:
        raise ValueError(
            "unet_or_processors holds no MaskedParallelAttnProcessor; install the ImagePromptAdapter on the UNet first"
        )
    capture = AttentionCapture(token_indices, resolutions)
    previous = [getattr(p, "capture", None) for p in processors]
    for p in processors:
        p.capture = capture
    try:
        yield capture
    finally:
        for p, old in zip(processors, previous):
            p.capture = old
