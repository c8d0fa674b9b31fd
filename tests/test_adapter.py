"""ImagePromptAdapter: installation on the real SDXL UNet (meta device), ms_adapter.bin layout, strict loading."""

from __future__ import annotations

import pytest
import torch

from dreamrelation.model.adapter import AdapterStateDictError, ImagePromptAdapter
from dreamrelation.model.config import AdapterConfig


def ms_adapter_shapes() -> dict[str, dict[str, tuple] | tuple]:
    """The key names and shapes of MS-Diffusion's ms_adapter.bin, written out from REFERENCE.md (not our code)."""
    d, w, q, e = 1280, 1664, 16, 2048
    image_proj = {
        "grounding_latents": (1, q, d),
        "latent_proj.0.weight": (w, 832), "latent_proj.0.bias": (w,),
        "latent_proj.2.weight": (q * d, w), "latent_proj.2.bias": (q * d,),
        "latent_norm.weight": (d,), "latent_norm.bias": (d,),
        "proj_in.weight": (d, w), "proj_in.bias": (d,),
        "attention_norm.weight": (d,), "attention_norm.bias": (d,),
        "proj_out.weight": (e, d), "proj_out.bias": (e,),
        "norm_out.weight": (e,), "norm_out.bias": (e,),
    }
    for i in range(4):
        for norm in ("norm1", "norm2"):
            image_proj[f"layers.{i}.0.{norm}.weight"] = (d,)
            image_proj[f"layers.{i}.0.{norm}.bias"] = (d,)
        image_proj[f"layers.{i}.0.to_q.weight"] = (d, d)
        image_proj[f"layers.{i}.0.to_kv.weight"] = (2 * d, d)
        image_proj[f"layers.{i}.0.to_out.weight"] = (d, d)
        image_proj[f"layers.{i}.1.0.weight"] = (d,)
        image_proj[f"layers.{i}.1.0.bias"] = (d,)
        image_proj[f"layers.{i}.1.1.weight"] = (4 * d, d)
        image_proj[f"layers.{i}.1.3.weight"] = (d, 4 * d)
    # 140 processors in unet.attn_processors order: down_blocks.1 (640: 2x2 blocks), down_blocks.2 (1280: 2x10),
    # up_blocks.0 (1280: 3x10), up_blocks.1 (640: 3x2), mid_block (1280: 10); attn1/attn2 alternate.
    widths = [640] * 4 + [1280] * 20 + [1280] * 30 + [640] * 6 + [1280] * 10
    ms_adapter = {}
    for block, width in enumerate(widths):
        i = 2 * block + 1  # attn2 of transformer block `block`
        ms_adapter[f"{i}.to_k_ip.weight"] = (width, e)
        ms_adapter[f"{i}.to_v_ip.weight"] = (width, e)
    return {"image_proj": image_proj, "ms_adapter": ms_adapter, "dummy_image_tokens": (1, 4, e)}


def meta_checkpoint(shapes) -> dict:
    """A nested ms_adapter.bin-shaped dict of meta tensors: the right names and shapes, no memory."""
    out = {}
    for section, value in shapes.items():
        if isinstance(value, dict):
            out[section] = {k: torch.empty(s, device="meta") for k, s in value.items()}
        else:
            out[section] = torch.empty(value, device="meta")
    return out


@pytest.fixture(scope="module")
def real_adapter():
    from dreamrelation.model.architectures import sdxl_unet

    unet = sdxl_unet("meta")
    return unet, ImagePromptAdapter(AdapterConfig(), unet)


def test_real_unet_gets_70_image_attention_processors(real_adapter):
    unet, adapter = real_adapter
    assert len(adapter.processors) == len(unet.attn_processors) == 140
    with_ip = [(i, p) for i, p in enumerate(adapter.processors) if p.to_k_ip is not None]
    assert len(with_ip) == 70
    assert all(i % 2 == 1 for i, _ in with_ip)
    shapes = [tuple(p.to_k_ip.weight.shape) for _, p in with_ip] + [tuple(p.to_v_ip.weight.shape) for _, p in with_ip]
    assert set(shapes) == {(640, 2048), (1280, 2048)}
    assert sum(s == (640, 2048) for s in shapes) == 2 * 10
    assert all(type(p).__name__ == "MaskedParallelAttnProcessor" for p in unet.attn_processors.values())
    assert sum(p.numel() for p in adapter.resampler.parameters()) == 118_943_616


def test_ms_adapter_bin_layout_passes_the_strict_check(real_adapter):
    _, adapter = real_adapter
    adapter.load_adapter_state_dict(meta_checkpoint(ms_adapter_shapes()))  # raises on any difference


def test_strict_check_lists_missing_unexpected_and_misshaped_keys(real_adapter):
    _, adapter = real_adapter
    shapes = ms_adapter_shapes()
    del shapes["image_proj"]["proj_in.bias"]
    shapes["ms_adapter"]["0.to_k_ip.weight"] = (320, 2048)  # attn1 carries no weights
    shapes["ms_adapter"]["1.to_v_ip.weight"] = (1280, 2048)  # should be 640 wide
    with pytest.raises(AdapterStateDictError) as info:
        adapter.load_adapter_state_dict(meta_checkpoint(shapes))
    err = info.value
    assert err.missing == ["image_proj.proj_in.bias"]
    assert err.unexpected == ["ms_adapter.0.to_k_ip.weight"]
    assert err.mismatched == [("ms_adapter.1.to_v_ip.weight", (1280, 2048), (640, 2048))]
    for text in ("missing keys (1): image_proj.proj_in.bias", "unexpected keys (1): ms_adapter.0.to_k_ip.weight",
                 "ms_adapter.1.to_v_ip.weight: checkpoint (1280, 2048) vs model (640, 2048)"):
        assert text in str(err)


def test_tiny_adapter_roundtrips_safetensors_and_ms_bin(tmp_path, pipe):
    adapter = pipe.adapter
    folder = adapter.save_pretrained(tmp_path / "adapter")
    assert {p.name for p in folder.iterdir()} == {"adapter_config.json", "ms_adapter.safetensors"}
    from diffusers import UNet2DConditionModel

    from dreamrelation.model.tiny import tiny_unet_config

    other = ImagePromptAdapter.from_pretrained(folder, UNet2DConditionModel(**tiny_unet_config()))
    assert other.config == adapter.config
    for k, v in adapter.adapter_state_dict().items():
        torch.testing.assert_close(other.adapter_state_dict()[k], v, rtol=0, atol=0)

    # the same weights as MS-Diffusion's torch pickle: {"image_proj": ..., "ms_adapter": ..., "dummy_image_tokens"}
    nested = {
        "image_proj": adapter.resampler.state_dict(),
        "ms_adapter": adapter.processors.state_dict(),
        "dummy_image_tokens": adapter.dummy_image_tokens.detach(),
    }
    torch.save(nested, tmp_path / "ms_adapter.bin")
    third = ImagePromptAdapter(adapter.config, UNet2DConditionModel(**tiny_unet_config()))
    third.load_checkpoint(tmp_path / "ms_adapter.bin")
    for k, v in adapter.adapter_state_dict().items():
        torch.testing.assert_close(third.adapter_state_dict()[k], v, rtol=0, atol=0)


class NotAWeight:
    pass


def test_pickles_load_weights_only(tmp_path, pipe):
    torch.save({"image_proj": {}, "payload": NotAWeight()}, tmp_path / "evil.bin")
    with pytest.raises(Exception, match="[Ww]eights only"):
        pipe.adapter.load_checkpoint(tmp_path / "evil.bin")
    with pytest.raises(FileNotFoundError, match="adapter checkpoint not found"):
        pipe.adapter.load_checkpoint(tmp_path / "nope.bin")


def test_image_tokens_layout(pipe):
    adapter = pipe.adapter
    cfg = adapter.config.resampler
    for n in (1, 2, 3):
        tokens = torch.randn(2, n, 17, cfg.embedding_dim)
        out = adapter.image_tokens(tokens, torch.randn(2, n, cfg.phrase_dim), torch.rand(2, n, 4))
        assert out.shape == (2, 4 + 16 * n, cfg.output_dim)
        torch.testing.assert_close(out[:, :4], adapter.dummy_image_tokens.expand(2, -1, -1))


def test_adapter_rejects_a_unet_of_another_width():
    from diffusers import UNet2DConditionModel

    from dreamrelation.model.tiny import TINY_ADAPTER, tiny_unet_config

    unet = UNet2DConditionModel(**{**tiny_unet_config(), "cross_attention_dim": 48})
    with pytest.raises(ValueError, match=r"resampler.output_dim \(64\) must equal unet.config.cross_attention_dim \(48\)"):
        ImagePromptAdapter(TINY_ADAPTER, unet)
