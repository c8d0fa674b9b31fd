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
    check_images: Annotated[bool, typer.Option(help="Check that subject images exist and are images.")] = True,
) -> None:
    """Print a per-row report (OK or the field and reason); exit 1 when any row is rejected.

    Streams: memory holds the row_id column and one batch of rows, whatever the manifest's size."""
    from manifests.io import ManifestError, ReportTotals, iter_validated, manifest_row_count, report_line
    from manifests.registry import LoRARegistry
    from manifests.validation import check_image_file

    try:
        total = manifest_row_count(uri)
        registry = LoRARegistry(loras) if loras else None
        width = len(str(max(total - 1, 0)))
        totals = ReportTotals()
        for index, item in iter_validated(uri, check_image=check_image_file if check_images else None,
                                          known_relations=registry.has if registry else None):
            totals.add(item)
            typer.echo(report_line(index, item, width))
    except ManifestError as exc:
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
