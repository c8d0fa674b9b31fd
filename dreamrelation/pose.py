"""ViTPose person keypoints for the data engine (paper section 3.3): the 17 COCO keypoints of a ``person`` subject.

``VitPoseKeypoints`` runs ``VitPoseForPoseEstimation`` top-down in one box, with transformers' own processor for
the geometry: ``preprocess`` grows the box to the model's aspect, pads it by 1.25 and crops it by an affine warp;
``post_process_pose_estimation`` takes the heatmap argmax, refines it (DARK) and maps it back to the image. We use
the PIL backend, ``VitPoseImageProcessorPil``, which needs numpy and scipy only (``VitPoseImageProcessor`` is the
torchvision backend and falls back to the PIL one, with a warning, where torchvision is missing); both read the same
saved processor config, so tiny twins and hub checkpoints load through the same code.

Coordinates: the processor puts the COCO box (x, y, w, h) and the keypoints in one frame, the image array's index
frame (scipy's ``affine_transform`` samples array indices and ``transform_preds`` inverts that warp exactly), so a
returned point (x, y) has pixel centres at integers, as in ``dreamrelation.keypoints``: ``mask[round(y), round(x)]``
is the pixel it lies in; no conversion is needed. The normalized box is handed over as ``x0 * W`` etc., the way
ViTPose saw COCO boxes in training.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .data import COCO_KEYPOINTS

logger = logging.getLogger(__name__)

__all__ = ["VITPOSE_ID", "VitPoseKeypoints", "build_tiny_vitpose", "vitpose_base_config"]

VITPOSE_ID = "usyd-community/vitpose-base-simple"
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


class VitPoseKeypoints:
    """The 17 COCO person keypoints of one subject (``VitPoseForPoseEstimation``, top-down in a box).

    ``__call__(image, box)``: ``box`` normalized xyxy of the person in ``image``. Returns (17, 2) float32 pixel
    (x, y) in COCO order (``data.COCO_KEYPOINTS``), pixel centres at integers, clipped to the image, and (17,)
    float32 scores (heatmap peaks) clipped to [0, 1]. A keypoint whose peak is <= 0 scores 0 and its position is
    meaningless (transformers decodes it from heatmap cell (-1, -1), near the padded box's top-left corner).
    """

    def __init__(self, ref: str | Path = VITPOSE_ID, device: str | torch.device = "cpu") -> None:
        from transformers import VitPoseForPoseEstimation, VitPoseImageProcessorPil

        self.model = VitPoseForPoseEstimation.from_pretrained(str(ref)).to(device).eval()
        if getattr(self.model.config.backbone_config, "num_experts", 1) > 1:
            raise ValueError(f"ref {str(ref)!r} is a mixture-of-experts ViTPose; only single-dataset models are "
                             "supported")
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
        outputs = self.model(pixel_values=inputs["pixel_values"].to(self.device))  # heatmaps (1, 17, h, w)
        outputs.heatmaps = outputs.heatmaps.float().cpu()
        (result,) = self.processor.post_process_pose_estimation(outputs, boxes=boxes)[0]
        points = result["keypoints"].double().numpy()  # (17, 2) pixel (x, y)
        points = np.clip(np.nan_to_num(points), 0.0, [width - 1, height - 1])
        scores = np.clip(np.nan_to_num(result["scores"].double().numpy()), 0.0, 1.0)  # (17,)
        return points.astype(np.float32), scores.astype(np.float32)


# -------------------------------------------------------------------------------- config and tiny twin
def vitpose_base_config():
    """``VitPoseConfig`` of ``usyd-community/vitpose-base-simple`` (ViT-B/16 at 256x192, simple decoder, 17
    COCO keypoints)."""
    from transformers import VitPoseBackboneConfig, VitPoseConfig

    backbone = VitPoseBackboneConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                                     image_size=[256, 192], patch_size=[16, 16], qkv_bias=True, out_indices=[12])
    return VitPoseConfig(backbone_config=backbone.to_dict(), use_simple_decoder=True, scale_factor=4,
                         id2label=dict(enumerate(COCO_KEYPOINTS)))


def build_tiny_vitpose(directory: str | Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide random ``VitPoseForPoseEstimation`` (64x48 input, 17 COCO keypoints) + its image
    processor, saved in the real format; loads with ``VitPoseKeypoints(directory)``."""
    # the PIL processor class needs no torchvision and saves the same config ("VitPoseImageProcessor")
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation, VitPoseImageProcessorPil

    directory = Path(directory)
    torch.manual_seed(seed)
    backbone = VitPoseBackboneConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                                     image_size=[64, 48], patch_size=[8, 8], out_indices=[2])
    model = VitPoseForPoseEstimation(VitPoseConfig(backbone_config=backbone.to_dict(),
                                                   id2label=dict(enumerate(COCO_KEYPOINTS))))
    model.save_pretrained(directory)
    VitPoseImageProcessorPil(size={"height": 64, "width": 48}).save_pretrained(directory)
    logger.info("tiny ViTPose written to %s", directory)
    return directory
