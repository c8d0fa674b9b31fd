"""Layout boxes: normalized ``[x0, y0, x1, y1]`` in [0, 1]. Pure Python, so callers can check input cheaply."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

Box = Sequence[float]  # normalized [x0, y0, x1, y1]


def check_box(box: Any, name: str = "box") -> None:
    """A normalized ``[x0, y0, x1, y1]``: four finite numbers in [0, 1] with x0 < x1 and y0 < y1."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise ValueError(f"{name} must be [x0, y0, x1, y1], got {box!r}")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box):
        raise ValueError(f"{name} must hold four finite numbers, got {box!r}")
    x0, y0, x1, y1 = box
    if not all(0.0 <= v <= 1.0 for v in box):
        raise ValueError(f"{name} must lie inside [0, 1] (normalized coordinates), got {box!r}")
    if x0 >= x1 or y0 >= y1:
        raise ValueError(f"{name} must have x0 < x1 and y0 < y1, got {box!r}")
