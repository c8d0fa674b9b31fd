"""Grounding Resampler: MS-Diffusion's ID extractor (REFERENCE.md section 2; DreamRelation paper 3.2).

Per subject, 16 learned-from-grounding queries attend (Perceiver style) over that subject's CLIP image tokens
(257 global, plus 16 local tokens when enabled) and become 16 tokens of UNet cross-attention width::

    queries = LN(Linear(GELU(Linear([phrase_embed | fourier(box)]))))      # (16, dim) per subject
    for each layer: queries += PerceiverAttention(proj_in(x), queries); queries += FeedForward(queries)
    tokens  = norm_out(proj_out(attention_norm(queries)))                  # (16, output_dim)

Module and parameter names follow MS-Diffusion's ``Resampler`` exactly so that the ``image_proj`` entry of
``ms_adapter.bin`` loads with a strict key check. There is no positional embedding: the output does not depend
on the order of the input tokens.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .config import ResamplerConfig

logger = logging.getLogger(__name__)

__all__ = ["PerceiverAttention", "Resampler", "feed_forward", "fourier_box_embedding"]

BOX_COORDS = 4  # normalized x0, y0, x1, y1


def fourier_box_embedding(boxes: torch.Tensor, num_freqs: int = 8, temperature: float = 100.0) -> torch.Tensor:
    """Fourier features of boxes as in GLIGEN / MS-Diffusion's ``FourierEmbedder``.

    ``freq_f = temperature ** (f / num_freqs)``; the output is ordered (freq, sin/cos, coord): entry
    ``f * 8 + s * 4 + c`` is ``sin`` (s=0) or ``cos`` (s=1) of ``freq_f * boxes[..., c]``.
    Computed in float32 and returned in the dtype of ``boxes``.

    Args:
        boxes: (..., 4) normalized xyxy.
    Returns:
        (..., 8 * num_freqs).
    """
    if boxes.shape[-1] != BOX_COORDS:
        raise ValueError(f"boxes must end in 4 coordinates (x0, y0, x1, y1), got shape {tuple(boxes.shape)}")
    if num_freqs <= 0:
        raise ValueError(f"num_freqs must be positive, got {num_freqs}")
    freqs = temperature ** (torch.arange(num_freqs, device=boxes.device, dtype=torch.float32) / num_freqs)  # (F,)
    # (..., 4, 1) * (F,) -> (..., 4, F)
    angles = boxes.float().unsqueeze(-1) * freqs
    # (..., 4, F) -> (..., 4, F, 2): last axis sin, cos
    emb = torch.stack((angles.sin(), angles.cos()), dim=-1)
    # (..., 4, F, 2) -> (..., F, 2, 4): order (freq, sin/cos, coord), like MS-Diffusion's permute(0, 2, 3, 1)
    emb = emb.movedim(-3, -1)
    # (..., F, 2, 4) -> (..., 8F)
    return emb.flatten(-3).to(boxes.dtype)


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """LN -> Linear(dim, dim*mult) -> GELU -> Linear(dim*mult, dim), no biases (keys ``0``, ``1``, ``3``)."""
    inner = dim * mult
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner, bias=False),
        nn.GELU(),
        nn.Linear(inner, dim, bias=False),
    )


class PerceiverAttention(nn.Module):
    """Queries from the latents; keys and values from ``cat(x, latents)`` (Flamingo's Perceiver resampler).

    Both q and k are scaled by ``dim_head ** -0.25`` before the product (fp16-friendly) and the softmax runs
    in float32, as in MS-Diffusion / IP-Adapter.
    """

    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        self.dim_head = dim_head
        self.heads = heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)  # on the image tokens x
        self.norm2 = nn.LayerNorm(dim)  # on the latents
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        # (b, n, heads * d) -> (b, n, heads, d) -> (b, heads, n, d)
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x: (b, n1, dim) image tokens; latents: (b, n2, dim) -> (b, n2, dim) (residual not added)."""
        x = self.norm1(x)
        latents = self.norm2(latents)
        b, n2, _ = latents.shape

        q = self._split_heads(self.to_q(latents))  # (b, heads, n2, d)
        # (b, n1 + n2, dim) -> 2 x (b, n1 + n2, heads * d)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        k, v = self._split_heads(k), self._split_heads(v)  # (b, heads, n1 + n2, d)

        scale = self.dim_head**-0.25
        weight = (q * scale) @ (k * scale).transpose(-2, -1)  # (b, heads, n2, n1 + n2)
        weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
        out = weight @ v  # (b, heads, n2, d)
        # (b, heads, n2, d) -> (b, n2, heads, d) -> (b, n2, heads * d)
        out = out.transpose(1, 2).reshape(b, n2, self.heads * self.dim_head)
        return self.to_out(out)


class Resampler(nn.Module):
    """MS-Diffusion's grounding Resampler: (B, N, T, embedding_dim) image tokens -> (B, N*Q, output_dim).

    Each of the N subjects is resampled on its own: its Q = ``num_queries`` queries come from its phrase
    embedding and box (``grounding``) or, when those are absent or dropped, from the learned
    ``grounding_latents``.
    """

    def __init__(self, config: ResamplerConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.grounding_latents = nn.Parameter(torch.randn(1, c.num_queries, c.dim) / c.dim**0.5)
        grounding_dim = c.phrase_dim + 2 * BOX_COORDS * c.fourier_freqs  # 768 + 64 = 832
        # MS-Diffusion's hidden width is 2 x grounding_dim (= 1664 for the real model).
        self.latent_proj = nn.Sequential(
            nn.Linear(grounding_dim, 2 * grounding_dim),
            nn.GELU(),
            nn.Linear(2 * grounding_dim, c.num_queries * c.dim),
        )
        self.latent_norm = nn.LayerNorm(c.dim)
        self.proj_in = nn.Linear(c.embedding_dim, c.dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(c.dim, c.dim_head, c.heads), feed_forward(c.dim, c.ff_mult)])
            for _ in range(c.depth)
        )
        self.attention_norm = nn.LayerNorm(c.dim)
        self.proj_out = nn.Linear(c.dim, c.output_dim)
        self.norm_out = nn.LayerNorm(c.output_dim)

    def grounded_latents(self, phrase_embeds: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """(M, phrase_dim), (M, 4) -> (M, Q, dim): queries from ``[phrase | fourier(box)]``."""
        c = self.config
        fourier = fourier_box_embedding(boxes, c.fourier_freqs).to(phrase_embeds.dtype)  # (M, 8F)
        grounding = torch.cat((phrase_embeds, fourier), dim=-1)  # (M, phrase_dim + 8F), phrase first
        latents = self.latent_proj(grounding)  # (M, Q * dim)
        # (M, Q * dim) -> (M, Q, dim)
        latents = latents.view(-1, c.num_queries, c.dim)
        return self.latent_norm(latents)

    def _check_inputs(
        self,
        image_tokens: torch.Tensor,
        phrase_embeds: torch.Tensor | None,
        boxes: torch.Tensor | None,
        drop_grounding: torch.Tensor | None,
    ) -> None:
        c = self.config
        if image_tokens.ndim != 4 or image_tokens.shape[-1] != c.embedding_dim:
            raise ValueError(
                f"image_tokens must be (B, N, T, {c.embedding_dim}), got shape {tuple(image_tokens.shape)}"
            )
        if (phrase_embeds is None) != (boxes is None):
            raise ValueError(
                "phrase_embeds and boxes must be given together or both be None, got "
                f"phrase_embeds={'None' if phrase_embeds is None else tuple(phrase_embeds.shape)}, "
                f"boxes={'None' if boxes is None else tuple(boxes.shape)}"
            )
        b, n = image_tokens.shape[:2]
        if phrase_embeds is not None and tuple(phrase_embeds.shape) != (b, n, c.phrase_dim):
            raise ValueError(
                f"phrase_embeds must be (B, N, phrase_dim) = {(b, n, c.phrase_dim)}, got {tuple(phrase_embeds.shape)}"
            )
        if boxes is not None and tuple(boxes.shape) != (b, n, BOX_COORDS):
            raise ValueError(f"boxes must be (B, N, 4) = {(b, n, BOX_COORDS)}, got {tuple(boxes.shape)}")
        if drop_grounding is not None and tuple(drop_grounding.shape) not in ((b,), (b, n)):
            raise ValueError(f"drop_grounding must be (B,) or (B, N) = {(b, n)}, got {tuple(drop_grounding.shape)}")

    def forward(
        self,
        image_tokens: torch.Tensor,
        phrase_embeds: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        *,
        drop_grounding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Resample every subject's image tokens into Q tokens of width ``output_dim``.

        Args:
            image_tokens: (B, N, T, embedding_dim); N subjects, T tokens per subject image (257, or 257 + 16).
            phrase_embeds: (B, N, phrase_dim) pooled CLIP-L embedding of each subject's phrase, or None.
            boxes: (B, N, 4) normalized xyxy, or None. With ``phrase_embeds`` None both are None and the
                learned ``grounding_latents`` are the queries.
            drop_grounding: optional bool (B,) or (B, N); True replaces that subject's grounded queries by
                ``grounding_latents`` (MS-Diffusion's ``drop_grounding_tokens``, used when training).
        Returns:
            (B, N * Q, output_dim), subject-major (subject j owns rows ``j*Q:(j+1)*Q``).
        """
        self._check_inputs(image_tokens, phrase_embeds, boxes, drop_grounding)
        c = self.config
        b, n, t, e = image_tokens.shape
        # (B, N, T, E) -> (B*N, T, E): each subject is resampled on its own
        x = image_tokens.reshape(b * n, t, e)

        learned = self.grounding_latents.to(x.dtype).expand(b * n, -1, -1)  # (B*N, Q, dim)
        if phrase_embeds is None:
            latents = learned
        else:
            # (B, N, P) -> (B*N, P); (B, N, 4) -> (B*N, 4)
            latents = self.grounded_latents(phrase_embeds.reshape(b * n, -1), boxes.reshape(b * n, BOX_COORDS))
            latents = latents.to(x.dtype)
            if drop_grounding is not None:
                drop = drop_grounding.to(torch.bool)
                drop = drop[:, None].expand(b, n) if drop.ndim == 1 else drop  # (B, N)
                # (B, N) -> (B*N, 1, 1)
                latents = torch.where(drop.reshape(b * n, 1, 1), learned, latents)

        x = self.proj_in(x)  # (B*N, T, dim)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents

        out = self.norm_out(self.proj_out(self.attention_norm(latents)))  # (B*N, Q, output_dim)
        # (B*N, Q, output_dim) -> (B, N*Q, output_dim)
        return out.reshape(b, n * c.num_queries, c.output_dim)
