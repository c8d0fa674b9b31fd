"""An exact oracle for the toy world: from an image alone, find each subject, read its identity, judge a relation.

Reading an image (``read``):

1. Every pixel is read as a mix of the background and one palette entry (each colour and its dark shade): it
   goes to that entry when mixed in at least half, else to the background, or to "unknown" when it lies farther
   than ``TOLERANCE`` from every such mix (a blend of two subjects).
2. A colour's pixels (both shades) are a subject's visible mask: connected parts smaller than a quarter of the
   largest are dropped (stray pixels), and a colour with fewer than ``MIN_PIXELS`` is absent.
3. Its full square box has the longer side of the mask's extent, flush with either end of each extent or
   centred on it (a subject in front, or the image's edge, may have cut the shorter one). Each shape is drawn in
   each candidate box and compared with the mask (IoU over the pixels that are evidence), less a cost for the
   share of the shape it claims hidden: the simplest explanation wins. First any subject it touches may hide it;
   then only those in front of it, i.e. showing more of their pixels where the two fitted shapes overlap (a small
   diamond inside a big square is in front: a diamond, not a circle whose corners the square hides).
4. A colour whose best shape covers less than ``MIN_FIT`` of its pixels (IoU) is no subject, only pixels of that
   colour: a shape's renders fit 0.74 or more even after JPEG, blobs in noise 0.41 or less (99th percentile, the
   tiny preset's random images). Without this rule noise passed for a subject, and for a relation, 20% of the time.
5. Its pattern comes from the luma inside the mask, scaled between its colour's (1) and its dark shade's (0):
   little spread is solid; when whole rows are dark or bright (rows explain most of the variance) striped; else
   dotted.

Judging (``judge``, ``verdict``): each asked subject is looked up by its colour (the world gives a scene's subjects
distinct colours), its identity is right when shape and pattern match too, and the relation is decided by
``world.relation_holds`` on what was read, the same definition the world draws its scenes with.

``measure`` scores the oracle on random renders, clean or perturbed (``perturb``: Gaussian noise, small shifts,
JPEG), including how often it wrongly says yes to another relation or another identity.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from . import world
from .world import COLOURS, PATTERNS, SHAPES, Geometry, Identity, PixelBox

__all__ = [
    "MIN_FIT",
    "MIN_PIXELS",
    "PERTURBATIONS",
    "TOLERANCE",
    "Found",
    "OracleScore",
    "Reading",
    "Verdict",
    "classify",
    "judge",
    "measure",
    "perturb",
    "read",
    "verdict",
]

TOLERANCE = 60.0  # RGB distance beyond which a pixel is no mix of the background and a palette entry
MIN_PIXELS = 24  # at 64 x 64; a 12 px triangle has 84 pixels and scenes show 60% of every subject or more
MIN_FIT = 0.5  # the IoU a colour's best shape needs to be a subject: renders >= 0.74 (JPEG), noise blobs <= 0.41
SOLID_SPREAD = 0.31  # std of the shade a patterned subject exceeds: clean 0.41-0.50, solid under JPEG <= 0.26
STRIPED_ROWS = 0.7  # share of the shade's variance rows explain: striped >= 0.87, dotted <= 0.50 (JPEG, noise)
_LUMA = np.asarray([0.299, 0.587, 0.114])  # ITU-R BT.601, as JPEG's Y
HIDDEN_COST = 0.25  # what a fitted shape pays per share of itself it claims hidden by others
_COLOUR_NAMES = tuple(COLOURS)
# rows: background, the bright colours, their dark shades
_PALETTE = np.asarray([world.BACKGROUND, *COLOURS.values(), *(world.dark_shade(c) for c in _COLOUR_NAMES)], float)
UNKNOWN, BACKGROUND = -1, 0


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 of a square RGB image."""
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] != array.shape[1] \
            or not (64 <= array.shape[0] <= 512 and array.shape[0] % 8 == 0):
        raise ValueError(f"image must be a square RGB image of 64 to 512 px, a multiple of 8 (the toy world's "
                         f"sizes), got an array of shape {array.shape}")
    return array


def classify(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W) int labels: -1 unknown, 0 background, k + 1 colour k of ``COLOURS`` (either shade).

    Each pixel is read as a mix of the background and one palette entry (a colour or its dark shade): the entry
    whose line from the background passes closest to it, mixed in at least half (else background); farther than
    ``TOLERANCE`` from every line (a blend of two subjects), unknown. Edges blurred towards the background so keep
    their place, where nearest-colour matching would shrink a pale subject (yellow) and grow a dark one."""
    array = _as_array(image).astype(float)
    offset = array.reshape(-1, 3) - _PALETTE[0]  # (N, 3) from the background
    lines = _PALETTE[1:] - _PALETTE[0]  # (2K, 3) background -> each entry
    length2 = (lines ** 2).sum(-1)  # (2K,)
    dot = offset @ lines.T  # (N, 2K)
    mix = np.clip(dot / length2, 0.0, 1.0)  # (N, 2K) share of each entry
    residual2 = (offset ** 2).sum(-1, keepdims=True) - 2 * mix * dot + mix ** 2 * length2  # (N, 2K)
    entry = residual2.argmin(-1)  # (N,)
    labels = np.where(mix[np.arange(len(entry)), entry] >= 0.5, entry % len(COLOURS) + 1, BACKGROUND)
    labels[residual2.min(-1) > TOLERANCE ** 2] = UNKNOWN
    return labels.reshape(array.shape[:2])


@dataclass(frozen=True, eq=False)
class Found:
    """A subject read from an image: its identity, how well the shape fitted (IoU), and its geometry (the full
    box in pixels, the visible mask, the fitted whole shape)."""

    identity: Identity
    fit: float
    geometry: Geometry

    @property
    def box(self) -> tuple[float, float, float, float]:
        """Normalized ``[x0, y0, x1, y1]``, clipped to the image."""
        size = self.geometry.mask.shape[0]
        return tuple(float(np.clip(v / size, 0.0, 1.0)) for v in self.geometry.box)


@dataclass(frozen=True, eq=False)
class Reading:
    """What ``read`` found: colour -> subject, and the image's side; ``unclear``: colour -> best shape fit, for the
    colours with pixels enough but no shape that fits them (``MIN_FIT``)."""

    subjects: dict[str, Found]
    size: int
    unclear: dict[str, float] = field(default_factory=dict)


def _clean(mask: np.ndarray) -> np.ndarray:
    """``mask`` without connected parts (8-connected) smaller than a quarter of the largest."""
    parts, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n <= 1:
        return mask
    counts = np.bincount(parts.ravel())[1:]
    keep = np.flatnonzero(counts >= 0.25 * counts.max()) + 1
    return np.isin(parts, keep)


def _candidate_boxes(mask: np.ndarray) -> list[PixelBox]:
    """Square boxes the mask's full shape may have: side the longer of its extents, flush with either end of each
    extent or centred on it (the shorter extent may have been cut on one side, by a subject in front or the
    image's edge). Larger sides (for edges lost to blur) were tried and lost accuracy under JPEG."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    s = max(r1 - r0, c1 - c0)
    return sorted({(x, y, x + s, y + s) for x in (c0, c1 - s, (c0 + c1 - s) // 2)
                   for y in (r0, r1 - s, (r0 + r1 - s) // 2)})


def _fit(mask: np.ndarray, unknown: np.ndarray, front: np.ndarray) -> tuple[float, str, PixelBox, np.ndarray]:
    """The best (IoU, shape, box, shape mask) over ``SHAPES`` x the candidate boxes: the IoU with ``mask``, leaving
    out ``unknown`` pixels and the ``front`` ones (where subjects in front may hide it), less ``HIDDEN_COST`` times
    the share of the shape it needs hidden there (the simplest explanation wins: a diamond in front of a square is
    a diamond, not a circle whose corners the square hides)."""
    size = mask.shape[0]
    boxes = _candidate_boxes(mask)
    # work in a square window around the candidates (shapes drawn at the window's size: 4-10x fewer pixels)
    x0, y0 = max(0, min(b[0] for b in boxes)), max(0, min(b[1] for b in boxes))
    x1, y1 = min(size, max(b[2] for b in boxes)), min(size, max(b[3] for b in boxes))
    n = max(x1 - x0, y1 - y0)

    def crop(a: np.ndarray) -> np.ndarray:  # (size, size) -> (n, n), False beyond the image
        out = np.zeros((n, n), bool)
        out[:y1 - y0, :x1 - x0] = a[y0:y1, x0:x1]
        return out

    inside = crop(np.ones_like(mask))
    mask, front = crop(mask), crop(front)
    care = inside & ~(crop(unknown) | front)
    seen = mask & care
    best, best_score = (-1.0, "", boxes[0]), -np.inf
    for box in boxes:
        for shape in SHAPES:
            drawn = world.rasterize(shape, (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0), n) & inside
            union = ((drawn | mask) & care).sum()
            iou = float((drawn & seen).sum() / union) if union else 0.0
            score = iou - HIDDEN_COST * (drawn & front & ~mask).sum() / max(drawn.sum(), 1)
            if score > best_score:
                best, best_score = (iou, shape, box), score
    return (*best, world.rasterize(best[1], best[2], size))


def _luma(rgb) -> np.ndarray:
    return np.asarray(rgb, float) @ _LUMA


def _pattern(mask: np.ndarray, shade: np.ndarray) -> str:
    """solid, striped or dotted, from ``shade`` (H, W: 1 at the colour's luma, 0 at its dark shade's) over the
    mask's interior (its edge pixels left out). Luma, not the pixels' labels: JPEG keeps it at full resolution.
    Little spread (std under ``SOLID_SPREAD``) is solid; when rows explain most of the variance (``STRIPED_ROWS``)
    striped (whole rows dark or bright), else dotted (rows explain a third of it)."""
    interior = ndimage.binary_erosion(mask)
    if interior.sum() < 8:
        interior = mask
    values = shade[interior]
    variance = values.var()
    if variance < SOLID_SPREAD ** 2:
        return "solid"
    counts = interior.sum(1)  # (H,) interior pixels per row
    rows = counts > 0
    row_means = np.where(interior, shade, 0.0).sum(1)[rows] / counts[rows]
    between = (counts[rows] * (row_means - values.mean()) ** 2).sum() / counts.sum()  # the variance rows explain
    return "striped" if between >= STRIPED_ROWS * variance else "dotted"


def read(image: Image.Image | np.ndarray) -> Reading:
    """Every subject in ``image``: colour -> ``Found``."""
    labels = classify(image)
    luma = _luma(_as_array(image))  # (H, W)
    size = labels.shape[0]
    masks = {}
    for k, colour in enumerate(_COLOUR_NAMES):
        mask = _clean(labels == k + 1)
        if mask.sum() >= MIN_PIXELS * (size / world.SIZE) ** 2:
            masks[colour] = mask
    unknown = labels == UNKNOWN

    def union(colours: list[str]) -> np.ndarray:
        out = np.zeros((size, size), bool)
        for colour in colours:
            out |= masks[colour]
        return out

    # first pass: any subject within 2 px may hide it
    near = {c: [o for o in masks if o != c and (ndimage.binary_dilation(m, iterations=2) & masks[o]).any()]
            for c, m in masks.items()}
    fits = {c: _fit(m, unknown, ndimage.binary_dilation(union(near[c]))) for c, m in masks.items()}

    # second pass: only those in front of it, i.e. showing more pixels where the two fitted shapes overlap
    def in_front(other: str, colour: str) -> bool:
        overlap = fits[colour][3] & fits[other][3]
        return overlap.sum() >= 4 and (masks[other] & overlap).sum() > (masks[colour] & overlap).sum()

    fronts = {c: [o for o in near[c] if in_front(o, c)] for c in masks if near[c]}
    for colour, front in fronts.items():
        fits[colour] = _fit(masks[colour], unknown, ndimage.binary_dilation(union(front)))
    found, unclear = {}, {}
    for colour, (fit, shape, box, drawn) in fits.items():
        if fit < MIN_FIT:
            unclear[colour] = round(fit, 3)
            continue
        bright, dark = _luma(COLOURS[colour]), _luma(world.dark_shade(colour))
        pattern = _pattern(masks[colour], (luma - dark) / (bright - dark))
        found[colour] = Found(Identity(shape, colour, pattern), fit,
                              Geometry(tuple(float(v) for v in box), masks[colour], drawn))
    return Reading(found, size, unclear)


@dataclass(frozen=True)
class Verdict:
    """The oracle's answer for one question: per asked subject, whether its colour was found and whether its whole
    identity matched; whether the relation holds among the subjects found; and the reasons for each no."""

    found: tuple[bool, ...]
    identity: tuple[bool, ...]
    relation: bool
    reasons: tuple[str, ...]
    shape_colour: tuple[bool, ...] = ()  # per asked subject: found with the right shape (any pattern)

    @property
    def ok(self) -> bool:
        return all(self.identity) and self.relation


def _identities(identities: Sequence[Identity | str], rel: world.Relation) -> tuple[Identity, ...]:
    ids = tuple(i if isinstance(i, Identity) else Identity.parse(i) for i in identities)
    if len(ids) != rel.arity:
        raise ValueError(f"identities: relation {rel.id!r} takes {rel.arity} subjects, got {len(ids)}")
    if len({i.colour for i in ids}) != len(ids):
        raise ValueError(f"identities must have distinct colours (subjects are found by colour), "
                         f"got {[i.phrase for i in ids]}")
    return ids


def verdict(reading: Reading, identities: Sequence[Identity | str], relation: str) -> Verdict:
    """Judge ``reading`` for ``relation`` among ``identities`` (in the relation's order; phrases such as
    ``"red striped circle"`` are parsed)."""
    rel = world.relation(relation)
    ids = _identities(identities, rel)
    found = [reading.subjects.get(i.colour) for i in ids]
    reasons = []
    for asked, f in zip(ids, found):
        if f is None and asked.colour in reading.unclear:
            reasons.append(f"no {asked.colour} subject ({asked.colour} pixels that no shape fits: IoU "
                           f"{reading.unclear[asked.colour]:.2f} < {MIN_FIT})")
        elif f is None:
            reasons.append(f"no {asked.colour} subject")
        elif f.identity != asked:
            reasons.append(f"asked for a {asked.phrase}, found a {f.identity.phrase}")
    holds = all(f is not None for f in found) and world.relation_holds(
        rel.id, [f.geometry for f in found], reading.size)
    if not holds:
        reasons.append(f"{rel.id!r} does not hold")
    return Verdict(found=tuple(f is not None for f in found),
                   identity=tuple(f is not None and f.identity == i for f, i in zip(found, ids)),
                   shape_colour=tuple(f is not None and f.identity.shape == i.shape for f, i in zip(found, ids)),
                   relation=holds, reasons=tuple(reasons))


def judge(image: Image.Image | np.ndarray, identities: Sequence[Identity | str], relation: str) -> Verdict:
    """``verdict(read(image), identities, relation)``."""
    return verdict(read(image), identities, relation)


# ----------------------------------------------------------------------------------------------------- measuring

def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion ``k / n`` ((0, 1) when ``n`` is 0)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def rates(verdicts: Sequence[Verdict]) -> dict[str, Any]:
    """The share of ``verdicts`` with every identity right, with the relation holding, and both (each with its
    95% Wilson interval), and their number; ``shape_colour``: every subject found (by its colour) with the right
    shape, its pattern aside."""
    n = len(verdicts)
    counts = dict(identity=sum(all(v.identity) for v in verdicts), relation=sum(v.relation for v in verdicts),
                  both=sum(v.ok for v in verdicts), shape_colour=sum(all(v.shape_colour) for v in verdicts))
    return dict(cases=n, **{k: dict(rate=round(c / n, 4) if n else None, ci95=[round(x, 4) for x in wilson(c, n)])
                            for k, c in counts.items()})

PERTURBATIONS = ("noise", "shift", "jpeg")


def perturb(image: Image.Image, kind: str, seed: int = 0, sigma: float = 10.0, max_shift: int = 2,
            quality: int = 75) -> Image.Image:
    """``image`` perturbed: ``noise`` adds Gaussian noise of ``sigma`` (0-255 scale); ``shift`` moves it by up to
    ``max_shift`` px each way (not both 0), filling with the background; ``jpeg`` round-trips it at ``quality``."""
    rng = np.random.default_rng(seed)
    array = np.asarray(image.convert("RGB"))
    if kind == "noise":
        return Image.fromarray(np.clip(array + rng.normal(0.0, sigma, array.shape), 0, 255).round().astype(np.uint8))
    if kind == "shift":
        moves = [(dx, dy) for dx in range(-max_shift, max_shift + 1) for dy in range(-max_shift, max_shift + 1)
                 if (dx, dy) != (0, 0)]
        if not moves:
            raise ValueError(f"max_shift must be at least 1, got {max_shift!r}")
        dx, dy = moves[rng.integers(len(moves))]
        out = Image.new("RGB", image.size, world.BACKGROUND)
        out.paste(Image.fromarray(array), (int(dx), int(dy)))
        return out
    if kind == "jpeg":
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    raise ValueError(f"kind must be one of {list(PERTURBATIONS)}, got {kind!r}")


@dataclass(frozen=True)
class OracleScore:
    """Rates over ``scenes`` renders: ``correct`` (yes to the truth), ``identity`` (every subject found with its
    identity), ``relation`` (the relation judged to hold), ``wrong_relation_yes`` (yes to another relation of the
    same arity, or to the same directional relation with roles swapped), ``wrong_identity_yes`` (yes with one
    subject's colour, shape or pattern changed)."""

    scenes: int
    correct: float
    identity: float
    relation: float
    wrong_relation_yes: float
    wrong_identity_yes: float


def _wrong_relation(render: world.Render, rng: random.Random) -> tuple[str, tuple[Identity, ...]]:
    rel, ids = render.relation, render.identities
    others = [r.id for r in world.RELATIONS if r.arity == rel.arity and r.id != rel.id]
    if rel.arity > 1 and not rel.symmetric and rng.random() < 0.5:
        return rel.id, ids[::-1]  # roles swapped
    return rng.choice(others), ids


def _wrong_identity(ids: tuple[Identity, ...], rng: random.Random) -> tuple[Identity, ...]:
    k = rng.randrange(len(ids))
    attribute = rng.choice(("colour", "shape", "pattern"))
    if attribute == "colour":
        choices = [c for c in COLOURS if c not in {i.colour for i in ids}]
    else:
        choices = [v for v in (SHAPES if attribute == "shape" else PATTERNS) if v != getattr(ids[k], attribute)]
    changed = replace(ids[k], **{attribute: rng.choice(choices)})
    return ids[:k] + (changed,) + ids[k + 1:]


def measure(n: int, seed: int = 0, perturbation: str | None = None, size: int = world.SIZE,
            **strength: float) -> OracleScore:
    """Score the oracle on ``n`` random scenes (relations drawn uniformly), each perturbed by ``perturbation``
    (None: clean; ``strength``: ``perturb``'s keywords)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n!r}")
    rng = random.Random(seed)
    tallies = np.zeros(5)
    for i in range(n):
        render = world.random_scene(rng.randrange(2**31), size)
        image = render.image if perturbation is None else perturb(render.image, perturbation,
                                                                   seed=seed * 1_000_003 + i, **strength)
        reading = read(image)
        truth = verdict(reading, render.identities, render.relation.id)
        other_relation, other_order = _wrong_relation(render, rng)
        wrong_rel = verdict(reading, other_order, other_relation)
        wrong_id = verdict(reading, _wrong_identity(render.identities, rng), render.relation.id)
        tallies += (truth.ok, all(truth.identity), truth.relation, wrong_rel.ok, wrong_id.ok)
    return OracleScore(n, *(float(t / n) for t in tallies))
