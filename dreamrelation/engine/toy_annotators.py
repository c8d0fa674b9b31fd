"""The toy preset's detector and masker: the toy world's exact reader (``dreamrelation.toy.oracle.read``) behind
the interfaces of OWLv2 and SAM (``dreamrelation.engine.annotate``).

The toy world's subjects are coloured shapes on a flat background, so what an open-vocabulary detector learns on
photographs, reading them back, is exact here: no model is trained for it. With these, the engine's detection,
layout and overlap gates judge toy targets on what is really in them (the tiny preset keeps its random OWLv2 and
SAM twins, whose boxes mean nothing). Keypoints are carried by the weight-free colour features
(``keypoints.ColourFeatures``: the toy world is all colour); pose models, captions and DINO stay the tiny random
ones.

A phrase names a subject in the world's words (``"red striped circle"``; the article and any word the world does
not know are ignored; a phrase with none of its words finds nothing). Each subject read from the image whose
colour the phrase names (any colour where it names none) is a detection, scored by how well its shape fitted (IoU,
``Found.fit``), times :data:`WRONG_SHAPE` when the phrase names another shape and :data:`WRONG_PATTERN` when it
names another pattern: at the toy gates' threshold (0.5) a subject of the wrong shape is not found, one of the
wrong pattern is (the toy VAE loses most 2 px patterns, so a pattern-strict detector would drop nearly every
target).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from ..toy import oracle, world
from .annotate import Detection

__all__ = ["WRONG_PATTERN", "WRONG_SHAPE", "ToyDetector", "ToyMasker", "phrase_parts"]

WRONG_SHAPE = 0.25  # a shape fits renders >= 0.74: x 0.25 stays under any threshold above 0.25
WRONG_PATTERN = 0.8  # 0.74 x 0.8 = 0.59: found at 0.5, the toy gates' threshold


def phrase_parts(phrase: str) -> tuple[str | None, str | None, str | None]:
    """``(colour, pattern, shape)`` named by ``phrase``, None for each it does not name."""
    words = str(phrase).lower().replace("-", " ").split()
    colour = next((w for w in words if w in world.COLOURS), None)
    pattern = next((w for w in words if w in world.PATTERNS), None)
    shape = next((w for w in words if w in world.SHAPES), None)
    return colour, pattern, shape


def _square(image: Image.Image) -> Image.Image:
    """The oracle reads square images: a non-square one is padded with the world's background (bottom / right)."""
    image = image.convert("RGB")
    side = max(image.size)
    if image.size == (side, side):
        return image
    canvas = Image.new("RGB", (side, side), world.BACKGROUND)
    canvas.paste(image, (0, 0))
    return canvas


def _to_image_box(box: Sequence[float], square: int, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """A box normalized in the padded square -> normalized in the image of ``size`` (W, H), clipped."""
    width, height = size
    x0, y0, x1, y1 = (float(v) * square for v in box)
    return (float(np.clip(x0 / width, 0, 1)), float(np.clip(y0 / height, 0, 1)),
            float(np.clip(x1 / width, 0, 1)), float(np.clip(y1 / height, 0, 1)))


class ToyDetector:
    """``detect(image, phrases, threshold)`` as :class:`~dreamrelation.engine.annotate.OwlDetector`'s: per phrase,
    the subjects read from ``image`` that it may name, with a score of at least ``threshold``, best first."""

    def detect(self, image: Image.Image, phrases: list[str], threshold: float) -> list[list[Detection]]:
        if not isinstance(phrases, (list, tuple)) or not phrases:
            raise ValueError(f"phrases must be a non-empty list of strings, got {phrases!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
        square = _square(image)
        reading = oracle.read(square)
        results = []
        for phrase in phrases:
            colour, pattern, shape = phrase_parts(phrase)
            found = []
            if colour is None and pattern is None and shape is None:  # a phrase from another world: nothing
                results.append(found)
                continue
            for subject in reading.subjects.values():
                ident = subject.identity
                if colour is not None and ident.colour != colour:
                    continue
                score = subject.fit
                score *= WRONG_SHAPE if shape is not None and ident.shape != shape else 1.0
                score *= WRONG_PATTERN if pattern is not None and ident.pattern != pattern else 1.0
                if score >= threshold:
                    found.append(Detection(_to_image_box(subject.box, square.size[0], image.size), float(score)))
            results.append(sorted(found, key=lambda d: -d.score))
        return results


class ToyMasker:
    """``masker(image, boxes)`` as :class:`~dreamrelation.engine.annotate.SamMasker`'s: per normalized box, the
    visible pixels of the subject read from ``image`` whose box overlaps it most (an empty mask where none does)."""

    def __call__(self, image: Image.Image, boxes: Sequence[Sequence[float]]) -> list[np.ndarray]:
        from .gates import box_iou

        square = _square(image)
        reading = oracle.read(square)
        width, height = image.size
        subjects = list(reading.subjects.values())
        out = []
        for box in boxes:
            mask = np.zeros((height, width), bool)
            ious = [box_iou(_to_image_box(s.box, square.size[0], image.size), tuple(box)) for s in subjects]
            if ious and max(ious) > 0.0:
                mask = subjects[int(np.argmax(ious))].geometry.mask[:height, :width].copy()
            out.append(mask)
        return out
