"""Subject encoder: preprocessing, global / local tokens, roi-align, CLIPSelf (OpenCLIP) checkpoint loading."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from dreamrelation.model.config import EncoderConfig
from dreamrelation.model.encoders import (
    SubjectEncoder,
    local_grid_boxes,
    open_clip_visual_to_hf,
    roi_align_1x1,
)

VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=7,
    projection_dim=16,
)
CONFIG = EncoderConfig(image_size=28, local_image_size=56, subject_resize=32)  # local grid 8 x 8
GLOBAL_TOKENS = 1 + (28 // 7) ** 2


def _vision(seed: int) -> CLIPVisionModelWithProjection:
    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION)).eval()


def _image(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def encoder() -> SubjectEncoder:
    return SubjectEncoder(_vision(0), CONFIG)


def hf_to_open_clip_visual(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Test-side inverse of ``open_clip_visual_to_hf`` (written independently, key by key)."""
    out = {
        "visual.conv1.weight": state["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": state["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": state["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": state["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": state["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": state["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": state["vision_model.post_layernorm.bias"],
        "visual.proj": state["visual_projection.weight"].T.contiguous(),
    }
    for i in range(VISION["num_hidden_layers"]):
        hf, oc = f"vision_model.encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{oc}attn.in_proj_{kind}"] = torch.cat(
                [state[f"{hf}self_attn.{n}_proj.{kind}"] for n in ("q", "k", "v")], dim=0
            )
            for o, h in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{oc}{o}.{kind}"] = state[f"{hf}{h}.{kind}"]
    return out


def _clipself_checkpoint(path, model: CLIPVisionModelWithProjection, drop: str | None = None) -> None:
    visual = hf_to_open_clip_visual({k: v.clone() for k, v in model.state_dict().items()})
    if drop is not None:
        del visual[drop]
    state = {f"module.{k}": v for k, v in visual.items()}
    state["module.token_embedding.weight"] = torch.zeros(10, 8)  # text tower: ignored
    state["module.logit_scale"] = torch.tensor(4.6)
    torch.save({"epoch": 6, "name": "clipself-test", "state_dict": state, "optimizer": {}}, path)


# --------------------------------------------------------------------------------------- roi align
def test_roi_align_equals_adaptive_pool_on_divisible_grid():
    feats = torch.randn(3, 5, 8, 12, generator=torch.Generator().manual_seed(0))
    scale = torch.tensor([12.0, 8.0, 12.0, 8.0])
    boxes = (local_grid_boxes(4) * scale).expand(3, -1, -1)  # (3, 16, 4), x outer / y inner
    out = roi_align_1x1(feats, boxes)  # (3, 16, 5)
    pooled = F.adaptive_avg_pool2d(feats, 4)  # (3, 5, 4[y], 4[x])
    # x-outer order: (K, C, y, x) -> (K, x, y, C) -> (K, 16, C)
    torch.testing.assert_close(out, pooled.permute(0, 3, 2, 1).reshape(3, 16, 5))


def test_roi_align_bilinear_on_ramp():
    """On a linear ramp the average of interior samples is the ramp at the box centre (aligned: -0.5)."""
    h, w = 9, 11
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    feats = torch.stack((xs, ys))[None]  # (1, 2, H, W): channel 0 = x, channel 1 = y
    boxes = torch.tensor([[[1.3, 2.1, 3.9, 5.0], [2.0, 2.0, 2.7, 7.4]]])
    out = roi_align_1x1(feats, boxes)
    expected = torch.tensor([[[(1.3 + 3.9) / 2 - 0.5, (2.1 + 5.0) / 2 - 0.5],
                              [(2.0 + 2.7) / 2 - 0.5, (2.0 + 7.4) / 2 - 0.5]]])
    torch.testing.assert_close(out, expected)


def _roi_align_loop(f: torch.Tensor, boxes: torch.Tensor, aligned: bool) -> torch.Tensor:
    """Sample-by-sample port of torchvision's CPU roi_align (output 1x1, adaptive sampling ratio)."""
    k_, c_, h, w = f.shape
    out = torch.zeros(k_, boxes.shape[1], c_, dtype=f.dtype)
    off = 0.5 if aligned else 0.0
    for k in range(k_):
        for m in range(boxes.shape[1]):
            x0, y0, x1, y1 = (float(v) - off for v in boxes[k, m])
            rw, rh = (x1 - x0, y1 - y0) if aligned else (max(x1 - x0, 1.0), max(y1 - y0, 1.0))
            gh, gw = math.ceil(rh), math.ceil(rw)
            for iy in range(gh):
                for ix in range(gw):
                    y, x = y0 + (iy + 0.5) * rh / gh, x0 + (ix + 0.5) * rw / gw
                    if y < -1 or y > h or x < -1 or x > w:
                        continue
                    y, x = max(y, 0.0), max(x, 0.0)
                    yl, xl = int(y), int(x)
                    yh, xh = (h - 1, w - 1)
                    if yl >= h - 1:
                        yl, y = h - 1, float(h - 1)
                    else:
                        yh = yl + 1
                    if xl >= w - 1:
                        xl, x = w - 1, float(w - 1)
                    else:
                        xh = xl + 1
                    ly, lx = y - yl, x - xl
                    out[k, m] += ((1 - ly) * (1 - lx) * f[k, :, yl, xl] + (1 - ly) * lx * f[k, :, yl, xh]
                                  + ly * (1 - lx) * f[k, :, yh, xl] + ly * lx * f[k, :, yh, xh])
            out[k, m] /= max(gh * gw, 1)
    return out


@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_matches_torchvision_algorithm(aligned):
    """Boxes partly outside the map, sub-pixel and empty ones included."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64)
    xy = torch.rand(2, 8, 2, generator=g, dtype=torch.float64) * 9 - 2
    wh = torch.rand(2, 8, 2, generator=g, dtype=torch.float64) * 5 - 0.5
    boxes = torch.cat((xy, xy + wh), dim=-1)
    torch.testing.assert_close(roi_align_1x1(f, boxes, aligned=aligned), _roi_align_loop(f, boxes, aligned))


def test_roi_align_boxes_are_per_image():
    feats = torch.stack((torch.zeros(1, 4, 4), torch.ones(1, 4, 4)))  # image 1 is all ones
    boxes = torch.tensor([[[0.0, 0.0, 4.0, 4.0]], [[0.0, 0.0, 2.0, 2.0]]])
    torch.testing.assert_close(roi_align_1x1(feats, boxes), torch.tensor([[[0.0]], [[1.0]]]))


# ------------------------------------------------------------------------------------- preprocess
def test_preprocess_matches_clip_image_processor(encoder):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    images = [_image(0), _image(1, (20, 50)).convert("L")]
    out = encoder.preprocess(images, 28)
    assert out.shape == (2, 3, 28, 28) and out.dtype == torch.float32
    processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    resized = [im.convert("RGB").resize((32, 32), Image.Resampling.BICUBIC) for im in images]
    torch.testing.assert_close(out, processor(images=resized, return_tensors="pt").pixel_values)


def test_preprocess_rejects_non_images(encoder):
    with pytest.raises(ValueError, match=r"images\[1\]"):
        encoder.preprocess([_image(0), np.zeros((4, 4, 3))], 28)


# ----------------------------------------------------------------------------------------- tokens
def test_global_tokens_are_penultimate_hidden_states(encoder):
    pixels = encoder.preprocess([_image(0), _image(1)], CONFIG.image_size)
    with torch.no_grad():
        tokens = encoder.global_tokens(pixels)
        ref = encoder.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    assert tokens.shape == (2, GLOBAL_TOKENS, 32)
    torch.testing.assert_close(tokens, ref)


def test_local_tokens_match_maskclip_reference(encoder):
    pixels = encoder.preprocess([_image(0), _image(1)], CONFIG.local_image_size)
    with torch.no_grad():
        tokens = encoder.local_tokens(pixels)
        model = encoder.vision_model
        x = model(pixel_values=pixels, output_hidden_states=True, interpolate_pos_encoding=True).hidden_states[-2]
        block = model.vision_model.encoder.layers[-1]
        x = x + block.self_attn.out_proj(block.self_attn.v_proj(block.layer_norm1(x)))
        x = x + block.mlp(block.layer_norm2(x))
        dense = F.normalize(model.vision_model.post_layernorm(x[:, 1:]), dim=-1)  # (2, 64, 32)
        grid = dense.view(2, 8, 8, 32).permute(0, 3, 1, 2)  # (2, 32, y, x)
        ref = F.adaptive_avg_pool2d(grid, 4).permute(0, 3, 2, 1).reshape(2, 16, 32)  # x outer, y inner
    assert tokens.shape == (2, 16, 32)
    torch.testing.assert_close(tokens, ref)


def test_local_tokens_are_per_image(encoder):
    a, b = _image(0), _image(7, (60, 60))
    with torch.no_grad():
        both = encoder.local_tokens(encoder.preprocess([a, b], CONFIG.local_image_size))
        only_a = encoder.local_tokens(encoder.preprocess([a], CONFIG.local_image_size))
        only_b = encoder.local_tokens(encoder.preprocess([b], CONFIG.local_image_size))
    assert (both[0] - both[1]).abs().max() > 1e-3
    torch.testing.assert_close(both[0:1], only_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[1:2], only_b, rtol=1e-5, atol=1e-5)


def test_forward_token_counts(encoder):
    images = [_image(0), _image(1), _image(2)]
    with torch.no_grad():
        on = encoder(images)
        off = encoder(images, use_local_tokens=False)
        off_by_config = SubjectEncoder(encoder.vision_model, EncoderConfig(
            image_size=28, local_image_size=56, subject_resize=32, use_local_tokens=False))(images)
    assert on.shape == (3, GLOBAL_TOKENS + 16, 32)
    assert off.shape == (3, GLOBAL_TOKENS, 32)
    torch.testing.assert_close(on[:, :GLOBAL_TOKENS], off)
    torch.testing.assert_close(off_by_config, off)


# ---------------------------------------------------------------------------------------- loading
def test_open_clip_conversion_round_trip(tmp_path):
    source = _vision(1)
    path = tmp_path / "epoch_6.pt"
    _clipself_checkpoint(path, source)

    encoder = SubjectEncoder(_vision(0), CONFIG)
    global_before = encoder.vision_model.state_dict()["vision_model.pre_layrnorm.weight"].clone()
    local = encoder.load_local_checkpoint(path)
    assert local is encoder.local_model and local is not encoder.vision_model
    torch.testing.assert_close(encoder.vision_model.state_dict()["vision_model.pre_layrnorm.weight"], global_before)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(local.state_dict()[key], value, msg=key)

    reference = SubjectEncoder(source, CONFIG)  # the source tower used directly
    images = [_image(3), _image(4)]
    with torch.no_grad():
        pixels = encoder.preprocess(images, CONFIG.local_image_size)
        torch.testing.assert_close(encoder.local_tokens(pixels), reference.local_tokens(pixels))
        out = source(pixel_values=encoder.preprocess(images, 28))
        torch.testing.assert_close(local(pixel_values=encoder.preprocess(images, 28)).image_embeds, out.image_embeds)
        # global tokens still come from the global tower
        torch.testing.assert_close(encoder(images)[:, :GLOBAL_TOKENS],
                                   SubjectEncoder(_vision(0), CONFIG)(images, use_local_tokens=False))


def test_safetensors_checkpoint_in_hf_names(tmp_path):
    from safetensors.torch import save_file

    source = _vision(2)
    path = tmp_path / "local.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    encoder = SubjectEncoder(_vision(0), CONFIG)
    encoder.load_local_checkpoint(path)
    pixels = encoder.preprocess([_image(5)], CONFIG.local_image_size)
    with torch.no_grad():
        torch.testing.assert_close(encoder.local_tokens(pixels), SubjectEncoder(source, CONFIG).local_tokens(pixels))


def test_missing_key_is_named(tmp_path):
    path = tmp_path / "epoch_1.pt"
    _clipself_checkpoint(path, _vision(1), drop="visual.ln_post.weight")
    encoder = SubjectEncoder(_vision(0), CONFIG)
    with pytest.raises(ValueError, match="vision_model.post_layernorm.weight"):
        encoder.load_local_checkpoint(path)
    assert encoder.local_model is None


def test_mis_shaped_and_unknown_keys_are_named(tmp_path):
    model = _vision(1)
    visual = hf_to_open_clip_visual(model.state_dict())
    visual["visual.proj"] = torch.zeros(32, 8)
    path = tmp_path / "epoch_2.pt"
    torch.save({"epoch": 2, "name": "x", "state_dict": visual, "optimizer": {}}, path)
    with pytest.raises(ValueError, match=r"visual_projection\.weight: checkpoint \(8, 32\)"):
        SubjectEncoder(_vision(0), CONFIG).load_local_checkpoint(path)
    with pytest.raises(ValueError, match="visual.attnpool.weight"):
        open_clip_visual_to_hf({**visual, "visual.attnpool.weight": torch.zeros(1)})


def test_local_model_width_must_match():
    other = CLIPVisionModelWithProjection(CLIPVisionConfig(**{**VISION, "hidden_size": 16, "num_attention_heads": 2}))
    with pytest.raises(ValueError, match="local_model width 16"):
        SubjectEncoder(_vision(0), CONFIG, local_model=other)


# ----------------------------------------------------------------------------------- local grid (Table 6)
@pytest.mark.parametrize("grid", [2, 4, 8])
def test_local_grid_pools_equal_cells_of_the_dense_map(encoder, grid):
    """n x n local tokens are the mean features of the n x n equal cells of the 8 x 8 map, x outer, y inner."""
    config = EncoderConfig(image_size=28, local_image_size=56, subject_resize=32, local_grid=grid)
    sized = SubjectEncoder(encoder.vision_model, config)
    images = [_image(6), _image(7)]
    with torch.no_grad():
        pixels = sized.preprocess(images, config.local_image_size)
        tokens = sized.local_tokens(pixels)
        dense = sized.dense_features(pixels)  # (K, C, 8, 8)
        all_tokens = sized(images)
    pooled = F.adaptive_avg_pool2d(dense, grid)  # (K, C, y, x)
    expected = pooled.permute(0, 3, 2, 1).reshape(2, grid * grid, -1)  # (K, x, y, C) -> (K, n*n, C)
    assert tokens.shape == (2, grid * grid, 32)
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-6)
    assert all_tokens.shape == (2, GLOBAL_TOKENS + grid * grid, 32)


def test_local_grid_is_validated():
    with pytest.raises(ValueError, match="local_grid must be a positive integer, got 0"):
        EncoderConfig(local_grid=0)


# ------------------------------------------------------------------ the authors' epoch_6.pt, distill outputs
def _authors_epoch_6(path, model: CLIPVisionModelWithProjection) -> None:
    """A checkpoint in the layout of the authors' CLIPSelf ``epoch_6.pt``: a DDP-prefixed OpenCLIP state dict with
    the whole text tower, plus the epoch, the run name and a real AdamW optimizer state."""
    visual = hf_to_open_clip_visual({k: v.clone() for k, v in model.state_dict().items()})
    width, layers = 16, 2
    text = {"token_embedding.weight": torch.randn(49, width), "positional_embedding": torch.randn(77, width),
            "ln_final.weight": torch.ones(width), "ln_final.bias": torch.zeros(width),
            "text_projection": torch.randn(width, 16), "logit_scale": torch.tensor(4.6052)}
    for i in range(layers):
        block = f"transformer.resblocks.{i}."
        text.update({f"{block}ln_1.weight": torch.ones(width), f"{block}ln_1.bias": torch.zeros(width),
                     f"{block}attn.in_proj_weight": torch.randn(3 * width, width),
                     f"{block}attn.in_proj_bias": torch.zeros(3 * width),
                     f"{block}attn.out_proj.weight": torch.randn(width, width),
                     f"{block}attn.out_proj.bias": torch.zeros(width), f"{block}ln_2.weight": torch.ones(width),
                     f"{block}ln_2.bias": torch.zeros(width), f"{block}mlp.c_fc.weight": torch.randn(4 * width, width),
                     f"{block}mlp.c_fc.bias": torch.zeros(4 * width),
                     f"{block}mlp.c_proj.weight": torch.randn(width, 4 * width),
                     f"{block}mlp.c_proj.bias": torch.zeros(width)})
    params = [torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(3))]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    state = {f"module.{k}": v for k, v in {**visual, **text}.items()}
    torch.save({"epoch": 6, "name": "2023_11_clipself_bigG", "state_dict": state,
                "optimizer": optimizer.state_dict()}, path)


def test_the_authors_epoch_6_layout_loads_from_its_folder(tmp_path):
    from dreamrelation.model.encoders import local_checkpoint_file

    source = _vision(8)
    _authors_epoch_6(tmp_path / "epoch_6.pt", source)
    encoder = SubjectEncoder(_vision(0), CONFIG, require_local_model=True)
    with pytest.raises(ValueError, match="no distilled local encoder is loaded"):
        encoder([_image(8)])
    assert encoder([_image(8)], use_local_tokens=False).shape == (1, GLOBAL_TOKENS, 32)  # global only: fine
    encoder.load_local_checkpoint(tmp_path)  # the folder: its epoch_N.pt of the highest N
    assert encoder.local_source == str(tmp_path / "epoch_6.pt")
    pixels = encoder.preprocess([_image(8), _image(9)], CONFIG.local_image_size)
    with torch.no_grad():
        torch.testing.assert_close(encoder.local_tokens(pixels), SubjectEncoder(source, CONFIG).local_tokens(pixels))
    # a distill output folder: local_encoder.safetensors wins over the epoch files; else the newest epoch
    (tmp_path / "epoch_10.pt").write_bytes(b"")
    assert local_checkpoint_file(tmp_path) == tmp_path / "epoch_10.pt"
    (tmp_path / "local_encoder.safetensors").write_bytes(b"")
    assert local_checkpoint_file(tmp_path) == tmp_path / "local_encoder.safetensors"
    assert local_checkpoint_file(tmp_path / "epoch_6.pt") == tmp_path / "epoch_6.pt"
    with pytest.raises(ValueError, match="is neither a checkpoint file nor a folder"):
        local_checkpoint_file(tmp_path / "missing.pt")
