"""`dreamrelation train`: relation LoRAs in parallel Ray Tune trials, and the local encoder's self-distillation."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from commands.common import PRESET_HELP, fail

train_app = typer.Typer(help="Fine-tune relation LoRAs (in parallel on Ray) and distill the local encoder.",
                        no_args_is_help=True)


@train_app.command("relations")
def train_relations(
    data: Annotated[str, typer.Argument(help="Triplet dataset root (path or URL) holding triplets.parquet.")],
    relations: Annotated[str, typer.Option(help="Comma-separated relation ids, e.g. hugging,shaking_hands.")],
    output: Annotated[str, typer.Option(help="Run storage (path or URL); LoRAs are registered under "
                                             "OUTPUT/loras unless --loras is given.")] = "outputs/train",
    loras: Annotated[Optional[str], typer.Option(help="LoRA registry root that `batch submit --loras` reads.")] = None,
    preset: Annotated[str, typer.Option(help=PRESET_HELP + ".")] = "tiny",
    profile: Annotated[str, typer.Option(help="Loss weights, KML gate and augmentation: 'paper' (KML 1e-3 at "
                                              "every t, no augmentation), 'public-code' (KML 0.1 for t <= 333, "
                                              "relation-attention loss 1e-3, flip + crop) or 'no-kml' (the paper's "
                                              "without KML). The options below override single knobs.")] = "paper",
    steps: Annotated[int, typer.Option(help="Optimizer steps per relation.")] = 500,
    batch_size: Annotated[int, typer.Option(help="Examples per step (by gradient accumulation).")] = 8,
    resolution: Annotated[Optional[int], typer.Option(
        help="Training resolution (default 1024; 64 for tiny and toy).")] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every K steps (a failed trial resumes "
                                                       "there).")] = 100,
    workers_per_relation: Annotated[int, typer.Option(help="> 1: data-parallel (DDP) training of each relation on "
                                                           "that many workers.")] = 1,
    max_failures: Annotated[int, typer.Option(help="Retries of a failed trial.")] = 2,
    gpus_per_trial: Annotated[Optional[float], typer.Option(
        help="GPUs per relation trial (default: 1 when the cluster has GPUs when the job starts, else 0; set it "
             "on clusters whose GPU workers scale up from zero).")] = None,
    cpus_per_trial: Annotated[Optional[float], typer.Option(
        help="CPUs per relation trial (default: 1 with GPUs, else 0.5).")] = None,
    name: Annotated[str, typer.Option(help="Run name (folder OUTPUT/NAME): the same name resumes an interrupted run "
                                           "or reports a finished one; other settings need another name.")
                    ] = "train-relations",
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address; default: a local Ray.")] = None,
    kml_weight: Annotated[Optional[float], typer.Option(
        help="λ of the keypoint matching loss (eq. 7); default: the profile's (paper 1e-3, public-code 0.1, no-kml "
             "0).", rich_help_panel="Ablations")] = None,
    kml_max_t: Annotated[Optional[int], typer.Option(
        help="KML only for timesteps t <= this (0-999; 999: every t); default: the profile's (public-code 333, "
             "else every t).", rich_help_panel="Ablations")] = None,
    attention_loss_weight: Annotated[Optional[float], typer.Option(
        help="Weight of the relation-attention loss (0: off); default: the profile's (public-code 1e-3, else 0).",
        rich_help_panel="Ablations")] = None,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (paper: 1e-4, constant).",
                                      rich_help_panel="Ablations")] = 1e-4,
    seed: Annotated[int, typer.Option(help="Seed of the LoRA init and of every draw (examples, t, noise).",
                                      rich_help_panel="Ablations")] = 0,
    rank: Annotated[int, typer.Option(help="LoRA rank (paper: 4).", rich_help_panel="Ablations")] = 4,
    augment: Annotated[Optional[bool], typer.Option(
        "--augment/--no-augment", help="Random flip + crop of each example (keypoints and boxes move with it); "
                                       "default: the profile's (public-code on, else off).",
        rich_help_panel="Ablations")] = None,
    local_grid: Annotated[int, typer.Option(
        help="Local tokens per subject image: an N x N roi grid (paper: 4; its Table 6 tries 2, 4, 8).",
        rich_help_panel="Ablations")] = 4,
    local_tokens: Annotated[bool, typer.Option(
        help="Feed the local tokens in training (paper: on; the public code: off).",
        rich_help_panel="Ablations")] = True,
    local_encoder: Annotated[Optional[str], typer.Option(
        help="The distilled local image encoder (a `train distill-encoder` output folder or file, or the authors' "
             "epoch_6.pt); required for local tokens on --preset sdxl.")] = None,
) -> None:
    """Fine-tune one relation LoRA per relation id, in parallel Ray Tune trials; register each in the registry."""
    from cluster.train_job import TrainJobConfig, run
    from dreamrelation.model.config import TRAIN_PROFILES

    ids = tuple(r.strip() for r in relations.split(",") if r.strip())
    if not ids:
        fail(f"--relations must name at least one relation id, got {relations!r}")
    if profile not in TRAIN_PROFILES:
        fail(f"--profile must be one of {list(TRAIN_PROFILES)}, got {profile!r}")
    knobs = _training_knobs(ids[0], preset, kml_weight=kml_weight, kml_t_max=kml_max_t, rank=rank, seed=seed,
                            attention_weight=attention_loss_weight, learning_rate=lr, augment=augment,
                            local_grid=local_grid, use_local_tokens=local_tokens, local_encoder=local_encoder)
    for opt, value in (("--steps", steps), ("--batch-size", batch_size), ("--checkpoint-every", checkpoint_every),
                       ("--workers-per-relation", workers_per_relation)):
        if value < 1:
            fail(f"{opt} must be >= 1, got {value}")
    config = TrainJobConfig(data=data, relations=ids, output=output, loras=loras, preset=preset, profile=profile,
                            steps=steps, batch_size=batch_size, resolution=resolution,
                            checkpoint_every=checkpoint_every, workers_per_relation=workers_per_relation,
                            max_failures=max_failures, name=name, address=address, gpus_per_trial=gpus_per_trial,
                            cpus_per_trial=cpus_per_trial, **knobs)
    logging.basicConfig(level=logging.WARNING)
    from commands.common import progress_bar

    _quiet_tune()
    bar, update = progress_bar("step", "training")

    def progress(done: int, total: int, row: dict | None) -> None:
        update(done, total)
        if row is not None and isinstance(row.get("loss"), float):
            bar.set_description(f"{row['relation']}: loss {row['loss']:.4f}")

    try:
        summary = run(config, progress=progress)
    except ValueError as exc:
        bar.close()
        fail(str(exc))
    finally:
        bar.close()
    _report_relations(config.absolute(), summary)


def _quiet_tune() -> None:
    """Ray Tune's own console output (its experiment table, a traceback per failed attempt) stays out of the
    command's: the progress bar and the final lines tell it (``--debug`` keeps it)."""
    import os

    from commands import common

    common.quiet_ray_logs()
    if not common.DEBUG:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the legacy reporter is silent at verbose=0
        for name in ("ray.tune", "ray.train"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _report_relations(config, summary: dict) -> None:
    """The final lines: each relation's status, LoRA URI and loss curve (or its error), then the metrics file;
    exit 1 if any relation failed."""
    from manifests import storage

    if summary and all(s["status"] == "done" for s in summary.values()):
        typer.echo(f"run {config.name!r} in {config.output} is already done (same settings): nothing to train; "
                   f"pass another --name for a new run")
    for relation, s in summary.items():
        if s["status"] == "error":
            typer.echo(f"{relation}: error  {s['error']}")
            continue
        curve = f"  loss curve: {s['loss_curve']}" if s.get("loss_curve") else ""
        typer.echo(f"{relation}: {s['status']}  lora: {s['lora_uri']}{curve}")
    if storage.exists(config.metrics_uri()):
        typer.echo(f"metrics: {config.metrics_uri()}")
    if any(s["status"] == "error" for s in summary.values()):
        raise typer.Exit(code=1)


# TrainConfig field -> the `train relations` option that sets it (errors name the option)
_KNOB_OPTIONS = {"kml_weight": "--kml-weight", "kml_t_max": "--kml-max-t", "learning_rate": "--lr",
                 "attention_weight": "--attention-loss-weight", "seed": "--seed", "rank": "--rank",
                 "local_grid": "--local-grid"}


def _training_knobs(relation: str, preset: str, local_encoder: str | None, **knobs) -> dict:
    """The ablation knobs as ``TrainJobConfig`` fields, checked by ``TrainConfig`` (an error names the option) and
    against the preset (local tokens on ``sdxl`` need a local encoder); the local encoder as an absolute path."""
    from dreamrelation.model.config import TrainConfig
    from dreamrelation.model.local_encoder_ref import check_local_tokens

    try:
        TrainConfig(relation=relation, **knobs)
    except ValueError as exc:
        field, _, rest = str(exc).partition(" ")
        fail(f"{_KNOB_OPTIONS.get(field, field)} {rest}")
    try:
        local_encoder = check_local_tokens(preset, local_encoder, knobs["use_local_tokens"])
    except ValueError as exc:
        fail(str(exc))
    return {**knobs, "local_encoder": local_encoder}


@train_app.command("distill-encoder")
def train_distill_encoder(
    images: Annotated[Path, typer.Argument(help="Folder of training images (png/jpg/webp), e.g. COCO train2017; "
                                                "read one image at a time, never all in memory.")],
    output: Annotated[Path, typer.Option(help="Folder for local_encoder.safetensors, local_encoder.json and "
                                              "epoch_N.pt; pass it as --local-encoder to generate, batch submit, "
                                              "train relations, data generate and eval relationbench.")],
    preset: Annotated[str, typer.Option(help="Model whose image encoder is distilled (only its image encoder is "
                                             "loaded): " + PRESET_HELP + ".")] = "tiny",
    epochs: Annotated[int, typer.Option(help="Passes over the images (paper: 6).")] = 6,
    lr: Annotated[float, typer.Option(help="Peak learning rate (paper: 1e-5).")] = 1e-5,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass (memory).")] = 2,
    effective_batch: Annotated[int, typer.Option(help="Images per optimizer step, by gradient accumulation of "
                                                      "--batch-size micro-batches (CLIPSelf: 16).")] = 16,
    warmup_steps: Annotated[int, typer.Option(help="Optimizer steps of linear warm-up (CLIPSelf: 1000).")] = 1000,
    schedule: Annotated[str, typer.Option(help="After the warm-up: 'cosine' (to 0 at the last step, CLIPSelf) or "
                                               "'constant'.")] = "cosine",
    feature_space: Annotated[str, typer.Option(help="Where student and teacher are compared: 'post_layernorm' "
                                                    "(the space the local tokens live in) or 'projected' (after "
                                                    "the visual projection, as CLIPSelf).")] = "post_layernorm",
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (paper: 0.1).")] = 0.1,
    checkpoint_every: Annotated[int, typer.Option(help="Write epoch_N.pt every N epochs (and after the last).")
                                ] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the image order and the grid cells.")] = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """CLIPSelf self-distillation of the local image encoder (paper 3.4.3, supp. 8).

    Writes OUTPUT/local_encoder.safetensors (what --local-encoder OUTPUT loads), OUTPUT/local_encoder.json (the
    recipe and losses) and OUTPUT/epoch_N.pt (CLIPSelf's checkpoint layout, loadable as --local-encoder too).
    """
    from dreamrelation.model.presets import load_image_encoder
    from dreamrelation.train.distill import (
        DistillConfig,
        ImageFolder,
        distill,
        optimizer_steps,
    )

    if not images.is_dir():
        fail(f"IMAGES {str(images)!r} is not a folder")
    folder = ImageFolder(images)
    if not len(folder):
        fail(f"no images (png/jpg/webp) in {str(images)!r}")
    try:
        config = DistillConfig(epochs=epochs, lr=lr, batch_size=batch_size, effective_batch=effective_batch,
                               warmup_steps=warmup_steps, schedule=schedule, feature_space=feature_space,
                               weight_decay=weight_decay, checkpoint_every=checkpoint_every, seed=seed)
    except ValueError as exc:
        name, _, rest = str(exc).partition(" ")  # "batch_size must be ..." -> "--batch-size must be ..."
        fail(f"--{name.replace('_', '-')} {rest}")
    try:
        vision, encoder_config = load_image_encoder(preset, device=device)
    except (OSError, ValueError) as exc:
        fail(f"could not load the image encoder of preset {preset!r}: {exc}", code=1)
    source = {"preset": preset, "image_encoder_fingerprint": _image_encoder_fingerprint(preset)}
    from tqdm import tqdm

    bar = tqdm(total=optimizer_steps(len(folder), config), unit="step", desc="distilling")
    result = distill(vision, folder, config, output, callback=lambda step, loss: (
        bar.update(1), bar.set_postfix(loss=f"{loss:.4f}")), encoder_config=encoder_config, provenance=source)
    bar.close()
    typer.echo(f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}; encoder: {result.checkpoint}")
    typer.echo(f"use it with: --local-encoder {output}")


def _image_encoder_fingerprint(preset: str) -> str | None:
    """The distilled tower's fingerprint for the card (None when it cannot be taken, e.g. weights not in a cache)."""
    from dreamrelation.provenance import model_fingerprints

    try:
        return model_fingerprints(preset, metrics=False)["image_encoder"]
    except (OSError, ValueError):
        return None
