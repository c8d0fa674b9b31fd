"""`dreamrelation eval relationbench` (the paper's benchmark over named configurations) and `eval toy-paper` (the
paper's claims in miniature, on the toy world)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from commands.common import PRESET_HELP, fail, progress_bar

eval_app = typer.Typer(help="Benchmarks: RelationBench (the paper's Tables 2 and 3) over named configurations, "
                            "and the paper in miniature on the toy world.",
                       no_args_is_help=True)


@eval_app.command("relationbench")
def eval_relationbench(
    subjects_dir: Annotated[str | None, typer.Argument(
        help="Folder of subject images (path or URL); the file name is the phrase (plushie_bear.png -> 'plushie "
             "bear'). Leave it out with --cases.", show_default=False)] = None,
    cases: Annotated[str | None, typer.Option(
        help="A cases manifest (Parquet, path or URL) instead of SUBJECTS_DIR: its rows as they are, e.g. the toy "
             "world's RelationBench-style cases (`data toy-world OUT --kind relationbench` writes "
             "OUT/relationbench.parquet); toy-world cases are also judged by the toy world's oracle (Identity %, "
             "Relation %). --n-single, --n-multi and --seed do not apply; --relations keeps rows of those "
             "relations; --steps and --num-images go to every case; each case keeps its size unless --size.")
    ] = None,
    config: Annotated[list[str] | None, typer.Option(
        "--config", help="A configuration (repeat): 'base' (no relation LoRA), 'lora' (the --loras registry), "
                         "'no-local-tokens' (--loras, local tokens off), NAME=URI (a LoRA registry or one LoRA "
                         "folder, e.g. no-kml=s3://b/loras-nokml), NAME=URI:no-local-tokens.")] = None,
    output: Annotated[str, typer.Option(help="Output root (path or URL): cases.parquet, runs/NAME/, tables.md/.csv, "
                                             "per_relation.md/.csv, plots/, gallery.html, eval.json.")
                      ] = "outputs/relationbench",
    loras: Annotated[str | None, typer.Option(help="LoRA registry of 'lora' and 'no-local-tokens'.")] = None,
    n_single: Annotated[int | None, typer.Option(
        help="Single-subject cases (default: 100; SUBJECTS_DIR only).", show_default=False)] = None,
    n_multi: Annotated[int | None, typer.Option(
        help="Two-subject cases (default: 100; SUBJECTS_DIR only).", show_default=False)] = None,
    seed: Annotated[int | None, typer.Option(
        help="Seed of the case draw (default: 0; SUBJECTS_DIR only).", show_default=False)] = None,
    relations: Annotated[str | None, typer.Option(
        help="Comma-separated relation ids: keep only their templates (e.g. those with a LoRA); with --cases, "
             "only the cases of these relations.")] = None,
    allow_missing: Annotated[bool, typer.Option(
        "--allow-missing", help="Run cases whose relation has no LoRA in a configuration without one (recorded) "
                                "instead of failing before the run.")] = False,
    allow_external_loras: Annotated[bool, typer.Option(
        "--allow-external-loras", help="Let a registry.json map relations to files outside its registry.")] = False,
    preset: Annotated[str, typer.Option(help=PRESET_HELP + ".")] = "tiny",
    local_encoder: Annotated[str | None, typer.Option(
        help="The distilled local image encoder of every configuration with local tokens: a `train "
             "distill-encoder` output folder or file, or the authors' epoch_6.pt (default: the preset's; "
             "--preset sdxl needs it unless every --config is ...:no-local-tokens).")] = None,
    local_grid: Annotated[int | None, typer.Option(
        help="Local tokens per subject: N x N (default: the preset's, 4); it must match the LoRAs' training "
             "(their card.json), e.g. 8 for LoRAs trained with --local-grid 8.")] = None,
    steps: Annotated[int, typer.Option(help="Denoising steps per image.")] = 30,
    size: Annotated[int | None, typer.Option(
        help="Image width and height, a multiple of 8 (default: 1024; with --cases each case's own).",
        show_default=False)] = None,
    num_images: Annotated[int, typer.Option(help="Images per case (seeds seed, seed+1, ...).")] = 1,
    actors: Annotated[int, typer.Option(help="Generation actors per configuration.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Rows per actor call.")] = 4,
    gpus_per_actor: Annotated[float | None, typer.Option(help="GPUs per actor (default: 1 with GPUs).")] = None,
    cpus_per_actor: Annotated[float | None, typer.Option(help="CPUs per actor (default: 0.5 without GPUs).")
                              ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    address: Annotated[str | None, typer.Option(help="Ray cluster address; default: a local Ray.")] = None,
    resume: Annotated[bool, typer.Option(help="Keep the results a previous run wrote under OUTPUT.")] = True,
) -> None:
    """Run RelationBench once per --config and write the paper's Tables 2/3, per-relation tables, plots, gallery.

    The cases: the 25 templates over SUBJECTS_DIR's images, or the rows of --cases (e.g. toy-world cases, with the
    oracle's accuracies in the tables)."""
    from batch.evaluate import DEFAULT_SIZE, EvalConfig, run_evaluation

    if (subjects_dir is None) == (cases is None):
        fail(f"give exactly one of SUBJECTS_DIR and --cases, got {'both' if cases else 'neither'} "
             f"(SUBJECTS_DIR {subjects_dir!r}, --cases {cases!r})")
    if cases is not None:
        for name, value in (("--n-single", n_single), ("--n-multi", n_multi), ("--seed", seed)):
            if value is not None:
                fail(f"{name} {value} does not apply to --cases {cases!r} (its rows are the cases, each with its "
                     f"own seed); leave {name} out")
    if not config:
        fail("--config must be given at least once (e.g. --config base --config lora)")
    for name, value in (("--steps", steps), ("--num-images", num_images), ("--actors", actors),
                        ("--batch-size", batch_size)):
        if value < 1:
            fail(f"{name} must be >= 1, got {value}")
    if size is not None and (size < 64 or size % 8):
        fail(f"--size must be a multiple of 8 and >= 64, got {size}")
    if size is None and cases is None:
        size = DEFAULT_SIZE
    ids = None if relations is None else tuple(r.strip() for r in relations.split(",") if r.strip())
    draw = {"n_single": n_single, "n_multi": n_multi, "seed": seed}
    cfg = EvalConfig(subjects_dir=subjects_dir, cases=cases, output=output, configs=tuple(config), loras=loras,
                     **{k: v for k, v in draw.items() if v is not None}, relations=ids, preset=preset, steps=steps,
                     width=size, height=size, local_encoder=_local_encoder(local_encoder), local_grid=local_grid,
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


@eval_app.command("toy-paper")
def eval_toy_paper(
    output: Annotated[Path, typer.Argument(help="Folder for the table (paper_in_miniature.md / .json) and the LoRAs.")],
    preset: Annotated[str, typer.Option(help="A model trained on the toy world: 'toy' or a `models train-toy` "
                                             "OUTPUT/model folder (its card.json names the held-out relation).")
                      ] = "toy",
    triplets: Annotated[int, typer.Option(help="Training triplets of the held-out relation.")] = 5,
    steps: Annotated[int, typer.Option(help="LoRA steps.")] = 200,
    batch_size: Annotated[int, typer.Option(help="Examples per LoRA step (gradient accumulation).")] = 4,
    lr: Annotated[float, typer.Option(help="LoRA learning rate.")] = 5e-4,
    kml_weight: Annotated[float | None, typer.Option(help="KML weight of the KML configurations (default: the "
                                                              "paper profile's 1e-3).")] = None,
    cases: Annotated[int, typer.Option(help="Held-out cases each configuration generates and the oracle judges.")
                     ] = 100,
    seed: Annotated[int, typer.Option(help="Seed of the triplets, the LoRAs and the cases.")] = 0,
    configs: Annotated[str | None, typer.Option(
        help="Comma-separated configurations (default all: base, lora_no_kml, lora_kml, lora_no_kml_no_local, "
             "lora_kml_no_local).")] = None,
) -> None:
    """The paper in miniature: relation LoRAs on the toy model's held-out relation, with and without KML and local
    tokens, against the model without a LoRA; the toy world's oracle judges identity and relation accuracy.

    Writes OUTPUT/paper_in_miniature.md (the table, 95% Wilson intervals) and .json, and prints the table. About
    11 minutes on 2 CPU cores at the defaults.
    """
    from dreamrelation.train.toy_paper import CONFIGS, PaperSettings, run_paper

    try:
        settings = PaperSettings(triplets=triplets, steps=steps, batch_size=batch_size, learning_rate=lr,
                                 kml_weight=kml_weight, cases=cases, seed=seed)
    except ValueError as exc:
        fail(f"--{exc}".replace("_", "-"))
    names = tuple(c.strip() for c in configs.split(",") if c.strip()) if configs else tuple(CONFIGS)
    unknown = [c for c in names if c not in CONFIGS]
    if unknown or not names:
        fail(f"--configs must name configurations from {list(CONFIGS)}, got {configs!r}")
    try:
        from dreamrelation.model.presets import resolve_spec

        resolve_spec(preset)
    except (ValueError, FileNotFoundError) as exc:
        fail(f"--preset: {exc}")
    bars: dict[str, tuple] = {}

    def lora_step(name: str, step: int, total: int) -> None:  # a bar per LoRA, closed at its last step
        if name not in bars:
            bars[name] = progress_bar("step", f"{name}: LoRA")
        bar, advance = bars[name]
        advance(step, total)
        if step == total:
            bar.close()

    try:
        run_paper(preset, output, settings, names, progress=lambda line: typer.echo(line, err=True),
                  on_step=lora_step)
    except ValueError as exc:
        fail(str(exc))
    finally:
        for bar, _ in bars.values():
            bar.close()
    typer.echo((output / "paper_in_miniature.md").read_text())
