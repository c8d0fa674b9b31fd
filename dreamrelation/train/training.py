"""Relation-LoRA fine-tuning in one process (paper 3.4, section 4): only the LoRA learns the relation.

Everything but the relation LoRA is frozen (VAE, both text encoders, UNet, image encoder, Resampler,
``to_k_ip``/``to_v_ip``; checked before the first step). Per example: target latent ``z0 = E(x_k)``, a timestep and
noise, the UNet with text, image tokens and boxes predicts the noise; ``L = L_denoise + λ L_KML (+ μ L_attn)``
(eq. 5-7, weights, gate and augmentation from a profile, each overridable: ``resolve_train_config``). AdamW,
gradient accumulation to the batch size, a checkpoint every K steps and resume from the last one; the randomness
of step ``s`` is derived from ``(seed, s)``, so a resumed run follows exactly the path of an uninterrupted one.
Output: the LoRA in diffusers format plus ``card.json``, which records every knob (``TrainConfig`` filled in, the
loss weights, the KML reduction, the local encoder). Distribution (Ray) lives in ``cluster/train_job.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..model.attention import layout_masks
from ..model.config import TRAIN_PROFILES, LoRAConfig, TrainConfig
from ..model.lora import LORA_WEIGHTS_NAME, add_relation_lora, save_relation_lora
from ..provenance import local_encoder_record
from .data import TripletExample, augment
from .losses import (
    LossConfig,
    denoising_loss,
    keypoint_matching_loss,
    loss_config,
    predict_x0,
    relation_attention_loss,
    total_loss,
)

logger = logging.getLogger(__name__)

CARD_NAME = "card.json"
# How L_KML reduces its squared errors (losses.keypoint_matching_loss): the card says it, because eq. 6 read
# literally sums over the latent channels, which is 4x (SDXL's 4 channels) the mean at the same lambda.
KML_REDUCTION = ("mean over latent channels x keypoints x subjects (as the authors' public code); eq. 6 read "
                 "literally sums over the latent channels, i.e. 4x this value at the same kml_weight")


@dataclass(frozen=True)
class Profile:
    """What a training profile fixes unless overridden: the loss weights and KML gate, and augmentation."""

    losses: LossConfig
    augment: bool


PROFILES: dict[str, Profile] = {
    "paper": Profile(loss_config("paper"), augment=False),  # the public code's crop is a no-op on its 1024 px data
    "public-code": Profile(loss_config("public-code"), augment=True),
    "no-kml": Profile(replace(loss_config("paper"), kml_weight=0.0), augment=False),  # the paper's KML ablation
}
assert tuple(PROFILES) == TRAIN_PROFILES


def resolve_train_config(config: TrainConfig) -> TrainConfig:
    """``config`` with every knob its profile fills in made explicit (kml_weight, kml_t_max, attention_weight,
    augment): what a run actually uses, and what its card records. Idempotent."""
    profile = PROFILES[config.profile]
    losses = profile.losses
    return replace(
        config,
        kml_weight=float(losses.kml_weight if config.kml_weight is None else config.kml_weight),
        kml_t_max=losses.kml_t_max if config.kml_t_max is None else config.kml_t_max,
        attention_weight=float(losses.attention_weight if config.attention_weight is None
                               else config.attention_weight),
        augment=profile.augment if config.augment is None else config.augment,
    )


def train_losses(config: TrainConfig) -> LossConfig:
    """The :class:`LossConfig` of ``config``: its profile's, with the knobs it sets."""
    full = resolve_train_config(config)
    return LossConfig(kml_weight=full.kml_weight, kml_t_max=full.kml_t_max, attention_weight=full.attention_weight)


class TrainingInterrupted(RuntimeError):
    """Raised by a report callback to stop a run (tests use it to simulate a crash after a checkpoint)."""


@dataclass
class TrainResult:
    lora_path: Path
    card: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0


def data_hash(examples: Sequence[TripletExample]) -> str:
    """A short content hash of the training set (prompts, layouts, keypoints and image pixels)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(ex.prompt.encode())
        h.update(np.asarray(ex.boxes, dtype=np.float32).tobytes())
        h.update(np.asarray(ex.target_keypoints, dtype=np.float32).tobytes())
        for image in (ex.target, *ex.subject_images):
            h.update(image.convert("RGB").tobytes())
    return h.hexdigest()[:16]


def _pixels(image, size: int, device, dtype) -> torch.Tensor:
    """PIL -> (1, 3, size, size) in [-1, 1]."""
    arr = np.asarray(image.convert("RGB").resize((size, size)), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None].to(device=device, dtype=dtype)  # (H, W, 3) -> (1, 3, H, W)


def _freeze(pipe) -> None:
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.adapter):
        module.requires_grad_(False)


def check_only_lora_trains(unet_and_friends: Sequence[torch.nn.Module], relation: str) -> list[torch.nn.Parameter]:
    """The trainable parameters, after checking that every one of them belongs to the relation LoRA."""
    trainable = [(n, p) for m in unet_and_friends for n, p in m.named_parameters() if p.requires_grad]
    wrong = [n for n, _ in trainable if f".{relation}." not in n or ".lora_" not in n]
    if wrong or not trainable:
        raise RuntimeError(f"only the relation LoRA may train; also trainable: {wrong[:5]} (total {len(trainable)})")
    return [p for _, p in trainable]


class _Prepared:
    """Per-example frozen encodings that do not depend on augmentation (computed once)."""

    def __init__(self, pipe, ex: TripletExample, config: TrainConfig, device, dtype):
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt(ex.prompt, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
            self.prompt_embeds, self.pooled = embeds, pooled  # (1, 77, D), (1, D2)
            tokens = pipe.encode_subjects(ex.subject_images, use_local_tokens=config.use_local_tokens)
            self.subject_tokens = tokens[None].to(dtype)  # (1, S, T, W)
            self.phrase_embeds = pipe.encode_phrases(ex.phrases)[None].to(dtype)  # (1, S, 768)
            sub = torch.cat([_pixels(im, config.resolution, device, pipe.vae.dtype) for im in ex.subject_images])
            # KML targets: VAE latents of the subject (image-prompt) images (eq. 6, E(c_i))
            self.subject_latents = (pipe.vae.encode(sub).latent_dist.mean * pipe.vae.config.scaling_factor)[None]
        self.subject_keypoints = torch.as_tensor(np.asarray(ex.subject_keypoints), dtype=torch.float32,
                                                 device=device)[None]  # (1, S, 17, 2)


class RelationLossModel:
    """The frozen model and the relation LoRA being trained, with the per-example loss of eq. 5-7.

    Building it freezes every module, adds the LoRA (fp32 master weights) and checks that only the LoRA trains;
    it also sets the pipeline's local grid to ``config.local_grid`` and, with local tokens on, checks that the
    model has its distilled local encoder (or may do without: the tiny preset).
    """

    def __init__(self, pipe, examples: Sequence[TripletExample], config: TrainConfig, add_lora: bool = True):
        if not examples:
            raise ValueError("examples is empty: a relation needs at least one triplet")
        from diffusers import DDPMScheduler

        config = resolve_train_config(config)
        self.pipe, self.examples, self.config = pipe, list(examples), config
        self.losses = train_losses(config)
        self.device = pipe.unet.device
        encoder = pipe.adapter.encoder
        encoder.set_local_grid(config.local_grid)  # the local-grid ablation (paper Table 6)
        if config.use_local_tokens:
            encoder.check_local_encoder()  # a real model needs its distilled local encoder: fail before any work
        relation = config.relation
        _freeze(pipe)
        loaded = relation in (getattr(pipe.unet, "peft_config", {}) or {})
        if add_lora:
            if loaded:
                pipe.unet.delete_adapters(relation)
            with torch.random.fork_rng(devices=[]):  # the LoRA's initial weights depend on the seed only
                torch.manual_seed(config.seed)
                add_relation_lora(pipe.unet, relation, LoRAConfig(rank=config.rank))
        elif not loaded:
            raise ValueError(f"add_lora=False but relation {relation!r} has no LoRA on the UNet")
        pipe.unet.set_adapters([relation])
        pipe.unet.requires_grad_(False)
        for name, p in pipe.unet.named_parameters():
            if f".{relation}." in name and ".lora_" in name:
                p.requires_grad_(True)
        self.params = check_only_lora_trains(
            [pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.adapter], relation)
        for p in self.params:
            p.data = p.data.float()
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device)
        self.dtype = pipe.unet.dtype
        self.prepared = [_Prepared(pipe, ex, config, self.device, self.dtype) for ex in self.examples]
        size = config.resolution
        self.latent_hw = (size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
        self.time_ids = pipe._get_add_time_ids(
            (size, size), (0, 0), (size, size), dtype=self.dtype,
            text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim).to(self.device)
        cuda = self.device.type == "cuda"
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if (
            cuda and config.mixed_precision in ("auto", "bf16")) else nullcontext

    @torch.no_grad()
    def evaluate(self, draws: int = 16, seed: int = 12345) -> float:
        """Mean loss over ``draws`` fixed (example, augmentation, timestep, noise) draws: comparable across steps."""
        values = [float(self.example_loss(i % len(self.examples), np.random.default_rng([seed, i]))[0])
                  for i in range(draws)]
        return float(np.mean(values))

    def example_loss(self, index: int, rng: np.random.Generator,
                     timestep: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of example ``index`` under the draws of ``rng`` (augmentation, timestep, noise).

        Returns (total, {"denoise", "kml", "attention"} as tensors in the graph) so that each term's gradient can
        be inspected on its own.
        """
        pipe, config, device, dtype = self.pipe, self.config, self.device, self.dtype
        ex, prep = self.examples[index], self.prepared[index]
        size = config.resolution
        ex = augment(ex, size, rng) if config.augment else augment(ex, size, rng, flip_p=0.0, crop_scale=(1.0, 1.0))
        gen = torch.Generator("cpu").manual_seed(int(rng.integers(2**62)))
        with torch.no_grad():
            target = _pixels(ex.target, size, device, pipe.vae.dtype)
            z0 = pipe.vae.encode(target).latent_dist.sample(gen).to(device)
            z0 = (z0 * pipe.vae.config.scaling_factor).to(dtype)  # (1, 4, h, w)
            t = (torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (1,), generator=gen)
                 if timestep is None else torch.tensor([timestep])).to(device)
            noise = torch.randn(z0.shape, generator=gen).to(device=device, dtype=dtype)
            z_t = self.noise_scheduler.add_noise(z0, noise, t)
            boxes = torch.as_tensor(np.asarray(ex.boxes), dtype=dtype, device=device)[None]  # (1, S, 4)
            ip = pipe.adapter.image_tokens(prep.subject_tokens, prep.phrase_embeds, boxes)  # (1, 4 + 16S, D)
        attn_kwargs = {"ip_hidden_states": ip, "ip_boxes": boxes, "latent_hw": self.latent_hw,
                       "ip_scale": config.scale, "ip_masks": layout_masks(boxes, self.latent_hw, dtype)}
        added = {"text_embeds": prep.pooled, "time_ids": self.time_ids}
        capture = nullcontext(None)
        if self.losses.attention_weight > 0:
            from ..model.attention import capture_attention
            from .losses import relation_token_indices

            capture = capture_attention(pipe.unet, [relation_token_indices(pipe.tokenizer, ex.prompt,
                                                                           ex.relation_phrase)])
        with self.autocast(), capture as cap:
            eps = pipe.unet(z_t, t, encoder_hidden_states=prep.prompt_embeds, added_cond_kwargs=added,
                            cross_attention_kwargs=attn_kwargs, return_dict=False)[0].float()
        l_denoise = denoising_loss(eps, noise.float())
        z0_hat = predict_x0(z_t.float(), eps, self.alphas_cumprod, t)  # eq. 5
        target_kp = torch.as_tensor(np.asarray(ex.target_keypoints), dtype=torch.float32, device=device)[None]
        vis = (torch.as_tensor(np.asarray(ex.visibility), dtype=torch.float32, device=device)[None]
               if ex.visibility is not None else None)
        l_kml = keypoint_matching_loss(z0_hat, target_kp, prep.subject_latents.float(), prep.subject_keypoints, t,
                                       t_max=self.losses.kml_t_max, visibility=vis)  # eq. 6
        l_attn = torch.zeros((), device=device)
        if cap is not None and cap.maps:  # the public code's 32x32 layers at 1024 px: the coarsest grid
            grid = min(cap.grids, key=lambda g: g[0] * g[1])
            attn_map = torch.stack([m for m, g in zip(cap.maps, cap.grids) if g == grid]).mean(0)  # (1, h, w)
            l_attn = relation_attention_loss(attn_map.float(), _foreground(ex, grid, device))
        loss, _ = total_loss(l_denoise, l_kml, l_attn, self.losses)  # eq. 7
        return loss, {"denoise": l_denoise, "kml": l_kml, "attention": l_attn}


def train_relation_lora(pipe, examples: Sequence[TripletExample], config: TrainConfig, output_dir: str | Path,
                        callback: Callable[[int, dict[str, float]], None] | None = None,
                        base_model: str = "unknown", dataset_hash: str | None = None,
                        grad_sync: Callable[[list[torch.nn.Parameter]], None] | None = None,
                        save: bool = True) -> TrainResult:
    """Fine-tune the relation LoRA ``config.relation`` on ``examples``; resumes from ``output_dir/checkpoints``.

    ``callback(step, parts)`` is called after every optimizer step with the loss parts (``loss``, ``denoise``,
    ``kml``, ``attention``); it may raise :class:`TrainingInterrupted` to stop. ``grad_sync(params)`` runs before
    each optimizer step (data-parallel training averages the LoRA gradients there); ``save=False`` skips writing
    the final LoRA (the non-zero ranks of a DDP run).
    """
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    out = Path(output_dir)
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    relation = config.relation
    model = RelationLossModel(pipe, examples, config)
    optimizer = torch.optim.AdamW(model.params, lr=config.learning_rate, weight_decay=0.0)

    # resume from the last checkpoint: LoRA, optimizer, step, history
    start, history = 0, []
    last = sorted(ckpt_dir.glob("step-*.pt"))
    if last:
        state = torch.load(last[-1], map_location="cpu", weights_only=True)
        set_peft_model_state_dict(pipe.unet, state["lora"], adapter_name=relation)
        optimizer.load_state_dict(state["optimizer"])
        start, history = int(state["step"]), list(state["history"])
        logger.info("resuming %s from step %d (%s)", relation, start, last[-1].name)

    pipe.unet.train()
    t_start = time.perf_counter()
    for step in range(start, config.steps):
        rng = np.random.default_rng([config.seed, step])  # the draws of step s depend only on (seed, s)
        parts_acc: dict[str, float] = {}
        for _ in range(config.batch_size):  # batch by gradient accumulation
            loss, parts = model.example_loss(int(rng.integers(len(model.examples))), rng)
            (loss / config.batch_size).backward()
            for k, v in {"loss": loss, **parts}.items():
                parts_acc[k] = parts_acc.get(k, 0.0) + float(v.detach()) / config.batch_size
        if grad_sync is not None:
            grad_sync(model.params)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"step": step + 1, **parts_acc})
        done = step + 1
        if done % config.checkpoint_every == 0 or done == config.steps:
            torch.save({"step": done, "lora": get_peft_model_state_dict(pipe.unet, adapter_name=relation),
                        "optimizer": optimizer.state_dict(), "history": history},
                       ckpt_dir / f"step-{done:06d}.pt")
        if callback is not None:
            callback(done, parts_acc)

    # the LoRA in diffusers format, and its card
    pipe.unet.eval()
    lora_path = save_relation_lora(pipe.unet, relation, out) if save else out / LORA_WEIGHTS_NAME
    card = dict(relation=relation, base_model=base_model, profile=config.profile,
                loss_weights=model.losses.__dict__, kml_reduction=KML_REDUCTION,
                data_hash=dataset_hash or data_hash(examples),
                examples=len(examples), steps=config.steps, final_losses=history[-1] if history else {},
                config=model.config.to_dict(),
                local_encoder=local_encoder_record(pipe.adapter.encoder, model.config.use_local_tokens),
                seconds=round(time.perf_counter() - t_start, 2), file=LORA_WEIGHTS_NAME)
    if save:
        (out / CARD_NAME).write_text(json.dumps(card, indent=2))
    return TrainResult(lora_path=lora_path, card=card, history=history, resumed_from=start)


def _foreground(ex: TripletExample, hw, device) -> torch.Tensor:
    """Union of the subjects' target masks (boxes where a mask is missing) at (h, w): (1, h, w) in {0, 1}."""
    h, w = int(hw[0]), int(hw[1])
    fg = np.zeros((h, w), dtype=np.float32)
    for j, box in enumerate(ex.boxes):
        mask = ex.target_masks[j] if ex.target_masks else None
        if mask is not None:
            from PIL import Image

            m = np.asarray(Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255).resize((w, h))) > 127
            fg = np.maximum(fg, m.astype(np.float32))
        else:
            x0, y0, x1, y1 = box
            fg[int(y0 * h):max(int(y0 * h) + 1, int(np.ceil(y1 * h))),
               int(x0 * w):max(int(x0 * w) + 1, int(np.ceil(x1 * w)))] = 1.0
    return torch.from_numpy(fg)[None].to(device)
