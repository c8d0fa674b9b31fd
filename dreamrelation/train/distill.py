"""Local Image Encoder self-distillation: CLIPSelf (Wu et al. 2023) as DreamRelation uses it (paper 3.4.3, supp. 8).

Per image, a random M x N grid is laid over it and up to ``max_cells`` of its cells are drawn. For each cell:

* student: the 1x1 roi-align of the cell's box over the student's dense map of the FULL image, computed exactly as
  the encoder computes local tokens (``SubjectEncoder.dense_features``: MaskCLIP last block, ``post_layernorm``,
  L2-normalized per patch);
* teacher: a frozen copy of the original tower embeds the cell's crop, letterboxed (longest side resized to the
  tower's ``image_size``, centred on black, as OpenCLIP's ``ResizeMaxSize``; never squashed), through its full
  last block: ``pooler_output = post_layernorm(CLS)``;
* loss: ``mean(1 - cos(student, teacher))`` over every cell of the optimizer step.

The full image is resized to an ``image_size`` square (as the encoder resizes subject images, so that training
sees what inference sees); both sides use the OpenAI CLIP normalization of ``SubjectEncoder.preprocess``.

Feature space (``feature_space``). ``"post_layernorm"`` (default) compares both sides before the visual
projection, because that is what DreamRelation reads: its local tokens are pre-projection (width 1664 for bigG,
the Resampler's input; the projection would give 1280); the projection, and the last block's q/k (unused by the
MaskCLIP path), get no gradient and stay as they were. ``"projected"`` is CLIPSelf's own choice: both sides
after ``visual_projection`` (the student's projection then trains too).

Recipe (CLIPSelf's, the paper states only Adam, lr 1e-5, weight decay 0.1): micro-batches of ``batch_size`` images
accumulate gradients to an optimizer step of ``effective_batch`` images (16; the last step of an epoch may be
smaller) whose loss is the mean over all its cells; the learning rate warms up linearly over ``warmup_steps``
optimizer steps and then follows a cosine to 0 at the last step (``schedule="cosine"``; ``"constant"`` keeps it
flat after the warm-up). Grid choices follow CLIPSelf's ``GridDistillDataset``: M (rows) in 1..max_grid, N
(columns) in ceil(M/2)..min(2M, max_grid), cells shuffled and the first ``max_cells`` kept. Weight decay, as in
OpenCLIP's trainer, spares 0-/1-D tensors (norm gains, biases, the class embedding). Images stream: a folder is
read through :class:`ImageFolder`, one image decoded when its micro-batch needs it.

Output: ``local_encoder.safetensors`` (HF ``CLIPVisionModelWithProjection`` key names) + ``local_encoder.json``,
and optionally CLIPSelf-style ``epoch_N.pt`` (``{"epoch", "name", "state_dict"}``, ``module.visual.*`` keys).
``SubjectEncoder.load_local_checkpoint`` (``--local-encoder``) loads either, or the output folder itself.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPVisionModelWithProjection

from ..model.config import EncoderConfig
from ..model.encoders import (
    LOCAL_CHECKPOINT_NAME,
    SubjectEncoder,
    hf_to_open_clip_visual,
    roi_align_1x1,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CARD_NAME",
    "CHECKPOINT_NAME",
    "cell_features",
    "DistillConfig",
    "DistillResult",
    "FEATURE_SPACES",
    "IMAGE_SUFFIXES",
    "ImageFolder",
    "SCHEDULES",
    "distill",
    "distill_loss",
    "evaluate",
    "grid_choices",
    "hf_to_open_clip_visual",
    "learning_rate",
    "letterbox",
    "optimizer_steps",
    "sample_grid_cells",
    "save_local_encoder",
    "save_open_clip_checkpoint",
]

CHECKPOINT_NAME = LOCAL_CHECKPOINT_NAME  # local_encoder.safetensors: what --local-encoder reads
CARD_NAME = "local_encoder.json"
CARD_FORMAT = "dreamrelation-local-encoder"
CARD_VERSION = 2
FEATURE_SPACES = ("post_layernorm", "projected")
SCHEDULES = ("cosine", "constant")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


# ------------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class DistillConfig:
    """CLIPSelf hyper-parameters; defaults are the paper's (supp. 8: Adam, lr 1e-5, wd 0.1, 6 epochs) and
    CLIPSelf's (grid, 1000 warm-up steps, cosine decay, 16 images per optimizer step).

    ``batch_size`` images go through the towers at once (memory); gradients accumulate over
    ``ceil(effective_batch / batch_size)`` of those micro-batches per optimizer step. ``image_size`` is the
    student's input side (None: the encoder's ``local_image_size``, 896 for bigG); ``checkpoint_every`` writes
    ``epoch_N.pt`` every that many epochs and after the last one (None: never). ``feature_space``: see the module.
    """

    max_grid: int = 6
    max_cells: int = 20
    lr: float = 1e-5
    weight_decay: float = 0.1
    epochs: int = 6
    batch_size: int = 2
    image_size: int | None = None
    seed: int = 0
    checkpoint_every: int | None = None
    effective_batch: int = 16
    warmup_steps: int = 1000
    schedule: str = "cosine"
    feature_space: str = "post_layernorm"

    def __post_init__(self) -> None:
        for name in ("max_grid", "max_cells", "epochs", "batch_size", "effective_batch"):
            _positive_int(name, getattr(self, name))
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        if self.feature_space not in FEATURE_SPACES:
            raise ValueError(f"feature_space must be one of {list(FEATURE_SPACES)}, got {self.feature_space!r}")
        for name in ("image_size", "checkpoint_every"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if not isinstance(self.weight_decay, (int, float)) or not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be a non-negative finite number, got {self.weight_decay!r}")


def optimizer_steps(num_images: int, config: DistillConfig) -> int:
    """Optimizer steps of a run over ``num_images`` images: per epoch, one every
    ``ceil(effective_batch / batch_size)`` micro-batches of ``batch_size`` images, the last one maybe short."""
    micro = math.ceil(num_images / config.batch_size)
    return config.epochs * math.ceil(micro / _accumulation(config))


def _accumulation(config: DistillConfig) -> int:
    return max(1, math.ceil(config.effective_batch / config.batch_size))


def learning_rate(step: int, total_steps: int, config: DistillConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total_steps``: OpenCLIP's ``cosine_lr`` (which
    CLIPSelf uses): ``lr * (step + 1) / warmup_steps`` during the warm-up, then ``0.5 * (1 + cos(pi * e / es)) *
    lr`` with ``e = step - warmup_steps``, ``es = total_steps - warmup_steps`` (``"constant"``: ``lr``)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    span = max(total_steps - config.warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * (step - config.warmup_steps) / span)) * config.lr


def _positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class DistillResult:
    """What ``distill`` produced: the loss of every step, the files written and the trained student."""

    losses: tuple[float, ...]  # per optimizer step: mean 1 - cos over every cell of the step
    checkpoint: Path  # local_encoder.safetensors
    card: Path  # local_encoder.json
    open_clip_checkpoints: tuple[Path, ...]  # epoch_N.pt, when checkpoint_every is set
    model: CLIPVisionModelWithProjection  # the trained student (the caller's model is left untouched)
    learning_rates: tuple[float, ...] = ()  # per optimizer step


# ------------------------------------------------------------------------------------------- grid cells
def grid_choices(max_grid: int) -> list[tuple[int, int]]:
    """CLIPSelf's (rows M, columns N) grids: M in 1..max_grid, N in ceil(M/2)..min(2M, max_grid)."""
    _positive_int("max_grid", max_grid)
    return [(m, n) for m in range(1, max_grid + 1) for n in range((m + 1) // 2, min(2 * m, max_grid) + 1)]


def sample_grid_cells(rng: random.Random, max_grid: int, max_cells: int) -> tuple[tuple[int, int], torch.Tensor]:
    """Draw a grid and up to ``max_cells`` of its cells in random order.

    Returns ((M, N), boxes) with boxes (min(M*N, max_cells), 4) normalized xyxy in [0, 1].
    """
    _positive_int("max_cells", max_cells)
    rows, cols = rng.choice(grid_choices(max_grid))
    cells = list(range(rows * cols))
    rng.shuffle(cells)
    cells = torch.tensor(cells[:max_cells])  # row-major cell index
    r, c = cells // cols, cells % cols  # (K,) each
    boxes = torch.stack((c / cols, r / rows, (c + 1) / cols, (r + 1) / rows), dim=-1).float()  # (K, 4)
    return (rows, cols), boxes


def _crop(image: Image.Image, box: torch.Tensor) -> Image.Image:
    """The image region under a normalized xyxy box, at least one pixel each way."""
    w, h = image.size
    x0, y0 = min(round(box[0].item() * w), w - 1), min(round(box[1].item() * h), h - 1)
    x1, y1 = max(round(box[2].item() * w), x0 + 1), max(round(box[3].item() * h), y0 + 1)
    return image.crop((x0, y0, x1, y1))


def letterbox(image: Image.Image, size: int) -> Image.Image:
    """``image`` on a black ``size`` x ``size`` square: the longest side resized to ``size`` (bicubic), the
    aspect ratio kept, centred (OpenCLIP's ``ResizeMaxSize(size, fill=0)``, which CLIPSelf's crops go through)."""
    w, h = image.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = Image.new("RGB", (size, size))
    canvas.paste(image.convert("RGB").resize((nw, nh), Image.Resampling.BICUBIC), ((size - nw) // 2, (size - nh) // 2))
    return canvas


class ImageFolder(Sequence):
    """The images of a folder (``IMAGE_SUFFIXES``, sorted by name, not recursive), decoded one at a time when read:
    a COCO-sized folder streams instead of being held in memory. An unreadable file is logged and read as None
    (skipped by ``distill``)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ValueError(f"folder {str(folder)!r} is not a directory")
        self.files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Image.Image | None:  # type: ignore[override]
        path = self.files[index]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            logger.warning("skipping unreadable image %s: %s", path, exc)
            return None


# ----------------------------------------------------------------------------------------------- loss
def distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """CLIPSelf loss ``mean(1 - cos(student, teacher))``; student, teacher: (K, C) -> scalar."""
    if student.shape != teacher.shape or student.ndim != 2:
        raise ValueError(
            f"student and teacher must both be (K, C), got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def _as_image(item: object, index: int) -> Image.Image:
    if isinstance(item, Mapping) and "image" in item:  # datasets-style rows
        item = item["image"]
    if not isinstance(item, Image.Image):
        raise ValueError(f"images item {index} must be a PIL.Image.Image or a mapping with 'image', got "
                         f"{type(item).__name__}")
    return item.convert("RGB")


def _sized(images: Sequence | Iterable) -> bool:
    return isinstance(images, Sequence) or (hasattr(images, "__len__") and hasattr(images, "__getitem__"))


def _epoch_images(images: Sequence | Iterable, rng: random.Random | None) -> Iterable[Image.Image]:
    """One pass over the images: sequences in an order shuffled by ``rng`` (if given), iterables as they come.
    Items read as None (an unreadable file of an ``ImageFolder``) are skipped."""
    if _sized(images):
        order = list(range(len(images)))
        if rng is not None:
            rng.shuffle(order)
        items: Iterable = ((i, images[i]) for i in order)
    else:
        items = enumerate(images)
    return (_as_image(item, i) for i, item in items if item is not None)


def _batches(stream: Iterable[Image.Image], size: int) -> Iterable[list[Image.Image]]:
    batch: list[Image.Image] = []
    for image in stream:
        batch.append(image)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:  # the last, partial batch is kept (small relation-sized sets)
        yield batch


# ----------------------------------------------------------------------------------------------- training
def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """OpenCLIP's split: weight decay on >= 2-D tensors only (not on norm gains, biases, class embedding)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _step_features(
    student: SubjectEncoder,
    teacher: SubjectEncoder,
    images: list[Image.Image],
    rng: random.Random,
    config: DistillConfig,
    image_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student roi features and teacher crop embeddings of every drawn cell of the batch: (K_total, C) each; C is
    the tower's width (``post_layernorm``) or its projection's (``projected``)."""
    teacher_size = teacher.config.image_size
    cells = [sample_grid_cells(rng, config.max_grid, config.max_cells)[1] for _ in images]  # each (K_i, 4)

    dense = student.dense_features(student.preprocess(images, image_size))  # (B, C, g, g), L2-normalized
    _, _, h, w = dense.shape
    scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=dense.device)
    # image i's boxes pool image i's map only: (1, C, g, g) x (1, K_i, 4) -> (K_i, C)
    student_feats = torch.cat([
        roi_align_1x1(dense[i : i + 1], (boxes.to(dense.device) * scale)[None], aligned=True)[0]
        for i, boxes in enumerate(cells)
    ])

    crops = [letterbox(_crop(image, box), teacher_size) for image, boxes in zip(images, cells) for box in boxes]
    tower = teacher.vision_model
    param = next(tower.parameters())
    with torch.no_grad():
        pixels = teacher.preprocess(crops, teacher_size).to(device=param.device, dtype=param.dtype)
        teacher_feats = tower.vision_model(pixel_values=pixels).pooler_output  # (K_total, C): post_layernorm(CLS)
        if config.feature_space == "projected":
            teacher_feats = tower.visual_projection(teacher_feats)  # (K_total, P): CLIP's image embedding
    if config.feature_space == "projected":
        # (K_total, C) -> (K_total, P); linear, so projecting the pooled cell equals pooling the projected map
        projection = student.vision_model.visual_projection
        student_feats = projection(student_feats.to(projection.weight.dtype))
    return student_feats, teacher_feats.to(student_feats.device)


def _shells(
    student_model: CLIPVisionModelWithProjection, teacher_model: CLIPVisionModelWithProjection, image_size: int
) -> tuple[SubjectEncoder, SubjectEncoder]:
    """SubjectEncoder shells that lend their preprocessing (one resize: ``subject_resize`` equals the target side)
    and the dense-feature path to the student (at ``image_size``) and the teacher (at its own ``image_size``)."""
    teacher_size = int(teacher_model.config.image_size)
    student = SubjectEncoder(
        student_model, EncoderConfig(image_size=teacher_size, local_image_size=image_size, subject_resize=image_size)
    )
    side = teacher_size
    teacher = SubjectEncoder(teacher_model, EncoderConfig(image_size=side, local_image_size=side, subject_resize=side))
    return student, teacher


def _resolve_image_size(
    model: CLIPVisionModelWithProjection, config: DistillConfig, encoder_config: EncoderConfig | None
) -> int:
    image_size = config.image_size or (encoder_config or EncoderConfig()).local_image_size
    patch = int(model.config.patch_size)
    if image_size < patch:
        raise ValueError(f"config.image_size must be at least the patch size {patch}, got {image_size}")
    return image_size


@torch.no_grad()
def cell_features(
    student_model: CLIPVisionModelWithProjection,
    teacher_model: CLIPVisionModelWithProjection,
    images: Sequence[Image.Image] | Iterable,
    config: DistillConfig = DistillConfig(),
    encoder_config: EncoderConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student roi features and teacher crop embeddings of every cell of ``images``: (K, width) each.

    Images are read in order and cells drawn with ``config.seed``, so two students are compared on the same cells.
    """
    image_size = _resolve_image_size(student_model, config, encoder_config)
    student, teacher = _shells(student_model, teacher_model, image_size)
    rng = random.Random(config.seed)
    pairs = [
        _step_features(student, teacher, batch, rng, config, image_size)
        for batch in _batches(_epoch_images(images, None), config.batch_size)
    ]
    if not pairs:
        raise ValueError("images yielded no image; pass a non-empty collection")
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


def evaluate(
    student_model: CLIPVisionModelWithProjection,
    teacher_model: CLIPVisionModelWithProjection,
    images: Sequence[Image.Image] | Iterable,
    config: DistillConfig = DistillConfig(),
    encoder_config: EncoderConfig | None = None,
) -> float:
    """The distillation loss over every cell of ``images`` (cells as in ``cell_features``)."""
    return float(distill_loss(*cell_features(student_model, teacher_model, images, config, encoder_config)))


def distill(
    vision_model: CLIPVisionModelWithProjection,
    images: Sequence[Image.Image] | Iterable,
    config: DistillConfig,
    output_dir: str | Path,
    callback: Callable[[int, float], None] | None = None,
    encoder_config: EncoderConfig | None = None,
    teacher: CLIPVisionModelWithProjection | None = None,
    provenance: Mapping | None = None,
) -> DistillResult:
    """Self-distil a copy of ``vision_model`` into the Local Image Encoder and save it to ``output_dir``.

    Args:
        vision_model: the CLIP vision tower (ViT-bigG for the real model); left untouched. The student is a copy
            on its device and dtype, and so is the default teacher (memory: two towers plus AdamW state).
        images: PIL images (or rows with an ``image`` key): a sequence (e.g. an :class:`ImageFolder`, decoded
            lazily), shuffled each epoch with ``config.seed``, or any re-iterable collection, read in order (its
            length is counted once, for the cosine schedule's number of steps).
        config: hyper-parameters; ``image_size`` None takes ``encoder_config.local_image_size``.
        output_dir: where ``local_encoder.safetensors``, ``local_encoder.json`` and ``epoch_N.pt`` go.
        callback: called after every optimizer step with (step starting at 1, loss).
        encoder_config: the encoder the result is for (default ``EncoderConfig()``).
        teacher: the frozen teacher (put in eval mode, read under no_grad, never changed); None: a frozen copy
            of ``vision_model``. Passing ``vision_model`` itself saves one tower's memory.
        provenance: recorded in the card as ``"source"`` (e.g. the preset and fingerprint of the distilled tower).
    Returns:
        the per-step losses and learning rates, the written files and the trained student.
    """
    if not isinstance(vision_model, CLIPVisionModelWithProjection):
        raise ValueError(f"vision_model must be a CLIPVisionModelWithProjection, got {type(vision_model).__name__}")
    if teacher is not None and not isinstance(teacher, CLIPVisionModelWithProjection):
        raise ValueError(f"teacher must be a CLIPVisionModelWithProjection or None, got {type(teacher).__name__}")
    if teacher is not None and teacher.config.hidden_size != vision_model.config.hidden_size:
        raise ValueError(
            f"teacher width {teacher.config.hidden_size} must equal vision_model width "
            f"{vision_model.config.hidden_size}"
        )
    if iter(images) is images:  # every epoch reads the images again
        raise ValueError(f"images must be a re-iterable collection (a sequence, an ImageFolder, a dataset), got a "
                         f"one-shot {type(images).__name__}")
    image_size = _resolve_image_size(vision_model, config, encoder_config)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    # 1. the student is a trainable copy; the teacher is frozen (no_grad in _step_features)
    student_model = copy.deepcopy(vision_model).train().requires_grad_(True)
    teacher_model = copy.deepcopy(vision_model).requires_grad_(False) if teacher is None else teacher
    teacher_model.eval()
    student, teacher_shell = _shells(student_model, teacher_model, image_size)
    params = list(student_model.parameters())
    optimizer = torch.optim.AdamW(_param_groups(student_model, config.weight_decay), lr=config.lr)
    rng = random.Random(config.seed)
    # the cosine schedule needs the number of steps: a sized collection says it, an iterable is counted once
    num_images = len(images) if _sized(images) else sum(1 for _ in images)
    total_steps = optimizer_steps(num_images, config)
    accumulation = _accumulation(config)

    # 2. epochs of optimizer steps, each over `accumulation` micro-batches (gradients summed over cells, then
    # divided by the step's cell count: the step's loss is the mean over all its cells, however it was split)
    losses: list[float] = []
    lrs: list[float] = []
    open_clip_paths: list[Path] = []

    def optimizer_step(loss_sum: float, cells: int) -> None:
        lr = learning_rate(len(losses), total_steps, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for p in params:
            if p.grad is not None:
                p.grad.div_(cells)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss_sum / cells)
        lrs.append(lr)
        if callback is not None:
            callback(len(losses), losses[-1])

    for epoch in range(1, config.epochs + 1):
        seen, micro, loss_sum, cells = 0, 0, 0.0, 0
        optimizer.zero_grad(set_to_none=True)
        for batch in _batches(_epoch_images(images, rng), config.batch_size):
            student_feats, teacher_feats = _step_features(student, teacher_shell, batch, rng, config, image_size)
            loss = distill_loss(student_feats, teacher_feats) * len(student_feats)  # the sum over the cells
            loss.backward()
            loss_sum, cells, micro = loss_sum + float(loss.detach()), cells + len(student_feats), micro + 1
            seen += len(batch)
            if micro == accumulation:
                optimizer_step(loss_sum, cells)
                micro, loss_sum, cells = 0, 0.0, 0
        if micro:  # the short last step of the epoch
            optimizer_step(loss_sum, cells)
        if seen == 0:
            raise ValueError(f"images yielded no image in epoch {epoch}; pass a non-empty, re-iterable collection")
        logger.info("distill epoch %d/%d: %d images, last loss %.4f", epoch, config.epochs, seen, losses[-1])
        every = config.checkpoint_every
        if every is not None and (epoch % every == 0 or epoch == config.epochs):
            path = output_dir / f"epoch_{epoch}.pt"
            save_open_clip_checkpoint(student_model, path, epoch=epoch)
            open_clip_paths.append(path)

    # 3. save: safetensors in HF names + card
    student_model.eval().requires_grad_(False)
    card = {
        "format": CARD_FORMAT,
        "version": CARD_VERSION,
        "method": "clipself",
        "feature_space": config.feature_space,
        "teacher_crops": "letterbox",
        "image_size": image_size,
        "teacher_image_size": teacher_shell.config.image_size,
        "images": num_images,
        "steps": len(losses),
        "images_per_step": min(accumulation * config.batch_size, num_images),
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "final_lr": lrs[-1],
        "config": asdict(config),
        "source": dict(provenance or {}),
        "epoch_checkpoints": [p.name for p in open_clip_paths],
        "vision_config": json.loads(student_model.config.to_json_string(use_diff=False)),
    }
    checkpoint, card_path = save_local_encoder(student_model, output_dir, card)
    return DistillResult(
        losses=tuple(losses), checkpoint=checkpoint, card=card_path,
        open_clip_checkpoints=tuple(open_clip_paths), model=student_model, learning_rates=tuple(lrs),
    )


# ----------------------------------------------------------------------------------------------- saving
def _hf_state(model: CLIPVisionModelWithProjection) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def save_local_encoder(
    model: CLIPVisionModelWithProjection, output_dir: str | Path, card: Mapping | None = None
) -> tuple[Path, Path]:
    """Write ``local_encoder.safetensors`` (HF key names) and ``local_encoder.json``; returns both paths."""
    from safetensors.torch import save_file

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = output_dir / CHECKPOINT_NAME
    save_file(_hf_state(model), str(checkpoint), metadata={"format": CARD_FORMAT})
    card_path = output_dir / CARD_NAME
    card_path.write_text(json.dumps(dict(card or {"format": CARD_FORMAT, "version": CARD_VERSION}), indent=2))
    logger.info("local image encoder written to %s", checkpoint)
    return checkpoint, card_path


def save_open_clip_checkpoint(
    model: CLIPVisionModelWithProjection, path: str | Path, epoch: int, name: str = "dreamrelation-clipself"
) -> Path:
    """Write a CLIPSelf-style ``epoch_N.pt``: ``{"epoch", "name", "state_dict"}`` with ``module.visual.*`` keys
    (the DDP prefix CLIPSelf's checkpoints carry; no text tower, no optimizer state)."""
    path = Path(path)
    state = {f"module.{k}": v for k, v in hf_to_open_clip_visual(_hf_state(model)).items()}
    torch.save({"epoch": int(epoch), "name": name, "state_dict": state}, path)
    return path
