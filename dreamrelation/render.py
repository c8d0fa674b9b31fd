"""Pictures for people: a generated image with its layout boxes and subject phrases drawn on it."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw

COLORS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4")


def draw_layout(image: Image.Image, boxes: Sequence[Sequence[float]], phrases: Sequence[str]) -> Image.Image:
    """A copy of ``image`` with each normalized box outlined and labelled with its phrase."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    width = max(1, round(min(w, h) / 128))
    for j, (box, phrase) in enumerate(zip(boxes, phrases)):
        color = COLORS[j % len(COLORS)]
        x0, y0, x1, y1 = box[0] * w, box[1] * h, box[2] * w, box[3] * h
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=color, width=width)
        draw.text((x0 + 2 * width, y0 + width), phrase, fill=color)
    return out
