"""Annotation backends of the data engine (paper section 3.3): open-vocabulary boxes, box-prompted masks, captions.

The paper annotates its generated triplets with X-Pose, SAM and LLaVA. We use open models from ``transformers``,
each with a public id and a **tiny twin** (random weights, fixed seed, saved with ``save_pretrained`` in the real
formats) so that tests travel the same ``from_pretrained`` path as the real checkpoints:

* :class:`OwlDetector`: OWLv2 (``google/owlv2-base-patch16-ensemble``), one forward for all text queries;
* :class:`SamMasker`: SAM ViT-B (``facebook/sam-vit-base``) with box prompts;
* :class:`Captioner`: BLIP base captioning (``Salesforce/blip-image-captioning-base``);
* dense features and pose come from ``dreamrelation.engine.keypoints`` (DINOv2) and ``dreamrelation.engine.pose``
  (ViTPose: COCO keypoints of people; a ViTPose++ with an AP-10K head for animals, which has a tiny twin here but no
  public transformers checkpoint: ``pose.save_vitpose_plus`` makes one from the authors' original weights).

Boxes are normalized ``(x0, y0, x1, y1)`` in the image everywhere in this module. The real architectures are
written out as configs (``owlv2_base_config`` ...) so tests can build them on the ``meta`` device and prove that
the public checkpoints fit the layout this loading code expects. OWLv2's image processor needs ``scipy`` (or
``torchvision``) to resize.
"""

from __future__ import annotations

import logging
import math
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..model.preset_names import PRESETS, SMALL_PRESETS

logger = logging.getLogger(__name__)

__all__ = [
    "CAPTION_ID",
    "OWLV2_ID",
    "SAM_ID",
    "TINY_ANNOTATORS_VERSION",
    "AnnotatorRefs",
    "Captioner",
    "Detection",
    "OwlDetector",
    "SamMasker",
    "annotator_refs",
    "blip_base_config",
    "box_iou",
    "build_tiny_annotators",
    "nms",
    "owlv2_base_config",
    "sam_vit_base_config",
    "tiny_annotator_dir",
]

OWLV2_ID = "google/owlv2-base-patch16-ensemble"
SAM_ID = "facebook/sam-vit-base"
CAPTION_ID = "Salesforce/blip-image-captioning-base"
NMS_IOU = 0.5
TINY_ANNOTATORS_VERSION = 2  # bump whenever the tiny build changes: cached folders are keyed by it
# the tiny folder's layout, in AnnotatorRefs order; the last (the AP-10K pose model) is optional in a model folder
SUBDIRS = ("owlv2", "sam", "dinov2", "vitpose", "blip", "vitpose_ap10k")
REQUIRED_SUBDIRS = SUBDIRS[:5]


# ------------------------------------------------------------------------------------------- validation
def _check_image(image) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image must be at least 1 x 1 pixels, got {image.size!r}")
    return image.convert("RGB")


def _check_box(name: str, box) -> tuple[float, float, float, float]:
    """A normalized ``[x0, y0, x1, y1]`` with ``0 <= x0 < x1 <= 1`` and ``0 <= y0 < y1 <= 1``."""
    try:
        values = tuple(float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be 4 numbers [x0, y0, x1, y1], got {box!r}") from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be 4 finite numbers [x0, y0, x1, y1], got {box!r}")
    x0, y0, x1, y1 = values
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise ValueError(f"{name} must be normalized with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got {box!r}")
    return values


# ------------------------------------------------------------------------------------------ pure boxes
@dataclass(frozen=True)
class Detection:
    """One detected instance: ``box`` is normalized xyxy in the image, ``score`` in [0, 1]."""

    box: tuple[float, float, float, float]
    score: float


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes: a (N, 4), b (M, 4) -> (N, M); empty boxes have IoU 0 with everything."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)  # (N,)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)  # (M,)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])  # (N, M, 2)
    inter = (rb - lt).clamp(min=0).prod(dim=-1)  # (N, M)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float = NMS_IOU) -> torch.Tensor:
    """Greedy non-maximum suppression: indices of the kept boxes, highest score first.

    boxes (N, 4) xyxy, scores (N,). A box is dropped when its IoU with a kept, higher-scored box is above
    ``iou_threshold`` (torchvision's convention); equal scores keep the lower index first.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:1]:
        raise ValueError(f"boxes must be (N, 4) and scores (N,), got {tuple(boxes.shape)} and {tuple(scores.shape)}")
    order = torch.argsort(scores, descending=True, stable=True)
    iou = box_iou(boxes[order], boxes[order])  # (N, N), in score order
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long)] if keep else order[:0]


# --------------------------------------------------------------------------------------------- backends
def _load(backend, model_cls, processor_cls, ref: str | Path, device: str | torch.device, dtype: torch.dtype) -> None:
    """Set ``backend.device / dtype / processor / model`` from one ``save_pretrained`` folder or hub id."""
    backend.device, backend.dtype = torch.device(device), dtype
    backend.processor = processor_cls.from_pretrained(str(ref))
    backend.model = model_cls.from_pretrained(str(ref), dtype=dtype).to(backend.device).eval()
    logger.info("%s: %s on %s", type(backend).__name__, ref, backend.device)


class OwlDetector:
    """Open-vocabulary detection with OWLv2: a box list per text phrase, all phrases in one forward pass.

    Each phrase is scored on its own (sigmoid of its class logit per predicted box), so adding phrases to a call
    never changes another phrase's detections; boxes then go through per-phrase NMS (IoU 0.5).
    """

    def __init__(self, ref: str | Path = OWLV2_ID, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        from transformers import Owlv2ForObjectDetection, Owlv2Processor

        _load(self, Owlv2ForObjectDetection, Owlv2Processor, ref, device, dtype)

    @torch.no_grad()
    def detect(self, image: Image.Image, phrases: list[str], threshold: float) -> list[list[Detection]]:
        """``phrases`` (P non-empty strings) -> P lists of detections with ``score >= threshold``, best first."""
        image = _check_image(image)
        if not isinstance(phrases, (list, tuple)) or not phrases:
            raise ValueError(f"phrases must be a non-empty list of strings, got {phrases!r}")
        for i, phrase in enumerate(phrases):
            if not isinstance(phrase, str) or not phrase.strip():
                raise ValueError(f"phrases[{i}] must be a non-empty string, got {phrase!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")

        inputs = self.processor(text=[list(phrases)], images=image, return_tensors="pt", truncation=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        outputs = self.model(**inputs)  # logits (1, B, P), pred_boxes (1, B, 4) cxcywh in the padded square
        width, height = image.size
        # the processor pads the image to a square at the bottom / right, so its post-processing scales the
        # boxes by max(H, W); threshold -1 keeps every box, aligned with the logits
        pixels = self.processor.image_processor.post_process_object_detection(
            outputs=outputs, threshold=-1.0, target_sizes=[(height, width)])[0]["boxes"].float().cpu()  # (B, 4)
        boxes = (pixels / torch.tensor([width, height, width, height])).clamp(0.0, 1.0)  # normalized in the image
        inside = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # boxes wholly in the padding vanish
        scores = torch.sigmoid(outputs.logits[0].float()).cpu()  # (B, P)

        results = []
        for p in range(len(phrases)):
            keep = inside & (scores[:, p] >= threshold)
            kept_boxes, kept_scores = boxes[keep], scores[keep, p]
            order = nms(kept_boxes, kept_scores, NMS_IOU)
            results.append([Detection(tuple(float(v) for v in kept_boxes[i]), float(kept_scores[i]))
                            for i in order.tolist()])
        return results


class SamMasker:
    """Box-prompted segmentation with SAM: one (H, W) bool mask per normalized box, at the image's size."""

    def __init__(self, ref: str | Path = SAM_ID, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        from transformers import SamModel, SamProcessor

        _load(self, SamModel, SamProcessor, ref, device, dtype)

    @torch.no_grad()
    def __call__(self, image: Image.Image, boxes: Sequence[Sequence[float]]) -> list[np.ndarray]:
        """K normalized xyxy boxes -> K (H, W) bool masks; of SAM's 3 candidates per box, the best by its IoU score."""
        image = _check_image(image)
        checked = [_check_box(f"boxes[{k}]", box) for k, box in enumerate(boxes)]
        if not checked:
            return []
        width, height = image.size
        pixel_boxes = [[x0 * width, y0 * height, x1 * width, y1 * height] for x0, y0, x1, y1 in checked]
        inputs = self.processor(images=image, input_boxes=[pixel_boxes], return_tensors="pt")
        outputs = self.model(
            pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
            input_boxes=inputs["input_boxes"].to(self.device, self.dtype),
            multimask_output=True,
        )  # pred_masks (1, K, 3, h, w) low-res logits, iou_scores (1, K, 3)
        masks = self.processor.post_process_masks(
            [outputs.pred_masks[0].float().cpu()], inputs["original_sizes"], inputs["reshaped_input_sizes"],
        )[0]  # (K, 3, H, W) bool
        best = outputs.iou_scores[0].float().argmax(dim=-1).cpu()  # (K,)
        return [masks[k, int(best[k])].numpy().astype(bool) for k in range(len(checked))]


class Captioner:
    """Image captioning with BLIP: greedy decoding, deterministic."""

    def __init__(self, ref: str | Path = CAPTION_ID, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, max_new_tokens: int = 30) -> None:
        from transformers import BlipForConditionalGeneration, BlipProcessor

        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        self.max_new_tokens = max_new_tokens
        _load(self, BlipForConditionalGeneration, BlipProcessor, ref, device, dtype)

    @torch.no_grad()
    def __call__(self, image: Image.Image) -> str:
        image = _check_image(image)
        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        tokens = self.model.generate(pixel_values=pixels, max_new_tokens=self.max_new_tokens, do_sample=False,
                                     num_beams=1)  # (1, T)
        return self.processor.decode(tokens[0], skip_special_tokens=True).strip()


# ------------------------------------------------------------------------------------------------ refs
@dataclass(frozen=True)
class AnnotatorRefs:
    """Where each annotation model comes from: a hub id or a local ``save_pretrained`` folder. ``pose``: COCO
    person keypoints; ``animal_pose``: a ViTPose whose head is AP-10K's, None where there is none (the hub)."""

    detector: str
    masker: str
    features: str
    pose: str
    captioner: str
    animal_pose: str | None = None


def annotator_refs(preset: str | Path) -> AnnotatorRefs:
    """The annotators of a model preset.

    ``"tiny"``: the folders of :func:`tiny_annotator_dir` (built on first use); a folder holding ``owlv2/``,
    ``sam/``, ``dinov2/``, ``vitpose/`` and ``blip/`` (as written by :func:`build_tiny_annotators`): those folders,
    and ``vitpose_ap10k/`` when it has one; ``"sdxl"`` or any other model folder: the public hub ids (no AP-10K
    pose model among them).
    """
    from .keypoints import DINOV2_ID
    from .pose import VITPOSE_ID

    name = str(preset)
    if name in SMALL_PRESETS:  # the toy model has no annotators of its own: the tiny (random) ones
        folder = tiny_annotator_dir()
    elif Path(name).is_dir():
        folder = Path(name)
        if not _complete(folder):
            return AnnotatorRefs(OWLV2_ID, SAM_ID, DINOV2_ID, VITPOSE_ID, CAPTION_ID)
    elif name == "sdxl":
        return AnnotatorRefs(OWLV2_ID, SAM_ID, DINOV2_ID, VITPOSE_ID, CAPTION_ID)
    else:
        raise ValueError(f"preset must be one of {list(PRESETS)} or an existing model folder, got {name!r}")
    animal = folder / SUBDIRS[-1]
    return AnnotatorRefs(*(str(folder / sub) for sub in REQUIRED_SUBDIRS),
                         animal_pose=str(animal) if (animal / "config.json").is_file() else None)


# ------------------------------------------------------------------------------------ real architectures
def owlv2_base_config():
    """``google/owlv2-base-patch16-ensemble``: CLIP B/16 towers, 960 px (60 x 60 = 3600 boxes), 16 text tokens."""
    from transformers import Owlv2Config

    return Owlv2Config(
        text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=16),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=960, patch_size=16),
        projection_dim=512,
    )


def sam_vit_base_config():
    """``facebook/sam-vit-base``: ViT-B/16 at 1024 px, windowed attention (14) with 4 global layers, 256-d neck."""
    from transformers import SamConfig

    return SamConfig(
        vision_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_dim=3072,
                           global_attn_indexes=[2, 5, 8, 11], window_size=14, image_size=1024, patch_size=16,
                           output_channels=256),
        prompt_encoder_config=dict(hidden_size=256, image_size=1024, patch_size=16, mask_input_channels=16),
        mask_decoder_config=dict(hidden_size=256, mlp_dim=2048, num_hidden_layers=2, num_attention_heads=8,
                                 num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=256),
    )


def blip_base_config():
    """``Salesforce/blip-image-captioning-base``: ViT-B/16 at 384 px and a 12-layer BERT decoder (vocab 30524)."""
    from transformers import BlipConfig

    return BlipConfig(
        text_config=dict(vocab_size=30524, hidden_size=768, encoder_hidden_size=768, intermediate_size=3072,
                         num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=512,
                         bos_token_id=30522, sep_token_id=102, pad_token_id=0, eos_token_id=2),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=384, patch_size=16, layer_norm_eps=1e-5),
        projection_dim=512, image_text_hidden_size=256,
    )


# ------------------------------------------------------------------------------------------ tiny twins
TINY_OWL_SIZE, TINY_SAM_SIZE, TINY_BLIP_SIZE = 64, 64, 64


def _build_tiny_owlv2(directory: Path) -> None:
    """OWLv2 at width 32, 1 layer per tower, 64 px / patch 16 (16 boxes), the tiny CLIP BPE tokenizer."""
    from transformers import (
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessorPil,
        Owlv2Processor,
    )

    from ..model.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.model_max_length = 16  # OWLv2 pads / truncates every query to 16 tokens
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = Owlv2Config(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=16, **ids),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=TINY_OWL_SIZE, patch_size=16),
        projection_dim=32,
        initializer_range=0.02,  # the detection heads' init: the default (1.0) makes every box degenerate
    )
    Owlv2ForObjectDetection(config).save_pretrained(directory)
    image_processor = Owlv2ImageProcessorPil(size={"height": TINY_OWL_SIZE, "width": TINY_OWL_SIZE})
    Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)


def _build_tiny_sam(directory: Path) -> None:
    """SAM at width 32, 2 vision layers (window 2, one global), 64 px / patch 16, 32-d prompts and decoder."""
    from transformers import SamConfig, SamImageProcessorPil, SamModel, SamProcessor

    size, patch = TINY_SAM_SIZE, 16
    config = SamConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_dim=64,
                           global_attn_indexes=[1], window_size=2, image_size=size, patch_size=patch,
                           output_channels=32, num_pos_feats=16),
        prompt_encoder_config=dict(hidden_size=32, image_size=size, patch_size=patch, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_hidden_layers=1, num_attention_heads=4,
                                 iou_head_hidden_dim=32),
    )
    SamModel(config).save_pretrained(directory)
    low_res = 4 * (size // patch)  # the mask decoder upsamples the embedding grid 4x
    image_processor = SamImageProcessorPil(
        size={"longest_edge": size}, pad_size={"height": size, "width": size},
        mask_size={"longest_edge": low_res}, mask_pad_size={"height": low_res, "width": low_res},
    )
    SamProcessor(image_processor=image_processor).save_pretrained(directory)


def build_blip_tokenizer():
    """A real BERT WordPiece tokenizer built offline: lowercase characters and their ``##`` pieces, BLIP's specials.

    Same special tokens as BLIP's (``[PAD]`` 0, ``[CLS]``, ``[SEP]``, ``[MASK]``, ``[UNK]``, ``[DEC]`` as BOS,
    ``[ENC]``); words split into characters.
    """
    from transformers import BertTokenizer

    chars = list(string.ascii_lowercase + string.digits + ".,'-!?")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars), "[DEC]", "[ENC]"]
    return BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, bos_token="[DEC]",
                         extra_special_tokens=["[ENC]"])


def _build_tiny_blip(directory: Path) -> None:
    """BLIP captioning at width 32, 1 layer per tower, 64 px / patch 16, the tiny WordPiece tokenizer."""
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    tokenizer = build_blip_tokenizer()
    config = BlipConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=64,
                         bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=TINY_BLIP_SIZE, patch_size=16, layer_norm_eps=1e-5),
        projection_dim=32, image_text_hidden_size=32,
    )
    BlipForConditionalGeneration(config).save_pretrained(directory)
    image_processor = BlipImageProcessorPil(size={"height": TINY_BLIP_SIZE, "width": TINY_BLIP_SIZE})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)


def build_tiny_annotators(directory: str | Path, seed: int = 0) -> Path:
    """Build every tiny annotator into ``directory`` (``owlv2/ sam/ dinov2/ vitpose/ blip/ vitpose_ap10k/``);
    returns it.

    Each model is built under its own seed (``seed + k``) so the build order does not matter; deterministic.
    """
    from .keypoints import build_tiny_dinov2
    from .pose import build_tiny_vitpose, build_tiny_vitpose_plus

    directory = Path(directory)
    builders = {"owlv2": _build_tiny_owlv2, "sam": _build_tiny_sam, "blip": _build_tiny_blip}
    for k, sub in enumerate(SUBDIRS):
        if sub == "dinov2":
            build_tiny_dinov2(directory / sub, seed=seed + k)
        elif sub == "vitpose":
            build_tiny_vitpose(directory / sub, seed=seed + k)
        elif sub == "vitpose_ap10k":
            build_tiny_vitpose_plus(directory / sub, seed=seed + k, dataset="ap10k")
        else:
            torch.manual_seed(seed + k)
            builders[sub](directory / sub)
    logger.info("tiny annotators written to %s", directory)
    return directory


def _complete(folder: Path, subdirs: Sequence[str] = REQUIRED_SUBDIRS) -> bool:
    return all((folder / sub / "config.json").is_file() for sub in subdirs)


def tiny_annotator_dir(seed: int = 0) -> Path:
    """The tiny annotators' folder, ``cache_root()/tiny-annotators-v{V}-seed{seed}``, built once and atomically."""
    from ..model.presets import build_once, cache_root

    return build_once(cache_root() / f"tiny-annotators-v{TINY_ANNOTATORS_VERSION}-seed{seed}",
                      lambda folder: build_tiny_annotators(folder, seed=seed),
                      lambda folder: _complete(folder, SUBDIRS))
