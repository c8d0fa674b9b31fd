"""Per-image metrics: CLIP-T, CLIP-R, CLIP-I (whole image and subject box crop) and DINO (paper section 4).

Every score is ``100 * max(cos, 0)`` between L2-normalized embeddings, as reported in the paper (Table 2):

* CLIP-T: generated image vs the full prompt (CLIP ViT-B/32, the DreamBooth convention);
* CLIP-R: generated image vs the relation phrase only (``dreamrelation.relation_phrase``);
* CLIP-I: generated image vs each subject image, averaged over subjects; ``clip_i_crop`` uses the generated
  image's crop to the subject's layout box instead, which tells which subject went where;
* DINO: the CLS token of ViT-S/16 (``facebook/dino-vits16``), generated image vs each subject image, averaged.
  Like the paper it is computed on the whole generated image (no box crop).

:class:`MetricModels` holds both models once and scores lists in one forward per model; ``get_metric_models``
keeps one instance per process. Preprocessing is our own (PIL + numpy, no torchvision): resize the shorter side,
center crop, normalize. CLIP uses the OpenAI mean / std with bicubic resizing (``CLIPImageProcessor``); DINO uses
the ImageNet mean / std with bilinear resizing (the hub processor's ``resample=2``). A model folder may carry
``metric_preprocess.json`` to override the defaults (the tiny models do).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .model.encoders import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

logger = logging.getLogger(__name__)

__all__ = [
    "CLIP_ID",
    "DINO_ID",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MetricModels",
    "Preprocess",
    "build_tiny_metric_components",
    "build_tiny_metric_models",
    "crop_box",
    "get_metric_models",
    "metric_model_refs",
    "pair_scores",
]

CLIP_ID = "openai/clip-vit-base-patch32"
DINO_ID = "facebook/dino-vits16"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESS_FILE = "metric_preprocess.json"
METRICS_SUBDIR = "metrics"  # inside a tiny model folder: metrics/clip, metrics/dino

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


# --------------------------------------------------------------------------------------- preprocessing
@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to ``size``, center crop ``crop`` x ``crop``, scale to [0, 1], normalize."""

    size: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: str = "bicubic"

    def __post_init__(self) -> None:
        for name in ("size", "crop"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.crop > self.size:
            raise ValueError(f"crop must be <= size, got crop={self.crop} size={self.size}")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """K PIL images -> float32 (K, 3, crop, crop)."""
        batch = []
        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise ValueError(f"images[{i}] must be a PIL.Image.Image, got {type(image).__name__}")
            image = image.convert("RGB")
            w, h = image.size
            scale = self.size / min(w, h)
            rw, rh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
            image = image.resize((rw, rh), _RESAMPLE[self.resample])
            left, top = (rw - self.crop) // 2, (rh - self.crop) // 2
            image = image.crop((left, top, left + self.crop, top + self.crop))
            batch.append(np.asarray(image, dtype=np.float32) / 255.0)  # (crop, crop, 3)
        # (K, crop, crop, 3) -> (K, 3, crop, crop)
        pixels = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((pixels - mean) / std).contiguous()

    def save(self, folder: str | Path) -> None:
        (Path(folder) / PREPROCESS_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, ref: str | Path, default: Preprocess) -> Preprocess:
        """The folder's ``metric_preprocess.json`` when there is one, else ``default``."""
        path = Path(ref) / PREPROCESS_FILE
        if not path.is_file():
            return default
        data = json.loads(path.read_text())
        unknown = sorted(set(data) - set(asdict(default)))
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}")
        return cls(**data)


def _clip_preprocess(size: int) -> Preprocess:
    return Preprocess(size, size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "bicubic")


def _dino_preprocess(size: int) -> Preprocess:
    return Preprocess(size, size, IMAGENET_MEAN, IMAGENET_STD, "bilinear")


# ---------------------------------------------------------------------------------------- pure functions
def pair_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise ``100 * max(cos(a_k, b_k), 0)`` (the paper's CLIP-T / CLIP-R / CLIP-I / DINO, section 4).

    a, b: (K, D) embeddings (normalized or not); returns float32 (K,) in [0, 100].
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"a and b must both be (K, D), got {tuple(a.shape)} and {tuple(b.shape)}")
    cos = F.cosine_similarity(a.float(), b.float(), dim=-1)  # (K,)
    return (100.0 * cos.clamp(min=0.0)).clamp(max=100.0)


def crop_box(image: Image.Image, box: Sequence[float]) -> Image.Image:
    """Crop ``image`` to a normalized ``[x0, y0, x1, y1]`` box: edges rounded outwards, at least 1 x 1 pixel."""
    if len(box) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box):
        raise ValueError(f"box must be 4 finite numbers [x0, y0, x1, y1], got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise ValueError(f"box must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got {list(box)!r}")
    w, h = image.size

    def span(lo: float, hi: float, n: int) -> tuple[int, int]:
        a, b = math.floor(lo * n), min(math.ceil(hi * n), n)
        if b <= a:  # thinner than a pixel: keep the pixel it lies in
            a = min(a, n - 1)
            b = a + 1
        return a, b

    left, right = span(x0, x1, w)
    top, bottom = span(y0, y1, h)
    return image.crop((left, top, right, bottom))


def _image_key(image: Image.Image) -> tuple:
    """Content key: equal pixels give equal keys whichever PIL object holds them."""
    return image.mode, image.size, hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest()


# -------------------------------------------------------------------------------------------- the models
def metric_model_refs(model_dir_or_name: str | Path) -> tuple[str, str]:
    """(clip, dino) for a preset: a tiny model folder's ``metrics/{clip,dino}``, else the public hub ids.

    ``"tiny"`` resolves to the tiny preset's folder (built with its metric models on first use), ``"toy"`` to the
    toy preset's (its CLIP trained on the toy world).
    """
    from .model.presets import miniature_folder

    folder = miniature_folder(model_dir_or_name) or Path(model_dir_or_name)
    metrics = folder / METRICS_SUBDIR
    if (metrics / "clip").is_dir() and (metrics / "dino").is_dir():
        return str(metrics / "clip"), str(metrics / "dino")
    return CLIP_ID, DINO_ID


class MetricModels:
    """CLIP (image + text towers) and DINO, loaded once; batched embeddings and per-image scores.

    Args:
        clip: a ``CLIPModel`` + ``CLIPTokenizer`` folder or hub id (``openai/clip-vit-base-patch32``).
        dino: a ``ViTModel`` folder or hub id (``facebook/dino-vits16``).
        device, dtype: where the models run; embeddings come back as float32 on the CPU.
    """

    def __init__(self, clip: str | Path = CLIP_ID, dino: str | Path = DINO_ID,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        from transformers import CLIPModel, CLIPTokenizer, ViTModel

        clip_model = CLIPModel.from_pretrained(str(clip), dtype=dtype)
        dino_model = ViTModel.from_pretrained(str(dino), dtype=dtype, add_pooling_layer=False)
        self._install(
            clip_model, CLIPTokenizer.from_pretrained(str(clip)), dino_model,
            Preprocess.load(clip, _clip_preprocess(clip_model.config.vision_config.image_size)),
            Preprocess.load(dino, _dino_preprocess(dino_model.config.image_size)), device, dtype,
        )
        logger.info("metric models: clip=%s dino=%s on %s", clip, dino, self.device)

    def _install(self, clip, tokenizer, dino, clip_preprocess: Preprocess, dino_preprocess: Preprocess,
                 device: str | torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = torch.device(device), dtype
        self.clip = clip.to(device=self.device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        self.dino = dino.to(device=self.device, dtype=dtype).eval()
        self.clip_preprocess, self.dino_preprocess = clip_preprocess, dino_preprocess

    @classmethod
    def from_models(cls, clip, tokenizer, dino, clip_preprocess: Preprocess | None = None,
                    dino_preprocess: Preprocess | None = None, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> MetricModels:
        """Wrap models already in memory (``CLIPModel``, ``CLIPTokenizer``, ``ViTModel``); default preprocessing
        follows their configs' image sizes."""
        self = cls.__new__(cls)
        self._install(
            clip, tokenizer, dino,
            clip_preprocess or _clip_preprocess(clip.config.vision_config.image_size),
            dino_preprocess or _dino_preprocess(dino.config.image_size), device, dtype,
        )
        return self

    @classmethod
    def for_preset(cls, model_dir_or_name: str | Path, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> MetricModels:
        """Tiny metric models for a tiny model folder (or ``"tiny"``), the public ids otherwise."""
        return cls(*metric_model_refs(model_dir_or_name), device=device, dtype=dtype)

    # ---------------------------------------------------------------------------------- embeddings
    def _pixels(self, preprocess: Preprocess, images: Sequence[Image.Image]) -> torch.Tensor:
        if len(images) == 0:
            raise ValueError("images must hold at least one PIL image, got an empty sequence")
        return preprocess(images).to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def image_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """K images -> (K, D) L2-normalized CLIP image embeddings (projected pooled CLS)."""
        pixels = self._pixels(self.clip_preprocess, images)  # (K, 3, S, S)
        pooled = self.clip.vision_model(pixel_values=pixels).pooler_output  # (K, width)
        return F.normalize(self.clip.visual_projection(pooled).float(), dim=-1).cpu()  # (K, D)

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        """K texts -> (K, D) L2-normalized CLIP text embeddings; texts past the context length are truncated."""
        if len(texts) == 0 or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"texts must be a non-empty list of strings, got {texts!r}")
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt",
                                max_length=self.clip.config.text_config.max_position_embeddings)
        pooled = self.clip.text_model(input_ids=tokens.input_ids.to(self.device),
                                      attention_mask=tokens.attention_mask.to(self.device)).pooler_output
        return F.normalize(self.clip.text_projection(pooled).float(), dim=-1).cpu()  # (K, D)

    @torch.no_grad()
    def dino_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """K images -> (K, Dd) L2-normalized DINO CLS tokens (``last_hidden_state[:, 0]``)."""
        pixels = self._pixels(self.dino_preprocess, images)  # (K, 3, S, S)
        cls_token = self.dino(pixel_values=pixels).last_hidden_state[:, 0]  # (K, Dd)
        return F.normalize(cls_token.float(), dim=-1).cpu()

    # --------------------------------------------------------------------------------------- scores
    def dino_pair_scores(self, images: Sequence[Image.Image], others: Sequence[Image.Image]) -> list[float]:
        """DINO of each pair ``(images[k], others[k])``, ``100 * max(cos, 0)`` of their CLS tokens, in one forward.

        The data engine's copy-paste gate (``dreamrelation.engine.gates.check_copy_paste``) scores a subject's crop
        in the target against its crop in the subject image with it: a target that only pasted the subject image
        scores near 100.
        """
        if len(images) != len(others):
            raise ValueError(f"others must have one image per image ({len(images)}), got {len(others)}")
        if len(images) == 0:
            return []
        embeds = self.dino_embeds([*images, *others])  # (2K, Dd)
        return pair_scores(embeds[:len(images)], embeds[len(images):]).tolist()

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str], relation_phrases: Sequence[str],
              subject_images: Sequence[Sequence[Image.Image]],
              boxes: Sequence[Sequence[Sequence[float]]]) -> list[dict]:
        """Per generated image i, a dict of scores in [0, 100]:

        ``clip_t``, ``clip_r``, ``clip_i``, ``clip_i_crop``, ``dino`` (means over subjects) and the lists
        ``clip_i_per_subject``, ``clip_i_crop_per_subject``, ``dino_per_subject``. Subject j of image i is
        ``subject_images[i][j]`` with normalized box ``boxes[i][j]``; an image without subjects gets None for the
        subject metrics. One CLIP image forward (images, unique subjects, crops), one text forward (unique
        texts) and one DINO forward (images, unique subjects) per call; equal subject images are encoded once.
        """
        n = len(images)
        for name, value in (("prompts", prompts), ("relation_phrases", relation_phrases),
                            ("subject_images", subject_images), ("boxes", boxes)):
            if len(value) != n:
                raise ValueError(f"{name} must have one entry per image ({n}), got {len(value)}")
        if n == 0:
            return []
        for i in range(n):
            if len(boxes[i]) != len(subject_images[i]):
                raise ValueError(f"boxes[{i}] must have one box per subject ({len(subject_images[i])}), "
                                 f"got {len(boxes[i])}")

        # unique subject images, by content (the same product image recurs across rows)
        keys_by_id: dict[int, tuple] = {}
        slot: dict[tuple, int] = {}
        unique: list[Image.Image] = []
        subject_slot: list[list[int]] = []  # [i][j] -> index into unique
        for i, subjects in enumerate(subject_images):
            row = []
            for j, image in enumerate(subjects):
                if not isinstance(image, Image.Image):
                    raise ValueError(f"subject_images[{i}][{j}] must be a PIL.Image.Image, "
                                     f"got {type(image).__name__}")
                if id(image) not in keys_by_id:  # hash each PIL object once
                    keys_by_id[id(image)] = _image_key(image)
                key = keys_by_id[id(image)]
                if key not in slot:
                    slot[key] = len(unique)
                    unique.append(image)
                row.append(slot[key])
            subject_slot.append(row)
        crops = []
        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise ValueError(f"images[{i}] must be a PIL.Image.Image, got {type(image).__name__}")
            for j, box in enumerate(boxes[i]):
                try:
                    crops.append(crop_box(image, box))
                except ValueError as err:
                    raise ValueError(f"boxes[{i}][{j}]: {err}") from None
        texts = list(dict.fromkeys([*prompts, *relation_phrases]))
        text_index = {t: k for k, t in enumerate(texts)}

        clip_all = self.image_embeds([*images, *unique, *crops])  # (n + U + C, D)
        clip_gen, clip_subj, clip_crop = clip_all[:n], clip_all[n:n + len(unique)], clip_all[n + len(unique):]
        text = self.text_embeds(texts)  # (T, D)
        dino_all = self.dino_embeds([*images, *unique]) if unique else None  # (n + U, Dd)

        clip_t = pair_scores(clip_gen, text[[text_index[p] for p in prompts]])  # (n,)
        clip_r = pair_scores(clip_gen, text[[text_index[r] for r in relation_phrases]])  # (n,)
        # every (image, subject) pair, flattened in row order: the crops' order
        pair_image = [i for i in range(n) for _ in subject_slot[i]]
        pair_subject = [u for row in subject_slot for u in row]
        clip_i: list[float] = []
        clip_i_crop: list[float] = []
        dino: list[float] = []
        if pair_image:
            clip_i = pair_scores(clip_gen[pair_image], clip_subj[pair_subject]).tolist()
            clip_i_crop = pair_scores(clip_crop, clip_subj[pair_subject]).tolist()
            dino = pair_scores(dino_all[pair_image], dino_all[n:][pair_subject]).tolist()

        results, k = [], 0
        for i in range(n):
            m = len(subject_slot[i])
            per = {"clip_i": clip_i[k:k + m], "clip_i_crop": clip_i_crop[k:k + m], "dino": dino[k:k + m]}
            k += m
            results.append({
                "clip_t": float(clip_t[i]),
                "clip_r": float(clip_r[i]),
                **{name: (sum(v) / m if m else None) for name, v in per.items()},
                **{f"{name}_per_subject": v for name, v in per.items()},
            })
        return results


# --------------------------------------------------------------------------------------- per process
_HELD: dict[tuple, MetricModels] = {}
_HELD_LOCK = threading.Lock()


def get_metric_models(clip: str | Path = CLIP_ID, dino: str | Path = DINO_ID, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> MetricModels:
    """One :class:`MetricModels` per (clip, dino, device, dtype) in this process, loaded on first use."""
    key = (str(clip), str(dino), str(torch.device(device)), dtype)
    with _HELD_LOCK:
        if key not in _HELD:
            _HELD[key] = MetricModels(clip, dino, device=device, dtype=dtype)
        return _HELD[key]


# ------------------------------------------------------------------------------------------ tiny models
def build_tiny_metric_components(seed: int = 0) -> dict:
    """The tiny metric models in memory: ``clip`` (CLIPModel), ``tokenizer``, ``dino`` (ViTModel); see below."""
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPVisionConfig,
        ViTConfig,
        ViTModel,
    )

    from .model.tiny import build_tokenizer, text_config

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    clip = CLIPModel(CLIPConfig(text_config=text_config(tokenizer).to_dict(), vision_config=vision.to_dict(),
                                projection_dim=16))
    torch.manual_seed(seed + 1)
    dino = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                              image_size=64, patch_size=16, qkv_bias=True), add_pooling_layer=False)
    return {"clip": clip.eval(), "tokenizer": tokenizer, "dino": dino.eval()}


def build_tiny_metric_models(directory: str | Path, seed: int = 0) -> Path:
    """Tiny random CLIP and DINO models in the real formats: ``directory/clip/`` and ``directory/dino/``.

    CLIP: the tiny text tower and byte-level BPE tokenizer of ``dreamrelation.model.tiny`` plus a 2-layer vision tower
    (width 32, 32 px, patch 8), projection 16. DINO: a ViT-S/16-shaped ``ViTModel`` (width 32, patch 16, 64 px,
    2 layers). Deterministic for ``seed``; each folder carries its ``metric_preprocess.json``.
    """
    directory = Path(directory)
    models = build_tiny_metric_components(seed)
    models["clip"].save_pretrained(directory / "clip")
    models["tokenizer"].save_pretrained(directory / "clip")
    _clip_preprocess(models["clip"].config.vision_config.image_size).save(directory / "clip")
    models["dino"].save_pretrained(directory / "dino")
    _dino_preprocess(models["dino"].config.image_size).save(directory / "dino")
    logger.info("tiny metric models written to %s", directory)
    return directory
