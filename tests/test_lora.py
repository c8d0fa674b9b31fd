"""Relation LoRA: targets and size on the real SDXL UNet, the public file format, and plain-diffusers loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FAST

from dreamrelation.model.lora import (
    add_relation_lora,
    lora_parameter_count,
    read_lora_file,
    save_relation_lora,
)

ARGS = ("a dog hugging a cat",)
TARGETS = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")


def run(pipe, subjects, **kw):
    return pipe(*ARGS, subjects[:2], ["dog", "cat"], [[0, 0, 0.5, 1], [0.5, 0, 1, 1]], seed=5, output_type="np",
                **FAST, **kw).images


def public_style_lora(unet, seed: int = 0) -> dict[str, torch.Tensor]:
    """A LoRA written by hand in the key layout of the public relation LoRAs (diffusers' old 'lora.down' names)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, module in unet.named_modules():
        if name.endswith(TARGETS):
            sd[f"unet.{name}.lora.down.weight"] = torch.randn(4, module.in_features, generator=g) * 0.1
            sd[f"unet.{name}.lora.up.weight"] = torch.randn(module.out_features, 4, generator=g) * 0.1
    return sd


def test_real_sdxl_relation_lora_has_3_143_680_parameters_on_cross_attention_only():
    from dreamrelation.model.architectures import sdxl_unet

    unet = sdxl_unet("meta")
    assert add_relation_lora(unet, "hugging") == 3_143_680
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert sum(p.numel() for p in unet.parameters() if p.requires_grad) == 3_143_680
    wrapped = {n.rsplit(".lora_", 1)[0] for n in trainable}
    assert len(wrapped) == 70 * 4
    assert all(w.endswith(TARGETS) for w in wrapped)
    assert not any("attn1" in n or "to_k_ip" in n for n in trainable)


def test_public_format_lora_loads_changes_output_and_unloads_exactly(pipe, subjects):
    base = run(pipe, subjects)
    lora = public_style_lora(pipe.unet)
    pipe.load_relation_lora("hugging", lora)
    try:
        assert pipe.loaded_relations() == ["hugging"]
        from peft.utils import get_peft_model_state_dict

        loaded = get_peft_model_state_dict(pipe.unet, adapter_name="hugging")
        name = next(k for k in lora if "attn2.to_q.lora.down" in k)
        peft_key = name.removeprefix("unet.").replace("lora.down", "lora_A")
        torch.testing.assert_close(loaded[peft_key], lora[name])
        with_lora = run(pipe, subjects, relation="hugging")
        assert np.abs(with_lora - base).max() > 1e-3
        np.testing.assert_array_equal(run(pipe, subjects), base)  # relation=None disables it
    finally:
        pipe.unload_relation_lora("hugging")
    assert pipe.loaded_relations() == []
    np.testing.assert_array_equal(run(pipe, subjects), base)
    assert type(next(iter(pipe.unet.attn_processors.values()))).__name__ == "MaskedParallelAttnProcessor"


def test_saved_lora_roundtrips_and_loads_in_plain_diffusers(tmp_path, tiny_dir, subjects):
    from diffusers import StableDiffusionXLPipeline

    from dreamrelation.model.presets import load_pipeline

    ours = load_pipeline(str(tiny_dir))
    count = add_relation_lora(ours.unet, "riding")
    assert count == lora_parameter_count(ours.unet, "riding") > 0
    with torch.no_grad():  # a trained LoRA has non-zero up weights
        for name, p in ours.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(1))
    path = save_relation_lora(ours.unet, "riding", tmp_path / "riding")
    assert path.name == "pytorch_lora_weights.safetensors"
    state = read_lora_file(path.parent)
    assert all(k.startswith("unet.") and (".lora.down." in k or ".lora.up." in k) for k in state)
    assert {k.split(".lora.")[0].endswith(TARGETS) for k in state} == {True}
    assert len(state) == 2 * len({k.split(".lora.")[0] for k in state})
    expected = run(ours, subjects, relation="riding")

    fresh = load_pipeline(str(tiny_dir))
    fresh.load_relation_lora("riding", str(path))
    np.testing.assert_allclose(run(fresh, subjects, relation="riding"), expected, atol=1e-6)

    plain = StableDiffusionXLPipeline.from_pretrained(str(tiny_dir), add_watermarker=False)
    kw = dict(num_inference_steps=2, height=64, width=64, output_type="np")
    before = plain("a dog", generator=torch.Generator().manual_seed(0), **kw).images
    plain.load_lora_weights(str(path))
    after = plain("a dog", generator=torch.Generator().manual_seed(0), **kw).images
    assert sum(len(v) for v in plain.get_list_adapters().values()) == 1
    assert np.abs(after - before).max() > 1e-3


def test_read_lora_file_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="relation LoRA not found"):
        read_lora_file(tmp_path / "missing.safetensors")
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="holds no LoRA tensors"):
        read_lora_file(tmp_path / "plain.safetensors")
    (tmp_path / "x.bin").write_bytes(b"0")
    with pytest.raises(ValueError, match="must be a .safetensors file"):
        read_lora_file(tmp_path / "x.bin")


def test_unknown_relation_and_bad_state_dict_are_named(pipe):
    with pytest.raises(ValueError, match="relation 'dancing' is not loaded"):
        pipe.unload_relation_lora("dancing")
    with pytest.raises(ValueError, match="relation must be a non-empty id"):
        pipe.load_relation_lora("", {})
