"""Annotation backends: OWLv2 detection, SAM masks, BLIP captions, their refs and tiny twins, real layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreamrelation.engine import annotate
from dreamrelation.engine.annotate import (
    CAPTION_ID,
    OWLV2_ID,
    SAM_ID,
    AnnotatorRefs,
    Captioner,
    Detection,
    OwlDetector,
    SamMasker,
    annotator_refs,
    box_iou,
    nms,
)


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(height, width, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def detector(annotators_dir) -> OwlDetector:
    return OwlDetector(annotators_dir / "owlv2")


@pytest.fixture(scope="module")
def masker(annotators_dir) -> SamMasker:
    return SamMasker(annotators_dir / "sam")


# ------------------------------------------------------------------------------------------- pure boxes
def test_box_iou_known_values():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5]])
    b = torch.tensor([[0.0, 0.0, 0.5, 1.0], [2.0, 2.0, 3.0, 3.0], [0.3, 0.3, 0.3, 0.9]])
    expected = torch.tensor([[0.5, 0.0, 0.0], [0.5, 0.0, 0.0]])
    assert torch.allclose(box_iou(a, b), expected)


def test_nms_suppresses_above_half_and_orders_by_score():
    boxes = torch.tensor([
        [0.0, 0.0, 1.0, 1.0],  # 0.90
        [0.0, 0.0, 0.9, 1.0],  # 0.80: IoU 0.9 with box 0 -> dropped
        [0.0, 0.0, 0.5, 1.0],  # 0.70: IoU exactly 0.5 with box 0 -> kept (only IoU > 0.5 suppresses)
        [0.6, 0.6, 1.0, 1.0],  # 0.95: kept, first
    ])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    assert nms(boxes, scores).tolist() == [3, 0, 2]
    assert nms(boxes[:0], scores[:0]).tolist() == []
    with pytest.raises(ValueError, match="boxes must be"):
        nms(boxes, scores[:2])


# ------------------------------------------------------------------------------------------------ detector
def test_detect_structure_threshold_and_nms(detector):
    image = _image(64, 64)
    everything = detector.detect(image, ["a dog", "a red ball"], threshold=0.0)
    assert len(everything) == 2 and all(len(d) > 0 for d in everything)
    threshold = float(np.median([d.score for d in everything[0]]))
    result = detector.detect(image, ["a dog", "a red ball"], threshold=threshold)
    assert len(result) == 2
    assert 0 < len(result[0]) < len(everything[0])  # the threshold really filters
    for detections in result:
        scores = [d.score for d in detections]
        assert scores == sorted(scores, reverse=True)
        for d in detections:
            assert isinstance(d, Detection) and len(d.box) == 4
            x0, y0, x1, y1 = d.box
            assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0
            assert threshold <= d.score <= 1.0
        if len(detections) > 1:
            iou = box_iou(torch.tensor([d.box for d in detections]), torch.tensor([d.box for d in detections]))
            assert float((iou - torch.eye(len(detections))).max()) <= 0.5


def test_each_phrase_is_scored_on_its_own(detector):
    image = _image(64, 64, seed=1)
    both = detector.detect(image, ["a dog", "a red ball"], threshold=0.0)
    alone = detector.detect(image, ["a red ball"], threshold=0.0)
    assert len(both[1]) == len(alone[0])
    assert np.allclose([d.box for d in both[1]], [d.box for d in alone[0]], atol=1e-6)
    assert [d.score for d in both[1]] == pytest.approx([d.score for d in alone[0]], abs=1e-6)
    # a query longer than OWLv2's 16 tokens is truncated, not an error
    assert len(detector.detect(image, ["a very long description of a small brown dog"], 0.0)) == 1


@pytest.mark.parametrize("size", [(80, 48), (48, 80)])
def test_non_square_boxes_map_back_from_the_padded_square(detector, size):
    """OWLv2 pads to a square at the bottom / right: normalized boxes of the square scale by max(W, H) / (W, H)."""
    width, height = size
    image = _image(width, height, seed=2)
    inputs = detector.processor(text=[["a cat"]], images=image, return_tensors="pt")
    with torch.no_grad():
        out = detector.model(**inputs)
    cx, cy, w, h = out.pred_boxes[0].unbind(-1)  # normalized in the padded square
    side = max(width, height)
    expected = torch.stack([(cx - w / 2) * side / width, (cy - h / 2) * side / height,
                            (cx + w / 2) * side / width, (cy + h / 2) * side / height], dim=-1).clamp(0, 1)
    visible = (expected[:, 2] > expected[:, 0]) & (expected[:, 3] > expected[:, 1])
    assert 0 < int(visible.sum()) < len(expected)  # some predictions lie wholly in the padding
    expected = sorted(tuple(box) for box in expected[visible].tolist())

    got = detector.detect(image, ["a cat"], threshold=0.0)[0]
    assert len(got) == len(expected)
    assert np.allclose(sorted(d.box for d in got), expected, atol=1e-4)
    assert max(d.box[3 if height < width else 2] for d in got) <= 1.0


def test_nms_runs_inside_detect(annotators_dir):
    """Make every predicted box the same: NMS must leave exactly one per phrase, the best-scored one."""
    detector = OwlDetector(annotators_dir / "owlv2")
    head = detector.model.box_head.dense2
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        detector.model.box_bias[:] = torch.tensor([0.0, 0.0, -1.0, -1.0])  # one centered box, ~27% wide
    image = _image(64, 64, seed=3)
    inputs = detector.processor(text=[["a dog", "a cat"]], images=image, return_tensors="pt")
    with torch.no_grad():
        best = torch.sigmoid(detector.model(**inputs).logits[0]).max(dim=0).values  # (2,)
    result = detector.detect(image, ["a dog", "a cat"], threshold=0.0)
    assert [len(d) for d in result] == [1, 1]
    assert [d[0].score for d in result] == pytest.approx(best.tolist(), abs=1e-6)
    side = float(torch.sigmoid(torch.tensor(-1.0)))
    assert result[0][0].box == pytest.approx((0.5 - side / 2, 0.5 - side / 2, 0.5 + side / 2, 0.5 + side / 2),
                                             abs=1e-5)


@pytest.mark.parametrize("phrases, threshold, match", [
    ([], 0.1, "phrases"),
    ("a dog", 0.1, "phrases"),
    (["a dog", "  "], 0.1, r"phrases\[1\]"),
    (["a dog"], 1.5, "threshold"),
    (["a dog"], -0.1, "threshold"),
    (["a dog"], True, "threshold"),
])
def test_detect_rejects_bad_arguments(detector, phrases, threshold, match):
    with pytest.raises(ValueError, match=match):
        detector.detect(_image(32, 32), phrases, threshold)


def test_detect_rejects_non_images(detector):
    with pytest.raises(ValueError, match="image must be a PIL"):
        detector.detect(np.zeros((32, 32, 3)), ["a dog"], 0.1)


# -------------------------------------------------------------------------------------------------- masker
def test_masker_one_bool_mask_per_box_at_image_size(masker):
    image = _image(80, 48, seed=4)
    boxes = [(0.1, 0.1, 0.5, 0.9), (0.5, 0.2, 1.0, 1.0), (0.0, 0.0, 1.0, 1.0)]
    masks = masker(image, boxes)
    assert len(masks) == 3
    for mask in masks:
        assert mask.dtype == np.bool_ and mask.shape == (48, 80)
    assert masker(image, []) == []

    # the returned mask is SAM's candidate with the highest predicted IoU
    inputs = masker.processor(images=image, input_boxes=[[[x0 * 80, y0 * 48, x1 * 80, y1 * 48]
                                                          for x0, y0, x1, y1 in boxes]], return_tensors="pt")
    with torch.no_grad():
        out = masker.model(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"],
                           multimask_output=True)
    candidates = masker.processor.post_process_masks(
        [out.pred_masks[0]], inputs["original_sizes"], inputs["reshaped_input_sizes"])[0]  # (3, 3, H, W)
    for k, mask in enumerate(masks):
        assert np.array_equal(mask, candidates[k, int(out.iou_scores[0, k].argmax())].numpy())


@pytest.mark.parametrize("box, match", [
    ((0.2, 0.2, 1.2, 0.5), r"boxes\[0\]"),
    ((0.5, 0.2, 0.4, 0.6), r"boxes\[0\]"),
    ((0.1, 0.1, 0.5), r"boxes\[0\]"),
    ((0.1, float("nan"), 0.5, 0.5), r"boxes\[0\]"),
])
def test_masker_rejects_bad_boxes(masker, box, match):
    with pytest.raises(ValueError, match=match):
        masker(_image(32, 32), [box])


# ----------------------------------------------------------------------------------------------- captioner
def test_captioner_returns_a_deterministic_short_string(annotators_dir):
    captioner = Captioner(annotators_dir / "blip", max_new_tokens=4)
    image = _image(48, 64, seed=5)
    caption = captioner(image)
    assert isinstance(caption, str)
    assert captioner(image) == caption
    assert len(caption.replace(" ", "")) <= 4  # the tiny vocabulary's tokens are single characters
    with pytest.raises(ValueError, match="max_new_tokens"):
        Captioner(annotators_dir / "blip", max_new_tokens=0)


# ----------------------------------------------------------------------------------------- refs and twins
def test_annotator_refs(annotators_dir, tmp_path):
    from dreamrelation.engine.keypoints import DINOV2_ID
    from dreamrelation.engine.pose import VITPOSE_ID

    tiny = annotator_refs("tiny")
    assert tiny == AnnotatorRefs(*(str(annotators_dir / s) for s in ("owlv2", "sam", "dinov2", "vitpose", "blip")),
                                 animal_pose=str(annotators_dir / "vitpose_ap10k"))
    assert all((Path(ref) / "config.json").is_file() for ref in vars(tiny).values())
    assert annotator_refs(annotators_dir) == tiny
    real = AnnotatorRefs(OWLV2_ID, SAM_ID, DINOV2_ID, VITPOSE_ID, CAPTION_ID)
    assert annotator_refs("sdxl") == real and real.animal_pose is None  # no public AP-10K head
    assert annotator_refs(tmp_path) == real  # a model folder without annotators
    for sub in ("owlv2", "sam", "dinov2", "vitpose", "blip"):  # a folder made before the AP-10K twin existed
        (tmp_path / "old" / sub).mkdir(parents=True)
        (tmp_path / "old" / sub / "config.json").write_text("{}")
    old = annotator_refs(tmp_path / "old")
    assert old.pose == str(tmp_path / "old" / "vitpose") and old.animal_pose is None
    with pytest.raises(ValueError, match="preset.*'nope'"):
        annotator_refs("nope")


def test_tiny_annotators_build_once_and_load(annotators_dir):
    from transformers import (
        BlipForConditionalGeneration,
        Dinov2Model,
        Owlv2ForObjectDetection,
        SamModel,
        VitPoseForPoseEstimation,
    )

    assert annotators_dir.name == f"tiny-annotators-v{annotate.TINY_ANNOTATORS_VERSION}-seed0"
    weights = sorted(annotators_dir.rglob("*.safetensors"))
    assert len(weights) == 6
    before = {p: p.stat().st_mtime_ns for p in weights}
    assert annotate.tiny_annotator_dir() == annotators_dir
    assert {p: p.stat().st_mtime_ns for p in weights} == before
    assert not [p for p in annotators_dir.parent.iterdir() if p.name.startswith(".tiny-annotators-")]
    for cls, sub in ((Owlv2ForObjectDetection, "owlv2"), (SamModel, "sam"), (Dinov2Model, "dinov2"),
                     (VitPoseForPoseEstimation, "vitpose"), (BlipForConditionalGeneration, "blip"),
                     (VitPoseForPoseEstimation, "vitpose_ap10k")):
        model = cls.from_pretrained(annotators_dir / sub)
        assert sum(p.numel() for p in model.parameters()) < 2_000_000


def test_tiny_build_is_deterministic_per_seed(annotators_dir, tmp_path):
    from safetensors.torch import load_file

    # the OWLv2 twin stands for all: the same seed gives the same weights, another seed other weights
    torch.manual_seed(0)
    annotate._build_tiny_owlv2(tmp_path / "a")
    torch.manual_seed(1)
    annotate._build_tiny_owlv2(tmp_path / "b")
    cached = load_file(annotators_dir / "owlv2" / "model.safetensors")
    same, other = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(cached[k], same[k]) for k in cached)
    assert not all(torch.equal(cached[k], other[k]) for k in cached)


# ------------------------------------------------------------------------------------------ real layouts
def _meta(cls, config):
    with torch.device("meta"):
        return cls(config)


def _unique_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _same_layout(tiny_folder: Path, real_model) -> None:
    """Every tensor name of the tiny checkpoint exists in the real architecture (tiny has fewer layers)."""
    from safetensors import safe_open

    real = set(real_model.state_dict())
    with safe_open(str(tiny_folder / "model.safetensors"), "pt") as f:
        missing = sorted(set(f.keys()) - real)
    assert missing == []


def test_owlv2_base_layout(annotators_dir):
    from transformers import Owlv2ForObjectDetection

    model = _meta(Owlv2ForObjectDetection, annotate.owlv2_base_config())
    assert 154e6 < _unique_params(model) < 156e6  # the hub's "155M params"
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert tuple(model.box_bias.shape) == (3600, 4)  # 960 / 16 = 60 x 60 boxes (a buffer computed at init)
    assert shapes["owlv2.vision_model.embeddings.position_embedding.weight"] == (3601, 768)
    assert shapes["owlv2.text_model.embeddings.token_embedding.weight"] == (49408, 512)
    assert shapes["owlv2.text_model.embeddings.position_embedding.weight"] == (16, 512)
    assert shapes["class_head.dense0.weight"] == (512, 768)
    assert shapes["box_head.dense2.weight"] == (4, 768)
    assert shapes["objectness_head.dense2.weight"] == (1, 768)
    _same_layout(annotators_dir / "owlv2", model)


def test_sam_vit_base_layout(annotators_dir):
    from transformers import SamModel

    model = _meta(SamModel, annotate.sam_vit_base_config())
    assert 93.5e6 < _unique_params(model) < 94.0e6  # facebook/sam-vit-base: 93.7M
    assert 89.5e6 < _unique_params(model.vision_encoder) < 89.8e6
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["vision_encoder.pos_embed"] == (1, 64, 64, 768)
    assert shapes["vision_encoder.layers.0.attn.rel_pos_h"] == (27, 64)  # windowed: 2 * 14 - 1
    assert shapes["vision_encoder.layers.2.attn.rel_pos_h"] == (127, 64)  # global: 2 * 64 - 1
    assert shapes["vision_encoder.neck.conv1.weight"] == (256, 768, 1, 1)
    assert shapes["mask_decoder.iou_prediction_head.proj_out.weight"] == (4, 256)
    assert shapes["shared_image_embedding.positional_embedding"] == (2, 128)
    _same_layout(annotators_dir / "sam", model)


def test_blip_base_layout(annotators_dir):
    from transformers import BlipForConditionalGeneration

    model = _meta(BlipForConditionalGeneration, annotate.blip_base_config())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    unique = _unique_params(model)
    assert 223.5e6 < unique < 224.5e6
    tied = shapes["text_decoder.cls.predictions.decoder.weight"]
    assert tied == (30524, 768)
    assert 247e6 < unique + tied[0] * tied[1] < 248e6  # the hub's "247M params" counts the tied head twice
    assert shapes["vision_model.embeddings.position_embedding"] == (1, 577, 768)  # (384 / 16)^2 + 1
    assert shapes["text_decoder.bert.embeddings.word_embeddings.weight"] == (30524, 768)
    assert shapes["text_decoder.bert.encoder.layer.11.crossattention.self.key.weight"] == (768, 768)
    _same_layout(annotators_dir / "blip", model)
