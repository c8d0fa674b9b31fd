"""ViTPose keypoints: the tiny twins (COCO person, AP-10K animal ViTPose++) through transformers' processor, the box
and pixel conventions, the real configs' layouts, and the conversion of the authors' ViTPose++ checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_twin_layout, make_subject
from PIL import Image

from dreamrelation.engine.pose import (
    AP10K_DATASET_INDEX,
    VITPOSE_PLUS_DATASETS,
    VitPoseKeypoints,
    _label,
    build_tiny_vitpose,
    build_tiny_vitpose_plus,
    convert_vitpose_plus,
    keypoint_layout,
    save_vitpose_plus,
    vitpose_base_config,
    vitpose_plus_base_config,
)
from dreamrelation.train.data import AP10K_KEYPOINTS, COCO_KEYPOINTS

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


# ------------------------------------------------------------------------------------------- AP-10K (ViTPose++)
@pytest.fixture(scope="module")
def tiny_vitpose_plus(tmp_path_factory):
    return build_tiny_vitpose_plus(tmp_path_factory.mktemp("vitpose_plus"), seed=0)


def test_tiny_ap10k_twin_runs_its_expert_and_names_its_layout(tiny_vitpose_plus, tiny_vitpose):
    pose = VitPoseKeypoints(tiny_vitpose_plus, dataset_index=AP10K_DATASET_INDEX, layout="ap10k")
    assert pose.layout == "ap10k" and VitPoseKeypoints(tiny_vitpose).layout == "coco"
    image = make_subject(3, size=96)
    points, scores = pose(image, list(BOX))
    assert points.shape == (17, 2) and ((scores >= 0) & (scores <= 1)).all()
    coco_expert = VitPoseKeypoints(tiny_vitpose_plus, dataset_index=0)(image, list(BOX))
    assert not np.array_equal(coco_expert[1], scores)  # dataset_index picks the MLP experts
    with pytest.raises(ValueError, match=r"dataset_index must be an integer in \[0, 5\] .* \(AP-10K: 3\), got None"):
        VitPoseKeypoints(tiny_vitpose_plus)
    with pytest.raises(ValueError, match=r"dataset_index must be None for the single-dataset ViTPose .* got 3"):
        VitPoseKeypoints(tiny_vitpose, dataset_index=3)
    # a COCO head asked for AP-10K keypoints (what the hub's ViTPose++ conversions are) is refused, naming it
    with pytest.raises(ValueError, match=r"its head predicts coco keypoints .* not ap10k \(the hub's ViTPose\+\+"):
        VitPoseKeypoints(tiny_vitpose, layout="ap10k")


def test_keypoint_layout_reads_the_hub_and_mmpose_spellings():
    from transformers import VitPoseConfig

    coco = ["Nose", "L_Eye", "R_Eye", "L_Ear", "R_Ear", "L_Shoulder", "R_Shoulder", "L_Elbow", "R_Elbow", "L_Wrist",
            "R_Wrist", "L_Hip", "R_Hip", "L_Knee", "R_Knee", "L_Ankle", "R_Ankle"]  # convert_vitpose_to_hf.py
    ap10k = ["L_Eye", "R_Eye", "Nose", "Neck", "Root of tail", "L_Shoulder", "L_Elbow", "L_F_Paw", "R_Shoulder",
             "R_Elbow", "R_F_Paw", "L_Hip", "L_Knee", "L_B_Paw", "R_Hip", "R_Knee", "R_B_Paw"]  # mmpose ap10k.py
    assert keypoint_layout(VitPoseConfig(id2label=dict(enumerate(coco)))) == "coco"
    assert keypoint_layout(VitPoseConfig(id2label=dict(enumerate(ap10k)))) == "ap10k"
    assert keypoint_layout(VitPoseConfig(id2label={str(i): n for i, n in enumerate(ap10k)})) == "ap10k"
    assert keypoint_layout(VitPoseConfig(num_labels=17)) is None  # LABEL_0 ...
    assert [_label(n) for n in ap10k] == list(AP10K_KEYPOINTS)


def original_vitpose_plus(hidden=768, layers=12, part=192, device="meta", grid=(16, 12), patch=16):
    """An original (mmpose TopDownMoE) ViTPose++ state dict by the original key names: COCO ``keypoint_head`` and
    the ``associate_keypoint_heads`` of AiC, MPII, AP-10K, APT-36K, WholeBody; each head's last bias is filled with
    its dataset number (the head's identity); the rest on ``device``."""
    def t(*shape, fill=None):
        return torch.full(shape, float(fill)) if fill is not None else torch.empty(shape, device=device)

    mlp = 4 * hidden
    sd = {"backbone.cls_token": t(1, 1, hidden), "backbone.pos_embed": t(1, grid[0] * grid[1] + 1, hidden),
          "backbone.patch_embed.proj.weight": t(hidden, 3, patch, patch), "backbone.patch_embed.proj.bias": t(hidden),
          "backbone.last_norm.weight": t(hidden), "backbone.last_norm.bias": t(hidden)}
    for i in range(layers):
        b = f"backbone.blocks.{i}."
        sd.update({b + "norm1.weight": t(hidden), b + "norm1.bias": t(hidden), b + "norm2.weight": t(hidden),
                   b + "norm2.bias": t(hidden), b + "attn.qkv.weight": t(3 * hidden, hidden),
                   b + "attn.qkv.bias": torch.arange(3 * hidden, dtype=torch.float32) if i == 0 else t(3 * hidden),
                   b + "attn.proj.weight": t(hidden, hidden), b + "attn.proj.bias": t(hidden),
                   b + "mlp.fc1.weight": t(mlp, hidden), b + "mlp.fc1.bias": t(mlp),
                   b + "mlp.fc2.weight": t(hidden - part, mlp), b + "mlp.fc2.bias": t(hidden - part)})
        for k in range(6):
            sd.update({b + f"mlp.experts.{k}.weight": t(part, mlp), b + f"mlp.experts.{k}.bias": t(part)})
    heads = ["keypoint_head."] + [f"associate_keypoint_heads.{i}." for i in range(5)]
    for dataset, (head, k) in enumerate(zip(heads, (17, 14, 16, 17, 17, 133))):
        sd.update({head + "deconv_layers.0.weight": t(hidden, 256, 4, 4), head + "deconv_layers.3.weight":
                   t(256, 256, 4, 4), head + "final_layer.weight": t(k, 256, 1, 1),
                   head + "final_layer.bias": t(k, fill=dataset)})
        for bn in ("deconv_layers.1.", "deconv_layers.4."):
            sd.update({head + bn + n: t(256) for n in ("weight", "bias", "running_mean", "running_var")})
            sd[head + bn + "num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    return sd


def test_vitpose_plus_base_with_its_ap10k_head_loads_the_original_layout(tiny_vitpose_plus):
    """The authors' ViTPose++-B checkpoint layout converts to exactly the keys of the AP-10K model (strict load on
    the meta device), with the AP-10K head (``associate_keypoint_heads.2``) and q / k / v split in order."""
    from transformers import VitPoseForPoseEstimation

    config = vitpose_plus_base_config("ap10k")
    assert [config.id2label[i] for i in range(17)] == list(AP10K_KEYPOINTS) and keypoint_layout(config) == "ap10k"
    with torch.device("meta"):
        model = VitPoseForPoseEstimation(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["backbone.encoder.layer.11.mlp.experts.5.weight"] == (192, 3072)
    assert shapes["backbone.encoder.layer.11.mlp.fc2.weight"] == (576, 3072)  # 768 - 192 shared features
    assert shapes["head.deconv1.weight"] == (768, 256, 4, 4) and shapes["head.conv.weight"] == (17, 256, 1, 1)
    converted = convert_vitpose_plus(original_vitpose_plus(), "ap10k")
    assert {k: tuple(v.shape) for k, v in converted.items()} == shapes
    model.load_state_dict(converted, strict=True, assign=True)
    assert (model.head.conv.bias == VITPOSE_PLUS_DATASETS.index("ap10k")).all()  # the AP-10K head, not COCO's
    bias = torch.arange(3 * 768, dtype=torch.float32)
    layer = model.backbone.encoder.layer[0].attention.attention
    for k, part in enumerate((layer.query, layer.key, layer.value)):
        torch.testing.assert_close(part.bias, bias[k * 768:(k + 1) * 768])
    assert (convert_vitpose_plus(original_vitpose_plus(), "coco")["head.conv.bias"] == 0).all()
    assert_twin_layout(VitPoseForPoseEstimation, tiny_vitpose_plus, shapes,
                       "backbone.encoder.layer.0.mlp.experts.3.weight")
    with pytest.raises(ValueError, match=r"dataset must be one of \['coco', .*\], got 'horses'"):
        convert_vitpose_plus({}, "horses")
    with pytest.raises(ValueError, match=r"state_dict has no associate_keypoint_heads.2.\* keys"):
        convert_vitpose_plus({"backbone.pos_embed": torch.zeros(1)}, "ap10k")


def test_save_vitpose_plus_makes_a_folder_the_engine_loads(tmp_path):
    """A small checkpoint in the original layout (torch.save, as the authors ship theirs) -> a transformers folder
    that ``VitPoseKeypoints`` runs with the AP-10K expert."""
    original = {k: (v if v.device.type == "cpu" else torch.randn(v.shape) * 0.02)
                for k, v in original_vitpose_plus(hidden=32, layers=2, part=8, device="meta").items()}
    torch.save({"meta": {}, "state_dict": original}, tmp_path / "vitpose+_tiny.pth")
    folder = save_vitpose_plus(tmp_path / "vitpose+_tiny.pth", tmp_path / "ap10k")
    pose = VitPoseKeypoints(folder, dataset_index=AP10K_DATASET_INDEX, layout="ap10k")
    assert pose.input_hw == (256, 192) and pose.model.config.backbone_config.num_experts == 6
    points, scores = pose(make_subject(1, size=80), list(BOX))
    assert points.shape == (17, 2) and np.isfinite(points).all() and scores.shape == (17,)
    torch.save({"state_dict": {"backbone.pos_embed": torch.zeros(1)}}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"no associate_keypoint_heads.2.\* keys"):
        save_vitpose_plus(tmp_path / "bad.pth", tmp_path / "bad")
