"""The ``dreamrelation`` command line (typer).

Heavy libraries (torch, diffusers, ray) are imported inside the commands, so ``dreamrelation --help`` is instant.
Bad input ends the command with exit code 2 and a one-line ``error:`` naming the option and the value at fault,
before any model is loaded; a model that cannot be loaded ends it with exit code 1.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer

from dreamrelation.config import SamplingConfig  # a plain dataclass: no torch

DEFAULTS = SamplingConfig()

app = typer.Typer(
    help="DreamRelation: relation-aware customized image generation (your subjects, acting out a relation).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Build model folders (the tiny preset's miniature SDXL).", no_args_is_help=True)
app.add_typer(models_app, name="models")


def _fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` on stderr and exit (2: bad input, 1: the model or environment failed)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=code)


def _parse_box(text: str) -> list[float]:
    """``"x0,y0,x1,y1"`` -> four floats (range checks come later, with the library's ``check_box``)."""
    parts = text.replace(" ", "").split(",")
    try:
        box = [float(v) for v in parts]
    except ValueError:
        box = []
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        _fail(f"--box must be four comma-separated numbers x0,y0,x1,y1 (normalized to [0, 1]), got {text!r}")
    return box


def _check_numbers(num_images: int, steps: int, guidance: float, scale: float, seed: int,
                   width: int | None, height: int | None) -> None:
    if num_images < 1:
        _fail(f"--num-images must be >= 1, got {num_images}")
    if steps < 1:
        _fail(f"--steps must be >= 1, got {steps}")
    for name, value in (("--guidance", guidance), ("--scale", scale)):
        if not math.isfinite(value) or value < 0:
            _fail(f"{name} must be a finite number >= 0, got {value}")
    if not 0 <= seed < 2**63 - num_images:
        _fail(f"--seed must be in [0, 2**63), got {seed}")
    for name, value in (("--width", width), ("--height", height)):
        if value is not None and (value <= 0 or value % 8):
            _fail(f"{name} must be a positive multiple of 8, got {value}")


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
        _fail(f"DIRECTORY {str(directory)!r} exists and is not an empty folder; pick a new one")

    from dreamrelation.tiny import build_tiny

    build_tiny(directory, seed=seed)
    typer.echo(f"tiny model written to {directory}")


@app.command()
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
        help="Model: 'sdxl' (public weights), 'tiny' (built-in miniature model with random weights, built once "
             "under $DREAMRELATION_HOME: its images are noise) or a model folder (see `models build-tiny`).")] = "sdxl",
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
        help="Image width, a multiple of 8 (default: the model's native size, 1024 for sdxl, 128 for tiny).")
    ] = None,
    height: Annotated[Optional[int], typer.Option(
        help="Image height, a multiple of 8 (default: the model's native size, 1024 for sdxl, 128 for tiny).")
    ] = None,
    negative_prompt: Annotated[Optional[str], typer.Option(
        help=f"Negative prompt (default: the paper's, {DEFAULTS.negative_prompt!r}).")] = None,
    local_tokens: Annotated[bool, typer.Option(
        help="Add the 16 local tokens per subject (paper 3.4.3).")] = True,
    device: Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda.")] = "cpu",
) -> None:
    """Generate images of your SUBJECTS acting out the relation in PROMPT, each placed in its --box.

    Give the subjects with --subject/--phrase/--box (once per subject, same order) or with --config.

    A relation LoRA (--lora) teaches the model the relation; without one the layout alone places the subjects.
    """
    logging.basicConfig(level=logging.WARNING)
    # 1. Cheap checks of the options: no model and no heavy import yet
    if lora is not None and no_lora:
        _fail(f"--lora {str(lora)!r} and --no-lora exclude each other; give one")
    _check_numbers(num_images, steps, guidance, scale, seed, width, height)

    # 2. Merge the config (if any) under the options
    from dreamrelation.inference_config import load_authors_config

    cfg = None
    if config is not None:
        try:
            cfg = load_authors_config(config)
        except (OSError, ValueError) as exc:
            _fail(f"--config {str(config)!r}: {exc}")
    prompt = prompt or (cfg.prompt if cfg else None)
    subjects = list(subject or (cfg.images if cfg else []))
    phrases = list(phrase or (cfg.phrases if cfg else []))
    boxes = [_parse_box(b) for b in box] if box else (cfg.boxes if cfg else [])
    missing = [name for name, v in (("--prompt", prompt), ("--subject", subjects), ("--phrase", phrases),
                                    ("--box", boxes)) if not v]
    if missing:
        _fail(f"missing {', '.join(missing)} (give them as options or through --config)")
    if not len(subjects) == len(phrases) == len(boxes):
        _fail(f"--subject, --phrase and --box must be given once per subject: got {len(subjects)} subjects "
              f"{[str(s) for s in subjects]}, {len(phrases)} phrases {phrases}, {len(boxes)} boxes")
    lora_path = None if no_lora else (lora or (cfg.lora if cfg else None))
    lora_source = "--lora" if lora is not None else f"lora_weights of --config {str(config)!r}"
    if lora_path is not None and not lora_path.exists():
        _fail(f"relation LoRA not found: {str(lora_path)!r} (from {lora_source}); pass --lora FILE to use "
              "another LoRA, or --no-lora to generate without one")

    # 3. Subject images: every one must exist and decode
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in subjects:
        source = "--subject" if subject else f"images_path of --config {str(config)!r}"
        if not path.is_file():
            _fail(f"{source}: image not found: {str(path)!r}")
        try:
            with Image.open(path) as img:
                images.append(img.convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            _fail(f"{source}: {str(path)!r} is not a readable image ({exc})")

    # 4. Boxes and preset, with the library's own checks (these imports pull in torch)
    from dreamrelation.layout import check_box
    from dreamrelation.presets import resolve_spec

    for j, b in enumerate(boxes):
        try:
            check_box(b, f"--box {box[j]!r}" if box else f"boxes[{j}] of --config {str(config)!r}")
        except ValueError as exc:
            _fail(str(exc))
    try:
        spec = resolve_spec(preset)
    except ValueError as exc:
        _fail(f"--preset: {exc}")

    # 5. Load the model (and the relation LoRA)
    from dreamrelation.lora import read_lora_file
    from dreamrelation.presets import load_pipeline
    from dreamrelation.render import draw_layout

    try:
        pipe = load_pipeline(spec, device=device)
    except (OSError, ValueError, RuntimeError) as exc:
        _fail(f"could not load preset {preset!r}: {exc}", code=1)
    relation = None
    if lora_path is not None:
        relation = _relation_id(lora_path)
        try:
            pipe.load_relation_lora(relation, read_lora_file(lora_path))
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            _fail(f"could not load the relation LoRA {str(lora_path)!r} (from {lora_source}) into preset "
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
        _fail(str(exc))

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
        else negative_prompt, local_tokens=local_tokens, device=device, images=written,
    )
    (output / "generation.json").write_text(json.dumps(record, indent=2))
    for path in written:
        typer.echo(path)


batch_app = typer.Typer(help="Batch generation on Ray: Parquet manifests in, images and per-row metrics out.",
                        no_args_is_help=True)
manifest_app = typer.Typer(help="Build and validate Parquet manifests of (subjects, relation, layout) rows.",
                           no_args_is_help=True)
app.add_typer(batch_app, name="batch")
app.add_typer(manifest_app, name="manifest")


@batch_app.command("submit")
def batch_submit(
    manifest: Annotated[str, typer.Argument(help="Parquet manifest: a path or any fsspec URL (s3://, gs://, ...).")],
    output: Annotated[str, typer.Option(help="Output root (path or URL): images/, results/, manifest.parquet, "
                                             "rejected.parquet, run.json, report.html.")] = "outputs/batch",
    preset: Annotated[str, typer.Option(help="'tiny' (built-in miniature model, noise images), 'sdxl' (public "
                                             "weights) or a model folder.")] = "tiny",
    loras: Annotated[Optional[str], typer.Option(
        help="LoRA registry root: {loras}/{relation}/pytorch_lora_weights.safetensors or {loras}/registry.json. "
             "Default: manifests/examples/loras when the manifest is the example one, else none.")] = None,
    actors: Annotated[int, typer.Option(help="Generation actors (one model each; one GPU each on GPUs).")] = 1,
    gpus_per_actor: Annotated[Optional[float], typer.Option(
        help="GPUs per actor (default: 1 when the cluster has GPUs, else 0).")] = None,
    cpus_per_actor: Annotated[Optional[float], typer.Option(
        help="CPUs per actor (default: 0.5 without GPUs, so that Ray Data keeps CPUs for its own tasks).")] = None,
    batch_size: Annotated[int, typer.Option(help="Rows per actor call; rows sharing relation, subject count, size "
                                                 "and steps denoise together.")] = 4,
    max_batch_images: Annotated[int, typer.Option(help="Images denoised together in one pipeline call.")] = 4,
    address: Annotated[Optional[str], typer.Option(
        help="Ray cluster address (ray://host:10001 or auto); default: a local Ray started in-process.")] = None,
    resume: Annotated[bool, typer.Option(help="Skip rows that already have a result under OUTPUT.")] = True,
    metrics: Annotated[bool, typer.Option(help="Score each image (CLIP-T, CLIP-R, CLIP-I, DINO).")] = True,
    lora_cache_size: Annotated[int, typer.Option(help="Relation LoRAs each actor keeps in memory.")] = 8,
    check_images: Annotated[bool, typer.Option(
        help="Check before the run that every distinct subject image exists and is an image (one small read each; "
             "turn off for manifests with very many distinct images: bad ones then become per-row errors).")] = True,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    min_clip_t: Annotated[Optional[float], typer.Option(
        help="Quality gate: minimum CLIP-T (x100) of an image; one under it is made again with its next seed.",
        rich_help_panel="Quality gate")] = None,
    min_clip_r: Annotated[Optional[float], typer.Option(help="Quality gate: minimum CLIP-R (x100).",
                                                        rich_help_panel="Quality gate")] = None,
    min_clip_i: Annotated[Optional[float], typer.Option(help="Quality gate: minimum CLIP-I (x100, mean over "
                                                             "subjects).", rich_help_panel="Quality gate")] = None,
    min_clip_i_crop: Annotated[Optional[float], typer.Option(help="Quality gate: minimum CLIP-I of the box crops.",
                                                             rich_help_panel="Quality gate")] = None,
    min_dino: Annotated[Optional[float], typer.Option(help="Quality gate: minimum DINO (x100, mean over subjects).",
                                                      rich_help_panel="Quality gate")] = None,
    max_attempts: Annotated[int, typer.Option(
        help="Quality gate: images made at most per image (1-20; seed + k + attempt * num_images). Rejected "
             "attempts stay under images/{row_id}/attempts/.", rich_help_panel="Quality gate")] = 1,
) -> None:
    """Generate every row of MANIFEST on a Ray actor pool; write images, per-row results and run.json.

    Invalid rows go to OUTPUT/rejected.parquet with the field and the reason; the other rows go on.
    Submitting again resumes: rows that already have a result are skipped. With --min-* thresholds, an image under
    one is regenerated with the next seed until it passes or --max-attempts images were made; each result row
    records every attempt and whether the row passed.
    """
    from manifests.io import ManifestError

    for name, value in (("--actors", actors), ("--batch-size", batch_size), ("--max-batch-images", max_batch_images),
                        ("--lora-cache-size", lora_cache_size)):
        if value < 1:
            _fail(f"{name} must be >= 1, got {value}")
    from manifests.schema import GateSpec

    try:
        gate = GateSpec.from_options(max_attempts=max_attempts, min_clip_t=min_clip_t, min_clip_r=min_clip_r,
                                     min_clip_i=min_clip_i, min_clip_i_crop=min_clip_i_crop, min_dino=min_dino)
    except ValueError as exc:
        _fail(str(exc))
    logging.basicConfig(level=logging.WARNING)
    from tqdm import tqdm

    from batch.job import JobConfig, submit
    from batch.worker import WorkerConfig

    if loras is None:
        loras = _default_loras(manifest)
    try:
        worker = WorkerConfig(output=output, preset=preset, loras=loras, device=device, metrics=metrics,
                              max_batch_images=max_batch_images, lora_cache_size=lora_cache_size, gate=gate)
    except ValueError as exc:  # a gate without metrics
        _fail(str(exc))
    config = JobConfig(manifest=manifest, output=output, worker=worker, preset=preset, loras=loras, actors=actors,
                       gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor, batch_size=batch_size,
                       address=address, resume=resume, check_images=check_images)
    bar = tqdm(total=0, unit="row", desc="generating")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        summary = submit(config, progress=progress)
    except ManifestError as exc:
        _fail(str(exc))
    except FileNotFoundError as exc:
        _fail(str(exc))
    finally:
        bar.close()
    from batch.report import render_report

    report = render_report(output)
    typer.echo(f"read {summary['read']}  accepted {summary['accepted']}  rejected {summary['rejected']}  "
               f"skipped {summary['skipped']}  ok {summary['ok']}  error {summary['error']}  "
               f"images {summary['images']}  ({summary['images_per_second']} images/s)")
    if summary.get("gate"):
        g = summary["gate"]
        typer.echo(f"gate: passed {g['passed']}  failed {g['failed']}  attempts {g['attempts']}  "
                   f"extra images {g['extra_images']}")
    if summary["rejected"]:
        typer.echo(f"rejected rows and reasons: {output.rstrip('/')}/rejected.parquet")
    typer.echo(f"report: {report}")


def _default_loras(manifest: str) -> str | None:
    """The example manifest ships with example relation LoRAs for the tiny model beside it."""
    folder = Path(manifest).resolve().parent
    candidate = folder / "loras"
    return str(candidate) if "://" not in manifest and candidate.is_dir() else None


@batch_app.command("status")
def batch_status(output: Annotated[str, typer.Argument(help="Output root of a run.")]) -> None:
    """Counts of a run: rows with results (ok / error), images, rejected rows, mean metrics."""
    from batch.report import status

    try:
        st = status(output)
    except FileNotFoundError as exc:
        _fail(str(exc))
    typer.echo(json.dumps(st, indent=2))


@batch_app.command("report")
def batch_report(output: Annotated[str, typer.Argument(help="Output root of a run.")]) -> None:
    """Write OUTPUT/report.html: every image with its prompt, relation, subjects and metrics (sortable)."""
    from batch.report import render_report

    try:
        typer.echo(render_report(output))
    except FileNotFoundError as exc:
        _fail(str(exc))


@batch_app.command("export")
def batch_export(
    output: Annotated[str, typer.Argument(help="Output root of a batch run (path or URL).")],
    format: Annotated[str, typer.Option("--format", help="hf (Parquet shards for `datasets`), webdataset (tar "
                                                         "shards) or coco (annotations.json + images/).")],
    to: Annotated[str, typer.Option("--to", help="Destination folder (path or URL, e.g. s3://bucket/ds); an earlier "
                                                 "export there is replaced.")],
    min_clip_t: Annotated[Optional[float], typer.Option(help="Keep images with CLIP-T (x100) >= this.")] = None,
    min_clip_r: Annotated[Optional[float], typer.Option(help="Keep images with CLIP-R (x100) >= this.")] = None,
    min_clip_i: Annotated[Optional[float], typer.Option(help="Keep images with CLIP-I (x100) >= this.")] = None,
    min_clip_i_crop: Annotated[Optional[float], typer.Option(help="Keep images with CLIP-I of the box crops >= "
                                                                  "this.")] = None,
    min_dino: Annotated[Optional[float], typer.Option(help="Keep images with DINO (x100) >= this.")] = None,
    passed_only: Annotated[bool, typer.Option("--passed-only", help="Keep only rows that passed the quality gate "
                                                                    "(rows of a run without a gate are kept).")] = False,
    shard_size: Annotated[int, typer.Option(help="Images per Parquet / tar shard.")] = 500,
) -> None:
    """Export the images of a run as a labelled relation dataset, with a dataset card (README.md)."""
    from manifests.export import FORMATS, ExportError, ExportFilter, export_run

    if format not in FORMATS:
        _fail(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if shard_size < 1:
        _fail(f"--shard-size must be >= 1, got {shard_size}")
    minimums = dict(min_clip_t=min_clip_t, min_clip_r=min_clip_r, min_clip_i=min_clip_i,
                    min_clip_i_crop=min_clip_i_crop, min_dino=min_dino)
    for name, value in minimums.items():
        if value is not None and not math.isfinite(value):
            _fail(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    filters = ExportFilter(**minimums, passed_only=passed_only)
    logging.basicConfig(level=logging.WARNING)
    from tqdm import tqdm

    from dreamrelation.relation_phrase import relation_phrase

    bar = tqdm(total=0, unit="image", desc=f"exporting ({format})")

    def progress(done: int, total: int) -> None:
        bar.total, bar.n = total, done
        bar.refresh()

    try:
        summary = export_run(output, format, to, filters, shard_size=shard_size, relation_phrase=relation_phrase,
                             progress=progress)
    except (ExportError, FileNotFoundError) as exc:
        _fail(str(exc))
    finally:
        bar.close()
    dropped = ", ".join(f"{k} {v}" for k, v in summary["filtered_out"].items()) or "none"
    typer.echo(f"samples {summary['samples']}  rows {summary['rows']}  images in run {summary['images']}  "
               f"filtered out: {dropped}  rows with errors {summary['rows_error']}")
    for uri in summary["missing_images"]:
        typer.echo(f"missing image (skipped): {uri}")
    typer.echo(f"files: {len(summary['files'])} under {to}  (card: {summary['files'][-1]})")


@manifest_app.command("validate")
def manifest_validate(
    uri: Annotated[str, typer.Argument(help="Parquet manifest (path or fsspec URL).")],
    loras: Annotated[Optional[str], typer.Option(help="LoRA registry root: rows with an unknown relation are "
                                                      "reported.")] = None,
    check_images: Annotated[bool, typer.Option(help="Check that subject images exist and are images.")] = True,
) -> None:
    """Print a per-row report (OK or the field and reason); exit 1 when any row is rejected."""
    from manifests.io import ManifestError, check_image_file, manifest_report, read_manifest_table, validate_table
    from manifests.registry import LoRARegistry

    try:
        table = read_manifest_table(uri)
    except ManifestError as exc:
        _fail(str(exc))
    registry = LoRARegistry(loras) if loras else None
    rows, rejected = validate_table(table, check_image=check_image_file if check_images else None,
                                    known_relations=registry.has if registry else None, base_uri=uri)
    typer.echo(manifest_report(rows, rejected))
    if rejected:
        raise typer.Exit(code=1)


@manifest_app.command("build")
def manifest_build(
    source: Annotated[Path, typer.Argument(help="CSV or JSONL with one row per line (see README).")],
    output: Annotated[str, typer.Argument(help="Parquet manifest to write (path or URL).")],
) -> None:
    """Build a Parquet manifest from CSV or JSONL; invalid rows are reported and the command fails."""
    from manifests.io import manifest_from_records, manifest_report, validate_records, write_manifest

    if not source.is_file():
        _fail(f"source not found: {str(source)!r}")
    try:
        records = manifest_from_records(source)
    except ValueError as exc:
        _fail(str(exc))
    rows, rejected = validate_records(records)
    if rejected:
        typer.echo(manifest_report(rows, rejected), err=True)
        _fail(f"{len(rejected)} of {len(records)} rows are invalid; nothing written")
    write_manifest(rows, output)
    typer.echo(f"{len(rows)} rows written to {output}")


@manifest_app.command("relationbench")
def manifest_relationbench(
    subjects_dir: Annotated[Path, typer.Argument(help="Folder of subject images; the file name is the phrase "
                                                      "(plushie_bear.png -> 'plushie bear').")],
    output: Annotated[str, typer.Option(help="Parquet manifest to write.")] = "outputs/relationbench.parquet",
    single: Annotated[int, typer.Option(help="Single-subject cases.")] = 100,
    multi: Annotated[int, typer.Option(help="Two-subject cases.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed of the case draw.")] = 0,
    width: Annotated[int, typer.Option(help="Image width.")] = 1024,
    height: Annotated[int, typer.Option(help="Image height.")] = 1024,
) -> None:
    """RelationBench cases (the 25 templates of the paper's Table 10) with layouts, as a manifest."""
    from manifests.io import write_manifest
    from manifests.relationbench import build_cases, subjects_from_dir

    if not subjects_dir.is_dir():
        _fail(f"SUBJECTS_DIR not found: {str(subjects_dir)!r}")
    subjects = subjects_from_dir(subjects_dir)
    try:
        rows = build_cases(subjects, n_single=single, n_multi=multi, seed=seed, width=width, height=height)
    except ValueError as exc:
        _fail(str(exc))
    write_manifest(rows, output)
    typer.echo(f"{len(rows)} cases written to {output}")


eval_app = typer.Typer(help="Benchmarks: RelationBench (the paper's Tables 2 and 3) over named configurations.",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")


@eval_app.command("relationbench")
def eval_relationbench(
    subjects_dir: Annotated[str, typer.Argument(help="Folder of subject images (path or URL); the file name is the "
                                                     "phrase (plushie_bear.png -> 'plushie bear').")],
    config: Annotated[Optional[list[str]], typer.Option(
        "--config", help="A configuration (repeat): 'base' (no relation LoRA), 'lora' (the --loras registry), "
                         "'no-local-tokens' (--loras, local tokens off), NAME=URI (a LoRA registry or one LoRA "
                         "folder, e.g. no-kml=s3://b/loras-nokml), NAME=URI:no-local-tokens.")] = None,
    output: Annotated[str, typer.Option(help="Output root (path or URL): cases.parquet, runs/NAME/, tables.md/.csv, "
                                             "per_relation.md/.csv, plots/, gallery.html, eval.json.")
                      ] = "outputs/relationbench",
    loras: Annotated[Optional[str], typer.Option(help="LoRA registry of 'lora' and 'no-local-tokens'.")] = None,
    n_single: Annotated[int, typer.Option(help="Single-subject cases.")] = 100,
    n_multi: Annotated[int, typer.Option(help="Two-subject cases.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed of the case draw.")] = 0,
    relations: Annotated[Optional[str], typer.Option(
        help="Comma-separated relation ids: keep only their templates (e.g. those with a LoRA).")] = None,
    allow_missing: Annotated[bool, typer.Option(
        "--allow-missing", help="Run cases whose relation has no LoRA in a configuration without one (recorded) "
                                "instead of failing before the run.")] = False,
    preset: Annotated[str, typer.Option(help="'tiny' (noise images), 'sdxl' or a model folder.")] = "tiny",
    steps: Annotated[int, typer.Option(help="Denoising steps per image.")] = 30,
    size: Annotated[int, typer.Option(help="Image width and height (a multiple of 8).")] = 1024,
    num_images: Annotated[int, typer.Option(help="Images per case (seeds seed, seed+1, ...).")] = 1,
    actors: Annotated[int, typer.Option(help="Generation actors per configuration.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Rows per actor call.")] = 4,
    gpus_per_actor: Annotated[Optional[float], typer.Option(help="GPUs per actor (default: 1 with GPUs).")] = None,
    cpus_per_actor: Annotated[Optional[float], typer.Option(help="CPUs per actor (default: 0.5 without GPUs).")
                              ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address; default: a local Ray.")] = None,
    resume: Annotated[bool, typer.Option(help="Keep the results a previous run wrote under OUTPUT.")] = True,
) -> None:
    """Run RelationBench once per --config and write the paper's Tables 2/3, per-relation tables, plots, gallery."""
    from tqdm import tqdm

    from batch.evaluate import EvalConfig, run_evaluation

    if not config:
        _fail("--config must be given at least once (e.g. --config base --config lora)")
    for name, value in (("--steps", steps), ("--num-images", num_images), ("--actors", actors),
                        ("--batch-size", batch_size)):
        if value < 1:
            _fail(f"{name} must be >= 1, got {value}")
    if size < 64 or size % 8:
        _fail(f"--size must be a multiple of 8 and >= 64, got {size}")
    ids = None if relations is None else tuple(r.strip() for r in relations.split(",") if r.strip())
    cfg = EvalConfig(subjects_dir=subjects_dir, output=output, configs=tuple(config), loras=loras, n_single=n_single,
                     n_multi=n_multi, seed=seed, relations=ids, preset=preset, steps=steps, width=size, height=size,
                     num_images=num_images, allow_missing=allow_missing, actors=actors, batch_size=batch_size,
                     gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor, device=device, address=address,
                     resume=resume)
    logging.basicConfig(level=logging.WARNING)
    bar = tqdm(total=0, unit="row", desc="relationbench")

    def progress(name: str, done: int, total: int) -> None:
        bar.set_description(name)
        bar.total, bar.n = total, done
        bar.refresh()

    try:
        summary = run_evaluation(cfg, progress=progress)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    finally:
        bar.close()
    from manifests import storage

    typer.echo(storage.read_bytes(summary["files"]["tables.md"]).decode())
    for name, uri in summary["files"].items():
        typer.echo(f"{name}: {uri}")


data_app = typer.Typer(help="Relation fine-tuning data: triplets (subject images, target, keypoints).",
                       no_args_is_help=True)
train_app = typer.Typer(help="Fine-tune relation LoRAs (in parallel on Ray) and distill the local encoder.",
                        no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")


@data_app.command("import-public")
def data_import_public(
    directory: Annotated[Path, typer.Argument(help="A relation folder in the authors' public format (prompts.json, "
                                                   "videos/<id>/, masks/<id>/).")],
    relation: Annotated[str, typer.Option(help="Relation id to file the triplets under, e.g. hugging.")],
    output: Annotated[str, typer.Option(help="Triplet dataset root (path or URL): triplets.parquet + images/.")],
) -> None:
    """Import a public relation folder as triplets; broken samples are reported and skipped."""
    from dreamrelation.data import import_public_folder
    from manifests.triplets import read_triplets, write_triplets

    if not directory.is_dir():
        _fail(f"DIRECTORY not found: {str(directory)!r}")
    try:
        records, problems = import_public_folder(directory, relation, output=output)
    except (OSError, ValueError) as exc:
        _fail(str(exc))
    for p in problems:
        typer.echo(f"skipped sample {p['sample']}: {p['reason']}", err=True)
    if not records:
        _fail(f"no usable samples in {str(directory)!r} ({len(problems)} broken)")
    existing = []
    try:
        existing, _ = read_triplets(output)
    except ValueError:
        existing = []
    keep = [r.to_record() for r in existing if r.relation != relation]
    write_triplets(keep + records, output)
    typer.echo(f"{len(records)} triplets of {relation!r} written to {output} ({len(problems)} skipped)")



@data_app.command("generate")
def data_generate(
    spec: Annotated[str, typer.Argument(help="Relation specs, YAML or JSONL (path or URL); see "
                                             "manifests/examples/relation_spec.yaml.")],
    output: Annotated[str, typer.Option(help="Dataset root (path or URL): triplets.parquet, images/, outcomes/, "
                                             "dropped.parquet, engine.json.")] = "outputs/engine",
    preset: Annotated[str, typer.Option(help="'tiny' (built-in miniature models, noise images), 'sdxl' (public "
                                             "weights) or a model folder; also picks the annotators.")] = "tiny",
    generator: Annotated[str, typer.Option(help="'pipeline' (our SDXL stack) or 'api' (an OpenAI-compatible "
                                                "images API).")] = "pipeline",
    api_base: Annotated[Optional[str], typer.Option(help="Images API base URL, e.g. https://api.openai.com/v1 "
                                                         "(--generator api).")] = None,
    api_key_env: Annotated[str, typer.Option(help="Environment variable holding the API key.")] = "OPENAI_API_KEY",
    api_model: Annotated[str, typer.Option(help="Images API model.")] = "gpt-image-1",
    api_size: Annotated[str, typer.Option(help="Images API size, WxH or auto.")] = "1024x1024",
    actors: Annotated[int, typer.Option(help="Generation actors (one model each).")] = 1,
    annotate_actors: Annotated[Optional[int], typer.Option(help="Annotation actors (default: --actors).")] = None,
    batch_size: Annotated[int, typer.Option(help="Samples per actor call.")] = 4,
    gpus_per_actor: Annotated[Optional[float], typer.Option(
        help="GPUs per actor of each pool (default: 0.5 when the cluster has GPUs, else 0).")] = None,
    cpus_per_actor: Annotated[Optional[float], typer.Option(
        help="CPUs per actor (default: 0.5 without GPUs, so that Ray Data keeps CPUs for its own tasks).")] = None,
    address: Annotated[Optional[str], typer.Option(
        help="Ray cluster address; default: a local Ray started in-process.")] = None,
    executor: Annotated[str, typer.Option(help="'ray', or 'local' (both stages in this process, no Ray).")] = "ray",
    resume: Annotated[bool, typer.Option(help="Skip samples that already have an outcome under OUTPUT "
                                              "(--no-resume starts over).")] = True,
    retry_errors: Annotated[bool, typer.Option(help="On resume, rerun samples dropped for a generation or "
                                                    "annotation error.")] = False,
    detection_threshold: Annotated[float, typer.Option(help="OWLv2 score a detection needs.")] = 0.1,
    max_instances: Annotated[int, typer.Option(help="Detections allowed per subject (1: found exactly once).")] = 1,
    min_keypoint_confidence: Annotated[float, typer.Option(help="Mean keypoint-match confidence each subject "
                                                                "needs, in [0, 1].")] = 0.5,
    visibility_threshold: Annotated[float, typer.Option(help="Keypoints less confident than this get "
                                                             "visibility 0.")] = 0.5,
    min_clip_r: Annotated[Optional[float], typer.Option(help="CLIP-R (x100) the target needs; default: "
                                                             "recorded, not gated.")] = None,
    min_layout_iou: Annotated[Optional[float], typer.Option(help="IoU each subject's box needs with its layout "
                                                                 "box; default: recorded, not gated.")] = None,
    max_subject_iou: Annotated[float, typer.Option(help="Drop when two subjects' boxes overlap more than this "
                                                        "(1 disables).")] = 0.8,
    caption: Annotated[bool, typer.Option(help="Caption each kept target (BLIP) into its metadata.")] = False,
    feature_size: Annotated[Optional[int], typer.Option(help="DINOv2 input side for keypoint transfer, a multiple "
                                                             "of its patch (default: 448; 64 for tiny).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
) -> None:
    """Make relation triplets (paper 3.3): generate subject and target images, annotate, gate, write triplets.

    Kept triplets go to OUTPUT/triplets.parquet (what `train relations` reads); dropped samples, with their stage
    and reason, to OUTPUT/dropped.parquet; counts to OUTPUT/engine.json. Running again resumes.
    """
    from batch.engine_job import EngineJobConfig, EngineJobError, run
    from batch.engine_worker import EngineConfig
    from dreamrelation.engine import GateConfig

    logging.basicConfig(level=logging.WARNING)
    try:
        gates = GateConfig(detection_threshold=detection_threshold, max_instances=max_instances,
                           min_keypoint_confidence=min_keypoint_confidence, visibility_threshold=visibility_threshold,
                           min_clip_r=min_clip_r, min_layout_iou=min_layout_iou, max_subject_iou=max_subject_iou)
        engine = EngineConfig(output=output, preset=preset, generator=generator, api_base=api_base,
                              api_key_env=api_key_env, api_model=api_model, api_size=api_size, device=device,
                              caption=caption, feature_size=feature_size, gates=gates)
        config = EngineJobConfig(spec=spec, output=output, engine=engine, generate_actors=actors,
                                 annotate_actors=annotate_actors or actors, batch_size=batch_size,
                                 gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor, address=address,
                                 resume=resume, retry_errors=retry_errors, executor=executor)
    except ValueError as exc:
        _fail(str(exc))
    from tqdm import tqdm

    bar = tqdm(total=0, unit="sample", desc="making triplets")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        summary = run(config, progress=progress)
    except (FileNotFoundError, ValueError, EngineJobError) as exc:
        _fail(str(exc))
    finally:
        bar.close()
    typer.echo(f"planned {summary['planned']}  made {summary['made']}  dropped {summary['dropped']}  "
               f"skipped {summary['skipped']}  ({summary['total']['made']} triplets in the dataset)")
    for reason, n in summary["dropped_by_reason"].items():
        typer.echo(f"  dropped {n}: {reason}")
    typer.echo(f"triplets: {summary['triplets']}")
    if summary["total"]["dropped"]:
        typer.echo(f"dropped samples and reasons: {summary['dropped_file']}")
    if preset == "tiny" and summary["dropped"] and not summary["made"]:
        typer.echo("note: the tiny preset's detector and features are random, so the default gates drop nearly "
                   "every sample; to try the whole path add "
                   "--max-instances 16 --max-subject-iou 1 --min-keypoint-confidence 0")


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
        _fail(f"--relations must name at least one relation id, got {relations!r}")
    if profile not in PROFILES:
        _fail(f"--profile must be one of {sorted(PROFILES)}, got {profile!r}")
    for opt, value in (("--steps", steps), ("--batch-size", batch_size), ("--checkpoint-every", checkpoint_every),
                       ("--workers-per-relation", workers_per_relation)):
        if value < 1:
            _fail(f"{opt} must be >= 1, got {value}")
    config = TrainJobConfig(data=data, relations=ids, output=output, loras=loras, preset=preset, profile=profile,
                            steps=steps, batch_size=batch_size, resolution=resolution,
                            checkpoint_every=checkpoint_every, workers_per_relation=workers_per_relation,
                            max_failures=max_failures, name=name, address=address, gpus_per_trial=gpus_per_trial,
                            cpus_per_trial=cpus_per_trial)
    logging.basicConfig(level=logging.WARNING)
    try:
        summary = run(config)
    except ValueError as exc:
        _fail(str(exc))
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
        _fail(f"no images (png/jpg/webp) in {str(images)!r}")
    try:
        config = DistillConfig(epochs=epochs, lr=lr, batch_size=batch_size)
    except ValueError as exc:
        name, _, rest = str(exc).partition(" ")  # "batch_size must be ..." -> "--batch-size must be ..."
        _fail(f"--{name.replace('_', '-')} {rest}")
    pipe = load_pipeline(preset, device=device)
    encoder = pipe.adapter.encoder
    from tqdm import tqdm

    pics = [Image.open(p).convert("RGB") for p in files]
    bar = tqdm(total=epochs * -(-len(pics) // batch_size), unit="step", desc="distilling")
    result = distill(encoder.vision_model, pics, config, output, callback=lambda step, loss: (
        bar.update(1), bar.set_postfix(loss=f"{loss:.4f}")), encoder_config=encoder.config)
    bar.close()
    typer.echo(f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}; encoder: {result.checkpoint}")


cluster_app = typer.Typer(help="Run batch and training jobs on a running Ray cluster (the Ray Jobs API).",
                          no_args_is_help=True)
cluster_submit_app = typer.Typer(help="Submit `batch submit` or `train relations` as a job of a Ray cluster.",
                                 no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")
cluster_app.add_typer(cluster_submit_app, name="submit")

# every option the `cluster submit` commands do not know goes, in order, to the command run in the job
_FORWARD_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}
JOBS_API = "http://127.0.0.1:8265"  # the dashboard of a Ray started on this machine
ClusterAddress = Annotated[str, typer.Option(
    envvar="RAY_ADDRESS", help="The cluster's Jobs API: the head node's dashboard, http://HEAD:8265.")]
JobId = Annotated[str, typer.Argument(help="Submission id, as printed by `cluster submit`.")]


def _check_job_args(command: tuple[str, str], args: list[str]) -> dict:
    """Parse the forwarded arguments as ``dreamrelation <command>`` would, before anything is submitted: a typo
    fails here (exit 2), not minutes later on the cluster. Returns the parsed values."""
    try:  # typer >= 0.2x carries its own copy of click
        from typer._click.exceptions import ClickException
    except ImportError:
        from click.exceptions import ClickException

    group = typer.main.get_command(app)
    cmd = group.commands[command[0]].commands[command[1]]  # type: ignore[attr-defined]
    try:
        with cmd.make_context(f"dreamrelation {' '.join(command)}", list(args)) as ctx:
            return dict(ctx.params)
    except ClickException as exc:
        _fail(f"arguments for `dreamrelation {' '.join(command)}` in the job: {exc.format_message()} "
              f"(got {args})")


def _check_job_paths(params: dict, paths: dict[str, tuple[str, str]]) -> None:
    """The job resolves paths on the cluster, inside its copy of the project: a relative input that does not ship
    with the project cannot be found there (exit 2); a relative output would be lost with that copy (a warning)."""
    from cluster.submit import project_root

    root = project_root()
    for key, (option, kind) in paths.items():
        value = params.get(key)
        if not value or "://" in str(value) or Path(str(value)).is_absolute():
            continue
        if kind == "input" and root is not None:
            if not (root / str(value)).exists():
                _fail(f"{option} {str(value)!r} is a relative path that does not ship with the project, so the job "
                      "cannot find it on the cluster; give s3://... or an absolute path that every node shares")
            continue  # shipped with the project (e.g. manifests/examples/example.parquet)
        typer.secho(f"warning: {option} {str(value)!r} is a relative path: the job writes it on the cluster, inside "
                    "its copy of the project, which Ray deletes; use s3://... or an absolute path the nodes share",
                    fg=typer.colors.YELLOW, err=True)


def _submit_cluster_job(command: tuple[str, str], args: list[str], paths: dict[str, tuple[str, str]], address: str,
                        job_id: Optional[str], wait: bool, timeout: Optional[float], env: Optional[list[str]],
                        python: str) -> None:
    from cluster.submit import ClusterError, check_submission_id, submit_job

    if job_id is not None:
        try:
            check_submission_id(job_id)
        except ValueError as exc:
            _fail(f"--job-id: {exc}")
    extra: dict[str, str] = {}
    for item in env or []:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            _fail(f"--env must be KEY=VALUE, got {item!r}")
        extra[key] = value
    params = _check_job_args(command, args)
    if params.get("address") is not None:
        _fail(f"--address {params['address']!r} was forwarded to the job; the job always joins the cluster it runs "
              "on (--address auto), and --address of `cluster submit` names that cluster's Jobs API")
    _check_job_paths(params, paths)
    try:
        sid = submit_job(address, [*command, *args], submission_id=job_id, env=extra, python=python)
    except ClusterError as exc:
        _fail(str(exc), code=1)
    typer.echo(sid)
    if not wait:
        typer.echo(f"follow it: dreamrelation cluster logs {sid} --follow --address {address}", err=True)
        return
    _follow(address, sid, timeout)


def _follow(address: str, job_id: str, timeout: Optional[float]) -> None:
    """Print the job's logs as they come until it ends; exit 0 when it SUCCEEDED, else 1."""
    from cluster.submit import ClusterError, JobNotFoundError, wait

    try:
        status = wait(address, job_id, timeout=timeout, on_logs=lambda text: typer.echo(text, nl=False))
    except JobNotFoundError as exc:
        _fail(str(exc))
    except (ClusterError, TimeoutError) as exc:
        _fail(f"{exc} (the job goes on: `dreamrelation cluster stop {job_id}` stops it)", code=1)
    except KeyboardInterrupt:
        typer.echo(f"\nstopped following; the job goes on: dreamrelation cluster stop {job_id} --address {address}",
                   err=True)
        raise typer.Exit(code=130)
    typer.echo(f"job {job_id}: {status}")
    if status != "SUCCEEDED":
        raise typer.Exit(code=1)


def _add_cluster_submit(name: str, command: tuple[str, str], usage: str,
                        paths: dict[str, tuple[str, str]]) -> None:
    """Register `cluster submit NAME`: the job options below, every other argument forwarded to COMMAND (whose
    USAGE starts its arguments; PATHS are its path parameters: name -> (option, "input" | "output"))."""

    def cluster_submit(
        ctx: typer.Context,
        address: ClusterAddress = JOBS_API,
        job_id: Annotated[Optional[str], typer.Option(help="Submission id (default: dreamrelation-<command>-<hash "
                                                           "of the arguments>-<random>).")] = None,
        wait: Annotated[bool, typer.Option(help="Follow the job's logs until it ends; exit 1 unless it "
                                                "SUCCEEDED.")] = False,
        timeout: Annotated[Optional[float], typer.Option(help="With --wait: give up following after this many "
                                                              "seconds (the job goes on).")] = None,
        env: Annotated[Optional[list[str]], typer.Option(help="KEY=VALUE set in the job (repeat); AWS_*, HF_* and "
                                                              "DREAMRELATION_* set here travel anyway.")] = None,
        python: Annotated[str, typer.Option(help="Python on the cluster's nodes that runs the job.")] = "python",
    ) -> None:
        _submit_cluster_job(command, list(ctx.args), paths, address, job_id, wait, timeout, env, python)

    full = " ".join(command)
    options = [option for option, _ in paths.values()]
    doc = (f"Run `dreamrelation {full} {usage} ...` as a job of the Ray cluster at --address.\n\n"
           f"Every argument not listed below goes verbatim to `{full}` in the job, which joins the cluster.\n\n"
           "The job runs the project shipped from here, and resolves paths on the cluster.\n\n"
           f"Give {', '.join(options[:-1])} and {options[-1]} as s3://... or as absolute paths every node shares.")
    cluster_submit_app.command(name, help=doc, context_settings=_FORWARD_ARGS,
                               options_metavar=f"{usage} [{full.upper()} OPTIONS] [OPTIONS]")(cluster_submit)


_add_cluster_submit("batch", ("batch", "submit"), "MANIFEST", {
    "manifest": ("MANIFEST", "input"), "output": ("--output", "output"), "loras": ("--loras", "input")})
_add_cluster_submit("train", ("train", "relations"), "DATA --relations IDS", {
    "data": ("DATA", "input"), "output": ("--output", "output"), "loras": ("--loras", "output")})


@cluster_app.command("status")
def cluster_status(job: JobId, address: ClusterAddress = JOBS_API) -> None:
    """Print the job's status as JSON (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED); exit 1 when it FAILED."""
    from cluster.submit import ClusterError, JobNotFoundError, job_status

    try:
        st = job_status(address, job)
    except JobNotFoundError as exc:
        _fail(str(exc))
    except ClusterError as exc:
        _fail(str(exc), code=1)
    typer.echo(json.dumps(st, indent=2))
    if st["status"] == "FAILED":
        raise typer.Exit(code=1)


@cluster_app.command("logs")
def cluster_logs(
    job: JobId,
    address: ClusterAddress = JOBS_API,
    follow: Annotated[bool, typer.Option(help="Keep printing until the job ends; exit 1 unless it "
                                              "SUCCEEDED.")] = False,
) -> None:
    """Print what the job's command printed (stdout and stderr)."""
    if follow:
        _follow(address, job, None)
        return
    from cluster.submit import ClusterError, JobNotFoundError, job_logs

    try:
        typer.echo(job_logs(address, job), nl=False)
    except JobNotFoundError as exc:
        _fail(str(exc))
    except ClusterError as exc:
        _fail(str(exc), code=1)


@cluster_app.command("stop")
def cluster_stop(job: JobId, address: ClusterAddress = JOBS_API) -> None:
    """Stop the job (SIGTERM, then SIGKILL); a batch job resumes where it stopped when submitted again."""
    from cluster.submit import ClusterError, JobNotFoundError, job_status, stop_job

    try:
        stopped = stop_job(address, job)
        status = job_status(address, job)["status"]
    except JobNotFoundError as exc:
        _fail(str(exc))
    except ClusterError as exc:
        _fail(str(exc), code=1)
    typer.echo(f"job {job}: stop requested ({status})" if stopped else f"job {job} was not running ({status})")


if __name__ == "__main__":
    app()
