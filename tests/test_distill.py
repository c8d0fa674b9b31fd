"""CLIPSelf local-encoder distillation: grid cells, loss, training on synthetic images, checkpoints that load."""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from dreamrelation.distill import (
    CARD_NAME,
    CHECKPOINT_NAME,
    DistillConfig,
    distill,
    distill_loss,
    cell_features,
    evaluate,
    grid_choices,
    hf_to_open_clip_visual,
    sample_grid_cells,
)
from dreamrelation.encoders import SubjectEncoder, open_clip_visual_to_hf
from dreamrelation.tiny import TINY_ADAPTER, VISION_WIDTH

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENCODER = TINY_ADAPTER.encoder  # local_image_size 128 -> 16 x 16 dense grid; teacher crops at 32 px
LR = 1e-3  # the paper's 1e-5 is for a pretrained bigG; the tiny random tower needs a larger step to move in 40 steps
EPOCHS = 10
STEPS = EPOCHS * 8 // 2  # 8 images, batch 2: 40 steps


def _vision(seed: int = 0) -> CLIPVisionModelWithProjection:
    """The tiny preset's vision tower (dreamrelation.tiny), built alone."""
    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=VISION_WIDTH, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=ENCODER.image_size, patch_size=8, projection_dim=16,
    ))


def _scene(seed: int) -> Image.Image:
    """Coloured rectangles on a coloured background, 64-128 px a side, any aspect ratio."""
    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in rng.integers(64, 129, 2))
    pixels = np.empty((h, w, 3), np.uint8)
    pixels[:] = rng.integers(0, 256, 3)
    for _ in range(5):
        x0, y0 = rng.integers(0, w - 8), rng.integers(0, h - 8)
        pixels[y0 : y0 + rng.integers(8, h // 2), x0 : x0 + rng.integers(8, w // 2)] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> set[str]:
    return {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [_scene(i) for i in range(8)]


@pytest.fixture(scope="module")
def run(images, tmp_path_factory):
    """One distillation run (40 steps) with an explicit teacher, recording everything the tests check."""
    original = _vision()
    teacher = copy.deepcopy(original)
    before = {"original": _state(original), "teacher": _state(teacher)}
    calls: list[tuple[int, float]] = []
    config = DistillConfig(lr=LR, epochs=EPOCHS, batch_size=2, checkpoint_every=4)
    out = tmp_path_factory.mktemp("distill")
    result = distill(original, images, config, out, callback=lambda s, v: calls.append((s, v)),
                     encoder_config=ENCODER, teacher=teacher)
    return dict(original=original, teacher=teacher, before=before, calls=calls, config=config, out=out,
                result=result)


# ------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs, name", [
    (dict(max_grid=0), "max_grid"),
    (dict(max_cells=-1), "max_cells"),
    (dict(lr=0.0), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(epochs=0), "epochs"),
    (dict(batch_size=1.5), "batch_size"),
    (dict(image_size=0), "image_size"),
    (dict(seed=-1), "seed"),
    (dict(checkpoint_every=0), "checkpoint_every"),
])
def test_config_rejects_bad_values_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DistillConfig(**kwargs)


def test_config_defaults_are_the_papers():
    config = DistillConfig()
    assert (config.lr, config.weight_decay, config.epochs, config.batch_size) == (1e-5, 0.1, 6, 2)
    assert (config.max_grid, config.max_cells, config.image_size) == (6, 20, None)


# ------------------------------------------------------------------------------------------------- grid
def test_grid_choices_follow_clipself():
    choices = grid_choices(6)
    assert (1, 1) in choices and (6, 6) in choices and (1, 3) not in choices and (6, 2) not in choices
    for m, n in choices:
        assert 1 <= m <= 6 and 1 <= n <= 6 and (m + 1) // 2 <= n <= 2 * m


@pytest.mark.parametrize("max_grid, max_cells", [(6, 20), (3, 4), (1, 5), (4, 1)])
def test_grid_cells_respect_limits_and_tile_the_image(max_grid, max_cells):
    rng = random.Random(1)
    for _ in range(30):
        (m, n), boxes = sample_grid_cells(rng, max_grid, max_cells)
        assert 1 <= m <= max_grid and 1 <= n <= max_grid
        assert boxes.shape == (min(m * n, max_cells), 4)
        assert torch.allclose(boxes[:, 2] - boxes[:, 0], torch.full((len(boxes),), 1 / n))
        assert torch.allclose(boxes[:, 3] - boxes[:, 1], torch.full((len(boxes),), 1 / m))
        assert boxes.min() >= 0 and boxes.max() <= 1 + 1e-6
        assert len({tuple(b.tolist()) for b in boxes}) == len(boxes)  # distinct cells
        if m * n <= max_cells:  # every cell drawn: they tile the unit square
            areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            assert areas.sum().item() == pytest.approx(1.0)


def test_grid_cells_are_deterministic_for_a_seed():
    def draws(seed):
        rng = random.Random(seed)
        return [sample_grid_cells(rng, 6, 20) for _ in range(10)]

    a, b, c = draws(0), draws(0), draws(1)
    assert all(ga == gb and torch.equal(ba, bb) for (ga, ba), (gb, bb) in zip(a, b))
    assert any(ga != gc or not torch.equal(ba, bc) for (ga, ba), (gc, bc) in zip(a, c))


# ------------------------------------------------------------------------------------------------- loss
def test_distill_loss_is_one_minus_cosine():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    t = torch.tensor([[2.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])  # cos 1, 0, -1 -> losses 0, 1, 2
    assert distill_loss(s, t).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="student and teacher"):
        distill_loss(s, t[:2])


# ------------------------------------------------------------------------------------------------ keys
def test_hf_open_clip_round_trip():
    hf = {k: v for k, v in _vision(3).state_dict().items() if not k.endswith("position_ids")}
    oc = hf_to_open_clip_visual(hf)
    assert all(k.startswith("visual.") for k in oc)
    assert oc["visual.proj"].shape == (VISION_WIDTH, 16)  # (W, P)
    assert oc["visual.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * VISION_WIDTH, VISION_WIDTH)
    back = open_clip_visual_to_hf(oc)
    assert back.keys() == hf.keys() and all(torch.equal(back[k], hf[k]) for k in hf)
    again = hf_to_open_clip_visual(back)
    assert again.keys() == oc.keys() and all(torch.equal(again[k], oc[k]) for k in oc)


def test_hf_to_open_clip_names_bad_keys():
    hf = {k: v for k, v in _vision(3).state_dict().items() if not k.endswith("position_ids")}
    with pytest.raises(ValueError, match="text_model.foo"):
        hf_to_open_clip_visual({**hf, "text_model.foo": torch.zeros(1)})
    partial = {k: v for k, v in hf.items() if "layers.1.self_attn.k_proj" not in k}
    with pytest.raises(ValueError, match="only"):
        hf_to_open_clip_visual(partial)


# ------------------------------------------------------------------------------------------------ training
def test_loss_falls(run, images):
    losses = run["result"].losses
    first, last = float(np.mean(losses[:5])), float(np.mean(losses[-5:]))
    # measured: mean of the first 5 steps 0.839, of the last 5 steps 0.031 (lr 1e-3, 40 steps)
    assert len(losses) == STEPS and all(np.isfinite(losses))
    assert last < 0.2 * first, (first, last)
    # the same 99 cells (fixed seed), before and after. Measured: 0.794 -> 0.021, below the 0.087 of the best
    # constant answer (the teacher's mean direction): the student learnt cell-specific features, not a collapse
    config = run["config"]
    before = evaluate(run["original"], run["teacher"], images, config, ENCODER)
    after = evaluate(run["result"].model, run["teacher"], images, config, ENCODER)
    _, teacher = cell_features(run["original"], run["teacher"], images, config, ENCODER)
    constant = torch.nn.functional.normalize(teacher, dim=-1).mean(0, keepdim=True).expand_as(teacher)
    assert after < 0.2 * before, (before, after)
    assert after < 0.5 * distill_loss(constant, teacher).item()


def test_callback_sees_every_step(run):
    calls, losses = run["calls"], run["result"].losses
    assert [s for s, _ in calls] == list(range(1, STEPS + 1))
    assert tuple(v for _, v in calls) == losses


def test_only_the_student_changes(run):
    before = run["before"]
    assert _changed(before["original"], run["original"]) == set()  # the caller's tower is left untouched
    assert _changed(before["teacher"], run["teacher"]) == set()
    assert all(p.grad is None for p in run["teacher"].parameters())
    changed = _changed(before["original"], run["result"].model)
    last = "vision_model.encoder.layers.2."
    # off the MaskCLIP dense path: no gradient, so AdamW never touches them
    qk = {f"{last}self_attn.{n}_proj.{p}" for n in "qk" for p in ("weight", "bias")}
    untouched = {"visual_projection.weight", *qk}
    assert changed == set(before["original"]) - untouched


def test_outputs_and_card(run):
    result, out = run["result"], run["out"]
    assert result.checkpoint == out / CHECKPOINT_NAME and result.card == out / CARD_NAME
    assert [p.name for p in result.open_clip_checkpoints] == ["epoch_4.pt", "epoch_8.pt", "epoch_10.pt"]
    card = json.loads(result.card.read_text())
    assert card["steps"] == STEPS and card["final_loss"] == pytest.approx(result.losses[-1])
    assert (card["feature_space"], card["image_size"], card["teacher_image_size"]) == ("post_layernorm", 128, 32)
    assert card["config"]["lr"] == LR and card["vision_config"]["hidden_size"] == VISION_WIDTH
    saved = torch.load(result.open_clip_checkpoints[-1], map_location="cpu", weights_only=True)
    assert saved["epoch"] == EPOCHS and isinstance(saved["name"], str)
    assert all(k.startswith("module.visual.") for k in saved["state_dict"])


@pytest.mark.parametrize("which", ["safetensors", "epoch_N.pt"])
def test_encoder_loads_the_checkpoint(run, images, which):
    result = run["result"]
    path = result.checkpoint if which == "safetensors" else result.open_clip_checkpoints[-1]
    encoder = SubjectEncoder(_vision(), ENCODER)  # a fresh copy of the original tower
    pixels = encoder.preprocess(images[:3], ENCODER.local_image_size)
    with torch.no_grad():
        untrained = encoder.local_tokens(pixels)
        encoder.load_local_checkpoint(path)
        loaded = encoder.local_tokens(pixels)
        direct = SubjectEncoder(result.model, ENCODER).local_tokens(pixels)
    assert loaded.shape == (3, 16, VISION_WIDTH)
    torch.testing.assert_close(loaded, direct, rtol=0, atol=1e-6)
    assert not torch.allclose(loaded, untrained, atol=1e-3)
    assert encoder.vision_model is not encoder.local_model  # global tokens still come from the original tower


def test_earlier_epoch_checkpoint_differs_from_the_final(run):
    first = torch.load(run["result"].open_clip_checkpoints[0], map_location="cpu", weights_only=True)["state_dict"]
    last = torch.load(run["result"].open_clip_checkpoints[-1], map_location="cpu", weights_only=True)["state_dict"]
    assert first.keys() == last.keys() and any(not torch.equal(first[k], last[k]) for k in first)


# ---------------------------------------------------------------------------------------- inputs, determinism
def test_same_seed_same_run_and_rows_with_images(images, tmp_path):
    config = DistillConfig(lr=LR, epochs=1, batch_size=2, max_grid=3, max_cells=4)
    a = distill(_vision(), images[:4], config, tmp_path / "a", encoder_config=ENCODER)
    b = distill(_vision(), images[:4], config, tmp_path / "b", encoder_config=ENCODER)
    rows = [{"image": im} for im in images[:4]]  # datasets-style rows; default teacher (a copy)
    c = distill(_vision(), rows, config, tmp_path / "c", encoder_config=ENCODER)
    assert a.losses == b.losses == c.losses and len(a.losses) == 2
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())


def test_bad_inputs(images, tmp_path):
    config = DistillConfig(lr=LR, epochs=2, max_grid=2, max_cells=2)
    with pytest.raises(ValueError, match="no image in epoch 1"):
        distill(_vision(), [], config, tmp_path, encoder_config=ENCODER)
    with pytest.raises(ValueError, match="re-iterable"):  # a generator runs dry after the first epoch
        distill(_vision(), (im for im in images[:2]), config, tmp_path, encoder_config=ENCODER)
    with pytest.raises(ValueError, match="images item 0"):
        distill(_vision(), ["not an image"], config, tmp_path, encoder_config=ENCODER)
    with pytest.raises(ValueError, match="image_size"):
        distill(_vision(), images, DistillConfig(image_size=4), tmp_path, encoder_config=ENCODER)
    with pytest.raises(ValueError, match="teacher width"):
        wide = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
            patch_size=8, projection_dim=16))
        distill(_vision(), images, config, tmp_path, encoder_config=ENCODER, teacher=wide)
