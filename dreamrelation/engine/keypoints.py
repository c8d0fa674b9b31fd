"""Keypoints for the data engine (paper sections 3.3 and 3.4.2): pick 17 points per subject and carry them over.

The paper annotates its triplets with X-Pose, which is on no registry (REFERENCE.md section 3). We do without it:

* ``mask_points``: 17 points spread over a subject's mask in its own (subject) image, well inside the shape and
  out onto its limbs (the centre line of a leg thinner than the inset counts as inside);
* ``transfer_keypoints``: carries them to the target image by dense-feature correspondence: both subjects cropped
  to one scale (by mask area), the cosine nearest neighbour of each point's descriptor among the target feature
  cells inside the subject's target mask, refined to sub-cell precision, with a confidence from the similarity
  and a forward-backward (mutual) check;
* ``Dinov2Features`` (DINOv2 patch tokens, the engine's default) and ``ColourFeatures`` (weight-free multi-scale
  colour, a fallback and the reference where the truth is known) are the dense descriptors.

People get ViTPose's 17 COCO keypoints and animals its 17 AP-10K keypoints instead (``dreamrelation.engine.pose``,
chosen by ``dreamrelation.engine.pose.KeypointConfig``); these points are the fallback for everything else.

Coordinates: a pixel (x, y) is (column, row) with pixel centres at integers, so ``mask[round(y), round(x)]`` is
the pixel a point lies in. A dense feature map (C, h, w) covers its image uniformly: cell (i, j) is centred on
pixel ``((j + 0.5) * W / w - 0.5, (i + 0.5) * H / h - 0.5)``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

logger = logging.getLogger(__name__)

__all__ = [
    "DINOV2_ID",
    "ColourFeatures",
    "DenseFeatures",
    "Dinov2Features",
    "Transfer",
    "build_tiny_dinov2",
    "dinov2_base_config",
    "mask_points",
    "transfer_keypoints",
]

DINOV2_ID = "facebook/dinov2-base"
DEFAULT_SIMILARITY_SCALE = 0.3  # for features without their own ``similarity_scale``
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# -------------------------------------------------------------------------------------------- mask points
def _check_mask(mask: np.ndarray, name: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) boolean array, got shape {mask.shape!r}")
    if shape is not None and mask.shape != shape:
        raise ValueError(f"{name} must have its image's shape (H, W) = {shape!r}, got {mask.shape!r}")
    mask = mask.astype(bool)
    if not mask.any():
        raise ValueError(f"{name} is empty (no True pixel) in a {mask.shape[0]}x{mask.shape[1]} array")
    return mask


def _depth(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (H, W) int32: how many erosions each pixel survives (an octagonal distance to the outside).

    Erosions alternate a 3x3 square and a 3x3 cross, the classic octagon approximation of the Euclidean distance;
    the work is done on the mask's bounding box, padded with background.
    """
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    current = torch.from_numpy(np.pad(mask[y0:y1, x0:x1], 1)).float()[None, None]  # (1, 1, h + 2, w + 2)
    depth = torch.zeros_like(current)
    step = 0
    while current.any():
        depth += current
        if step % 2 == 0:  # square: a pixel survives when its 8 neighbours are inside
            current = -F.max_pool2d(-current, 3, stride=1, padding=1)
        else:  # cross: when its 4 neighbours are inside
            padded = F.pad(current, (1, 1, 1, 1))
            current = torch.minimum(current, torch.minimum(
                torch.minimum(padded[..., :-2, 1:-1], padded[..., 2:, 1:-1]),
                torch.minimum(padded[..., 1:-1, :-2], padded[..., 1:-1, 2:])))
        step += 1
    out = np.zeros(mask.shape, dtype=np.int32)
    out[y0:y1, x0:x1] = depth[0, 0, 1:-1, 1:-1].numpy().astype(np.int32)
    return out


def _ridge(depth: np.ndarray) -> np.ndarray:
    """(H, W) int depth -> (H, W) bool: pixels at least as deep as their 8 neighbours (plateaus included), i.e. the
    centre line of every part of the shape. Medial-axis branches into convex corners are not in it: along them the
    depth keeps rising inwards, so each has a deeper neighbour."""
    t = torch.from_numpy(depth).float()[None, None]  # (1, 1, H, W)
    neighbourhood = F.max_pool2d(t, 3, stride=1, padding=1)[0, 0].numpy()
    return (depth > 0) & (depth >= neighbourhood)


def mask_points(mask: np.ndarray, n: int = 17, inset: float = 0.2, limb_inset: float = 0.1) -> np.ndarray:
    """``n`` points spread over a mask, well inside it: deterministic farthest-point sampling.

    The candidates are the pixels at least ``ceil(inset * max depth)`` erosions inside the mask (the inset shrinks
    when fewer than ``n`` pixels are that deep), so the points keep clear of the outline at any image size, plus
    the centre lines of the thinner parts (:func:`_ridge`) at least ``ceil(limb_inset * max depth)`` deep: a leg or
    a tail thinner than the inset would otherwise get no point at all (the engine's issue: 0 of 17 points on legs
    that are 19% of a dog's mask). The first point is the deepest pixel (nearest the centroid of the deepest ones);
    each next point is the candidate farthest from the points so far, so the extremities (paws, head, tail) come
    early.

    Args:
        mask: (H, W) boolean subject mask.
        n: how many points (17 for the keypoint matching loss).
        inset: the inset as a fraction of the mask's depth (its inner radius), in [0, 1).
        limb_inset: the least depth of a thin part's centre line, as a fraction of the mask's depth, in [0, 1).
    Returns:
        (n, 2) float32 pixel (x, y), distinct mask pixels.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    for name, value in (("inset", inset), ("limb_inset", limb_inset)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    mask = _check_mask(mask, "mask")
    if int(mask.sum()) < n:
        raise ValueError(f"mask is too small: {int(mask.sum())} pixels for n={n} points")
    depth = _depth(mask)
    deepest = int(depth.max())
    radius = max(1, math.ceil(inset * deepest))
    while radius > 1 and int((depth >= radius).sum()) < n:
        radius -= 1
    limb = max(1, min(radius, math.ceil(limb_inset * deepest)))
    ys, xs = np.nonzero((depth >= radius) | (_ridge(depth) & (depth >= limb)))
    candidates = np.stack([xs, ys], axis=1).astype(np.float64)  # (N, 2) pixel (x, y), row-major order
    top = candidates[depth[ys, xs] == deepest]
    first = int(np.argmin(((top - top.mean(axis=0)) ** 2).sum(axis=1)))
    chosen = [top[first]]
    nearest = ((candidates - chosen[0]) ** 2).sum(axis=1)  # (N,) squared distance to the chosen set
    for _ in range(n - 1):
        pick = int(np.argmax(nearest))  # first of the farthest: deterministic
        chosen.append(candidates[pick])
        nearest = np.minimum(nearest, ((candidates - candidates[pick]) ** 2).sum(axis=1))
    return np.asarray(chosen, dtype=np.float32)


# ------------------------------------------------------------------------------------------ dense features
class DenseFeatures(Protocol):
    """A dense descriptor: a PIL image -> float32 (C, h, w) on the CPU, L2-normalized over C, covering the image
    uniformly (see the module docstring for the cell -> pixel mapping)."""

    def __call__(self, image: Image.Image) -> torch.Tensor: ...


def _to_tensor(image: Image.Image, name: str = "image") -> torch.Tensor:
    if not isinstance(image, Image.Image):
        raise ValueError(f"{name} must be a PIL.Image.Image, got {type(image).__name__}")
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # (3, H, W)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """(C, H, W) -> (C, H, W), separable Gaussian, edges replicated."""
    radius = max(1, math.ceil(3.0 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = x.shape[0]
    x = x[None]  # (1, C, H, W)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1),
                 groups=c)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1),
                 groups=c)
    return x[0]


class ColourFeatures:
    """Weight-free multi-scale colour descriptor, rotation invariant: opponent colour and its gradient magnitude,
    blurred at several sigmas.

    The image is resized so its longer side is at most ``max_side``; its RGB goes to centred opponent channels
    (intensity - 0.5, red-green, yellow-blue). At every sigma (in pixels of that working image) the descriptor holds
    the Gaussian-blurred channels and their scale-normalized gradient magnitudes ``sigma * |grad|`` (6 channels per
    sigma); the stack is sampled every ``stride`` working pixels and L2-normalized per cell. Isotropic blurs and
    gradient magnitudes make it invariant to rotation; several scales make it tolerate some scaling. It knows colour
    only (no semantics): the reference where the truth is known, a fallback otherwise.

    ``similarity_scale`` (the cosine distance at which ``transfer_keypoints`` halves a match's confidence) comes
    from synthetic textured shapes moved, rotated and scaled (tests/test_keypoints.py): the best match's 1 - cos
    is 0.0005 at the median and 0.0036 at the 95th percentile for true matches; matched into a different texture
    it is 0.035 at the median and 0.014 at the 5th percentile.
    """

    similarity_scale = 0.01

    def __init__(self, sigmas: Sequence[float] = (1.0, 2.0, 4.0, 8.0, 16.0), stride: int = 2,
                 max_side: int = 256) -> None:
        sigmas = tuple(float(s) for s in sigmas)
        if not sigmas or not all(math.isfinite(s) and s > 0 for s in sigmas):
            raise ValueError(f"sigmas must be positive numbers, got {sigmas!r}")
        for name, value in (("stride", stride), ("max_side", max_side)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.sigmas, self.stride, self.max_side = sigmas, stride, max_side

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """PIL image (W, H) -> float32 (6 * len(sigmas), h, w), h = round(H' / stride) for the working H'."""
        rgb = _to_tensor(image)
        h, w = rgb.shape[1:]
        k = min(1.0, self.max_side / max(h, w))
        if k < 1.0:
            size = (max(1, round(h * k)), max(1, round(w * k)))
            rgb = F.interpolate(rgb[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        r, g, b = rgb
        opponent = torch.stack([(r + g + b) / 3.0 - 0.5, (r - g) / 2.0, (r + g) / 4.0 - b / 2.0])  # (3, H', W')
        bands = []
        for sigma in self.sigmas:
            blurred = _gaussian_blur(opponent, sigma)  # (3, H', W')
            padded = F.pad(blurred[None], (1, 1, 1, 1), mode="replicate")[0]
            gx = 0.5 * (padded[:, 1:-1, 2:] - padded[:, 1:-1, :-2])  # central differences
            gy = 0.5 * (padded[:, 2:, 1:-1] - padded[:, :-2, 1:-1])
            bands += [blurred, sigma * torch.sqrt(gx ** 2 + gy ** 2)]
        stack = torch.cat(bands)  # (6 * S, H', W')
        grid = (max(1, round(stack.shape[1] / self.stride)), max(1, round(stack.shape[2] / self.stride)))
        # bilinear, align_corners=False: output cell centres sit exactly on the uniform grid of the module docstring
        feats = F.interpolate(stack[None], size=grid, mode="bilinear", align_corners=False)[0]
        return F.normalize(feats, dim=0)


class Dinov2Features:
    """DINOv2 patch tokens as a dense descriptor (``Dinov2Model`` / ``Dinov2WithRegistersModel`` via AutoModel).

    The image is resized to ``size`` x ``size`` (bicubic) and normalized with the checkpoint processor's mean and
    std; the last hidden state's patch tokens (CLS and register tokens dropped) become (C, size / p, size / p),
    L2-normalized over C. ``size`` must be a multiple of the patch size p (14 for the public models: 448 -> 32x32).

    ``similarity_scale`` is a prior, not a measurement (no DINOv2 weights could be run here): a match at cosine 0.7
    gets half the similarity term of a perfect one. Calibrate it on real engine samples.
    """

    similarity_scale = 0.3

    def __init__(self, ref: str | Path = DINOV2_ID, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, size: int = 448) -> None:
        from transformers import AutoImageProcessor, AutoModel

        self.model = AutoModel.from_pretrained(str(ref), dtype=dtype).to(device).eval()
        patch = self.model.config.patch_size
        patch = int(patch[0] if isinstance(patch, (list, tuple)) else patch)
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % patch:
            raise ValueError(f"size must be a positive multiple of the patch size {patch}, got {size!r}")
        processor = AutoImageProcessor.from_pretrained(str(ref))
        self.mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(processor.image_std, dtype=torch.float32).view(3, 1, 1)
        self.size, self.patch = size, patch
        self.registers = int(getattr(self.model.config, "num_register_tokens", 0) or 0)
        self.device, self.dtype = torch.device(device), dtype

    @torch.no_grad()
    def __call__(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> float32 (C, size / p, size / p) on the CPU."""
        if not isinstance(image, Image.Image):
            raise ValueError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
        resized = image.convert("RGB").resize((self.size, self.size), Image.Resampling.BICUBIC)
        pixels = (_to_tensor(resized) - self.mean) / self.std  # (3, size, size)
        pixels = pixels[None].to(self.device, self.dtype)
        tokens = self.model(pixel_values=pixels).last_hidden_state[0, 1 + self.registers:]  # (h * w, C)
        side = self.size // self.patch
        # (h * w, C) -> (C, h, w): tokens are row-major over the patch grid
        feats = tokens.float().cpu().T.reshape(-1, side, side)
        return F.normalize(feats, dim=0)


# ------------------------------------------------------------------------------------------- correspondence
@dataclass(frozen=True)
class Transfer:
    """Keypoints carried to the target: ``points`` (n, 2) float32 pixel (x, y); ``confidence`` (n,) in [0, 1]."""

    points: np.ndarray
    confidence: np.ndarray


def _sample(feats: torch.Tensor, points: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear features at pixel points: (C, h, w), (n, 2) pixel (x, y) -> (n, C), L2-normalized."""
    height, width = image_hw
    # pixel centre x -> normalized [-1, 1] over the image's extent (align_corners=False: -1 is the left edge)
    grid = torch.stack([(points[:, 0] + 0.5) / width, (points[:, 1] + 0.5) / height], dim=-1) * 2.0 - 1.0
    out = F.grid_sample(feats[None], grid.view(1, 1, -1, 2), mode="bilinear", padding_mode="border",
                        align_corners=False)  # (1, C, 1, n)
    return F.normalize(out[0, :, 0].T, dim=-1)


def _grid_mask(mask: np.ndarray, grid_hw: tuple[int, int]) -> torch.Tensor:
    """(H, W) bool -> (h, w) bool: cells at least half covered; else the most covered cells (the nearest)."""
    coverage = F.adaptive_avg_pool2d(torch.from_numpy(mask).float()[None, None], grid_hw)[0, 0]  # (h, w)
    inside = coverage >= 0.5
    return inside if inside.any() else coverage >= coverage.max()


def _match(sim: torch.Tensor, allowed: torch.Tensor, image_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Best allowed cell per query, refined by a parabola through its neighbours, mapped to image pixels.

    sim: (n, h, w) cosine similarity; allowed: (h, w) bool. Returns (n, 2) pixel (x, y) and (n,) similarity.
    """
    n, h, w = sim.shape
    flat = sim.masked_fill(~allowed, float("-inf")).view(n, -1)
    best, index = flat.max(dim=1)  # (n,)
    iy, ix = index // w, index % w

    def offset(lo: torch.Tensor, mid: torch.Tensor, hi: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        curve = lo - 2.0 * mid + hi  # < 0 at a peak
        step = torch.where(curve < 0, 0.5 * (lo - hi) / curve.clamp(max=-1e-12), torch.zeros_like(mid))
        return torch.where(valid, step.clamp(-0.5, 0.5), torch.zeros_like(mid))

    rows = torch.arange(n)
    left, right = sim[rows, iy, (ix - 1).clamp(min=0)], sim[rows, iy, (ix + 1).clamp(max=w - 1)]
    up, down = sim[rows, (iy - 1).clamp(min=0), ix], sim[rows, (iy + 1).clamp(max=h - 1), ix]
    centre = sim[rows, iy, ix]
    u = ix.float() + offset(left, centre, right, (ix > 0) & (ix < w - 1))
    v = iy.float() + offset(up, centre, down, (iy > 0) & (iy < h - 1))
    height, width = image_hw
    points = torch.stack([(u + 0.5) * width / w - 0.5, (v + 0.5) * height / h - 0.5], dim=-1)  # grid -> pixels
    return points, best


@dataclass(frozen=True)
class _Window:
    """A square of ``side`` pixels centred on ``centre`` (pixel x, y), resampled to ``size`` x ``size``."""

    centre: np.ndarray
    side: float
    size: int

    def to_crop(self, points: np.ndarray | torch.Tensor):
        return (points - self.centre + 0.5 * self.side) * (self.size / self.side) - 0.5

    def to_image(self, points: np.ndarray | torch.Tensor):
        return (points + 0.5) * (self.side / self.size) + self.centre - 0.5 * self.side

    def crop(self, image: Image.Image, mask: np.ndarray) -> tuple[Image.Image, np.ndarray]:
        """Antialiased crop of image (edges replicated outside) and mask (False outside), both (size, size)."""
        x0, y0 = self.centre + 0.5 - 0.5 * self.side  # pixel-edge coordinates of the square's corner
        pad = int(math.ceil(max(0.0, -x0, -y0, x0 + self.side - image.width, y0 + self.side - image.height))) + 1
        box = (x0 + pad, y0 + pad, x0 + pad + self.side, y0 + pad + self.side)
        pixels = np.pad(np.asarray(image.convert("RGB")), ((pad, pad), (pad, pad), (0, 0)), mode="edge")
        crop = Image.fromarray(pixels).resize((self.size, self.size), Image.Resampling.BILINEAR, box=box)
        coverage = Image.fromarray(np.pad(mask, pad).astype(np.uint8) * 255)
        coverage = np.asarray(coverage.resize((self.size, self.size), Image.Resampling.BILINEAR, box=box))
        inside = coverage >= 128
        # a subject thinner than a crop pixel: its most covered pixels
        return crop, inside if inside.any() else coverage >= max(int(coverage.max()), 1)


def _windows(source_mask: np.ndarray, target_mask: np.ndarray, size: int, margin: float = 1.15) -> list[_Window]:
    """One window per subject, the same size relative to each subject (``side = f * sqrt(mask area)``), so both
    crops show the subject at one scale; f is the smallest that holds both masks, times ``margin``."""
    frames = []
    for mask in (source_mask, target_mask):
        ys, xs = np.nonzero(mask)
        centre = np.array([(xs.min() + xs.max()) / 2.0, (ys.min() + ys.max()) / 2.0])  # bounding-box centre
        extent = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1.0  # side of the bounding square, pixels
        frames.append((centre, math.sqrt(float(mask.sum())), extent))
    factor = margin * max(extent / scale for _, scale, extent in frames)
    return [_Window(centre, factor * scale, size) for centre, scale, _ in frames]


def _correspond(fs: torch.Tensor, ft: torch.Tensor, points: torch.Tensor, source_mask: np.ndarray,
                target_mask: np.ndarray, source_hw: tuple[int, int], target_hw: tuple[int, int],
                fb_tolerance: float, similarity_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The matching core on two feature maps: (n, 2) source pixels -> (n, 2) target pixels and (n,) confidence."""
    # forward: source points -> target
    desc = _sample(fs, points, source_hw)  # (n, C)
    sim = torch.einsum("nc,chw->nhw", desc, ft)  # (n, ht, wt)
    found, similarity = _match(sim, _grid_mask(target_mask, tuple(ft.shape[1:])), target_hw)
    # backward: matched target points -> source, compared with where they came from
    back_desc = _sample(ft, found, target_hw)
    back_sim = torch.einsum("nc,chw->nhw", back_desc, fs)
    back, _ = _match(back_sim, _grid_mask(source_mask, tuple(fs.shape[1:])), source_hw)
    distance = (back - points).norm(dim=-1)  # (n,) source pixels

    cell = max(source_hw[0] / fs.shape[1], source_hw[1] / fs.shape[2])
    tol = max(fb_tolerance * math.sqrt(float(source_mask.sum())), cell)
    confidence = torch.exp2(-(1.0 - similarity) / similarity_scale) * torch.exp(-0.5 * (distance / tol) ** 2)
    return found, confidence.clamp(0.0, 1.0)


def transfer_keypoints(features: DenseFeatures, source: Image.Image, source_points: np.ndarray,
                       source_mask: np.ndarray, target: Image.Image, target_mask: np.ndarray, *,
                       fb_tolerance: float = 0.05, similarity_scale: float | None = None,
                       crop_size: int | None = 448) -> Transfer:
    """Carry points from ``source`` to ``target`` by dense-feature correspondence, with a confidence.

    Both subjects are first cropped to squares of the same size relative to the subject (side proportional to
    sqrt(mask area)) and resampled to ``crop_size`` pixels, so the two show the subject at one scale and with the
    features' full resolution, whatever its size in either image (``crop_size=None``: whole images as they are).
    Each point's source descriptor (bilinear) is matched (cosine) to every target cell inside the target mask; the
    best cell is refined to sub-cell precision (a parabola through its neighbours) and mapped to target pixels.
    The matched point's descriptor is matched back inside the source mask. The confidence combines the match's
    cosine similarity s and that forward-backward distance d::

        confidence = 2 ** (-(1 - s) / similarity_scale) * exp(-0.5 * (d / tol) ** 2),
        tol = max(fb_tolerance * sqrt(source mask area), source feature cell size)   (in crop pixels)

    Args:
        features: a ``DenseFeatures`` (``Dinov2Features`` / ``ColourFeatures``).
        source, target: PIL images; source_mask, target_mask: their (H, W) boolean subject masks.
        source_points: (n, 2) pixel (x, y) in the source (e.g. ``mask_points(source_mask)``).
        fb_tolerance: forward-backward tolerance as a fraction of the subject's size.
        similarity_scale: cosine distance that halves the confidence; default the features' own
            ``similarity_scale`` attribute (descriptors differ in how close true matches come), else 0.3.
        crop_size: side of the subject crops in pixels, or None to match the whole images.
    Returns:
        ``Transfer`` with (n, 2) float32 target pixels and (n,) float32 confidences in [0, 1].
    """
    for name, image in (("source", source), ("target", target)):
        if not isinstance(image, Image.Image):
            raise ValueError(f"{name} must be a PIL.Image.Image, got {type(image).__name__}")
    source_mask = _check_mask(source_mask, "source_mask", (source.height, source.width))
    target_mask = _check_mask(target_mask, "target_mask", (target.height, target.width))
    points = np.asarray(source_points, dtype=np.float32)
    if points.ndim != 2 or points.shape[1] != 2 or not np.isfinite(points).all():
        raise ValueError(f"source_points must be finite (n, 2) pixel (x, y), got shape {points.shape!r}")
    if not fb_tolerance > 0:
        raise ValueError(f"fb_tolerance must be positive, got {fb_tolerance!r}")
    if similarity_scale is None:
        similarity_scale = float(getattr(features, "similarity_scale", DEFAULT_SIMILARITY_SCALE))
    if not similarity_scale > 0:
        raise ValueError(f"similarity_scale must be positive, got {similarity_scale!r}")
    if crop_size is not None and (not isinstance(crop_size, int) or isinstance(crop_size, bool) or crop_size < 8):
        raise ValueError(f"crop_size must be an integer >= 8 or None, got {crop_size!r}")

    query = points.astype(np.float64)
    if crop_size is not None:
        source_window, target_window = _windows(source_mask, target_mask, crop_size)
        source, source_mask = source_window.crop(source, source_mask)
        target, target_mask = target_window.crop(target, target_mask)
        query = source_window.to_crop(query)
    fs, ft = features(source), features(target)  # (C, hs, ws), (C, ht, wt)
    if fs.ndim != 3 or ft.ndim != 3 or fs.shape[0] != ft.shape[0]:
        raise ValueError(f"features must give (C, h, w) maps with the same C, got {tuple(fs.shape)} and "
                         f"{tuple(ft.shape)}")
    found, confidence = _correspond(fs.float(), ft.float(), torch.from_numpy(query).float(), source_mask,
                                    target_mask, (source.height, source.width), (target.height, target.width),
                                    fb_tolerance, similarity_scale)
    found = found.double().numpy()
    if crop_size is not None:
        found = target_window.to_image(found)
    return Transfer(points=found.astype(np.float32), confidence=confidence.numpy().astype(np.float32))


# -------------------------------------------------------------------------------- config and tiny twin
def dinov2_base_config():
    """``Dinov2Config`` of ``facebook/dinov2-base`` (ViT-B/14, 86.6M parameters)."""
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, patch_size=14,
                        image_size=518, layer_norm_eps=1e-6, layerscale_value=1.0, qkv_bias=True,
                        use_swiglu_ffn=False)


def build_tiny_dinov2(directory: str | Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide random ``Dinov2Model`` (patch 8, 64 px) + its image processor, saved in the real format.

    Loads with ``Dinov2Features(directory, size=64)`` like the hub model does.
    """
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    directory = Path(directory)
    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                                     patch_size=8, image_size=64))
    model.save_pretrained(directory)
    BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, image_mean=IMAGENET_MEAN,
                      image_std=IMAGENET_STD).save_pretrained(directory)
    logger.info("tiny DINOv2 written to %s", directory)
    return directory
