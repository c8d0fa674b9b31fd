"""Throughput of ``batch submit`` with 1 and 2 actors on one machine (tiny preset), start-up separated out.

For each actor count, the job runs over R rows and then over 2R rows (fresh outputs, the same local Ray session);
time(2R) - time(R) is the steady-state time of R rows (no Ray start, no actor start, no model load), so
steady images/s = images(R) / (time(2R) - time(R)). Rows: the example rows with new ids and seeds, --steps
denoising steps at 128x128, metrics on. Prints a Markdown table.

    python bench/batch_scaling.py                 # R=24 rows, 20 steps, actors 1 and 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")


def rows(n: int, steps: int, prefix: str):
    from manifests.io import read_manifest

    base, _ = read_manifest(str(ROOT / "manifests" / "examples" / "example.parquet"))
    return [base[i % len(base)].model_copy(update={"row_id": f"{prefix}-{i:04d}", "seed": 7000 + i, "steps": steps})
            for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--actors", default="1,2")
    ap.add_argument("--batch-size", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from batch.job import JobConfig, _init_ray, submit
    from manifests.io import write_manifest

    _init_ray(None)
    work = Path(tempfile.mkdtemp())
    table = []
    for actors in [int(a) for a in args.actors.split(",")]:
        timing = {}
        for n in (args.rows, 2 * args.rows):
            manifest = work / f"m-{actors}-{n}.parquet"
            batch = rows(n, args.steps, f"a{actors}n{n}")
            write_manifest(batch, str(manifest))
            t = time.perf_counter()
            summary = submit(JobConfig(manifest=str(manifest), output=str(work / f"out-{actors}-{n}"),
                                       loras=str(ROOT / "manifests" / "examples" / "loras"), actors=actors,
                                       batch_size=args.batch_size))
            timing[n] = (time.perf_counter() - t, summary["images"])
        (t1, img1), (t2, img2) = timing[args.rows], timing[2 * args.rows]
        steady = t2 - t1
        table.append(dict(actors=actors, rows=args.rows, images=img1, seconds_total=round(t1, 2),
                          seconds_steady=round(steady, 2), startup_seconds=round(t1 - steady, 2),
                          images_per_s_total=round(img1 / t1, 3), images_per_s_steady=round((img2 - img1) / steady, 3)))
        print(json.dumps(table[-1]), flush=True)
    base = table[0]["images_per_s_steady"]
    print(f"\npython bench/batch_scaling.py --rows {args.rows} --steps {args.steps} --actors {args.actors} "
          f"--batch-size {args.batch_size}   ({os.cpu_count()} CPUs)\n")
    print("| actors | rows | images | total s | start-up s | steady s | images/s (total) | images/s (steady) | "
          "speed-up (steady) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['actors']} | {r['rows']} | {r['images']} | {r['seconds_total']} | {r['startup_seconds']} | "
              f"{r['seconds_steady']} | {r['images_per_s_total']} | {r['images_per_s_steady']} | "
              f"{r['images_per_s_steady'] / base:.2f}x |")


if __name__ == "__main__":
    main()
