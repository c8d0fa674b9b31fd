"""What Ray costs: the batch job (``batch.job.submit``, N actors) against a plain in-process loop over the same rows.

Both run the tiny preset on the CPU with metrics, over a manifest of R rows made from the example rows (new row
ids and seeds, so every row generates), into fresh temp outputs, and both are timed including start-up:

- plain loop: imports (torch, diffusers: this process has not loaded them yet), read + validate the manifest,
  build one ``Worker``, then ``process_and_write`` each chunk of ``plan_chunks(rows, batch_size)`` (the job's own
  chunking and order). Cold: the first run in this process; warm: a new Worker into a fresh output (modules
  already imported), over the R rows and then over 2R rows (the R rows + R more).
- Ray job, cold: ``ray.init`` (the job's own ``_init_ray``, timed on its own, import of ray included) + ``submit``
  (actor processes start, import torch and load their models).
- Ray job, warm: ``submit`` again in the same Ray session into a fresh output (no ``ray.init``; Ray Data still
  starts a new actor pool, so the actors start and load their models again), over the R rows and then over 2R
  rows (the R rows + R more).

For both, time(2R) - time(R) is the time of R rows without any start-up or first-call warm-up (the steady state),
and time(R) minus that is the start-up.

Prints a Markdown table and the command.

    python bench/batch_overhead.py                       # R=32 rows, 2 actors, batch size 4
    python bench/batch_overhead.py --rows 64 --actors 1 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

EXAMPLE = ROOT / "manifests" / "examples" / "example.parquet"
LORAS = ROOT / "manifests" / "examples" / "loras"


def make_manifest(rows: int, uri: str) -> int:
    """``rows`` rows cycling over the example rows, with new ids and seeds; returns the number of images."""
    from manifests.io import read_manifest, write_manifest

    base, rejected = read_manifest(str(EXAMPLE))
    assert not rejected, rejected
    out = [base[i % len(base)].model_copy(update={"row_id": f"bench-{i:04d}", "seed": 7000 + i})
           for i in range(rows)]
    write_manifest(out, uri)
    return sum(r.num_images for r in out)


def plain_loop(manifest: str, output: str, batch_size: int) -> dict[str, float]:
    """One Worker in this process over the job's chunks: seconds in total, before the first chunk, of the chunks."""
    t0 = time.perf_counter()
    from batch.job import plan_chunks
    from batch.worker import Worker, WorkerConfig
    from manifests.io import check_image_file, read_manifest
    from manifests.registry import LoRARegistry

    rows, rejected = read_manifest(manifest, check_image=check_image_file,
                                   known_relations=LoRARegistry(str(LORAS)).has)
    assert not rejected, rejected
    worker = Worker(WorkerConfig(output=output, preset="tiny", loras=str(LORAS), device="cpu"))
    t_ready = time.perf_counter()
    ok = 0
    for chunk in plan_chunks(rows, batch_size):
        ok += sum(r.status == "ok" for r in worker.process_and_write([r.model_dump(mode="json") for r in chunk]))
    end = time.perf_counter()
    assert ok == len(rows), f"{len(rows) - ok} of {len(rows)} rows failed"
    return dict(total=end - t0, startup=t_ready - t0, rows=end - t_ready)


def ray_job(manifest: str, output: str, actors: int, batch_size: int) -> float:
    """Seconds of one ``submit``; every row must come back ok."""
    from batch.job import JobConfig, submit

    t0 = time.perf_counter()
    summary = submit(JobConfig(manifest=manifest, output=output, loras=str(LORAS), actors=actors,
                               batch_size=batch_size))
    seconds = time.perf_counter() - t0
    assert summary["ok"] == summary["accepted"] == summary["read"] and not summary["error"], summary
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32, help="manifest rows R (cycling over the 18 example rows)")
    ap.add_argument("--actors", type=int, default=2, help="Ray actors (each loads its own model)")
    ap.add_argument("--batch-size", type=int, default=4, help="rows per actor call / per plain-loop chunk")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    # the tiny model is built once, in another process: this one has not imported torch when the loop starts
    subprocess.run([sys.executable, "-c", "from dreamrelation.model.presets import tiny_model_dir; tiny_model_dir()"],
                   check=True, cwd=ROOT, capture_output=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    manifest, manifest2 = str(tmp / "manifest.parquet"), str(tmp / "manifest-2x.parquet")
    images = make_manifest(args.rows, manifest)
    images2 = make_manifest(2 * args.rows, manifest2)

    plain_cold = plain_loop(manifest, str(tmp / "plain-cold"), args.batch_size)  # imports torch, diffusers
    plain = plain_loop(manifest, str(tmp / "plain-warm"), args.batch_size)
    plain2 = plain_loop(manifest2, str(tmp / "plain-warm-2x"), args.batch_size)
    plain_steady = plain2["total"] - plain["total"]

    from batch.job import _init_ray

    t0 = time.perf_counter()
    _init_ray(None)  # the job's own local-Ray start-up
    ray_init = time.perf_counter() - t0
    cold = ray_init + ray_job(manifest, str(tmp / "ray-cold"), args.actors, args.batch_size)
    warm = ray_job(manifest, str(tmp / "ray-warm"), args.actors, args.batch_size)
    warm2 = ray_job(manifest2, str(tmp / "ray-warm-2x"), args.actors, args.batch_size)
    steady = warm2 - warm  # R rows, no start-up

    import ray
    import torch

    ray.shutdown()
    load_after = os.getloadavg()[0]
    command = " ".join(["python bench/batch_overhead.py", *map(shlex.quote, sys.argv[1:])])
    print(f"\n`{command}`: R={args.rows} rows, {images} images (tiny preset, 128 px, 4 steps, metrics on); "
          f"{args.actors} Ray actors vs 1 in-process Worker; batch size {args.batch_size}; {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads in-process); "
          f"1-min load average {load_before:.2f} before, {load_after:.2f} after\n")
    print("| run | rows | total s | start-up s | rows only s | images/s (total) | Ray / plain, same rows (total) | "
          "Ray / plain (rows only) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    n = args.actors
    table = [  # name, rows, total, start-up, rows only (steady state), images, the plain run to compare with
        ("plain loop, cold (1 Worker)", args.rows, plain_cold["total"], None, None, images, None),
        ("plain loop, warm (1 Worker)", args.rows, plain["total"], plain["total"] - plain_steady, plain_steady,
         images, None),
        ("plain loop, warm (1 Worker)", 2 * args.rows, plain2["total"], None, None, images2, None),
        (f"Ray job, cold ({n} actors)", args.rows, cold, None, None, images, plain_cold["total"]),
        (f"Ray job, warm Ray ({n} actors)", args.rows, warm, warm - steady, steady, images, plain["total"]),
        (f"Ray job, warm Ray ({n} actors)", 2 * args.rows, warm2, None, None, images2, plain2["total"]),
    ]

    def fmt(v: float | None, digits: int = 1) -> str:
        return "" if v is None else f"{v:.{digits}f}"

    for name, rows, total, startup, only, imgs, base in table:
        ratio_rows = only / plain_steady if base is not None and only is not None else None
        print(f"| {name} | {rows} | {total:.1f} | {fmt(startup)} | {fmt(only)} | {imgs / total:.2f} | "
              f"{fmt(base and total / base, 2)} | {fmt(ratio_rows, 2)} |")
    print(f"\nrows only = time(2R) - time(R) of the warm runs: R rows without start-up; start-up = time(R) - rows "
          f"only. Ray's start-up: driver read + validate, actor processes (imports, model load); the cold run adds "
          f"ray.init ({ray_init:.1f} s). Plain start-up: manifest read, Worker init, first-call warm-up; the cold run "
          f"adds the imports. Cold plain run: {plain_cold['startup']:.1f} s before its first chunk.")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            command=command, rows=args.rows, images=images, actors=n, batch_size=args.batch_size,
            plain_cold=plain_cold, plain_warm=plain, plain_warm_2x=plain2, plain_rows_only=plain_steady,
            ray_init=ray_init, ray_cold=cold, ray_warm=warm, ray_warm_2x=warm2, ray_rows_only=steady), indent=2))


if __name__ == "__main__":
    main()
