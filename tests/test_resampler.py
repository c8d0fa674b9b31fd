"""Grounding Resampler: MS-Diffusion key layout, parameter count, shapes, grounding paths, Fourier features."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dreamrelation.model.config import ResamplerConfig
from dreamrelation.model.resampler import (
    PerceiverAttention,
    Resampler,
    fourier_box_embedding,
)

TINY = ResamplerConfig(
    dim=32, depth=2, dim_head=8, heads=4, num_queries=4, embedding_dim=24, output_dim=16, ff_mult=2,
    phrase_dim=12, fourier_freqs=8,
)


def _real_expected_shapes() -> dict[str, tuple[int, ...]]:
    """MS-Diffusion ``image_proj`` keys and shapes of the public checkpoint (REFERENCE.md section 2)."""
    shapes: dict[str, tuple[int, ...]] = {
        "grounding_latents": (1, 16, 1280),
        "latent_proj.0.weight": (1664, 832),
        "latent_proj.0.bias": (1664,),
        "latent_proj.2.weight": (16 * 1280, 1664),
        "latent_proj.2.bias": (16 * 1280,),
        "latent_norm.weight": (1280,),
        "latent_norm.bias": (1280,),
        "proj_in.weight": (1280, 1664),
        "proj_in.bias": (1280,),
        "attention_norm.weight": (1280,),
        "attention_norm.bias": (1280,),
        "proj_out.weight": (2048, 1280),
        "proj_out.bias": (2048,),
        "norm_out.weight": (2048,),
        "norm_out.bias": (2048,),
    }
    for i in range(4):
        p = f"layers.{i}."
        for norm in ("norm1", "norm2"):
            shapes[f"{p}0.{norm}.weight"] = (1280,)
            shapes[f"{p}0.{norm}.bias"] = (1280,)
        shapes[f"{p}0.to_q.weight"] = (1280, 1280)
        shapes[f"{p}0.to_kv.weight"] = (2560, 1280)
        shapes[f"{p}0.to_out.weight"] = (1280, 1280)
        shapes[f"{p}1.0.weight"] = (1280,)
        shapes[f"{p}1.0.bias"] = (1280,)
        shapes[f"{p}1.1.weight"] = (5120, 1280)
        shapes[f"{p}1.3.weight"] = (1280, 5120)
    return shapes


def _meta_real() -> Resampler:
    with torch.device("meta"):
        return Resampler(ResamplerConfig())


def test_real_state_dict_keys_and_shapes_match_ms_diffusion():
    state = _meta_real().state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == _real_expected_shapes()


def test_real_parameter_count():
    assert sum(p.numel() for p in _meta_real().parameters()) == 118_943_616


def _inputs(b: int, n: int, t: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, n, t, TINY.embedding_dim, generator=g)
    phrases = torch.randn(b, n, TINY.phrase_dim, generator=g)
    x0y0 = torch.rand(b, n, 2, generator=g) * 0.5
    boxes = torch.cat((x0y0, x0y0 + 0.4), dim=-1)
    return tokens, phrases, boxes


@pytest.fixture
def model() -> Resampler:
    torch.manual_seed(0)
    return Resampler(TINY).eval()


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("t", [17, 17 + 16])
def test_output_shape(model, n, t):
    tokens, phrases, boxes = _inputs(2, n, t)
    out = model(tokens, phrases, boxes)
    assert out.shape == (2, n * TINY.num_queries, TINY.output_dim)
    assert torch.isfinite(out).all()


def test_subjects_are_resampled_independently(model):
    tokens, phrases, boxes = _inputs(1, 3, 17)
    together = model(tokens, phrases, boxes)
    q = TINY.num_queries
    for j in range(3):
        alone = model(tokens[:, j : j + 1], phrases[:, j : j + 1], boxes[:, j : j + 1])
        torch.testing.assert_close(together[:, j * q : (j + 1) * q], alone, rtol=1e-5, atol=1e-5)


def test_input_token_order_does_not_matter(model):
    """No positional embedding: permuting a subject's image tokens leaves its output unchanged."""
    tokens, phrases, boxes = _inputs(1, 2, 17)
    perm = torch.randperm(17, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(tokens[:, :, perm], phrases, boxes), model(tokens, phrases, boxes))


def test_grounding_latents_path(model):
    tokens, phrases, boxes = _inputs(2, 2, 17)
    free = model(tokens)
    grounded = model(tokens, phrases, boxes)
    assert free.shape == grounded.shape
    assert not torch.allclose(free, grounded)
    # the learned latents do not depend on phrase or box: every subject starts from the same queries
    same_image = tokens[:, :1].expand(-1, 2, -1, -1)
    out = model(same_image)
    q = TINY.num_queries
    torch.testing.assert_close(out[:, :q], out[:, q:])
    # dropping every subject's grounding equals passing none
    torch.testing.assert_close(model(tokens, phrases, boxes, drop_grounding=torch.ones(2, dtype=torch.bool)), free)
    # dropping subject 1 of image 0 only changes those rows
    drop = torch.tensor([[False, True], [False, False]])
    mixed = model(tokens, phrases, boxes, drop_grounding=drop)
    torch.testing.assert_close(mixed[0, q:], free[0, q:])
    torch.testing.assert_close(mixed[0, :q], grounded[0, :q])
    torch.testing.assert_close(mixed[1], grounded[1])


def test_grounded_latents_use_phrase_then_box(model):
    """latent_proj sees [phrase | fourier(box)] in that order."""
    _, phrases, boxes = _inputs(1, 1, 17)
    p, b = phrases[0], boxes[0]
    lin0 = model.latent_proj[0]
    expected = torch.cat((p, fourier_box_embedding(b)), dim=-1) @ lin0.weight.T + lin0.bias
    hidden = model.latent_proj[2](F.gelu(expected)).view(1, TINY.num_queries, TINY.dim)
    torch.testing.assert_close(model.grounded_latents(p, b), model.latent_norm(hidden))


def test_perceiver_attention_matches_sdpa():
    torch.manual_seed(0)
    attn = PerceiverAttention(dim=32, dim_head=8, heads=4)
    x, latents = torch.randn(2, 7, 32), torch.randn(2, 3, 32)
    xn, ln = attn.norm1(x), attn.norm2(latents)
    q = attn.to_q(ln).view(2, 3, 4, 8).transpose(1, 2)
    k, v = attn.to_kv(torch.cat((xn, ln), dim=1)).chunk(2, dim=-1)
    k, v = (t.view(2, 10, 4, 8).transpose(1, 2) for t in (k, v))
    ref = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 3, 32)
    torch.testing.assert_close(attn(x, latents), attn.to_out(ref), rtol=1e-5, atol=1e-5)


def test_fourier_embedding_hand_checked():
    box = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    emb = fourier_box_embedding(box, num_freqs=2, temperature=100.0)
    # freqs 100 ** (0/2) = 1 and 100 ** (1/2) = 10; order (freq, sin/cos, coord)
    expected = [math.sin(c) for c in (0.1, 0.2, 0.3, 0.4)] + [math.cos(c) for c in (0.1, 0.2, 0.3, 0.4)]
    expected += [math.sin(10 * c) for c in (0.1, 0.2, 0.3, 0.4)] + [math.cos(10 * c) for c in (0.1, 0.2, 0.3, 0.4)]
    torch.testing.assert_close(emb, torch.tensor([expected]))


def test_fourier_embedding_default_layout():
    boxes = torch.rand(2, 3, 4)
    emb = fourier_box_embedding(boxes)
    assert emb.shape == (2, 3, 64)
    f, s, c = 5, 1, 2  # entry f*8 + s*4 + c is cos(100 ** (5/8) * box[2])
    torch.testing.assert_close(emb[..., f * 8 + s * 4 + c], torch.cos(100 ** (f / 8) * boxes[..., c]))


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        (dict(image_tokens=torch.zeros(1, 2, 17, 5)), "image_tokens"),
        (dict(image_tokens=torch.zeros(2, 17, 24)), "image_tokens"),
        (dict(image_tokens=torch.zeros(1, 2, 17, 24), phrase_embeds=torch.zeros(1, 2, 12)), "boxes"),
        (dict(image_tokens=torch.zeros(1, 2, 17, 24), phrase_embeds=torch.zeros(1, 3, 12),
              boxes=torch.zeros(1, 2, 4)), "phrase_embeds"),
        (dict(image_tokens=torch.zeros(1, 2, 17, 24), phrase_embeds=torch.zeros(1, 2, 12),
              boxes=torch.zeros(1, 2, 2)), "boxes"),
    ],
)
def test_bad_inputs_name_the_argument(model, kwargs, word):
    with pytest.raises(ValueError, match=word):
        model(**kwargs)
