"""The data engine without Ray: gates on crafted detections, the annotator on synthetic images with known truth
(keypoint layouts per class and their fallback, the copy-paste gate with real DINO), the preset's default gates, the
pipeline's plain text-to-image, relation-LoRA targets, and the images-API generator end to end against a local
HTTP server."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, invoke, make_subject
from PIL import Image

from dreamrelation.engine.annotate import Detection
from dreamrelation.engine.gates import (
    TINY_GATES,
    TINY_GATES_NOTE,
    Annotation,
    Annotator,
    Drop,
    GateConfig,
    KeypointConfig,
    box_iou,
    box_mask,
    check_clip_r,
    check_copy_paste,
    check_keypoints,
    check_layout,
    check_overlap,
    clean_box,
    default_gates,
    gates_for,
    pick_detections,
)
from dreamrelation.engine.generators import edit_prompt

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
LORAS = ROOT / "manifests" / "examples" / "loras"
PERMISSIVE = replace(TINY_GATES, visibility_threshold=0.5)  # every gate measured, none drops


def det(box, score=0.9) -> Detection:
    return Detection(tuple(float(v) for v in box), float(score))


# ------------------------------------------------------------------------------------------------------ gates

LEFT, RIGHT = [0.0, 0.2, 0.5, 0.9], [0.5, 0.2, 1.0, 0.9]


def test_each_subject_found_once_picks_its_detection():
    picked = pick_detections({"dog": [det(LEFT, 0.7)], "cat": [det(RIGHT, 0.4)]}, ["dog", "cat"], [LEFT, RIGHT])
    assert [d.box for d in picked] == [tuple(LEFT), tuple(RIGHT)]
    assert [d.score for d in picked] == [0.7, 0.4]


def test_a_missing_subject_is_dropped_naming_its_class():
    drop = pick_detections({"dog": [det(LEFT)], "cat": []}, ["dog", "cat"], [LEFT, RIGHT])
    assert isinstance(drop, Drop)
    assert (drop.stage, drop.reason) == ("gate", "subject_not_found")
    assert "'cat' found 0 time(s)" in drop.detail


def test_a_subject_found_twice_is_dropped_unless_more_instances_are_allowed():
    found = {"dog": [det(LEFT, 0.3), det(RIGHT, 0.8)], "cat": [det(RIGHT)]}
    drop = pick_detections(found, ["dog", "cat"], [LEFT, RIGHT], max_instances=1)
    assert (drop.reason, drop.stage) == ("subject_found_twice", "gate")
    assert "'dog' found 2 times" in drop.detail and "0.8" in drop.detail
    picked = pick_detections(found, ["dog", "cat"], [LEFT, RIGHT], max_instances=2)
    assert picked[0].score == 0.8  # the best-scoring instance, not the first listed


def test_two_subjects_of_one_class_are_matched_to_their_layout_boxes():
    # the higher-scoring detection lies on the right: it goes to the subject whose layout box is on the right
    found = {"dog": [det(RIGHT, 0.9), det(LEFT, 0.6)]}
    picked = pick_detections(found, ["dog", "dog"], [LEFT, RIGHT])
    assert [d.box for d in picked] == [tuple(LEFT), tuple(RIGHT)]
    drop = pick_detections({"dog": [det(LEFT)]}, ["dog", "dog"], [LEFT, RIGHT])
    assert drop.reason == "subject_not_found" and "2 subject(s) need it" in drop.detail


def test_keypoint_clip_r_layout_and_overlap_gates():
    good, weak = np.full(17, 0.6), np.full(17, 0.2)
    assert check_keypoints([good, good], 0.6) is None  # equal passes
    drop = check_keypoints([good, weak], 0.5)
    assert (drop.reason, drop.stage) == ("low_keypoint_confidence", "gate") and "subject 1" in drop.detail
    assert check_keypoints([np.full(17, np.nan)], 0.0).reason == "low_keypoint_confidence"  # NaN never passes
    assert check_clip_r(12.0, None) is None and check_clip_r(None, 20.0) is None
    assert check_clip_r(20.0, 20.0) is None
    drop = check_clip_r(19.5, 20.0)
    assert drop.reason == "low_clip_r" and "19.500 < 20.0" in drop.detail
    assert check_layout([0.9, 0.2], None) is None
    assert check_layout([0.9, 0.2], 0.5).reason == "off_layout"
    assert check_overlap([LEFT, RIGHT], 0.8) is None
    drop = check_overlap([LEFT, [0.0, 0.2, 0.5, 0.85]], 0.8)
    assert drop.reason == "subjects_overlap" and "subjects 0 and 1" in drop.detail
    assert check_overlap([LEFT, LEFT], None) is None


def test_box_helpers():
    assert box_iou(LEFT, RIGHT) == 0.0
    assert box_iou([0, 0, 1, 1], [0, 0, 0.5, 1]) == pytest.approx(0.5)
    assert clean_box([-0.2, 0.1, 1.3, 0.9], (64, 64)) == (0.0, 0.1, 1.0, 0.9)
    assert clean_box([0.5, 0.5, 0.505, 0.9], (64, 64)) is None  # under one pixel wide
    mask = box_mask([0.1, 0.25, 0.5, 0.75], (40, 20))  # (W, H) = (40, 20)
    assert mask.shape == (20, 40) and mask.sum() == 16 * 10 and mask[5:15, 4:20].all()


def test_copy_paste_gate_drops_a_subject_crop_too_like_its_subject_image():
    assert check_copy_paste([89.9, 90.0], 90.0) is None  # equal passes
    drop = check_copy_paste([40.0, 93.5], 90.0)
    assert (drop.stage, drop.reason) == ("gate", "copy_paste") and "subject 1: DINO 93.500" in drop.detail
    assert check_copy_paste([99.0, None], None) is None and check_copy_paste([None], 10.0) is None


def test_default_gates_are_the_presets_and_say_so_for_tiny():
    real = default_gates("sdxl")
    assert real == GateConfig() and (real.min_clip_r, real.max_copy_paste_dino) == (17.0, 90.0)  # both on
    assert default_gates("tiny") == TINY_GATES and TINY_GATES.min_clip_r == 0.0  # on, at a value noise passes
    assert default_gates("sdxl", metrics=False).min_clip_r is None
    assert gates_for("tiny") == (TINY_GATES, TINY_GATES_NOTE)
    gates, note = gates_for("tiny", min_clip_r=5.0, max_instances=None)
    assert gates == replace(TINY_GATES, min_clip_r=5.0) and note == f"{TINY_GATES_NOTE} (except min_clip_r, given)"
    assert gates_for("sdxl", max_subject_iou=1.0) == (replace(GateConfig(), max_subject_iou=1.0), None)


@pytest.mark.parametrize("field, value", [
    ("detection_threshold", 1.5), ("max_instances", 0), ("min_keypoint_confidence", -0.1),
    ("min_clip_r", 101.0), ("min_layout_iou", "0.5"), ("max_subject_iou", 2.0), ("max_copy_paste_dino", -1.0),
])
def test_gate_config_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=f"{field} must .* got {re.escape(repr(value))}"):
        GateConfig(**{field: value})


def test_edit_prompt_names_the_classes_once():
    assert edit_prompt("A dog hugs a cat.", ["dog", "cat"]) == "The photo of the same dog and cat: A dog hugs a cat."
    assert edit_prompt("p", ["dog"]) == "The photo of the same dog: p"
    assert edit_prompt("p", ["a", "b", "a"]) == "The photo of the same a and b: p"


# ---------------------------------------------------------------------------------------------- annotator

WHITE = 255


def textured(seed: int, size: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """A (size, size, 3) random texture (6 x 6 colours, bicubic) and its disc mask."""
    rng = np.random.RandomState(seed)
    small = Image.fromarray((rng.rand(6, 6, 3) * 200).astype("uint8"))
    tex = np.asarray(small.resize((size, size), Image.Resampling.BICUBIC))
    yy, xx = np.mgrid[:size, :size]
    disc = (xx - size / 2 + 0.5) ** 2 + (yy - size / 2 + 0.5) ** 2 <= (size / 2 - 0.5) ** 2
    return tex, disc


def paste(canvas: np.ndarray, tex: np.ndarray, disc: np.ndarray, x: int, y: int) -> tuple[float, ...]:
    """Paste the disc of ``tex`` at (x, y); return its normalized box."""
    s = tex.shape[0]
    region = canvas[y:y + s, x:x + s]
    region[disc] = tex[disc]
    h, w = canvas.shape[:2]
    return x / w, y / h, (x + s) / w, (y + s) / h


class Scene:
    """Two textured subjects: each alone in its subject image, both moved into a target (known offsets)."""

    def __init__(self):
        self.textures = [textured(1), textured(2)]
        self.subject_xy = [(20, 20), (20, 20)]
        self.target_xy = [(4, 22), (36, 18)]
        self.subjects, self.subject_boxes = [], []
        for (tex, disc), (x, y) in zip(self.textures, self.subject_xy):
            canvas = np.full((64, 64, 3), WHITE, np.uint8)
            self.subject_boxes.append(paste(canvas, tex, disc, x, y))
            self.subjects.append(Image.fromarray(canvas))
        canvas = np.full((64, 64, 3), WHITE, np.uint8)
        self.target_boxes = [paste(canvas, tex, disc, x, y) for (tex, disc), (x, y) in zip(self.textures,
                                                                                          self.target_xy)]
        self.target = Image.fromarray(canvas)


def key(image: Image.Image) -> str:
    return hashlib.md5(image.convert("RGB").tobytes()).hexdigest()


class ScriptedDetector:
    """Returns the detections listed for an image (by content) and phrase."""

    def __init__(self):
        self.table: dict[tuple[str, str], list[Detection]] = {}

    def detect(self, image, phrases, threshold):
        return [[d for d in self.table.get((key(image), p), []) if d.score >= threshold] for p in phrases]


def perfect_masker(image, boxes):
    """SAM as it should be: the non-background pixels inside each box."""
    fg = (np.asarray(image.convert("RGB")) != WHITE).any(axis=-1)
    return [fg & box_mask(b, image.size) for b in boxes]


class FixedScorer:
    def __init__(self, clip_r: float, copy_paste=(40.0, 45.0)):
        self.clip_r, self.copy_paste, self.calls, self.pairs = clip_r, list(copy_paste), [], []

    def score(self, images, prompts, relation_phrases, subject_images, boxes):
        self.calls.append((prompts, relation_phrases, boxes))
        return [{"clip_t": 31.0, "clip_r": self.clip_r, "clip_i": 55.0, "clip_i_crop": 50.0, "dino": 40.0}
                for _ in images]

    def dino_pair_scores(self, images, others):
        self.pairs.append([(a.size, b.size) for a, b in zip(images, others)])
        return self.copy_paste[:len(images)]


class FakePose:
    """ViTPose stand-in: 17 points spread over the box and fixed scores."""

    def __init__(self, scores):
        self.scores, self.calls = np.asarray(scores, np.float32), 0

    def __call__(self, image, box):
        self.calls += 1
        w, h = image.size
        t = np.linspace(0.2, 0.8, 17)
        pts = np.stack([(box[0] + t * (box[2] - box[0])) * w, (box[1] + t * (box[3] - box[1])) * h], axis=1)
        return pts.astype(np.float32), self.scores


@pytest.fixture
def scene() -> Scene:
    return Scene()


def annotator_for(scene: Scene, gates=PERMISSIVE, clip_r=25.0, poses=None, phrases=("dog", "cat"), scorer=None):
    from dreamrelation.engine.keypoints import ColourFeatures

    detector = ScriptedDetector()
    for j, phrase in enumerate(phrases):
        detector.table[(key(scene.target), phrase)] = [det(scene.target_boxes[j], 0.8)]
        detector.table[(key(scene.subjects[j]), phrase)] = [det(scene.subject_boxes[j], 0.9)]
    return Annotator(detector, perfect_masker, ColourFeatures(), poses=poses, scorer=scorer or FixedScorer(clip_r),
                     gates=gates)


def test_annotator_carries_points_to_where_the_subjects_moved(scene):
    # dog and cat ask for AP-10K keypoints; with no pose model for them they fall back to carried points
    annotator = annotator_for(scene, gates=GateConfig(min_keypoint_confidence=0.3))
    result = annotator.annotate(scene.target, scene.subjects, ["dog", "cat"], [LEFT, RIGHT], "A dog hugs a cat.",
                                "hugs")
    assert isinstance(result, Annotation), result
    assert result.layouts == "points,points" and result.clip_r == 25.0 and result.caption is None
    assert (result.metrics["copy_paste_dino_0"], result.metrics["copy_paste_dino_1"]) == (40.0, 45.0)
    assert annotator.scorer.pairs == [[((24, 24), (24, 24))] * 2]  # each subject's crop: target vs subject image
    assert annotator.scorer.calls[0][1] == ["hugs"]
    errors = []
    for j, s in enumerate(result.subjects):
        assert s.box == pytest.approx(scene.target_boxes[j])
        assert s.subject_box == pytest.approx(scene.subject_boxes[j])
        assert s.target_mask.shape == (64, 64) and s.target_mask.sum() == scene.textures[j][1].sum()
        assert s.target_keypoints.shape == (17, 2) and s.subject_keypoints.shape == (17, 2)
        # normalized -> pixel centres; the truth is the subject point moved by the paste offset
        subject_px = s.subject_keypoints * 64 - 0.5
        target_px = s.target_keypoints * 64 - 0.5
        shift = np.subtract(scene.target_xy[j], scene.subject_xy[j])
        visible = s.target_visibility > 0
        errors.append(np.linalg.norm(target_px - (subject_px + shift), axis=1)[visible])
        inside = s.target_mask[np.round(target_px[:, 1]).astype(int), np.round(target_px[:, 0]).astype(int)]
        assert inside[visible].all()
        assert set(np.unique(s.target_visibility)) <= {0.0, 1.0}
        np.testing.assert_array_equal(s.target_visibility, (s.confidence >= 0.5).astype(float))
        assert s.subject_visibility is None
        assert result.metrics[f"keypoint_confidence_{j}"] == pytest.approx(float(np.mean(s.confidence)), abs=1e-4)
    # the points the annotation marks visible (confidence >= 0.5) land within a few pixels of the truth
    errors = np.concatenate(errors)
    assert len(errors) >= 24 and np.median(errors) < 1.5 and errors.max() < 3.0, errors


def test_annotator_drops_with_reason_and_keeps_the_metrics(scene):
    drop = annotator_for(scene, gates=GateConfig(min_clip_r=30.0), clip_r=25.0).annotate(
        scene.target, scene.subjects, ["dog", "cat"], [LEFT, RIGHT], "A dog hugs a cat.", "hugs")
    assert (drop.stage, drop.reason) == ("gate", "low_clip_r") and drop.metrics["clip_r"] == 25.0

    annotator = annotator_for(scene)
    annotator.detector.table[(key(scene.target), "cat")] = []
    drop = annotator.annotate(scene.target, scene.subjects, ["dog", "cat"], [LEFT, RIGHT], "p", "hugs")
    assert drop.reason == "subject_not_found" and drop.metrics["detections_cat"] == 0.0

    made = annotator_for(scene).annotate(scene.target, scene.subjects, ["dog", "cat"], [LEFT, RIGHT], "p", "hugs")
    best = max(made.metrics["keypoint_confidence_0"], made.metrics["keypoint_confidence_1"])
    assert best < 1.0
    strict = GateConfig(detection_threshold=0.0, min_keypoint_confidence=min(1.0, best + 1e-3))
    drop = annotator_for(scene, gates=strict).annotate(scene.target, scene.subjects, ["dog", "cat"],
                                                       [LEFT, RIGHT], "p", "hugs")
    assert drop.reason == "low_keypoint_confidence" and "keypoint_confidence_1" in drop.metrics


def test_people_get_vitpose_keypoints_in_the_coco_layout(scene):
    scores = np.linspace(0.0, 1.0, 17)
    pose = FakePose(scores)
    result = annotator_for(scene, poses={"coco": pose}, phrases=("person", "cat")).annotate(
        scene.target, scene.subjects, ["person", "cat"], [LEFT, RIGHT], "A person hugs a cat.", "hugs")
    assert result.layouts == "coco,points" and pose.calls == 2
    person = result.subjects[0]
    np.testing.assert_allclose(person.confidence, scores, atol=1e-6)  # min of equal subject and target scores
    np.testing.assert_array_equal(person.subject_visibility, (scores >= 0.5).astype(float))
    t = np.linspace(0.2, 0.8, 17)
    x0, y0, x1, y1 = scene.target_boxes[0]
    np.testing.assert_allclose(person.target_keypoints[:, 0], np.clip((x0 + t * (x1 - x0)) + 0.5 / 64, 0, 1),
                               atol=1e-5)


def test_animals_get_ap10k_keypoints_unless_the_pose_model_is_unsure(scene):
    sure, unsure = FakePose(np.full(17, 0.8)), FakePose(np.full(17, 0.2))
    gates = replace(PERMISSIVE, min_keypoint_confidence=0.3)
    result = annotator_for(scene, gates=gates, poses={"ap10k": sure}).annotate(
        scene.target, scene.subjects, ["dog", "cat"], [LEFT, RIGHT], "A dog hugs a cat.", "hugs")
    assert result.layouts == "ap10k,ap10k" and sure.calls == 4  # subject image and target, per subject
    np.testing.assert_allclose(result.subjects[1].confidence, 0.8, atol=1e-6)
    assert "pose_confidence_0" not in result.metrics
    # less confident than the keypoint gate: dense correspondence instead, the pose model's confidence recorded
    result = annotator_for(scene, gates=gates, poses={"ap10k": unsure}).annotate(
        scene.target, scene.subjects, ["dog", "cat"], [LEFT, RIGHT], "A dog hugs a cat.", "hugs")
    assert result.layouts == "points,points" and result.metrics["pose_confidence_1"] == pytest.approx(0.2)
    # the layout a class asks for is configurable: animals as points never call the pose model
    annotator = annotator_for(scene, gates=gates, poses={"ap10k": sure})
    annotator.keypoints = KeypointConfig(animal="points")
    assert annotator.annotate(scene.target, scene.subjects, ["dog", "cat"], [LEFT, RIGHT], "p", "hugs").layouts \
        == "points,points" and sure.calls == 4


def test_copy_paste_gate_with_real_dino_drops_a_pasted_subject(scene):
    """The scene's target pastes each subject image's disc unchanged: DINO of the crops is 100, a copy."""
    from dreamrelation.metrics import MetricModels, build_tiny_metric_components

    scorer = MetricModels.from_models(**build_tiny_metric_components(seed=0))
    gates = replace(PERMISSIVE, max_copy_paste_dino=99.9)
    drop = annotator_for(scene, gates=gates, scorer=scorer).annotate(
        scene.target, scene.subjects, ["dog", "cat"], [LEFT, RIGHT], "A dog hugs a cat.", "hugs")
    assert (drop.stage, drop.reason) == ("gate", "copy_paste") and "subject 0" in drop.detail
    assert drop.metrics["copy_paste_dino_0"] == pytest.approx(100.0, abs=1e-3)
    # the subject turned over in the target (a new pose of the same texture) is no copy
    turned = np.asarray(scene.target).copy()
    x0, y0 = scene.target_xy[0]
    turned[y0:y0 + 24, x0:x0 + 24] = turned[y0:y0 + 24, x0:x0 + 24][::-1, ::-1]
    scene.target = Image.fromarray(turned)
    made = annotator_for(scene, gates=replace(gates, max_copy_paste_dino=None), scorer=scorer).annotate(
        scene.target, scene.subjects, ["dog", "cat"], [LEFT, RIGHT], "A dog hugs a cat.", "hugs")
    assert isinstance(made, Annotation), made
    assert made.metrics["copy_paste_dino_0"] < made.metrics["copy_paste_dino_1"] == pytest.approx(100.0, abs=1e-3)
    assert scorer.dino_pair_scores([scene.subjects[0]], [scene.subjects[0]]) == [pytest.approx(100.0, abs=1e-3)]
    with pytest.raises(ValueError, match=r"others must have one image per image \(1\), got 0"):
        scorer.dino_pair_scores([scene.subjects[0]], [])


@pytest.mark.parametrize("kwargs, message", [
    ({"person": "openpose"}, "person keypoints must be one of ['coco', 'points'], got 'openpose'"),
    ({"animal": "coco"}, "animal keypoints must be one of ['ap10k', 'points'], got 'coco'"),
    ({"animal_classes": "dog"}, "animal_classes must be a list of non-empty class names, got 'dog'"),
    ({"person_classes": ["dog"]}, "person_classes and animal_classes must not share classes, got ['dog']"),
    ({"animal_dataset_index": -1}, "animal_dataset_index must be an integer >= 0 (AP-10K: 3), got -1"),
])
def test_keypoint_config_names_the_bad_field(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        KeypointConfig(**kwargs)


def test_keypoint_layout_by_class():
    config = KeypointConfig()
    assert [config.layout(c) for c in ("Person", "dog", "polar  bear", "teddy bear", "robot")] == \
        ["coco", "ap10k", "ap10k", "points", "points"]
    assert KeypointConfig(person="points", animal_classes=["robot"]).layout("robot") == "ap10k"


# ------------------------------------------------------------------------------------------ text-to-image

def test_text_to_image_is_seeded_per_prompt(pipe):
    kw = dict(height=64, width=64, steps=2, guidance=5.0)
    batch = pipe.text_to_image(["a photo of a dog", "a photo of a cat"], [3, 4], **kw)
    again = pipe.text_to_image("a photo of a cat", 4, **kw)[0]
    other = pipe.text_to_image("a photo of a cat", 5, **kw)[0]
    assert len(batch) == 2 and batch[0].size == (64, 64)
    a, b = np.asarray(batch[1], float), np.asarray(again, float)
    assert np.abs(a - b).max() <= 2  # same seed, another batch: the same image up to rounding
    assert np.abs(a - np.asarray(other, float)).mean() > 5


def test_text_to_image_uses_no_image_tokens_and_no_relation_lora(pipe, subjects):
    kw = dict(height=64, width=64, steps=2, guidance=5.0)
    base = np.asarray(pipe.text_to_image("a photo of a dog", 7, **kw)[0], float)
    call = dict(prompt="a dog hugs a cat", subject_images=subjects[:2], subject_phrases=["dog", "cat"],
                boxes=[LEFT, RIGHT], seed=7, **FAST)
    pipe.load_relation_lora("hugging", str(LORAS / "hugging" / "pytorch_lora_weights.safetensors"))
    try:
        with_lora = np.asarray(pipe(relation="hugging", **call).images[0], float)
        without = np.asarray(pipe(relation=None, **call).images[0], float)
        assert np.abs(with_lora - without).mean() > 0.5  # the LoRA does change the UNet
        pipe._activate_relation("hugging")  # left active by a previous call
        after = np.asarray(pipe.text_to_image("a photo of a dog", 7, **kw)[0], float)
        assert np.abs(after - base).max() <= 1
    finally:
        pipe.unload_relation_lora("hugging")
    # the image branch's projections play no part in text-to-image
    processors = [p for p in pipe.unet.attn_processors.values() if getattr(p, "to_k_ip", None) is not None]
    assert processors
    saved = [p.to_k_ip.weight.detach().clone() for p in processors]
    try:
        with torch.no_grad():
            for p in processors:
                p.to_k_ip.weight.mul_(-3.0)
        perturbed = np.asarray(pipe.text_to_image("a photo of a dog", 7, **kw)[0], float)
        assert np.abs(perturbed - base).max() <= 1
    finally:
        with torch.no_grad():
            for p, w in zip(processors, saved):
                p.to_k_ip.weight.copy_(w)


def test_targets_use_the_relation_lora_the_registry_has_and_record_it(pipe, tmp_path):
    from batch.engine_worker import (
        GENERATION_FILE,
        EngineConfig,
        GenerateStage,
        RelationPipe,
    )
    from dreamrelation.engine.generators import PipelineGenerator
    from manifests.registry import LoRARegistry
    from manifests.relation_spec import expand_specs

    registry = LoRARegistry(str(tmp_path / "loras"))
    registry.register("hugging", str(LORAS / "hugging"))  # shaking_hands has no LoRA there
    samples = expand_specs([{"relation": r, "templates": ["A {0} hugs a {1}."], "class_sets": [["dog", "cat"]],
                             "count": 1, "width": 64, "height": 64, "steps": 2} for r in ("hugging", "shaking_hands")])
    generator = PipelineGenerator(RelationPipe(pipe))
    with_loras = GenerateStage(EngineConfig(output=str(tmp_path / "a"), loras=registry.root), generator=generator)
    plain = GenerateStage(EngineConfig(output=str(tmp_path / "b")), generator=generator)
    try:
        records = with_loras.process(samples)
        base = plain.process(samples)
    finally:
        pipe.unload_relation_lora("hugging")
    assert records[0]["target_lora"] == f"hugging@{registry.fingerprint('hugging')}"
    assert records[1]["target_lora"] is None and base[0]["target_lora"] is None
    pixels = lambda uri: np.asarray(Image.open(uri), float)  # noqa: E731
    assert np.abs(pixels(records[0]["target_uri"]) - pixels(base[0]["target_uri"])).mean() > 0.5  # the LoRA acted
    np.testing.assert_array_equal(pixels(records[1]["target_uri"]), pixels(base[1]["target_uri"]))  # no LoRA: same
    for a, b in zip(records[0]["subject_uris"], base[0]["subject_uris"]):  # subjects never get a LoRA
        np.testing.assert_array_equal(pixels(a), pixels(b))
    info = json.loads((tmp_path / "a" / "images" / "hugging-00000" / GENERATION_FILE).read_text())
    assert info["target_lora"] == records[0]["target_lora"] and info["generator"] == "pipeline"

    # judged again: the images are reused (the generator is not called), unless they were made for another sample
    class Refuses:
        name = "pipeline"

        def subject_images(self, *args):
            raise RuntimeError("generated again")

    again = GenerateStage(EngineConfig(output=str(tmp_path / "a")), generator=Refuses())
    reused = again.process(samples[:1], reuse={"hugging-00000"})[0]
    assert reused["reused"] and reused["target_uri"] == records[0]["target_uri"]
    assert reused["target_lora"] == records[0]["target_lora"] and reused["error"] is None
    changed = samples[0].model_copy(update={"seed": samples[0].seed + 1})
    assert "generated again" in again.process([changed], reuse={"hugging-00000"})[0]["error"]
    assert "generated again" in again.process(samples[:1])[0]["error"]  # not asked to reuse: generates


@pytest.mark.parametrize("args, match", [
    (dict(prompts=["a", ""], seeds=[1, 2]), r"prompts\[1\] must be a non-empty string"),
    (dict(prompts=["a", "b"], seeds=[1]), "seeds has 1 entries but there are 2 prompts"),
    (dict(prompts="a", seeds=-1), r"seeds\[0\] must be an integer"),
    (dict(prompts="a", seeds=1, height=60), "height must be a positive integer divisible by 8, got 60"),
])
def test_text_to_image_names_bad_inputs(pipe, args, match):
    with pytest.raises(ValueError, match=match):
        pipe.text_to_image(**{"width": 64, "height": 64, "steps": 2, **args})


# --------------------------------------------------------------------------------- images API end to end

def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class ImagesServer:
    """An OpenAI-compatible images API on 127.0.0.1: generations return subject-like images, edits a target;
    a prompt containing "forbidden" gets HTTP 400 with an OpenAI error body while ``refuse`` is set."""

    def __init__(self):
        self.requests: list[dict] = []
        self.refuse = True
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path.endswith("/images/generations"):
                    payload = json.loads(body)
                    prompt, images = payload["prompt"], 0
                else:
                    prompt = re.search(rb'name="prompt"\r\n\r\n(.*?)\r\n', body, re.S).group(1).decode()
                    images = body.count(b'name="image[]"')
                server.requests.append({"path": self.path, "prompt": prompt, "images": images,
                                        "auth": self.headers.get("Authorization")})
                if server.refuse and "forbidden" in prompt:
                    data, status = {"error": {"message": "prompt rejected by the safety system"}}, 400
                else:
                    seed = int(hashlib.md5(prompt.encode()).hexdigest()[:6], 16)
                    data, status = {"data": [{"b64_json": png_b64(make_subject(seed, 64))}]}, 200
                raw = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def images_server(monkeypatch):
    monkeypatch.setenv("TEST_IMAGES_KEY", "sk-test")
    with ImagesServer() as server:
        yield server


def api_samples():
    from manifests.relation_spec import expand_specs

    return expand_specs([{"relation": "hugging", "templates": ["A {0} is hugging a {1}."], "count": 2,
                          "class_sets": [["dog", "cat"], ["forbidden fox", "cat"]], "relation_phrase": "hugging",
                          "width": 64, "height": 64, "steps": 2}])


def api_config(output, server, **gates):
    from batch.engine_worker import EngineConfig

    return EngineConfig(output=str(output), generator="api", api_base=server.base, api_key_env="TEST_IMAGES_KEY",
                        api_size="64x64", device="cpu",
                        gates=replace(PERMISSIVE, **gates))


def test_api_generator_stages_end_to_end(images_server, tmp_path, annotators_dir):
    from batch.engine_worker import AnnotateStage, GenerateStage
    from manifests.engine_outcome import read_outcomes
    from manifests.triplets import TripletRow

    config = api_config(tmp_path, images_server)
    records = GenerateStage(config).process(api_samples())
    # the documented requests: one generation per subject, then one edit with the subject images
    sent = images_server.requests
    assert [r["path"] for r in sent[:3]] == ["/v1/images/generations"] * 2 + ["/v1/images/edits"]
    assert [r["prompt"] for r in sent[:2]] == ["a photo of a dog, full body, plain background",
                                               "a photo of a cat, full body, plain background"]
    assert sent[2]["prompt"] == "The photo of the same dog and cat: A dog is hugging a cat."
    assert sent[2]["images"] == 2 and {r["auth"] for r in sent} == {"Bearer sk-test"}
    assert records[0]["error"] is None and records[0]["generator"] == "api:gpt-image-1"
    assert records[0]["target_uri"] == str(tmp_path / "images" / "hugging-00000" / "target.png")
    assert Image.open(records[0]["subject_uris"][1]).size == (64, 64)
    assert "HTTP 400" in records[1]["error"] and "safety system" in records[1]["error"]
    assert not (tmp_path / "images" / "hugging-00001").exists()

    outcomes = AnnotateStage(config).process_and_write(records)
    made, failed = outcomes
    assert made.status == "made" and made.reason is None and made.metrics["clip_r"] >= 0
    row = TripletRow.model_validate_json(made.triplet)
    assert row.target == records[0]["target_uri"] and row.relation_phrase == "hugging"
    assert row.metadata["generator"] == "api:gpt-image-1" and row.metadata["keypoint_layouts"] == "ap10k,ap10k"
    assert row.metadata["target_lora"] == ""  # an images API takes no relation LoRA
    for j, s in enumerate(row.subjects):
        mask = np.asarray(Image.open(s.mask))
        assert s.mask.endswith(f"mask_{j}.png") and mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
    assert (failed.status, failed.stage, failed.reason) == ("dropped", "generate", "generation_error")
    assert "safety system" in failed.detail and failed.triplet is None
    stored = read_outcomes(str(tmp_path / "outcomes"))
    assert [o.model_dump() for o in stored] == [o.model_dump() for o in outcomes]


def test_api_run_accounts_for_every_sample(images_server, tmp_path, annotators_dir):
    from batch.engine_job import EngineJobConfig, run
    from manifests.engine_outcome import read_outcomes
    from manifests.relation_spec import write_relation_specs
    from manifests.triplets import read_triplets

    spec = tmp_path / "spec.yaml"
    write_relation_specs([{"relation": "hugging", "templates": ["A {0} is hugging a {1}."], "count": 3,
                           "class_sets": [["dog", "cat"], ["forbidden fox", "cat"], ["cat", "dog"]],
                           "width": 64, "height": 64, "steps": 2}], str(spec))
    out = tmp_path / "out"
    config = EngineJobConfig(spec=str(spec), output=str(out), engine=api_config(out, images_server),
                             executor="local", batch_size=2)
    seen = []
    summary = run(config, progress=lambda done, total: seen.append((done, total)))
    assert (summary["planned"], summary["made"], summary["dropped"], summary["skipped"]) == (3, 2, 1, 0)
    assert summary["dropped_by_reason"] == {"generation_error": 1} and summary["missing"] == []
    assert summary["drops"][0]["sample_id"] == "hugging-00001"
    assert seen == [(2, 3), (3, 3)]
    assert json.loads((out / "engine.json").read_text())["dropped_by_reason"] == {"generation_error": 1}
    dropped = read_outcomes(str(out / "dropped.parquet"))
    assert [(o.sample_id, o.reason) for o in dropped] == [("hugging-00001", "generation_error")]
    rows, rejected = read_triplets(str(out))
    assert not rejected and [r.triplet_id for r in rows] == ["hugging-00000", "hugging-00002"]

    calls = len(images_server.requests)
    again = run(config)
    assert (again["planned"], again["made"], again["dropped"], again["skipped"]) == (3, 0, 0, 3)
    assert again["total"] == summary["total"] and len(images_server.requests) == calls

    # the service now accepts the prompt: --retry-errors reruns the failed sample only
    images_server.refuse = False
    retried = run(replace(config, retry_errors=True))
    assert (retried["made"], retried["dropped"], retried["skipped"]) == (1, 0, 2)
    assert len(images_server.requests) == calls + 3  # two subjects and the target of hugging-00001
    assert read_outcomes(str(out / "dropped.parquet")) == []
    later = run(config)  # both outcomes of hugging-00001 are on disk: the error does not shadow the triplet
    assert later["total"]["made"] == 3 and later["skipped"] == 3
    assert [r.triplet_id for r in read_triplets(str(out))[0]] == ["hugging-00000", "hugging-00001", "hugging-00002"]


@pytest.mark.parametrize("args, message", [
    (["--generator", "api"], "generator 'api' needs api_base"),
    (["--generator", "dalle"], "generator must be one of ['pipeline', 'api'], got 'dalle'"),
    (["--min-clip-r", "150"], "min_clip_r must be None or a number in [0, 100]"),
    (["--max-copy-paste-dino", "120"], "max_copy_paste_dino must be None or a number in [0, 100]"),
    (["--animal-keypoints", "coco"], "animal keypoints must be one of ['ap10k', 'points'], got 'coco'"),
    (["--actors", "0"], "generate_actors must be an integer >= 1, got 0"),
    (["--executor", "slurm"], "executor must be one of ['ray', 'local'], got 'slurm'"),
])
def test_data_generate_rejects_bad_options_before_loading_anything(runner, tmp_path, args, message):
    spec = ROOT / "manifests" / "examples" / "relation_spec.yaml"
    result = invoke(runner, "data", "generate", spec, "--output", tmp_path / "out", *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_data_generate_names_a_missing_spec(runner, tmp_path):
    result = invoke(runner, "data", "generate", tmp_path / "nope.yaml", "--output", tmp_path / "out",
                    "--executor", "local")
    assert result.exit_code == 2 and "nope.yaml: not found" in result.output, result.output


def test_api_run_on_s3_storage_and_no_resume_starts_over(images_server, s3_bucket, annotators_dir):
    from batch.engine_job import EngineJobConfig, run
    from manifests import storage
    from manifests.relation_spec import write_relation_specs
    from manifests.triplets import read_triplets

    spec, out = f"{s3_bucket}/spec.jsonl", f"{s3_bucket}/engine"
    write_relation_specs([{"relation": "hugging", "templates": ["A {0} is hugging a {1}."], "count": 2,
                           "classes": ["dog", "cat"], "width": 64, "height": 64, "steps": 2}], spec)
    config = EngineJobConfig(spec=spec, output=out, engine=api_config(out, images_server), executor="local")
    first = run(config)
    assert (first["made"], first["dropped"]) == (2, 0)
    rows, rejected = read_triplets(out)
    assert not rejected and len(rows) == 2
    for row in rows:
        assert row.target == f"{out}/images/{row.triplet_id}/target.png"
        assert Image.open(io.BytesIO(storage.read_bytes(row.subjects[1].mask))).size == (64, 64)
    assert len(storage.list_files(f"{out}/outcomes", ".parquet")) == 1
    assert json.loads(storage.read_bytes(f"{out}/engine.json"))["total"]["made"] == 2

    calls = len(images_server.requests)
    fresh = run(replace(config, resume=False, batch_size=1))  # starts over: the old outcome file goes
    assert (fresh["made"], fresh["skipped"]) == (2, 0) and len(images_server.requests) == calls + 6
    assert len(storage.list_files(f"{out}/outcomes", ".parquet")) == 2  # one per sample now, none left over
