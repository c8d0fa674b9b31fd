"""Pictures for people: a generated image with its layout boxes and subject phrases drawn on it."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw

COLORS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4")


def draw_layout(image: Image.Image, boxes: Sequence[Sequence[float]], phrases: Sequence[str]) -> Image.Image:
    """A copy of ``image`` with each normalized ``[x0, y0, x1, y1]`` box outlined and labelled with its phrase.

    Subject ``j`` gets colour ``COLORS[j % 6]``; the image itself is left untouched.
    """
    if len(boxes) != len(phrases):
        raise ValueError(f"one phrase per box: got {len(boxes)} boxes and {len(phrases)} phrases ({list(phrases)!r})")
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    line = max(1, round(min(w, h) / 128))
    for j, (box, phrase) in enumerate(zip(boxes, phrases)):
        if len(box) != 4:
            raise ValueError(f"boxes[{j}] must be [x0, y0, x1, y1], got {box!r}")
        color = COLORS[j % len(COLORS)]
        # Normalized -> pixel corners; the last pixel row/column is w-1/h-1, and a box under a pixel wide stays one.
        x0, y0 = round(box[0] * w), round(box[1] * h)
        x1, y1 = max(x0, round(box[2] * w) - 1), max(y0, round(box[3] * h) - 1)
        draw.rectangle([x0, y0, x1, y1], outline=color, width=line)
        # Label on a filled strip so it stays legible on any background.
        tx, ty = x0 + line, y0 + line
        left, top, right, bottom = draw.textbbox((tx, ty), phrase)
        draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=color)
        draw.text((tx, ty), phrase, fill="white")
    return out
