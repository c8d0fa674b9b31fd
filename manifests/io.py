"""Arrow schemas and validated Parquet I/O of manifests, results and rejections, through fsspec.

Any fsspec URL works: local paths, ``file://``, ``s3://``, ``memory://``. Writes are atomic (``storage``).

Relative subject image paths: a manifest may name its subject images relative to its own folder
(``subjects/dog.png`` next to ``manifest.parquet``), which keeps a manifest and its images movable together (a folder
copied to a bucket still works). ``read_manifest`` resolves them against the manifest's folder, so every accepted
row carries absolute paths / URLs; ``manifest_from_records`` resolves them against the CSV / JSONL file's folder.
``validate_table`` resolves only when given ``base_uri`` (the manifest's URI, or its folder).

Whole-file problems (not Parquet, missing or unknown columns) raise ``ManifestError`` before any row is looked at;
row problems become ``Rejection`` rows, so that ``read == accepted + rejected`` always holds.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from manifests import storage
from manifests.schema import GenerationRow, Rejection, ResultRow
from manifests.validation import (  # noqa: F401 - re-exported: the validation API callers know from here
    ImageCheck,
    KnownRelations,
    RowValidator,
    check_image_file,
    normalize_record,
    resolve_images,
    validate_records,
)

logger = logging.getLogger(__name__)

SUBJECT_TYPE = pa.struct([("image", pa.string()), ("phrase", pa.string()), ("box", pa.list_(pa.float64()))])

MANIFEST_SCHEMA = pa.schema([
    pa.field("row_id", pa.string(), nullable=False),
    ("prompt", pa.string()),
    ("relation", pa.string()),
    ("relation_phrase", pa.string()),
    ("subjects", pa.list_(SUBJECT_TYPE)),
    ("seed", pa.int64()),
    ("num_images", pa.int32()),
    ("steps", pa.int32()),
    ("guidance", pa.float64()),
    ("scale", pa.float64()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("negative_prompt", pa.string()),
    ("metadata", pa.map_(pa.string(), pa.string())),
])

_METRIC = pa.list_(pa.float64())
# one image made under the quality gate (manifests.schema.GateAttempt)
GATE_ATTEMPT_TYPE = pa.struct([
    ("k", pa.int32()), ("attempt", pa.int32()), ("seed", pa.int64()), ("image", pa.string()),
    ("clip_t", pa.float64()), ("clip_r", pa.float64()), ("clip_i", pa.float64()), ("clip_i_crop", pa.float64()),
    ("dino", pa.float64()), ("passed", pa.bool_()), ("failed", pa.list_(pa.string())),
])
RESULT_SCHEMA = pa.schema([
    pa.field("row_id", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    ("error", pa.string()),
    ("images", pa.list_(pa.string())),
    ("clip_t", _METRIC),
    ("clip_r", _METRIC),
    ("clip_i", _METRIC),
    ("clip_i_crop", _METRIC),
    ("dino", _METRIC),
    ("relation", pa.string()),
    ("seconds_load", pa.float64()),
    ("seconds_lora", pa.float64()),
    ("seconds_generate", pa.float64()),
    ("seconds_write", pa.float64()),
    ("seconds_metrics", pa.float64()),
    ("lora_cache_hit", pa.bool_()),
    ("subject_cache_hits", pa.int64()),
    ("attempt", pa.int32()),
    ("gate", pa.string()),  # "passed" | "failed" | null (no gate); null in results written before the gate
    ("attempts", pa.list_(GATE_ATTEMPT_TYPE)),
    ("finished_at", pa.string()),
    ("attempt_id", pa.string()),
    ("request", pa.string()),
    ("seeds", pa.list_(pa.int64())),
    ("model_preset", pa.string()),
    ("model_fingerprint", pa.string()),
    ("adapter_fingerprint", pa.string()),
    ("local_encoder_fingerprint", pa.string()),
    ("lora_uri", pa.string()),
    ("lora_sha256", pa.string()),
])

REJECTED_SCHEMA = pa.schema([
    ("row_id", pa.string()),
    pa.field("index", pa.int64(), nullable=False),
    pa.field("field", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    ("value", pa.string()),
])

REQUIRED_COLUMNS = ("row_id", "prompt", "subjects")



class ManifestError(ValueError):
    """The manifest as a whole cannot be used (missing, unreadable, not Parquet, wrong columns)."""


def image_key(row_id: str, k: int, attempt: int | None = None) -> str:
    """Where a row's k-th image lives, relative to the output root: ``images/{row_id}/{k}.png`` (deterministic: a
    rerun overwrites, never adds); a rejected quality-gate attempt: ``images/{row_id}/attempts/{k}-{attempt}.png``.
    Result rows store these keys; ``manifests.ledger`` resolves them against wherever the run folder is now."""
    if attempt is None:
        return f"images/{row_id}/{k}.png"
    return f"images/{row_id}/attempts/{k}-{attempt}.png"


def image_uri(output_uri: str, row_id: str, k: int) -> str:
    """The URI of a row's k-th image under the output root ``output_uri``."""
    return storage.join(output_uri, image_key(row_id, k))


def attempt_image_uri(output_uri: str, row_id: str, k: int, attempt: int) -> str:
    """The URI of a rejected quality-gate attempt of image k under the output root."""
    return storage.join(output_uri, image_key(row_id, k, attempt))


# ----------------------------------------------------------------------------------------------------------- reading

def check_columns(names: Sequence[str], uri: str) -> None:
    """``ManifestError`` naming the missing required and the unknown columns of the manifest file ``uri``."""
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    unknown = [c for c in names if c not in MANIFEST_SCHEMA.names]
    problems = []
    if missing:
        problems.append(f"missing required columns {missing}")
    if unknown:
        problems.append(f"unknown columns {unknown}")
    if problems:
        raise ManifestError(f"manifest {uri}: {' and '.join(problems)}; found columns {list(names)}; "
                            f"expected {list(REQUIRED_COLUMNS)} and optionally "
                            f"{[c for c in MANIFEST_SCHEMA.names if c not in REQUIRED_COLUMNS]}")


def _read_parquet_file(fs, path: str, uri: str, check: bool) -> pa.Table:
    try:
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            if check:  # the footer only: fail fast before reading any data
                check_columns(parquet.schema_arrow.names, uri)
            return parquet.read()
    except ManifestError:
        raise
    except FileNotFoundError as e:
        raise ManifestError(f"manifest {uri}: not found") from e
    except (pa.ArrowInvalid, OSError) as e:
        raise ManifestError(f"manifest {uri}: not a readable Parquet file ({e})") from e


def manifest_files(uri: str) -> list[str]:
    """The Parquet files of the manifest at ``uri``: the file itself, or the ``*.parquet`` files of a folder.
    Raises ``ManifestError`` (not found, an empty folder, a URL that cannot be opened)."""
    try:
        fs, path = storage.filesystem(uri)
        is_dir = fs.isdir(path)
        if not is_dir and not fs.exists(path):
            raise ManifestError(f"manifest {uri}: not found")
    except ManifestError:
        raise
    except Exception as e:  # bad URL, missing filesystem driver, storage auth
        raise ManifestError(f"manifest {uri}: cannot open ({type(e).__name__}: {e})") from e
    if not is_dir:
        return [uri]
    files = storage.list_files(uri, ".parquet")
    if not files:
        raise ManifestError(f"manifest {uri}: a folder with no *.parquet files")
    return files


def read_manifest_table(uri: str) -> pa.Table:
    """The manifest at ``uri`` (a Parquet file, or a folder of ``*.parquet`` files) as an Arrow table, its columns
    checked from the Parquet footer before the data is read. Raises ``ManifestError``."""
    tables = []
    for file in manifest_files(uri):
        file_fs, file_path = storage.filesystem(file)
        tables.append(_read_parquet_file(file_fs, file_path, file, check=True))
    if len(tables) == 1:
        return tables[0]
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ManifestError(f"manifest {uri}: its files have incompatible schemas ({e})") from e


def validate_table(table: pa.Table, check_image: ImageCheck | None = None,
                   known_relations: KnownRelations | None = None,
                   base_uri: str | None = None) -> tuple[list[GenerationRow], list[Rejection]]:
    """Per-row validation of a manifest table; ``len(accepted) + len(rejected) == table.num_rows``.
    See ``validate_records`` for the checks and arguments."""
    return validate_records(table.to_pylist(), check_image=check_image, known_relations=known_relations,
                            base_uri=base_uri)


def read_manifest(uri: str, check_image: ImageCheck | None = None,
                  known_relations: KnownRelations | None = None) -> tuple[list[GenerationRow], list[Rejection]]:
    """Read and validate the manifest at ``uri``; relative subject image paths are resolved against its folder."""
    table = read_manifest_table(uri)
    return validate_table(table, check_image=check_image, known_relations=known_relations, base_uri=uri)


# ----------------------------------------------------------------------------------------------------------- writing

def _models_to_table(items: Iterable[BaseModel | dict], model: type[BaseModel], schema: pa.Schema) -> pa.Table:
    rows = [(item if isinstance(item, model) else model.model_validate(item)).model_dump() for item in items]
    return pa.Table.from_pylist(rows, schema=schema)


def _raise_rejections(rejected: list[Rejection], what: str) -> None:
    if rejected:
        lines = [f"row {r.index} ({r.row_id}): {r.field}: {r.reason}" for r in rejected[:5]]
        more = f" (and {len(rejected) - 5} more)" if len(rejected) > 5 else ""
        raise ValueError(f"{what}: {len(rejected)} invalid rows{more}:\n  " + "\n  ".join(lines))


def rows_to_table(rows: Iterable[GenerationRow | dict]) -> pa.Table:
    """Rows (models or dicts, validated) as a table with ``MANIFEST_SCHEMA``; raises ``ValueError`` naming every
    problem (bad fields, duplicate ``row_id``)."""
    accepted, rejected = validate_records(r.model_dump() if isinstance(r, GenerationRow) else r for r in rows)
    _raise_rejections(rejected, "cannot build a manifest")
    return pa.Table.from_pylist([r.model_dump() for r in accepted], schema=MANIFEST_SCHEMA)


def table_to_rows(table: pa.Table, base_uri: str | None = None) -> list[GenerationRow]:
    """A manifest table as rows (relative image paths resolved as in ``validate_table``); raises ``ValueError`` if
    any row is invalid (use ``validate_table`` to keep going)."""
    accepted, rejected = validate_table(table, base_uri=base_uri)
    _raise_rejections(rejected, "manifest table")
    return accepted


def write_table(table: pa.Table, uri: str) -> None:
    """Write ``table`` as one Parquet object at ``uri``, atomically (readers never see a partial file)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes_atomic(uri, sink.getvalue().to_pybytes())


def read_table(uri: str) -> pa.Table:
    """One Parquet file through fsspec (no schema checks; for results and rejections)."""
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        # ParquetFile, not pq.read_table: the latter's dataset thread pool aborts some processes at exit
        # ("terminate called without an active exception", pyarrow 26, seen here in `batch status`)
        return pq.ParquetFile(f).read()


def parquet_rows(uri: str) -> int:
    """Rows of the Parquet file at ``uri`` from its footer (0 when there is no such file)."""
    if not storage.exists(uri):
        return 0
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def write_manifest(rows: Iterable[GenerationRow | dict], uri: str) -> pa.Table:
    """Validate ``rows`` and write them as a Parquet manifest at ``uri`` (atomic). Returns the table written."""
    table = rows_to_table(rows)
    write_table(table, uri)
    return table


def write_results(results: Iterable[ResultRow | dict], uri: str) -> pa.Table:
    """Write result rows as one Parquet file at ``uri`` (atomic). Returns the table written."""
    table = _models_to_table(results, ResultRow, RESULT_SCHEMA)
    write_table(table, uri)
    return table


def write_rejections(rejections: Iterable[Rejection | dict], uri: str) -> pa.Table:
    """Write rejected manifest rows (with field and reason) as one Parquet file at ``uri`` (atomic)."""
    table = _models_to_table(rejections, Rejection, REJECTED_SCHEMA)
    write_table(table, uri)
    return table


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns, in order and cast: absent columns become nulls, extra ones are
    dropped (with a warning). Lets tables written by other writers (Ray Data) be concatenated."""
    extra = [c for c in table.column_names if c not in schema.names]
    if extra:
        logger.warning("dropping columns %s not in the schema", extra)
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names
               else pa.nulls(table.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def read_results(folder_uri: str) -> pa.Table:
    """Every ``*.parquet`` directly under ``folder_uri`` concatenated with ``RESULT_SCHEMA`` (an empty table with that
    schema if there are none)."""
    tables = [conform(read_table(uri), RESULT_SCHEMA) for uri in storage.list_files(folder_uri, ".parquet")]
    return pa.concat_tables(tables) if tables else RESULT_SCHEMA.empty_table()


# ----------------------------------------------------------------------------------------------- CSV / JSONL records

_INT_COLUMNS = ("seed", "num_images", "steps", "width", "height")
_FLOAT_COLUMNS = ("guidance", "scale")


def _number(text: str, kind: type) -> Any:
    """``text`` as ``kind`` when it parses; the text itself otherwise (validation then names the field)."""
    try:
        return kind(text)
    except ValueError:
        return text


def _parse_box(text: str) -> Any:
    """``"x0,y0,x1,y1"`` (or a JSON list) as 4 numbers; the text itself when it does not parse."""
    parts = text.strip().strip("[]").split(",")
    try:
        return [float(p) for p in parts]
    except ValueError:
        return text


def _json_cell(text: str, column: str, line: int, path: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {line}: column {column!r} is not valid JSON ({e.msg}): {text[:200]!r}") from e


def _csv_record(cells: dict[str, str], line: int, path: str) -> dict[str, Any]:
    record: dict[str, Any] = {}
    flat: dict[int, dict[str, Any]] = {}
    for column, text in cells.items():
        if column is None:
            raise ValueError(f"{path}: line {line}: more cells than header columns")
        if text is None or text.strip() == "":
            continue  # empty cell: use the default
        if column.startswith("subject") and "_" in column and column[7:].split("_", 1)[0].isdigit():
            number, key = column[7:].split("_", 1)  # subject2_box -> (2, "box")
            flat.setdefault(int(number), {})[key] = _parse_box(text) if key == "box" else text
        elif column in ("subjects", "metadata"):
            record[column] = _json_cell(text, column, line, path)
        elif column in _INT_COLUMNS:
            record[column] = _number(text.strip(), int)
        elif column in _FLOAT_COLUMNS:
            record[column] = _number(text.strip(), float)
        else:
            record[column] = text
    if flat:
        if "subjects" in record:
            raise ValueError(f"{path}: line {line}: subjects given both as the JSON column 'subjects' and as "
                             f"subjectN_* columns; use one")
        record["subjects"] = [flat[k] for k in sorted(flat)]
    return record


def manifest_from_records(path: str) -> list[dict[str, Any]]:
    """Raw manifest rows from a CSV or JSONL file (``dreamrelation manifest build``); validation comes later.

    JSONL (``.jsonl`` / ``.ndjson``): one JSON object per line, in the row schema. CSV: one column per field; subjects
    as a JSON column ``subjects`` or as flat columns ``subject1_image, subject1_phrase, subject1_box`` (box as
    ``"x0,y0,x1,y1"``), ``subject2_...``; ``metadata`` as a JSON object; empty cells mean the default. Relative image
    paths are resolved against the file's folder. Raises ``ValueError`` for a malformed file (naming the line).
    """
    lower = str(path).lower()
    if not lower.endswith((".jsonl", ".ndjson", ".csv")):
        raise ValueError(f"{path}: unsupported file type; expected .csv or .jsonl")
    text = storage.read_bytes(path).decode("utf-8-sig")
    base = storage.parent(path)
    records: list[dict[str, Any]] = []
    if lower.endswith((".jsonl", ".ndjson")):
        for line, content in enumerate(text.splitlines(), start=1):
            if not content.strip():
                continue
            try:
                record = json.loads(content)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {line} is not valid JSON ({e.msg}): {content[:200]!r}") from e
            if not isinstance(record, dict):
                raise ValueError(f"{path}: line {line} must be a JSON object, got {type(record).__name__}")
            records.append(record)
    else:
        reader = csv.DictReader(io.StringIO(text))
        for row in reader:
            records.append(_csv_record(row, reader.line_num, path))
    return [resolve_images(r, base) for r in records]


# ---------------------------------------------------------------------------------------------------------- reports

def report_line(index: int, item: GenerationRow | Rejection, width: int = 0) -> str:
    """One row of the ``manifest validate`` report: OK and what it makes, or REJECTED with the field and reason.
    What came from the manifest is shown with its control characters escaped (no terminal escape sequences)."""
    from manifests.errors import printable

    if isinstance(item, Rejection):
        line = f"row {index:>{width}}  {item.row_id or '-'}  REJECTED {item.field}: {item.reason} (value: {item.value})"
    else:
        line = (f"row {index:>{width}}  {item.row_id}  OK  relation={item.relation or '-'} "
                f"subjects={len(item.subjects)} images={item.num_images} {item.width}x{item.height}")
    return printable(line)


class ReportTotals:
    """The closing line of a validation report, accumulated row by row."""

    def __init__(self) -> None:
        self.accepted = self.rejected = self.images = 0
        self.relations: set[str] = set()

    def add(self, item: GenerationRow | Rejection) -> None:
        if isinstance(item, Rejection):
            self.rejected += 1
            return
        self.accepted += 1
        self.images += item.num_images
        self.relations.add(item.relation or "-")

    def line(self) -> str:
        return (f"{self.accepted + self.rejected} rows: {self.accepted} accepted, {self.rejected} rejected; "
                f"{self.images} images to generate; relations: {', '.join(sorted(self.relations)) or '-'}")


def manifest_report(rows: Sequence[GenerationRow], rejections: Sequence[Rejection]) -> str:
    """A per-row report (manifest order; accepted rows fill the indices not rejected) and the counts."""
    by_index = {r.index: r for r in rejections}
    total = len(rows) + len(rejections)
    accepted = iter(rows)
    width = len(str(max(total - 1, 0)))
    totals = ReportTotals()
    lines = []
    for index in range(total):
        item = by_index[index] if index in by_index else next(accepted)
        totals.add(item)
        lines.append(report_line(index, item, width))
    lines.append(totals.line())
    return "\n".join(lines)


def manifest_row_count(uri: str) -> int:
    """Rows of the manifest at ``uri``, from its Parquet footers (their columns checked first); ManifestError."""
    total = 0
    for file in manifest_files(uri):
        fs, path = storage.filesystem(file)
        try:
            with fs.open(path, "rb") as f:
                parquet = pq.ParquetFile(f)
                check_columns(parquet.schema_arrow.names, file)
                total += parquet.metadata.num_rows
        except ManifestError:
            raise
        except Exception as e:  # noqa: BLE001 - not Parquet, truncated, unreadable
            raise ManifestError(f"manifest {file}: not a readable Parquet file ({type(e).__name__}: {e})") from e
    return total


def _iter_record_batches(uri: str, columns: list[str] | None = None, batch_rows: int = 4096):
    for file in manifest_files(uri):
        fs, path = storage.filesystem(file)
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
                yield batch


def iter_validated(uri: str, validator: RowValidator, batch_rows: int = 4096
                   ) -> Iterator[tuple[int, GenerationRow | Rejection]]:
    """Validate the manifest at ``uri`` streaming with ``validator`` (its checks; relative image paths resolve
    against the manifest), in manifest order: ``(row number, row or rejection)``. Memory holds the ``row_id``
    column (for duplicates) and one batch, whatever the manifest's size."""
    import pyarrow.compute as pc

    from manifests.validation import duplicate_rejection

    manifest_row_count(uri)  # every file's columns, before any data is read
    ids = pa.chunked_array([b.column(0).cast(pa.string()) for b in _iter_record_batches(uri, ["row_id"])],
                           type=pa.string())
    counts = pc.value_counts(ids.drop_null()) if len(ids) else None
    first: dict[str, int] = {}
    if counts is not None:
        repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
        if len(repeated):
            for pos in pc.indices_nonzero(pc.is_in(ids, value_set=repeated)).to_pylist():
                first.setdefault(ids[pos].as_py(), pos)
    del ids
    index = 0
    for batch in _iter_record_batches(uri, batch_rows=batch_rows):
        todo, out = [], {}
        for record in batch.to_pylist():
            row_id = record.get("row_id")
            if isinstance(row_id, str) and row_id in first and first[row_id] != index:
                out[index] = duplicate_rejection(index, row_id, first[row_id])
            else:
                todo.append((index, record))
            index += 1
        out.update((i, r) for (i, _), r in zip(todo, validator.check(todo)))
        yield from sorted(out.items())
