"""DreamRelationPipeline: SDXL + the MS-Diffusion image-prompt adapter + an optional relation LoRA.

One ``__call__`` in numbered steps. Several rows that share a relation and a subject count denoise together in one
batch; each row has its own seed (its own generator), so a row's image does not depend on its batch-mates.
The pipeline subclasses diffusers' ``StableDiffusionXLPipeline`` to reuse its prompt encoding, scheduler handling,
VAE decoding and LoRA loaders (``load_lora_weights``, ``set_adapters``, ``delete_adapters``, hotswap).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import BaseOutput

from .adapter import ImagePromptAdapter
from .attention import layout_masks
from .config import SamplingConfig
from .layout import check_box

logger = logging.getLogger(__name__)

Box = Sequence[float]
DEFAULTS = SamplingConfig()


@dataclass
class DreamRelationOutput(BaseOutput):
    """``images``: one PIL image per row (or a (B, H, W, 3) float array with ``output_type="np"``)."""

    images: list[PIL.Image.Image] | np.ndarray


@dataclass(frozen=True)
class Rows:
    """Inputs normalised to one entry per row (B rows, N subjects each)."""

    prompts: list[str]
    images: list[list[PIL.Image.Image]] | None
    phrases: list[list[str]]
    boxes: list[list[list[float]]]
    seeds: list[int]
    negative_prompts: list[str]
    scales: list[float]


def _per_row(value: Any, batch: int, name: str) -> list:
    """A scalar (or None) becomes ``batch`` copies; a list must have one entry per row."""
    if isinstance(value, (list, tuple)):
        if len(value) != batch:
            raise ValueError(f"{name} has {len(value)} entries but there are {batch} prompts: {value!r}")
        return list(value)
    return [value] * batch


def _check_sampling(height: int, width: int, num_inference_steps: int, guidance_scale: float) -> None:
    """The sampling settings every call shares; ``ValueError`` naming the field and the bad value."""
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or v <= 0 or v % 8:
            raise ValueError(f"{name} must be a positive integer divisible by 8, got {v!r}")
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")


def _check_seed(seed: Any, name: str) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"{name} must be an integer in [0, 2**63), got {seed!r}")


class DreamRelationPipeline(StableDiffusionXLPipeline):
    """Relation-aware customized generation (DreamRelation, paper section 3.4) on SDXL.

    Components are those of ``StableDiffusionXLPipeline`` plus ``adapter`` (an :class:`ImagePromptAdapter`
    already installed on ``unet``, holding the subject encoder).
    """

    _optional_components = ["image_encoder", "feature_extractor", "adapter"]

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler,
                 adapter: ImagePromptAdapter | None = None, image_encoder=None, feature_extractor=None,
                 force_zeros_for_empty_prompt: bool = True, add_watermarker: bool | None = False):
        super().__init__(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler,
                         image_encoder=image_encoder, feature_extractor=feature_extractor,
                         force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=add_watermarker)
        self.register_modules(adapter=adapter)

    # ---- relation LoRAs -----------------------------------------------------------------------------------
    def loaded_relations(self) -> list[str]:
        return sorted(getattr(self.unet, "peft_config", {}) or {})

    def load_relation_lora(self, relation: str, lora: str | dict[str, torch.Tensor], hotswap: bool = False) -> None:
        """Load a diffusers-format relation LoRA (a file path or a state dict) under the adapter name ``relation``.

        With ``hotswap=True`` the weights replace those of the already loaded adapter ``relation`` in place
        (after ``enable_lora_hotswap``), which avoids recompiling a compiled UNet.
        """
        if not relation:
            raise ValueError(f"relation must be a non-empty id, got {relation!r}")
        state, alphas, metadata = self.lora_state_dict(
            dict(lora) if isinstance(lora, dict) else lora, unet_config=self.unet.config, return_lora_metadata=True
        )
        if not state or not all("lora" in k for k in state):
            raise ValueError(f"relation LoRA {relation!r} is not a LoRA state dict (every key must contain 'lora'; "
                             f"first keys: {list(state)[:3]})")
        text_keys = [k for k in state if k.startswith("text_encoder")]
        if text_keys:  # relation LoRAs adapt the UNet only (paper 3.4.1)
            logger.warning("relation LoRA %r: ignoring %d text-encoder keys", relation, len(text_keys))
            state = {k: v for k, v in state.items() if not k.startswith("text_encoder")}
        self.load_lora_into_unet(state, network_alphas=alphas, unet=self.unet, adapter_name=relation,
                                 metadata=metadata, _pipeline=self, hotswap=hotswap)

    def unload_relation_lora(self, relation: str) -> None:
        if relation not in self.loaded_relations():
            raise ValueError(f"relation {relation!r} is not loaded; loaded: {self.loaded_relations()}")
        self.delete_adapters(relation)

    def _activate_relation(self, relation: str | None) -> None:
        loaded = self.loaded_relations()
        if relation is None:
            if loaded:
                self.unet.disable_lora()
            return
        if relation not in loaded:
            raise ValueError(f"relation {relation!r} has no loaded LoRA; loaded: {loaded} "
                             "(load it with load_relation_lora)")
        self.unet.set_adapters([relation])
        self.unet.enable_lora()

    # ---- inputs -------------------------------------------------------------------------------------------
    def normalize_inputs(self, prompt, subject_images, subject_phrases, boxes, seed, negative_prompt,
                         scale) -> Rows:
        """Single-row calls (``prompt`` a string, flat subject lists) and batched calls (one list per row)."""
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt) if isinstance(prompt, (list, tuple)) else prompt
        if not isinstance(prompts, list) or not prompts:
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        b = len(prompts)

        def rows_of(value, name):
            if value is None:
                return None
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"{name} must be a list, got {type(value).__name__}: {value!r}")
            return [list(value)] if single else _per_row(value, b, name)

        images = rows_of(subject_images, "subject_images")
        phrases = rows_of(subject_phrases, "subject_phrases")
        box_rows = rows_of(boxes, "boxes")
        if phrases is None or box_rows is None:
            raise ValueError(f"subject_phrases and boxes are required, got subject_phrases={subject_phrases!r}, "
                             f"boxes={boxes!r}")
        negative = negative_prompt if negative_prompt is not None else DEFAULTS.negative_prompt
        return Rows(
            prompts=prompts, images=images, phrases=[list(p) for p in phrases],
            boxes=[[list(map(float, bx)) if isinstance(bx, (list, tuple)) else bx for bx in row] for row in box_rows],
            seeds=_per_row(seed, b, "seed"), negative_prompts=_per_row(negative, b, "negative_prompt"),
            scales=_per_row(scale, b, "scale"),
        )

    def check_inputs(self, rows: Rows, height: int, width: int, num_inference_steps: int, guidance_scale: float,
                     subject_embeds: torch.Tensor | None = None) -> None:  # type: ignore[override]
        """Raise ``ValueError`` naming the field and the bad value."""
        _check_sampling(height, width, num_inference_steps, guidance_scale)
        counts = set()
        for r, prompt in enumerate(rows.prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompt[{r}] must be a non-empty string, got {prompt!r}")
            n = len(rows.phrases[r])
            if n == 0:
                raise ValueError(f"row {r} has no subjects: subject_phrases[{r}] is empty")
            if len(rows.boxes[r]) != n:
                raise ValueError(f"row {r}: {len(rows.boxes[r])} boxes but {n} subject_phrases "
                                 f"(boxes={rows.boxes[r]!r}, subject_phrases={rows.phrases[r]!r})")
            if rows.images is not None and len(rows.images[r]) != n:
                raise ValueError(f"row {r}: {len(rows.images[r])} subject_images but {n} subject_phrases "
                                 f"({rows.phrases[r]!r})")
            for j, phrase in enumerate(rows.phrases[r]):
                if not isinstance(phrase, str) or not phrase.strip():
                    raise ValueError(f"subject_phrases[{r}][{j}] must be a non-empty string, got {phrase!r}")
            for j, box in enumerate(rows.boxes[r]):
                check_box(box, f"boxes[{r}][{j}]")
            if rows.images is not None:
                for j, img in enumerate(rows.images[r]):
                    if not isinstance(img, PIL.Image.Image):
                        raise ValueError(f"subject_images[{r}][{j}] must be a PIL image, got {type(img).__name__}")
            _check_seed(rows.seeds[r], f"seed[{r}]")
            s = rows.scales[r]
            if not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0:
                raise ValueError(f"scale[{r}] must be a finite number >= 0, got {s!r}")
            if not isinstance(rows.negative_prompts[r], str):
                raise ValueError(f"negative_prompt[{r}] must be a string, got {rows.negative_prompts[r]!r}")
            counts.add(n)
        if len(counts) > 1:
            raise ValueError(f"rows batched together must have the same number of subjects, got {sorted(counts)}")
        if rows.images is None and subject_embeds is None:
            raise ValueError("give subject_images or subject_embeds (precomputed subject tokens), got neither")
        if subject_embeds is not None:
            want = (len(rows.prompts), counts.pop())
            if tuple(subject_embeds.shape[:2]) != want:
                raise ValueError(f"subject_embeds must have shape (rows, subjects, tokens, width) = {want} + ..., "
                                 f"got {tuple(subject_embeds.shape)}")

    # ---- encoding -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_subjects(self, images: Sequence[PIL.Image.Image], use_local_tokens: bool | None = None) -> torch.Tensor:
        """Subject images -> CLIP tokens (K, 257 [+16], width): the costly part, cacheable per image."""
        return self.adapter.encoder(list(images), use_local_tokens=use_local_tokens)

    @torch.no_grad()
    def encode_phrases(self, phrases: Sequence[str]) -> torch.Tensor:
        """Subject phrases -> CLIP-L ``pooler_output`` (K, 768): the grounding of each subject's tokens."""
        ids = self.tokenizer(list(phrases), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.text_encoder.device)).pooler_output

    # ---- generation ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        prompt: str | list[str],
        subject_images: list | None = None,
        subject_phrases: list | None = None,
        boxes: list | None = None,
        *,
        subject_embeds: torch.Tensor | None = None,
        relation: str | None = None,
        seed: int | list[int] = 0,
        num_inference_steps: int = DEFAULTS.steps,
        guidance_scale: float = DEFAULTS.guidance,
        scale: float | list[float] = DEFAULTS.scale,
        height: int = DEFAULTS.height,
        width: int = DEFAULTS.width,
        negative_prompt: str | list[str] | None = None,
        use_local_tokens: bool | None = None,
        output_type: str = "pil",
        progress: bool = True,
        step_callback: Callable[[int, int], None] | None = None,
    ) -> DreamRelationOutput:
        """Generate one image per row.

        Args:
            prompt: a string (one row) or a list (one per row).
            subject_images: PIL images, N per row (flat list for one row, list of lists for several).
            subject_phrases: the words naming each subject ("dog"), N per row.
            boxes: normalized ``[x0, y0, x1, y1]`` per subject, N per row.
            subject_embeds: precomputed :meth:`encode_subjects` output (B, N, T, W) instead of images.
            relation: name of a loaded relation LoRA (:meth:`load_relation_lora`); ``None`` generates without one.
            seed: one seed, or one per row. The same seed gives the same image.
            scale: gamma of the image branch (paper eq. 4), one value or one per row.
            use_local_tokens: append the 16 local tokens per subject (default: the adapter's config).
            step_callback: called as ``step_callback(step, total)`` after each denoising step (from 1); an exception
                it raises stops the call (a caller's time limit).
        """
        if self.adapter is None:
            raise ValueError("this pipeline has no adapter: build it with presets.load_pipeline")
        # 1. Normalise and check inputs
        rows = self.normalize_inputs(prompt, subject_images, subject_phrases, boxes, seed, negative_prompt, scale)
        self.check_inputs(rows, height, width, num_inference_steps, guidance_scale, subject_embeds)
        b, n = len(rows.prompts), len(rows.phrases[0])
        device = self._execution_device
        do_cfg = guidance_scale > 1.0
        self._activate_relation(relation)

        # 2. Encode the prompts (both SDXL text encoders)
        prompt_embeds, neg_embeds, pooled, neg_pooled = self.encode_prompt(
            prompt=rows.prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=do_cfg,
            negative_prompt=rows.negative_prompts,
        )

        # 3. Encode the subjects: CLIP tokens + phrase grounding + boxes -> image tokens (B, 4 + 16N, D)
        dtype = prompt_embeds.dtype
        if subject_embeds is None:
            flat = [img for row in rows.images for img in row]
            subject_embeds = self.encode_subjects(flat, use_local_tokens)  # (B*N, T, W)
            subject_embeds = subject_embeds.view(b, n, *subject_embeds.shape[1:])  # -> (B, N, T, W)
        subject_embeds = subject_embeds.to(device=device, dtype=dtype)
        phrases = self.encode_phrases([p for row in rows.phrases for p in row]).view(b, n, -1)  # (B, N, 768)
        box_t = torch.tensor(rows.boxes, device=device, dtype=dtype)  # (B, N, 4)
        ip_tokens = self.adapter.image_tokens(subject_embeds, phrases.to(dtype), box_t)
        ip_scale = torch.tensor(rows.scales, device=device, dtype=dtype)  # (B,)
        if do_cfg:  # the unconditional branch sees no image: zero tokens, zero boxes
            ip_tokens = torch.cat([torch.zeros_like(ip_tokens), ip_tokens])
            box_t = torch.cat([torch.zeros_like(box_t), box_t])
            ip_scale = torch.cat([ip_scale, ip_scale])

        latent_hw = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        attn_kwargs = {"ip_hidden_states": ip_tokens, "ip_boxes": box_t, "latent_hw": latent_hw, "ip_scale": ip_scale,
                       "ip_masks": layout_masks(box_t, latent_hw, dtype)}  # masks built once, not per layer
        return self._sample(prompt_embeds, neg_embeds, pooled, neg_pooled, rows.seeds, attn_kwargs, height=height,
                            width=width, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                            output_type=output_type, progress=progress, step_callback=step_callback)

    @torch.no_grad()
    def text_to_image(
        self,
        prompts: str | list[str],
        seeds: int | list[int] = 0,
        height: int = DEFAULTS.height,
        width: int = DEFAULTS.width,
        steps: int = DEFAULTS.steps,
        guidance: float = DEFAULTS.guidance,
        negative_prompt: str | list[str] | None = None,
        output_type: str = "pil",
        progress: bool = False,
    ) -> list[PIL.Image.Image]:
        """Plain SDXL text-to-image: no image tokens (every masked processor does text-only attention) and no
        relation LoRA (any loaded one is disabled for this call). One image per prompt, each with its own seed.

        The data engine makes its subject images with it (paper 3.3: "a photo of a {class}, full body, plain
        background"); the same seed gives the same image as in a batch of any size.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts) if isinstance(prompts, (list, tuple)) \
            else prompts
        if not isinstance(prompts, list) or not prompts:
            raise ValueError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
        for r, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompts[{r}] must be a non-empty string, got {p!r}")
        seed_list = _per_row(seeds, len(prompts), "seeds")
        for r, s in enumerate(seed_list):
            _check_seed(s, f"seeds[{r}]")
        negatives = _per_row(negative_prompt if negative_prompt is not None else DEFAULTS.negative_prompt,
                             len(prompts), "negative_prompt")
        for r, n in enumerate(negatives):
            if not isinstance(n, str):
                raise ValueError(f"negative_prompt[{r}] must be a string, got {n!r}")
        _check_sampling(height, width, steps, guidance)
        self._activate_relation(None)
        prompt_embeds, neg_embeds, pooled, neg_pooled = self.encode_prompt(
            prompt=prompts, device=self._execution_device, num_images_per_prompt=1,
            do_classifier_free_guidance=guidance > 1.0, negative_prompt=negatives,
        )
        out = self._sample(prompt_embeds, neg_embeds, pooled, neg_pooled, seed_list, None, height=height,
                           width=width, num_inference_steps=steps, guidance_scale=guidance, output_type=output_type,
                           progress=progress)
        return out.images

    def _sample(self, prompt_embeds: torch.Tensor, neg_embeds: torch.Tensor | None, pooled: torch.Tensor,
                neg_pooled: torch.Tensor | None, seeds: list[int], attn_kwargs: dict | None, *, height: int,
                width: int, num_inference_steps: int, guidance_scale: float, output_type: str,
                progress: bool, step_callback: Callable[[int, int], None] | None = None
                ) -> DreamRelationOutput:
        """Steps shared by every generation: timesteps, seeded latents, micro-conditioning, denoising, decoding.

        ``prompt_embeds`` (B, 77, D) and ``pooled`` (B, D2) of the rows (and the negatives when guidance > 1);
        ``attn_kwargs``: what the attention processors get (image tokens, boxes, masks), None for text only.
        """
        device = self._execution_device
        dtype = prompt_embeds.dtype
        do_cfg = guidance_scale > 1.0
        # 4. Timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps

        # 5. Initial latents: one CPU generator per row, so a row's noise does not depend on its batch
        vsf = self.vae_scale_factor
        latent_hw = (height // vsf, width // vsf)
        shape = (1, self.unet.config.in_channels, *latent_hw)
        latents = torch.cat([
            torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s), dtype=torch.float32)
            for s in seeds
        ]).to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma  # (B, 4, h, w)

        # 6. SDXL micro-conditioning
        add_time_ids = self._get_add_time_ids(
            (height, width), (0, 0), (height, width), dtype=dtype,
            text_encoder_projection_dim=self.text_encoder_2.config.projection_dim,
        ).to(device).repeat(len(seeds) * (2 if do_cfg else 1), 1)
        if do_cfg:
            prompt_embeds = torch.cat([neg_embeds, prompt_embeds])
            pooled = torch.cat([neg_pooled, pooled])
        added = {"text_embeds": pooled, "time_ids": add_time_ids}

        # 7. Denoising loop
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)
        self.set_progress_bar_config(disable=not progress)
        with self.progress_bar(total=len(timesteps)) as bar:
            for t in timesteps:
                model_in = torch.cat([latents] * 2) if do_cfg else latents
                model_in = self.scheduler.scale_model_input(model_in, t)
                noise = self.unet(model_in, t, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added,
                                  cross_attention_kwargs=attn_kwargs, return_dict=False)[0]
                if do_cfg:
                    uncond, cond = noise.chunk(2)
                    noise = uncond + guidance_scale * (cond - uncond)
                latents = self.scheduler.step(noise, t, latents, return_dict=False)[0]
                bar.update()
                if step_callback is not None:
                    step_callback(bar.n, len(timesteps))

        # 8. Decode
        if output_type == "latent":
            return DreamRelationOutput(images=latents)
        upcast = self.vae.dtype == torch.float16 and self.vae.config.force_upcast  # SDXL's VAE overflows in fp16
        if upcast:
            self.vae.to(torch.float32)
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        image = self.vae.decode(latents, return_dict=False)[0]
        if upcast:
            self.vae.to(torch.float16)
        images = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        return DreamRelationOutput(images=images)
