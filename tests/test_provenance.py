"""Weight fingerprints (dreamrelation.provenance): real files, the hub-cache blob fast path, the persistent cache,
folder fingerprints and the tiny preset's fingerprints."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from dreamrelation import provenance
from dreamrelation.provenance import file_sha256, folder_fingerprint, model_fingerprints, ref_fingerprint

HEX16 = re.compile(r"[0-9a-f]{16}")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh DREAMRELATION_HOME per test, so each starts with no fingerprint cache."""
    folder = tmp_path / "home"
    monkeypatch.setenv("DREAMRELATION_HOME", str(folder))
    return folder


def _no_hashing(path):
    raise AssertionError(f"read {path} although its sha256 was known")


def _model_folder(root: Path) -> Path:
    (root / "unet").mkdir(parents=True)
    (root / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(bytes(range(256)) * 4)
    (root / "unet" / "config.json").write_text('{"a": 1}')
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "merges.txt").write_text("a b\n")
    (root / "adapter").mkdir()
    (root / "adapter" / "ms_adapter.safetensors").write_bytes(b"adapter")
    (root / "model_index.json").write_text("{}")
    return root


def test_file_sha256_hashes_once_then_reads_the_cache(home, tmp_path, monkeypatch):
    f = tmp_path / "w.bin"
    f.write_bytes(b"weights" * 1000)
    assert file_sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    cached = json.loads((home / "fingerprints.json").read_text())
    assert cached[os.path.realpath(f)]["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    with monkeypatch.context() as m:
        m.setattr(provenance, "_hash_content", _no_hashing)
        assert file_sha256(str(f)) == hashlib.sha256(f.read_bytes()).hexdigest()
    before = os.stat(f).st_mtime_ns
    f.write_bytes(b"WEIGHTS" * 1000)  # same size, new content and mtime
    os.utime(f, ns=(before + 10**9, before + 10**9))
    assert file_sha256(f) == hashlib.sha256(b"WEIGHTS" * 1000).hexdigest()


def test_hub_cache_blob_name_is_used_without_reading(home, tmp_path, monkeypatch):
    name = hashlib.sha256(b"something else").hexdigest()
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / name).write_bytes(b"the content, which does not hash to the name")
    link = tmp_path / "snapshots" / "x" / "model.safetensors"
    link.parent.mkdir(parents=True)
    link.symlink_to(Path("..") / ".." / "blobs" / name)
    monkeypatch.setattr(provenance, "_hash_content", _no_hashing)
    assert file_sha256(link) == name
    assert not (home / "fingerprints.json").exists()
    with pytest.raises(FileNotFoundError, match="nothing.bin"):
        file_sha256(tmp_path / "nothing.bin")


def test_folder_fingerprint(home, tmp_path):
    folder = _model_folder(tmp_path / "m")
    fp = folder_fingerprint(folder)
    assert HEX16.fullmatch(fp) and folder_fingerprint(folder) == fp
    assert folder_fingerprint(shutil.copytree(folder, tmp_path / "copy")) == fp
    (folder / "README.md").write_text("# about")
    (folder / ".hidden.json").write_text("{}")
    (folder / "notes.png").write_bytes(b"png")
    assert folder_fingerprint(folder) == fp
    without_adapter = folder_fingerprint(folder, exclude=["adapter"])
    assert without_adapter != fp
    (folder / "adapter" / "ms_adapter.safetensors").write_bytes(b"adapteR")
    assert folder_fingerprint(folder, exclude=["adapter"]) == without_adapter
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[100] ^= 1
    weights.write_bytes(bytes(data))
    assert folder_fingerprint(folder, exclude=["adapter"]) != without_adapter
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "README.md").write_text("no weights")
    with pytest.raises(ValueError, match="empty"):
        folder_fingerprint(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="absent"):
        folder_fingerprint(tmp_path / "absent")


def test_ref_fingerprint_local_file_and_folder(home, tmp_path):
    folder = _model_folder(tmp_path / "m")
    assert ref_fingerprint(folder) == folder_fingerprint(folder)
    one = ref_fingerprint(folder / "adapter" / "ms_adapter.safetensors")
    assert HEX16.fullmatch(one)
    shutil.copy(folder / "adapter" / "ms_adapter.safetensors", tmp_path / "other.safetensors")
    assert ref_fingerprint(tmp_path / "other.safetensors") != one  # the name counts too


def test_unknown_hub_ref_is_file_not_found(home, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))  # read at call time
    for ref in ("nobody-here/no-such-model", "nobody-here/no-such-model/weights.bin", "not/a/hub/ref"):
        with pytest.raises(FileNotFoundError, match=re.escape(ref)):
            ref_fingerprint(ref)


def _hub_cache(cache: Path) -> tuple[str, str]:
    """A Hugging Face hub cache holding owner/repo at one commit: an LFS weight (blob named by its sha256) and a
    git-stored config (blob named by a 40-hex git sha1). Returns (weight blob name, config blob name)."""
    repo = cache / "models--owner--repo"
    commit = "c" * 40
    weight, config = hashlib.sha256(b"unet weights").hexdigest(), "a" * 40
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / weight).write_bytes(b"unet weights")
    (repo / "blobs" / config).write_text('{"x": 1}')
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    (snap / "unet").mkdir(parents=True)
    (snap / "unet" / "diffusion_pytorch_model.safetensors").symlink_to(Path("../../..") / "blobs" / weight)
    (snap / "model_index.json").symlink_to(Path("../..") / "blobs" / config)
    return weight, config


def test_hub_refs_resolve_offline_through_the_cache(home, tmp_path, monkeypatch):
    weight, config = _hub_cache(tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    read: list[str] = []
    real_hash = provenance._hash_content
    monkeypatch.setattr(provenance, "_hash_content", lambda path: read.append(os.path.basename(path)) or
                        real_hash(path))
    snap = tmp_path / "hub" / "models--owner--repo" / "snapshots" / ("c" * 40)
    assert ref_fingerprint("owner/repo") == folder_fingerprint(snap)
    assert ref_fingerprint("owner/repo/model_index.json") == ref_fingerprint(snap / "model_index.json")
    assert read == [config]  # the LFS weight's blob name is its sha256: never read


def test_corrupt_cache_is_ignored_and_rewritten(home, tmp_path):
    home.mkdir()
    (home / "fingerprints.json").write_text('{"truncated": ')
    f = tmp_path / "w.pt"
    f.write_bytes(b"pt")
    assert file_sha256(f) == hashlib.sha256(b"pt").hexdigest()
    assert json.loads((home / "fingerprints.json").read_text())[os.path.realpath(f)]["size"] == 2
    assert not [p for p in home.iterdir() if p.name != "fingerprints.json"]  # no temp file left behind


def test_tiny_preset_fingerprints(tiny_dir, tmp_path):
    found = model_fingerprints("tiny")
    assert set(found) == {"model", "adapter", "image_encoder", "local_encoder", "metrics"}
    assert found["local_encoder"] is None
    parts = [found[k] for k in ("model", "adapter", "image_encoder", "metrics")]
    assert all(isinstance(v, str) and HEX16.fullmatch(v) for v in parts) and len(set(parts)) == 4
    copy = shutil.copytree(tiny_dir, tmp_path / "tiny-copy")
    assert model_fingerprints(str(copy)) == found
    assert model_fingerprints("tiny", metrics=False) == {**found, "metrics": None}
    local = tmp_path / "clipself.pt"
    local.write_bytes(b"local encoder")
    assert HEX16.fullmatch(model_fingerprints(str(copy), local_encoder=str(local), metrics=False)["local_encoder"])


def test_local_encoder_fingerprint_is_the_loaded_files(home, tmp_path):
    """A distill output folder and the file in it that the loader picks share one fingerprint; a model folder's
    local_encoder/ is not part of its "model" fingerprint."""
    from dreamrelation.provenance import MODEL_EXCLUDE, local_encoder_fingerprint

    out = tmp_path / "distilled"
    out.mkdir()
    (out / "epoch_2.pt").write_bytes(b"epoch 2")
    (out / "local_encoder.json").write_text("{}")
    assert local_encoder_fingerprint(out) == local_encoder_fingerprint(out / "epoch_2.pt") == \
        ref_fingerprint(out / "epoch_2.pt")
    (out / "epoch_6.pt").write_bytes(b"epoch 6")
    assert local_encoder_fingerprint(out) == ref_fingerprint(out / "epoch_6.pt") != ref_fingerprint(out / "epoch_2.pt")
    (out / "local_encoder.safetensors").write_bytes(b"weights")
    assert local_encoder_fingerprint(out) == ref_fingerprint(out / "local_encoder.safetensors")
    with pytest.raises(FileNotFoundError):
        local_encoder_fingerprint(tmp_path / "missing")

    model = _model_folder(tmp_path / "model")
    before = folder_fingerprint(model, MODEL_EXCLUDE)
    shutil.copytree(out, model / "local_encoder")
    assert folder_fingerprint(model, MODEL_EXCLUDE) == before
