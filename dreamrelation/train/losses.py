"""Training losses of relation LoRA fine-tuning (paper section 3.4, eq. 5-7; REFERENCE.md section 3).

Pure functions on tensors, no model and no I/O::

    L = L_denoise + kml_weight * L_KML + attention_weight * L_attn          (eq. 7, extended by the public code)

* ``L_denoise``: MSE between the predicted and the true noise (epsilon prediction).
* ``L_KML`` (eq. 5-6): predict ``z0_hat`` from ``eps_hat``, read it at the target image's keypoints and match the
  VAE latent of each subject image at that subject's own keypoints. Latents are indexed with
  ``clamp(floor(x * w), 0, w - 1)``; an optional per-sample gate ``t <= t_max`` (public code: 333), optional
  per-keypoint visibility weights and a subject mask for padded subjects.
* ``L_attn`` (public code only): the relation word's text cross-attention map, pushed inside the union of the
  subject masks (mean over background minus mean over foreground). The maps come from
  :class:`dreamrelation.model.attention.AttentionCapture`; :func:`relation_token_indices` finds the relation tokens.

Profiles: ``paper`` (lambda = 1e-3, no gate, no attention loss; the default) and ``public-code`` (0.1, t <= 333,
attention loss 1e-3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "PROFILES",
    "LossConfig",
    "denoising_loss",
    "gather_at_keypoints",
    "keypoint_matching_loss",
    "loss_config",
    "predict_x0",
    "relation_attention_loss",
    "relation_token_indices",
    "total_loss",
]

WEIGHT_EPS = 1e-8  # denominator floor of the weighted means (every weight zero -> a loss of exactly 0)


# --------------------------------------------------------------------------------------------------------- config
def _check_weight(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class LossConfig:
    """Weights of the loss terms and the KML timestep gate.

    Args:
        kml_weight: lambda of eq. 7 (paper: 1e-3).
        kml_t_max: KML counts only for samples with ``t <= kml_t_max``; ``None`` (paper) applies it at every t.
        attention_weight: weight of the relation-attention loss; 0 (paper) switches it off.
    """

    kml_weight: float = 1e-3
    kml_t_max: int | None = None
    attention_weight: float = 0.0

    def __post_init__(self) -> None:
        _check_weight("kml_weight", self.kml_weight)
        _check_weight("attention_weight", self.attention_weight)
        t_max = self.kml_t_max
        if t_max is not None and (isinstance(t_max, bool) or not isinstance(t_max, int) or t_max < 0):
            raise ValueError(f"kml_t_max must be None or an integer >= 0, got {t_max!r}")


PROFILES: dict[str, LossConfig] = {
    "paper": LossConfig(kml_weight=1e-3, kml_t_max=None, attention_weight=0.0),
    "public-code": LossConfig(kml_weight=0.1, kml_t_max=333, attention_weight=1e-3),
}


def loss_config(profile: str) -> LossConfig:
    """The :class:`LossConfig` of a named profile (``paper`` or ``public-code``)."""
    try:
        return PROFILES[profile]
    except (KeyError, TypeError):
        raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}") from None


# ------------------------------------------------------------------------------------------------------ helpers
def _shape(x: object) -> object:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def _require(name: str, x: object, ndim: int, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != ndim:
        raise ValueError(f"{name} must be a tensor of shape {what}, got {_shape(x)}")


def _graph_zero(*tensors: torch.Tensor) -> torch.Tensor:
    """A float32 scalar 0 connected to every tensor that requires grad (so that ``backward`` works)."""
    zero = tensors[0].new_zeros((), dtype=torch.float32)
    for t in tensors:
        if t.requires_grad:
            zero = zero + t.float().sum() * 0.0
    return zero


# ---------------------------------------------------------------------------------------------------- denoising
def denoising_loss(noise_pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """L_denoise = mean((eps_hat - eps)^2), in float32.

    noise_pred, noise: (B, C, h, w) (any equal shapes) -> scalar.
    """
    if not isinstance(noise_pred, torch.Tensor) or not isinstance(noise, torch.Tensor):
        raise ValueError(f"noise_pred and noise must be tensors, got {_shape(noise_pred)} and {_shape(noise)}")
    if noise_pred.shape != noise.shape:
        raise ValueError(f"noise_pred {tuple(noise_pred.shape)} and noise {tuple(noise.shape)} must have one shape")
    return F.mse_loss(noise_pred.float(), noise.float(), reduction="mean")


def predict_x0(
    z_t: torch.Tensor, eps_hat: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """Paper eq. 5: ``z0_hat = (z_t - sqrt(1 - abar_t) * eps_hat) / sqrt(abar_t)``, computed and returned in float32.

    z_t, eps_hat: (B, C, h, w); alphas_cumprod: (T,) of the training scheduler (``DDPMScheduler.alphas_cumprod``);
    timesteps: (B,) integers in [0, T) -> z0_hat (B, C, h, w) float32.
    """
    _require("alphas_cumprod", alphas_cumprod, 1, "(T,)")
    _require("timesteps", timesteps, 1, "(B,)")
    if not isinstance(z_t, torch.Tensor) or not isinstance(eps_hat, torch.Tensor) or z_t.shape != eps_hat.shape:
        raise ValueError(f"z_t and eps_hat must be tensors of one shape, got {_shape(z_t)} and {_shape(eps_hat)}")
    if z_t.ndim < 1 or timesteps.shape[0] != z_t.shape[0]:
        raise ValueError(f"timesteps must have shape ({z_t.shape[0] if z_t.ndim else '?'},), got {_shape(timesteps)}")
    if timesteps.is_floating_point() or timesteps.is_complex():
        raise ValueError(f"timesteps must be integers, got dtype {timesteps.dtype}")
    num_t = alphas_cumprod.shape[0]
    if timesteps.numel() and (int(timesteps.min()) < 0 or int(timesteps.max()) >= num_t):
        raise ValueError(f"timesteps must lie in [0, {num_t - 1}], got {timesteps.tolist()}")
    abar = alphas_cumprod.to(device=z_t.device, dtype=torch.float32)[timesteps.to(z_t.device).long()]  # (B,)
    abar = abar.view(-1, *([1] * (z_t.ndim - 1)))  # (B,) -> (B, 1, 1, 1)
    return (z_t.float() - (1.0 - abar).sqrt() * eps_hat.float()) / abar.sqrt()


# ----------------------------------------------------------------------------------------------------------- KML
def gather_at_keypoints(latents: torch.Tensor, keypoints: torch.Tensor) -> torch.Tensor:
    """Latent vectors at normalised keypoints: latents (B, C, h, w), keypoints (B, S, K, 2) -> (B, S, K, C).

    Keypoints are (x, y) in [0, 1] of the image; the latent cell is column ``clamp(floor(x * w), 0, w - 1)`` and
    row ``clamp(floor(y * h), 0, h - 1)``, so x = 1.0 reads the last column (the public code indexes column w there,
    out of range) and h != w works (the public code scales both by w). Non-finite coordinates read cell (0, 0);
    :func:`keypoint_matching_loss` gives them weight 0.
    """
    _require("latents", latents, 4, "(B, C, h, w)")
    if not isinstance(keypoints, torch.Tensor) or keypoints.ndim != 4 or keypoints.shape[-1] != 2:
        raise ValueError(
            f"keypoints must be a tensor of shape (B, S, K, 2) in normalised (x, y), got {_shape(keypoints)}"
        )
    b, c, h, w = latents.shape
    if keypoints.shape[0] != b:
        raise ValueError(f"keypoints must have batch size {b} like latents, got shape {tuple(keypoints.shape)}")
    kp = torch.nan_to_num(keypoints.to(device=latents.device, dtype=torch.float64), nan=0.0, posinf=0.0, neginf=0.0)
    cols = torch.floor(kp[..., 0] * w).clamp(0, w - 1).long()  # (B, S, K)
    rows = torch.floor(kp[..., 1] * h).clamp(0, h - 1).long()  # (B, S, K)
    flat = latents.flatten(2)  # (B, C, h, w) -> (B, C, h*w)
    index = (rows * w + cols).flatten(1)  # (B, S*K), row-major cell index
    picked = torch.gather(flat, 2, index[:, None, :].expand(-1, c, -1))  # (B, C, S*K)
    return picked.transpose(1, 2).reshape(b, *keypoints.shape[1:3], c)  # (B, C, S*K) -> (B, S, K, C)


def keypoint_matching_loss(
    z0_hat: torch.Tensor,
    target_keypoints: torch.Tensor,
    subject_latents: torch.Tensor,
    subject_keypoints: torch.Tensor,
    timesteps: torch.Tensor,
    t_max: int | None = None,
    visibility: torch.Tensor | None = None,
    subject_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keypoint matching loss, paper eq. 6: ``mean (E(c_i)[kp^{c_i}] - z0_hat[kp^{x_k}])^2`` in float32.

    Args:
        z0_hat: (B, C, h, w) predicted clean latent of the target image (eq. 5, :func:`predict_x0`).
        target_keypoints: (B, S, K, 2) keypoints of each subject in the target image, normalised (x, y).
        subject_latents: (B, S, C, h2, w2) VAE latents ``E(c_i)`` of the subject images: a fixed target (detached).
        subject_keypoints: (B, S, K, 2) keypoints of each subject in its own image, normalised (x, y).
        timesteps: (B,) diffusion timesteps; with ``t_max`` only samples with ``t <= t_max`` count.
        visibility: optional (B, S, K) weights >= 0 of the keypoints (0: not visible, not counted).
        subject_mask: optional (B, S) bool, False for the padding of samples with fewer than S subjects.

    Returns a scalar: ``sum(weight * err) / max(C * sum(weight), eps)`` with ``err`` the squared error per channel,
    i.e. the mean over channels x keypoints x subjects (x samples) of the counted keypoints. When nothing counts
    (every sample gated, every keypoint invisible) it is an exact 0 still connected to ``z0_hat``'s graph.
    """
    _require("z0_hat", z0_hat, 4, "(B, C, h, w)")
    _require("subject_latents", subject_latents, 5, "(B, S, C, h2, w2)")
    b, c = z0_hat.shape[:2]
    s = subject_latents.shape[1]
    if subject_latents.shape[0] != b or subject_latents.shape[2] != c:
        raise ValueError(
            f"subject_latents must have shape ({b}, S, {c}, h2, w2) to match z0_hat {tuple(z0_hat.shape)}, "
            f"got {tuple(subject_latents.shape)}"
        )
    for name, kp in (("target_keypoints", target_keypoints), ("subject_keypoints", subject_keypoints)):
        if not isinstance(kp, torch.Tensor) or kp.ndim != 4 or kp.shape[:2] != (b, s) or kp.shape[-1] != 2:
            raise ValueError(f"{name} must have shape ({b}, {s}, K, 2), got {_shape(kp)}")
    if target_keypoints.shape != subject_keypoints.shape:
        raise ValueError(
            f"target_keypoints {tuple(target_keypoints.shape)} and subject_keypoints "
            f"{tuple(subject_keypoints.shape)} must have one shape (the same K keypoints per subject)"
        )
    k = target_keypoints.shape[2]
    if not isinstance(timesteps, torch.Tensor) or timesteps.shape != (b,):
        raise ValueError(f"timesteps must have shape ({b},), got {_shape(timesteps)}")
    if t_max is not None and (isinstance(t_max, bool) or not isinstance(t_max, int) or t_max < 0):
        raise ValueError(f"t_max must be None or an integer >= 0, got {t_max!r}")
    device = z0_hat.device

    # weight (B, S, K): gate x visibility x subject mask x finite keypoints
    weight = torch.ones(b, s, k, device=device, dtype=torch.float32)
    if t_max is not None:
        weight = weight * (timesteps.to(device) <= t_max).float().view(b, 1, 1)  # per-sample gate
    if visibility is not None:
        if not isinstance(visibility, torch.Tensor) or visibility.shape != (b, s, k):
            raise ValueError(f"visibility must have shape ({b}, {s}, {k}), got {_shape(visibility)}")
        vis = visibility.to(device=device, dtype=torch.float32)
        if not bool(torch.isfinite(vis).all()) or bool((vis < 0).any()):
            raise ValueError("visibility must hold finite weights >= 0")
        weight = weight * vis
    if subject_mask is not None:
        if not isinstance(subject_mask, torch.Tensor) or subject_mask.shape != (b, s):
            raise ValueError(f"subject_mask must be a bool tensor of shape ({b}, {s}), got {_shape(subject_mask)}")
        weight = weight * subject_mask.to(device).bool().float()[..., None]  # (B, S) -> (B, S, 1)
    finite = torch.isfinite(target_keypoints).all(-1) & torch.isfinite(subject_keypoints).all(-1)  # (B, S, K)
    weight = weight * finite.to(device).float()

    pred = gather_at_keypoints(z0_hat, target_keypoints).float()  # (B, S, K, C)
    sub = subject_latents.detach().reshape(b * s, c, *subject_latents.shape[-2:])  # (B*S, C, h2, w2)
    target = gather_at_keypoints(sub, subject_keypoints.reshape(b * s, 1, k, 2))  # (B*S, 1, K, C)
    target = target.reshape(b, s, k, c).float().to(device)  # (B, S, K, C)
    # uncounted entries take the target's value, so that nothing non-finite there reaches the loss or the gradient
    counted = (weight > 0)[..., None]  # (B, S, K, 1)
    err = (torch.where(counted, pred, target) - target).square().sum(-1)  # (B, S, K): summed over channels
    return (weight * err).sum() / (weight.sum() * c).clamp_min(WEIGHT_EPS)


# ---------------------------------------------------------------------------------------------- relation attention
def relation_attention_loss(attention_maps: torch.Tensor, foreground_masks: torch.Tensor) -> torch.Tensor:
    """Relation-attention loss of the public code: mean attention over background minus mean over foreground.

    attention_maps: (B, h, w) cross-attention probability of the relation token(s) (``AttentionCapture.mean_map``);
    foreground_masks: (B, H, W) union of the subject masks in [0, 1] (soft masks are weights), resized to (h, w)
    with nearest-neighbour sampling when the sizes differ (as the public code does) -> scalar, float32.

    Per sample ``sum(a * (1 - m)) / sum(1 - m) - sum(a * m) / sum(m)``, then the mean over samples. A sample whose
    foreground or background is empty says nothing about where the relation is and is left out (the public code
    adds 1e-5 to both sums instead, so an empty foreground there pushes attention down everywhere); with no
    sample left the loss is an exact 0 connected to ``attention_maps``.
    """
    _require("attention_maps", attention_maps, 3, "(B, h, w)")
    _require("foreground_masks", foreground_masks, 3, "(B, H, W)")
    b, h, w = attention_maps.shape
    if foreground_masks.shape[0] != b:
        raise ValueError(f"foreground_masks must have batch size {b}, got shape {tuple(foreground_masks.shape)}")
    fg = foreground_masks.to(device=attention_maps.device, dtype=torch.float32)
    if not bool(torch.isfinite(fg).all()) or bool((fg < 0).any()) or bool((fg > 1).any()):
        raise ValueError("foreground_masks must hold values in [0, 1]")
    if fg.shape[-2:] != (h, w):
        fg = F.interpolate(fg[:, None], size=(h, w), mode="nearest")[:, 0]  # (B, H, W) -> (B, h, w)
    bg = 1.0 - fg
    a = attention_maps.float()
    fg_sum, bg_sum = fg.sum((1, 2)), bg.sum((1, 2))  # (B,)
    valid = (fg_sum > WEIGHT_EPS) & (bg_sum > WEIGHT_EPS)  # (B,)
    if not bool(valid.any()):
        return _graph_zero(attention_maps)
    bg_mean = (a * bg).sum((1, 2)) / bg_sum.clamp_min(WEIGHT_EPS)  # (B,)
    fg_mean = (a * fg).sum((1, 2)) / fg_sum.clamp_min(WEIGHT_EPS)  # (B,)
    per_sample = torch.where(valid, bg_mean - fg_mean, torch.zeros_like(bg_mean))  # (B,)
    return per_sample.sum() / valid.sum()


def _find(ids: Sequence[int], sub: Sequence[int], start: int = 0) -> int:
    """First position >= start where ``sub`` occurs in ``ids``, or -1."""
    n = len(sub)
    for i in range(start, len(ids) - n + 1):
        if list(ids[i:i + n]) == list(sub):
            return i
    return -1


def relation_token_indices(tokenizer, prompt: str, relation_phrase: str) -> list[int]:
    """Positions of the relation phrase's tokens in the tokenized prompt (BOS at 0, as the UNet sees them).

    ``tokenizer`` is a CLIP tokenizer (SDXL's first; both share the token positions). The phrase's tokens are
    looked up as one run first ("shaking hands"); failing that, word by word in order, so a phrase whose words
    are apart in the prompt ("playing ... on a bench") still resolves. Raises ``ValueError`` naming both texts
    when a word is missing or lies past the tokenizer's 77-token limit.
    """
    if not isinstance(prompt, str) or not isinstance(relation_phrase, str) or not relation_phrase.strip():
        raise ValueError(f"prompt and relation_phrase must be non-empty strings, got {prompt!r}, {relation_phrase!r}")
    max_length = getattr(tokenizer, "model_max_length", 77)
    ids = tokenizer(prompt, truncation=True, max_length=max_length).input_ids  # [BOS, ..., EOS]

    def tokens(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False).input_ids)

    phrase = tokens(relation_phrase)
    at = _find(ids, phrase) if phrase else -1
    if at >= 0:
        return list(range(at, at + len(phrase)))
    out, cursor = [], 1
    for word in relation_phrase.split():
        word_ids = tokens(word)
        at = _find(ids, word_ids, cursor) if word_ids else -1
        if at < 0:
            raise ValueError(
                f"relation_phrase {relation_phrase!r}: word {word!r} is not among the first {max_length} tokens "
                f"of prompt {prompt!r}"
            )
        out.extend(range(at, at + len(word_ids)))
        cursor = at + len(word_ids)
    return out


# --------------------------------------------------------------------------------------------------------- total
def total_loss(
    denoise: torch.Tensor,
    kml: torch.Tensor | None,
    attention: torch.Tensor | None,
    config: LossConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 7, extended: ``L = L_denoise + kml_weight * L_KML + attention_weight * L_attn``.

    denoise, kml, attention: scalars (``kml`` / ``attention`` may be ``None`` when their weight is 0; a term of
    weight 0 is left out of the graph) -> (L, {"loss", "denoise", "kml", "attention"} as floats, unweighted parts;
    a term not computed reads 0.0).
    """
    if not isinstance(config, LossConfig):
        raise ValueError(f"config must be a LossConfig, got {type(config).__name__}")
    terms = {
        "denoise": (denoise, 1.0),
        "kml": (kml, config.kml_weight),
        "attention": (attention, config.attention_weight),
    }
    loss: torch.Tensor | None = None
    parts: dict[str, float] = {}
    for name, (value, weight) in terms.items():
        if value is None:
            if name == "denoise" or weight != 0:
                raise ValueError(f"{name} is None, but its weight is {weight}; pass the {name} loss")
            parts[name] = 0.0
            continue
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError(f"{name} must be a scalar tensor, got {_shape(value)}")
        parts[name] = float(value.detach())
        if weight != 0:
            term = value.reshape(()).float() * weight
            loss = term if loss is None else loss + term
    assert loss is not None  # denoise is always there
    parts = {"loss": float(loss.detach()), **parts}
    return loss, parts
