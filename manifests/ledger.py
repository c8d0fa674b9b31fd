"""The ledger of a run: the one final result of each row, read the same way by every reader (resume, status, report,
export, eval).

Results are written by the generation actors, one Parquet file per actor call, under the attempt (submission) that
made them: ``results/{attempt_id}/part-{digest}.parquet``; the name is a digest of the call's row ids, so a call
retried after a killed actor overwrites its own file. When an attempt ends its parts are compacted into a few
``merged-*.parquet`` files, so a reader opens a handful of files per attempt, not one per call. Results written
outside a run (a ``Worker`` used directly) and by versions before runs had attempts sit directly under ``results/``
(attempt id ``""``).

A row's final result is the one of its latest finished attempt: the greatest ``(finished_at, attempt_id)``, never the
order of file names. Only the attempts of the run's current generation count: ``batch submit --no-resume`` starts a new
generation, and the results of older generations stay readable under their attempt folders, never mixed in.

Result rows store image keys relative to the output root (``images/{row_id}/0.png``); :func:`ledger_records`
resolves them against the root it is given, so a run folder can be moved or copied to a bucket.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from manifests import storage
from manifests.io import RESULT_SCHEMA, conform, write_table
from manifests.run_record import current_generation, read_attempts

logger = logging.getLogger(__name__)

RESULTS_DIR = "results"
PART_PREFIX = "part-"
MERGED_PREFIX = "merged-"
# what resume and the counts need: a small projection of the result rows
KEY_COLUMNS = ("row_id", "status", "finished_at", "attempt_id")
_READ_THREADS = 16  # result files are small: reading them is latency-bound on object stores


def results_folder(output: str, attempt_id: str = "") -> str:
    """``{output}/results/{attempt_id}`` (``{output}/results`` for results written outside a run)."""
    return storage.join(output, RESULTS_DIR, attempt_id) if attempt_id else storage.join(output, RESULTS_DIR)


def part_uri(output: str, attempt_id: str, row_ids: Sequence[str]) -> str:
    """The deterministic file of one actor call's results: a retried call overwrites it, never adds a second one."""
    digest = hashlib.sha1("\n".join(sorted(row_ids)).encode()).hexdigest()[:20]
    return storage.join(results_folder(output, attempt_id), f"{PART_PREFIX}{digest}.parquet")


def attempt_folders(output: str) -> list[str]:
    """Attempt ids that have a results folder (``""`` first when results sit directly under ``results/``)."""
    root = results_folder(output)
    fs, path = storage.filesystem(root)
    try:
        fs.invalidate_cache(path)
        entries = fs.ls(path, detail=True) if fs.exists(path) else []
    except FileNotFoundError:
        entries = []
    found = set()
    for entry in entries:
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry.get("type") == "directory":
            found.add(name)
        elif name.endswith(".parquet") and ".tmp-" not in name:
            found.add("")
    return sorted(found)


def result_files(output: str, generation: int | None = None) -> list[str]:
    """The result files of the attempts of ``generation`` (default: the run's current generation). Attempts with no
    record (results written outside a run) belong to generation 0."""
    if generation is None:
        generation = current_generation(output)
    generations = {a.attempt_id: a.generation for a in read_attempts(output)}
    files: list[str] = []
    for attempt in attempt_folders(output):
        if generations.get(attempt, 0) == generation:
            files += storage.list_files(results_folder(output, attempt), ".parquet")
    return files


def _read(uri: str, columns: Sequence[str] | None) -> pa.Table:
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        table = parquet.read(columns=[c for c in columns if c in names] if columns else None)
    schema = RESULT_SCHEMA if not columns else pa.schema([RESULT_SCHEMA.field(c) for c in columns])
    return conform(table, schema)


def read_files(files: Sequence[str], columns: Sequence[str] | None = None) -> pa.Table:
    """Result files concatenated with ``RESULT_SCHEMA`` (or its ``columns``): older files get nulls for newer columns."""
    schema = RESULT_SCHEMA if not columns else pa.schema([RESULT_SCHEMA.field(c) for c in columns])
    if not files:
        return schema.empty_table()
    with ThreadPoolExecutor(min(_READ_THREADS, len(files))) as pool:
        tables = list(pool.map(lambda uri: _read(uri, columns), files))
    return pa.concat_tables(tables)


def final_results(table: pa.Table) -> pa.Table:
    """One row per ``row_id``: the latest ``(finished_at, attempt_id)``, sorted by row id. ``table`` must hold
    ``row_id``, ``finished_at`` and ``attempt_id``."""
    if table.num_rows == 0:
        return table
    table = table.set_column(table.schema.get_field_index("attempt_id"), "attempt_id",
                             pc.fill_null(table["attempt_id"], ""))
    order = pc.sort_indices(table, sort_keys=[("row_id", "ascending", "at_end"), ("finished_at", "descending", "at_end"),
                                              ("attempt_id", "descending", "at_end")])
    table = table.take(order)
    ids = table["row_id"].combine_chunks()
    first = pa.concat_arrays([pa.array([True]), pc.not_equal(ids[1:], ids[:-1])]) if len(ids) > 1 \
        else pa.array([True])
    return table.filter(first)


def read_ledger(output: str, columns: Sequence[str] | None = None, generation: int | None = None) -> pa.Table:
    """The final result of each row of the run at ``output`` (current generation), sorted by row id. Image keys are
    left as stored; ``columns`` (a projection, always including :data:`KEY_COLUMNS`) keeps the read small."""
    if columns is not None:
        columns = list(dict.fromkeys([*KEY_COLUMNS, *columns]))
    return final_results(read_files(result_files(output, generation), columns))


def resolve(output: str, key: str | None) -> str | None:
    """An image key of a result row as a URI under ``output`` (absolute paths and URLs stay as they are)."""
    return storage.resolve(output, key) if key else key


def _first_finals(output: str, limit: int, generation: int | None) -> pa.Table:
    """The whole final rows of the first ``limit`` row ids: the keys of every result first (a small projection),
    then each file's rows of the chosen (row id, attempt, finished_at) only, so memory holds one file at a time."""
    keys = read_ledger(output, (), generation).slice(0, limit)
    chosen = set(zip(keys["row_id"].to_pylist(), keys["attempt_id"].to_pylist(), keys["finished_at"].to_pylist()))
    ids = keys["row_id"]
    parts = []
    for uri in result_files(output, generation):
        table = _read(uri, None)
        table = table.filter(pc.is_in(table["row_id"], value_set=ids))
        keep = [(r, a or "", f) in chosen for r, a, f in zip(table["row_id"].to_pylist(),
                                                            table["attempt_id"].to_pylist(),
                                                            table["finished_at"].to_pylist())]
        parts.append(table.filter(pa.array(keep, pa.bool_())))
    return final_results(pa.concat_tables(parts)) if parts else RESULT_SCHEMA.empty_table()


def ledger_records(output: str, generation: int | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """:func:`read_ledger` as dicts, image keys resolved to URIs under ``output``: what status, report, export and
    evaluation read. ``limit``: only the first rows by row id (a report of a million-row run stays small)."""
    table = read_ledger(output, generation=generation) if limit is None else _first_finals(output, limit, generation)
    records = table.to_pylist()
    for r in records:
        r["images"] = [resolve(output, k) for k in r.get("images") or []]
        for a in r.get("attempts") or []:
            a["image"] = resolve(output, a.get("image"))
    return records


def ledger_counts(output: str, generation: int | None = None) -> dict[str, int]:
    """Counts over the final results: rows, ok, error, images, and the quality gate's passed / failed rows."""
    table = read_ledger(output, ("images", "gate"), generation)
    ok = pc.equal(table["status"], "ok")
    images = pc.list_value_length(table["images"]).fill_null(0)
    return dict(rows=table.num_rows, ok=pc.sum(ok).as_py() or 0, error=table.num_rows - (pc.sum(ok).as_py() or 0),
                images=pc.sum(pc.if_else(ok, images, 0)).as_py() or 0,
                gate_passed=pc.sum(pc.equal(table["gate"], "passed")).as_py() or 0,
                gate_failed=pc.sum(pc.equal(table["gate"], "failed")).as_py() or 0)


def done_row_ids(output: str, retry_errors: bool = False, generation: int | None = None) -> pa.Array:
    """Row ids that need no new result (resume): every row with a final result, or only the ``ok`` ones with
    ``retry_errors``. A string array (kept in Arrow: a million ids are ~20 MB, not a Python set)."""
    table = read_ledger(output, (), generation)
    if retry_errors:
        table = table.filter(pc.equal(table["status"], "ok"))
    return table["row_id"].combine_chunks()


def compact(output: str, attempt_id: str, rows_per_file: int = 50_000) -> int:
    """Merge the part files of one attempt into ``merged-*.parquet`` files of up to ``rows_per_file`` rows, then
    delete the parts; returns the number of files merged (0 when there was nothing to do). Safe to interrupt: the
    merged file is written before any part is deleted, and the ledger reads duplicates of a result as one."""
    folder = results_folder(output, attempt_id)
    storage.remove_temporaries(folder)  # a writer killed mid-write; the attempt is over, so none is at work
    files = [f for f in storage.list_files(folder, ".parquet")
             if f.rsplit("/", 1)[-1].startswith((PART_PREFIX, MERGED_PREFIX))]
    if len(files) <= 1:
        return 0
    table = read_files(files)
    for start in range(0, table.num_rows, rows_per_file):
        write_table(table.slice(start, rows_per_file),
                    storage.join(folder, f"{MERGED_PREFIX}{uuid.uuid4().hex[:12]}.parquet"))
    fs, _ = storage.filesystem(folder)
    fs.rm([storage.filesystem(f)[1] for f in files])
    logger.info("compacted %d result files of attempt %r into %d", len(files), attempt_id,
                -(-table.num_rows // rows_per_file))
    return len(files)


def compact_all(output: str, attempts: Iterable[str]) -> int:
    """:func:`compact` every attempt in ``attempts`` (finished ones: a running attempt is still writing)."""
    return sum(compact(output, a) for a in attempts)
