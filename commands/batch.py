"""`dreamrelation batch`: submit a manifest to a Ray actor pool, and read (status, report, export) a run."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from commands.common import fail, progress_bar

batch_app = typer.Typer(help="Batch generation on Ray: Parquet manifests in, images and per-row metrics out.",
                        no_args_is_help=True)


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
            fail(f"{name} must be >= 1, got {value}")
    from manifests.schema import GateSpec

    try:
        gate = GateSpec.from_options(max_attempts=max_attempts, min_clip_t=min_clip_t, min_clip_r=min_clip_r,
                                     min_clip_i=min_clip_i, min_clip_i_crop=min_clip_i_crop, min_dino=min_dino)
    except ValueError as exc:
        fail(str(exc))
    logging.basicConfig(level=logging.WARNING)
    from batch.job import JobConfig, submit
    from batch.worker import WorkerConfig

    if loras is None:
        loras = _default_loras(manifest)
    try:
        worker = WorkerConfig(output=output, preset=preset, loras=loras, device=device, metrics=metrics,
                              max_batch_images=max_batch_images, lora_cache_size=lora_cache_size, gate=gate)
    except ValueError as exc:  # a gate without metrics
        fail(str(exc))
    config = JobConfig(manifest=manifest, output=output, worker=worker, preset=preset, loras=loras, actors=actors,
                       gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor, batch_size=batch_size,
                       address=address, resume=resume, check_images=check_images)
    bar, progress = progress_bar("row", "generating")
    try:
        summary = submit(config, progress=progress)
    except ManifestError as exc:
        fail(str(exc))
    except FileNotFoundError as exc:
        fail(str(exc))
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
        fail(str(exc))
    typer.echo(json.dumps(st, indent=2))


@batch_app.command("report")
def batch_report(output: Annotated[str, typer.Argument(help="Output root of a run.")]) -> None:
    """Write OUTPUT/report.html: every image with its prompt, relation, subjects and metrics (sortable)."""
    from batch.report import render_report

    try:
        typer.echo(render_report(output))
    except FileNotFoundError as exc:
        fail(str(exc))


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
        fail(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if shard_size < 1:
        fail(f"--shard-size must be >= 1, got {shard_size}")
    minimums = dict(min_clip_t=min_clip_t, min_clip_r=min_clip_r, min_clip_i=min_clip_i,
                    min_clip_i_crop=min_clip_i_crop, min_dino=min_dino)
    for name, value in minimums.items():
        if value is not None and not math.isfinite(value):
            fail(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    filters = ExportFilter(**minimums, passed_only=passed_only)
    logging.basicConfig(level=logging.WARNING)
    from dreamrelation.relation_phrase import relation_phrase

    bar, progress = progress_bar("image", f"exporting ({format})")
    try:
        summary = export_run(output, format, to, filters, shard_size=shard_size, relation_phrase=relation_phrase,
                             progress=progress)
    except (ExportError, FileNotFoundError) as exc:
        fail(str(exc))
    finally:
        bar.close()
    dropped = ", ".join(f"{k} {v}" for k, v in summary["filtered_out"].items()) or "none"
    typer.echo(f"samples {summary['samples']}  rows {summary['rows']}  images in run {summary['images']}  "
               f"filtered out: {dropped}  rows with errors {summary['rows_error']}")
    for uri in summary["missing_images"]:
        typer.echo(f"missing image (skipped): {uri}")
    typer.echo(f"files: {len(summary['files'])} under {to}  (card: {summary['files'][-1]})")
