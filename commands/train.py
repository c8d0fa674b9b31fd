"""`dreamrelation train`: relation LoRAs in parallel Ray Tune trials, and the local encoder's self-distillation."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from commands.common import fail

train_app = typer.Typer(help="Fine-tune relation LoRAs (in parallel on Ray) and distill the local encoder.",
                        no_args_is_help=True)


@train_app.command("relations")
def train_relations(
    data: Annotated[str, typer.Argument(help="Triplet dataset root (path or URL) holding triplets.parquet.")],
    relations: Annotated[str, typer.Option(help="Comma-separated relation ids, e.g. hugging,shaking_hands.")],
    output: Annotated[str, typer.Option(help="Run storage (path or URL); LoRAs are registered under "
                                             "OUTPUT/loras unless --loras is given.")] = "outputs/train",
    loras: Annotated[Optional[str], typer.Option(help="LoRA registry root that `batch submit --loras` reads.")] = None,
    preset: Annotated[str, typer.Option(help="'tiny', 'sdxl' or a model folder.")] = "tiny",
    profile: Annotated[str, typer.Option(help="Loss weights: 'paper' (KML 1e-3) or 'public-code' (KML 0.1 for "
                                              "t <= 333, relation-attention loss 1e-3).")] = "paper",
    steps: Annotated[int, typer.Option(help="Optimizer steps per relation.")] = 500,
    batch_size: Annotated[int, typer.Option(help="Examples per step (by gradient accumulation).")] = 8,
    resolution: Annotated[Optional[int], typer.Option(help="Training resolution (default 1024; 64 for tiny).")] = None,
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
    name: Annotated[str, typer.Option(help="Run name; the same name resumes an interrupted run.")] = "train-relations",
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address; default: a local Ray.")] = None,
) -> None:
    """Fine-tune one relation LoRA per relation id, in parallel Ray Tune trials; register each in the registry."""
    from cluster.train_job import TrainJobConfig, run
    from dreamrelation.losses import PROFILES

    ids = tuple(r.strip() for r in relations.split(",") if r.strip())
    if not ids:
        fail(f"--relations must name at least one relation id, got {relations!r}")
    if profile not in PROFILES:
        fail(f"--profile must be one of {sorted(PROFILES)}, got {profile!r}")
    for opt, value in (("--steps", steps), ("--batch-size", batch_size), ("--checkpoint-every", checkpoint_every),
                       ("--workers-per-relation", workers_per_relation)):
        if value < 1:
            fail(f"{opt} must be >= 1, got {value}")
    config = TrainJobConfig(data=data, relations=ids, output=output, loras=loras, preset=preset, profile=profile,
                            steps=steps, batch_size=batch_size, resolution=resolution,
                            checkpoint_every=checkpoint_every, workers_per_relation=workers_per_relation,
                            max_failures=max_failures, name=name, address=address, gpus_per_trial=gpus_per_trial,
                            cpus_per_trial=cpus_per_trial)
    logging.basicConfig(level=logging.WARNING)
    try:
        summary = run(config)
    except ValueError as exc:
        fail(str(exc))
    failed = [r for r, s in summary.items() if s["status"] != "ok"]
    for relation, s in summary.items():
        typer.echo(f"{relation}: {s['status']}  {s.get('lora_uri') or s.get('error')}")
    if failed:
        raise typer.Exit(code=1)


@train_app.command("distill-encoder")
def train_distill_encoder(
    images: Annotated[Path, typer.Argument(help="Folder of training images (png/jpg/webp), e.g. COCO train2017.")],
    output: Annotated[Path, typer.Option(help="Folder for local_encoder.safetensors (+ epoch_N.pt).")],
    preset: Annotated[str, typer.Option(help="Model whose image encoder is distilled: 'tiny', 'sdxl' or a "
                                             "folder.")] = "tiny",
    epochs: Annotated[int, typer.Option(help="Passes over the images.")] = 6,
    lr: Annotated[float, typer.Option(help="Learning rate (paper: 1e-5).")] = 1e-5,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 2,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """CLIPSelf self-distillation of the local image encoder; load the result with the model's local_encoder."""
    from PIL import Image

    from dreamrelation.distill import DistillConfig, distill
    from dreamrelation.presets import load_pipeline

    files = sorted(p for p in images.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not files:
        fail(f"no images (png/jpg/webp) in {str(images)!r}")
    try:
        config = DistillConfig(epochs=epochs, lr=lr, batch_size=batch_size)
    except ValueError as exc:
        name, _, rest = str(exc).partition(" ")  # "batch_size must be ..." -> "--batch-size must be ..."
        fail(f"--{name.replace('_', '-')} {rest}")
    pipe = load_pipeline(preset, device=device)
    encoder = pipe.adapter.encoder
    from tqdm import tqdm

    pics = [Image.open(p).convert("RGB") for p in files]
    bar = tqdm(total=epochs * -(-len(pics) // batch_size), unit="step", desc="distilling")
    result = distill(encoder.vision_model, pics, config, output, callback=lambda step, loss: (
        bar.update(1), bar.set_postfix(loss=f"{loss:.4f}")), encoder_config=encoder.config)
    bar.close()
    typer.echo(f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}; encoder: {result.checkpoint}")
