"""Masked parallel cross-attention (paper eq. 4) on a tiny diffusers Attention and a tiny UNet, CPU, fixed seeds."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models import attention_processor as diffusers_attention
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from dreamrelation.model.attention import (
    MASK_VALUE,
    MaskedParallelAttnProcessor,
    box_masks,
    image_attention_bias,
    layer_hw,
)

QUERY_DIM, CROSS_DIM, HEADS, DIM_HEAD = 16, 24, 2, 8
TEXT_TOKENS, DUMMY, PER_SUBJECT = 77, 4, 16
EXACT = {"rtol": 0.0, "atol": 1e-6}  # "equal": same math, allowing for kernel rounding


# ----------------------------------------------------------------------------------------------------------- helpers
def make_attn(cross: bool = True) -> Attention:
    torch.manual_seed(0)
    return Attention(
        query_dim=QUERY_DIM, cross_attention_dim=CROSS_DIM if cross else None, heads=HEADS, dim_head=DIM_HEAD
    ).eval()


def make_proc(scale: float = 0.6) -> MaskedParallelAttnProcessor:
    torch.manual_seed(1)
    return MaskedParallelAttnProcessor(hidden_size=HEADS * DIM_HEAD, cross_attention_dim=CROSS_DIM, scale=scale)


def make_inputs(batch: int, seq_len: int, num_subjects: int, seed: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq_len, QUERY_DIM, generator=g)
    text = torch.randn(batch, TEXT_TOKENS, CROSS_DIM, generator=g)
    ip = torch.randn(batch, DUMMY + PER_SUBJECT * num_subjects, CROSS_DIM, generator=g)
    return x, text, ip


def run(attn: Attention, proc, x: torch.Tensor, text: torch.Tensor | None, **kwargs) -> torch.Tensor:
    """Through Attention.forward, so diffusers' kwarg filtering is exercised too."""
    attn.set_processor(proc)
    with torch.no_grad():
        return attn(x, encoder_hidden_states=text, **kwargs)


def text_only(attn: Attention, x: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
    return run(attn, AttnProcessor2_0(), x, text)


def pixel_sets(boxes: list[list[float]], h: int, w: int) -> list[set[int]]:
    """Hand rasterisation with Python floats: floor(x0*w) <= c < ceil(x1*w)."""
    sets = []
    for x0, y0, x1, y1 in boxes:
        rows = range(math.floor(y0 * h), math.ceil(y1 * h))
        cols = range(math.floor(x0 * w), math.ceil(x1 * w))
        sets.append({r * w + c for r in rows for c in cols})
    return sets


def grid_pixels(h: int, w: int, rows: range, cols: range) -> list[int]:
    return [r * w + c for r in rows for c in cols]


def reference(
    attn: Attention,
    proc: MaskedParallelAttnProcessor,
    x: torch.Tensor,
    text: torch.Tensor,
    ip: torch.Tensor,
    boxes: torch.Tensor,
    hw: tuple[int, int],
    gamma: float,
) -> torch.Tensor:
    """Eq. 4 pixel by pixel: softmax over only the image tokens a pixel may see, nothing outside every box."""
    b_sz, seq_len, _ = x.shape

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(b_sz, -1, HEADS, DIM_HEAD).transpose(1, 2)  # (B, S, C) -> (B, heads, S, d)

    with torch.no_grad():
        q, k_t, v_t = heads(attn.to_q(x)), heads(attn.to_k(text)), heads(attn.to_v(text))
        k_i, v_i = heads(proc.to_k_ip(ip)), heads(proc.to_v_ip(ip))
        text_out = torch.softmax(q @ k_t.transpose(-1, -2) / math.sqrt(DIM_HEAD), -1) @ v_t  # (B, heads, L, d)
        logits = q @ k_i.transpose(-1, -2) / math.sqrt(DIM_HEAD)  # (B, heads, L, T)
        image_out = torch.zeros_like(text_out)
        for b in range(b_sz):
            sets = pixel_sets(boxes[b].tolist(), *hw)
            for p in range(seq_len):
                inside = [j for j, s in enumerate(sets) if p in s]
                if not inside:
                    continue
                idx = [DUMMY + PER_SUBJECT * j + t for j in inside for t in range(PER_SUBJECT)]
                probs = torch.softmax(logits[b, :, p, idx], dim=-1)  # (heads, K)
                image_out[b, :, p] = torch.einsum("hk,hkd->hd", probs, v_i[b][:, idx])
        out = (text_out + gamma * image_out).transpose(1, 2).reshape(b_sz, seq_len, -1)
        return attn.to_out[0](out)


def assert_changed(a: torch.Tensor, b: torch.Tensor, pixels: list[int]) -> None:
    """Every listed pixel (dim 1) differs."""
    diff = (a - b).abs().amax(dim=-1)  # (B, L)
    assert bool((diff[:, pixels] > 1e-4).all()), diff[:, pixels]


# ------------------------------------------------------------------------------------------------- mask functions
def test_box_masks_floor_ceil_by_hand():
    # w=5: x0=0.3 -> floor(1.5)=1, x1=0.7 -> ceil(3.5)=4; h=4: y0=0.1 -> floor(0.4)=0, y1=0.6 -> ceil(2.4)=3
    # second box on grid lines: x in [floor(1), ceil(2)) = {1}, y in [floor(2), ceil(4)) = {2, 3}; third all zero
    boxes = torch.tensor([[[0.3, 0.1, 0.7, 0.6], [0.2, 0.5, 0.4, 1.0], [0.0, 0.0, 0.0, 0.0]]])
    got = box_masks(boxes, 4, 5)
    assert got.dtype == torch.bool and got.shape == (1, 3, 20)
    expected = torch.tensor(
        [
            [[0, 1, 1, 1, 0], [0, 1, 1, 1, 0], [0, 1, 1, 1, 0], [0, 0, 0, 0, 0]],
            [[0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 1, 0, 0, 0]],
            [[0, 0, 0, 0, 0]] * 4,
        ],
        dtype=torch.bool,
    )
    assert torch.equal(got[0].view(3, 4, 5), expected)


def test_box_masks_float_noise_does_not_add_a_column():
    # float32(7/13) * 13 = 7.0000005: a plain ceil would give 8 columns
    boxes = torch.tensor([[[0.0, 0.0, 7 / 13, 1.0]]], dtype=torch.float32)
    assert box_masks(boxes, 1, 13)[0, 0].sum().item() == 7


def test_box_masks_rejects_bad_shape():
    with pytest.raises(ValueError, match="boxes"):
        box_masks(torch.zeros(2, 4), 4, 4)


def test_image_attention_bias_by_hand():
    # 2x2 grid; A = top-left pixel, B = top row; 1 dummy token, 2 tokens per subject -> T = 5
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 0.5]]])
    bias, inside = image_attention_bias(boxes, 2, 2, num_dummy=1, tokens_per_subject=2)
    assert bias.shape == (1, 1, 4, 5) and inside.shape == (1, 4, 1)
    m = MASK_VALUE
    expected = torch.tensor(
        [
            [m, 0, 0, 0, 0],  # pixel 0: in A and B
            [m, m, m, 0, 0],  # pixel 1: in B only
            [0, m, m, m, m],  # pixels 2, 3: outside, dummy only
            [0, m, m, m, m],
        ]
    )
    assert torch.equal(bias[0, 0], expected)
    assert inside.flatten().tolist() == [1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("latent_hw", "seq_len", "expected"),
    [
        ((128, 96), 128 * 96, (128, 96)),
        ((128, 96), 32 * 24, (32, 24)),
        ((128, 96), 16 * 12, (16, 12)),
        ((13, 9), 7 * 5, (7, 5)),  # ceil halving of odd sides
        ((13, 9), 4 * 3, (4, 3)),
        (None, 64, (8, 8)),
    ],
)
def test_layer_hw(latent_hw, seq_len, expected):
    assert layer_hw(latent_hw, seq_len) == expected


def test_layer_hw_errors_name_latent_hw():
    with pytest.raises(ValueError, match=r"latent_hw=\(128, 96\).*L=100"):
        layer_hw((128, 96), 100)
    with pytest.raises(ValueError, match="latent_hw is None.*L=96"):
        layer_hw(None, 96)
    with pytest.raises(ValueError, match="latent_hw"):
        layer_hw((0, 8), 4)


# -------------------------------------------------------------------------------------------------- the processor
def test_state_dict_keys_match_ms_adapter():
    proc = make_proc()
    sd = proc.state_dict()
    assert set(sd) == {"to_k_ip.weight", "to_v_ip.weight"}
    assert sd["to_k_ip.weight"].shape == (HEADS * DIM_HEAD, CROSS_DIM)
    assert MaskedParallelAttnProcessor().state_dict() == {}
    with pytest.raises(ValueError, match="cross_attention_dim"):
        MaskedParallelAttnProcessor(hidden_size=16)


def test_other_subject_invisible_inside_box_a_only():
    """(a) A pixel inside box A only gives zero weight to subject B's tokens."""
    attn, proc = make_attn(), make_proc()
    h, w = 8, 8
    x, text, ip = make_inputs(1, h * w, 2)
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75]]])  # A: rows/cols 0-3, B: 2-5
    a_pix, b_pix = pixel_sets(boxes[0].tolist(), h, w)
    kw = {"ip_boxes": boxes, "latent_hw": (h, w)}
    out = run(attn, proc, x, text, ip_hidden_states=ip, **kw)
    ip_b = ip.clone()
    ip_b[:, DUMMY + PER_SUBJECT : DUMMY + 2 * PER_SUBJECT] = torch.randn(1, PER_SUBJECT, CROSS_DIM)
    out_b = run(attn, proc, x, text, ip_hidden_states=ip_b, **kw)

    unchanged = sorted(set(range(h * w)) - b_pix)  # A-only pixels and pixels outside every box
    torch.testing.assert_close(out[:, unchanged], out_b[:, unchanged], **EXACT)
    assert a_pix - b_pix and a_pix & b_pix
    assert_changed(out, out_b, sorted(b_pix))
    torch.testing.assert_close(out, reference(attn, proc, x, text, ip, boxes, (h, w), 0.6), rtol=1e-5, atol=1e-5)


def test_outside_every_box_equals_text_only():
    """(b) Pixels outside all boxes get no image attention."""
    attn, proc = make_attn(), make_proc()
    x, text, ip = make_inputs(1, 64, 1)
    boxes = torch.tensor([[[0.5, 0.0, 1.0, 0.5]]])  # top-right quadrant of 8x8
    inside = pixel_sets(boxes[0].tolist(), 8, 8)[0]
    out = run(attn, proc, x, text, ip_hidden_states=ip, ip_boxes=boxes, latent_hw=(8, 8))
    ref = text_only(attn, x, text)
    outside = sorted(set(range(64)) - inside)
    torch.testing.assert_close(out[:, outside], ref[:, outside], **EXACT)
    assert_changed(out, ref, sorted(inside))


@pytest.mark.parametrize(
    ("latent_hw", "grid"),
    [((12, 8), (12, 8)), ((12, 8), (6, 4)), ((13, 9), (7, 5))],
)
def test_non_square_latent(latent_hw, grid):
    """(c) Masks follow the layer's own (h, w), not sqrt(L); the left half of a 12x8 latent is columns 0-3."""
    attn, proc = make_attn(), make_proc()
    h, w = grid
    x, text, ip = make_inputs(1, h * w, 2)
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 1.0], [0.5, 0.75, 1.0, 1.0]]])  # left half; bottom-right strip
    out = run(attn, proc, x, text, ip_hidden_states=ip, ip_boxes=boxes, latent_hw=latent_hw)
    ref = text_only(attn, x, text)
    left = grid_pixels(h, w, range(h), range(math.ceil(w / 2)))
    strip = grid_pixels(h, w, range(math.floor(0.75 * h), h), range(math.floor(w / 2), w))
    outside = sorted(set(range(h * w)) - set(left) - set(strip))
    torch.testing.assert_close(out[:, outside], ref[:, outside], **EXACT)
    assert_changed(out, ref, left + strip)
    torch.testing.assert_close(out, reference(attn, proc, x, text, ip, boxes, grid, 0.6), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="latent_hw"):
        run(attn, proc, x, text, ip_hidden_states=ip, ip_boxes=boxes)  # L is not a square: sqrt(L) would be wrong


def test_four_d_input_uses_its_own_grid():
    attn, proc = make_attn(), make_proc()
    x, text, ip = make_inputs(1, 6 * 4, 1)
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 1.0]]])
    seq = run(attn, proc, x, text, ip_hidden_states=ip, ip_boxes=boxes, latent_hw=(6, 4))
    x4 = x.transpose(1, 2).reshape(1, QUERY_DIM, 6, 4)  # (B, L, C) -> (B, C, H, W)
    out4 = run(attn, proc, x4, text, ip_hidden_states=ip, ip_boxes=boxes)
    torch.testing.assert_close(out4.flatten(2).transpose(1, 2), seq, rtol=1e-5, atol=1e-6)


def test_overlap_sees_both_subjects():
    """(d) A pixel inside two boxes attends to both subjects' tokens."""
    attn, proc = make_attn(), make_proc()
    x, text, ip = make_inputs(1, 64, 2)
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75]]])
    a_pix, b_pix = pixel_sets(boxes[0].tolist(), 8, 8)
    both = sorted(a_pix & b_pix)
    out = run(attn, proc, x, text, ip_hidden_states=ip, ip_boxes=boxes, latent_hw=(8, 8))
    for j in range(2):
        changed = ip.clone()
        changed[:, DUMMY + PER_SUBJECT * j : DUMMY + PER_SUBJECT * (j + 1)] += 1.0
        assert_changed(out, run(attn, proc, x, text, ip_hidden_states=changed, ip_boxes=boxes, latent_hw=(8, 8)), both)


def test_three_subjects_match_reference():
    """(d) Three subjects, two of them overlapping, per-sample boxes, against a pixel-by-pixel eq. 4."""
    attn, proc = make_attn(), make_proc()
    x, text, ip = make_inputs(2, 12 * 8, 3)
    boxes = torch.tensor(
        [
            [[0.0, 0.0, 0.4, 0.5], [0.3, 0.2, 0.8, 0.7], [0.6, 0.6, 1.0, 1.0]],
            [[0.5, 0.0, 1.0, 1.0], [0.0, 0.5, 0.5, 1.0], [0.1, 0.1, 0.2, 0.2]],
        ]
    )
    out = run(attn, proc, x, text, ip_hidden_states=ip, ip_boxes=boxes, latent_hw=(12, 8))
    torch.testing.assert_close(out, reference(attn, proc, x, text, ip, boxes, (12, 8), 0.6), rtol=1e-5, atol=1e-5)


def test_zero_boxes_is_text_only_per_sample():
    """(e) The CFG unconditional sample (zero tokens, zero boxes) gets no image contribution."""
    attn, proc = make_attn(), make_proc()
    x, text, ip = make_inputs(2, 64, 2)
    ip[0] = 0.0
    boxes = torch.tensor([[[0.0] * 4, [0.0] * 4], [[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]]])
    out = run(attn, proc, x, text, ip_hidden_states=ip, ip_boxes=boxes, latent_hw=(8, 8))
    ref = text_only(attn, x, text)
    torch.testing.assert_close(out[0], ref[0], **EXACT)
    assert_changed(out[1:], ref[1:], list(range(64)))


def test_ip_scale():
    """(f) gamma = 0 is text-only; gamma enters linearly; a (B,) tensor gives a per-sample gamma."""
    attn, proc = make_attn(), make_proc()
    x, text, ip = make_inputs(2, 64, 1)
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 1.0]], [[0.25, 0.25, 1.0, 1.0]]])
    kw = {"ip_hidden_states": ip, "ip_boxes": boxes, "latent_hw": (8, 8)}
    ref = text_only(attn, x, text)
    torch.testing.assert_close(run(attn, proc, x, text, ip_scale=0.0, **kw), ref, **EXACT)
    default = run(attn, proc, x, text, **kw)  # self.scale = 0.6
    double = run(attn, proc, x, text, ip_scale=1.2, **kw)
    torch.testing.assert_close(double - ref, 2 * (default - ref), rtol=1e-4, atol=1e-5)
    per_sample = run(attn, proc, x, text, ip_scale=torch.tensor([0.0, 1.2]), **kw)
    torch.testing.assert_close(per_sample[0], ref[0], **EXACT)
    torch.testing.assert_close(per_sample[1], double[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="ip_scale"):
        run(attn, proc, x, text, ip_scale=torch.ones(3), **kw)


def test_masks_follow_boxes_edited_in_place():
    """Masks are computed from the boxes of each call: an in-place edit of the boxes is seen."""
    attn, proc = make_attn(), make_proc()
    x, text, ip = make_inputs(1, 64, 1)
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5]]])
    kw = {"ip_hidden_states": ip, "ip_boxes": boxes, "latent_hw": (8, 8)}
    first = run(attn, proc, x, text, **kw)
    torch.testing.assert_close(run(attn, proc, x, text, **kw), first, **EXACT)
    boxes[0, 0] = torch.tensor([0.5, 0.5, 1.0, 1.0])
    torch.testing.assert_close(run(attn, proc, x, text, **kw), reference(attn, proc, x, text, ip, boxes, (8, 8), 0.6))


def test_bad_image_inputs_name_the_argument():
    attn, proc = make_attn(), make_proc()
    x, text, ip = make_inputs(1, 64, 2)
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5]]])  # one box for two subjects' tokens
    with pytest.raises(ValueError, match="ip_hidden_states has 36 tokens"):
        run(attn, proc, x, text, ip_hidden_states=ip, ip_boxes=boxes, latent_hw=(8, 8))
    with pytest.raises(ValueError, match="ip_boxes"):
        run(attn, proc, x, text, ip_hidden_states=ip, latent_hw=(8, 8))


@pytest.fixture
def diffusers_warnings(monkeypatch) -> list[str]:
    """Messages diffusers' Attention.forward logs (e.g. about unexpected cross_attention_kwargs)."""
    seen: list[str] = []
    monkeypatch.setattr(diffusers_attention.logger, "warning", lambda msg, *a, **k: seen.append(str(msg)))
    return seen


def test_self_attention_is_plain_and_quiet(diffusers_warnings):
    """(g) Without ip weights the processor is AttnProcessor2_0 and takes the image kwargs silently."""
    attn = make_attn(cross=False)
    x, _, ip = make_inputs(1, 64, 1)
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5]]])
    kwargs = {"ip_hidden_states": ip, "ip_boxes": boxes, "latent_hw": (8, 8), "ip_scale": 1.0}
    out = run(attn, MaskedParallelAttnProcessor(), x, None, **kwargs)
    torch.testing.assert_close(out, text_only(attn, x, None), **EXACT)
    assert diffusers_warnings == []
    run(attn, MaskedParallelAttnProcessor(), x, None, not_an_argument=1)  # the hook does see warnings
    assert len(diffusers_warnings) == 1 and "not_an_argument" in diffusers_warnings[0]


def test_cross_attention_without_image_tokens_is_plain():
    attn, proc = make_attn(), make_proc()
    x, text, _ = make_inputs(2, 64, 1)
    mask = torch.ones(2, TEXT_TOKENS)
    mask[1, 40:] = 0  # padded text of the second sample
    got = run(attn, proc, x, text, attention_mask=mask)
    attn.set_processor(AttnProcessor2_0())
    with torch.no_grad():
        ref = attn(x, encoder_hidden_states=text, attention_mask=mask)
    torch.testing.assert_close(got, ref, **EXACT)


# ------------------------------------------------------------------------------------------------------ in a UNet
def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
    ).eval()


def ms_processors(unet: UNet2DConditionModel) -> dict[str, MaskedParallelAttnProcessor]:
    procs = {}
    torch.manual_seed(3)
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            attn = unet.get_submodule(name.removesuffix(".processor"))
            procs[name] = MaskedParallelAttnProcessor(attn.to_k.out_features, attn.to_k.in_features)
        else:
            procs[name] = MaskedParallelAttnProcessor()
    return procs


def test_in_tiny_unet_non_square(diffusers_warnings):
    """(i) Installed with set_attn_processor; a (16, 12) latent with CFG-style batch [uncond, cond]."""
    unet = tiny_unet()
    procs = ms_processors(unet)
    assert len(procs) % 2 == 0 and sum(p.has_image_branch for p in procs.values()) == len(procs) // 2
    unet.set_attn_processor(procs)

    g = torch.Generator().manual_seed(4)
    sample = torch.randn(2, 4, 16, 12, generator=g)
    text = torch.randn(2, TEXT_TOKENS, CROSS_DIM, generator=g)
    ip = torch.randn(2, DUMMY + 2 * PER_SUBJECT, CROSS_DIM, generator=g)
    ip[0] = 0.0
    boxes = torch.tensor([[[0.0] * 4, [0.0] * 4], [[0.0, 0.1, 0.5, 0.9], [0.4, 0.2, 1.0, 1.0]]])
    t = torch.tensor([10, 10])
    kwargs = {"ip_hidden_states": ip, "ip_boxes": boxes, "latent_hw": (16, 12)}
    with torch.no_grad():
        with_image = unet(sample, t, encoder_hidden_states=text, cross_attention_kwargs=kwargs).sample
        without = unet(sample, t, encoder_hidden_states=text).sample
    assert with_image.shape == sample.shape and torch.isfinite(with_image).all()
    assert (with_image[1] - without[1]).abs().max() > 1e-4
    torch.testing.assert_close(with_image[0], without[0], rtol=0.0, atol=1e-5)  # uncond branch untouched
    assert diffusers_warnings == []
    with pytest.raises(ValueError, match="latent_hw"), torch.no_grad():  # attention runs at 8x6: not a square
        unet(sample, t, encoder_hidden_states=text, cross_attention_kwargs={"ip_hidden_states": ip, "ip_boxes": boxes})


def test_precomputed_layout_masks_give_the_same_output():
    from dreamrelation.model.attention import layout_masks

    attn, proc = make_attn(), make_proc()
    x, text, ip = make_inputs(2, 6 * 4, 2)
    boxes = torch.tensor([[[0.0, 0.0, 0.6, 1.0], [0.4, 0.2, 1.0, 0.9]], [[0.1, 0.1, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]])
    masks = layout_masks(boxes, (12, 8))
    assert set(masks) == {(12, 8), (6, 4), (3, 2), (2, 1), (1, 1)}
    kw = {"ip_hidden_states": ip, "ip_boxes": boxes, "latent_hw": (12, 8)}
    torch.testing.assert_close(run(attn, proc, x, text, ip_masks=masks, **kw), run(attn, proc, x, text, **kw),
                               **EXACT)
