"""ViTPose keypoints for the data engine (paper section 3.3): 17 COCO keypoints of a person, 17 AP-10K keypoints
of an animal (the layout of the authors' data, ``data.AP10K_KEYPOINTS``).

``VitPoseKeypoints`` runs ``VitPoseForPoseEstimation`` top-down in one box, with transformers' own processor for
the geometry: ``preprocess`` grows the box to the model's aspect, pads it by 1.25 and crops it by an affine warp;
``post_process_pose_estimation`` takes the heatmap argmax, refines it (DARK) and maps it back to the image. We use
the PIL backend, ``VitPoseImageProcessorPil``, which needs numpy and scipy only (``VitPoseImageProcessor`` is the
torchvision backend and falls back to the PIL one, with a warning, where torchvision is missing); both read the same
saved processor config, so tiny twins and hub checkpoints load through the same code.

:class:`KeypointConfig` says which subject classes get which keypoints (people COCO, animals AP-10K, anything else
the dense-correspondence points of ``dreamrelation.engine.keypoints``, which are also the fallback) and
:func:`resolve_keypoints` fills in a preset's pose models.

Which keypoints a checkpoint gives is read from its head's labels (``config.id2label``, see :func:`keypoint_layout`),
never assumed. ViTPose++ (``num_experts`` 6) picks its mixture-of-experts MLPs with ``dataset_index`` (COCO 0, AiC 1,
MPII 2, AP-10K 3, APT-36K 4, COCO-WholeBody 5), but a transformers model has one head: the hub's
``usyd-community/vitpose-plus-*`` conversions keep the COCO head only (transformers' ``convert_vitpose_to_hf.py``
drops ``associate_keypoint_heads``), so ``dataset_index=3`` with them decodes AP-10K features with the COCO head.
AP-10K keypoints need a checkpoint whose head is AP-10K's: :func:`convert_vitpose_plus` /
:func:`save_vitpose_plus` make one from the ViTPose authors' original ViTPose++ checkpoint (``vitpose+_base.pth``),
whose ``associate_keypoint_heads.2`` is the AP-10K head (their ``tools/model_split.py`` order).

Coordinates: the processor puts the COCO box (x, y, w, h) and the keypoints in one frame, the image array's index
frame (scipy's ``affine_transform`` samples array indices and ``transform_preds`` inverts that warp exactly), so a
returned point (x, y) has pixel centres at integers, as in ``dreamrelation.engine.keypoints``:
``mask[round(y), round(x)]`` is the pixel it lies in; no conversion is needed. The normalized box is handed over as
``x0 * W`` etc., the way ViTPose saw COCO boxes in training.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ..train.data import AP10K_KEYPOINTS, COCO_KEYPOINTS

logger = logging.getLogger(__name__)

__all__ = [
    "ANIMAL_CLASSES", "AP10K_DATASET_INDEX", "KeypointConfig", "PERSON_CLASSES", "POSE_LAYOUTS", "VITPOSE_ID",
    "VITPOSE_PLUS_DATASETS", "VitPoseKeypoints", "build_tiny_vitpose", "build_tiny_vitpose_plus", "check_pose_ref",
    "convert_vitpose_plus", "keypoint_layout", "pose_dataset_index", "resolve_keypoints", "save_vitpose_plus",
    "vitpose_base_config", "vitpose_plus_base_config",
]

VITPOSE_ID = "usyd-community/vitpose-base-simple"
POSE_LAYOUTS = {"coco": COCO_KEYPOINTS, "ap10k": AP10K_KEYPOINTS}  # layout name -> keypoint names, head order
# ViTPose++'s datasets in dataset_index (expert) order, and their keypoint counts
VITPOSE_PLUS_DATASETS = ("coco", "aic", "mpii", "ap10k", "apt36k", "wholebody")
VITPOSE_PLUS_KEYPOINTS = (17, 14, 16, 17, 17, 133)
AP10K_DATASET_INDEX = VITPOSE_PLUS_DATASETS.index("ap10k")  # 3
PERSON_CLASSES = ("person", "man", "woman", "boy", "girl", "child", "kid")  # keypoints by ViTPose (COCO layout)
# keypoints by ViTPose with an AP-10K head: AP-10K's species (and their everyday names); plush toys and figurines
# keep the dense-correspondence points (their shape is an animal's, their pose is not)
ANIMAL_CLASSES = (
    "animal", "antelope", "bear", "beaver", "bison", "black bear", "bobcat", "brown bear", "buffalo", "bull", "calf",
    "cat", "cheetah", "chimpanzee", "cow", "deer", "dog", "donkey", "elephant", "fox", "giraffe", "goat", "gorilla",
    "hamster", "hippo", "hippopotamus", "horse", "jaguar", "kitten", "lamb", "leopard", "lion", "marmot", "monkey",
    "moose", "mouse", "orangutan", "otter", "panda", "panther", "pig", "polar bear", "pony", "puppy", "rabbit",
    "raccoon", "rat", "rhino", "rhinoceros", "sheep", "skunk", "snow leopard", "squirrel", "tiger", "weasel", "wolf",
    "zebra",
)
# transformers' post-processing recovers box sizes with a fixed factor of 200 whatever the config says
NORMALIZE_FACTOR = 200.0


def _check_box(box: Sequence[float]) -> tuple[float, float, float, float]:
    """A normalized xyxy box -> its four floats, or ValueError naming ``box``."""
    if len(box) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                for v in box):
        raise ValueError(f"box must be 4 finite numbers [x0, y0, x1, y1], got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise ValueError(f"box must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got {list(box)!r}")
    return x0, y0, x1, y1


_NAME_PARTS = {"l": "left", "r": "right", "f": "front", "b": "back"}


def _label(name: str) -> str:
    """A keypoint label in our spelling: ``"L_F_Paw"`` -> ``"left_front_paw"``, ``"Root of tail"`` ->
    ``"root_of_tail"`` (the hub configs and mmpose spell them that way)."""
    parts = str(name).strip().lower().replace("-", " ").replace("_", " ").split()
    return "_".join(_NAME_PARTS.get(part, part) for part in parts)


def keypoint_layout(config) -> str | None:
    """The layout a ViTPose checkpoint's head predicts, from its labels (``config.id2label``, head order):
    ``"coco"`` or ``"ap10k"`` (``POSE_LAYOUTS``), None when its labels are neither (e.g. ``LABEL_0`` ...)."""
    labels = getattr(config, "id2label", None) or {}
    names = tuple(_label(labels[i]) for i in sorted(labels, key=int))
    return next((layout for layout, expected in POSE_LAYOUTS.items() if names == expected), None)


class VitPoseKeypoints:
    """The 17 keypoints of one subject (``VitPoseForPoseEstimation``, top-down in a box): COCO for a person model,
    AP-10K for an animal one (``layout``, read from the checkpoint's labels).

    ``__call__(image, box)``: ``box`` normalized xyxy of the subject in ``image``. Returns (17, 2) float32 pixel
    (x, y) in the head's order (``data.COCO_KEYPOINTS`` / ``data.AP10K_KEYPOINTS``), pixel centres at integers,
    clipped to the image, and (17,) float32 scores (heatmap peaks) clipped to [0, 1]. A keypoint whose peak is <= 0
    scores 0 and its position is meaningless (transformers decodes it from heatmap cell (-1, -1), near the padded
    box's top-left corner).

    Args:
        ref: a ``save_pretrained`` folder or hub id.
        device: where the model runs.
        dataset_index: the mixture-of-experts branch of a ViTPose++ checkpoint (``VITPOSE_PLUS_DATASETS`` order:
            3 for AP-10K); required for those, refused for single-dataset models.
        layout: the layout the caller needs (``"coco"`` / ``"ap10k"``); ``ValueError`` naming ``ref`` when the
            checkpoint's head predicts another (None: whatever it predicts, as long as it is a known layout).
    """

    def __init__(self, ref: str | Path = VITPOSE_ID, device: str | torch.device = "cpu",
                 dataset_index: int | None = None, layout: str | None = None) -> None:
        from transformers import VitPoseForPoseEstimation, VitPoseImageProcessorPil

        self.model = VitPoseForPoseEstimation.from_pretrained(str(ref)).to(device).eval()
        self.layout = _check_layout(self.model.config, ref, layout)
        experts = int(getattr(self.model.config.backbone_config, "num_experts", 1) or 1)
        self.dataset_index = _check_dataset_index(dataset_index, experts, ref)
        self.processor = VitPoseImageProcessorPil.from_pretrained(str(ref))
        factor = float(self.processor.normalize_factor)
        if factor != NORMALIZE_FACTOR:
            raise ValueError(f"ref {str(ref)!r} has normalize_factor {factor!r}; transformers' post-processing "
                             f"assumes {NORMALIZE_FACTOR}")
        size = self.processor.size
        self.input_hw = (int(size["height"]), int(size["width"]))
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, image: Image.Image, box: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(image, Image.Image):
            raise ValueError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
        x0, y0, x1, y1 = _check_box(box)
        width, height = image.size
        boxes = [[[x0 * width, y0 * height, (x1 - x0) * width, (y1 - y0) * height]]]  # per image, COCO xywh px
        inputs = self.processor(image.convert("RGB"), boxes=boxes, return_tensors="pt")
        extra = {}
        if self.dataset_index is not None:  # (batch,) expert index per crop
            extra["dataset_index"] = torch.tensor([self.dataset_index], device=self.device)
        outputs = self.model(pixel_values=inputs["pixel_values"].to(self.device), **extra)  # heatmaps (1, 17, h, w)
        outputs.heatmaps = outputs.heatmaps.float().cpu()
        (result,) = self.processor.post_process_pose_estimation(outputs, boxes=boxes)[0]
        points = result["keypoints"].double().numpy()  # (17, 2) pixel (x, y)
        points = np.clip(np.nan_to_num(points), 0.0, [width - 1, height - 1])
        scores = np.clip(np.nan_to_num(result["scores"].double().numpy()), 0.0, 1.0)  # (17,)
        return points.astype(np.float32), scores.astype(np.float32)


def _check_layout(config, ref, wanted: str | None) -> str:
    found = keypoint_layout(config)
    if wanted is not None and wanted not in POSE_LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(POSE_LAYOUTS)} or None, got {wanted!r}")
    if found is None or (wanted is not None and found != wanted):
        labels = [config.id2label[i] for i in sorted(config.id2label, key=int)][:4]
        hint = (" (the hub's ViTPose++ conversions keep only the COCO head; make an AP-10K checkpoint with "
                "dreamrelation.engine.pose.save_vitpose_plus from the original vitpose+ .pth)"
                if wanted == "ap10k" else "")
        raise ValueError(f"ref {str(ref)!r}: its head predicts {found or 'unknown'} keypoints (id2label starts "
                         f"{labels}), not {wanted or 'COCO or AP-10K'}{hint}")
    return found


def _check_dataset_index(index: int | None, experts: int, ref) -> int | None:
    if experts > 1:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < experts:
            raise ValueError(f"dataset_index must be an integer in [0, {experts - 1}] for the mixture-of-experts "
                             f"ViTPose {str(ref)!r} (AP-10K: {AP10K_DATASET_INDEX}), got {index!r}")
        return index
    if index not in (None, 0):
        raise ValueError(f"dataset_index must be None for the single-dataset ViTPose {str(ref)!r}, got {index!r}")
    return None


# ---------------------------------------------------------------------- the keypoints of each subject class

KEYPOINT_CHOICES = {"person": ("coco", "points"), "animal": ("ap10k", "points")}


def _classes(value: Any, name: str) -> tuple[str, ...]:
    if isinstance(value, str) or not all(isinstance(c, str) and c.strip() for c in value):
        raise ValueError(f"{name} must be a list of non-empty class names, got {value!r}")
    return tuple(" ".join(c.lower().split()) for c in value)


@dataclass(frozen=True)
class KeypointConfig:
    """How each subject gets its 17 keypoints (paper 3.3 annotates with X-Pose, which no registry has).

    Attributes:
        person: ``"coco"`` (ViTPose, COCO layout) or ``"points"`` for subjects of ``person_classes``.
        animal: ``"ap10k"`` (ViTPose with an AP-10K head: the layout of the authors' data) or ``"points"`` for
            subjects of ``animal_classes``.
        person_classes, animal_classes: the subject classes each covers (lowercase); any other class gets
            ``"points"``: 17 points on its subject-image mask carried into the target by dense correspondence,
            also the fallback where a pose model is missing or less confident than the keypoint gate asks.
        person_pose, animal_pose: ViTPose folders or hub ids; None: the preset's (``annotate.annotator_refs``; the
            ``sdxl`` preset has no public AP-10K head, so its animals get points until ``animal_pose`` names a
            ``pose.save_vitpose_plus`` folder).
        animal_dataset_index: the ViTPose++ expert ``animal_pose`` runs with (``pose.VITPOSE_PLUS_DATASETS``:
            3 = AP-10K); ignored by single-dataset checkpoints.
    """

    person: str = "coco"
    animal: str = "ap10k"
    person_classes: tuple[str, ...] = PERSON_CLASSES
    animal_classes: tuple[str, ...] = ANIMAL_CLASSES
    person_pose: str | None = None
    animal_pose: str | None = None
    animal_dataset_index: int = 3

    def __post_init__(self) -> None:
        for kind, choices in KEYPOINT_CHOICES.items():
            if getattr(self, kind) not in choices:
                raise ValueError(f"{kind} keypoints must be one of {list(choices)}, got {getattr(self, kind)!r}")
        for name in ("person_classes", "animal_classes"):
            object.__setattr__(self, name, _classes(getattr(self, name), name))
        both = sorted(set(self.person_classes) & set(self.animal_classes))
        if both:
            raise ValueError(f"person_classes and animal_classes must not share classes, got {both!r} in both")
        for name in ("person_pose", "animal_pose"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise ValueError(f"{name} must be None or a ViTPose folder / hub id, got {v!r}")
        v = self.animal_dataset_index
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"animal_dataset_index must be an integer >= 0 (AP-10K: 3), got {v!r}")

    def layout(self, phrase: str) -> str:
        """The keypoint layout asked for a subject class: ``"coco"``, ``"ap10k"`` or ``"points"``."""
        name = " ".join(str(phrase).lower().split())
        if name in self.person_classes:
            return self.person
        if name in self.animal_classes:
            return self.animal
        return "points"


def resolve_keypoints(keypoints: KeypointConfig, preset: str) -> tuple[KeypointConfig, list[str]]:
    """``keypoints`` with the preset's pose models filled in, and notes on what falls back: an AP-10K request
    without an AP-10K model becomes ``"points"`` (said in the notes, recorded in engine.json). Builds the tiny
    annotators for ``"tiny"`` (cached)."""
    from .annotate import annotator_refs

    refs = annotator_refs(preset)
    out = replace(keypoints, person_pose=keypoints.person_pose or refs.pose,
                  animal_pose=keypoints.animal_pose or refs.animal_pose)
    notes = []
    if out.animal == "ap10k" and out.animal_pose is None:
        out = replace(out, animal="points")
        notes.append(f"animal keypoints: dense-correspondence points, not AP-10K: preset {str(preset)!r} has no "
                     "AP-10K pose model (the hub's ViTPose++ keeps only its COCO head); give --animal-pose, a "
                     "folder made by dreamrelation.engine.pose.save_vitpose_plus")
    return out, notes


def _pose_config(ref: str):
    """The config of a local ViTPose folder, None for a hub id (read at load time instead)."""
    if not (Path(ref) / "config.json").is_file():
        return None
    from transformers import VitPoseConfig

    return VitPoseConfig.from_pretrained(ref)


def check_pose_ref(ref: str, layout: str) -> None:
    """``ValueError`` naming ``ref`` when a local ViTPose folder's head predicts another layout (before any sample
    runs: a wrong checkpoint is a systemic error, not a per-sample one)."""
    config = _pose_config(ref)
    if config is not None and keypoint_layout(config) != layout:
        raise ValueError(f"animal_pose {ref!r}: its head predicts {keypoint_layout(config) or 'unknown'} "
                         f"keypoints, not {layout}")


def pose_dataset_index(ref: str, index: int) -> int | None:
    """``index`` for a mixture-of-experts ViTPose (ViTPose++), None for a single-dataset one."""
    config = _pose_config(ref)
    if config is None:
        return index
    return index if int(getattr(config.backbone_config, "num_experts", 1) or 1) > 1 else None


# -------------------------------------------------------------------------------- ViTPose++ conversion
def _original_to_hf(key: str) -> str | None:
    """One key of an original (mmpose) ViTPose++ state dict -> the transformers key; None for keys inference
    never uses (``backbone.cls_token``). Heads are mapped by :func:`convert_vitpose_plus`."""
    if key == "backbone.cls_token":
        return None
    key = key.replace("backbone.patch_embed.proj", "backbone.embeddings.patch_embeddings.projection")
    key = key.replace("backbone.pos_embed", "backbone.embeddings.position_embeddings")
    key = key.replace("backbone.last_norm", "backbone.layernorm")
    key = key.replace("backbone.blocks.", "backbone.encoder.layer.")
    for old, new in ((".attn.proj.", ".attention.output.dense."), (".norm1.", ".layernorm_before."),
                     (".norm2.", ".layernorm_after.")):
        key = key.replace(old, new)
    return key


# the classic decoder: mmpose's deconv_layers (ConvTranspose, BN, ReLU) x 2 and final_layer
_HEAD_PARTS = {"deconv_layers.0.": "deconv1.", "deconv_layers.1.": "batchnorm1.", "deconv_layers.3.": "deconv2.",
               "deconv_layers.4.": "batchnorm2.", "final_layer.": "conv."}


def convert_vitpose_plus(state_dict: dict[str, torch.Tensor], dataset: str = "ap10k") -> dict[str, torch.Tensor]:
    """An original ViTPose++ state dict (mmpose ``TopDownMoE``: ``backbone.*``, ``keypoint_head.*`` for COCO,
    ``associate_keypoint_heads.{i}.*`` for the other datasets) -> a transformers ``VitPoseForPoseEstimation``
    state dict whose one head is ``dataset``'s (all experts kept: run it with ``dataset_index`` =
    ``VITPOSE_PLUS_DATASETS.index(dataset)``). The fused ``attn.qkv`` is split into query / key / value; the head's
    last layer keeps the dataset's keypoints (ViTPose's ``tools/model_split.py`` does the same)."""
    if dataset not in VITPOSE_PLUS_DATASETS:
        raise ValueError(f"dataset must be one of {list(VITPOSE_PLUS_DATASETS)}, got {dataset!r}")
    index = VITPOSE_PLUS_DATASETS.index(dataset)
    head = "keypoint_head." if index == 0 else f"associate_keypoint_heads.{index - 1}."
    if not any(k.startswith(head) for k in state_dict):
        raise ValueError(f"state_dict has no {head}* keys: not a ViTPose++ checkpoint with a {dataset} head "
                         f"(first keys: {list(state_dict)[:3]})")
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith(head):
            part = key[len(head):]
            prefix = next((p for p in _HEAD_PARTS if part.startswith(p)), None)
            if prefix is None:
                raise ValueError(f"state_dict key {key!r}: not a part of ViTPose's classic decoder")
            if prefix == "final_layer.":  # (K_max, 256, 1, 1) -> the dataset's K keypoints
                value = value[:VITPOSE_PLUS_KEYPOINTS[index]]
            out["head." + _HEAD_PARTS[prefix] + part[len(prefix):]] = value
        elif key.startswith(("keypoint_head.", "associate_keypoint_heads.")):
            continue  # the other datasets' heads
        elif ".attn.qkv." in key:
            third = value.shape[0] // 3  # (3 * d, ...) -> query, key, value
            for k, name in enumerate(("query", "key", "value")):
                out[_original_to_hf(key.replace(".attn.qkv.", f".attention.attention.{name}."))] = \
                    value[k * third:(k + 1) * third]
        else:
            new = _original_to_hf(key)
            if new is not None:
                out[new] = value
    return out


def _plus_config_from(state_dict: dict[str, torch.Tensor], dataset: str, image_size=(256, 192)):
    """The ``VitPoseConfig`` of a converted ViTPose++ state dict, read off its shapes."""
    from transformers import VitPoseBackboneConfig, VitPoseConfig

    hidden = state_dict["backbone.embeddings.patch_embeddings.projection.weight"].shape[0]
    patch = state_dict["backbone.embeddings.patch_embeddings.projection.weight"].shape[2]
    layers = 1 + max(int(k.split(".")[3]) for k in state_dict if k.startswith("backbone.encoder.layer."))
    experts = 1 + max(int(k.split(".")[6]) for k in state_dict if ".mlp.experts." in k)
    fc1 = state_dict["backbone.encoder.layer.0.mlp.fc1.weight"].shape[0]
    part = state_dict["backbone.encoder.layer.0.mlp.experts.0.weight"].shape[0]
    heads = {384: 12, 768: 12, 1024: 16, 1280: 16}.get(hidden, max(1, hidden // 64))  # ViTPose-S/B/L/H
    backbone = VitPoseBackboneConfig(hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, mlp_ratio=fc1 // hidden,
                                     image_size=list(image_size), patch_size=[patch, patch], qkv_bias=True,
                                     out_indices=[layers], num_experts=experts, part_features=part)
    names = POSE_LAYOUTS.get(dataset)
    labels = dict(enumerate(names)) if names else None
    return VitPoseConfig(backbone_config=backbone.to_dict(), use_simple_decoder=False,
                         **({"id2label": labels} if labels else {}))


def save_vitpose_plus(original: str | Path, directory: str | Path, dataset: str = "ap10k") -> Path:
    """Make a transformers ViTPose folder from an original ViTPose++ checkpoint (``vitpose+_base.pth`` ...): its
    ``dataset`` head (default AP-10K), every expert, the 256x192 processor; loaded strictly. Run the result with
    ``VitPoseKeypoints(directory, dataset_index=VITPOSE_PLUS_DATASETS.index(dataset))``."""
    from transformers import VitPoseForPoseEstimation, VitPoseImageProcessorPil

    checkpoint = torch.load(str(original), map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"original {str(original)!r} is not a state dict (or a dict holding 'state_dict')")
    converted = convert_vitpose_plus(state, dataset)
    model = VitPoseForPoseEstimation(_plus_config_from(converted, dataset))
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ValueError(f"original {str(original)!r} does not fit ViTPose++: missing keys {missing[:5]}, "
                         f"unexpected keys {unexpected[:5]}")
    directory = Path(directory)
    model.save_pretrained(directory)
    VitPoseImageProcessorPil().save_pretrained(directory)
    logger.info("ViTPose++ (%s head) written to %s", dataset, directory)
    return directory


# -------------------------------------------------------------------------------- config and tiny twin
def vitpose_base_config():
    """``VitPoseConfig`` of ``usyd-community/vitpose-base-simple`` (ViT-B/16 at 256x192, simple decoder, 17
    COCO keypoints)."""
    from transformers import VitPoseBackboneConfig, VitPoseConfig

    backbone = VitPoseBackboneConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                                     image_size=[256, 192], patch_size=[16, 16], qkv_bias=True, out_indices=[12])
    return VitPoseConfig(backbone_config=backbone.to_dict(), use_simple_decoder=True, scale_factor=4,
                         id2label=dict(enumerate(COCO_KEYPOINTS)))


def vitpose_plus_base_config(dataset: str = "ap10k"):
    """The ``VitPoseConfig`` of ViTPose++-B with ``dataset``'s head (:func:`save_vitpose_plus` output): ViT-B/16 at
    256x192, 6 experts of 192 features per MLP, classic decoder, 17 AP-10K keypoints by default."""
    from transformers import VitPoseBackboneConfig, VitPoseConfig

    backbone = VitPoseBackboneConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                                     image_size=[256, 192], patch_size=[16, 16], qkv_bias=True, out_indices=[12],
                                     num_experts=len(VITPOSE_PLUS_DATASETS), part_features=192)
    return VitPoseConfig(backbone_config=backbone.to_dict(), use_simple_decoder=False,
                         id2label=dict(enumerate(POSE_LAYOUTS[dataset])))


def build_tiny_vitpose(directory: str | Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide random ``VitPoseForPoseEstimation`` (64x48 input, 17 COCO keypoints) + its image
    processor, saved in the real format; loads with ``VitPoseKeypoints(directory)``."""
    return _save_tiny_vitpose(directory, seed, COCO_KEYPOINTS, {}, {})


def build_tiny_vitpose_plus(directory: str | Path, seed: int = 0, dataset: str = "ap10k") -> Path:
    """A 2-layer, 32-wide random ViTPose++ (6 experts of 8 features, classic decoder, 64x48 input) with
    ``dataset``'s 17-point head, saved in the real format; loads with ``VitPoseKeypoints(directory,
    dataset_index=3)`` for AP-10K, like a :func:`save_vitpose_plus` folder."""
    return _save_tiny_vitpose(directory, seed, POSE_LAYOUTS[dataset],
                              {"num_experts": len(VITPOSE_PLUS_DATASETS), "part_features": 8},
                              {"use_simple_decoder": False})


def _save_tiny_vitpose(directory: str | Path, seed: int, labels, backbone_extra: dict, config_extra: dict) -> Path:
    """The tiny ViTPose (``backbone_extra``: ViTPose++ experts; ``config_extra``: its classic decoder) with the
    keypoint ``labels`` and the PIL image processor (no torchvision; it saves the same "VitPoseImageProcessor")."""
    from transformers import (
        VitPoseBackboneConfig,
        VitPoseConfig,
        VitPoseForPoseEstimation,
        VitPoseImageProcessorPil,
    )

    directory = Path(directory)
    torch.manual_seed(seed)
    backbone = VitPoseBackboneConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                                     image_size=[64, 48], patch_size=[8, 8], out_indices=[2], **backbone_extra)
    model = VitPoseForPoseEstimation(VitPoseConfig(backbone_config=backbone.to_dict(), **config_extra,
                                                   id2label=dict(enumerate(labels))))
    model.save_pretrained(directory)
    VitPoseImageProcessorPil(size={"height": 64, "width": 48}).save_pretrained(directory)
    logger.info("tiny ViTPose (%d experts) written to %s", backbone_extra.get("num_experts", 1), directory)
    return directory
