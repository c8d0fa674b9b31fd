"""Presets: the tiny model folder in the real formats, and the loading path the public weights take."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import FAST
from dreamrelation.config import ModelSpec
from dreamrelation.presets import SDXL, load_pipeline, resolve_spec


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

    from dreamrelation.tiny import build_tiny

    again = build_tiny(tmp_path / "again")
    for rel in ("unet/diffusion_pytorch_model.safetensors", "adapter/ms_adapter.safetensors"):
        a, b = load_file(str(tiny_dir / rel)), load_file(str(again / rel))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_resolve_spec():
    assert resolve_spec("sdxl") == SDXL
    assert SDXL.base == "stabilityai/stable-diffusion-xl-base-1.0"
    assert SDXL.image_encoder == "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
    with pytest.raises(ValueError, match=r"preset must be one of \['tiny', 'sdxl'\] or a model folder.*'nope'"):
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
                     image_encoder=str(tmp_path / "encoder"))
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
