"""Relation triplets on the model side: examples, the public-folder importer, augmentation and tensors (issue 4).

A ``TripletExample`` is one fine-tuning example in memory (PIL images, numpy geometry). It is built from a plain dict
shaped like ``manifests.triplets.TripletRow`` by ``example_from_record``, the one conversion between the two layers
(this module imports neither pydantic nor ``manifests``).

Geometry conventions (all normalized, so a resize leaves them unchanged):
- boxes ``[x0, y0, x1, y1]`` of the target image, pixel-edge convention (a mask covering columns 10..19 of a 100 px
  image has x0 = 0.10, x1 = 0.20);
- keypoints ``[x, y]`` in [0, 1] of the image they belong to (the target, or the subject's own image), 17 per
  subject in AP-10K order (``AP10K_KEYPOINTS``); continuous coordinates, so pixel column ``i`` spans
  ``[i / W, (i + 1) / W)``;
- ``visibility`` (S, 17): weights of the keypoint matching loss, the product of the target's and the subject's
  visibilities (None: every keypoint counts). Augmentation sets it to 0 for target keypoints cropped away.

The public folder format (REFERENCE.md section 4, ``import_public_folder``): what its keypoint files hold was
checked on the authors' ``hug`` and ``shake`` samples (10 triplets, every image 1024 x 1024): float32 tensors of
**normalized (x, y)** coordinates in [0, 1] of the image they belong to (min 0.004, max 0.998 over all files; the
x/y order is confirmed by the target masks: read as (x, y), a subject's keypoints fall inside its own mask, read as
(y, x) they do not). ``concept_keyposes_{one,two}.pth`` are (1, 17, 2) for ``concept0/1.png``;
``motion_keyposes.pth`` is (2, 17, 2) for ``motion.png``. Files holding pixel coordinates (any value > 1.5) are
divided by that image's width and height. The ORDER of the two target keypoint sets is not reliable: in
``shake/0``, ``shake/1``, ``shake/2`` and ``hug/2`` set 0 lies on the second subject (checked visually: eyes and
nose on the other animal), while masks, concept images and entities agree with each other. The public training code
pairs them by index anyway; the importer instead assigns target keypoint sets to subjects by where they fall in the
subjects' masks (``match_keypoints=True``) and records a reordering in the row's metadata.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import posixpath
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

__all__ = [
    "AP10K_FLIP", "AP10K_KEYPOINTS", "COCO_KEYPOINTS", "KEYPOINT_FLIPS", "LAYOUTS_KEY", "NUM_KEYPOINTS",
    "TripletExample", "augment", "example_from_record",
    "import_public_folder", "mask_box", "open_image", "to_tensors",
]

NUM_KEYPOINTS = 17
AP10K_KEYPOINTS = (
    "left_eye", "right_eye", "nose", "neck", "root_of_tail",
    "left_shoulder", "left_elbow", "left_front_paw", "right_shoulder", "right_elbow", "right_front_paw",
    "left_hip", "left_knee", "left_back_paw", "right_hip", "right_knee", "right_back_paw",
)


def _mirror_name(name: str) -> str:
    return name.replace("left", "@").replace("right", "left").replace("@", "right")


# After a horizontal flip, keypoint j of the flipped image is keypoint AP10K_FLIP[j] of the original, mirrored
# (left eye <-> right eye, ...; nose, neck and tail keep their index). An involution.
AP10K_FLIP = tuple(AP10K_KEYPOINTS.index(_mirror_name(n)) for n in AP10K_KEYPOINTS)
COCO_KEYPOINTS = (  # ViTPose's 17 COCO person keypoints
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle",
)
# How a subject's 17 keypoints are named, and so how a flip reorders them. "points": points picked on the subject's
# mask and carried to the target by correspondence (the data engine); they name places, not left/right body parts,
# so a flip keeps their order.
KEYPOINT_FLIPS = {
    "ap10k": AP10K_FLIP,
    "coco": tuple(COCO_KEYPOINTS.index(_mirror_name(n)) for n in COCO_KEYPOINTS),
    "points": tuple(range(NUM_KEYPOINTS)),
}
LAYOUTS_KEY = "keypoint_layouts"  # triplet metadata: comma-separated layout per subject; absent = all "ap10k"

_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_NUMBER_WORDS = ("one", "two", "three", "four")  # concept_keyposes_{one,two}.pth
MAX_SUBJECTS = len(_NUMBER_WORDS)


# ------------------------------------------------------------------------------------------------------- example

@dataclass(frozen=True, eq=False)  # eq=False: numpy fields have no truth value; examples compare by identity
class TripletExample:
    """One relation fine-tuning example in memory. S subjects; H, W the target's size.

    Attributes:
        target: RGB target image (W x H).
        subject_images: S RGB subject (image-prompt) images.
        phrases: S subject phrases.
        boxes: (S, 4) float32 normalized boxes in the target.
        target_masks: S binary masks (H, W) bool in the target, or None where a subject has no mask.
        target_keypoints: (S, 17, 2) float32 normalized (x, y) in the target, in [0, 1].
        subject_keypoints: (S, 17, 2) float32 normalized (x, y) in each subject image, in [0, 1].
        visibility: (S, 17) float32 keypoint weights in [0, 1], or None (all 1).
        keypoint_layouts: S names from ``KEYPOINT_FLIPS`` (how each subject's keypoints are ordered); () = all
            "ap10k".
    """

    target: Image.Image
    prompt: str
    relation_phrase: str
    subject_images: tuple[Image.Image, ...]
    phrases: tuple[str, ...]
    boxes: np.ndarray
    target_masks: tuple[Optional[np.ndarray], ...]
    target_keypoints: np.ndarray
    subject_keypoints: np.ndarray
    visibility: Optional[np.ndarray] = None
    relation: str = ""
    triplet_id: str = ""
    keypoint_layouts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        put = object.__setattr__  # frozen: normalize the containers once, here
        layouts = tuple(self.keypoint_layouts) or ("ap10k",) * len(tuple(self.subject_images))
        unknown = [name for name in layouts if name not in KEYPOINT_FLIPS]
        if unknown:
            raise ValueError(f"keypoint_layouts must name layouts from {sorted(KEYPOINT_FLIPS)}, got {unknown!r}")
        put(self, "keypoint_layouts", layouts)
        put(self, "subject_images", tuple(self.subject_images))
        put(self, "phrases", tuple(self.phrases))
        put(self, "target_masks", tuple(None if m is None else np.asarray(m, dtype=bool) for m in self.target_masks))
        put(self, "boxes", np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4))
        put(self, "target_keypoints", np.asarray(self.target_keypoints, dtype=np.float32))
        put(self, "subject_keypoints", np.asarray(self.subject_keypoints, dtype=np.float32))
        if self.visibility is not None:
            put(self, "visibility", np.asarray(self.visibility, dtype=np.float32))
        s = len(self.subject_images)
        w, h = self.target.size
        checks = [
            ("phrases", len(self.phrases), s),
            ("keypoint_layouts", len(self.keypoint_layouts), s),
            ("boxes", self.boxes.shape, (s, 4)),
            ("target_masks", len(self.target_masks), s),
            ("target_keypoints", self.target_keypoints.shape, (s, NUM_KEYPOINTS, 2)),
            ("subject_keypoints", self.subject_keypoints.shape, (s, NUM_KEYPOINTS, 2)),
        ]
        if self.visibility is not None:
            checks.append(("visibility", self.visibility.shape, (s, NUM_KEYPOINTS)))
        if s == 0:
            raise ValueError("subject_images must hold at least one subject image, got none")
        for name, got, expected in checks:
            if got != expected:
                raise ValueError(f"{name} must have shape {expected} for {s} subjects, got {got}")
        for k, m in enumerate(self.target_masks):
            if m is not None and m.shape != (h, w):
                raise ValueError(f"target_masks[{k}] must have the target's shape {(h, w)}, got {m.shape}")

    @property
    def num_subjects(self) -> int:
        return len(self.subject_images)


def _read_bytes(uri: str) -> bytes:
    import fsspec

    with fsspec.open(str(uri), "rb") as f:
        return f.read()


def _write_bytes(uri: str, data: bytes) -> None:
    """Write through fsspec, creating folders (the object is written in one PUT on object stores)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(str(uri))
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, data)


def open_image(uri: str) -> Image.Image:
    """An image from any fsspec URI, fully decoded. PIL reads by content, so WebP bytes in a ``.png`` file work."""
    image = Image.open(io.BytesIO(_read_bytes(uri)))
    image.load()
    return image


def _binary(image: Image.Image) -> np.ndarray:
    """A mask image as (H, W) bool (pixel > 127 in grayscale)."""
    return np.asarray(image.convert("L")) > 127


def example_from_record(record: dict[str, Any],
                        load_image: Callable[[str], Image.Image] = open_image) -> TripletExample:
    """A ``TripletExample`` from a TripletRow-shaped dict (``manifests.triplets.TripletRow.to_record()``).

    ``load_image(uri)`` reads the target, the subject images and the masks. Keypoints are clipped to [0, 1];
    masks are binarized (> 127) and resized to the target's size (nearest) if they differ.
    """
    subjects = record.get("subjects") or []
    if not subjects:
        raise ValueError(f"record {record.get('triplet_id')!r}: subjects must hold 1-{MAX_SUBJECTS} subjects, got none")
    target = load_image(record["target"]).convert("RGB")
    masks = []
    for k, s in enumerate(subjects):
        if s.get("mask"):
            mask = load_image(s["mask"]).convert("L")
            if mask.size != target.size:
                logger.warning("triplet %s: mask %d is %s, target %s: resized", record.get("triplet_id"), k,
                               mask.size, target.size)
                mask = mask.resize(target.size, Image.Resampling.NEAREST)
            masks.append(_binary(mask))
        else:
            masks.append(None)
    visibilities = [(s.get("target_visibility"), s.get("subject_visibility")) for s in subjects]
    visibility = None
    if any(v is not None for pair in visibilities for v in pair):
        visibility = np.stack([
            (np.ones(NUM_KEYPOINTS) if tv is None else np.asarray(tv, dtype=np.float64))
            * (np.ones(NUM_KEYPOINTS) if sv is None else np.asarray(sv, dtype=np.float64))
            for tv, sv in visibilities])
    return TripletExample(
        target=target,
        prompt=record["prompt"],
        relation_phrase=record["relation_phrase"],
        subject_images=[load_image(s["image"]).convert("RGB") for s in subjects],
        phrases=[s["phrase"] for s in subjects],
        boxes=np.asarray([s["box"] for s in subjects], dtype=np.float32),
        target_masks=masks,
        target_keypoints=np.clip(np.asarray([s["target_keypoints"] for s in subjects], dtype=np.float32), 0, 1),
        subject_keypoints=np.clip(np.asarray([s["subject_keypoints"] for s in subjects], dtype=np.float32), 0, 1),
        visibility=None if visibility is None else np.clip(visibility, 0, 1),
        relation=record.get("relation") or "",
        triplet_id=record.get("triplet_id") or "",
        keypoint_layouts=tuple(x.strip() for x in ((record.get("metadata") or {}).get(LAYOUTS_KEY) or "").split(",")
                               if x.strip()),
    )


# ------------------------------------------------------------------------------------------------ public importer

class _Broken(Exception):
    """A sample that cannot be imported; the message is the reason reported."""


def mask_box(mask: np.ndarray) -> list[float]:
    """The tight normalized box ``[x0, y0, x1, y1]`` of a (H, W) binary mask (pixel-edge convention)."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        raise ValueError("mask is empty: no box")
    h, w = mask.shape
    return [xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h]


def _normalized_keypoints(value: Any, size: tuple[int, int], what: str) -> np.ndarray:
    """Keypoints as normalized float32 (..., 17, 2): pixel coordinates (any value > 1.5) are divided by ``size``."""
    kp = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value, dtype=np.float64)
    if kp.shape[-2:] != (NUM_KEYPOINTS, 2):
        raise _Broken(f"{what}: expected (..., {NUM_KEYPOINTS}, 2) keypoints, got shape {kp.shape}")
    if not np.isfinite(kp).all():
        raise _Broken(f"{what}: keypoints are not finite")
    if kp.max() > 1.5:
        kp = kp / np.asarray(size, dtype=np.float64)  # pixels of that image -> normalized
    if kp.min() < -0.05 or kp.max() > 1.05:
        raise _Broken(f"{what}: keypoints outside the image (range {kp.min():.3f}..{kp.max():.3f})")
    return kp.astype(np.float32)


def _keypoint_order(target_kp: np.ndarray, masks: Sequence[np.ndarray]) -> tuple[int, ...]:
    """Which target keypoint set belongs to which subject: the permutation whose sets fall most inside their
    subjects' masks (each mask less the other masks, where they overlap; the whole mask when nothing is left).
    File order unless another order is strictly better."""
    s = len(masks)
    h, w = masks[0].shape
    own = []
    for k, m in enumerate(masks):
        others = np.zeros_like(m)
        for j, o in enumerate(masks):
            if j != k:
                others |= o
        exclusive = m & ~others
        own.append(exclusive if exclusive.any() else m)
    px = np.clip((target_kp[..., 0] * w).astype(int), 0, w - 1)  # (S, 17)
    py = np.clip((target_kp[..., 1] * h).astype(int), 0, h - 1)
    inside = np.array([[own[k][py[i], px[i]].mean() for k in range(s)] for i in range(s)])  # (set, subject)
    identity = tuple(range(s))
    best, best_score = identity, sum(inside[i, i] for i in identity)
    for perm in itertools.permutations(range(s)):
        score = sum(inside[perm[k], k] for k in range(s))
        if score > best_score + 1e-9:
            best, best_score = perm, score
    return best


def _sample_files(entry: dict[str, Any]) -> tuple[list[str], bool]:
    """(entity phrases, single-subject layout?) of a prompts.json entry."""
    if "entities" in entry:
        entities, single = entry["entities"], False
    elif "entity" in entry:
        entities, single = entry["entity"], True
        entities = [entities] if isinstance(entities, str) else entities
    else:
        raise _Broken("prompts.json entry has no 'entities'")
    if not isinstance(entities, list) or not all(isinstance(e, str) and e.strip() for e in entities):
        raise _Broken(f"'entities' must be a list of non-empty strings, got {entities!r}")
    if not 1 <= len(entities) <= MAX_SUBJECTS:
        raise _Broken(f"entity count {len(entities)} not supported (1-{MAX_SUBJECTS} subjects)")
    return [e.strip() for e in entities], single


def _relation_phrase_of(entry: dict[str, Any], prompt: str, entities: list[str]) -> tuple[str, str]:
    """(relation phrase, where it came from): the ``predicate`` when given, else derived from the prompt."""
    predicate = entry.get("predicate")
    if isinstance(predicate, list):
        predicate = " ".join(p.strip() for p in predicate if isinstance(p, str) and p.strip())
    if isinstance(predicate, str) and predicate.strip():
        return predicate.strip(), "predicate"
    from ..relation_phrase import relation_phrase

    return relation_phrase(prompt, entities), "prompt"


def _import_sample(folder: str, sid: str, entry: Any, relation: str, output: str | None,
                   match_keypoints: bool) -> dict[str, Any]:
    """One sample of the public format as a TripletRow-shaped dict; raises ``_Broken`` with the reason."""
    import fsspec
    import torch

    if not isinstance(entry, dict):
        raise _Broken(f"prompts.json entry is not an object: {entry!r}")
    prompt = entry.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _Broken(f"prompts.json entry has no prompt: {prompt!r}")
    entities, single = _sample_files(entry)
    n = len(entities)
    video = posixpath.join(folder, "videos", sid)
    mask_dir = posixpath.join(folder, "masks", sid)
    fs, video_path = fsspec.core.url_to_fs(video)
    present = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(video_path, detail=False)}
    concepts = sorted(p for p in present if re.fullmatch(r"concept\d*\.png", p))
    if len(concepts) != n:
        raise _Broken(f"entity count mismatch: prompts.json names {n} entities {entities} but the sample has "
                      f"{len(concepts)} concept images {concepts}")
    if single:
        concept_names, kp_names, mask_names = ["concept.png"], ["concept_keyposes.pth"], ["motion.png"]
    else:
        concept_names = [f"concept{k}.png" for k in range(n)]
        kp_names = [f"concept_keyposes_{_NUMBER_WORDS[k]}.pth" for k in range(n)]
        mask_names = [f"motion{k}.png" for k in range(n)]
    for name in [*concept_names, "motion.png", *kp_names, "motion_keyposes.pth"]:
        if name not in present:
            kind = "keypoint file" if name.endswith(".pth") else "image"
            raise _Broken(f"missing {kind} videos/{sid}/{name}")

    def image(uri: str, what: str) -> Image.Image:
        try:
            return open_image(uri)
        except FileNotFoundError as e:
            raise _Broken(f"missing {what} {uri}") from e
        except Exception as e:  # noqa: BLE001 - any decoder failure makes this sample unusable
            raise _Broken(f"unreadable image {what} {uri} ({type(e).__name__}: {e})") from e

    def keypoints(name: str) -> Any:
        try:
            return torch.load(io.BytesIO(_read_bytes(posixpath.join(video, name))), weights_only=True,
                              map_location="cpu")
        except Exception as e:  # noqa: BLE001
            raise _Broken(f"unreadable keypoint file videos/{sid}/{name} ({type(e).__name__}: {e})") from e

    target = image(posixpath.join(video, "motion.png"), "target")
    subjects = [image(posixpath.join(video, name), f"subject image {name}") for name in concept_names]
    masks = []
    for name in mask_names:
        mask_image = image(posixpath.join(mask_dir, name), f"mask masks/{sid}/{name}")
        if mask_image.size != target.size:
            raise _Broken(f"mask masks/{sid}/{name} is {mask_image.size}, the target {target.size}")
        mask = _binary(mask_image)
        if not mask.any():
            raise _Broken(f"mask masks/{sid}/{name} is empty")
        masks.append(mask)

    target_kp = _normalized_keypoints(keypoints("motion_keyposes.pth"), target.size, "motion_keyposes.pth")
    target_kp = target_kp.reshape(-1, NUM_KEYPOINTS, 2)
    if target_kp.shape[0] != n:
        raise _Broken(f"entity count mismatch: motion_keyposes.pth holds {target_kp.shape[0]} keypoint sets for "
                      f"{n} entities")
    subject_kp = []
    for name, subject in zip(kp_names, subjects):
        kp = _normalized_keypoints(keypoints(name), subject.size, name)
        if kp.size != NUM_KEYPOINTS * 2:
            raise _Broken(f"{name}: expected one set of {NUM_KEYPOINTS} keypoints, got shape {kp.shape}")
        subject_kp.append(kp.reshape(NUM_KEYPOINTS, 2))

    metadata = {"sample": sid}
    order = _keypoint_order(target_kp, masks) if match_keypoints and n > 1 else tuple(range(n))
    if order != tuple(range(n)):
        logger.info("%s/%s: target keypoint sets reordered to %s to match the masks", relation, sid, order)
        metadata["target_keypoint_sets"] = ",".join(str(i) for i in order)
    phrase, phrase_from = _relation_phrase_of(entry, prompt, entities)
    metadata["relation_phrase_from"] = phrase_from

    tid = f"{relation}-{re.sub(r'[^A-Za-z0-9_.-]', '_', sid)}"
    target_uri = posixpath.join(video, "motion.png")
    subject_uris = [posixpath.join(video, name) for name in concept_names]
    mask_uris = [posixpath.join(mask_dir, name) for name in mask_names]
    if output is not None:  # re-encode as real PNGs (the public .png files may hold WebP bytes)
        base = f"{output.rstrip('/')}/images/{tid}"
        target_uri = _save_png(target.convert("RGB"), f"{base}/target.png")
        subject_uris = [_save_png(im.convert("RGB"), f"{base}/subject{k}.png") for k, im in enumerate(subjects)]
        mask_uris = [_save_png(Image.fromarray(m.astype(np.uint8) * 255, mode="L"), f"{base}/mask{k}.png")
                     for k, m in enumerate(masks)]
    return {
        "triplet_id": tid,
        "relation": relation,
        "target": target_uri,
        "prompt": prompt.strip(),
        "relation_phrase": phrase,
        "subjects": [{
            "image": subject_uris[k],
            "phrase": entities[k],
            "box": [float(v) for v in mask_box(masks[k])],
            "mask": mask_uris[k],
            "target_keypoints": target_kp[order[k]].astype(float).tolist(),
            "subject_keypoints": subject_kp[k].astype(float).tolist(),
            "target_visibility": None,
            "subject_visibility": None,
        } for k in range(n)],
        "source": video,
        "metadata": metadata,
    }


def _save_png(image: Image.Image, uri: str) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    _write_bytes(uri, buffer.getvalue())
    return uri


def _sort_key(sid: str) -> tuple[int, Any]:
    return (0, int(sid)) if sid.isdigit() else (1, sid)


def import_public_folder(folder: str, relation: str, output: str | None = None,
                         match_keypoints: bool = True) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Import a relation folder in the authors' public format (REFERENCE.md section 4; see the module docstring).

    Args:
        folder: the relation folder (local path or fsspec URL) holding ``prompts.json``, ``videos/``, ``masks/``.
        relation: the relation id the triplets get (the LoRA's name), e.g. ``"hugging"``.
        output: when given, every image is re-encoded as a real PNG to ``{output}/images/{triplet_id}/``
            (``target.png``, ``subject{k}.png``, ``mask{k}.png``) and the records point there; else the records
            point at the original files.
        match_keypoints: assign target keypoint sets to subjects by their masks (else: file order).
    Returns:
        (records shaped like ``manifests.triplets.TripletRow``, problems ``{"sample": id, "reason": ...}``). A
        sample without ``predicate`` is imported (its relation phrase derived from the prompt); a sample with a
        missing or unreadable file, an empty mask or an entity count that does not match its files is skipped and
        reported. Raises ``ValueError`` only when the folder itself is unusable (no readable ``prompts.json``).
    """
    import fsspec

    if not isinstance(relation, str) or not _KEY.match(relation):
        raise ValueError(f"relation must be 1-128 characters from letters, digits and '-_.', got {relation!r}")
    folder = str(folder).rstrip("/")
    try:
        prompts = json.loads(_read_bytes(posixpath.join(folder, "prompts.json")).decode("utf-8-sig"))
    except Exception as e:  # noqa: BLE001 - missing, unreadable or not JSON: the folder is unusable
        raise ValueError(f"folder {folder!r}: no readable prompts.json ({type(e).__name__}: {e})") from e
    if not isinstance(prompts, dict):
        raise ValueError(f"folder {folder!r}: prompts.json must map sample ids to entries, "
                         f"got {type(prompts).__name__}")
    fs, videos = fsspec.core.url_to_fs(posixpath.join(folder, "videos"))
    folders = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(videos, detail=False)
               if fs.isdir(p)} if fs.isdir(videos) else set()

    records: list[dict[str, Any]] = []
    problems: list[dict[str, str]] = []
    for sid in sorted(set(map(str, prompts)) | folders, key=_sort_key):
        if sid not in prompts:
            reason = "no entry in prompts.json"
        elif sid not in folders:
            reason = f"missing sample folder videos/{sid}"
        else:
            try:
                records.append(_import_sample(folder, sid, prompts[sid], relation, output, match_keypoints))
                continue
            except _Broken as e:
                reason = str(e)
            except Exception as e:  # noqa: BLE001 - never let one sample stop the import
                reason = f"{type(e).__name__}: {e}"
        logger.warning("%s: skipping sample %s: %s", folder, sid, reason)
        problems.append({"sample": sid, "reason": reason})
    logger.info("%s: imported %d triplets, skipped %d samples", folder, len(records), len(problems))
    return records, problems


# ---------------------------------------------------------------------------------------------------- augmentation

def _crop_window(width: int, height: int, boxes: np.ndarray, scale: float,
                 rng: np.random.Generator) -> tuple[int, int, int]:
    """A square crop ``(x0, y0, side)`` in pixels covering ``scale`` of the largest square's area, grown (up to that
    square) to hold the union of ``boxes`` and placed at random among the positions that keep the union inside."""
    full = min(width, height)
    side = int(round(math.sqrt(scale) * full))
    ux0, uy0 = math.floor(boxes[:, 0].min() * width), math.floor(boxes[:, 1].min() * height)
    ux1, uy1 = math.ceil(boxes[:, 2].max() * width), math.ceil(boxes[:, 3].max() * height)
    side = max(1, min(max(side, ux1 - ux0, uy1 - uy0), full))

    def start(u0: int, u1: int, length: int) -> int:
        lo, hi = max(0, u1 - side), min(u0, length - side)
        if lo > hi:  # the union is longer than the crop on this axis: centre on it
            lo = hi = int(round(min(max((u0 + u1 - side) / 2, 0), length - side)))
        return int(rng.integers(lo, hi + 1))

    return start(ux0, ux1, width), start(uy0, uy1, height), side


def augment(example: TripletExample, size: int, rng: np.random.Generator, flip_p: float = 0.5,
            crop_scale: tuple[float, float] = (0.8, 1.0)) -> TripletExample:
    """Random resized crop + horizontal flip of the target, with its boxes, masks and keypoints (paper 3.4 training).

    The crop is square (no aspect distortion) and covers a fraction ``U(crop_scale)`` of the largest square of the
    target, grown where needed so that every subject box stays inside (as far as the image allows); it is resized
    to ``size`` x ``size``. With probability ``flip_p`` the result is mirrored: x -> 1 - x and left/right keypoints
    swap (``KEYPOINT_FLIPS`` of each subject's layout), so index j still names the same body part. Target
    keypoints outside the crop are clamped to the border and get visibility 0. Subject images are only resized to
    ``size`` x ``size``: their keypoints are normalized, so unchanged, and they are not flipped (the keypoint
    matching loss pairs body part j of the subject with body part j of the target, which the label swap keeps
    right). Deterministic for a given ``rng`` state.
    """
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if not 0.0 <= flip_p <= 1.0:
        raise ValueError(f"flip_p must be in [0, 1], got {flip_p!r}")
    lo, hi = crop_scale
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"crop_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {crop_scale!r}")
    width, height = example.target.size
    scale = float(rng.uniform(lo, hi))
    x0, y0, side = _crop_window(width, height, example.boxes, scale, rng)
    flip = bool(rng.random() < flip_p)

    def to_crop(xy: np.ndarray) -> np.ndarray:  # (..., 2) normalized in the target -> normalized in the crop
        return np.stack([(xy[..., 0] * width - x0) / side, (xy[..., 1] * height - y0) / side], axis=-1)

    window = (x0, y0, x0 + side, y0 + side)
    target = example.target.crop(window).resize((size, size), Image.Resampling.BICUBIC)
    masks = [None if m is None else _binary(Image.fromarray(m.astype(np.uint8) * 255).crop(window)
                                            .resize((size, size), Image.Resampling.NEAREST))
             for m in example.target_masks]
    boxes = np.clip(to_crop(example.boxes.reshape(-1, 2, 2)).reshape(-1, 4), 0.0, 1.0)  # (S, 4)
    keypoints = to_crop(example.target_keypoints)  # (S, 17, 2)
    outside = ((keypoints < 0.0) | (keypoints > 1.0)).any(axis=-1)  # (S, 17)
    keypoints = np.clip(keypoints, 0.0, 1.0)
    visibility = example.visibility
    if outside.any():
        visibility = np.ones(outside.shape, np.float32) if visibility is None else visibility.copy()
        visibility[outside] = 0.0
    if flip:
        target = target.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        masks = [None if m is None else m[:, ::-1].copy() for m in masks]
        boxes = np.stack([1.0 - boxes[:, 2], boxes[:, 1], 1.0 - boxes[:, 0], boxes[:, 3]], axis=-1)
        order = np.asarray([KEYPOINT_FLIPS[name] for name in example.keypoint_layouts])  # (S, 17)
        keypoints = np.take_along_axis(keypoints, order[..., None], axis=1)
        keypoints[..., 0] = 1.0 - keypoints[..., 0]
        if visibility is not None:
            visibility = np.take_along_axis(visibility, order, axis=1)
    return TripletExample(
        target=target,
        prompt=example.prompt,
        relation_phrase=example.relation_phrase,
        subject_images=[im.resize((size, size), Image.Resampling.BICUBIC) for im in example.subject_images],
        phrases=example.phrases,
        boxes=boxes,
        target_masks=masks,
        target_keypoints=keypoints,
        subject_keypoints=example.subject_keypoints,
        visibility=visibility,
        relation=example.relation,
        triplet_id=example.triplet_id,
        keypoint_layouts=example.keypoint_layouts,
    )


# --------------------------------------------------------------------------------------------------------- tensors

def _pixels(image: Image.Image):
    """RGB PIL image -> (3, H, W) float32 tensor in [-1, 1] (the VAE's input range)."""
    import torch

    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def to_tensors(example: TripletExample, size: int | None = None) -> dict[str, Any]:
    """The example as torch tensors for training (float32, CPU; the caller moves them to a device).

    ``size``: resize the target and the subject images to ``size`` x ``size`` first (a plain resize: normalized
    geometry is unchanged); None keeps the target's size and resizes subject images to it. Returns:
        target (3, H, W) and subjects (S, 3, H, W) in [-1, 1]; boxes (S, 4); target_keypoints, subject_keypoints
        (S, 17, 2) in [0, 1]; visibility (S, 17) (ones when the example has none); masks (S, H, W) in {0, 1} (the box
        filled where a subject has no mask).
    """
    import torch

    target = example.target if size is None else example.target.resize((size, size), Image.Resampling.BICUBIC)
    width, height = target.size
    masks = []
    for box, m in zip(example.boxes, example.target_masks):
        if m is None:
            m = np.zeros((height, width), dtype=bool)
            m[math.floor(box[1] * height):math.ceil(box[3] * height),
              math.floor(box[0] * width):math.ceil(box[2] * width)] = True
        elif m.shape != (height, width):
            m = _binary(Image.fromarray(m.astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST))
        masks.append(torch.from_numpy(m.astype(np.float32)))
    s = example.num_subjects
    visibility = np.ones((s, NUM_KEYPOINTS), np.float32) if example.visibility is None else example.visibility
    return {
        "target": _pixels(target),
        "subjects": torch.stack([_pixels(im if im.size == (width, height)
                                         else im.resize((width, height), Image.Resampling.BICUBIC))
                                 for im in example.subject_images]),
        "boxes": torch.from_numpy(example.boxes.astype(np.float32)),
        "target_keypoints": torch.from_numpy(np.clip(example.target_keypoints, 0, 1).astype(np.float32)),
        "subject_keypoints": torch.from_numpy(np.clip(example.subject_keypoints, 0, 1).astype(np.float32)),
        "visibility": torch.from_numpy(np.asarray(visibility, np.float32)),
        "masks": torch.stack(masks),
    }
