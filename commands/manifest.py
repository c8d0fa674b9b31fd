"""`dreamrelation manifest`: validate a Parquet manifest, build one from CSV / JSONL or from RelationBench."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from commands.common import fail

manifest_app = typer.Typer(help="Build and validate Parquet manifests of (subjects, relation, layout) rows.",
                           no_args_is_help=True)


@manifest_app.command("validate")
def manifest_validate(
    uri: Annotated[str, typer.Argument(help="Parquet manifest (path or fsspec URL).")],
    loras: Annotated[Optional[str], typer.Option(help="LoRA registry root: rows with an unknown relation are "
                                                      "reported.")] = None,
    check_images: Annotated[bool, typer.Option(help="Check that subject images exist and are images within the "
                                                    "pixel cap (their headers only).")] = True,
    max_image_pixels: Annotated[int, typer.Option(help="The pixel cap of subject images.")] = 40_000_000,
    max_row_cost: Annotated[float, typer.Option(help="The row budget, in megapixel-steps (width x height / 1e6 x "
                                                     "steps x images).")] = 1000.0,
    allow_http: Annotated[bool, typer.Option("--allow-http", help="Accept http(s):// subject images.")] = False,
    allow_private_urls: Annotated[bool, typer.Option("--allow-private-urls", help="... also at private, "
                                                     "loopback and link-local addresses.")] = False,
    allow_external_loras: Annotated[bool, typer.Option("--allow-external-loras", help="Accept registry.json "
                                                       "entries outside the registry.")] = False,
) -> None:
    """Print a per-row report (OK or the field and reason); exit 1 when any row is rejected.

    The same checks as `batch submit`, with the same options. Streams: memory holds the row_id column and one
    batch of rows, whatever the manifest's size."""
    from manifests.access import AccessPolicy
    from manifests.io import ManifestError, ReportTotals, iter_validated, manifest_row_count, report_line
    from manifests.validation import Checks

    for name, value in (("--max-image-pixels", max_image_pixels), ("--max-row-cost", max_row_cost)):
        if not value > 0:
            fail(f"{name} must be a positive number, got {value}")
    checks = Checks(check_images=check_images, max_image_pixels=max_image_pixels, max_row_cost=max_row_cost,
                    access=AccessPolicy(allow_http=allow_http, allow_private_urls=allow_private_urls,
                                        allow_external_loras=allow_external_loras))
    try:
        total = manifest_row_count(uri)
        width = len(str(max(total - 1, 0)))
        totals = ReportTotals()
        for index, item in iter_validated(uri, checks.validator(uri, loras, relations=loras is not None)):
            totals.add(item)
            typer.echo(report_line(index, item, width))
    except (ManifestError, ValueError) as exc:  # a bad file, a malformed registry.json
        fail(str(exc))
    typer.echo(totals.line())
    if totals.rejected:
        raise typer.Exit(code=1)


@manifest_app.command("build")
def manifest_build(
    source: Annotated[Path, typer.Argument(help="CSV or JSONL with one row per line (see README).")],
    output: Annotated[str, typer.Argument(help="Parquet manifest to write (path or URL).")],
) -> None:
    """Build a Parquet manifest from CSV or JSONL; invalid rows are reported and the command fails."""
    from manifests.io import manifest_from_records, manifest_report, validate_records, write_manifest

    if not source.is_file():
        fail(f"source not found: {str(source)!r}")
    try:
        records = manifest_from_records(source)
    except ValueError as exc:
        fail(str(exc))
    rows, rejected = validate_records(records)
    if rejected:
        typer.echo(manifest_report(rows, rejected), err=True)
        fail(f"{len(rejected)} of {len(records)} rows are invalid; nothing written")
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
        fail(f"SUBJECTS_DIR not found: {str(subjects_dir)!r}")
    subjects = subjects_from_dir(subjects_dir)
    try:
        rows = build_cases(subjects, n_single=single, n_multi=multi, seed=seed, width=width, height=height)
    except ValueError as exc:
        fail(str(exc))
    write_manifest(rows, output)
    typer.echo(f"{len(rows)} cases written to {output}")
