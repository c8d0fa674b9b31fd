"""How ``batch submit`` scales with the manifest: driver memory, time to the first result, validation speed.

For each size (default 10k, 100k and 1M rows; tiny preset, 64x64, 1 step, one image, the example subjects and
relations) it builds a Parquet manifest and measures, each in a fresh ``dreamrelation batch submit`` process:

1. **generate**: the job as a user runs it; the benchmark watches the driver process (never its Ray workers),
   notes when the first results file lands, lets it run ``--after`` more seconds, then stops it with Ctrl-C (a
   clean stop: records written). Printed: driver peak RSS over the whole command, seconds from the start of the
   command to the first results file, and the exit code (130: stopped as asked).
2. **validate**: the same manifest with an unknown relation on every row, so every row goes through the full
   checks and is rejected (nothing is generated): the whole distributed read -> validate -> rejected.parquet path.
   Printed: wall seconds of the command and rows/s (rows / wall, Ray start-up included), driver peak RSS.
3. **in-process**: ``manifests.validation.RowValidator`` on one core over the first 20k rows: rows/s.

    python bench/manifest_scale.py                       # 10k, 100k, 1M
    python bench/manifest_scale.py --sizes 10000 --after 5

Prints a Markdown table (docs/scaling.md records it).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EXAMPLE = ROOT / "manifests" / "examples" / "example.parquet"
LORAS = ROOT / "manifests" / "examples" / "loras"


def build_manifest(n: int, path: Path, relation: str | None = "keep") -> None:
    """``n`` rows cycling over the example rows: new ids and seeds, 64x64, 1 step, 1 image."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from manifests.io import read_manifest, rows_to_table

    base, _ = read_manifest(str(EXAMPLE))
    small = [r.model_copy(update={"width": 64, "height": 64, "steps": 1, "num_images": 1}) for r in base]
    table = rows_to_table(small)
    reps = -(-n // table.num_rows)
    table = pa.concat_tables([table] * reps).slice(0, n)
    table = table.set_column(0, table.schema.field("row_id"), pa.array([f"row-{i:08d}" for i in range(n)]))
    table = table.set_column(table.schema.get_field_index("seed"), "seed", pa.array(range(n), pa.int64()))
    if relation != "keep":
        table = table.set_column(table.schema.get_field_index("relation"), "relation",
                                 pa.array([relation] * n, pa.string()))
    pq.write_table(table, path, row_group_size=65536)


def watch(cmd: list[str], results: Path | None, after: float, timeout: float) -> dict:
    """Run ``cmd``; sample the driver's RSS every 50 ms; with ``results``, stop it (SIGINT) ``after`` seconds after
    the first results file appears there."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    driver = psutil.Process(proc.pid)
    peak, first, stop_at = 0, None, None
    while proc.poll() is None:
        try:
            peak = max(peak, driver.memory_info().rss)
        except psutil.Error:
            pass
        now = time.perf_counter() - t0
        if results is not None and first is None and any(results.rglob("part-*.parquet")):
            first, stop_at = now, now + after
        if (stop_at is not None and now >= stop_at) or now > timeout:
            proc.send_signal(signal.SIGINT)
            stop_at = float("inf")
        time.sleep(0.05)
    stderr = proc.stderr.read()
    return dict(rc=proc.returncode, seconds=time.perf_counter() - t0, peak_mb=peak / 2**20, first=first,
                error=stderr.strip().splitlines()[-1] if proc.returncode not in (0, 1, 130) and stderr else "")


def in_process_rate(manifest: Path, rows: int = 20_000) -> float:
    import pyarrow.parquet as pq

    from manifests.registry import LoRARegistry
    from manifests.validation import RowValidator, check_image_file

    records = pq.ParquetFile(manifest).read_row_group(0).slice(0, rows).to_pylist()
    validator = RowValidator(check_image_file, LoRARegistry(str(LORAS)).has, base_uri=str(manifest))
    t = time.perf_counter()
    validator.check(list(enumerate(records)))
    return len(records) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--after", type=float, default=10.0, help="seconds to keep generating after the first result")
    ap.add_argument("--timeout", type=float, default=1800.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="manifest-scale-"))
    cli = [sys.executable, str(ROOT / "cli.py"), "batch", "submit"]
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        manifest, bad = work / f"m{n}.parquet", work / f"bad{n}.parquet"
        build_manifest(n, manifest)
        build_manifest(n, bad, relation="no-such-relation")
        gen = watch([*cli, str(manifest), "--output", str(work / f"out{n}"), "--loras", str(LORAS), "--actors", "1"],
                    work / f"out{n}" / "results", args.after, args.timeout)
        val = watch([*cli, str(bad), "--output", str(work / f"val{n}"), "--loras", str(LORAS), "--actors", "1"],
                    None, 0, args.timeout)
        rows.append((n, gen, val, in_process_rate(manifest)))
        print(f"{n} rows: generate {gen}  validate {val}", file=sys.stderr, flush=True)
    print("| rows | driver peak RSS (MB), generate | first result (s) | exit | validate all rows: wall (s) | "
          "rows/s | driver peak RSS (MB), validate | RowValidator, 1 core (rows/s) |")
    print("|---|---|---|---|---|---|---|---|")
    for n, gen, val, rate in rows:
        first = f"{gen['first']:.1f}" if gen["first"] is not None else "none"
        print(f"| {n:,} | {gen['peak_mb']:.0f} | {first} | {gen['rc']} | {val['seconds']:.1f} | "
              f"{n / val['seconds']:,.0f} | {val['peak_mb']:.0f} | {rate:,.0f} |")
    print(f"\n(work folder: {work})")


if __name__ == "__main__":
    main()
