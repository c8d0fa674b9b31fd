"""The DreamRelation authors' inference config (YAML): prompt, subject images, phrases, boxes, LoRA.

Example (``config/example_two_objects.yaml`` of the public release)::

    lora_weights: "lora-weights/.../pytorch_lora_weights.safetensors"
    class_names: ["cat", "plushie bear"]
    prompt: "A cat is hugging with a plushie bear."
    images_path: ["assets/image_prompts/cat_2.jpg", "assets/image_prompts/plushie_bear.jpg"]
    boxes: [[[0.0, 0.2, 0.55, 0.85], [0.55, 0.26, 0.95, 0.90]]]   # a batch of one layout
    phrases: [["cat", "plushie bear"]]

Relative paths are resolved against the current folder, then the config's folder, then its parent (the authors'
configs live in ``config/`` beside ``assets/``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class AuthorsConfig:
    prompt: str
    images: list[Path]
    phrases: list[str]
    boxes: list[list[float]]
    lora: Path | None


def _resolve(ref: str, config_path: Path) -> Path:
    candidates = [Path(ref), config_path.parent / ref, config_path.parent.parent / ref]
    return next((c for c in candidates if c.exists()), candidates[-1])


def _first_layout(value, name: str, path: Path) -> list:
    """``boxes`` / ``phrases`` are a batch of layouts: ``[[...]]``; a single flat layout is accepted too."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{path}: field {name!r} must be a non-empty list, got {value!r}")
    if name == "boxes":
        return value[0] if isinstance(value[0], list) and value[0] and isinstance(value[0][0], list) else value
    return value[0] if isinstance(value[0], list) else value


def load_authors_config(path: str | Path) -> AuthorsConfig:
    """Parse the YAML; errors name the file, the field and the bad value."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    for field in ("prompt", "images_path", "boxes"):
        if field not in data:
            raise ValueError(f"{path}: missing field {field!r}")
    phrases = data.get("phrases") or [data.get("class_names")]
    if not phrases or phrases == [None]:
        raise ValueError(f"{path}: needs 'phrases' or 'class_names'")
    images = data["images_path"]
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise ValueError(f"{path}: field 'images_path' must be a list of paths, got {images!r}")
    lora = data.get("lora_weights")
    return AuthorsConfig(
        prompt=str(data["prompt"]),
        images=[_resolve(i, path) for i in images],
        phrases=[str(p) for p in _first_layout(phrases, "phrases", path)],
        boxes=[[float(v) for v in b] for b in _first_layout(data["boxes"], "boxes", path)],
        lora=_resolve(lora, path) if lora else None,
    )
