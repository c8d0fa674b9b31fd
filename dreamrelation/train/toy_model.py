"""The toy preset: an SDXL-shaped model trained on the toy world (``dreamrelation.toy.world``) on a CPU.

Same classes and formats as the tiny preset (a diffusers SDXL folder, ``adapter/`` in MS-Diffusion's key layout,
``metrics/``), but trained, so that its images show the world's subjects and the oracle can measure them:

1. ``vae``: an ``AutoencoderKL`` with x4 downsampling (64 px images, 16 x 16 x 4 latents) trained to reconstruct
   renders; its ``scaling_factor`` is set to 1 / the latents' standard deviation, as SDXL's was.
2. ``base``: the UNet and both text encoders trained together as a text-to-image model on captions of every
   relation but the held-out one (``ToySettings.held_out``), with the caption dropped (zero embeddings, what the
   SDXL pipeline feeds when no negative prompt is given), the empty prompt or the default negative prompt 10% of
   the time, so that classifier-free guidance works with whichever negative a user gives.

Every stage saves a checkpoint (weights, optimizer, step) every ``checkpoint_every`` steps and resumes from it; a
resumed run with other settings than its checkpoints' refuses and names them (only the step counts may grow).
``train_toy`` writes the model folder (``{output}/model``), ``{output}/checkpoints/`` and ``{output}/card.json``
(data, steps, seeds, time, machine and the oracle's measurements of the result).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..model.config import SamplingConfig
from ..model.tiny import TEXT_WIDTH, build_tiny_components, text_config
from ..toy import world

logger = logging.getLogger(__name__)

TOY_SIZE = world.SIZE  # 64 px
CHECKPOINTS = "checkpoints"
CARD = "card.json"
MODEL = "model"
STAGES = ("vae", "base", "adapter", "clip")
UPSTREAM = {"vae": (), "base": ("vae",), "adapter": ("vae", "base"), "clip": ()}  # what each stage is trained on
UNCONDITIONAL_PROMPTS = ("", SamplingConfig().negative_prompt)  # plus zeros: what the SDXL pipeline's CFG feeds
Progress = Callable[[str, int, int, dict[str, float]], None]  # (stage, step, total, figures)


@dataclass(frozen=True)
class ToySettings:
    """What a toy model is trained from. Step counts may grow on resume; anything else must match."""

    seed: int = 0
    scenes: int = 6000  # rendered training scenes (relations other than held_out, drawn uniformly)
    held_out: str = "on_top_of"  # the relation the base model never sees (the paper in miniature's LoRA learns it)
    vae_steps: int = 2500
    vae_batch: int = 16
    vae_lr: float = 1e-3
    base_steps: int = 2000
    base_batch: int = 32
    base_lr: float = 1e-3
    caption_dropout: float = 0.1
    adapter_steps: int = 1000
    adapter_batch: int = 16
    adapter_lr: float = 5e-4
    clip_steps: int = 400
    clip_batch: int = 64
    clip_lr: float = 1e-3
    checkpoint_every: int = 100
    eval_cases: int = 64  # oracle-judged samples per relation group in the card

    def __post_init__(self) -> None:
        world.relation(self.held_out)
        for name in ("scenes", "checkpoint_every", *(f"{st}_{k}" for st in STAGES for k in ("steps", "batch"))):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout!r}")

    def steps(self, stage: str) -> int:
        return getattr(self, f"{stage}_steps")

    def fixed(self, stage: str) -> dict[str, Any]:
        """The settings a resumed ``stage`` must keep: the data's, its own (not its step count) and everything of
        the stages it builds on (a base model trained on another VAE's latents is not resumed on these)."""
        upstream = UPSTREAM[stage]
        own = (f"{stage}_batch", f"{stage}_lr", *(("caption_dropout",) if stage == "base" else ()),
               *(f"{up}_{k}" for up in upstream for k in ("steps", "batch", "lr")),
               *(("caption_dropout",) if "base" in upstream else ()))
        return {k: v for k, v in asdict(self).items() if k in ("seed", "scenes", "held_out", *own)}


class SettingsChanged(ValueError):
    """A resumed toy training run was given other settings than its checkpoints were made with."""


# ------------------------------------------------------------------------------------------------------ components

def world_words() -> list[str]:
    """Every word of the world's captions and subject phrases, lower case, without punctuation."""
    words = set()
    for r in world.RELATIONS:
        words.update(r.text.replace("{}", " ").replace(",", " ").replace(".", " ").lower().split())
    for name in (*world.SHAPES, *world.PATTERNS, *world.COLOURS, "a"):
        words.add(name)
    return sorted(words)


def build_toy_tokenizer():
    """A real CLIP BPE tokenizer whose merges spell each world word as one token (``"striped</w>"``); any other
    text falls back to the byte-level characters of the tiny tokenizer."""
    from transformers import CLIPTokenizer

    from ..model.tiny import _bytes_to_unicode

    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    ranks: dict[tuple[str, str], int] = {}
    for word in world_words():
        pieces = _bpe([*word[:-1], word[-1] + "</w>"], ranks)
        while len(pieces) > 1:  # merge what the merges so far leave, left to right, until the word is one token
            ranks[(pieces[0], pieces[1])] = len(ranks)
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = _bpe(pieces, ranks)
    merges = [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # CLIPTokenizer reads its merges from a file
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77)


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair merging as CLIP's tokenizer does it: always the adjacent pair of lowest rank first."""
    pieces = list(pieces)
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        best = min((r for r, _ in pairs if r is not None), default=None)
        if best is None:
            return pieces
        i = next(i for r, i in pairs if r == best)
        pieces = [*pieces[:i], pieces[i] + pieces[i + 1], *pieces[i + 2:]]
    return pieces


def toy_unet_config() -> dict:
    """The tiny UNet's shape, with cross-attention at both levels (where a subject goes is read from the text) and
    16 x 16 latents (64 px images through the x4 VAE)."""
    return dict(
        sample_size=TOY_SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=1, projection_class_embeddings_input_dim=6 * 8 + TEXT_WIDTH,
        cross_attention_dim=2 * TEXT_WIDTH, norm_num_groups=8,
    )


def toy_vae_config() -> dict:
    """Three levels (x4 downsampling), no attention in the middle block: cheap at 64 px."""
    return dict(
        block_out_channels=(16, 32, 64), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8,
        sample_size=TOY_SIZE, mid_block_add_attention=False,
    )


def build_toy_components(seed: int = 0) -> dict:
    """The untrained toy model: the tiny preset's components with the toy tokenizer, text encoders sized to its
    vocabulary, the toy UNet and the toy VAE (deterministic for ``seed``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    components = build_tiny_components(seed)
    torch.manual_seed(seed)
    tokenizer = build_toy_tokenizer()
    components.update(
        tokenizer=tokenizer, tokenizer_2=tokenizer,
        text_encoder=CLIPTextModel(text_config(tokenizer)),
        text_encoder_2=CLIPTextModelWithProjection(text_config(tokenizer)),
        unet=UNet2DConditionModel(**toy_unet_config()), vae=AutoencoderKL(**toy_vae_config()),
    )
    return components


# ------------------------------------------------------------------------------------------------------------ data

def training_relations(held_out: str) -> list[str]:
    return [r.id for r in world.RELATIONS if r.id != held_out]


IDENTITIES: tuple[world.Identity, ...] = tuple(
    world.Identity(shape, colour, pattern) for shape in world.SHAPES for colour in world.COLOURS
    for pattern in world.PATTERNS)  # the 60 identities, in a fixed order (their index is their id in training)


@dataclass
class Scenes:
    """Rendered training scenes: (N, 64, 64, 3) uint8 images, captions, relation ids, per scene the subjects'
    ``IDENTITIES`` indices and their (S, 4) normalized boxes."""

    images: np.ndarray
    captions: list[str]
    relations: list[str]
    subjects: list[tuple[int, ...]]
    boxes: list[np.ndarray]


def render_scenes(settings: ToySettings) -> Scenes:
    """Scene ``i`` is ``random_scene(seed * 10**6 + i)`` over the training relations (the held-out one never)."""
    relations = training_relations(settings.held_out)
    index = {ident: k for k, ident in enumerate(IDENTITIES)}
    images = np.empty((settings.scenes, TOY_SIZE, TOY_SIZE, 3), np.uint8)
    out = Scenes(images, [], [], [], [])
    for i in range(settings.scenes):
        r = world.random_scene(settings.seed * 10**6 + i, TOY_SIZE, relations)
        images[i] = np.asarray(r.image)
        out.captions.append(r.caption)
        out.relations.append(r.layout.relation)
        out.subjects.append(tuple(index[ident] for ident in r.identities))
        out.boxes.append(np.asarray(r.boxes, np.float32))
    return out


def _to_pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------------- checkpoints

def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, settings: ToySettings) -> dict | None:
    """The stage checkpoint at ``path`` (None: none yet), after checking that ``settings`` may resume it."""
    if not path.is_file():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    problem = _resume_problem(path, ckpt, settings)
    if problem:
        raise SettingsChanged(problem)
    return ckpt


def _resume_problem(path: Path, ckpt: dict, settings: ToySettings) -> str | None:
    stage = path.stem
    changed = {k: (ckpt["settings"].get(k), v) for k, v in settings.fixed(stage).items()
               if ckpt["settings"].get(k) != v}
    if changed:
        return (f"{path} was trained with other settings: " + "; ".join(
            f"{k}={old!r} there, {new!r} now" for k, (old, new) in sorted(changed.items()))
            + "; pass the same settings, or a new OUTPUT")
    if ckpt["step"] > settings.steps(stage):
        return (f"{path} is at step {ckpt['step']}, beyond {stage}_steps={settings.steps(stage)}; pass at least "
                f"{ckpt['step']}, or a new OUTPUT")
    return None


def check_resume(folder: Path, settings: ToySettings) -> None:
    """Every stage checkpoint under ``folder`` may be resumed with ``settings``, checked before any stage trains
    (growing the VAE's steps under a trained base model is refused at once, not after the VAE trained on)."""
    problems = []
    for stage in STAGES:
        path = folder / f"{stage}.pt"
        if path.is_file():
            problem = _resume_problem(path, torch.load(path, map_location="cpu", weights_only=False), settings)
            if problem:
                problems.append(problem)
    if problems:
        raise SettingsChanged(" | ".join(problems))


def _lr(step: int, total: int, peak: float, warmup: int = 50) -> float:
    """Linear warm-up, then constant, then a linear decay over the last fifth."""
    if step < warmup:
        return peak * (step + 1) / warmup
    tail = max(1, total // 5)
    return peak * min(1.0, max(0.05, (total - step) / tail))


def _train_loop(stage: str, modules: dict[str, torch.nn.Module], loss_fn: Callable[[np.random.Generator], torch.Tensor],
                settings: ToySettings, lr: float, folder: Path, progress: Progress | None) -> dict[str, float]:
    """Run ``stage`` to ``settings.steps(stage)`` from its checkpoint, if any. Returns figures for the card."""
    total = settings.steps(stage)
    path = folder / f"{stage}.pt"
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ckpt = _load_checkpoint(path, settings)
    step, seconds, losses = 0, 0.0, []
    if ckpt is not None:
        for name, m in modules.items():
            m.load_state_dict(ckpt["modules"][name])
        opt.load_state_dict(ckpt["optimizer"])
        step, seconds, losses = ckpt["step"], ckpt["seconds"], ckpt["losses"]
    rng = np.random.default_rng([settings.seed, STAGES.index(stage), step])
    for m in modules.values():
        m.train()
    t0 = time.perf_counter()
    window: list[float] = []

    def save() -> None:
        _atomic_save(dict(settings=settings.fixed(stage), step=step, seconds=seconds + time.perf_counter() - t0,
                          losses=losses, modules={n: m.state_dict() for n, m in modules.items()},
                          optimizer=opt.state_dict()), path)

    while step < total:
        for group in opt.param_groups:
            group["lr"] = _lr(step, total, lr)
        loss = loss_fn(rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        value = float(loss.detach())
        window.append(value)
        if step % 25 == 0 or step == total:
            losses.append([step, float(np.mean(window))])
            window = []
        if progress is not None:
            progress(stage, step, total, {"loss": value})
        if step % settings.checkpoint_every == 0 or step == total:
            save()
            if step != total:  # a new rng stream from the checkpointed step: a resume draws the same batches
                rng = np.random.default_rng([settings.seed, STAGES.index(stage), step])
    for m in modules.values():
        m.eval()
    if ckpt is not None and ckpt["step"] == total:
        seconds = ckpt["seconds"]
    else:
        seconds += time.perf_counter() - t0
    return dict(steps=total, seconds=round(seconds, 1), final_loss=round(losses[-1][1], 5) if losses else None,
                loss_curve=losses)


# --------------------------------------------------------------------------------------------------------- stages

def train_vae(vae, images: np.ndarray, settings: ToySettings, folder: Path, progress: Progress | None) -> dict:
    """Reconstruction (MSE + L1, and L1 between the images' finite differences, which keeps the 2 px stripes and
    dots of the patterns) with a small KL term; then ``scaling_factor`` = 1 / std of the latent means."""
    def loss_fn(rng: np.random.Generator) -> torch.Tensor:
        x = _to_pixels(images[rng.integers(0, len(images), settings.vae_batch)])
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.from_numpy(rng.standard_normal(post.mean.shape).astype(np.float32))
        rec = vae.decode(z).sample
        kl = post.kl().mean() / z[0].numel()
        edges = (F.l1_loss(rec.diff(dim=-1), x.diff(dim=-1)) + F.l1_loss(rec.diff(dim=-2), x.diff(dim=-2)))
        return F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 0.5 * edges + 1e-4 * kl

    figures = _train_loop("vae", {"vae": vae}, loss_fn, settings, settings.vae_lr, folder, progress)
    with torch.no_grad():
        sample = _to_pixels(images[:512])
        means = torch.cat([vae.encode(sample[i:i + 64]).latent_dist.mean for i in range(0, len(sample), 64)])
        vae.register_to_config(scaling_factor=float(1.0 / means.std()))
        rec = torch.cat([vae.decode(means[i:i + 64]).sample for i in range(0, len(means), 64)])
        figures["reconstruction_mae_0_255"] = round(float((rec.clamp(-1, 1) - sample).abs().mean() * 127.5), 3)
    figures["scaling_factor"] = round(vae.config.scaling_factor, 6)
    return figures


def encode_prompts(pipe, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 77, 2W) prompt embeddings and (B, W) pooled ones, exactly as the SDXL pipeline makes them (in the graph:
    the text encoders train with the UNet)."""
    embeds, _, pooled, _ = pipe.encode_prompt(captions, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    return embeds, pooled


def train_base(pipe, latents: torch.Tensor, captions: list[str], settings: ToySettings, folder: Path,
               progress: Progress | None) -> dict:
    """Text-to-image: noise prediction on the VAE latents of the renders, UNet and both text encoders trained."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    time_ids = pipe._get_add_time_ids((TOY_SIZE, TOY_SIZE), (0, 0), (TOY_SIZE, TOY_SIZE), dtype=torch.float32,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    for m in modules.values():
        m.requires_grad_(True)

    def loss_fn(rng: np.random.Generator) -> torch.Tensor:
        idx = rng.integers(0, len(latents), settings.base_batch)
        z0 = latents[idx]
        noise = torch.from_numpy(rng.standard_normal(z0.shape).astype(np.float32))
        t = torch.from_numpy(rng.integers(0, scheduler.config.num_train_timesteps, len(idx)))
        z_t = scheduler.add_noise(z0, noise, t)
        # a dropped caption becomes what sampling feeds the unconditional branch: zeros (no negative prompt),
        # the empty prompt or the default negative prompt, a third each
        drop = rng.random(len(idx)) < settings.caption_dropout
        kind = rng.integers(0, 3, len(idx))
        texts = [("", *UNCONDITIONAL_PROMPTS)[k] if d else captions[i] for i, d, k in zip(idx, drop, kind)]
        embeds, pooled = encode_prompts(pipe, texts)
        keep = torch.from_numpy(~(drop & (kind == 0))).float()
        embeds, pooled = embeds * keep[:, None, None], pooled * keep[:, None]
        eps = pipe.unet(z_t, t, encoder_hidden_states=embeds,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.repeat(len(idx), 1)}).sample
        return F.mse_loss(eps, noise)

    return _train_loop("base", modules, loss_fn, settings, settings.base_lr, folder, progress)


def _subject_inputs(pipe) -> dict[str, torch.Tensor]:
    """Per identity (``IDENTITIES`` order): its portrait preprocessed for the global and the local tokens, and its
    phrase's pooled embedding (the frozen first text encoder, as ``encode_phrases``)."""
    encoder = pipe.adapter.encoder
    portraits = [world.portrait(ident, TOY_SIZE)[0] for ident in IDENTITIES]
    with torch.no_grad():
        phrases = pipe.encode_phrases([ident.phrase for ident in IDENTITIES])
    return dict(global_px=encoder.preprocess(portraits, encoder.config.image_size),
                local_px=encoder.preprocess(portraits, encoder.config.local_image_size), phrases=phrases)


def train_adapter(pipe, scenes: Scenes, latents: torch.Tensor, settings: ToySettings, folder: Path,
                  progress: Progress | None) -> dict:
    """MS-Diffusion's recipe at toy size: the grounding resampler, the dummy tokens, every layer's
    ``to_k_ip`` / ``to_v_ip`` and the image encoder learn to put each subject's identity in its box; the UNet, the
    VAE and the text encoders are frozen. Each step draws scenes with one number of subjects (the image tokens of
    a batch have one length). Local tokens are on (the adapter's default) half of the time, so that the model
    works with and without them."""
    from diffusers import DDPMScheduler

    from ..model.attention import layout_masks

    adapter, encoder = pipe.adapter, pipe.adapter.encoder
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    inputs = _subject_inputs(pipe)
    with torch.no_grad():  # the frozen text encoders: every caption once
        embeds, pooled = zip(*(encode_prompts(pipe, scenes.captions[i:i + 256])
                               for i in range(0, len(scenes.captions), 256)))
        embeds, pooled = torch.cat(embeds), torch.cat(pooled)
    time_ids = pipe._get_add_time_ids((TOY_SIZE, TOY_SIZE), (0, 0), (TOY_SIZE, TOY_SIZE), dtype=torch.float32,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    by_arity: dict[int, np.ndarray] = {}
    for i, subs in enumerate(scenes.subjects):
        by_arity.setdefault(len(subs), []).append(i)
    arities = sorted(by_arity)
    weights = np.array([len(by_arity[a]) for a in arities], float)
    by_arity = {a: np.asarray(v) for a, v in by_arity.items()}
    latent_hw = (TOY_SIZE // pipe.vae_scale_factor,) * 2
    for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        m.requires_grad_(False)
    modules = {"adapter": adapter}  # the image encoder is in it (adapter.encoder)
    adapter.requires_grad_(True)

    def loss_fn(rng: np.random.Generator) -> torch.Tensor:
        arity = arities[rng.choice(len(arities), p=weights / weights.sum())]
        idx = rng.choice(by_arity[arity], settings.adapter_batch)
        b = len(idx)
        z0 = latents[idx]
        noise = torch.from_numpy(rng.standard_normal(z0.shape).astype(np.float32))
        t = torch.from_numpy(rng.integers(0, scheduler.config.num_train_timesteps, b))
        z_t = scheduler.add_noise(z0, noise, t)
        ids = torch.as_tensor(np.asarray([scenes.subjects[i] for i in idx])).reshape(-1)  # (B*S,)
        tokens = encoder.global_tokens(inputs["global_px"][ids])  # (B*S, 1 + P, W)
        if rng.random() < 0.5:
            tokens = torch.cat([tokens, encoder.local_tokens(inputs["local_px"][ids])], dim=1)
        tokens = tokens.view(b, arity, *tokens.shape[1:])
        boxes = torch.as_tensor(np.stack([scenes.boxes[i] for i in idx]))  # (B, S, 4)
        ip = adapter.image_tokens(tokens, inputs["phrases"][ids].view(b, arity, -1), boxes)
        attn = {"ip_hidden_states": ip, "ip_boxes": boxes, "latent_hw": latent_hw,
                "ip_scale": torch.full((b,), float(adapter.config.scale)),
                "ip_masks": layout_masks(boxes, latent_hw, torch.float32)}
        eps = pipe.unet(z_t, t, encoder_hidden_states=embeds[idx], cross_attention_kwargs=attn,
                        added_cond_kwargs={"text_embeds": pooled[idx], "time_ids": time_ids.repeat(b, 1)}).sample
        return F.mse_loss(eps, noise)

    figures = _train_loop("adapter", modules, loss_fn, settings, settings.adapter_lr, folder, progress)
    for m in modules.values():
        m.requires_grad_(False)
    return figures


def build_toy_clip(seed: int = 0):
    """The tiny metric CLIP (``dreamrelation.metrics``) with the toy tokenizer and 64 px images (a stripe is 2 px
    there): what ``train_clip`` trains."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    tokenizer = build_toy_tokenizer()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=TOY_SIZE, patch_size=8)
    torch.manual_seed(seed)
    clip = CLIPModel(CLIPConfig(text_config=text_config(tokenizer).to_dict(), vision_config=vision.to_dict(),
                                projection_dim=16))
    return clip, tokenizer


def train_clip(clip, tokenizer, scenes: Scenes, settings: ToySettings, folder: Path,
               progress: Progress | None) -> dict:
    """Contrastive (CLIP) training on the renders with their captions, half of the texts the bare relation phrase
    (what CLIP-R scores) and, on portraits, the subject's phrase (what CLIP-I compares): CLIP-T, CLIP-R and CLIP-I
    then measure something in the toy world."""
    from ..metrics import _clip_preprocess

    size = clip.config.vision_config.image_size
    pre = _clip_preprocess(size)
    phrases = {r.id: r.phrase for r in world.RELATIONS}
    with torch.no_grad():
        pixels = torch.cat([pre(list(map(_pil, scenes.images[i:i + 256])))
                            for i in range(0, len(scenes.images), 256)])
        portraits = pre([world.portrait(ident, TOY_SIZE)[0] for ident in IDENTITIES])
    clip.requires_grad_(True)

    def loss_fn(rng: np.random.Generator) -> torch.Tensor:
        n = min(settings.clip_batch, len(scenes.images))
        idx = rng.choice(len(scenes.images), n, replace=False)
        phrase = rng.random(n) < 0.5
        texts = [phrases[scenes.relations[i]] if p else scenes.captions[i] for i, p in zip(idx, phrase)]
        # a batch never holds two equal texts (their pairs would be false negatives)
        keep = [k for k, t in enumerate(texts) if texts.index(t) == k]
        who = rng.choice(len(IDENTITIES), 16, replace=False)
        images = torch.cat([pixels[idx[keep]], portraits[who]])
        texts = [texts[k] for k in keep] + [IDENTITIES[w].phrase for w in who]
        ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out = clip(input_ids=ids, pixel_values=images, return_loss=True)
        return out.loss

    figures = _train_loop("clip", {"clip": clip}, loss_fn, settings, settings.clip_lr, folder, progress)
    clip.requires_grad_(False)
    clip.eval()
    return figures


def _pil(array: np.ndarray):
    from PIL import Image

    return Image.fromarray(array, "RGB")


# ------------------------------------------------------------------------------------------------------ measuring

def measure(pipe, relations: list[str], cases: int, seed: int, adapter: bool, steps: int = 25,
            guidance: float = 5.0, relation: str | None = None,
            use_local_tokens: bool | None = None) -> dict[str, Any]:
    """Generate ``cases`` scenes of ``relations`` (drawn from ``seed``; their captions, and with ``adapter`` their
    subjects' portraits, phrases and boxes, and local tokens per ``use_local_tokens``, None: the adapter's default;
    with ``relation``, that relation LoRA) and judge each image with the
    oracle: the share with every subject's identity right, with the relation holding, and both, each with its 95%
    Wilson interval. ``pipe``: a ``DreamRelationPipeline``."""
    from ..toy import oracle

    scenes = [world.random_scene(seed * 7919 + i, TOY_SIZE, relations) for i in range(cases)]
    by_arity: dict[int, list[int]] = {}  # rows of one call share their number of subjects
    for i, sc in enumerate(scenes):
        by_arity.setdefault(len(sc.identities), []).append(i)
    verdicts = []
    for members in by_arity.values():
        for start in range(0, len(members), 32):
            rows = members[start:start + 32]
            chunk, seeds = [scenes[i] for i in rows], [seed * 7919 + i for i in rows]
            if adapter:
                images = pipe([s.caption for s in chunk],
                              [[world.portrait(i, TOY_SIZE)[0] for i in s.identities] for s in chunk],
                              [[i.phrase for i in s.identities] for s in chunk], [s.boxes.tolist() for s in chunk],
                              seed=seeds, num_inference_steps=steps, guidance_scale=guidance, height=TOY_SIZE,
                              width=TOY_SIZE, relation=relation, use_local_tokens=use_local_tokens,
                              progress=False).images
            else:
                images = pipe.text_to_image([s.caption for s in chunk], seeds, height=TOY_SIZE, width=TOY_SIZE,
                                            steps=steps, guidance=guidance)
            verdicts += [oracle.judge(im, s.identities, s.layout.relation) for im, s in zip(images, chunk)]
    return dict(oracle.rates(verdicts), relations=relations, adapter=adapter, steps=steps, guidance=guidance)


def oracle_figures(pipe, held_out: str, cases: int) -> dict[str, Any]:
    """The card's ``oracle`` entry: ``measure`` of the caption alone (``base``) and of caption + subject images +
    boxes (``adapter``), each on ``cases`` scenes of the trained relations (seed 1) and of the held-out one (seed
    2)."""
    seen, held = training_relations(held_out), [held_out]
    return dict(base_seen=measure(pipe, seen, cases, seed=1, adapter=False),
                base_held_out=measure(pipe, held, cases, seed=2, adapter=False),
                adapter_seen=measure(pipe, seen, cases, seed=1, adapter=True),
                adapter_held_out=measure(pipe, held, cases, seed=2, adapter=True))


# ----------------------------------------------------------------------------------------------------------- main

@dataclass
class ToyResult:
    model: Path
    card: dict[str, Any] = field(default_factory=dict)


def _machine() -> dict[str, Any]:
    return dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                cpus=os.cpu_count(), torch=torch.__version__, threads=torch.get_num_threads())


def train_toy(output: str | Path, settings: ToySettings = ToySettings(), progress: Progress | None = None,
              measure_cases: int | None = None) -> ToyResult:
    """Train (or resume) every stage under ``output``; write ``output/model`` (the preset folder, with its
    ``card.json``) and ``output/card.json``. ``measure_cases`` (default ``settings.eval_cases``; 0: none): oracle-
    judged samples per measurement in the card, made with the saved folder loaded the way every preset is."""
    from diffusers import StableDiffusionXLPipeline

    from ..metrics import METRICS_SUBDIR, _clip_preprocess, _dino_preprocess, build_tiny_metric_components
    from ..model.adapter import ImagePromptAdapter
    from ..model.encoders import SubjectEncoder
    from ..model.pipeline import DreamRelationPipeline
    from ..model.presets import load_pipeline
    from ..model.tiny import TINY_ADAPTER

    output = Path(output).resolve()
    folder = output / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    check_resume(folder, settings)
    model = output / MODEL
    t0 = time.perf_counter()
    components = build_toy_components(settings.seed)
    scenes = render_scenes(settings)
    render_seconds = time.perf_counter() - t0
    stages: dict[str, Any] = {}

    vae = components["vae"]
    stages["vae"] = train_vae(vae, scenes.images, settings, folder, progress)
    vae.requires_grad_(False)
    with torch.no_grad():
        pixels = _to_pixels(scenes.images)
        latents = torch.cat([vae.encode(pixels[i:i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)])
        latents = latents * vae.config.scaling_factor

    pipe = StableDiffusionXLPipeline(**components, add_watermarker=False)
    stages["base"] = train_base(pipe, latents, scenes.captions, settings, folder, progress)
    for m in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        m.requires_grad_(False)
    pipe.save_pretrained(model, safe_serialization=True)  # before the adapter puts its processors in the UNet

    image_encoder = components.pop("image_encoder")
    torch.manual_seed(settings.seed + 1)
    adapter = ImagePromptAdapter(TINY_ADAPTER, pipe.unet,
                                 SubjectEncoder(image_encoder, TINY_ADAPTER.encoder, require_local_model=False))
    dr = DreamRelationPipeline(**{k: v for k, v in components.items() if k != "feature_extractor"}, adapter=adapter)
    stages["adapter"] = train_adapter(dr, scenes, latents, settings, folder, progress)
    adapter.save_pretrained(model / "adapter")
    image_encoder.save_pretrained(model / "image_encoder", safe_serialization=True)

    clip, tokenizer = build_toy_clip(settings.seed)
    stages["clip"] = train_clip(clip, tokenizer, scenes, settings, folder, progress)
    metrics = model / METRICS_SUBDIR
    clip.save_pretrained(metrics / "clip")
    tokenizer.save_pretrained(metrics / "clip")
    _clip_preprocess(TOY_SIZE).save(metrics / "clip")
    dino = build_tiny_metric_components(settings.seed)["dino"]
    dino.save_pretrained(metrics / "dino")
    _dino_preprocess(dino.config.image_size).save(metrics / "dino")

    card: dict[str, Any] = dict(
        preset="toy", settings=asdict(settings),
        data=dict(world="dreamrelation.toy.world", size=TOY_SIZE, scenes=settings.scenes,
                  relations=training_relations(settings.held_out), held_out=settings.held_out,
                  scene_seeds=f"random_scene({settings.seed} * 10**6 + i), i < {settings.scenes}",
                  render_seconds=round(render_seconds, 1)),
        stages=stages,
        trained=dict(vae="vae", base="unet, text_encoder, text_encoder_2",
                     adapter="adapter (resampler, dummy tokens, to_k_ip/to_v_ip), image_encoder",
                     clip="metrics/clip"),
        untrained=dict(dino="metrics/dino: the tiny preset's random DINO (DINO scores mean nothing here)"),
        machine=_machine(),
        size_bytes=sum(p.stat().st_size for p in model.rglob("*") if p.is_file()),
        command="dreamrelation models train-toy OUTPUT" + "".join(
            f" --{k.replace('_', '-')} {v}" for k, v in asdict(settings).items() if v != getattr(ToySettings(), k)),
    )
    cases = settings.eval_cases if measure_cases is None else measure_cases
    if cases:
        card["oracle"] = oracle_figures(load_pipeline(str(model)), settings.held_out, cases)
    card["seconds"] = round(sum(st["seconds"] for st in stages.values()), 1)
    text = json.dumps(card, indent=2) + "\n"
    (output / CARD).write_text(text)
    (model / CARD).write_text(text)
    return ToyResult(model=model, card=card)
