"""Resume as an anti-join: the broadcast set of done row ids (what ``batch.pipeline`` does: built once per validation
actor) against Ray Data's hash join (``Dataset.join(..., "left_anti")``, which needs the ``polars`` package), on a
manifest of N rows of which half are done.

Both read the manifest with Ray Data and count the rows left to do; printed: seconds and rows/s of each (the
local Ray is started once, before either is timed).

    python bench/resume_join.py --rows 100000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--partitions", type=int, default=4)
    args = ap.parse_args()

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import ray

    from bench.manifest_scale import build_manifest
    from batch.pipeline import configure_data_context, read_manifest_rows
    from manifests.runtime import ray_init_args

    work = Path(tempfile.mkdtemp(prefix="resume-join-"))
    manifest = work / "m.parquet"
    build_manifest(args.rows, manifest)
    ids = pq.read_table(manifest, columns=["row_id"])["row_id"]
    done = pc.take(ids, pa.array(range(0, args.rows, 2)))  # every other row is done
    ray.init(**ray_init_args(None))
    configure_data_context()

    t = time.perf_counter()
    ref = ray.put(done)
    n_broadcast = read_manifest_rows(str(manifest)).map_batches(
        NotDone, fn_constructor_kwargs={"refs": [ref]}, batch_format="pyarrow", batch_size=1024,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2), num_cpus=0.25).count()
    broadcast = time.perf_counter() - t

    t = time.perf_counter()
    done_ds = ray.data.from_arrow(pa.table({"row_id": done}))
    n_join = read_manifest_rows(str(manifest)).join(done_ds, "left_anti", args.partitions, on=("row_id",)).count()
    join = time.perf_counter() - t

    assert n_broadcast == n_join == args.rows - len(done), (n_broadcast, n_join)
    print("| rows (half done) | broadcast set: s | rows/s | Ray Data left_anti join: s | rows/s |")
    print("|---|---|---|---|---|")
    print(f"| {args.rows:,} | {broadcast:.1f} | {args.rows / broadcast:,.0f} | {join:.1f} | "
          f"{args.rows / join:,.0f} |")


class NotDone:
    """As the pipeline's validation actors do it: the done ids as a set, built once per actor."""

    def __init__(self, refs):
        import ray

        self.done = frozenset(ray.get(refs[0]).to_pylist())

    def __call__(self, batch):
        import pyarrow as pa

        return batch.filter(pa.array([r not in self.done for r in batch["row_id"].to_pylist()]))


if __name__ == "__main__":
    main()
