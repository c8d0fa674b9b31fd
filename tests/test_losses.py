"""Training losses (paper eq. 5-7) against values worked out by hand in the comments; CPU, tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from dreamrelation.train.losses import (
    PROFILES,
    LossConfig,
    denoising_loss,
    gather_at_keypoints,
    keypoint_matching_loss,
    loss_config,
    predict_x0,
    relation_attention_loss,
    relation_token_indices,
    total_loss,
)

EXACT = {"rtol": 0.0, "atol": 1e-6}


# ------------------------------------------------------------------------------------------------------- helpers
def coded_latents(b: int, c: int, h: int, w: int) -> torch.Tensor:
    """latents[b, c, y, x] = 10000 b + 1000 c + 10 y + x: every value names its own cell."""
    bb, cc, yy, xx = torch.meshgrid(torch.arange(b), torch.arange(c), torch.arange(h), torch.arange(w), indexing="ij")
    return (10000 * bb + 1000 * cc + 10 * yy + xx).float()


def hand_example() -> dict[str, torch.Tensor]:
    """One sample, one subject, K = 2 keypoints, C = 2 channels, 2 x 2 latents.

    z0_hat   c0 [[1, 2], [3, 4]]    c1 [[5, 6], [7, 8]]
    E(c_1)   c0 [[2, 0], [0, 0]]    c1 [[0, 0], [0, 10]]
    target keypoints (in x_k):  kp0 (0.9, 0.1) -> row 0, col 1 -> z0_hat (2, 6)
                                kp1 (0.0, 1.0) -> row 1, col 0 -> z0_hat (3, 7)
    subject keypoints (in c_1): kp0 (0.1, 0.1) -> row 0, col 0 -> E (2, 0)
                                kp1 (1.0, 1.0) -> row 1, col 1 -> E (0, 10)
    squared errors: kp0 (2-2)^2 + (0-6)^2 = 36;  kp1 (0-3)^2 + (10-7)^2 = 18;  KML = (36 + 18) / (2 * 2) = 13.5
    """
    return {
        "z0_hat": torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]]]),  # (1, 2, 2, 2)
        "target_keypoints": torch.tensor([[[[0.9, 0.1], [0.0, 1.0]]]]),  # (1, 1, 2, 2)
        "subject_latents": torch.tensor([[[[[2.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 10.0]]]]]),  # (1, 1, 2, 2, 2)
        "subject_keypoints": torch.tensor([[[[0.1, 0.1], [1.0, 1.0]]]]),  # (1, 1, 2, 2)
    }


def cat_samples(*samples: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([s[k] for s in samples]) for k in samples[0]}


def far_sample() -> dict[str, torch.Tensor]:
    """z0_hat = 100 everywhere, E = 0: every squared error is 100^2 = 10000 (sum over 2 channels x 2 kps = 40000)."""
    ex = hand_example()
    ex["z0_hat"] = torch.full_like(ex["z0_hat"], 100.0)
    ex["subject_latents"] = torch.zeros_like(ex["subject_latents"])
    return ex


# ---------------------------------------------------------------------------------------------------- config
def test_profiles():
    assert loss_config("paper") == LossConfig() == LossConfig(1e-3, None, 0.0)
    assert loss_config("public-code") == LossConfig(kml_weight=0.1, kml_t_max=333, attention_weight=1e-3)
    assert set(PROFILES) == {"paper", "public-code"}
    with pytest.raises(ValueError, match=r"profile must be one of \['paper', 'public-code'\], got 'papr'"):
        loss_config("papr")


@pytest.mark.parametrize(
    "kwargs, name",
    [({"kml_weight": -1.0}, "kml_weight"), ({"kml_weight": float("nan")}, "kml_weight"),
     ({"attention_weight": -1e-3}, "attention_weight"), ({"kml_t_max": -1}, "kml_t_max"),
     ({"kml_t_max": 3.5}, "kml_t_max"), ({"kml_t_max": True}, "kml_t_max"), ({"kml_weight": "0.1"}, "kml_weight")],
)
def test_config_errors_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LossConfig(**kwargs)


def test_config_is_frozen():
    with pytest.raises(Exception):
        LossConfig().kml_weight = 1.0  # type: ignore[misc]


# -------------------------------------------------------------------------------------------------- denoising
def test_denoising_loss_by_hand():
    # errors 1, -2, 0, 3 -> squares 1, 4, 0, 9 -> mean 3.5
    pred = torch.tensor([[[[1.0, 0.0], [2.0, 3.0]]]], dtype=torch.bfloat16)
    noise = torch.tensor([[[[0.0, 2.0], [2.0, 0.0]]]])
    loss = denoising_loss(pred, noise)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert loss.item() == 3.5
    with pytest.raises(ValueError, match="noise_pred"):
        denoising_loss(pred, noise[..., :1])


# ----------------------------------------------------------------------------------------------------- eq. 5
def test_predict_x0_by_hand():
    # abar = 0.25 at t = 0: (1 - sqrt(0.75) * 1) / sqrt(0.25) = 2 - sqrt(3);  abar = 0.64 at t = 1: (1 - 0.6 * 1) / 0.8
    abar = torch.tensor([0.25, 0.64])
    got = predict_x0(torch.ones(2, 1, 1, 1), torch.ones(2, 1, 1, 1), abar, torch.tensor([0, 1]))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.flatten(), torch.tensor([2 - math.sqrt(3), 0.5]), **EXACT)


def test_predict_x0_inverts_the_ddpm_forward_process():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(5, 4, 6, 10, generator=g), torch.randn(5, 4, 6, 10, generator=g)
    t = torch.tensor([0, 1, 333, 500, 999])
    z_t = sched.add_noise(z0, eps, t)  # sqrt(abar) z0 + sqrt(1 - abar) eps
    got = predict_x0(z_t, eps, sched.alphas_cumprod, t)
    # sqrt(abar_999) ~ 0.068 magnifies float32 rounding of z_t about 15x
    torch.testing.assert_close(got, z0, rtol=0.0, atol=5e-5)
    torch.testing.assert_close(got[:4], z0[:4], rtol=0.0, atol=2e-6)
    # bf16 inputs are computed in float32
    assert predict_x0(z_t.bfloat16(), eps.bfloat16(), sched.alphas_cumprod, t).dtype == torch.float32


def test_predict_x0_errors():
    abar = torch.tensor([0.5, 0.5])
    z = torch.zeros(2, 1, 1, 1)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1\]"):
        predict_x0(z, z, abar, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="timesteps must have shape"):
        predict_x0(z, z, abar, torch.tensor([0]))
    with pytest.raises(ValueError, match="integers"):
        predict_x0(z, z, abar, torch.tensor([0.0, 1.0]))


# ------------------------------------------------------------------------------------------------- gathering
def test_gather_corners_middle_and_clamp_on_a_non_square_latent():
    latents = coded_latents(2, 2, 3, 5)  # h = 3, w = 5
    kps = torch.tensor([
        [0.0, 0.0],    # -> y 0, x 0 -> 0
        [1.0, 1.0],    # -> x = clamp(floor(5.0)) = 4, y = clamp(floor(3.0)) = 2 -> 24
        [1.0, 0.0],    # -> x 4, y 0 -> 4
        [0.0, 1.0],    # -> x 0, y 2 -> 20
        [0.5, 0.5],    # -> x floor(2.5) = 2, y floor(1.5) = 1 -> 12
        [0.39, 0.7],   # -> x floor(1.95) = 1, y floor(2.1) = 2 -> 21
        [0.999, 0.334],  # -> x floor(4.995) = 4, y floor(1.002) = 1 -> 14
        [1.3, -0.2],   # out of range: clamped -> x 4, y 0 -> 4
    ])
    keypoints = torch.stack([kps[None], kps.flip(0)[None]])  # (B=2, S=1, K=8, 2); sample 1 in reverse order
    got = gather_at_keypoints(latents, keypoints)
    assert got.shape == (2, 1, 8, 2)
    cells = torch.tensor([0.0, 24, 4, 20, 12, 21, 14, 4])
    expected = torch.stack([
        torch.stack([cells, cells + 1000], -1),                              # sample 0: c0, c1
        torch.stack([cells.flip(0) + 10000, cells.flip(0) + 11000], -1),     # sample 1
    ])[:, None]
    assert torch.equal(got, expected)


def test_gather_several_subjects_and_bad_shapes():
    latents = coded_latents(1, 1, 4, 2)  # h = 4, w = 2
    keypoints = torch.tensor([[[[1.0, 1.0]], [[0.75, 0.25]]]])  # (1, S=2, K=1, 2): (x 1, y 3) = 31; (x 1, y 1) = 11
    assert gather_at_keypoints(latents, keypoints).flatten().tolist() == [31.0, 11.0]
    with pytest.raises(ValueError, match="keypoints"):
        gather_at_keypoints(latents, keypoints[..., :1])
    with pytest.raises(ValueError, match="latents"):
        gather_at_keypoints(latents[0], keypoints)


# -------------------------------------------------------------------------------------------------------- KML
def test_kml_by_hand():
    loss = keypoint_matching_loss(**hand_example(), timesteps=torch.tensor([10]))
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert loss.item() == 13.5


def test_kml_mixed_timesteps_under_the_gate():
    # sample 0 (t = 100) is the hand example (54 over 4 entries), sample 1 (t = 800) is far (40000 over 4 entries)
    batch = cat_samples(hand_example(), far_sample())
    t = torch.tensor([100, 800])
    assert keypoint_matching_loss(**batch, timesteps=t, t_max=333).item() == 13.5  # only sample 0
    assert keypoint_matching_loss(**batch, timesteps=t).item() == (54 + 40000) / 8  # no gate: 5006.75
    # t == t_max still counts; swapping the timesteps keeps only the far sample
    assert keypoint_matching_loss(**batch, timesteps=torch.tensor([333, 334]), t_max=333).item() == 13.5
    assert keypoint_matching_loss(**batch, timesteps=torch.tensor([800, 100]), t_max=333).item() == 10000.0


def test_kml_visibility_weights():
    ex = hand_example()
    t = torch.tensor([0])
    # kp1 invisible: only kp0, 36 / 2 channels = 18
    assert keypoint_matching_loss(**ex, timesteps=t, visibility=torch.tensor([[[1.0, 0.0]]])).item() == 18.0
    # weights 0.5 and 1: (0.5 * 36 + 1 * 18) / (1.5 * 2) = 12
    assert keypoint_matching_loss(**ex, timesteps=t, visibility=torch.tensor([[[0.5, 1.0]]])).item() == 12.0
    # an invisible keypoint may hold anything, even NaN coordinates
    ex["target_keypoints"][0, 0, 1] = float("nan")
    assert keypoint_matching_loss(**ex, timesteps=t, visibility=torch.tensor([[[1.0, 0.0]]])).item() == 18.0
    with pytest.raises(ValueError, match="visibility"):
        keypoint_matching_loss(**ex, timesteps=t, visibility=torch.ones(1, 2))


def test_kml_subject_mask_drops_padded_subjects():
    # subject 2 is padding with garbage (E = 1e6): masked out, the loss is the hand value of subject 1
    ex = hand_example()
    ex["target_keypoints"] = ex["target_keypoints"].repeat(1, 2, 1, 1)  # (1, 2, 2, 2)
    ex["subject_keypoints"] = ex["subject_keypoints"].repeat(1, 2, 1, 1)
    ex["subject_latents"] = torch.cat([ex["subject_latents"], torch.full_like(ex["subject_latents"], 1e6)], dim=1)
    t = torch.tensor([0])
    assert keypoint_matching_loss(**ex, timesteps=t, subject_mask=torch.tensor([[True, False]])).item() == 13.5
    assert keypoint_matching_loss(**ex, timesteps=t).item() > 1e10
    with pytest.raises(ValueError, match="subject_mask"):
        keypoint_matching_loss(**ex, timesteps=t, subject_mask=torch.tensor([True, False]))


def test_kml_all_gated_is_zero_and_backward_works():
    batch = cat_samples(hand_example(), far_sample())
    z0_hat = batch.pop("z0_hat").clone()
    z0_hat[1, 0, 0, 0] = float("nan")  # a diverged gated sample must not poison the loss or the gradient
    z0_hat.requires_grad_(True)
    loss = keypoint_matching_loss(z0_hat, **batch, timesteps=torch.tensor([800, 900]), t_max=333)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert z0_hat.grad is not None and torch.equal(z0_hat.grad, torch.zeros_like(z0_hat))


def test_kml_gradient_reaches_z0_hat_by_hand():
    # d/dz of sum((z - e)^2) / 4 = (z - e) / 2 at the picked cells:
    #   cell (row 0, col 1): c0 (2 - 2) / 2 = 0,    c1 (6 - 0) / 2 = 3
    #   cell (row 1, col 0): c0 (3 - 0) / 2 = 1.5,  c1 (7 - 10) / 2 = -1.5;  every other cell 0
    ex = hand_example()
    z0_hat = ex.pop("z0_hat").requires_grad_(True)
    subject_latents = ex.pop("subject_latents").requires_grad_(True)
    keypoint_matching_loss(z0_hat, subject_latents=subject_latents, **ex, timesteps=torch.tensor([0])).backward()
    expected = torch.tensor([[[[0.0, 0.0], [1.5, 0.0]], [[0.0, 3.0], [-1.5, 0.0]]]])
    assert torch.equal(z0_hat.grad, expected)
    assert subject_latents.grad is None  # E(c_i) is a fixed target


def test_kml_bf16_prediction_and_shape_errors():
    ex = hand_example()
    ex["z0_hat"] = ex["z0_hat"].bfloat16()  # every value is exact in bf16
    assert keypoint_matching_loss(**ex, timesteps=torch.tensor([0])).item() == 13.5
    with pytest.raises(ValueError, match="timesteps"):
        keypoint_matching_loss(**ex, timesteps=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="subject_latents"):
        keypoint_matching_loss(**{**ex, "subject_latents": ex["subject_latents"][:, :, :1]},
                               timesteps=torch.tensor([0]))
    with pytest.raises(ValueError, match="subject_keypoints"):
        keypoint_matching_loss(**{**ex, "subject_keypoints": ex["subject_keypoints"][:, :, :1]},
                               timesteps=torch.tensor([0]))
    with pytest.raises(ValueError, match="t_max"):
        keypoint_matching_loss(**ex, timesteps=torch.tensor([0]), t_max=-5)


# ----------------------------------------------------------------------------------------- relation attention
MAP = torch.tensor([[0.4, 0.1], [0.3, 0.2]])


def test_relation_attention_loss_by_hand():
    # sample 0: fg {0.4}, bg {0.1, 0.3, 0.2}: 0.2 - 0.4 = -0.2;  sample 1: fg {0.4, 0.1}, bg {0.3, 0.2}: 0.25 - 0.25 = 0
    maps = torch.stack([MAP, MAP])
    masks = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]]])
    torch.testing.assert_close(relation_attention_loss(maps, masks), torch.tensor(-0.1), **EXACT)
    # soft mask 0.5 on the first pixel: fg 0.5 * 0.4 / 0.5 = 0.4; bg (0.5 * 0.4 + 0.6) / 3.5 = 0.8 / 3.5
    soft = torch.tensor([[[0.5, 0.0], [0.0, 0.0]]])
    torch.testing.assert_close(relation_attention_loss(MAP[None], soft), torch.tensor(0.8 / 3.5 - 0.4), **EXACT)


def test_relation_attention_loss_resizes_masks_nearest():
    mask = torch.zeros(1, 4, 4)
    mask[0, :2, :2] = 1.0  # nearest to 2 x 2 reads rows / cols 0 and 2 -> [[1, 0], [0, 0]]
    torch.testing.assert_close(relation_attention_loss(MAP[None], mask), torch.tensor(-0.2), **EXACT)


def test_relation_attention_loss_empty_regions():
    maps = torch.stack([MAP, MAP, MAP]).requires_grad_(True)
    masks = torch.stack([torch.zeros(2, 2), torch.ones(2, 2), torch.tensor([[1.0, 0.0], [0.0, 0.0]])])
    loss = relation_attention_loss(maps, masks)  # empty fg and empty bg are left out: only sample 2 (-0.2)
    torch.testing.assert_close(loss, torch.tensor(-0.2), **EXACT)
    loss.backward()
    # d/da of (bg mean - fg mean): 1/3 on the background, -1 on the foreground; 0 for the left-out samples
    expected = torch.tensor([[-1.0, 1 / 3], [1 / 3, 1 / 3]])
    torch.testing.assert_close(maps.grad, torch.stack([torch.zeros(2, 2), torch.zeros(2, 2), expected]), **EXACT)

    only_empty = torch.stack([MAP, MAP]).requires_grad_(True)
    zero = relation_attention_loss(only_empty, masks[:2])
    assert zero.item() == 0.0 and zero.grad_fn is not None
    zero.backward()
    assert torch.equal(only_empty.grad, torch.zeros(2, 2, 2))


def test_relation_attention_loss_errors():
    with pytest.raises(ValueError, match="foreground_masks"):
        relation_attention_loss(MAP[None], torch.full((1, 2, 2), 2.0))
    with pytest.raises(ValueError, match="attention_maps"):
        relation_attention_loss(MAP, torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="batch size"):
        relation_attention_loss(MAP[None], torch.zeros(2, 2, 2))


# -------------------------------------------------------------------------------------------- relation tokens
@pytest.fixture(scope="module")
def tokenizer():
    from dreamrelation.model.tiny import build_tokenizer

    return build_tokenizer()  # a real CLIP BPE with no merges: one token per character, "</w>" on the last


def test_relation_token_indices(tokenizer):
    # [BOS 0, a 1, d o g 2-4, h u g s 5-8, a 9, c a t 10-12, EOS 13]
    assert relation_token_indices(tokenizer, "a dog hugs a cat", "hugs") == [5, 6, 7, 8]
    assert relation_token_indices(tokenizer, "A dog HUGS a cat.", "hugs") == [5, 6, 7, 8]  # CLIP lowercases
    assert relation_token_indices(tokenizer, "a dog hugs a cat", "a cat") == [9, 10, 11, 12]  # the run, not 1st "a"
    # words apart: [a 1, dog 2-4, is 5-6, playing 7-13, with 14-17, a 18, cat 19-21, on 22-23, a 24, bench 25-29]
    got = relation_token_indices(tokenizer, "a dog is playing with a cat on a bench", "playing with on a bench")
    assert got == [*range(7, 18), 22, 23, 24, *range(25, 30)]
    with pytest.raises(ValueError, match="'hugging'"):
        relation_token_indices(tokenizer, "a dog hugs a cat", "hugging")
    with pytest.raises(ValueError, match="relation_phrase"):
        relation_token_indices(tokenizer, "a dog hugs a cat", " ")


# --------------------------------------------------------------------------------------------------- eq. 7
def test_total_loss_with_both_profiles():
    denoise, kml, attention = torch.tensor(0.5), torch.tensor(2.0), torch.tensor(3.0)
    loss, parts = total_loss(denoise, kml, attention, loss_config("paper"))
    # 0.5 + 1e-3 * 2 (no attention term)
    torch.testing.assert_close(loss, torch.tensor(0.502), **EXACT)
    assert parts == pytest.approx({"loss": 0.502, "denoise": 0.5, "kml": 2.0, "attention": 3.0})
    loss, parts = total_loss(denoise, kml, attention, loss_config("public-code"))
    # 0.5 + 0.1 * 2 + 1e-3 * 3
    torch.testing.assert_close(loss, torch.tensor(0.703), **EXACT)
    assert parts["loss"] == pytest.approx(0.703)
    assert all(isinstance(v, float) for v in parts.values())

    loss, parts = total_loss(denoise, kml, None, loss_config("paper"))  # no attention loss computed: fine
    assert parts["attention"] == 0.0 and loss.item() == pytest.approx(0.502)
    with pytest.raises(ValueError, match="attention is None"):
        total_loss(denoise, kml, None, loss_config("public-code"))
    with pytest.raises(ValueError, match="config"):
        total_loss(denoise, kml, attention, "paper")  # type: ignore[arg-type]


def test_total_loss_gradients_follow_the_weights():
    d, k, a = (torch.tensor(v, requires_grad=True) for v in (0.5, 2.0, 3.0))
    loss, _ = total_loss(d, k, a, LossConfig(kml_weight=0.25, kml_t_max=None, attention_weight=0.0))
    loss.backward()
    assert d.grad.item() == 1.0 and k.grad.item() == 0.25 and a.grad is None  # weight 0: not in the graph
