"""`dreamrelation generate` (one prompt, your subjects, their layout boxes) and `dreamrelation models build-tiny`."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from commands.common import PRESET_HELP, fail
from dreamrelation.model.config import SamplingConfig  # a plain dataclass: no torch

DEFAULTS = SamplingConfig()

models_app = typer.Typer(help="Build model folders: the tiny preset (random weights) and the toy preset (trained on "
                                "the toy world).", no_args_is_help=True)


def _parse_box(text: str) -> list[float]:
    """``"x0,y0,x1,y1"`` -> four floats (range checks come later, with the library's ``check_box``)."""
    parts = text.replace(" ", "").split(",")
    try:
        box = [float(v) for v in parts]
    except ValueError:
        box = []
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        fail(f"--box must be four comma-separated numbers x0,y0,x1,y1 (normalized to [0, 1]), got {text!r}")
    return box


def _check_numbers(num_images: int, steps: int, guidance: float, scale: float, seed: int,
                   width: int | None, height: int | None) -> None:
    if num_images < 1:
        fail(f"--num-images must be >= 1, got {num_images}")
    if steps < 1:
        fail(f"--steps must be >= 1, got {steps}")
    for name, value in (("--guidance", guidance), ("--scale", scale)):
        if not math.isfinite(value) or value < 0:
            fail(f"{name} must be a finite number >= 0, got {value}")
    if not 0 <= seed < 2**63 - num_images:
        fail(f"--seed must be in [0, 2**63), got {seed}")
    for name, value in (("--width", width), ("--height", height)):
        if value is not None and (value <= 0 or value % 8):
            fail(f"{name} must be a positive multiple of 8, got {value}")


def _relation_id(lora: Path) -> str:
    """An adapter name for a LoRA file: its stem, or its folder's name for ``pytorch_lora_weights.safetensors``."""
    name = lora.stem if lora.suffix == ".safetensors" else lora.name
    if name == "pytorch_lora_weights":
        name = lora.parent.name
    return re.sub(r"[^0-9A-Za-z_-]", "_", name) or "relation"


@models_app.command("build-tiny")
def build_tiny_cmd(
    directory: Annotated[Path, typer.Argument(help="Folder to write the tiny model to (created; must be empty).")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Build the tiny preset into DIRECTORY (a new or empty folder).

    An SDXL-shaped model at miniature width with random weights, in the real formats (diffusers folder + adapter/).

    It runs every code path fast on a CPU, but its images are noise. Use it with `generate --preset DIRECTORY`.
    """
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        fail(f"DIRECTORY {str(directory)!r} exists and is not an empty folder; pick a new one")

    from dreamrelation.model.tiny import build_tiny

    build_tiny(directory, seed=seed)
    typer.echo(f"tiny model written to {directory}")


@models_app.command("train-toy")
def train_toy_cmd(
    output: Annotated[Path, typer.Argument(help="Folder of the training run (created): OUTPUT/model is the model "
                                                "folder, OUTPUT/checkpoints what a rerun resumes from.")],
    seed: Annotated[int, typer.Option(help="Seed of the weights and of the training scenes.")] = 0,
    scenes: Annotated[int, typer.Option(help="Rendered training scenes.")] = 6000,
    held_out: Annotated[str, typer.Option(help="The relation the model never sees (a relation LoRA learns it).")
                        ] = "on_top_of",
    vae_steps: Annotated[int, typer.Option(help="Steps of the VAE (reconstruction).")] = 2500,
    base_steps: Annotated[int, typer.Option(help="Steps of the text-to-image model (UNet + text encoders).")] = 2000,
    adapter_steps: Annotated[int, typer.Option(help="Steps of the image-prompt adapter + image encoder.")] = 1000,
    clip_steps: Annotated[int, typer.Option(help="Steps of the metric CLIP.")] = 400,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints (a rerun resumes there).")] = 100,
    eval_cases: Annotated[int, typer.Option(help="Oracle-judged images per measurement in the card (0: none).")
                          ] = 64,
) -> None:
    """Train the toy preset on the toy world, on this machine (CPU is fine: 75 minutes on 2 cores at the defaults).

    Stages: the VAE, the text-to-image model (every relation but --held-out), the adapter (subject images + boxes ->
    identity in place) and a CLIP for the metrics. Each stage checkpoints every --checkpoint-every steps; run the same
    command again to resume (other settings than the checkpoints' are refused: a stage's step count may grow, but
    not those of the stages it is trained on). Writes
    OUTPUT/model (use it as `--preset OUTPUT/model`) and OUTPUT/card.json: data, steps, seeds, time, machine and
    the oracle's measurements of identity and relation accuracy.
    """
    if output.exists() and not output.is_dir():
        fail(f"OUTPUT {str(output)!r} is a file; give a folder")
    if output.is_dir() and any(output.iterdir()) and not (output / "checkpoints").is_dir():
        fail(f"OUTPUT {str(output)!r} is not empty and holds no toy training run (no checkpoints/); pick a new folder")
    from dreamrelation.train.toy_model import SettingsChanged, ToySettings, train_toy

    try:
        settings = ToySettings(seed=seed, scenes=scenes, held_out=held_out, vae_steps=vae_steps,
                               base_steps=base_steps, adapter_steps=adapter_steps, clip_steps=clip_steps,
                               checkpoint_every=checkpoint_every, eval_cases=eval_cases)
    except ValueError as exc:
        fail(f"--{exc}".replace("_", "-") if "must be a positive" in str(exc) else f"--held-out: {exc}")
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def progress(stage: str, step: int, total: int, figures: dict[str, float]) -> None:
        if stage not in bars:
            for bar in bars.values():
                bar.close()
            bars[stage] = tqdm(total=total, initial=step - 1, desc=f"train-toy {stage}", unit="step")
        bar = bars[stage]
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{figures['loss']:.4f}", refresh=False)

    try:
        result = train_toy(output, settings, progress=progress)
    except SettingsChanged as exc:
        fail(str(exc))
    finally:
        for bar in bars.values():
            bar.close()
    card = result.card
    typer.echo(f"toy model written to {result.model} ({card['size_bytes'] / 1e6:.1f} MB, "
               f"{card['seconds'] / 60:.1f} min of training); card: {output / 'card.json'}")
    for name, m in (card.get("oracle") or {}).items():
        typer.echo(f"  {name}: identity {m['identity']['rate']:.0%} (shape + colour {m['shape_colour']['rate']:.0%}), "
                   f"relation {m['relation']['rate']:.0%}, both {m['both']['rate']:.0%} of {m['cases']} (oracle)")


def generate(
    prompt: Annotated[Optional[str], typer.Option(
        help="Prompt naming the subjects and the relation, e.g. 'a dog is hugging a cat'.")] = None,
    subject: Annotated[Optional[list[Path]], typer.Option(
        help="Subject image (repeat once per subject, in the order of --phrase and --box).")] = None,
    phrase: Annotated[Optional[list[str]], typer.Option(
        help="Word(s) naming each subject as in the prompt, e.g. 'dog' (repeat once per subject).")] = None,
    box: Annotated[Optional[list[str]], typer.Option(
        help="Layout box of each subject: x0,y0,x1,y1 normalized to [0,1], origin top left "
             "(repeat once per subject).")] = None,
    config: Annotated[Optional[Path], typer.Option(
        help="An inference config in the DreamRelation authors' YAML format (prompt, images_path, boxes, "
             "phrases, lora_weights); relative paths resolve against the config's folder and its parent. "
             "Command-line options override its fields.")] = None,
    lora: Annotated[Optional[Path], typer.Option(
        help="Relation LoRA to apply: a .safetensors file in the diffusers format, or a folder holding "
             "pytorch_lora_weights.safetensors. Overrides the config's lora_weights.")] = None,
    no_lora: Annotated[bool, typer.Option(
        "--no-lora", help="Generate without a relation LoRA, ignoring the config's lora_weights.")] = False,
    preset: Annotated[str, typer.Option(
        help="Model (default 'tiny', as in `batch submit`): " + PRESET_HELP + " (see `models build-tiny`, "
             "`models train-toy`).")] = "tiny",
    output: Annotated[Path, typer.Option(
        help="Folder for k.png, k_layout.png (boxes drawn) and generation.json (the settings used).")
    ] = Path("outputs/generate"),
    seed: Annotated[int, typer.Option(help="Seed of the first image; image k uses seed + k.")] = 0,
    num_images: Annotated[int, typer.Option(help="Images to generate, in one batch.")] = 1,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = DEFAULTS.steps,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale (<= 1 disables it).")
                        ] = DEFAULTS.guidance,
    scale: Annotated[float, typer.Option(
        help="Weight gamma of the subject-image branch (paper eq. 4); 0 ignores the subject images.")
    ] = DEFAULTS.scale,
    width: Annotated[Optional[int], typer.Option(
        help="Image width, a multiple of 8 (default: the model's native size, 1024 for sdxl, 128 for tiny, "
             "64 for toy).")
    ] = None,
    height: Annotated[Optional[int], typer.Option(
        help="Image height, a multiple of 8 (default: the model's native size, 1024 for sdxl, 128 for tiny, "
             "64 for toy).")
    ] = None,
    negative_prompt: Annotated[Optional[str], typer.Option(
        help=f"Negative prompt (default: the paper's, {DEFAULTS.negative_prompt!r}).")] = None,
    local_tokens: Annotated[bool, typer.Option(
        help="Add the 16 local tokens per subject (paper 3.4.3); on --preset sdxl they need --local-encoder.")] = True,
    local_grid: Annotated[Optional[int], typer.Option(
        help="Local tokens per subject: N x N (default: the preset's, 4; use the grid the --lora was trained "
             "with, its card.json's config.local_grid).")] = None,
    local_encoder: Annotated[Optional[str], typer.Option(
        help="The distilled local image encoder: a `train distill-encoder` output folder or its "
             "local_encoder.safetensors / epoch_N.pt, or the authors' epoch_6.pt (default: the preset's; the tiny "
             "preset uses its own image encoder).")] = None,
    device: Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda.")] = "cpu",
) -> None:
    """Generate images of your SUBJECTS acting out the relation in PROMPT, each placed in its --box.

    Give the subjects with --subject/--phrase/--box (once per subject, same order) or with --config.

    A relation LoRA (--lora) teaches the model the relation; without one the layout alone places the subjects.
    """
    logging.basicConfig(level=logging.WARNING)
    # 1. Cheap checks of the options: no model and no heavy import yet
    if lora is not None and no_lora:
        fail(f"--lora {str(lora)!r} and --no-lora exclude each other; give one")
    _check_numbers(num_images, steps, guidance, scale, seed, width, height)

    # 2. Merge the config (if any) under the options
    from dreamrelation.model.inference_config import load_authors_config

    cfg = None
    if config is not None:
        try:
            cfg = load_authors_config(config)
        except (OSError, ValueError) as exc:
            fail(f"--config {str(config)!r}: {exc}")
    prompt = prompt or (cfg.prompt if cfg else None)
    subjects = list(subject or (cfg.images if cfg else []))
    phrases = list(phrase or (cfg.phrases if cfg else []))
    boxes = [_parse_box(b) for b in box] if box else (cfg.boxes if cfg else [])
    missing = [name for name, v in (("--prompt", prompt), ("--subject", subjects), ("--phrase", phrases),
                                    ("--box", boxes)) if not v]
    if missing:
        fail(f"missing {', '.join(missing)} (give them as options or through --config)")
    if not len(subjects) == len(phrases) == len(boxes):
        fail(f"--subject, --phrase and --box must be given once per subject: got {len(subjects)} subjects "
             f"{[str(s) for s in subjects]}, {len(phrases)} phrases {phrases}, {len(boxes)} boxes")
    lora_path = None if no_lora else (lora or (cfg.lora if cfg else None))
    lora_source = "--lora" if lora is not None else f"lora_weights of --config {str(config)!r}"
    if lora_path is not None and not lora_path.exists():
        fail(f"relation LoRA not found: {str(lora_path)!r} (from {lora_source}); pass --lora FILE to use "
             "another LoRA, or --no-lora to generate without one")

    # 3. Subject images: every one must exist and decode
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in subjects:
        source = "--subject" if subject else f"images_path of --config {str(config)!r}"
        if not path.is_file():
            fail(f"{source}: image not found: {str(path)!r}")
        try:
            with Image.open(path) as img:
                images.append(img.convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            fail(f"{source}: {str(path)!r} is not a readable image ({exc})")

    # 4. Boxes and preset, with the library's own checks (these imports pull in torch)
    from dreamrelation.model.layout import check_box
    from dreamrelation.model.presets import check_local_tokens, resolve_spec

    for j, b in enumerate(boxes):
        try:
            check_box(b, f"--box {box[j]!r}" if box else f"boxes[{j}] of --config {str(config)!r}")
        except ValueError as exc:
            fail(str(exc))
    try:
        spec = resolve_spec(preset)
    except ValueError as exc:
        fail(f"--preset: {exc}")
    try:
        check_local_tokens(preset, local_encoder, local_tokens)
    except ValueError as exc:
        fail(str(exc))

    # 5. Load the model (and the relation LoRA)
    from dreamrelation.model.lora import read_lora_file
    from dreamrelation.model.presets import load_pipeline
    from dreamrelation.model.render import draw_layout
    from dreamrelation.provenance import local_encoder_record

    try:
        pipe = load_pipeline(spec, device=device, local_encoder=local_encoder, use_local_tokens=local_tokens)
    except (OSError, ValueError, RuntimeError) as exc:
        fail(f"could not load preset {preset!r}: {exc}", code=1)
    if local_grid is not None:
        if not 1 <= local_grid <= 16:
            fail(f"--local-grid must be an integer from 1 to 16, got {local_grid}")
        pipe.adapter.encoder.set_local_grid(local_grid)
    relation = None
    if lora_path is not None:
        relation = _relation_id(lora_path)
        try:
            pipe.load_relation_lora(relation, read_lora_file(lora_path))
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            fail(f"could not load the relation LoRA {str(lora_path)!r} (from {lora_source}) into preset "
                 f"{preset!r}: {exc}")
    native = pipe.default_sample_size * pipe.vae_scale_factor
    width, height = width or native, height or native

    # 6. Generate one batch of num_images rows (row k: seed + k)
    seeds = [seed + k for k in range(num_images)]
    try:
        result = pipe(
            [prompt] * num_images, [images] * num_images, [phrases] * num_images, [boxes] * num_images,
            relation=relation, seed=seeds, num_inference_steps=steps, guidance_scale=guidance, scale=scale,
            width=width, height=height, negative_prompt=negative_prompt, use_local_tokens=local_tokens,
        )
    except ValueError as exc:
        fail(str(exc))

    # 7. Write the images, their layout pictures and the settings
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for k, image in enumerate(result.images):
        path = output / f"{k}.png"
        image.save(path)
        draw_layout(image, boxes, phrases).save(output / f"{k}_layout.png")
        written.append(str(path))
    record = dict(
        prompt=prompt, subjects=[str(s) for s in subjects], phrases=phrases, boxes=boxes,
        lora=str(lora_path) if lora_path else None, relation=relation, preset=preset,
        config=str(config) if config else None, seeds=seeds, steps=steps, guidance=guidance, scale=scale,
        width=width, height=height, negative_prompt=DEFAULTS.negative_prompt if negative_prompt is None
        else negative_prompt, local_tokens=local_tokens,
        local_encoder=local_encoder_record(pipe.adapter.encoder, local_tokens), device=device, images=written,
    )
    (output / "generation.json").write_text(json.dumps(record, indent=2))
    for path in written:
        typer.echo(path)
