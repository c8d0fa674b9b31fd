"""The relation-aware data engine (paper section 3.3): generate relation triplets, annotate them, gate them.

A triplet is a target image showing a relation, the subject images it was made from (same identities, other
poses), and per subject its box, mask and 17 keypoints in both images. Making one takes two steps:

* **generation**, behind the ``dreamrelation.generators.Generator`` protocol (our pipeline or an images API);
* **annotation** by :class:`Annotator`: open-vocabulary detection of each subject class in the target (OWLv2),
  SAM masks from the boxes, 17 points picked on each subject image's mask and carried into the target mask by
  dense-feature correspondence (DINOv2), ViTPose for ``person`` subjects, CLIP-R of the target, an optional
  caption. Quality gates are pure functions of the annotation (:func:`pick_detections`, :func:`check_layout`,
  :func:`check_keypoints`, :func:`check_clip_r`); a failed gate is a :class:`Drop` with a reason code.

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

from .annotate import Detection, box_iou as pairwise_iou
from .layout import Box

logger = logging.getLogger(__name__)

__all__ = [
    "Annotation", "Annotator", "Drop", "GateConfig", "PERSON_CLASSES", "SubjectAnnotation", "box_iou", "box_mask",
    "check_clip_r", "check_keypoints", "check_layout", "check_overlap", "clean_box", "pick_detections",
]

NUM_KEYPOINTS = 17
PERSON_CLASSES = ("person", "man", "woman", "boy", "girl", "child", "kid")  # keypoints by ViTPose (COCO layout)
TINY_FEATURE_SIZE = 64  # the tiny DINOv2 twin's input side (keypoints.build_tiny_dinov2)
MIN_MASK_PIXELS = 16  # a SAM mask smaller than this (inside its box) falls back to the box


# ------------------------------------------------------------------------------------------------------ gates

@dataclass(frozen=True)
class GateConfig:
    """Quality gates of the engine (paper 3.3: each subject found exactly once, keypoints matched, CLIP-R).

    Attributes:
        detection_threshold: OWLv2 score a detection needs to count.
        max_instances: detections of a subject's class allowed per subject of that class (1: found exactly once).
        min_keypoint_confidence: the mean keypoint-match confidence each subject needs, in [0, 1].
        visibility_threshold: a keypoint whose confidence is below this gets visibility 0 (it does not count in
            the keypoint matching loss).
        min_clip_r: the CLIP-R (x100) the target needs; None: recorded, not gated.
        min_layout_iou: the IoU each detected box needs with its intended layout box; None: recorded, not gated.
        max_subject_iou: two subjects whose detected boxes overlap more than this are the same thing found for
            both classes (``subjects_overlap``); None: not gated.
    """

    detection_threshold: float = 0.1
    max_instances: int = 1
    min_keypoint_confidence: float = 0.5
    visibility_threshold: float = 0.5
    min_clip_r: float | None = None
    min_layout_iou: float | None = None
    max_subject_iou: float | None = 0.8

    def __post_init__(self) -> None:
        for name in ("detection_threshold", "min_keypoint_confidence", "visibility_threshold"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")
        if isinstance(self.max_instances, bool) or not isinstance(self.max_instances, int) or self.max_instances < 1:
            raise ValueError(f"max_instances must be an integer >= 1, got {self.max_instances!r}")
        if self.min_clip_r is not None and (isinstance(self.min_clip_r, bool)
                                            or not isinstance(self.min_clip_r, (int, float))
                                            or not 0.0 <= self.min_clip_r <= 100.0):
            raise ValueError(f"min_clip_r must be None or a number in [0, 100] (CLIP-R is x100), "
                             f"got {self.min_clip_r!r}")
        for name in ("min_layout_iou", "max_subject_iou"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0):
                raise ValueError(f"{name} must be None or a number in [0, 1], got {v!r}")


@dataclass(frozen=True)
class Drop:
    """A sample the engine does not keep: ``stage`` ("annotate" or "gate"), a short ``reason`` code
    (``subject_not_found``, ``subject_found_twice``, ``off_layout``, ``subjects_overlap``,
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
    :func:`dreamrelation.annotate.box_iou`, in float64."""
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
    """(17, 2) pixel (x, y), pixel centres at integers (``dreamrelation.keypoints``) -> normalized (pixel column i
    spans [i / W, (i + 1) / W), ``dreamrelation.data``), clipped to [0, 1]."""
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
        layout: "points" (picked on the mask, carried by correspondence) or "coco" (ViTPose person keypoints).
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
        """The ``dreamrelation.data.LAYOUTS_KEY`` metadata value: one layout per subject, comma-separated."""
        return ",".join(s.layout for s in self.subjects)


class Annotator:
    """Detector, masker, dense features, pose model (for people), optional captioner and metric scorer; built
    once per process. :meth:`annotate` returns an :class:`Annotation` or a :class:`Drop`.

    The components follow ``dreamrelation.annotate`` / ``dreamrelation.keypoints``: ``detector.detect(image,
    phrases, threshold)``, ``masker(image, boxes)``, ``features(image)`` for ``keypoints.transfer_keypoints``,
    ``pose(image, box)``, ``captioner(image)``, ``scorer.score(...)`` (``dreamrelation.metrics.MetricModels``).
    ``pose_factory``: builds ``pose`` the first time a person appears (most relation specs have none).
    """

    def __init__(self, detector, masker, features, pose=None, captioner=None, scorer=None,
                 gates: GateConfig | None = None, person_classes: Sequence[str] = PERSON_CLASSES,
                 pose_factory: Callable[[], Any] | None = None) -> None:
        self.detector = detector
        self.masker = masker
        self.features = features
        self._pose = pose
        self._pose_factory = pose_factory
        self.captioner = captioner
        self.scorer = scorer
        self.gates = gates or GateConfig()
        self.person_classes = {c.lower() for c in person_classes}

    @classmethod
    def from_preset(cls, preset: str = "tiny", gates: GateConfig | None = None, device: str = "cpu",
                    caption: bool = False, metrics: bool = True, feature_size: int | None = None) -> Annotator:
        """The annotators of a preset (``annotate.annotator_refs``): tiny twins for "tiny", the hub models else;
        the metric models of ``metrics.metric_model_refs(preset)``. ``feature_size``: the side DINOv2 sees, a
        multiple of its patch (None: 448, a 32 x 32 grid of the hub model's 14 px patches; 64 for the tiny twin,
        8 x 8 patches of 8 px)."""
        from .annotate import Captioner, OwlDetector, SamMasker, annotator_refs
        from .keypoints import Dinov2Features
        from .pose import VitPoseKeypoints

        refs = annotator_refs(preset)
        scorer = None
        if metrics:
            from .metrics import get_metric_models, metric_model_refs

            scorer = get_metric_models(*metric_model_refs(preset), device=device)
        return cls(
            detector=OwlDetector(refs.detector, device=device),
            masker=SamMasker(refs.masker, device=device),
            features=Dinov2Features(refs.features, device=device,
                                    size=feature_size or (TINY_FEATURE_SIZE if str(preset) == "tiny" else 448)),
            pose_factory=lambda: VitPoseKeypoints(refs.pose, device=device),
            captioner=Captioner(refs.captioner, device=device) if caption else None,
            scorer=scorer,
            gates=gates,
        )

    @property
    def pose(self):
        if self._pose is None and self._pose_factory is not None:
            self._pose, self._pose_factory = self._pose_factory(), None
        return self._pose

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
        """(subject_points, target_points) pixel (17, 2), confidence (17,), subject scores (17,) or None, layout."""
        if phrase.lower() in self.person_classes and self.pose is not None:
            s_pts, s_scores = self.pose(subject, list(subject_box))
            t_pts, t_scores = self.pose(target, list(box))
            conf = np.minimum(np.asarray(s_scores, np.float64), np.asarray(t_scores, np.float64))
            return np.asarray(s_pts), np.asarray(t_pts), np.clip(conf, 0, 1), np.asarray(s_scores), "coco"
        from .keypoints import mask_points, transfer_keypoints

        points = mask_points(subject_mask, NUM_KEYPOINTS)
        moved = transfer_keypoints(self.features, subject, points, subject_mask, target, target_mask)
        return points, moved.points, np.clip(np.asarray(moved.confidence, np.float64), 0, 1), None, "points"

    def annotate(self, target: Image.Image, subject_images: Sequence[Image.Image], phrases: Sequence[str],
                 layout_boxes: Sequence[Box], prompt: str, relation_phrase: str) -> Annotation | Drop:
        """Annotate one generated sample and apply the gates, cheapest first: CLIP-R, detection (found exactly
        once), layout IoU, keypoint confidence. Returns the annotation or the first failed gate's :class:`Drop`."""
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
        # 3. masks, 4. keypoints
        target_masks = self._masks(target, [d.box for d in picked])
        subjects = []
        for j, (phrase, det, image, target_mask) in enumerate(zip(phrases, picked, subject_images, target_masks)):
            subject_box = self._subject_box(image, phrase)
            subject_mask = self._masks(image, [subject_box])[0]
            try:
                s_pts, t_pts, conf, s_scores, layout = self._keypoints(
                    phrase, image, subject_box, subject_mask, target, det.box, target_mask)
            except ValueError as exc:  # mask_points: a mask too small to place 17 points in
                return Drop("annotate", "mask_too_small", f"subject {j} ({phrase!r}): {exc}", metrics)
            metrics[f"keypoint_confidence_{j}"] = round(float(np.mean(conf)), 4)
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
        # 5. caption (optional)
        caption = self.captioner(target) if self.captioner is not None else None
        return Annotation(subjects=tuple(subjects), clip_r=clip_r, caption=caption, metrics=metrics)

