"""Generators of the data engine (paper section 3.3): the images of one sample, behind one protocol.

* :class:`PipelineGenerator`: our stack. Subject images by the pipeline's plain SDXL text-to-image, then the target
  by :class:`~dreamrelation.model.pipeline.DreamRelationPipeline` with those images as image prompts, the relation
  prompt and the layout.
* :class:`APIGenerator`: an OpenAI-compatible images API (``dreamrelation.engine.images_api``): ``generate`` for the
  subjects, ``edit`` with the subject images and :func:`edit_prompt` for the target.

``dreamrelation.engine.gates`` annotates and gates what they make. Boxes are normalized ``[x0, y0, x1, y1]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from PIL import Image

from ..model.layout import Box

__all__ = ["APIGenerator", "Generator", "PipelineGenerator", "edit_prompt"]


class Generator(Protocol):
    """Makes the images of one sample. ``size`` is ``(width, height)``; a backend may return another size
    (annotations are normalized)."""

    name: str

    def subject_images(self, prompts: Sequence[str], seeds: Sequence[int], size: tuple[int, int],
                       steps: int) -> list[Image.Image]:
        """One image per subject prompt ("a photo of a dog, full body, plain background")."""
        ...

    def target(self, prompt: str, subject_images: Sequence[Image.Image], phrases: Sequence[str],
               boxes: Sequence[Box], seed: int, size: tuple[int, int], steps: int) -> Image.Image:
        """The relation image: the same identities as ``subject_images``, placed in ``boxes``."""
        ...


class PipelineGenerator:
    """Our own stack: subjects by :meth:`DreamRelationPipeline.text_to_image` (no image tokens, no LoRA), the
    target by :class:`DreamRelationPipeline` with the subject images as image prompts (no relation LoRA: the
    engine makes the data a relation LoRA is trained on)."""

    name = "pipeline"

    def __init__(self, pipe, guidance: float = 5.0, scale: float = 0.6, negative_prompt: str | None = None,
                 use_local_tokens: bool | None = None) -> None:
        self.pipe = pipe
        self.guidance = guidance
        self.scale = scale
        self.negative_prompt = negative_prompt
        self.use_local_tokens = use_local_tokens

    def subject_images(self, prompts: Sequence[str], seeds: Sequence[int], size: tuple[int, int],
                       steps: int) -> list[Image.Image]:
        width, height = size
        return list(self.pipe.text_to_image(list(prompts), list(seeds), height=height, width=width, steps=steps,
                                            guidance=self.guidance, negative_prompt=self.negative_prompt))

    def target(self, prompt: str, subject_images: Sequence[Image.Image], phrases: Sequence[str],
               boxes: Sequence[Box], seed: int, size: tuple[int, int], steps: int) -> Image.Image:
        width, height = size
        out = self.pipe(prompt, list(subject_images), list(phrases), [list(map(float, b)) for b in boxes],
                        relation=None, seed=seed, num_inference_steps=steps, guidance_scale=self.guidance,
                        scale=self.scale, height=height, width=width, negative_prompt=self.negative_prompt,
                        use_local_tokens=self.use_local_tokens, progress=False)
        return out.images[0]


def edit_prompt(prompt: str, phrases: Sequence[str]) -> str:
    """The edit instruction of :class:`APIGenerator`: "The photo of the same dog and cat: {prompt}"."""
    names = list(dict.fromkeys(phrases))
    classes = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"The photo of the same {classes}: {prompt}"


class APIGenerator:
    """An OpenAI-compatible images API (``dreamrelation.engine.images_api.ImagesAPIClient``): ``generate`` makes each
    subject image, ``edit`` with the subject images and :func:`edit_prompt` makes the target. Such services take
    no seed and no layout: the layout boxes stay the intended ones, the detector finds where the subjects went."""

    def __init__(self, client) -> None:
        self.client = client
        model = getattr(getattr(client, "config", None), "model", None)
        self.name = f"api:{model}" if model else "api"

    def subject_images(self, prompts: Sequence[str], seeds: Sequence[int], size: tuple[int, int],
                       steps: int) -> list[Image.Image]:
        return [self.client.generate(p).convert("RGB") for p in prompts]

    def target(self, prompt: str, subject_images: Sequence[Image.Image], phrases: Sequence[str],
               boxes: Sequence[Box], seed: int, size: tuple[int, int], steps: int) -> Image.Image:
        return self.client.edit(edit_prompt(prompt, phrases), list(subject_images)).convert("RGB")
