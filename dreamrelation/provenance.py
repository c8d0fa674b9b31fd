"""Fingerprints of the weights that make an image: every result row of a batch run records them, so that a dataset
exported later describes exactly the weights its images came from.

A fingerprint is recomputed on every actor start, so it must stay cheap even for the multi-GB SDXL weights:

* a file in a Hugging Face hub cache is a symlink to ``.../blobs/<sha256>`` (LFS files): its name is the hash;
* any other file's sha256 is kept in ``cache_root()/fingerprints.json`` ({realpath: {size, mtime_ns, sha256}}),
  valid while size and mtime are unchanged, and computed (8 MiB chunks) only on a miss.

Only file hashing lives here: torch and the hub client are imported lazily, by the functions that need them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CHUNK = 8 * 1024 * 1024
CACHE_NAME = "fingerprints.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
CONFIG_SUFFIXES = (".json", ".txt", ".model")  # configs, tokenizers (vocab.json, merges.txt, spiece.model)
# a model folder's parts fingerprinted on their own
MODEL_EXCLUDE = ("adapter", "metrics", "image_encoder", "local_encoder")
_SHA256_NAME = re.compile(r"[0-9a-f]{64}")


def _short(*parts: str) -> str:
    """First 16 hex characters of the sha256 of ``parts`` (NUL-separated)."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _cache_file() -> Path:
    from .model.presets import cache_root

    return cache_root() / CACHE_NAME


def _read_cache(path: Path) -> dict[str, Any]:
    """The cache's entries; {} when it is missing or unreadable (a corrupt file is rewritten on the next store)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable fingerprint cache %s: %s", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _store(key: str, entry: dict[str, Any]) -> None:
    """Add one entry: re-read (merging what concurrent writers stored meanwhile), write a temp file, os.replace.
    A lost race only costs a later re-hash; a failure to write is logged, never raised."""
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(path)
        data[key] = entry
        fd, tmp = tempfile.mkstemp(prefix=f".{CACHE_NAME}-", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        logger.warning("could not write fingerprint cache %s: %s", path, exc)


def _hash_content(path: str) -> str:
    """sha256 hex of a file's bytes, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 hex of a local file's content: a hub-cache blob's name, else the fingerprint cache, else the bytes."""
    real = os.path.realpath(path)
    if not os.path.isfile(real):
        raise FileNotFoundError(f"file_sha256: path {str(path)!r} is not a file (resolves to {real!r})")
    parent, name = os.path.split(real)
    if os.path.basename(parent) == "blobs" and _SHA256_NAME.fullmatch(name):
        return name  # hub cache: an LFS blob is named by the sha256 of its content
    st = os.stat(real)
    entry = _read_cache(_cache_file()).get(real)
    if isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns \
            and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    logger.debug("hashing %s (%d bytes)", real, st.st_size)
    sha = _hash_content(real)
    after = os.stat(real)
    if (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns):  # not changed while being read
        _store(real, {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha})
    return sha


def _affects_outputs(name: str) -> bool:
    lower = name.lower()
    if lower.startswith(".") or lower.startswith("readme") or lower.endswith((".md", ".markdown")):
        return False
    return lower.endswith(WEIGHT_SUFFIXES + CONFIG_SUFFIXES) or "merges" in lower or "vocab" in lower


def folder_fingerprint(folder: str | Path, exclude: Iterable[str] = ()) -> str:
    """First 16 hex of a sha256 over the sorted relative paths and file_sha256 of the weights, configs and tokenizer
    files under ``folder``; hidden entries, README / markdown and the top-level subfolders in ``exclude`` skipped."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"folder {str(folder)!r} is not a directory")
    skip = set(exclude)
    files: list[tuple[str, str]] = []
    seen: set[str] = set()  # real paths of the folders walked: a symlink cycle is walked once
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        if os.path.realpath(dirpath) in seen:
            dirnames[:] = []
            continue
        seen.add(os.path.realpath(dirpath))
        rel_dir = Path(dirpath).relative_to(root)
        top = rel_dir == Path(".")
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not (top and d in skip))
        for name in filenames:
            if _affects_outputs(name):
                files.append(((rel_dir / name).as_posix(), os.path.join(dirpath, name)))
    if not files:
        raise ValueError(f"folder {str(folder)!r} holds no weight, config or tokenizer files (exclude={sorted(skip)})")
    digest = hashlib.sha256()
    for rel, full in sorted(files):
        digest.update(f"{rel}\0{file_sha256(full)}\n".encode())
    return digest.hexdigest()[:16]


def _resolve(ref: str | Path) -> Path:
    """A local file or folder as is; ``owner/repo`` or ``owner/repo/filename`` from the hub cache, offline only."""
    path = Path(ref)
    if path.exists():
        return path
    parts = str(ref).split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise FileNotFoundError(f"ref {str(ref)!r} is neither a local path nor 'owner/repo[/filename]'")
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    repo = "/".join(parts[:2])
    try:
        if len(parts) == 2:
            return Path(snapshot_download(repo, local_files_only=True))
        return Path(hf_hub_download(repo, parts[2], local_files_only=True))
    except (OSError, ValueError, EntryNotFoundError) as exc:
        raise FileNotFoundError(f"ref {str(ref)!r} is not a local path and not in the Hugging Face hub cache "
                                f"({type(exc).__name__}: {exc})") from exc


def _path_fingerprint(path: Path, exclude: Iterable[str] = ()) -> str:
    if path.is_dir():
        return folder_fingerprint(path, exclude)
    return _short(path.name, file_sha256(path))


def ref_fingerprint(ref: str | Path) -> str:
    """16-hex fingerprint of a model reference as the loaders take it: a local file (its name + content), a local
    folder (folder_fingerprint), or a hub ref ``owner/repo`` / ``owner/repo/filename`` found in the hub cache."""
    return _path_fingerprint(_resolve(ref))


def local_encoder_fingerprint(ref: str | Path) -> str:
    """16-hex fingerprint of the checkpoint file a local-encoder reference loads: a file, a ``train
    distill-encoder`` output folder (the file in it that ``encoders.local_checkpoint_file`` picks, so that a folder
    and its file give the same fingerprint), a URL of either (its cached copy) or a hub ref in the hub cache."""
    from .model.encoders import local_checkpoint_file

    if "://" in str(ref):  # a URL: the local copy the loader reads
        from .model.presets import local_encoder_file

        return _path_fingerprint(local_encoder_file(str(ref)))
    return _path_fingerprint(local_checkpoint_file(_resolve(ref)))


def local_encoder_record(encoder: Any, use_local_tokens: bool) -> dict[str, Any]:
    """Which tower made a ``SubjectEncoder``'s local tokens, for cards and records: ``{"used", "source",
    "fingerprint", "local_grid"}``; ``source`` is the loaded checkpoint (None: the undistilled image encoder
    itself, as on the tiny preset)."""
    source = encoder.local_source
    return {"used": bool(use_local_tokens), "source": source,
            "fingerprint": local_encoder_fingerprint(source) if source else None,
            "local_grid": int(encoder.config.local_grid)}


def model_fingerprints(preset: str, local_encoder: str | None = None, metrics: bool = True) -> dict[str, str | None]:
    """{"model", "adapter", "image_encoder", "local_encoder", "metrics"} fingerprints of a preset name or model
    folder (``presets.resolve_spec``); "local_encoder" is None without one (the tiny preset's local tokens come from
    its image encoder), "metrics" None when ``metrics`` is off. "model" covers the SDXL parts only: a model
    folder's adapter/, metrics/, image_encoder/ and local_encoder/ count on their own."""
    from .model.presets import resolve_spec

    spec = resolve_spec(preset)
    base = _resolve(spec.base)
    if spec.image_encoder is not None:
        image_encoder = ref_fingerprint(spec.image_encoder)
    elif (base / "image_encoder").is_dir():
        image_encoder = folder_fingerprint(base / "image_encoder")
    else:
        raise ValueError(f"model {spec.base!r} has no image_encoder/ folder and the spec names none")
    local = local_encoder or spec.local_encoder
    found: dict[str, str | None] = {
        "model": _path_fingerprint(base, MODEL_EXCLUDE), "adapter": ref_fingerprint(spec.adapter),
        "image_encoder": image_encoder, "local_encoder": local_encoder_fingerprint(local) if local else None,
        "metrics": None}
    if metrics:
        from .metrics import metric_model_refs

        clip, dino = metric_model_refs(preset)
        found["metrics"] = _short(f"clip={ref_fingerprint(clip)}", f"dino={ref_fingerprint(dino)}")
    logger.debug("fingerprints of preset %r: %s", preset, found)
    return found
