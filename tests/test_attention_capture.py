"""Opt-in capture of text cross-attention maps (for the relation-attention loss), on a tiny Attention and UNet."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from dreamrelation.model.attention import (
    AttentionCapture,
    MaskedParallelAttnProcessor,
    capture_attention,
    text_attention_probs,
)

QUERY_DIM, CROSS_DIM, HEADS, DIM_HEAD, TEXT_TOKENS = 16, 24, 2, 8, 77


def make_attn() -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim=QUERY_DIM, cross_attention_dim=CROSS_DIM, heads=HEADS, dim_head=DIM_HEAD).eval()


def make_proc() -> MaskedParallelAttnProcessor:
    torch.manual_seed(1)
    return MaskedParallelAttnProcessor(hidden_size=HEADS * DIM_HEAD, cross_attention_dim=CROSS_DIM)


def make_inputs(batch: int, seq_len: int, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq_len, QUERY_DIM, generator=g)
    text = torch.randn(batch, TEXT_TOKENS, CROSS_DIM, generator=g)
    ip = torch.randn(batch, 4 + 16, CROSS_DIM, generator=g)
    return x, text, ip


BOXES = torch.tensor([[[0.0, 0.0, 0.6, 1.0]], [[0.2, 0.3, 1.0, 0.9]]])


def heads(t: torch.Tensor) -> torch.Tensor:
    return t.view(t.shape[0], -1, HEADS, DIM_HEAD).transpose(1, 2)  # (B, S, C) -> (B, heads, S, d)


def reference_probs(attn: Attention, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) over the text tokens, written out: (B, heads, L, S)."""
    q, k = heads(attn.to_q(x)), heads(attn.to_k(text))
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(DIM_HEAD), dim=-1)


# ------------------------------------------------------------------------------------------------ probabilities
def test_probs_are_the_softmax_the_attention_uses():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, HEADS, n, DIM_HEAD, generator=g) for n in (15, TEXT_TOKENS, TEXT_TOKENS))
    probs = text_attention_probs(q, k)
    assert probs.shape == (2, HEADS, 15, TEXT_TOKENS) and bool((probs >= 0).all())
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, HEADS, 15), rtol=0.0, atol=1e-6)  # rows sum to 1
    torch.testing.assert_close(probs @ v, F.scaled_dot_product_attention(q, k, v), rtol=0.0, atol=1e-5)
    # an additive mask (as prepare_attention_mask gives) and a bool one: the same as SDPA with that mask
    mask = torch.zeros(2, 1, 1, TEXT_TOKENS)
    mask[..., 50:] = -10000.0
    masked = text_attention_probs(q, k, mask)
    torch.testing.assert_close(masked @ v, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=0, atol=1e-5)
    assert float(masked[..., 50:].max()) < 1e-30
    torch.testing.assert_close(text_attention_probs(q, k, mask == 0), masked, rtol=0.0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ in a processor
def test_captured_map_on_a_non_square_latent():
    attn, proc = make_attn(), make_proc()
    attn.set_processor(proc)
    x, text, ip = make_inputs(2, 3 * 5)  # a (3, 5) latent: 15 queries
    capture = AttentionCapture([[1, 2], [3]])  # sample 0: tokens 1 and 2; sample 1: token 3
    proc.capture = capture
    with torch.no_grad():
        attn(x, encoder_hidden_states=text, ip_hidden_states=ip, ip_boxes=BOXES, latent_hw=(3, 5))
        probs = reference_probs(attn, x, text).mean(1)  # (B, L, S), averaged over heads
    assert capture.grids == [(3, 5)] and len(capture.maps) == 1
    got = capture.maps[0]
    assert got.shape == (2, 3, 5) and got.dtype == torch.float32
    expected = torch.stack([(probs[0, :, 1] + probs[0, :, 2]) / 2, probs[1, :, 3]]).view(2, 3, 5)  # row-major
    torch.testing.assert_close(got, expected, rtol=0.0, atol=1e-6)
    torch.testing.assert_close(capture.mean_map(), expected, rtol=0.0, atol=1e-6)


def test_capture_leaves_the_output_bit_identical():
    attn, proc = make_attn(), make_proc()
    attn.set_processor(proc)
    x, text, ip = make_inputs(2, 3 * 5)
    kwargs = {"encoder_hidden_states": text, "ip_hidden_states": ip, "ip_boxes": BOXES, "latent_hw": (3, 5)}
    with torch.no_grad():
        plain = attn(x, **kwargs)
        proc.capture = AttentionCapture([4])
        captured = attn(x, **kwargs)
        proc.capture = None
        again = attn(x, **kwargs)
    assert torch.equal(plain, captured) and torch.equal(plain, again)


def test_resolution_filter_and_self_attention():
    attn, proc = make_attn(), make_proc()
    attn.set_processor(proc)
    x, text, ip = make_inputs(2, 3 * 5)
    capture = proc.capture = AttentionCapture([1], resolutions={(2, 3)})
    with torch.no_grad():
        attn(x, encoder_hidden_states=text, ip_hidden_states=ip, ip_boxes=BOXES, latent_hw=(3, 5))
    assert capture.maps == [] and capture.seen == {(3, 5)}
    with pytest.raises(ValueError, match=r"wanted resolutions \[\(2, 3\)\].*seen \[\(3, 5\)\]"):
        capture.mean_map()

    torch.manual_seed(0)
    self_attn = Attention(query_dim=QUERY_DIM, heads=HEADS, dim_head=DIM_HEAD).eval()
    self_proc = MaskedParallelAttnProcessor()
    self_proc.capture = capture = AttentionCapture([1])
    self_attn.set_processor(self_proc)
    with torch.no_grad():
        self_attn(x, latent_hw=(3, 5))
    assert capture.maps == [] and capture.seen == set()  # self-attention never records


def test_gradients_flow_through_captured_maps():
    attn, proc = make_attn(), make_proc()
    attn.set_processor(proc)
    x, text, ip = make_inputs(2, 3 * 5)
    proc.capture = capture = AttentionCapture(torch.tensor([[1, 2], [5, 6]]))
    attn(x, encoder_hidden_states=text, ip_hidden_states=ip, ip_boxes=BOXES, latent_hw=(3, 5))
    capture.mean_map()[:, :1].sum().backward()
    for p in (attn.to_q.weight, attn.to_k.weight):
        assert p.grad is not None and float(p.grad.abs().max()) > 0
    assert attn.to_v.weight.grad is None  # probabilities do not depend on the values


def test_capture_errors():
    with pytest.raises(ValueError, match="token_indices"):
        AttentionCapture([])
    with pytest.raises(ValueError, match="token_indices"):
        AttentionCapture([[1], []])
    with pytest.raises(ValueError, match="token_indices"):
        AttentionCapture(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="resolutions"):
        AttentionCapture([1], resolutions=[3])
    probs = torch.full((2, HEADS, 6, 4), 0.25)
    with pytest.raises(ValueError, match="classifier-free guidance"):
        AttentionCapture([[1], [2], [3]]).record(probs, (2, 3))
    with pytest.raises(ValueError, match="4 tokens"):
        AttentionCapture([9]).record(probs, (2, 3))


def test_mean_map_resizes_to_one_size():
    capture = AttentionCapture([0])
    capture.maps, capture.grids = [torch.ones(1, 2, 2), torch.full((1, 4, 4), 3.0)], [(2, 2), (4, 4)]
    got = capture.mean_map()  # to the largest grid, 4 x 4: (1 + 3) / 2
    assert got.shape == (1, 4, 4) and torch.equal(got, torch.full((1, 4, 4), 2.0))
    assert capture.mean_map((3, 5)).shape == (1, 3, 5)


# ------------------------------------------------------------------------------------------------------ in a UNet
def tiny_unet_with_processors() -> UNet2DConditionModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CROSS_DIM, attention_head_dim=(2, 4), norm_num_groups=8,
    ).eval()
    procs = {}
    torch.manual_seed(3)
    for name in unet.attn_processors:
        attn = unet.get_submodule(name.removesuffix(".processor"))
        if attn.is_cross_attention:
            procs[name] = MaskedParallelAttnProcessor(attn.to_k.out_features, attn.to_k.in_features)
        else:
            procs[name] = MaskedParallelAttnProcessor()
    unet.set_attn_processor(procs)
    return unet


def test_capture_attention_in_a_tiny_unet_non_square():
    unet = tiny_unet_with_processors()
    n_cross = sum(1 for name in unet.attn_processors if "attn2" in name)
    g = torch.Generator().manual_seed(4)
    sample = torch.randn(2, 4, 16, 12, generator=g)  # cross-attention runs at (8, 6)
    text = torch.randn(2, TEXT_TOKENS, CROSS_DIM, generator=g)
    ip = torch.randn(2, 4 + 16, CROSS_DIM, generator=g)
    t = torch.tensor([10, 500])
    kwargs = {"ip_hidden_states": ip, "ip_boxes": BOXES, "latent_hw": (16, 12)}
    with torch.no_grad():
        plain = unet(sample, t, encoder_hidden_states=text, cross_attention_kwargs=kwargs).sample
    with capture_attention(unet, [[3, 4], [5]], resolutions={(8, 6)}) as capture:
        out = unet(sample, t, encoder_hidden_states=text, cross_attention_kwargs=kwargs).sample
    assert all(p.capture is None for p in unet.attn_processors.values())  # detached again
    assert torch.equal(out.detach(), plain)
    assert len(capture.maps) == n_cross and set(capture.grids) == {(8, 6)}
    attention_map = capture.mean_map()
    assert attention_map.shape == (2, 8, 6) and bool((attention_map >= 0).all()) and bool((attention_map <= 1).all())
    attention_map.sum().backward()  # the map carries the graph back into the UNet's attention weights
    grads = [p.grad for n, p in unet.named_parameters() if n.endswith("attn2.to_q.weight")]
    assert grads and all(g is not None and float(g.abs().max()) > 0 for g in grads)

    with pytest.raises(ValueError, match="MaskedParallelAttnProcessor"):
        with capture_attention(torch.nn.Linear(2, 2), [1]):
            pass
