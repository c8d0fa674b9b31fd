"""ViTPose person keypoints: the tiny twin through transformers' processor, the box and pixel conventions, the
real config's layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_twin_layout, make_subject
from dreamrelation.data import COCO_KEYPOINTS
from dreamrelation.pose import VitPoseKeypoints, build_tiny_vitpose, vitpose_base_config

BOX = (0.2, 0.1, 0.7, 0.95)


@pytest.fixture(scope="module")
def tiny_vitpose(tmp_path_factory):
    return build_tiny_vitpose(tmp_path_factory.mktemp("vitpose"), seed=0)


@pytest.fixture(scope="module")
def pose(tiny_vitpose) -> VitPoseKeypoints:
    return VitPoseKeypoints(tiny_vitpose)


def test_tiny_twin_gives_17_points_in_the_image(pose, tiny_vitpose):
    image = make_subject(2, size=120).resize((120, 90))
    points, scores = pose(image, list(BOX))
    assert points.shape == (17, 2) and points.dtype == np.float32
    assert scores.shape == (17,) and scores.dtype == np.float32
    assert ((points >= 0) & (points <= [119, 89])).all()
    assert ((scores >= 0) & (scores <= 1)).all() and scores.max() > 0
    assert len(np.unique(points.round(2), axis=0)) > 1  # the heatmaps differ: not one point for all
    again = VitPoseKeypoints(tiny_vitpose)(image, BOX)  # tuple box, a freshly loaded model
    np.testing.assert_array_equal(again[0], points)
    np.testing.assert_array_equal(again[1], scores)
    assert len(pose.model.config.id2label) == 17 and pose.input_hw == (64, 48)


def test_keypoints_follow_the_box(pose):
    """The same content cut out at two offsets, boxed around the same person: the points move with the content.

    The padded box (1.25 x the box, grown to 3:4) stays inside both cut-outs, so the model sees the same crop.
    """
    big = make_subject(5, size=200)
    person = np.array([70.0, 60.0, 118.0, 124.0])  # xyxy in ``big`` pixels, 48 x 64
    results = []
    for dx, dy in ((0, 0), (13, 7)):
        cut = big.crop((dx, dy, dx + 160, dy + 160))
        box = (person - [dx, dy, dx, dy]) / 160.0
        points, scores = pose(cut, box.tolist())
        results.append((points + [dx, dy], scores))  # back to ``big`` pixels
    (a, score_a), (b, score_b) = results
    inside = (a > 1).all(axis=1) & (b > 1).all(axis=1)  # none clipped at the cut-outs' top-left
    assert inside.sum() >= 12
    np.testing.assert_allclose(a[inside], b[inside], atol=1e-3)
    np.testing.assert_allclose(score_a, score_b, atol=1e-5)


class _Echo(torch.nn.Module):
    """A stand-in pose model whose 17 heatmaps are the crop itself (red channel, un-normalized to [0, 1])."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, pixel_values: torch.Tensor):
        from transformers.models.vitpose.modeling_vitpose import VitPoseEstimatorOutput

        heat = pixel_values[:, :1] * self.std + self.mean  # (1, 1, in_h, in_w)
        return VitPoseEstimatorOutput(heatmaps=heat.expand(-1, 17, -1, -1))


@pytest.mark.parametrize("centre", [(37, 52), (60, 30), (70, 71)])
def test_points_are_pixels_with_centres_at_integers(tiny_vitpose, centre):
    """A bright Gaussian spot centred on pixel (x, y) comes back at (x, y): crop + decode are exact inverses and
    the output frame has pixel centres at integers (no half-pixel shift)."""
    pose = VitPoseKeypoints(tiny_vitpose)
    pose.model = _Echo(pose.processor.image_mean[0], pose.processor.image_std[0])
    gy, gx = np.mgrid[0:90, 0:120]
    spot = np.exp(-((gx - centre[0]) ** 2 + (gy - centre[1]) ** 2) / (2 * 3.0 ** 2))  # (90, 120), sigma 3 px
    image = Image.fromarray(np.repeat((spot * 255).round().astype(np.uint8)[..., None], 3, axis=2))
    points, scores = pose(image, BOX)
    np.testing.assert_allclose(points, np.tile(np.float32(centre), (17, 1)), atol=0.05)  # errors <= 0.02
    assert (scores > 0.9).all()


@pytest.mark.parametrize("box, message", [
    ([0.7, 0.1, 0.2, 0.9], r"box must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got \[0.7"),
    ([0.1, 0.1, 1.2, 0.9], r"box must satisfy .* got \[0.1, 0.1, 1.2, 0.9\]"),
    ([0.1, 0.2, 0.5], r"box must be 4 finite numbers \[x0, y0, x1, y1\], got \[0.1, 0.2, 0.5\]"),
    ([0.1, float("nan"), 0.5, 0.9], r"box must be 4 finite numbers .* got \[0.1, nan"),
])
def test_bad_box_raises_naming_it(pose, box, message):
    with pytest.raises(ValueError, match=message):
        pose(make_subject(0), box)


def test_non_image_raises_naming_it(pose):
    with pytest.raises(ValueError, match=r"image must be a PIL.Image.Image, got ndarray"):
        pose(np.zeros((64, 64, 3), np.uint8), list(BOX))


def test_vitpose_base_config_has_the_public_layout(tiny_vitpose):
    from transformers import VitPoseForPoseEstimation

    config = vitpose_base_config()
    assert [config.id2label[i] for i in range(17)] == list(COCO_KEYPOINTS)
    with torch.device("meta"):
        model = VitPoseForPoseEstimation(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["backbone.embeddings.patch_embeddings.projection.weight"] == (768, 3, 16, 16)
    assert shapes["backbone.embeddings.position_embeddings"] == (1, 16 * 12 + 1, 768)  # 256x192 / 16
    assert shapes["backbone.encoder.layer.11.mlp.fc2.weight"] == (768, 3072)
    assert shapes["head.conv.weight"] == (17, 768, 3, 3)  # simple decoder, 17 COCO heatmaps
    assert abs(sum(p.numel() for p in model.parameters()) - 86e6) < 0.5e6  # ViTPose-B: 86M
    assert_twin_layout(VitPoseForPoseEstimation, tiny_vitpose, shapes,
                       "backbone.encoder.layer.0.attention.attention.query.weight")
