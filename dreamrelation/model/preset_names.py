"""The built-in preset names, without torch: the batch driver and the CLI read them before any model loads.

* ``tiny``: random miniature weights built on first use (``dreamrelation.model.tiny``); images are noise.
* ``toy``: the miniature model trained on the toy world (``dreamrelation.train.toy_model``), shipped in the
  package (``TOY_MODEL_DIR``, with its ``card.json``); images show the world's coloured shapes.
* ``sdxl``: the public weights.

Anything else is a model folder (``model_index.json`` plus ``adapter/``).
"""

from __future__ import annotations

from pathlib import Path

PRESETS = ("tiny", "toy", "sdxl")
SMALL_PRESETS = ("tiny", "toy")  # miniature models: 64 px training and CPU-sized defaults
TOY_MODEL_DIR = Path(__file__).resolve().parents[1] / "toy" / "weights"


def is_named(preset: object) -> bool:
    """Whether ``preset`` is a built-in name (not a path to resolve)."""
    return str(preset) in PRESETS


def toy_model_dir() -> Path:
    """The toy preset's folder; ``FileNotFoundError`` (naming the command that makes it) when it is incomplete."""
    if not (TOY_MODEL_DIR / "model_index.json").is_file() or not (TOY_MODEL_DIR / "adapter").is_dir():
        raise FileNotFoundError(
            f"the toy preset's weights are missing from {TOY_MODEL_DIR}: `dreamrelation models train-toy OUTPUT` "
            f"trains them (OUTPUT/model), or pass that folder as --preset")
    return TOY_MODEL_DIR


def training_resolution(preset: object) -> int:
    """The side a relation LoRA trains at by default: 64 for the miniature presets, SDXL's 1024 otherwise."""
    return 64 if str(preset) in SMALL_PRESETS else 1024
