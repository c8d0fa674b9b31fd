"""`dreamrelation data`: relation triplets, imported from the public format or made by the data engine."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from commands.common import PRESET_HELP, fail, oracle_line, progress_bar

data_app = typer.Typer(help="Relation fine-tuning data: triplets (subject images, target, keypoints).",
                       no_args_is_help=True)


@data_app.command("import-public")
def data_import_public(
    directory: Annotated[Path, typer.Argument(help="A relation folder in the authors' public format (prompts.json, "
                                                   "videos/<id>/, masks/<id>/).")],
    relation: Annotated[str, typer.Option(help="Relation id to file the triplets under, e.g. hugging.")],
    output: Annotated[str, typer.Option(help="Triplet dataset root (path or URL): triplets.parquet + images/.")],
) -> None:
    """Import a public relation folder as triplets; broken samples are reported and skipped."""
    from dreamrelation.train.data import import_public_folder
    from manifests.triplets import read_triplets, write_triplets

    if not directory.is_dir():
        fail(f"DIRECTORY not found: {str(directory)!r}")
    try:
        records, problems = import_public_folder(directory, relation, output=output)
    except (OSError, ValueError) as exc:
        fail(str(exc))
    for p in problems:
        typer.echo(f"skipped sample {p['sample']}: {p['reason']}", err=True)
    if not records:
        fail(f"no usable samples in {str(directory)!r} ({len(problems)} broken)")
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
    preset: Annotated[str, typer.Option(help=PRESET_HELP + "; also picks the annotators (tiny: the tiny, random "
                                             "ones; toy: the toy world's reader finds and masks the subjects, the "
                                             "rest tiny) and their gates.")] = "tiny",
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
    detection_threshold: Annotated[Optional[float], typer.Option(
        help="OWLv2 score a detection needs (default 0.1; every gate default is the preset's: thresholds noise "
             "passes for tiny).")] = None,
    max_instances: Annotated[Optional[int], typer.Option(
        help="Detections allowed per subject (default 1: found exactly once).")] = None,
    min_keypoint_confidence: Annotated[Optional[float], typer.Option(
        help="Mean keypoint confidence each subject needs, in [0, 1] (default 0.5).")] = None,
    visibility_threshold: Annotated[Optional[float], typer.Option(
        help="Keypoints less confident than this get visibility 0 (default 0.5).")] = None,
    min_clip_r: Annotated[Optional[float], typer.Option(
        help="CLIP-R (x100) the target needs (default 17; 0 disables).")] = None,
    min_layout_iou: Annotated[Optional[float], typer.Option(
        help="IoU each subject's box needs with its layout box (default: recorded, not gated).")] = None,
    max_subject_iou: Annotated[Optional[float], typer.Option(
        help="Drop when two subjects' boxes overlap more than this (default 0.8; 1 disables).")] = None,
    max_copy_paste_dino: Annotated[Optional[float], typer.Option(
        help="Drop a copy-paste target: DINO (x100) of a subject's crop in the target vs its subject image above "
             "this (default 90; 100 disables).")] = None,
    person_keypoints: Annotated[str, typer.Option(
        help="Keypoints of person subjects: 'coco' (ViTPose) or 'points' (dense correspondence).")] = "coco",
    animal_keypoints: Annotated[str, typer.Option(
        help="Keypoints of animal subjects: 'ap10k' (ViTPose with an AP-10K head) or 'points'.")] = "ap10k",
    animal_pose: Annotated[Optional[str], typer.Option(
        help="ViTPose folder whose head is AP-10K's (dreamrelation.engine.pose.save_vitpose_plus); default: the "
             "preset's (tiny: its twin; sdxl: none public, so animals get points).")] = None,
    animal_dataset_index: Annotated[int, typer.Option(
        help="ViTPose++ expert of --animal-pose (3: AP-10K).")] = 3,
    loras: Annotated[Optional[str], typer.Option(
        help="Relation LoRA registry (path or URL): a relation with a LoRA there gets its targets made with it "
             "(recorded per triplet); default: the base adapter alone.")] = None,
    caption: Annotated[bool, typer.Option(help="Caption each kept target (BLIP) into its metadata.")] = False,
    feature_size: Annotated[Optional[int], typer.Option(help="DINOv2 input side for keypoint transfer, a multiple "
                                                             "of its patch (default: 448; 64 for tiny).")] = None,
    local_encoder: Annotated[Optional[str], typer.Option(
        help="The generator's distilled local image encoder: a `train distill-encoder` output folder or file, or "
             "the authors' epoch_6.pt (default: the preset's); local tokens on --preset sdxl need it.")] = None,
    local_tokens: Annotated[bool, typer.Option(
        help="The generator adds the local tokens of each subject image (paper 3.4.3).")] = True,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
) -> None:
    """Make relation triplets (paper 3.3): generate subject and target images, annotate, gate, write triplets.

    Kept triplets go to OUTPUT/triplets.parquet (what `train relations` reads); dropped samples, with their stage
    and reason, to OUTPUT/dropped.parquet; counts, gates and keypoint choices to OUTPUT/engine.json. Running again
    resumes: samples judged with the same gates are skipped, those judged under other gates are judged again.
    """
    from batch.engine_job import EngineJobConfig, EngineJobError, run, summary_lines
    from batch.engine_worker import EngineConfig
    from dreamrelation.engine.gates import KeypointConfig, gates_for

    logging.basicConfig(level=logging.WARNING)
    if generator == "pipeline":
        from dreamrelation.model.local_encoder_ref import check_local_tokens

        try:
            local_encoder = check_local_tokens(preset, local_encoder, local_tokens)
        except ValueError as exc:
            fail(str(exc))
    try:
        gates, gates_note = gates_for(preset, detection_threshold=detection_threshold, max_instances=max_instances,
                                      min_keypoint_confidence=min_keypoint_confidence,
                                      visibility_threshold=visibility_threshold, min_clip_r=min_clip_r,
                                      min_layout_iou=min_layout_iou, max_subject_iou=max_subject_iou,
                                      max_copy_paste_dino=max_copy_paste_dino)
        keypoints = KeypointConfig(person=person_keypoints, animal=animal_keypoints, animal_pose=animal_pose,
                                   animal_dataset_index=animal_dataset_index)
        engine = EngineConfig(output=output, preset=preset, generator=generator, api_base=api_base,
                              api_key_env=api_key_env, api_model=api_model, api_size=api_size, device=device,
                              caption=caption, feature_size=feature_size, gates=gates, keypoints=keypoints,
                              loras=loras, local_encoder=local_encoder, use_local_tokens=local_tokens)
        config = EngineJobConfig(spec=spec, output=output, engine=engine, generate_actors=actors,
                                 annotate_actors=annotate_actors or actors, batch_size=batch_size,
                                 gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor, address=address,
                                 resume=resume, retry_errors=retry_errors, executor=executor)
    except ValueError as exc:
        fail(str(exc))
    if gates_note:
        typer.echo(gates_note)
    bar, progress = progress_bar("sample", "making triplets")
    try:
        summary = run(config, progress=progress)
    except (FileNotFoundError, ValueError, EngineJobError) as exc:
        fail(str(exc))
    finally:
        bar.close()
    for line in summary_lines(summary):
        typer.echo(line)


@data_app.command("toy-world")
def data_toy_world(
    output: Annotated[str, typer.Argument(help="Folder to write (path or URL): the Parquet file, subjects/, and "
                                               "references/ or images/.")],
    kind: Annotated[str, typer.Option(help="'manifest' (generation rows), 'triplets' (what `train relations` "
                                           "reads), 'relationbench' (rb-single-NNNN, rb-multi-NNNN cases) or "
                                           "'spec' (relation specs of the data engine, `data generate`).")
                    ] = "manifest",
    n: Annotated[int, typer.Option("--n", help="Rows to draw (relationbench: cases of each kind, single and "
                                               "multi; spec: samples per relation).")] = 100,
    seed: Annotated[int, typer.Option(help="Seed of the draw: the same seed writes the same rows and images.")] = 0,
    relations: Annotated[Optional[str], typer.Option(
        help="Comma-separated toy relation ids to draw, round-robin (default: all; not for relationbench).")] = None,
    lora_relations: Annotated[Optional[str], typer.Option(
        help="Manifest only: comma-separated relations whose rows name their relation, so that `batch submit` "
             "applies that relation's LoRA; 'none': no row does (the toy preset reads the relations it was trained "
             "on from the prompt). Default: every row names its relation.")] = None,
) -> None:
    """Toy-world data: coloured, patterned shapes acting out geometric relations at 64 x 64, exactly judgeable on
    a CPU (dreamrelation.toy.oracle)."""
    from manifests.toy_data import write_toy_world

    wanted = None if relations is None else [r.strip() for r in relations.split(",") if r.strip()]
    named = None if lora_relations is None else [
        r.strip() for r in lora_relations.split(",") if r.strip() and r.strip().lower() != "none"]
    try:
        uri = write_toy_world(output, kind, n, seed=seed, relations=wanted, lora_relations=named)
    except (OSError, ValueError) as exc:
        fail(str(exc))
    what = {"relationbench": f"{n} single + {n} multi cases", "triplets": f"{n} triplets",
            "spec": f"relation specs of {n} samples each"}.get(kind, f"{n} rows")
    typer.echo(f"{what} written to {uri}")


@data_app.command("judge")
def data_judge(
    output: Annotated[str, typer.Argument(help="Output folder of `data generate` on toy relation specs.")],
) -> None:
    """Judge a data engine output of toy relation specs (`data toy-world --kind spec`, made with `--preset toy`)
    with the toy world's exact oracle: every target it generated, those the gates kept (made into triplets) against
    those they dropped, by reason: whether the gates keep the targets that show their subjects and relation.
    Writes OUTPUT/oracle.parquet (one row per target, with the reasons)."""
    from batch.toy_judge import judge_engine

    try:
        result = judge_engine(output)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    for key, name in (("made", "targets the gates kept"), ("dropped", "targets the gates dropped")):
        if result[key] is not None:
            typer.echo(oracle_line(name, result[key], unit="targets"))
    for reason, rates in result["dropped_by_reason"].items():
        typer.echo(oracle_line(f"  dropped for {reason}", rates, unit="targets"))
    skipped = result["skipped"]
    if any(skipped.values()):
        typer.echo(f"not judged: {skipped['not_toy_samples']} samples not from the toy world, "
                   f"{skipped['missing_targets']} targets missing")
    typer.echo(f"per target: {result['file']}")
