"""Write the small example subject images used by the quickstart and the tests (deterministic).

    python manifests/examples/make_subjects.py [OUT_DIR]     # default: manifests/examples/subjects

Each subject is a simple drawn figure on a plain background, 128x128 PNG: stand-ins for a user's product photos.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw

SUBJECTS = {
    # name: (background, body colour, accent colour, shape)
    "dog": ((235, 230, 220), (150, 95, 50), (60, 40, 20), "ellipse"),
    "cat": ((220, 230, 240), (230, 140, 40), (40, 40, 40), "triangle-ears"),
    "plushie_bear": ((240, 225, 230), (170, 120, 80), (250, 240, 220), "round-ears"),
    "robot": ((225, 240, 225), (120, 130, 150), (240, 60, 60), "rectangle"),
    "teapot": ((245, 240, 225), (60, 120, 170), (250, 250, 250), "spout"),
}


def draw_subject(body, accent, shape: str, background, size: int = 128) -> Image.Image:
    img = Image.new("RGB", (size, size), background)
    d = ImageDraw.Draw(img)
    s = size / 128
    if shape == "rectangle":
        d.rectangle([40 * s, 30 * s, 88 * s, 110 * s], fill=body)
        d.rectangle([48 * s, 14 * s, 80 * s, 34 * s], fill=body)
        d.ellipse([54 * s, 20 * s, 60 * s, 26 * s], fill=accent)
        d.ellipse([68 * s, 20 * s, 74 * s, 26 * s], fill=accent)
    elif shape == "spout":
        d.ellipse([30 * s, 50 * s, 98 * s, 110 * s], fill=body)
        d.polygon([(96 * s, 70 * s), (120 * s, 52 * s), (100 * s, 86 * s)], fill=body)
        d.arc([10 * s, 58 * s, 40 * s, 96 * s], 90, 270, fill=body, width=int(6 * s))
        d.ellipse([56 * s, 40 * s, 72 * s, 54 * s], fill=accent)
    else:
        d.ellipse([32 * s, 56 * s, 96 * s, 116 * s], fill=body)  # body
        d.ellipse([40 * s, 16 * s, 88 * s, 64 * s], fill=body)  # head
        if shape == "triangle-ears":
            d.polygon([(42 * s, 30 * s), (50 * s, 6 * s), (60 * s, 24 * s)], fill=body)
            d.polygon([(68 * s, 24 * s), (78 * s, 6 * s), (86 * s, 30 * s)], fill=body)
        elif shape == "round-ears":
            d.ellipse([34 * s, 10 * s, 52 * s, 28 * s], fill=body)
            d.ellipse([76 * s, 10 * s, 94 * s, 28 * s], fill=body)
            d.ellipse([50 * s, 70 * s, 78 * s, 100 * s], fill=accent)
        else:
            d.ellipse([30 * s, 24 * s, 46 * s, 52 * s], fill=accent)  # floppy ears
            d.ellipse([82 * s, 24 * s, 98 * s, 52 * s], fill=accent)
        d.ellipse([52 * s, 32 * s, 58 * s, 38 * s], fill=(0, 0, 0))
        d.ellipse([70 * s, 32 * s, 76 * s, 38 * s], fill=(0, 0, 0))
    return img


def main(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (bg, body, accent, shape) in SUBJECTS.items():
        path = out / f"{name}.png"
        draw_subject(body, accent, shape, bg).save(path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "subjects"
    for p in main(target):
        print(p)
