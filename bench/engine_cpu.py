"""The relation-aware data engine on a CPU: keypoint transfer, the annotation models at their real sizes, the tiny
engine end to end. Prints figures; asserts nothing.

1. Keypoints (``dreamrelation.engine.keypoints``) on 1024x1024 synthetic images (a textured ellipse covering ~30% of the
   image; the target shows it moved and shrunk): ``mask_points`` on its mask, and one ``transfer_keypoints`` call
   (17 points, 448 px crops) with ``ColourFeatures`` and with ``Dinov2Features`` at the real dinov2-base
   architecture (``dinov2_base_config``, ViT-B/14, input 448 -> 32x32 patches).
2. The annotation models at their real architectures (OWLv2 base at 960 px, SAM ViT-B at 1024 px, BLIP base at
   384 px, ViTPose base at 256x192): each built with random weights, saved with a real-size processor into a temp
   folder, loaded through the project's class (``OwlDetector``, ``SamMasker``, ``Captioner``,
   ``VitPoseKeypoints``) and called on a 1024x1024 image: detect 2 phrases; 2 boxes for SAM; a caption of at most
   20 tokens; one person box for ViTPose. Parameters, load time and peak RSS (``resource.getrusage``, the peak
   reset before each load via /proc/self/clear_refs) are printed too.
3. The whole engine on the tiny preset without Ray (``batch.engine_job.run(..., executor="local")``) with
   permissive gates (max_instances 16, max_subject_iou 1.0, min_keypoint_confidence 0) so samples are made, on
   ``manifests/examples/relation_spec.yaml`` or, with ``--samples N``, a copy with the counts set to N in all.

Random weights: every output (points, boxes, masks, captions, poses) is meaningless; only time and memory are
measured. Timings are the median of ``--repeats`` calls after one warm-up call.

    python bench/engine_cpu.py                        # all three parts: ~2 min on 2 idle cores, far more when busy
    python bench/engine_cpu.py --skip-real --threads 1 --samples 12
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

SPEC = ROOT / "manifests" / "examples" / "relation_spec.yaml"
SIZE = 1024
MODELS = ("owlv2", "sam", "blip", "vitpose")


# --------------------------------------------------------------------------------------------------- measuring
def timed(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    """One warm-up call, then ``repeats`` timed calls: (median seconds, all timed seconds)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def rss_mib() -> float:
    """Current resident set size (VmRSS), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    """Peak RSS of this process (``getrusage``), MiB; since the last :func:`reset_peak_rss` where that worked."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False where it is not allowed."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def params(model) -> float:
    """Parameters, millions."""
    return sum(p.numel() for p in model.parameters()) / 1e6


def code_version() -> str:
    """The commit the code was run at, and how many tracked files differed from it (the figures depend on it)."""
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        changed = subprocess.run(["git", "diff", "--name-only", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return "commit unknown"
    return f"commit {commit}" + (f" + uncommitted changes in {', '.join(changed)}" if changed else "")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------------------------ synthetic data
def ellipse(centre: tuple[float, float], axes: tuple[float, float], size: int = SIZE) -> np.ndarray:
    """(size, size) bool ellipse mask; ``centre`` pixel (x, y), ``axes`` half-widths (a, b) in pixels."""
    yy, xx = np.mgrid[:size, :size]
    return ((xx - centre[0]) / axes[0]) ** 2 + ((yy - centre[1]) / axes[1]) ** 2 <= 1.0


def texture(size: int, seed: int) -> np.ndarray:
    """(size, size, 3) float32 in [0, 1]: smooth random colour blobs (a few octaves of upsampled noise)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(1, 3, size, size)
    for cells, weight in ((4, 0.5), (16, 0.3), (64, 0.2)):
        noise = torch.rand(1, 3, cells, cells, generator=g)
        out += weight * F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)
    return out[0].permute(1, 2, 0).clamp(0, 1).numpy()


def scene():
    """Source and target 1024x1024 images with their subject masks: the target shows the subject's texture
    moved and shrunk to 0.7x on a grey background. The source ellipse covers ~30% of the image."""
    from PIL import Image

    axes = (380.0, 265.0)  # pi * a * b = 0.30 * 1024^2
    source_mask = ellipse((512.0, 512.0), axes)
    tex = texture(SIZE, seed=0)
    background = np.full((SIZE, SIZE, 3), 0.55, dtype=np.float32)
    source = np.where(source_mask[..., None], tex, background)
    k, centre = 0.7, (600.0, 470.0)
    target_mask = ellipse(centre, (axes[0] * k, axes[1] * k))
    yy, xx = np.mgrid[:SIZE, :SIZE]
    sx = np.clip(np.round((xx - centre[0]) / k + 512.0), 0, SIZE - 1).astype(int)  # target pixel -> source pixel
    sy = np.clip(np.round((yy - centre[1]) / k + 512.0), 0, SIZE - 1).astype(int)
    target = np.where(target_mask[..., None], tex[sy, sx], background)
    to_pil = lambda a: Image.fromarray((a * 255).round().astype(np.uint8))  # noqa: E731
    return to_pil(source), source_mask, to_pil(target), target_mask


# ---------------------------------------------------------------------------------------- real-size random models
def build_real(kind: str, directory: Path, seed: int = 0) -> None:
    """The real architecture of ``kind`` with random weights + a processor at the real image size, saved to
    ``directory`` (tokenizers: the tiny builders' offline ones; their ids fit the real vocabularies)."""
    import torch

    torch.manual_seed(seed)
    if kind == "dinov2":
        from transformers import BitImageProcessor, Dinov2Model

        from dreamrelation.engine.keypoints import (
            IMAGENET_MEAN,
            IMAGENET_STD,
            dinov2_base_config,
        )

        Dinov2Model(dinov2_base_config()).save_pretrained(directory)
        BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                          image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).save_pretrained(directory)
    elif kind == "owlv2":
        from transformers import (
            Owlv2ForObjectDetection,
            Owlv2ImageProcessorPil,
            Owlv2Processor,
        )

        from dreamrelation.engine.annotate import owlv2_base_config
        from dreamrelation.model.tiny import build_tokenizer

        config = owlv2_base_config()
        config.initializer_range = 0.02  # as the tiny twin: the default (1.0) makes every box degenerate
        Owlv2ForObjectDetection(config).save_pretrained(directory)
        tokenizer = build_tokenizer()
        tokenizer.model_max_length = 16  # OWLv2 pads / truncates every query to 16 tokens
        Owlv2Processor(image_processor=Owlv2ImageProcessorPil(size={"height": 960, "width": 960}),
                       tokenizer=tokenizer).save_pretrained(directory)
    elif kind == "sam":
        from transformers import SamImageProcessorPil, SamModel, SamProcessor

        from dreamrelation.engine.annotate import sam_vit_base_config

        SamModel(sam_vit_base_config()).save_pretrained(directory)
        SamProcessor(image_processor=SamImageProcessorPil(
            size={"longest_edge": 1024}, pad_size={"height": 1024, "width": 1024},
            mask_size={"longest_edge": 256}, mask_pad_size={"height": 256, "width": 256},
        )).save_pretrained(directory)
    elif kind == "blip":
        from transformers import (
            BlipForConditionalGeneration,
            BlipImageProcessorPil,
            BlipProcessor,
        )

        from dreamrelation.engine.annotate import blip_base_config, build_blip_tokenizer

        BlipForConditionalGeneration(blip_base_config()).save_pretrained(directory)
        BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 384, "width": 384}),
                      tokenizer=build_blip_tokenizer()).save_pretrained(directory)
    elif kind == "vitpose":
        from transformers import VitPoseForPoseEstimation, VitPoseImageProcessorPil

        from dreamrelation.engine.pose import vitpose_base_config

        VitPoseForPoseEstimation(vitpose_base_config()).save_pretrained(directory)
        VitPoseImageProcessorPil(size={"height": 256, "width": 192}).save_pretrained(directory)
    else:
        raise ValueError(f"kind must be one of {['dinov2', *MODELS]}, got {kind!r}")


def load_and_call(kind: str, ref: Path, image, repeats: int) -> dict:
    """Load ``kind`` from ``ref`` through the project's class and time one call on ``image``."""
    t = time.perf_counter()
    if kind == "owlv2":
        from dreamrelation.engine.annotate import OwlDetector

        backend = OwlDetector(ref)
        model = backend.model
        out: dict = {}
        call = lambda: out.update(found=backend.detect(image, ["a dog", "a cat"], threshold=0.1))  # noqa: E731
        what = "detect 2 phrases (threshold 0.1)"
        note = lambda: "boxes kept per phrase " + "/".join(str(len(d)) for d in out["found"])  # noqa: E731
    elif kind == "sam":
        from dreamrelation.engine.annotate import SamMasker

        backend = SamMasker(ref)
        model = backend.model
        call = lambda: backend(image, [[0.05, 0.2, 0.5, 0.9], [0.5, 0.15, 0.95, 0.85]])  # noqa: E731
        what, note = "2 boxes -> 2 masks", lambda: ""
    elif kind == "blip":
        from dreamrelation.engine.annotate import Captioner

        backend = Captioner(ref, max_new_tokens=20)
        model = backend.model
        generate, lengths = model.generate, []

        def counting_generate(*args, **kwargs):
            tokens = generate(*args, **kwargs)
            lengths.append(int(tokens.shape[-1]))
            return tokens

        model.generate = counting_generate  # to report how many tokens were decoded
        call = lambda: backend(image)  # noqa: E731
        what = "caption, greedy, max 20 new tokens"
        note = lambda: f"output length {lengths[-1]} tokens (prompt included)"  # noqa: E731
    elif kind == "vitpose":
        from dreamrelation.engine.pose import VitPoseKeypoints

        backend = VitPoseKeypoints(ref)
        model = backend.model
        call = lambda: backend(image, [0.3, 0.1, 0.7, 0.95])  # noqa: E731
        what, note = "1 person box -> 17 keypoints", lambda: ""
    else:
        raise ValueError(f"kind must be one of {list(MODELS)}, got {kind!r}")
    load = time.perf_counter() - t
    median, times = timed(call, repeats)
    return dict(params=params(model), load=load, median=median, times=times, what=what, note=note())


# ----------------------------------------------------------------------------------------------------- parts
def part_keypoints(repeats: int, work: Path) -> None:
    from dreamrelation.engine.keypoints import (
        ColourFeatures,
        Dinov2Features,
        mask_points,
        transfer_keypoints,
    )

    source, source_mask, target, target_mask = scene()
    print(f"\n## 1. Keypoint transfer, {SIZE}x{SIZE} (source mask {source_mask.mean():.1%} of the image, target "
          f"{target_mask.mean():.1%}; median of {repeats} after a warm-up)\n")
    print("| step | median s | min s | max s | note |")
    print("|---|---:|---:|---:|---|")
    median, times = timed(lambda: mask_points(source_mask, 17), repeats)
    print(f"| mask_points (17 points) | {median:.3f} | {min(times):.3f} | {max(times):.3f} | |", flush=True)
    points = mask_points(source_mask, 17)

    colour = ColourFeatures()
    result: dict = {}
    median, times = timed(lambda: result.update(t=transfer_keypoints(colour, source, points, source_mask, target,
                                                                     target_mask)), repeats)
    print(f"| transfer_keypoints, ColourFeatures (448 px crops) | {median:.3f} | {min(times):.3f} | "
          f"{max(times):.3f} | mean confidence {result['t'].confidence.mean():.2f} |", flush=True)

    ref = work / "dinov2-base"
    t = time.perf_counter()
    build_real("dinov2", ref)
    build = time.perf_counter() - t
    reset_ok = reset_peak_rss()
    before = rss_mib()
    t = time.perf_counter()
    dino = Dinov2Features(ref, size=448)
    load = time.perf_counter() - t
    # noqa F821: ruff sees the `del dino` below; the lambda runs before it
    median, times = timed(lambda: transfer_keypoints(dino, source, points, source_mask, target,  # noqa: F821
                                                     target_mask), repeats)
    print(f"| transfer_keypoints, Dinov2Features (dinov2-base, random weights, 448 -> 32x32) | {median:.3f} | "
          f"{min(times):.3f} | {max(times):.3f} | 2 forwards per call; {params(dino.model):.1f}M params, load "
          f"{load:.1f} s (build + save {build:.1f} s), RSS {before:.0f} MiB before load, peak "
          f"{peak_rss_mib():.0f} MiB{'' if reset_ok else ' (process peak: reset not allowed)'} |", flush=True)
    del dino
    shutil.rmtree(ref, ignore_errors=True)
    gc.collect()


def part_models(models: list[str], repeats: int, work: Path) -> None:
    image, *_ = scene()
    print(f"\n## 2. Annotation models at their real architectures, random weights, one call on a {SIZE}x{SIZE} "
          f"image (median of {repeats} after a warm-up)\n")
    print("| model | call | params M | build + save s | load s | median s | min s | max s | RSS before load MiB | "
          "peak RSS MiB | note |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    names = dict(owlv2="OWLv2 base/16 @960", sam="SAM ViT-B @1024", blip="BLIP base @384",
                 vitpose="ViTPose base @256x192")
    for kind in models:
        ref = work / kind
        t = time.perf_counter()
        build_real(kind, ref)
        build = time.perf_counter() - t
        reset_ok = reset_peak_rss()
        before = rss_mib()
        r = load_and_call(kind, ref, image, repeats)
        peak = peak_rss_mib()
        print(f"| {names[kind]} | {r['what']} | {r['params']:.1f} | {build:.1f} | {r['load']:.1f} | "
              f"{r['median']:.3f} | {min(r['times']):.3f} | {max(r['times']):.3f} | {before:.0f} | {peak:.0f}"
              f"{'' if reset_ok else ' (process peak)'} | {r['note']} |", flush=True)
        shutil.rmtree(ref, ignore_errors=True)
        gc.collect()


def spec_with(samples: int | None, directory: Path) -> Path:
    """The example spec, or a copy whose counts add up to ``samples`` (split evenly over its relations)."""
    if samples is None:
        return SPEC
    import yaml

    document = yaml.safe_load(SPEC.read_text())
    relations = document["relations"]
    counts = [samples // len(relations) + (i < samples % len(relations)) for i in range(len(relations))]
    document["relations"] = [dict(r, count=c) for r, c in zip(relations, counts) if c > 0]
    path = directory / "relation_spec.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def part_engine(samples: int | None, work: Path) -> None:
    from batch.engine_job import EngineJobConfig, run
    from batch.engine_worker import EngineConfig
    from dreamrelation.engine.annotate import tiny_annotator_dir
    from dreamrelation.engine.gates import gates_for
    from dreamrelation.model.presets import tiny_model_dir

    t = time.perf_counter()
    tiny_model_dir(), tiny_annotator_dir()  # cached builds: made here on first use, not inside the timed run
    caches = time.perf_counter() - t
    spec = spec_with(samples, work)
    output = work / "engine"
    gates, _ = gates_for("tiny", max_instances=16, max_subject_iou=1.0, min_keypoint_confidence=0.0)
    engine = EngineConfig(output=str(output), preset="tiny", device="cpu", gates=gates)
    t = time.perf_counter()
    summary = run(EngineJobConfig(spec=str(spec), output=str(output), engine=engine, executor="local",
                                  resume=False))
    wall = time.perf_counter() - t
    stages = summary["seconds_per_stage"]
    done = summary["made"] + summary["dropped"]
    stage_total = sum(stages.values())
    batch_size = summary["configuration"]["batch_size"]
    print(f"\n## 3. The engine, tiny preset, executor local (no Ray), "
          f"{'the example spec' if samples is None else f'the example spec with {samples} samples'}\n")
    name = spec.relative_to(ROOT) if spec.is_relative_to(ROOT) else spec.name
    drops = f" {summary['dropped_by_reason']}" if summary["dropped"] else ""
    print(f"spec {name}: {summary['planned']} planned, {summary['made']} made, {summary['dropped']} dropped{drops}; "
          f"gates max_instances 16, max_subject_iou 1.0, min_keypoint_confidence 0; batch size {batch_size}; tiny "
          f"caches ready in {caches:.1f} s (before the run)\n")
    print("| figure | value |")
    print("|---|---:|")
    print(f"| run() wall s (plan, stage loads, samples, writing the dataset) | {wall:.2f} |")
    print(f"| seconds_run s (stage loads + samples) | {summary['seconds_run']:.2f} |")
    print(f"| samples/s (engine summary: samples / seconds_run) | {summary['samples_per_second']:.3f} |")
    for name, seconds in stages.items():
        print(f"| stage {name} s, all samples (per sample) | {seconds:.2f} ({seconds / max(done, 1):.3f}) |")
    if stage_total > 0:
        print(f"| samples/s over stage time only (no loads) | {done / stage_total:.3f} |")
    overhead = summary["seconds_run"] - stage_total
    print(f"| stage loads and other overhead s (seconds_run - stage sums) | {overhead:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-real", action="store_true", help="skip part 2 (the real-size annotation models)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--samples", type=int, default=None,
                    help="engine samples in part 3 (default: the example spec as it is, 6 samples)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up (median reported)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"part 2 models, from {','.join(MODELS)}")
    ap.add_argument("--parts", default="1,2,3", help="which parts to run")
    args = ap.parse_args()
    models = [m for m in args.models.split(",") if m]
    if bad := [m for m in models if m not in MODELS]:
        ap.error(f"--models: unknown {bad}, choose from {list(MODELS)}")
    if args.samples is not None and args.samples < 1:
        ap.error(f"--samples must be >= 1, got {args.samples}")
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    parts = {int(p) for p in args.parts.split(",") if p}
    if args.skip_real:
        parts.discard(2)

    import diffusers.utils.logging
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars
    diffusers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    command = " ".join(["python bench/engine_cpu.py", *map(shlex.quote, sys.argv[1:])])
    print(f"`{command}` at {code_version()}\n")
    print(f"{cpu_name()}, {os.cpu_count()} CPUs, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f}"
          f" GiB RAM; torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
          f"{transformers.__version__}, Python {platform.python_version()}; float32 on the CPU; load average "
          f"{load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f} (1 / 5 / 15 min) at start")
    if load_before[0] > 0.75 * (os.cpu_count() or 1):
        print(f"BUSY MACHINE: the 1-min load average ({load_before[0]:.2f}) is near or above the CPU count: the "
              f"figures are inflated, most of all with more than one torch thread (a thread that is descheduled "
              f"stalls every parallel op; --threads 1 suffers least).")
    print("RANDOM WEIGHTS: the DINOv2 and annotation models (parts 1-2) and the tiny preset (part 3) have random "
          "weights, so their outputs (points, confidences, boxes, masks, captions, poses, gate decisions) are "
          "meaningless; only time and memory are measured.")
    work = Path(tempfile.mkdtemp(prefix="bench-engine-cpu-"))
    t0 = time.perf_counter()
    try:
        if 1 in parts:
            part_keypoints(args.repeats, work)
        if 2 in parts:
            part_models(models, args.repeats, work)
        if 3 in parts:
            part_engine(args.samples, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; load average {load_after[0]:.2f} / {load_after[1]:.2f} / "
          f"{load_after[2]:.2f} at the end; process peak RSS {peak_rss_mib():.0f} MiB since the last reset")


if __name__ == "__main__":
    main()
