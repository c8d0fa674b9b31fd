"""The DreamRelation authors' inference config (YAML): prompt, subject images, phrases, boxes, LoRA.

Example (``config/example_two_objects.yaml`` of the public release)::

    lora_weights: "lora-weights/.../pytorch_lora_weights.safetensors"
    class_names: ["cat", "plushie bear"]
    prompt: "A cat is hugging with a plushie bear."
    images_path: ["assets/image_prompts/cat_2.jpg", "assets/image_prompts/plushie_bear.jpg"]
    boxes: [[[0.0, 0.2, 0.55, 0.85], [0.55, 0.26, 0.95, 0.90]]]   # a batch of one layout
    phrases: [["cat", "plushie bear"]]

``boxes`` and ``phrases`` are batches of layouts (the authors' scripts use the first); a single flat layout
(``boxes: [[x0, y0, x1, y1], ...]``, ``phrases: ["cat", ...]``) is accepted too. ``phrases`` falls back to
``class_names``. Relative paths are resolved against the config's folder, then its parent (the authors' configs
live in ``config/`` beside ``assets/`` and are run from the repository root), then the current folder; a path found
nowhere resolves beside the config's parent, so errors name where it was expected. Existence is left to the caller:
a missing LoRA is an error only if it is used.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuthorsConfig:
    """One generation request read from an authors' config: N subjects with their phrases and layout boxes."""

    prompt: str
    images: list[Path]
    phrases: list[str]
    boxes: list[list[float]]
    lora: Path | None


def resolve_path(ref: str, config_path: Path) -> Path:
    """``ref`` as is when absolute; else the first existing of config folder / its parent / cwd (see module doc)."""
    if Path(ref).is_absolute():
        return Path(ref)
    candidates = [config_path.parent / ref, config_path.parent.parent / ref, Path(ref)]
    return next((c for c in candidates if c.exists()), candidates[1])


def _is_box(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and not isinstance(value[0], list)


def _first_layout(value: Any, name: str, path: Path, nested: Any) -> list:
    """``[[...]]`` (a batch of layouts) -> its first layout; a flat layout is returned as is.

    ``nested(value[0])`` says whether ``value[0]`` is a whole layout rather than one entry of it.
    """
    if not isinstance(value, list) or not value:
        raise ValueError(f"{path}: field {name!r} must be a non-empty list, got {value!r}")
    if not nested(value[0]):
        return value
    if len(value) > 1:
        logger.warning("%s: field %r holds %d layouts; using the first", path, name, len(value))
    if not value[0]:
        raise ValueError(f"{path}: field {name!r} holds an empty layout: {value!r}")
    return value[0]


def _box(value: Any, name: str, path: Path) -> list[float]:
    if not (isinstance(value, list) and len(value) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        raise ValueError(f"{path}: {name} must be four numbers [x0, y0, x1, y1], got {value!r}")
    return [float(v) for v in value]


def load_authors_config(path: str | Path) -> AuthorsConfig:
    """Parse the YAML; errors name the file, the field and the bad value (``ValueError``, or
    ``FileNotFoundError`` for a missing config file)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping (prompt, images_path, boxes, phrases, ...) at the top level, "
                         f"got {type(data).__name__}: {data!r}")
    for field in ("prompt", "images_path", "boxes"):
        if field not in data:
            raise ValueError(f"{path}: missing field {field!r} (fields present: {sorted(data)})")

    prompt = data["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{path}: field 'prompt' must be a non-empty string, got {prompt!r}")

    images = data["images_path"]
    if not isinstance(images, list) or not images or not all(isinstance(i, str) and i for i in images):
        raise ValueError(f"{path}: field 'images_path' must be a non-empty list of paths, got {images!r}")

    field = "phrases" if data.get("phrases") is not None else "class_names"
    if data.get(field) is None:
        raise ValueError(f"{path}: needs 'phrases' or 'class_names' (the words naming each subject)")
    phrases = _first_layout(data[field], field, path, nested=lambda v: isinstance(v, list))
    if not all(isinstance(p, str) and p.strip() for p in phrases):
        raise ValueError(f"{path}: field {field!r} must hold non-empty strings, got {phrases!r}")

    layout = _first_layout(data["boxes"], "boxes", path, nested=lambda v: isinstance(v, list) and not _is_box(v))
    boxes = [_box(b, f"boxes[{j}]", path) for j, b in enumerate(layout)]

    if not len(images) == len(phrases) == len(boxes):
        raise ValueError(f"{path}: one image, phrase and box per subject, got {len(images)} images_path, "
                         f"{len(phrases)} {field}, {len(boxes)} boxes")

    lora = data.get("lora_weights")
    if lora is not None and (not isinstance(lora, str) or not lora):
        raise ValueError(f"{path}: field 'lora_weights' must be a path, got {lora!r}")
    return AuthorsConfig(
        prompt=prompt,
        images=[resolve_path(i, path) for i in images],
        phrases=list(phrases),
        boxes=boxes,
        lora=resolve_path(lora, path) if lora else None,
    )
