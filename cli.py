"""The ``dreamrelation`` command line (typer).

Heavy libraries (torch, diffusers, ray) are imported inside the commands, so ``dreamrelation --help`` is instant.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    help="DreamRelation: relation-aware customized image generation (your subjects, acting out a relation).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Build and inspect model folders.", no_args_is_help=True)
app.add_typer(models_app, name="models")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _parse_box(text: str) -> list[float]:
    try:
        box = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        _fail(f"--box must be four comma-separated numbers x0,y0,x1,y1 (normalized), got {text!r}")
    if len(box) != 4:
        _fail(f"--box must be four comma-separated numbers x0,y0,x1,y1 (normalized), got {text!r}")
    return box


@models_app.command("build-tiny")
def build_tiny_cmd(
    directory: Annotated[Path, typer.Argument(help="Folder to write the tiny model to (created).")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Build the tiny preset (random weights, real file formats) into DIRECTORY."""
    from dreamrelation.tiny import build_tiny

    if directory.exists() and any(directory.iterdir()):
        _fail(f"directory {str(directory)!r} exists and is not empty")
    build_tiny(directory, seed=seed)
    typer.echo(f"tiny model written to {directory}")


@app.command()
def generate(
    prompt: Annotated[Optional[str], typer.Option(help="Prompt naming the subjects and the relation.")] = None,
    subject: Annotated[Optional[list[Path]], typer.Option(
        help="Subject image (repeat once per subject, in the order of --phrase and --box).")] = None,
    phrase: Annotated[Optional[list[str]], typer.Option(help="Word(s) naming each subject, e.g. 'dog'.")] = None,
    box: Annotated[Optional[list[str]], typer.Option(
        help="Layout box of each subject: x0,y0,x1,y1 normalized to [0,1].")] = None,
    config: Annotated[Optional[Path], typer.Option(
        help="An inference config in the DreamRelation authors' YAML format (prompt, images_path, boxes, "
             "phrases, lora_weights); command-line options override it.")] = None,
    lora: Annotated[Optional[Path], typer.Option(
        help="Relation LoRA (.safetensors, diffusers format) to apply.")] = None,
    no_lora: Annotated[bool, typer.Option("--no-lora", help="Ignore the LoRA named in --config.")] = False,
    preset: Annotated[str, typer.Option(help="'sdxl' (public weights), 'tiny' (built-in miniature model, "
                                             "random weights: images are noise) or a model folder.")] = "sdxl",
    output: Annotated[Path, typer.Option(help="Folder for the PNGs and generation.json.")] = Path("outputs/generate"),
    seed: Annotated[int, typer.Option(help="Seed of the first image; image k uses seed + k.")] = 0,
    num_images: Annotated[int, typer.Option(help="Images to generate (one batch).")] = 1,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 30,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 5.0,
    scale: Annotated[float, typer.Option(help="Weight gamma of the subject-image branch (paper eq. 4).")] = 0.6,
    width: Annotated[Optional[int], typer.Option(help="Image width (multiple of 8); default 1024, 128 for tiny.")] = None,
    height: Annotated[Optional[int], typer.Option(help="Image height (multiple of 8); default 1024, 128 for tiny.")] = None,
    negative_prompt: Annotated[Optional[str], typer.Option(help="Negative prompt (default: the paper's).")] = None,
    local_tokens: Annotated[bool, typer.Option(help="Add the 16 local tokens per subject (paper 3.4.3).")] = True,
    device: Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda.")] = "cpu",
) -> None:
    """Generate images of your SUBJECTS acting out the relation in PROMPT, placed in their --box layout."""
    from dreamrelation.inference_config import load_authors_config

    logging.basicConfig(level=logging.WARNING)
    cfg = load_authors_config(config) if config else None
    prompt = prompt or (cfg.prompt if cfg else None)
    subject = subject or (cfg.images if cfg else None)
    phrase = phrase or (cfg.phrases if cfg else None)
    boxes = [_parse_box(b) for b in box] if box else (cfg.boxes if cfg else None)
    lora_path = None if no_lora else (lora or (cfg.lora if cfg else None))
    missing = [name for name, v in (("--prompt", prompt), ("--subject", subject), ("--phrase", phrase),
                                    ("--box", boxes)) if not v]
    if missing:
        _fail(f"missing {', '.join(missing)} (give them as options or through --config)")
    if not (len(subject) == len(phrase) == len(boxes)):
        _fail(f"--subject, --phrase and --box must be given once per subject: got {len(subject)} subjects, "
              f"{len(phrase)} phrases, {len(boxes)} boxes")
    for path in subject:
        if not Path(path).is_file():
            _fail(f"--subject image not found: {str(path)!r}")
    if lora_path is not None and not Path(lora_path).is_file():
        _fail(f"relation LoRA not found: {str(lora_path)!r} (from {'--lora' if lora else '--config lora_weights'}; "
              "pass --lora FILE or --no-lora)")
    if num_images < 1:
        _fail(f"--num-images must be >= 1, got {num_images}")
    default_size = 128 if preset == "tiny" else 1024
    width, height = width or default_size, height or default_size

    from PIL import Image, UnidentifiedImageError

    images = []
    for path in subject:
        try:
            images.append(Image.open(path).convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            _fail(f"--subject {str(path)!r} is not a readable image: {exc}")

    from dreamrelation.presets import load_pipeline
    from dreamrelation.lora import read_lora_file
    from dreamrelation.render import draw_layout

    try:
        pipe = load_pipeline(preset, device=device)
    except (OSError, ValueError) as exc:
        _fail(f"could not load preset {preset!r}: {exc}")
    relation = None
    if lora_path is not None:
        relation = Path(lora_path).stem.replace(".", "_")
        try:
            pipe.load_relation_lora(relation, read_lora_file(lora_path))
        except (OSError, ValueError) as exc:
            _fail(f"could not load relation LoRA {str(lora_path)!r}: {exc}")
    try:
        result = pipe(
            [prompt] * num_images, [images] * num_images, [phrase] * num_images, [boxes] * num_images,
            relation=relation, seed=[seed + k for k in range(num_images)], num_inference_steps=steps,
            guidance_scale=guidance, scale=scale, width=width, height=height, negative_prompt=negative_prompt,
            use_local_tokens=local_tokens,
        )
    except ValueError as exc:
        _fail(str(exc))
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for k, image in enumerate(result.images):
        path = output / f"{k}.png"
        image.save(path)
        draw_layout(image, boxes, phrase).save(output / f"{k}_layout.png")
        written.append(str(path))
    record = dict(prompt=prompt, subjects=[str(s) for s in subject], phrases=phrase, boxes=boxes,
                  lora=str(lora_path) if lora_path else None, preset=preset, seeds=[seed + k for k in range(num_images)],
                  steps=steps, guidance=guidance, scale=scale, width=width, height=height,
                  negative_prompt=negative_prompt, local_tokens=local_tokens, images=written)
    (output / "generation.json").write_text(json.dumps(record, indent=2))
    for path in written:
        typer.echo(path)


if __name__ == "__main__":
    app()
