"""The relation-aware data engine (paper section 3.3), its core: generate relation triplets, annotate them, gate them.

A triplet is a target image showing a relation, the subject images it was made from (same identities, other
poses), and per subject its box, mask and 17 keypoints in both images. Making one takes two steps:

* **generation**, behind the ``dreamrelation.engine.generators.Generator`` protocol (our pipeline or an images API);
* **annotation** by :class:`Annotator`: open-vocabulary detection of each subject class in the target (OWLv2),
  SAM masks from the boxes, then 17 keypoints per subject (:class:`KeypointConfig`): ViTPose's COCO keypoints for
  people, its AP-10K keypoints for animals (the layout of the authors' data), and otherwise (or when no pose model
  is at hand or it is not confident) 17 points picked on each subject image's mask and carried into the target mask
  by dense-feature correspondence (DINOv2); CLIP-R of the target, an optional caption. Quality gates are pure
  functions of the annotation (:func:`pick_detections`, :func:`check_layout`, :func:`check_overlap`,
  :func:`check_copy_paste`, :func:`check_keypoints`, :func:`check_clip_r`); a failed gate is a :class:`Drop` with
  a reason code.

The paper warns that subject images cropped from the target make the model copy and paste them (section 3.3,
Fig. 3); targets made by the base adapter from the subject images can do the same, so the copy-paste gate drops a
target whose subject crop is nearly its subject image (DINO, :meth:`dreamrelation.metrics.MetricModels.
dino_pair_scores`). Default gates are :class:`GateConfig`'s; the tiny preset's images are noise, so its defaults
(:data:`TINY_GATES`, :func:`default_gates`) are thresholds noise passes, every gate still measured; the toy preset
finds its subjects with the toy world's reader (``toy_annotators``), and its gates (:data:`TOY_GATES`) keep only
targets where each subject was found exactly once with the right shape.

Plain Python and torch: no Ray, no pydantic (``batch.engine_worker`` turns annotations into ``TripletRow``s).
Coordinates: boxes normalized ``[x0, y0, x1, y1]``; keypoints normalized ``[x, y]`` of the image they belong to.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..model.layout import Box
from ..model.preset_names import SMALL_PRESETS
from .annotate import Detection
from .annotate import box_iou as pairwise_iou
from .pose import (
    ANIMAL_CLASSES,
    PERSON_CLASSES,
    KeypointConfig,
    check_pose_ref,
    pose_dataset_index,
    resolve_keypoints,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ANIMAL_CLASSES", "Annotation", "Annotator", "Drop", "GateConfig", "KeypointConfig", "PERSON_CLASSES",
    "SubjectAnnotation", "TINY_GATES", "TINY_GATES_NOTE", "TOY_GATES", "TOY_GATES_NOTE", "box_iou", "box_mask",
    "calibration_note", "check_clip_r", "check_copy_paste", "check_keypoints", "check_layout", "check_overlap",
    "clean_box", "default_gates", "pick_detections", "resolve_keypoints",
]

NUM_KEYPOINTS = 17
TINY_FEATURE_SIZE = 64  # the tiny DINOv2 twin's input side (keypoints.build_tiny_dinov2)
MIN_MASK_PIXELS = 16  # a SAM mask smaller than this (inside its box) falls back to the box


# ------------------------------------------------------------------------------------------------------ gates

@dataclass(frozen=True)
class GateConfig:
    """Quality gates of the engine (paper 3.3: each subject found exactly once, keypoints matched, CLIP-R, no
    copy-paste). The defaults are for real models (``--preset sdxl``); :data:`TINY_GATES` for the tiny preset.

    Attributes:
        detection_threshold: OWLv2 score a detection needs to count.
        max_instances: detections of a subject's class allowed per subject of that class (1: found exactly once).
        min_keypoint_confidence: the mean keypoint-match confidence each subject needs, in [0, 1].
        visibility_threshold: a keypoint whose confidence is below this gets visibility 0 (it does not count in
            the keypoint matching loss).
        min_clip_r: the CLIP-R (x100, CLIP ViT-B/32 image vs relation phrase) the target needs; None: recorded,
            not gated. 17 sits under the paper's mean CLIP-R of MS-Diffusion (18.9, Table 2), the base the engine
            generates with, so it drops the targets whose relation is weakest rather than half of them; a prior,
            to calibrate on real samples.
        max_copy_paste_dino: the DINO (x100) above which a subject's crop in the target is a copy of its subject
            image's crop (``copy_paste``); None: not gated. 90 sits above DreamBooth's DINO between real photos
            of one subject (77.4) and under the 95+ of a pasted crop; a prior, like ``min_clip_r``.
        min_layout_iou: the IoU each detected box needs with its intended layout box; None: recorded, not gated.
        max_subject_iou: two subjects whose detected boxes overlap more than this are the same thing found for
            both classes (``subjects_overlap``); None: not gated.
    """

    detection_threshold: float = 0.1
    max_instances: int = 1
    min_keypoint_confidence: float = 0.5
    visibility_threshold: float = 0.5
    min_clip_r: float | None = 17.0
    min_layout_iou: float | None = None
    max_subject_iou: float | None = 0.8
    max_copy_paste_dino: float | None = 90.0

    def __post_init__(self) -> None:
        for name in ("detection_threshold", "min_keypoint_confidence", "visibility_threshold"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")
        if isinstance(self.max_instances, bool) or not isinstance(self.max_instances, int) or self.max_instances < 1:
            raise ValueError(f"max_instances must be an integer >= 1, got {self.max_instances!r}")
        for name in ("min_clip_r", "max_copy_paste_dino"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 100.0):
                raise ValueError(f"{name} must be None or a number in [0, 100] (scores are x100), got {v!r}")
        for name in ("min_layout_iou", "max_subject_iou"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0):
                raise ValueError(f"{name} must be None or a number in [0, 1], got {v!r}")


# The tiny annotators are random: thresholds noise passes, so the README's example makes triplets; every gate
# still runs and records what it measured.
TINY_GATES = GateConfig(detection_threshold=0.0, max_instances=10_000, min_keypoint_confidence=0.0,
                        visibility_threshold=0.0, min_clip_r=0.0, min_layout_iou=None, max_subject_iou=None,
                        max_copy_paste_dino=100.0)
TINY_GATES_NOTE = "gates calibrated for the tiny annotators (random weights)"
# The toy preset finds and masks subjects with the toy world's exact reader (``toy_annotators``) and carries keypoints
# with weight-free colour features (``keypoints.ColourFeatures``): each subject found exactly once, with the right
# shape (score >= 0.5), and not on top of another; keypoint confidence, DINO (the tiny random one) and the toy CLIP's
# CLIP-R (which tells relations apart only weakly, README) are measured, not gated.
TOY_GATES = replace(TINY_GATES, detection_threshold=0.5, max_instances=1, max_subject_iou=0.8)
TOY_GATES_NOTE = ("gates calibrated for the toy annotators (the toy world's reader finds and masks the subjects; "
                  "keypoint confidence, DINO and CLIP-R are measured, not gated)")
_PRESET_GATES = {"tiny": (TINY_GATES, TINY_GATES_NOTE), "toy": (TOY_GATES, TOY_GATES_NOTE)}


def default_gates(preset: str, metrics: bool = True) -> GateConfig:
    """The gates a run uses unless told otherwise: :data:`TINY_GATES` for ``"tiny"``, :data:`TOY_GATES` for
    ``"toy"``, :class:`GateConfig`'s defaults else; without metric models (``metrics=False``) the CLIP-R and
    copy-paste gates are off."""
    gates = _PRESET_GATES[str(preset)][0] if str(preset) in _PRESET_GATES else GateConfig()
    return gates if metrics else replace(gates, min_clip_r=None, max_copy_paste_dino=None)


def calibration_note(preset: str, gates: GateConfig) -> str | None:
    """The line saying which calibration is in force when ``gates`` are the tiny or toy preset's defaults."""
    defaults = _PRESET_GATES.get(str(preset))
    return defaults[1] if defaults is not None and gates == defaults[0] else None


def gates_for(preset: str, **given: Any) -> tuple[GateConfig, str | None]:
    """The preset's gates (:func:`default_gates`) with the ``given`` fields that are not None put in, and the line
    to tell the user when the tiny or toy preset's calibration is in force (None otherwise)."""
    unknown = sorted(set(given) - set(GateConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown gate fields {unknown}; gates are {sorted(GateConfig.__dataclass_fields__)}")
    chosen = {k: v for k, v in given.items() if v is not None}
    gates = replace(default_gates(preset), **chosen)
    if str(preset) not in _PRESET_GATES:
        return gates, None
    note = _PRESET_GATES[str(preset)][1]
    if not chosen:
        return gates, note
    return gates, f"{note} (except {', '.join(sorted(chosen))}, given)"


@dataclass(frozen=True)
class Drop:
    """A sample the engine does not keep: ``stage`` ("annotate" or "gate"), a short ``reason`` code
    (``subject_not_found``, ``subject_found_twice``, ``off_layout``, ``subjects_overlap``, ``copy_paste``,
    ``low_keypoint_confidence``, ``low_clip_r``, ``mask_too_small``), a human ``detail``, and the metrics measured
    until then."""

    stage: str
    reason: str
    detail: str
    metrics: dict[str, float] = field(default_factory=dict)


def clean_box(box: Box, size: tuple[int, int]) -> tuple[float, float, float, float] | None:
    """A detector box clipped to [0, 1]; None when less than one pixel wide or high in an image of ``size``."""
    x0, y0, x1, y1 = (min(max(float(v), 0.0), 1.0) for v in box)
    width, height = size
    if (x1 - x0) * width < 1.0 or (y1 - y0) * height < 1.0:
        return None
    return x0, y0, x1, y1


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two ``[x0, y0, x1, y1]`` boxes (0 when they do not overlap): one pair of
    :func:`dreamrelation.engine.annotate.box_iou`, in float64."""
    pair = torch.tensor([list(a), list(b)], dtype=torch.float64)  # (2, 4)
    return float(pairwise_iou(pair[:1], pair[1:])[0, 0])


def pick_detections(detections: dict[str, Sequence[Any]], phrases: Sequence[str], layout_boxes: Sequence[Box],
                    max_instances: int = 1) -> list[Any] | Drop:
    """The detection of each subject, or a :class:`Drop` (stage "gate").

    ``detections[phrase]``: that class's detections in the target (objects with ``box`` and ``score``). A class
    named by m subjects must be found at least m times (else ``subject_not_found``) and at most
    ``m * max_instances`` times (else ``subject_found_twice``). Its m best-scoring detections go to its m subjects,
    matched to their intended layout boxes by the largest total IoU (ties keep score order).
    """
    picked: list[Any] = [None] * len(phrases)
    for phrase in dict.fromkeys(phrases):
        slots = [j for j, p in enumerate(phrases) if p == phrase]
        found = sorted(detections.get(phrase, ()), key=lambda d: -float(d.score))
        m = len(slots)
        if len(found) < m:
            return Drop("gate", "subject_not_found",
                        f"{phrase!r} found {len(found)} time(s) in the target, {m} subject(s) need it")
        if len(found) > m * max_instances:
            return Drop("gate", "subject_found_twice",
                        f"{phrase!r} found {len(found)} times in the target (at most {m * max_instances} allowed: "
                        f"{m} subject(s) x max_instances {max_instances}); scores "
                        f"{[round(float(d.score), 3) for d in found[:5]]}")
        best = found[:m]
        order = max(itertools.permutations(range(m)),
                    key=lambda perm: (round(sum(box_iou(best[perm[k]].box, layout_boxes[slots[k]])
                                                for k in range(m)), 9), [-i for i in perm]))
        for k, j in enumerate(slots):
            picked[j] = best[order[k]]
    return picked


def check_layout(ious: Sequence[float], min_layout_iou: float | None) -> Drop | None:
    """``off_layout`` when a subject's detected box overlaps its intended layout box less than asked."""
    if min_layout_iou is None:
        return None
    for j, iou in enumerate(ious):
        if iou < min_layout_iou:
            return Drop("gate", "off_layout", f"subject {j}: IoU {iou:.3f} with its layout box < {min_layout_iou}")
    return None


def check_overlap(boxes: Sequence[Box], max_subject_iou: float | None) -> Drop | None:
    """``subjects_overlap`` when two subjects' detected boxes overlap more than ``max_subject_iou`` (the detector
    found one thing for both classes)."""
    if max_subject_iou is None:
        return None
    for i, j in itertools.combinations(range(len(boxes)), 2):
        iou = box_iou(boxes[i], boxes[j])
        if iou > max_subject_iou:
            return Drop("gate", "subjects_overlap",
                        f"subjects {i} and {j}: detected boxes overlap with IoU {iou:.3f} > {max_subject_iou}")
    return None


def check_keypoints(confidences: Sequence[np.ndarray], min_confidence: float) -> Drop | None:
    """``low_keypoint_confidence`` when a subject's mean keypoint-match confidence (over its 17 points) is below
    ``min_confidence``."""
    for j, conf in enumerate(confidences):
        mean = float(np.mean(conf))
        if not mean >= min_confidence:
            return Drop("gate", "low_keypoint_confidence",
                        f"subject {j}: mean keypoint confidence {mean:.3f} < {min_confidence}")
    return None


def check_copy_paste(similarities: Sequence[float | None], max_similarity: float | None) -> Drop | None:
    """``copy_paste`` when a subject's crop in the target is too like its crop in its subject image: DINO (x100)
    above ``max_similarity`` (paper 3.3: image prompts that are the target's own crops teach the model to paste
    them and neglect the text). None scores (not measured) pass."""
    if max_similarity is None:
        return None
    for j, sim in enumerate(similarities):
        if sim is not None and sim > max_similarity:
            return Drop("gate", "copy_paste", f"subject {j}: DINO {sim:.3f} between its crop in the target and its "
                                              f"subject image > {max_similarity} (a pasted copy, not a new pose)")
    return None


def check_clip_r(clip_r: float | None, min_clip_r: float | None) -> Drop | None:
    """``low_clip_r`` when the target's CLIP-R (x100, image vs relation phrase) is below ``min_clip_r``."""
    if min_clip_r is None or clip_r is None:
        return None
    if not clip_r >= min_clip_r:
        return Drop("gate", "low_clip_r", f"CLIP-R {clip_r:.3f} < {min_clip_r}")
    return None


# ------------------------------------------------------------------------------------------------ annotation

def box_mask(box: Box, size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: the pixels of ``size`` = (W, H) covered by the normalized box (edges rounded outwards)."""
    width, height = size
    mask = np.zeros((height, width), dtype=bool)
    x0, x1 = math.floor(box[0] * width), max(math.ceil(box[2] * width), math.floor(box[0] * width) + 1)
    y0, y1 = math.floor(box[1] * height), max(math.ceil(box[3] * height), math.floor(box[1] * height) + 1)
    mask[y0:y1, x0:x1] = True
    return mask


def _normalized(points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(17, 2) pixel (x, y), pixel centres at integers (``dreamrelation.engine.keypoints``) -> normalized (pixel
    column i spans [i / W, (i + 1) / W), ``dreamrelation.train.data``), clipped to [0, 1]."""
    return np.clip((np.asarray(points, np.float64) + 0.5) / np.asarray(size, np.float64), 0.0, 1.0)


@dataclass(frozen=True, eq=False)
class SubjectAnnotation:
    """One subject of an annotated triplet. H, W: the target's size; h, w: the subject image's.

    Attributes:
        box: normalized box of the subject in the target (its detection, clipped).
        target_mask: (H, W) bool, the subject in the target.
        subject_box, subject_mask: the subject in its own image ((h, w) bool).
        target_keypoints, subject_keypoints: (17, 2) float normalized (x, y) in the target / subject image.
        confidence: (17,) float in [0, 1] match confidence per keypoint.
        target_visibility: (17,) float in {0, 1}; subject_visibility: (17,) or None (all visible).
        layout: "points" (picked on the mask, carried by correspondence), "coco" (ViTPose person keypoints) or
            "ap10k" (ViTPose animal keypoints): the ``dreamrelation.train.data.KEYPOINT_FLIPS`` name.
    """

    phrase: str
    box: tuple[float, float, float, float]
    score: float
    layout_iou: float
    target_mask: np.ndarray
    subject_box: tuple[float, float, float, float]
    subject_mask: np.ndarray
    target_keypoints: np.ndarray
    subject_keypoints: np.ndarray
    confidence: np.ndarray
    target_visibility: np.ndarray
    subject_visibility: np.ndarray | None
    layout: str


@dataclass(frozen=True, eq=False)
class Annotation:
    """A kept triplet's annotation: one :class:`SubjectAnnotation` per subject, CLIP-R, caption, metrics."""

    subjects: tuple[SubjectAnnotation, ...]
    clip_r: float | None
    caption: str | None
    metrics: dict[str, float]

    @property
    def layouts(self) -> str:
        """The ``dreamrelation.train.data.LAYOUTS_KEY`` metadata value: one layout per subject, comma-separated."""
        return ",".join(s.layout for s in self.subjects)


class Annotator:
    """Detector, masker, dense features, pose models, optional captioner and metric scorer; built once per process.
    :meth:`annotate` returns an :class:`Annotation` or a :class:`Drop`.

    The components follow ``dreamrelation.engine.annotate`` / ``dreamrelation.engine.keypoints``:
    ``detector.detect(image, phrases, threshold)``, ``masker(image, boxes)``, ``features(image)`` for
    ``keypoints.transfer_keypoints``, ``poses[layout](image, box)`` (``"coco"``, ``"ap10k"``:
    ``pose.VitPoseKeypoints``), ``captioner(image)``, ``scorer.score(...)`` and ``scorer.dino_pair_scores(...)``
    (``dreamrelation.metrics.MetricModels``). ``pose_factories[layout]``: builds that pose model the first time a
    subject needs it (most specs have no person). ``keypoints``: which layout each subject class asks for; a layout with
    no pose model falls back to points.
    """

    def __init__(self, detector, masker, features, poses: dict[str, Any] | None = None, captioner=None,
                 scorer=None, gates: GateConfig | None = None, keypoints: KeypointConfig | None = None,
                 pose_factories: dict[str, Callable[[], Any]] | None = None) -> None:
        self.detector = detector
        self.masker = masker
        self.features = features
        self._poses = dict(poses or {})
        self._pose_factories = dict(pose_factories or {})
        self.captioner = captioner
        self.scorer = scorer
        self.gates = gates or GateConfig()
        self.keypoints = keypoints or KeypointConfig()

    @classmethod
    def from_preset(cls, preset: str = "tiny", gates: GateConfig | None = None, device: str = "cpu",
                    caption: bool = False, metrics: bool = True, feature_size: int | None = None,
                    keypoints: KeypointConfig | None = None) -> Annotator:
        """The annotators of a preset (``annotate.annotator_refs``): tiny twins for "tiny", the hub models else;
        the metric models of ``metrics.metric_model_refs(preset)``; the gates of :func:`default_gates` unless
        given; pose models of :func:`resolve_keypoints`. ``feature_size``: the side DINOv2 sees, a multiple of its
        patch (None: 448, a 32 x 32 grid of the hub model's 14 px patches; 64 for the tiny twin, 8 x 8 patches of
        8 px)."""
        from .annotate import Captioner, OwlDetector, SamMasker, annotator_refs
        from .keypoints import Dinov2Features
        from .pose import VitPoseKeypoints

        refs = annotator_refs(preset)
        keypoints, notes = resolve_keypoints(keypoints or KeypointConfig(), preset)
        for note in notes:
            logger.warning("%s", note)
        scorer = None
        if metrics:
            from ..metrics import get_metric_models, metric_model_refs

            scorer = get_metric_models(*metric_model_refs(preset), device=device)
        factories = {"coco": lambda: VitPoseKeypoints(keypoints.person_pose, device=device, layout="coco")}
        if keypoints.animal == "ap10k":
            check_pose_ref(keypoints.animal_pose, "ap10k")
            factories["ap10k"] = lambda: VitPoseKeypoints(
                keypoints.animal_pose, device=device, layout="ap10k",
                dataset_index=pose_dataset_index(keypoints.animal_pose, keypoints.animal_dataset_index))
        if str(preset) == "toy":  # the toy world's reader finds and masks its subjects; colour carries keypoints
            from .keypoints import ColourFeatures
            from .toy_annotators import ToyDetector, ToyMasker

            detector, masker, features = ToyDetector(), ToyMasker(), ColourFeatures()
        else:
            detector, masker = OwlDetector(refs.detector, device=device), SamMasker(refs.masker, device=device)
            features = Dinov2Features(refs.features, device=device,
                                      size=feature_size or (TINY_FEATURE_SIZE if str(preset) in SMALL_PRESETS else 448))
        return cls(
            detector=detector,
            masker=masker,
            features=features,
            pose_factories=factories,
            captioner=Captioner(refs.captioner, device=device) if caption else None,
            scorer=scorer,
            gates=gates or default_gates(preset, metrics),
            keypoints=keypoints,
        )

    def pose(self, layout: str):
        """The pose model of ``layout`` ("coco", "ap10k"), built on first use; None when there is none."""
        if layout not in self._poses and layout in self._pose_factories:
            self._poses[layout] = self._pose_factories.pop(layout)()
        return self._poses.get(layout)

    # ---- steps ------------------------------------------------------------------------------------------
    def _masks(self, image: Image.Image, boxes: Sequence[Box]) -> list[np.ndarray]:
        """SAM's masks of ``boxes`` (one image encoding), each kept inside its box; the box itself where SAM finds
        (almost) nothing there."""
        out = []
        for box, mask in zip(boxes, self.masker(image, [list(b) for b in boxes])):
            region = box_mask(box, image.size)
            mask = np.asarray(mask, dtype=bool) & region
            out.append(mask if mask.sum() >= min(MIN_MASK_PIXELS, region.sum()) else region)
        return out

    def _subject_box(self, image: Image.Image, phrase: str) -> tuple[float, float, float, float]:
        """The subject's box in its own image: its best detection, else the whole image."""
        found = self.detector.detect(image, [phrase], self.gates.detection_threshold)[0]
        for det in sorted(found, key=lambda d: -float(d.score)):
            box = clean_box(det.box, image.size)
            if box is not None:
                return box
        return 0.0, 0.0, 1.0, 1.0

    def _keypoints(self, phrase: str, subject: Image.Image, subject_box: Box, subject_mask: np.ndarray,
                   target: Image.Image, box: Box, target_mask: np.ndarray) -> tuple:
        """(subject_points, target_points) pixel (17, 2), confidence (17,), subject scores (17,) or None, layout,
        and the pose model's mean confidence when it was tried and fell back to points (else None).

        A person / animal class gets its pose model's keypoints (in the subject image and the target, confidence
        the lower of the two scores) unless it has none or its mean confidence is below the keypoint gate; then
        (and for every other class) points picked on the subject mask and carried by dense correspondence."""
        layout = self.keypoints.layout(phrase)
        pose = self.pose(layout) if layout != "points" else None
        tried = None
        if pose is not None:
            s_pts, s_scores = pose(subject, list(subject_box))
            t_pts, t_scores = pose(target, list(box))
            conf = np.clip(np.minimum(np.asarray(s_scores, np.float64), np.asarray(t_scores, np.float64)), 0, 1)
            if float(np.mean(conf)) >= self.gates.min_keypoint_confidence:
                return np.asarray(s_pts), np.asarray(t_pts), conf, np.asarray(s_scores), layout, None
            tried = float(np.mean(conf))
        from .keypoints import mask_points, transfer_keypoints

        points = mask_points(subject_mask, NUM_KEYPOINTS)
        moved = transfer_keypoints(self.features, subject, points, subject_mask, target, target_mask)
        conf = np.clip(np.asarray(moved.confidence, np.float64), 0, 1)
        return points, moved.points, conf, None, "points", tried

    def _copy_paste(self, target: Image.Image, boxes: Sequence[Box], subject_images: Sequence[Image.Image],
                    subject_boxes: Sequence[Box]) -> list[float | None]:
        """DINO (x100) of each subject's crop in the target vs its crop in its subject image (None: no scorer)."""
        if self.scorer is None or not hasattr(self.scorer, "dino_pair_scores"):
            return [None] * len(boxes)
        from ..metrics import crop_box

        crops = [crop_box(target, list(b)) for b in boxes]
        own = [crop_box(image, list(b)) for image, b in zip(subject_images, subject_boxes)]
        return [float(v) for v in self.scorer.dino_pair_scores(crops, own)]

    def annotate(self, target: Image.Image, subject_images: Sequence[Image.Image], phrases: Sequence[str],
                 layout_boxes: Sequence[Box], prompt: str, relation_phrase: str) -> Annotation | Drop:
        """Annotate one generated sample and apply the gates, cheapest first: CLIP-R, detection (found exactly
        once), layout IoU, subject overlap, copy-paste, keypoint confidence. Returns the annotation or the first
        failed gate's :class:`Drop`."""
        gates = self.gates
        target = target.convert("RGB")
        subject_images = [im.convert("RGB") for im in subject_images]
        metrics: dict[str, float] = {}
        # 1. CLIP-R (and CLIP-T, CLIP-I, DINO) of the target
        clip_r = None
        if self.scorer is not None:
            scores = self.scorer.score([target], [prompt], [relation_phrase], [subject_images],
                                       [[list(map(float, b)) for b in layout_boxes]])[0]
            metrics.update({k: round(float(scores[k]), 4) for k in ("clip_t", "clip_r", "clip_i", "dino")
                            if scores.get(k) is not None})
            clip_r = metrics.get("clip_r")
        drop = check_clip_r(clip_r, gates.min_clip_r)
        if drop:
            return replace(drop, metrics=metrics)
        # 2. detection of each subject class in the target; each found exactly once
        unique = list(dict.fromkeys(phrases))
        raw = self.detector.detect(target, unique, gates.detection_threshold)
        detections = {}
        for phrase, found in zip(unique, raw):
            kept = []
            for det in found:
                box = clean_box(det.box, target.size)
                if box is not None:
                    kept.append(Detection(box, float(det.score)))
            detections[phrase] = kept
            metrics[f"detections_{phrase}"] = float(len(kept))
        picked = pick_detections(detections, phrases, layout_boxes, gates.max_instances)
        if isinstance(picked, Drop):
            return replace(picked, metrics=metrics)
        ious = [box_iou(d.box, b) for d, b in zip(picked, layout_boxes)]
        for j, (d, iou) in enumerate(zip(picked, ious)):
            metrics[f"detection_score_{j}"] = round(d.score, 4)
            metrics[f"layout_iou_{j}"] = round(iou, 4)
        drop = check_layout(ious, gates.min_layout_iou) or check_overlap([d.box for d in picked],
                                                                        gates.max_subject_iou)
        if drop:
            return replace(drop, metrics=metrics)
        # 3. masks of each subject in the target and in its own image
        target_masks = self._masks(target, [d.box for d in picked])
        subject_boxes = [self._subject_box(image, phrase) for phrase, image in zip(phrases, subject_images)]
        subject_masks = [self._masks(image, [b])[0] for image, b in zip(subject_images, subject_boxes)]
        # 4. copy-paste: a subject's crop in the target must not be its subject image again (paper 3.3)
        similar = self._copy_paste(target, [d.box for d in picked], subject_images, subject_boxes)
        for j, sim in enumerate(similar):
            if sim is not None:
                metrics[f"copy_paste_dino_{j}"] = round(sim, 4)
        drop = check_copy_paste(similar, gates.max_copy_paste_dino)
        if drop:
            return replace(drop, metrics=metrics)
        # 5. keypoints
        subjects = []
        for j, (phrase, det, image, target_mask) in enumerate(zip(phrases, picked, subject_images, target_masks)):
            subject_box, subject_mask = subject_boxes[j], subject_masks[j]
            try:
                s_pts, t_pts, conf, s_scores, layout, tried = self._keypoints(
                    phrase, image, subject_box, subject_mask, target, det.box, target_mask)
            except ValueError as exc:  # mask_points: a mask too small to place 17 points in
                return Drop("annotate", "mask_too_small", f"subject {j} ({phrase!r}): {exc}", metrics)
            metrics[f"keypoint_confidence_{j}"] = round(float(np.mean(conf)), 4)
            if tried is not None:  # the pose model's confidence, before falling back to points
                metrics[f"pose_confidence_{j}"] = round(tried, 4)
            thr = gates.visibility_threshold
            subjects.append(SubjectAnnotation(
                phrase=phrase, box=det.box, score=det.score, layout_iou=ious[j], target_mask=target_mask,
                subject_box=subject_box, subject_mask=subject_mask,
                target_keypoints=_normalized(t_pts, target.size), subject_keypoints=_normalized(s_pts, image.size),
                confidence=conf, target_visibility=(conf >= thr).astype(np.float64),
                subject_visibility=None if s_scores is None else (np.asarray(s_scores) >= thr).astype(np.float64),
                layout=layout,
            ))
        drop = check_keypoints([s.confidence for s in subjects], gates.min_keypoint_confidence)
        if drop:
            return replace(drop, metrics=metrics)
        # 6. caption (optional)
        caption = self.captioner(target) if self.captioner is not None else None
        return Annotation(subjects=tuple(subjects), clip_r=clip_r, caption=caption, metrics=metrics)

