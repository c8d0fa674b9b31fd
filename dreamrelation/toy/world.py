"""The toy world: coloured, patterned shapes acting out geometric relations, rendered exactly on a CPU.

A subject's identity is shape x colour x pattern ("a red striped circle": 4 x 5 x 3 = 60 identities). A scene puts
1-3 subjects with distinct colours into square layout boxes and acts out one relation of ``RELATIONS``; a render
gives the image, the caption, the boxes (normalized ``[x0, y0, x1, y1]``, the project's convention), the visible
and full masks and 17 keypoints per subject. The same ``seed`` gives the same scene (``random.Random``, stable
across Python versions).

Size: 64 x 64 (``SIZE``). It is the smallest side at which every relation stays legible: a stack of three needs
three subjects of at least 12 px plus a margin, and at 12 px a striped subject still shows three stripe periods
(stripes 2 px, period 4), a dotted one three rows of 2 x 2 dots, and the four shapes still differ in a fifth or
more of their pixels (IoU at most 0.78, circle against square). At 32 px the smallest subjects would be 6 px, where
a circle and a square differ by 4 pixels (IoU 0.89) and a stripe is one pixel that JPEG smears away. Other sizes
(multiples of 8 from 64 to 512) scale every length by ``size / 64``.

Rendering is hard-edged (no antialiasing): each pixel is the background, a subject's colour or its dark shade (its
pattern), so a render can be read back exactly (``dreamrelation.toy.oracle``). Relations are decided by
``relation_holds`` from geometry alone (visible masks, full shapes, boxes); scenes are drawn until their relation
holds and no other relation of the same arity does (nor, for a directional relation, the one with roles swapped).

Keypoints: 17 per subject, places on the shape (so ``dreamrelation.train.data``'s "points" layout: a flip mirrors them
and keeps their order), in this order (``KEYPOINT_NAMES``): 0 the box centre; 1-8 points at 85% of the way from the
centre to the outline, going clockwise from the top (top, top-right, right, bottom-right, bottom, bottom-left, left,
top-left; "right" is image-right, y grows downwards); 9-16 the same eight directions at 45% of the way.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import permutations

import numpy as np
from PIL import Image

__all__ = [
    "BACKGROUND",
    "COLOURS",
    "DARK",
    "KEYPOINT_LAYOUT",
    "KEYPOINT_NAMES",
    "PATTERNS",
    "RELATIONS",
    "SHAPES",
    "SIZE",
    "Geometry",
    "Identity",
    "Layout",
    "Relation",
    "Render",
    "check_size",
    "dark_shade",
    "mask_gap",
    "pattern_mask",
    "portrait",
    "random_identities",
    "random_scene",
    "rasterize",
    "relation",
    "relation_holds",
    "relations_holding",
    "render",
    "sample_layout",
    "scene",
]

SIZE = 64
SHAPES = ("circle", "square", "triangle", "diamond")  # triangle: apex up, base on the box's bottom edge
PATTERNS = ("solid", "striped", "dotted")  # in the dark shade: horizontal stripes, a grid of square dots
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 220), "yellow": (235, 195, 30),
    "purple": (150, 50, 190),
}
DARK = 0.45  # a pattern's shade: the colour times this
BACKGROUND = (240, 240, 240)
KEYPOINT_LAYOUT = "points"  # dreamrelation.train.data.KEYPOINT_FLIPS: places on the subject, not left/right body parts
_DIRECTIONS = ("top", "top_right", "right", "bottom_right", "bottom", "bottom_left", "left", "top_left")
KEYPOINT_NAMES = ("centre", *_DIRECTIONS, *(f"inner_{d}" for d in _DIRECTIONS))
MAX_TRIES = 2000  # layout draws per scene before giving up (a few suffice: see the test's counts)

PixelBox = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, ends exclusive; always square here


def dark_shade(colour: str) -> tuple[int, int, int]:
    return tuple(round(c * DARK) for c in COLOURS[colour])


def check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or not (64 <= size <= 512 and size % 8 == 0):
        raise ValueError(f"size must be a multiple of 8 from 64 to 512 (pixels), got {size!r}")
    return size


# --------------------------------------------------------------------------------------------------------- identity

@dataclass(frozen=True)
class Identity:
    """What a subject is: ``shape`` (``SHAPES``), ``colour`` (``COLOURS``), ``pattern`` (``PATTERNS``)."""

    shape: str
    colour: str
    pattern: str

    def __post_init__(self) -> None:
        for name, known in (("shape", SHAPES), ("colour", tuple(COLOURS)), ("pattern", PATTERNS)):
            if getattr(self, name) not in known:
                raise ValueError(f"{name} must be one of {list(known)}, got {getattr(self, name)!r}")

    @property
    def phrase(self) -> str:
        """``"red striped circle"``: the subject's words in a caption and a manifest's ``phrase``."""
        return f"{self.colour} {self.pattern} {self.shape}"

    @property
    def slug(self) -> str:
        return self.phrase.replace(" ", "-")

    @classmethod
    def parse(cls, phrase: str) -> Identity:
        """``"a red striped circle"`` (article optional, any case) -> ``Identity("circle", "red", "striped")``."""
        words = str(phrase).lower().replace("-", " ").split()
        if words and words[0] in ("a", "an"):
            words = words[1:]
        if len(words) != 3:
            raise ValueError(f"phrase must read '<colour> <pattern> <shape>', e.g. 'red striped circle', "
                             f"got {phrase!r}")
        return cls(shape=words[2], colour=words[0], pattern=words[1])


def random_identities(n: int, rng: random.Random) -> tuple[Identity, ...]:
    """``n`` identities with distinct colours (the oracle tells subjects apart by colour)."""
    if not 1 <= n <= len(COLOURS):
        raise ValueError(f"n must be in [1, {len(COLOURS)}] (one colour per subject), got {n!r}")
    colours = rng.sample(sorted(COLOURS), n)
    return tuple(Identity(rng.choice(SHAPES), c, rng.choice(PATTERNS)) for c in colours)


# -------------------------------------------------------------------------------------------------------- relations

@dataclass(frozen=True)
class Relation:
    """A relation among ``arity`` subjects: ``text`` has one ``{}`` per subject (in order), ``phrase`` is the
    relation's words (what CLIP-R would score), ``symmetric``: any order of the subjects means the same."""

    id: str
    arity: int
    text: str
    phrase: str
    symmetric: bool = False

    def caption(self, identities: Sequence[Identity]) -> str:
        if len(identities) != self.arity:
            raise ValueError(f"identities: relation {self.id!r} takes {self.arity} subjects, got {len(identities)}")
        return self.text.format(*(i.phrase for i in identities))


RELATIONS: tuple[Relation, ...] = (
    Relation("on_the_ground", 1, "A {} is resting on the ground.", "resting on the ground"),
    Relation("floating", 1, "A {} is floating high in the air.", "floating high in the air"),
    Relation("in_the_middle", 1, "A {} is in the middle of the picture.", "in the middle"),
    Relation("next_to", 2, "A {} is next to a {}.", "next to", symmetric=True),
    Relation("on_top_of", 2, "A {} is on top of a {}, touching it.", "on top of"),
    Relation("inside", 2, "A {} is inside a {}.", "inside"),
    Relation("overlapping", 2, "A {} is in front of a {}, overlapping it.", "overlapping"),
    Relation("stacked", 3, "A {} is stacked on a {} on a {}.", "stacked on"),
    Relation("in_a_row", 3, "A {}, a {} and a {} stand in a row.", "in a row"),
)
_BY_ID = {r.id: r for r in RELATIONS}


def relation(relation_id: str) -> Relation:
    try:
        return _BY_ID[relation_id]
    except (KeyError, TypeError):
        raise ValueError(f"relation must be one of {list(_BY_ID)}, got {relation_id!r}") from None


# ----------------------------------------------------------------------------------------------------- rasterizing

_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres (x, y), each (size, size): pixel column i spans [i, i + 1)."""
    if size not in _GRIDS:
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
        _GRIDS[size] = (xs, ys)
    return _GRIDS[size]


def rasterize(shape: str, box: Sequence[float], size: int) -> np.ndarray:
    """(size, size) bool: the pixels whose centres lie in ``shape`` drawn in the pixel box ``box`` (which may reach
    outside the image). The box's bounding rows and columns are always hit (so a lone shape's pixel extent is its
    box): the diamond's tips by a tolerance, the triangle's apex row by a half-pixel widening."""
    x0, y0, x1, y1 = (float(v) for v in box)
    xs, ys = _grid(size)
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    inside = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    if shape == "square":
        return inside
    if shape == "circle":
        return inside & ((xs - cx) ** 2 + (ys - cy) ** 2 <= r * r + 1e-6)
    if shape == "diamond":
        return inside & (np.abs(xs - cx) + np.abs(ys - cy) <= r + 1e-6)
    if shape == "triangle":
        return inside & (np.abs(xs - cx) <= (ys - y0) / 2 + 0.5)
    raise ValueError(f"shape must be one of {list(SHAPES)}, got {shape!r}")


def pattern_mask(pattern: str, box: PixelBox, size: int) -> np.ndarray:
    """(size, size) bool: where ``pattern`` puts the dark shade, anchored at the box's top-left corner.
    Stripes: rows of width ``w`` (2 px at 64), period ``2w``; dots: ``w`` x ``w`` squares on a ``2w`` grid."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {list(PATTERNS)}, got {pattern!r}")
    xs, ys = _grid(size)
    w = max(2, round(2 * size / SIZE))
    row = np.floor(ys - 0.5 - box[1]).astype(int)
    col = np.floor(xs - 0.5 - box[0]).astype(int)
    if pattern == "solid":
        return np.zeros((size, size), bool)
    if pattern == "striped":
        return (row // w) % 2 == 1
    return ((row - w // 2) % (2 * w) < w) & ((col - w // 2) % (2 * w) < w)


def _unit_keypoints(shape: str) -> np.ndarray:
    """(17, 2) keypoints of ``shape`` in its unit box (x right, y down), in ``KEYPOINT_NAMES`` order."""
    def inside(u: float, v: float) -> bool:
        if not (0 <= u <= 1 and 0 <= v <= 1):
            return False
        return {"square": True, "circle": (u - .5) ** 2 + (v - .5) ** 2 <= .25,
                "diamond": abs(u - .5) + abs(v - .5) <= .5, "triangle": abs(u - .5) <= v / 2}[shape]

    points = [(0.5, 0.5)]
    reach = []
    for k in range(8):  # clockwise from the top
        dx, dy = math.sin(k * math.pi / 4), -math.cos(k * math.pi / 4)
        t = 0.0
        while inside(0.5 + (t + 1e-3) * dx, 0.5 + (t + 1e-3) * dy):
            t += 1e-3
        reach.append((dx, dy, t))
    for fraction in (0.85, 0.45):
        points += [(0.5 + fraction * t * dx, 0.5 + fraction * t * dy) for dx, dy, t in reach]
    return np.asarray(points)


UNIT_KEYPOINTS = {shape: _unit_keypoints(shape) for shape in SHAPES}


# -------------------------------------------------------------------------------------------------------- geometry

@dataclass(frozen=True, eq=False)
class Geometry:
    """One subject as the relations see it: its full (amodal) pixel ``box``, its ``mask`` of visible pixels and
    its ``shape_mask`` (the whole shape, hidden pixels included), both (size, size) bool."""

    box: tuple[float, float, float, float]
    mask: np.ndarray
    shape_mask: np.ndarray

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

    @property
    def side(self) -> float:
        return self.box[3] - self.box[1]


def _boundary(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def mask_gap(a: np.ndarray, b: np.ndarray) -> float:
    """The distance between the closest pixel centres of two masks (1.0: they touch side by side; inf: one is
    empty)."""
    pa, pb = np.argwhere(_boundary(a)), np.argwhere(_boundary(b))
    if not len(pa) or not len(pb):
        return math.inf
    return float(np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1).min()))


def _covered(a: Geometry, b: Geometry) -> int:
    """Visible pixels of ``a`` over the full shape of ``b``."""
    return int((a.mask & b.shape_mask).sum())


def _next_to(a: Geometry, b: Geometry, size: int) -> bool:
    u = size / SIZE
    disjoint = a.box[2] <= b.box[0] + u or b.box[2] <= a.box[0] + u
    vertical = min(a.box[3], b.box[3]) - max(a.box[1], b.box[1])
    return disjoint and vertical >= 0.5 * min(a.side, b.side) and 4 * u <= mask_gap(a.mask, b.mask) <= 0.3 * size


def _on_top_of(a: Geometry, b: Geometry, size: int) -> bool:
    (ax, ay), u = a.centre, size / SIZE
    return (ay <= b.box[1] + 0.15 * b.side and a.box[3] <= b.centre[1] and b.box[0] <= ax <= b.box[2]
            and _covered(a, b) <= 0.2 * a.mask.sum() and mask_gap(a.mask, b.mask) <= 3 * u)


def _inside(a: Geometry, b: Geometry, size: int) -> bool:
    u = size / SIZE
    within = (a.box[0] >= b.box[0] - u and a.box[1] >= b.box[1] - u and a.box[2] <= b.box[2] + u
              and a.box[3] <= b.box[3] + u)
    return within and a.side < b.side and _covered(a, b) >= 0.9 * a.mask.sum() > 0


def _overlapping(a: Geometry, b: Geometry, size: int) -> bool:
    covered = _covered(a, b)
    return 0.06 * b.shape_mask.sum() <= covered <= 0.8 * a.mask.sum() and covered > _covered(b, a)


def relation_holds(relation_id: str, subjects: Sequence[Geometry], size: int = SIZE) -> bool:
    """Whether ``relation_id`` holds among ``subjects`` (in the relation's order: the first is the one "on top
    of", "inside", "in front of" the second). Pixel thresholds scale with ``size / 64``; each leaves a margin of
    2-3 px (at 64) over how scenes are drawn, so that a slightly shifted, noisy or compressed render reads alike.

    - on_the_ground: the box's bottom within 3 px of the image's; floating: the bottom above the middle;
      in_the_middle: the box centre within 8% of the image's centre.
    - next_to: boxes apart horizontally and overlapping vertically by half the smaller, masks 4 px to 30% of the
      image apart. on_top_of: touching (masks within 3 px), the first's centre above the second's top (within
      15% of its side) and its bottom above the second's centre, over its box, not hiding it. inside: the first's
      box within the second's, 90% of its pixels over the second's full shape. overlapping: the first hides 6% or
      more of the second's full shape, lies over it with at most 80% of its pixels, and shows more of itself
      over the second's shape than the second does over its own (it is the one in front).
    - stacked: on_top_of twice (first on second, second on third); in_a_row: next_to twice, left to right.
    """
    rel = relation(relation_id)
    if len(subjects) != rel.arity:
        raise ValueError(f"subjects: relation {rel.id!r} takes {rel.arity} subjects, got {len(subjects)}")
    u = size / SIZE
    if rel.id == "on_the_ground":
        return subjects[0].box[3] >= size - 3 * u
    if rel.id == "floating":
        return subjects[0].box[3] <= size / 2
    if rel.id == "in_the_middle":
        cx, cy = subjects[0].centre
        return abs(cx - size / 2) <= 0.08 * size and abs(cy - size / 2) <= 0.08 * size
    if rel.id in ("next_to", "on_top_of", "inside", "overlapping"):
        test = {"next_to": _next_to, "on_top_of": _on_top_of, "inside": _inside, "overlapping": _overlapping}
        return test[rel.id](subjects[0], subjects[1], size)
    a, b, c = subjects
    if rel.id == "stacked":
        return _on_top_of(a, b, size) and _on_top_of(b, c, size)
    return _next_to(a, b, size) and _next_to(b, c, size) and a.centre[0] < b.centre[0] < c.centre[0]


def relations_holding(subjects: Sequence[Geometry], size: int = SIZE) -> set[tuple[str, tuple[int, ...]]]:
    """Every ``(relation id, order)`` that holds among ``subjects``: relations of their arity, the subjects taken
    in ``order`` (a permutation of their indices)."""
    n = len(subjects)
    return {(r.id, order) for r in RELATIONS if r.arity == n for order in permutations(range(n))
            if relation_holds(r.id, [subjects[k] for k in order], size)}


def _only_holds(relation_id: str, subjects: Sequence[Geometry], size: int) -> bool:
    """The relation holds in the given order, and nothing else does but its symmetric reorderings."""
    holding = relations_holding(subjects, size)
    allowed = relation(relation_id).symmetric
    identity = tuple(range(len(subjects)))
    return (relation_id, identity) in holding and all(r == relation_id and (allowed or order == identity)
                                                      for r, order in holding)


# ---------------------------------------------------------------------------------------------------------- layouts

@dataclass(frozen=True)
class Layout:
    """A scene before rendering: subjects, their square pixel boxes, and the drawing order (back to front)."""

    relation: str
    identities: tuple[Identity, ...]
    boxes: tuple[PixelBox, ...]
    order: tuple[int, ...]
    size: int = SIZE
    seed: int = 0


def _square(x0: float, y0: float, s: int) -> PixelBox:
    x0, y0 = round(x0), round(y0)
    return (x0, y0, x0 + s, y0 + s)


def _drop(shape: str, box: PixelBox, support: np.ndarray, size: int) -> PixelBox | None:
    """``box`` moved straight down (or up) until its shape rests on ``support``: touching it in at least one
    column, above it in every column they share. None when they share no column."""
    mask = rasterize(shape, (box[0], 0, box[2], box[2] - box[0]), size)  # the shape at the top of the image
    shared = mask.any(0) & support.any(0)
    if not shared.any():
        return None
    bottom = size - 1 - np.argmax(mask[::-1], axis=0)  # (size,) lowest row of the shape per column
    top = np.argmax(support, axis=0)  # (size,) highest row of the support per column
    dy = int((top - bottom - 1)[shared].min())
    return (box[0], dy, box[2], dy + box[2] - box[0])


def _erode(mask: np.ndarray, r: int) -> np.ndarray:
    """Pixels whose whole (2r+1)^2 neighbourhood lies in ``mask`` (outside the image counts as outside)."""
    padded = np.pad(mask, r)
    out = np.ones_like(mask)
    n = mask.shape[0]
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out &= padded[dy:dy + n, dx:dx + n]
    return out


def _boxes(rel: str, ids: Sequence[Identity], rng: random.Random, size: int) -> tuple[tuple, tuple] | None:
    """One draw of pixel boxes and the drawing order for ``rel``; None when the draw does not fit."""
    u = size / SIZE
    m = round(3 * u)  # margin to the image's left, right and top edges

    def side(lo: float, hi: float) -> int:
        return rng.randint(round(lo * u), round(hi * u))

    def x_for(s: int) -> int:
        return rng.randint(m, size - m - s)

    if rel == "on_the_ground":
        s = side(16, 40)
        return (_square(x_for(s), size - s, s),), (0,)
    if rel == "floating":
        s = side(12, 24)
        return (_square(x_for(s), rng.randint(m, int(0.45 * size) - s), s),), (0,)
    if rel == "in_the_middle":
        s = side(20, 36)
        jitter = round(2 * u)
        return (_square(size / 2 - s / 2 + rng.randint(-jitter, jitter),
                        size / 2 - s / 2 + rng.randint(-jitter, jitter), s),), (0,)
    if rel in ("next_to", "in_a_row"):
        sides = [side(14, 26) if rel == "next_to" else side(12, 17) for _ in ids]
        gaps = [side(6, 12) if rel == "next_to" else side(5, 8) for _ in ids[1:]]
        if sum(sides) + sum(gaps) > size - 2 * m:
            return None
        order = list(range(len(ids)))
        if rel == "next_to" and rng.random() < 0.5:
            order.reverse()  # next_to is symmetric: either subject may be the left one
        x, base, boxes = x_for(sum(sides) + sum(gaps)), rng.randint(max(sides) + m, size), [None] * len(ids)
        for k, i in enumerate(order):
            bottom = min(size, base + rng.randint(-round(2 * u), round(2 * u)))
            boxes[i] = _square(x, bottom - sides[i], sides[i])
            x += sides[i] + (gaps[k] if k < len(gaps) else 0)
        return tuple(boxes), tuple(range(len(ids)))
    if rel in ("on_top_of", "stacked"):
        sides = [side(12, 24), side(18, 32)] if rel == "on_top_of" else [side(12, 18), side(14, 20), side(16, 24)]
        low = len(ids) - 1
        s = sides[low]
        boxes = [None] * len(ids)
        boxes[low] = _square(x_for(s), size - s if rng.random() < 0.5 else rng.randint(size // 2, size - s), s)
        for i in range(low - 1, -1, -1):  # each subject dropped onto the one below it
            below = boxes[i + 1]
            cx = (below[0] + below[2]) / 2 + rng.uniform(-0.12, 0.12) * (below[2] - below[0])
            dropped = _drop(ids[i].shape, _square(cx - sides[i] / 2, 0, sides[i]),
                            rasterize(ids[i + 1].shape, below, size), size)
            if dropped is None or dropped[1] < m or dropped[0] < m or dropped[2] > size - m:
                return None
            boxes[i] = dropped
        return tuple(boxes), tuple(range(len(ids) - 1, -1, -1))
    if rel == "inside":
        sb = side(34, 52)
        outer = _square(x_for(sb), rng.randint(m, size - sb), sb)
        room = _erode(rasterize(ids[1].shape, outer, size), round(2 * u))  # a 2 px ring of the outer around
        ys, xs = np.nonzero(room)
        if not len(xs):
            return None
        sa, reach = side(12, 0.42 * sb / u), round(6 * u)
        x, y = round(xs.mean() + 0.5 - sa / 2), round(ys.mean() + 0.5 - sa / 2)  # around the room's centroid
        fits = [box for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)
                if not (rasterize(ids[0].shape, box := _square(x + dx, y + dy, sa), size) & ~room).any()]
        return ((rng.choice(fits), outer), (1, 0)) if fits else None
    if rel == "overlapping":  # the first in front, covering 25-40% of the second's width from one side
        sa, sb = side(14, 28), side(18, 30)
        back = _square(x_for(sb), rng.randint(m, size - sb), sb)
        overlap = rng.randint(round(0.25 * sb), round(0.4 * sb))
        x = back[2] - overlap if rng.random() < 0.5 else back[0] + overlap - sa
        dy = rng.randint(-round(0.12 * sb), round(0.12 * sb))
        front = _square(x, (back[1] + back[3]) / 2 - sa / 2 + dy, sa)
        if front[0] < m or front[2] > size - m or front[1] < m or front[3] > size:
            return None
        return (front, back), (1, 0)
    raise ValueError(f"relation must be one of {list(_BY_ID)}, got {rel!r}")


def sample_layout(relation_id: str, seed: int = 0, size: int = SIZE,
                  identities: Sequence[Identity] | None = None) -> Layout:
    """A layout acting out ``relation_id``, drawn from ``seed`` (subjects too, unless ``identities`` are given):
    drawn again until every box lies in the image, the relation holds and no other does (``relations_holding``),
    every subject shows at least 60% of its shape, no subject hides another unless the relation is inside or
    overlapping, and one in front hides at least 12% of the other."""
    rel, size = relation(relation_id), check_size(size)
    rng = random.Random(seed)
    ids = (random_identities(rel.arity, rng) if identities is None
           else tuple(i if isinstance(i, Identity) else Identity.parse(i) for i in identities))
    if len(ids) != rel.arity:
        raise ValueError(f"identities: relation {rel.id!r} takes {rel.arity} subjects, got {len(ids)}")
    if len({i.colour for i in ids}) != len(ids):
        raise ValueError(f"identities must have distinct colours (the oracle tells subjects apart by colour), "
                         f"got {[i.phrase for i in ids]}")
    for _ in range(MAX_TRIES):
        drawn = _boxes(rel.id, ids, rng, size)
        if drawn is None:
            continue
        layout = Layout(rel.id, ids, *drawn, size=size, seed=seed)
        if not all(0 <= b[0] and 0 <= b[1] and b[2] <= size and b[3] <= size for b in layout.boxes):
            continue
        geometry = _geometry(layout)
        if rel.id not in ("inside", "overlapping") and sum(g.shape_mask.astype(int) for g in geometry).max() > 1:
            continue  # only these two relations let one subject hide another
        if rel.id == "overlapping" and not _covered(geometry[0], geometry[1]) >= 0.12 * geometry[1].shape_mask.sum():
            continue  # twice relation_holds' 6%: a blurred front edge must not undo it
        if all(g.mask.sum() >= 0.6 * g.shape_mask.sum() for g in geometry) and _only_holds(rel.id, geometry, size):
            return layout
    raise RuntimeError(f"no layout for {rel.id!r} with {[i.phrase for i in ids]} in {MAX_TRIES} draws (seed {seed})")


# ---------------------------------------------------------------------------------------------------------- render

def _geometry(layout: Layout) -> tuple[Geometry, ...]:
    shapes = [rasterize(i.shape, b, layout.size) for i, b in zip(layout.identities, layout.boxes)]
    visible = [m.copy() for m in shapes]
    for rank, k in enumerate(layout.order):
        for front in layout.order[rank + 1:]:
            visible[k] &= ~shapes[front]
    return tuple(Geometry(tuple(float(v) for v in b), v, s) for b, v, s in zip(layout.boxes, visible, shapes))


@dataclass(frozen=True, eq=False)
class Render:
    """A rendered scene. S subjects; H = W = ``layout.size``.

    Attributes:
        image: RGB image.
        caption: the relation's text with the subjects' phrases ("A red striped circle is inside a ...").
        boxes: (S, 4) float normalized ``[x0, y0, x1, y1]`` (the full shapes', hidden parts included).
        masks: (S, H, W) bool, the visible pixels of each subject.
        shape_masks: (S, H, W) bool, each subject's whole shape.
        keypoints: (S, 17, 2) float normalized (x, y), ``KEYPOINT_NAMES`` order.
        visibility: (S, 17) float, 1 where the keypoint's pixel shows its subject.
        geometry: per subject, what ``relation_holds`` reads (pixel box, visible mask, whole shape).
    """

    layout: Layout
    image: Image.Image
    caption: str
    boxes: np.ndarray
    masks: np.ndarray
    shape_masks: np.ndarray
    keypoints: np.ndarray
    visibility: np.ndarray
    geometry: tuple[Geometry, ...] = field(repr=False)

    @property
    def identities(self) -> tuple[Identity, ...]:
        return self.layout.identities

    @property
    def relation(self) -> Relation:
        return relation(self.layout.relation)


def _keypoints(shape: str, box: PixelBox) -> np.ndarray:
    """(17, 2) pixel keypoints of ``shape`` in ``box``."""
    return np.asarray(box[:2], float) + UNIT_KEYPOINTS[shape] * (box[2] - box[0])


def render(layout: Layout) -> Render:
    """Paint ``layout`` back to front: each subject in its colour, its pattern in the dark shade."""
    size = layout.size
    canvas = np.empty((size, size, 3), np.uint8)
    canvas[:] = BACKGROUND
    geometry = _geometry(layout)
    for k in layout.order:
        ident, box, shape = layout.identities[k], layout.boxes[k], geometry[k].shape_mask
        dark = pattern_mask(ident.pattern, box, size)
        canvas[shape & ~dark] = COLOURS[ident.colour]
        canvas[shape & dark] = dark_shade(ident.colour)
    keypoints = np.stack([_keypoints(i.shape, b) for i, b in zip(layout.identities, layout.boxes)])  # (S, 17, 2)
    cols = np.clip(keypoints[..., 0].astype(int), 0, size - 1)
    rows = np.clip(keypoints[..., 1].astype(int), 0, size - 1)
    visibility = np.stack([g.mask[rows[k], cols[k]] for k, g in enumerate(geometry)]).astype(np.float32)
    return Render(layout=layout, image=Image.fromarray(canvas, "RGB"),
                  caption=relation(layout.relation).caption(layout.identities),
                  boxes=np.asarray(layout.boxes, np.float64) / size,
                  masks=np.stack([g.mask for g in geometry]), shape_masks=np.stack([g.shape_mask for g in geometry]),
                  keypoints=keypoints / size, visibility=visibility, geometry=geometry)


def scene(relation_id: str, seed: int = 0, size: int = SIZE,
          identities: Sequence[Identity] | None = None) -> Render:
    """``render(sample_layout(...))``: the scene of ``relation_id`` drawn from ``seed``."""
    return render(sample_layout(relation_id, seed, size, identities))


def random_scene(seed: int, size: int = SIZE, relations: Sequence[str] | None = None) -> Render:
    """A scene of a relation drawn from ``relations`` (default: all) with ``seed``."""
    pool = [relation(r).id for r in relations] if relations is not None else list(_BY_ID)
    if not pool:
        raise ValueError("relations must name at least one relation, got none")
    rng = random.Random(seed)
    return scene(rng.choice(pool), rng.randrange(2**31), size)


def portrait(identity: Identity, size: int = SIZE) -> tuple[Image.Image, np.ndarray]:
    """The subject alone, centred, filling 75% of a ``size`` x ``size`` image (its image prompt), and its (17, 2)
    normalized keypoints."""
    s = round(0.75 * check_size(size)) // 2 * 2
    box = _square((size - s) / 2, (size - s) / 2, s)
    shot = render(Layout("in_the_middle", (identity,), (box,), (0,), size))
    return shot.image, shot.keypoints[0]
