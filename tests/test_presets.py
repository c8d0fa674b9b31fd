"""Presets: the tiny model folder in the real formats, and the loading path the public weights take."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import FAST

from dreamrelation.model.config import ModelSpec
from dreamrelation.model.presets import (
    SDXL,
    check_local_tokens,
    load_image_encoder,
    load_pipeline,
    resolve_spec,
)


def test_tiny_folder_has_the_real_formats(tiny_dir):
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2", "image_encoder"):
        assert (tiny_dir / sub / "config.json").is_file()
        assert list((tiny_dir / sub).glob("*.safetensors")), sub
    assert (tiny_dir / "adapter" / "ms_adapter.safetensors").is_file()
    cfg = json.loads((tiny_dir / "adapter" / "adapter_config.json").read_text())
    assert cfg["resampler"]["num_queries"] == 16


def test_tiny_build_is_deterministic(tmp_path, tiny_dir):
    from safetensors.torch import load_file

    from dreamrelation.model.tiny import build_tiny

    again = build_tiny(tmp_path / "again")
    for rel in ("unet/diffusion_pytorch_model.safetensors", "adapter/ms_adapter.safetensors"):
        a, b = load_file(str(tiny_dir / rel)), load_file(str(again / rel))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_resolve_spec():
    assert resolve_spec("sdxl") == SDXL
    assert SDXL.base == "stabilityai/stable-diffusion-xl-base-1.0"
    assert SDXL.image_encoder == "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
    with pytest.raises(ValueError, match=r"preset must be one of \['tiny', 'toy', 'sdxl'\] or a model folder.*'nope'"):
        resolve_spec("nope")


def test_public_layout_path_separate_encoder_and_ms_adapter_bin(tmp_path, tiny_dir, pipe, subjects):
    """The path of the real weights: a base folder, a separate image encoder, a pickled ms_adapter.bin."""
    shutil.copytree(tiny_dir / "image_encoder", tmp_path / "encoder")
    adapter = pipe.adapter
    (tmp_path / "ms").mkdir()
    torch.save({"image_proj": adapter.resampler.state_dict(), "ms_adapter": adapter.processors.state_dict(),
                "dummy_image_tokens": adapter.dummy_image_tokens.detach()}, tmp_path / "ms" / "ms_adapter.bin")
    shutil.copy(tiny_dir / "adapter" / "adapter_config.json", tmp_path / "ms")
    spec = ModelSpec(base=str(tiny_dir), adapter=str(tmp_path / "ms" / "ms_adapter.bin"),
                     image_encoder=str(tmp_path / "encoder"), undistilled_local_tokens=True)  # tiny weights
    other = load_pipeline(spec)
    args = ("a dog hugging a cat", subjects[:2], ["dog", "cat"], [[0, 0, 0.5, 1], [0.5, 0, 1, 1]])
    a = pipe(*args, seed=9, output_type="np", **FAST).images
    b = other(*args, seed=9, output_type="np", **FAST).images
    np.testing.assert_array_equal(a, b)


def test_missing_adapter_weights_are_named(tmp_path, tiny_dir):
    shutil.copytree(tiny_dir, tmp_path / "model")
    (tmp_path / "model" / "adapter" / "ms_adapter.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no adapter weights in .*ms_adapter.safetensors"):
        load_pipeline(str(tmp_path / "model"))


# ------------------------------------------------------------------------------------------------ local encoder
def _local_checkpoint(tiny_dir, path, shift: float = 0.01):
    """A 'distilled' local encoder for the tiny model: its image encoder with every weight moved, saved in HF
    names (what `train distill-encoder` writes)."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionModelWithProjection

    tower = CLIPVisionModelWithProjection.from_pretrained(tiny_dir / "image_encoder")
    state = {k: (v + shift).contiguous() for k, v in tower.state_dict().items() if not k.endswith("position_ids")}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def test_sdxl_local_tokens_need_a_local_encoder(tmp_path, tiny_dir):
    assert SDXL.local_encoder is None and not SDXL.undistilled_local_tokens
    with pytest.raises(ValueError, match=r"local tokens are on but preset 'sdxl' has no distilled local encoder: "
                                         r"pass --local-encoder .*--no-local-tokens"):
        check_local_tokens("sdxl", None, True)
    assert check_local_tokens("sdxl", None, False) is None
    file = _local_checkpoint(tiny_dir, tmp_path / "enc" / "local_encoder.safetensors")
    assert check_local_tokens("sdxl", str(tmp_path / "enc"), True) == str(tmp_path / "enc")  # absolute already
    assert check_local_tokens("sdxl", "owner/repo/epoch_6.pt", True) == "owner/repo/epoch_6.pt"  # a hub ref
    with pytest.raises(ValueError, match="local encoder .*nope.* is neither a checkpoint file nor a folder"):
        check_local_tokens("sdxl", str(tmp_path / "nope"), True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds neither local_encoder.safetensors nor epoch_N.pt"):
        check_local_tokens("sdxl", str(tmp_path / "empty"), False)
    # the tiny preset (and tiny-like folders) may use their own undistilled tower
    assert resolve_spec("tiny").undistilled_local_tokens and check_local_tokens("tiny", None, True) is None
    assert file.is_file()


def test_a_strict_model_refuses_undistilled_local_tokens(tiny_dir, subjects):
    strict = ModelSpec(base=str(tiny_dir), adapter=str(tiny_dir / "adapter"))  # like sdxl: no fallback
    with pytest.raises(ValueError, match="has no distilled local encoder"):
        load_pipeline(strict, use_local_tokens=True)  # before any weight loads
    pipe = load_pipeline(strict)  # default: local tokens on, checked when first made
    with pytest.raises(ValueError, match="no distilled local encoder is loaded"):
        pipe.encode_subjects(subjects[:1])
    assert pipe.encode_subjects(subjects[:1], use_local_tokens=False).shape[1] == 1 + (32 // 8) ** 2
    off = load_pipeline(strict, use_local_tokens=False)  # off by default: the pipeline runs
    assert off.adapter.encoder.config.use_local_tokens is False and off.adapter.config.encoder.use_local_tokens is False
    off(["a dog"], [subjects[:1]], [["dog"]], [[[0, 0, 1, 1]]], seed=0, output_type="np", **FAST)


def test_local_encoder_reaches_the_model(tmp_path, tiny_dir, subjects):
    """--local-encoder FOLDER (a distill output), a model folder's local_encoder/, and provenance of both."""
    from dreamrelation.provenance import local_encoder_record, model_fingerprints

    file = _local_checkpoint(tiny_dir, tmp_path / "enc" / "local_encoder.safetensors")
    pipe = load_pipeline("tiny", local_encoder=str(tmp_path / "enc"))
    encoder = pipe.adapter.encoder
    assert encoder.local_source == str(file) and encoder.local_model is not encoder.vision_model
    plain = load_pipeline("tiny").adapter.encoder
    with torch.no_grad():
        a, b = encoder(subjects[:1]), plain(subjects[:1])
    global_tokens = a.shape[1] - 16
    torch.testing.assert_close(a[:, :global_tokens], b[:, :global_tokens])  # global tokens: the same tower
    assert not torch.allclose(a[:, global_tokens:], b[:, global_tokens:])  # local tokens: the distilled one
    record = local_encoder_record(encoder, True)
    fp = model_fingerprints("tiny", str(tmp_path / "enc"), metrics=False)["local_encoder"]
    assert record == {"used": True, "source": str(file), "fingerprint": fp, "local_grid": 4} and len(fp) == 16
    assert model_fingerprints("tiny", str(file), metrics=False)["local_encoder"] == fp  # folder == its file

    # a model folder carries its own local encoder in local_encoder/; the "model" fingerprint ignores it
    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder, ignore=shutil.ignore_patterns("metrics"))
    before = model_fingerprints(str(folder), metrics=False)
    shutil.copytree(tmp_path / "enc", folder / "local_encoder")
    spec = resolve_spec(str(folder))
    assert spec.local_encoder == str(folder / "local_encoder") and spec.undistilled_local_tokens
    after = model_fingerprints(str(folder), metrics=False)
    assert after["model"] == before["model"] and before["local_encoder"] is None and after["local_encoder"] == fp
    assert load_pipeline(str(folder)).adapter.encoder.local_source == str(folder / "local_encoder" / file.name)


def test_load_image_encoder_alone(tiny_dir, pipe):
    from dreamrelation.model.tiny import TINY_ADAPTER

    vision, config = load_image_encoder(str(tiny_dir))
    assert config == TINY_ADAPTER.encoder
    reference = pipe.adapter.encoder.vision_model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in vision.state_dict().items())


@pytest.mark.parametrize("command", [
    ["generate", "--prompt", "a dog", "--subject", "{img}", "--phrase", "dog", "--box", "0,0,1,1"],
    ["batch", "submit", "{tmp}/manifest.parquet", "--output", "{tmp}/out"],
    ["train", "relations", "{tmp}/data", "--relations", "hugging"],
    ["data", "generate", "{tmp}/spec.yaml", "--output", "{tmp}/out"],
])
def test_cli_sdxl_without_local_encoder_is_one_line(runner, tmp_path, subjects, command):
    """Every command that builds a model: local tokens on sdxl need --local-encoder; one error line, exit 2,
    before any weight loads; --local-encoder naming nothing is named too."""
    import cli

    subjects[0].save(tmp_path / "dog.png")
    args = [a.format(img=tmp_path / "dog.png", tmp=tmp_path) for a in command]
    result = runner.invoke(cli.app, [*args, "--preset", "sdxl"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: local tokens are on but preset 'sdxl' has no distilled local encoder: pass "
                     "--local-encoder URI (local_encoder: a `train distill-encoder` output or the authors' "
                     "epoch_6.pt), or turn local tokens off (--no-local-tokens)"], result.stderr
    missing = runner.invoke(cli.app, [*args, "--preset", "sdxl", "--local-encoder", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "error: local encoder" in missing.stderr and "nope" in missing.stderr
    assert not (tmp_path / "out").exists()


def test_a_local_encoder_on_object_storage_is_fetched_once(tmp_path, tiny_dir):
    """--local-encoder s3://... (here memory://): every worker reads one copy; it is cached by URL and version, and
    fingerprinted like the same file on disk."""
    import fsspec

    from dreamrelation.model.presets import local_encoder_file, local_encoder_ref
    from dreamrelation.provenance import local_encoder_fingerprint

    file = _local_checkpoint(tiny_dir, tmp_path / "enc" / "local_encoder.safetensors")
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/run/enc/local_encoder.safetensors", file.read_bytes())
    fs.pipe("/bucket/run/enc/epoch_1.pt", b"older")
    url = "memory://bucket/run/enc"
    assert local_encoder_ref(url) == url and check_local_tokens("sdxl", url, True) == url
    copy = local_encoder_file(url)
    assert copy.name == file.name and copy.read_bytes() == file.read_bytes()
    assert local_encoder_file(url + "/local_encoder.safetensors") != copy  # another URL, another cache entry
    assert local_encoder_file(url) == copy  # cached
    assert local_encoder_fingerprint(url) == local_encoder_fingerprint(file)
    pipe = load_pipeline("tiny", local_encoder=url)
    assert pipe.adapter.encoder.local_source == str(copy)
    with pytest.raises(ValueError, match="holds neither local_encoder.safetensors nor epoch_N.pt"):
        fs.pipe("/bucket/empty/readme.txt", b"x")
        local_encoder_file("memory://bucket/empty")
    fs.rm("/bucket", recursive=True)
