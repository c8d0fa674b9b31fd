"""Which distilled local image encoder a command means, checked without torch: the checkpoint a path or folder
names, hub references, and the up-front "local tokens need a local encoder" check that every command runs before
it loads anything (the batch driver never imports torch).

A reference is a local file or a ``train distill-encoder`` output folder (``local_encoder.safetensors``, else the
``epoch_N.pt`` of the highest N, e.g. the authors' ``epoch_6.pt``), a URL of either (``s3://...``), or a hub
``owner/repo/filename``. Loading is ``dreamrelation.model.presets.local_encoder_file`` /
``dreamrelation.model.encoders``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from .config import SDXL, ModelSpec

LOCAL_CHECKPOINT_NAME = "local_encoder.safetensors"  # what `train distill-encoder` writes (dreamrelation.train.distill)
EPOCH_FILE = re.compile(r"epoch_(\d+)\.pt")


def pick_local_checkpoint(names: Sequence[str], folder: str) -> str:
    """Of a folder's file names, the local-encoder checkpoint: ``local_encoder.safetensors``, else ``epoch_N.pt``
    of the highest N; ``ValueError`` naming ``folder`` when there is neither."""
    if LOCAL_CHECKPOINT_NAME in names:
        return LOCAL_CHECKPOINT_NAME
    epochs = [(int(m.group(1)), name) for name in names if (m := EPOCH_FILE.fullmatch(name))]
    if not epochs:
        raise ValueError(f"local encoder folder {folder!r} holds neither {LOCAL_CHECKPOINT_NAME} nor epoch_N.pt")
    return max(epochs)[1]


def local_checkpoint_file(path: str | Path) -> Path:
    """The checkpoint file a local-encoder reference names: a file as is; a folder (a ``train distill-encoder``
    output) -> its ``local_encoder.safetensors``, else its ``epoch_N.pt`` of the highest N. ``ValueError`` naming
    the path when there is none."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        return path / pick_local_checkpoint([p.name for p in path.iterdir() if p.is_file()], str(path))
    raise ValueError(f"local encoder {str(path)!r} is neither a checkpoint file nor a folder holding one")


def is_hub_file(ref: str) -> bool:
    """``owner/repo/filename`` (not a local path)."""
    parts = ref.split("/")
    return len(parts) == 3 and all(parts) and "://" not in ref and not Path(ref).is_absolute()


def local_encoder_ref(ref: str | None) -> str | None:
    """A local-encoder reference as it means the same from any folder and process (a worker's working folder is
    not the shell's): a local path made absolute, after checking that it holds a checkpoint (``ValueError`` naming
    it otherwise); a URL (``s3://...``) or a hub ref ``owner/repo/filename`` as is; None as None. Nothing is
    loaded or downloaded."""
    if not ref or "://" in ref or (is_hub_file(ref) and not Path(ref).exists()):
        return ref or None  # a URL or hub ref: read (and checked) where it is loaded
    local_checkpoint_file(ref)  # a file, or a folder holding one
    return os.path.abspath(os.path.expanduser(ref))


def check_local_tokens(preset: str | ModelSpec, local_encoder: str | None, use_local_tokens: bool) -> str | None:
    """``ValueError`` (one line) when local tokens are on but the model has no distilled local encoder and may not
    fall back on its undistilled image encoder (``ModelSpec.undistilled_local_tokens``: the ``sdxl`` preset), or
    when ``local_encoder`` is a local path that holds no checkpoint. Cheap: nothing is built, loaded or downloaded
    (the tiny preset and model folders may use their own image encoder).

    Returns ``local_encoder_ref(local_encoder)``."""
    local_encoder = local_encoder_ref(local_encoder)
    if isinstance(preset, ModelSpec):
        spec, name = preset, preset.base
    elif preset == "sdxl":
        spec, name = SDXL, preset
    else:
        return local_encoder
    if use_local_tokens and not (local_encoder or spec.local_encoder) and not spec.undistilled_local_tokens:
        raise ValueError(
            f"local tokens are on but preset {name!r} has no distilled local encoder: pass --local-encoder URI "
            f"(local_encoder: a `train distill-encoder` output or the authors' epoch_6.pt), or turn local tokens "
            f"off (--no-local-tokens)")
    return local_encoder
