"""`dreamrelation batch`: submit a manifest to a Ray actor pool, and read (status, report, export) a run."""

from __future__ import annotations

import json
import logging
import math
import signal
from pathlib import Path
from typing import Annotated, Optional

import typer

from commands.common import PRESET_HELP, fail, oracle_line, progress_bar, quiet_ray_logs

batch_app = typer.Typer(help="Batch generation on Ray: Parquet manifests in, images and per-row metrics out.",
                        no_args_is_help=True)


@batch_app.command("submit")
def batch_submit(
    manifest: Annotated[str, typer.Argument(help="Parquet manifest: a path or any fsspec URL (s3://, gs://, ...); a "
                                                 "folder of Parquet files is one manifest.")],
    output: Annotated[str, typer.Option(help="Output root of the run (path or URL): images/, results/, attempts/, "
                                             "rejected.parquet, run.json, report.html. One run per output.")]
    = "outputs/batch",
    preset: Annotated[str, typer.Option(help=PRESET_HELP + ".")] = "tiny",
    loras: Annotated[Optional[str], typer.Option(
        help="LoRA registry root: {loras}/{relation}/pytorch_lora_weights.safetensors or {loras}/registry.json. "
             "Default: manifests/examples/loras when the manifest is the example one, else none.")] = None,
    local_encoder: Annotated[Optional[str], typer.Option(
        help="The distilled local image encoder: a `train distill-encoder` output folder or its "
             "local_encoder.safetensors / epoch_N.pt, or the authors' epoch_6.pt; default: the preset's. Local "
             "tokens on --preset sdxl need it.")] = None,
    local_tokens: Annotated[bool, typer.Option(
        help="Add the local tokens of each subject image (paper 3.4.3).")] = True,
    local_grid: Annotated[Optional[int], typer.Option(
        help="Local tokens per subject: N x N cells (default: the preset's, 4; 2 and 8 in the paper's Table 6). "
             "Rows whose relation LoRA was trained with another grid (its card.json) become error rows.")] = None,
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
    resume: Annotated[bool, typer.Option(
        help="Skip rows that already have a result in the run. --no-resume starts a new generation of results: "
             "every row runs again; the old results stay under their attempts, out of status/report/export.")] = True,
    retry_errors: Annotated[bool, typer.Option(
        "--retry-errors", help="Also run again the rows whose last result is an error.")] = False,
    new_attempt: Annotated[bool, typer.Option(
        "--new-attempt", help="Go on with other execution settings than the run's (actors, batch size, devices, "
                              "...: they do not change finished rows). Settings that change images always refuse.")]
    = False,
    lease_timeout: Annotated[float, typer.Option(
        help="Seconds without a heartbeat after which another submission's lease on OUTPUT counts as stale.")]
    = 300.0,
    steal_lease: Annotated[bool, typer.Option(
        "--steal-lease", help="Take over a stale lease (its holder stopped beating for --lease-timeout seconds).")]
    = False,
    metrics: Annotated[bool, typer.Option(help="Score each image (CLIP-T, CLIP-R, CLIP-I, DINO).")] = True,
    lora_cache_size: Annotated[int, typer.Option(help="Relation LoRAs each actor keeps in memory.")] = 8,
    check_images: Annotated[bool, typer.Option(
        help="Check on the workers, before a row runs, that its subject images exist and are images (a few bytes "
             "read per distinct image); off: bad ones become per-row errors.")] = True,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    max_image_pixels: Annotated[int, typer.Option(
        help="Subject images with more pixels are rejected (read from their headers; never decoded).",
        rich_help_panel="Untrusted input")] = 40_000_000,
    max_row_cost: Annotated[float, typer.Option(
        help="Rows asking for more megapixel-steps (width x height / 1e6 x steps x images) are rejected. The "
             "paper's setting costs 31.", rich_help_panel="Untrusted input")] = 1000.0,
    row_timeout: Annotated[Optional[float], typer.Option(
        help="Seconds a row may take; a row over it becomes an error row (default: no limit).",
        rich_help_panel="Untrusted input")] = None,
    allow_http: Annotated[bool, typer.Option(
        "--allow-http", help="Let rows name http(s):// subject images (public addresses only).",
        rich_help_panel="Untrusted input")] = False,
    allow_private_urls: Annotated[bool, typer.Option(
        "--allow-private-urls", help="With --allow-http: also loopback, link-local and private addresses.",
        rich_help_panel="Untrusted input")] = False,
    allow_external_loras: Annotated[bool, typer.Option(
        "--allow-external-loras", help="Let registry.json map relations to files outside the registry.",
        rich_help_panel="Untrusted input")] = False,
    create_bucket: Annotated[bool, typer.Option(
        "--create-bucket", help="Create OUTPUT's bucket when it does not exist (else a missing bucket is an "
                                "error: a typo never creates one).")] = False,
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
    """Generate every row of MANIFEST on a Ray actor pool into the run at OUTPUT.

    Ray Data reads and validates the manifest on the workers; invalid rows go to OUTPUT/rejected.parquet with the
    field and the reason, the others go on. The first submission fixes the run's settings (preset, LoRAs, gate,
    ...); submitting again resumes it: rows with a result are skipped (errors too, unless --retry-errors). Every
    submission is an attempt recorded under OUTPUT/attempts/; run.json is the state of the whole run. One
    submission at a time holds OUTPUT's lease. Ctrl-C stops cleanly: records written, resume by submitting again.
    """
    for name, value in (("--actors", actors), ("--batch-size", batch_size), ("--max-batch-images", max_batch_images),
                        ("--lora-cache-size", lora_cache_size)):
        if value < 1:
            fail(f"{name} must be >= 1, got {value}")
    for name, value in (("--lease-timeout", lease_timeout), ("--max-row-cost", max_row_cost),
                        ("--row-timeout", row_timeout if row_timeout is not None else 1.0),
                        ("--max-image-pixels", max_image_pixels)):
        if not (math.isfinite(value) and value > 0):
            fail(f"{name} must be a positive number, got {value}")
    from manifests.schema import GateSpec

    try:
        gate = GateSpec.from_options(max_attempts=max_attempts, min_clip_t=min_clip_t, min_clip_r=min_clip_r,
                                     min_clip_i=min_clip_i, min_clip_i_crop=min_clip_i_crop, min_dino=min_dino)
    except ValueError as exc:
        fail(str(exc))
    logging.basicConfig(level=logging.WARNING)
    from batch.job import JobConfig, JobError, JobInterrupted, submit
    from batch.worker import WorkerConfig
    from manifests.access import AccessPolicy
    from manifests.errors import one_line

    if loras is None:
        loras = _default_loras(manifest)
    from dreamrelation.model.local_encoder_ref import check_local_tokens

    try:
        check_local_tokens(preset, local_encoder, local_tokens)
    except ValueError as exc:
        fail(str(exc))
    try:
        worker = WorkerConfig(output=output, preset=preset, loras=loras, device=device, metrics=metrics,
                              max_batch_images=max_batch_images, lora_cache_size=lora_cache_size, gate=gate,
                              local_encoder=local_encoder, use_local_tokens=local_tokens, local_grid=local_grid,
                              max_image_pixels=max_image_pixels, row_timeout=row_timeout,
                              access=AccessPolicy(allow_http=allow_http, allow_private_urls=allow_private_urls,
                                                  allow_external_loras=allow_external_loras))
    except ValueError as exc:  # a gate without metrics
        fail(str(exc))
    config = JobConfig(manifest=manifest, output=output, worker=worker, preset=preset, loras=loras, actors=actors,
                       gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor, batch_size=batch_size,
                       address=address, resume=resume, retry_errors=retry_errors, new_attempt=new_attempt,
                       check_images=check_images, lease_timeout=lease_timeout, steal_lease=steal_lease,
                       max_row_cost=max_row_cost, create_bucket=create_bucket)
    quiet_ray_logs()
    bar, progress = progress_bar("row", "generating")
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a stop (cluster stop, kill) ends like Ctrl-C
    try:
        summary = submit(config, progress=progress)
    except JobInterrupted as exc:
        bar.close()
        attempt = exc.summary["attempt"]
        typer.echo(_attempt_line(attempt))
        typer.secho(f"interrupted: attempt {attempt['attempt_id']} stopped; its record and run.json are written. "
                    f"Resume: submit the same command again.", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(code=130)
    except (ValueError, FileNotFoundError) as exc:  # ManifestError, RunMismatch, a malformed registry.json, ...
        fail(str(exc))
    except JobError as exc:
        fail(str(exc), code=1)
    except Exception as exc:  # noqa: BLE001 - anything else is still one line (the traceback with --debug)
        fail(one_line(exc), code=1)
    finally:
        bar.close()
        signal.signal(signal.SIGTERM, previous)
    from batch.report import render_report

    report = render_report(output)
    typer.echo(_attempt_line(summary["attempt"]))
    typer.echo(_run_line(summary["run"]))
    if summary["attempt"]["counts"].get("rejected"):
        typer.echo(f"rejected rows and reasons: {output.rstrip('/')}/rejected.parquet")
    typer.echo(f"report: {report}")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _attempt_line(attempt: dict) -> str:
    """This submission, in one line: what it read, skipped, rejected and made."""
    c = attempt["counts"]
    shown = lambda v: "?" if v is None else v  # noqa: E731 - not counted when the attempt was stopped
    line = (f"attempt {attempt['attempt_id']} ({attempt['status']}): read {c['read']}  rejected {shown(c['rejected'])}"
            f"  skipped {shown(c['skipped'])}  generated {c['processed']} rows (ok {c['ok']}, error {c['error']})  "
            f"images {c['images']}  ({attempt['images_per_second']} images/s over {attempt['seconds']:.1f} s)")
    gate = attempt.get("gate")
    if gate:
        line += (f"\ngate: passed {gate['passed']}  failed {gate['failed']}  attempts {gate['attempts']}  "
                 f"extra images {gate['extra_images']}")
    return line


def _run_line(run: dict) -> str:
    """The whole run, in one line: rows by state over every attempt so far."""
    r = run["rows"]
    if not r:
        return f"run {run['output']}: counts unknown (the results could not be read back)"
    return (f"run {run['output']}: {r['read']} rows: ok {r['ok']}  error {r['error']}  rejected {r['rejected']}  "
            f"pending {r['pending']}; {run['images']} images over {len(run['attempts'])} attempt"
            f"{'s' if len(run['attempts']) != 1 else ''}")


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


@batch_app.command("judge")
def batch_judge(
    output: Annotated[str, typer.Argument(help="Output root of a run of a toy-world manifest.")],
    manifest: Annotated[Optional[str], typer.Option(help="The rows' manifest (default: the one run.json names).")
                        ] = None,
) -> None:
    """Judge a run of toy-world rows (`data toy-world --kind manifest`, made with `--preset toy`) with the toy
    world's exact oracle: the share of images showing the row's subjects (shape, colour, pattern) and its relation.

    Under the quality gate it also judges every attempt: each slot's first attempt (what the run would have kept
    without the gate, so the gate's effect is measured), and the attempts the gate passed against those it failed
    (whether its scores tell good images from bad). Writes OUTPUT/oracle.parquet (one row per judged image, with
    the reasons).
    """
    from batch.toy_judge import judge_run

    try:
        result = judge_run(output, manifest)
    except (ValueError, FileNotFoundError) as exc:  # ManifestError is a ValueError
        fail(str(exc))

    typer.echo(oracle_line("final images", result["final"]))
    for key, name in (("first_attempt", "first attempts (no gate)"), ("gate_passed", "attempts the gate passed"),
                      ("gate_failed", "attempts the gate failed")):
        if result[key] is not None:
            typer.echo(oracle_line(name, result[key]))
    skipped = result["skipped"]
    if any(skipped.values()):
        typer.echo(f"not judged: {skipped['error_rows']} error rows, {skipped['not_toy_rows']} rows not from the toy "
                   f"world")
    typer.echo(f"per image: {result['file']}")


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
