"""`dreamrelation eval relationbench`: the paper's benchmark over named configurations."""

from __future__ import annotations

import logging
from typing import Annotated, Optional

import typer

from commands.common import fail, progress_bar

eval_app = typer.Typer(help="Benchmarks: RelationBench (the paper's Tables 2 and 3) over named configurations.",
                       no_args_is_help=True)


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
    allow_external_loras: Annotated[bool, typer.Option(
        "--allow-external-loras", help="Let a registry.json map relations to files outside its registry.")] = False,
    preset: Annotated[str, typer.Option(help="'tiny' (noise images), 'sdxl' or a model folder.")] = "tiny",
    local_encoder: Annotated[Optional[str], typer.Option(
        help="The distilled local image encoder of every configuration with local tokens: a `train "
             "distill-encoder` output folder or file, or the authors' epoch_6.pt (default: the preset's; "
             "--preset sdxl needs it unless every --config is ...:no-local-tokens).")] = None,
    local_grid: Annotated[Optional[int], typer.Option(
        help="Local tokens per subject: N x N (default: the preset's, 4); it must match the LoRAs' training "
             "(their card.json), e.g. 8 for LoRAs trained with --local-grid 8.")] = None,
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
    from batch.evaluate import EvalConfig, run_evaluation

    if not config:
        fail("--config must be given at least once (e.g. --config base --config lora)")
    for name, value in (("--steps", steps), ("--num-images", num_images), ("--actors", actors),
                        ("--batch-size", batch_size)):
        if value < 1:
            fail(f"{name} must be >= 1, got {value}")
    if size < 64 or size % 8:
        fail(f"--size must be a multiple of 8 and >= 64, got {size}")
    ids = None if relations is None else tuple(r.strip() for r in relations.split(",") if r.strip())
    cfg = EvalConfig(subjects_dir=subjects_dir, output=output, configs=tuple(config), loras=loras, n_single=n_single,
                     n_multi=n_multi, seed=seed, relations=ids, preset=preset, steps=steps, width=size, height=size,
                     local_encoder=_local_encoder(local_encoder), local_grid=local_grid,
                     num_images=num_images, allow_missing=allow_missing,
                     allow_external_loras=allow_external_loras, actors=actors, batch_size=batch_size,
                     gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor, device=device, address=address,
                     resume=resume)
    logging.basicConfig(level=logging.WARNING)
    bar, advance = progress_bar("row", "relationbench")

    def progress(name: str, done: int, total: int) -> None:
        bar.set_description(name)
        advance(done, total)

    try:
        summary = run_evaluation(cfg, progress=progress)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    finally:
        bar.close()
    from manifests import storage

    typer.echo(storage.read_bytes(summary["files"]["tables.md"]).decode())
    for name, uri in summary["files"].items():
        typer.echo(f"{name}: {uri}")


def _local_encoder(ref: str | None) -> str | None:
    """``--local-encoder`` checked (a local path must hold a checkpoint) and made absolute; whether the preset needs
    one is checked per configuration, after the checks of a resumed output."""
    from dreamrelation.model.local_encoder_ref import local_encoder_ref

    try:
        return local_encoder_ref(ref)
    except ValueError as exc:
        fail(str(exc))
