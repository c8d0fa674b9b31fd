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
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, Optional, Union

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ValidationError

from manifests import storage
from manifests.schema import GenerationRow, Rejection, ResultRow

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
])

REJECTED_SCHEMA = pa.schema([
    ("row_id", pa.string()),
    pa.field("index", pa.int64(), nullable=False),
    pa.field("field", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    ("value", pa.string()),
])

REQUIRED_COLUMNS = ("row_id", "prompt", "subjects")

ImageCheck = Callable[[str], Optional[str]]
KnownRelations = Union[Collection[str], Callable[[str], bool]]


class ManifestError(ValueError):
    """The manifest as a whole cannot be used (missing, unreadable, not Parquet, wrong columns)."""


def image_uri(output_uri: str, row_id: str, k: int) -> str:
    """Deterministic key of a row's k-th image: ``{out}/images/{row_id}/{k}.png`` (a rerun overwrites, never adds)."""
    return storage.join(output_uri, "images", row_id, f"{k}.png")


def attempt_image_uri(output_uri: str, row_id: str, k: int, attempt: int) -> str:
    """Key of a rejected quality-gate attempt of image k: ``{out}/images/{row_id}/attempts/{k}-{attempt}.png``."""
    return storage.join(output_uri, "images", row_id, "attempts", f"{k}-{attempt}.png")


# ----------------------------------------------------------------------------------------------------------- reading

def _check_columns(names: Sequence[str], uri: str) -> None:
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
                _check_columns(parquet.schema_arrow.names, uri)
            return parquet.read()
    except ManifestError:
        raise
    except FileNotFoundError as e:
        raise ManifestError(f"manifest {uri}: not found") from e
    except (pa.ArrowInvalid, OSError) as e:
        raise ManifestError(f"manifest {uri}: not a readable Parquet file ({e})") from e


def read_manifest_table(uri: str) -> pa.Table:
    """The manifest at ``uri`` (a Parquet file, or a folder of ``*.parquet`` files) as an Arrow table, its columns
    checked from the Parquet footer before the data is read. Raises ``ManifestError``."""
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
        return _read_parquet_file(fs, path, uri, check=True)
    files = storage.list_files(uri, ".parquet")
    if not files:
        raise ManifestError(f"manifest {uri}: a folder with no *.parquet files")
    tables = []
    for file in files:
        file_fs, file_path = storage.filesystem(file)
        tables.append(_read_parquet_file(file_fs, file_path, file, check=True))
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ManifestError(f"manifest {uri}: its files have incompatible schemas ({e})") from e


def _plain(value: Any) -> Any:
    """Arrow / numpy values as plain Python (lists, dicts), so pydantic sees what a JSON reader would give."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def normalize_record(record: Any) -> Any:
    """A raw row as pydantic expects it: Arrow maps (lists of pairs) as dicts, numpy arrays as lists."""
    if not isinstance(record, dict):
        return record
    record = {k: _plain(v) for k, v in record.items()}
    meta = record.get("metadata")
    if isinstance(meta, list) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in meta):
        record["metadata"] = {k: v for k, v in meta}
    return record


def _resolve_images(record: Any, base_folder: str) -> Any:
    if isinstance(record, dict) and isinstance(record.get("subjects"), list):
        record = dict(record)
        record["subjects"] = [
            {**s, "image": storage.resolve(base_folder, s["image"])}
            if isinstance(s, dict) and isinstance(s.get("image"), str) and s["image"].strip() else s
            for s in record["subjects"]]
    return record


def _relation_checker(known_relations: KnownRelations | None) -> Callable[[str], bool] | None:
    if known_relations is None or callable(known_relations):
        return known_relations
    known = frozenset(known_relations)
    return known.__contains__


def _base_folder(base_uri: str) -> str:
    """The folder relative image paths resolve against: ``base_uri`` itself when it is a folder (a trailing '/' or
    an existing directory, e.g. a folder manifest), else the folder holding it (a manifest file)."""
    if base_uri.endswith("/"):
        stripped = base_uri.rstrip("/")
        return base_uri if stripped.endswith(":") else (stripped or "/")  # keep "memory://" whole
    try:
        fs, path = storage.filesystem(base_uri)
        if fs.isdir(path):
            return base_uri
    except Exception:  # noqa: BLE001 - an unreachable base is treated as a file URI; reading will say more
        pass
    return storage.parent(base_uri)


def validate_records(records: Iterable[Any], check_image: ImageCheck | None = None,
                     known_relations: KnownRelations | None = None,
                     base_uri: str | None = None) -> tuple[list[GenerationRow], list[Rejection]]:
    """Validate raw rows (dicts). Every row ends up accepted or rejected (one ``Rejection`` per bad row).

    Checks, cheapest first: duplicate ``row_id`` (each occurrence after the first is rejected, whatever the first's
    fate), the row schema, ``known_relations`` (a set of relation ids or a predicate), then ``check_image(uri)``
    (returns an error reason or None; called once per distinct URI). ``base_uri``: the manifest's URI (or its
    folder); relative subject image paths are resolved against the folder (None: left as they are).
    """
    is_known = _relation_checker(known_relations)
    base = _base_folder(str(base_uri)) if base_uri is not None else None
    image_errors: dict[str, Optional[str]] = {}
    first_seen: dict[str, int] = {}
    accepted: list[GenerationRow] = []
    rejected: list[Rejection] = []
    for index, record in enumerate(records):
        record = normalize_record(record)
        row_id = record.get("row_id") if isinstance(record, dict) else None
        if isinstance(row_id, str):
            if row_id in first_seen:
                rejected.append(Rejection.of(index, "row_id", f"duplicate row_id (first at row {first_seen[row_id]})",
                                             row_id, row_id=row_id))
                continue
            first_seen[row_id] = index
        if base is not None:
            record = _resolve_images(record, base)
        try:
            row = GenerationRow.model_validate(record)
        except ValidationError as e:
            rejected.append(Rejection.from_error(index, e, row_id=row_id))
            continue
        if row.relation is not None and is_known is not None and not is_known(row.relation):
            rejected.append(Rejection.of(index, "relation",
                                         f"unknown relation {row.relation!r}: no LoRA in the registry",
                                         row.relation, row_id=row.row_id))
            continue
        if check_image is not None:
            bad = None
            for k, subject in enumerate(row.subjects):
                if subject.image not in image_errors:
                    image_errors[subject.image] = check_image(subject.image)
                if image_errors[subject.image]:
                    bad = Rejection.of(index, f"subjects.{k}.image", image_errors[subject.image], subject.image,
                                       row_id=row.row_id)
                    break
            if bad is not None:
                rejected.append(bad)
                continue
        accepted.append(row)
    return accepted, rejected


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


_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")


def check_image_file(uri: str) -> Optional[str]:
    """A ``check_image`` for ``validate_table``: the file exists and starts like an image (PNG, JPEG, WebP, GIF,
    BMP). Reads 16 bytes, so it stays cheap on object stores. Returns the reason it is not usable, or None."""
    try:
        fs, path = storage.filesystem(uri)
        if not fs.isfile(path):
            return f"subject image not found: {uri}"
        with fs.open(path, "rb") as f:
            head = f.read(16)
    except Exception as e:  # noqa: BLE001 - any storage failure makes this image unusable for this row
        return f"subject image unreadable: {uri} ({type(e).__name__}: {e})"
    if head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return None
    return f"subject image is not an image (PNG, JPEG, WebP, GIF or BMP): {uri}"


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
        return pq.read_table(f)


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
    return [_resolve_images(r, base) for r in records]


# ---------------------------------------------------------------------------------------------------------- reports

def manifest_report(rows: Sequence[GenerationRow], rejections: Sequence[Rejection]) -> str:
    """A per-row report (manifest order; accepted rows fill the indices not rejected) and the counts."""
    by_index = {r.index: r for r in rejections}
    total = len(rows) + len(rejections)
    accepted = iter(rows)
    width = len(str(max(total - 1, 0)))
    lines = []
    for index in range(total):
        if index in by_index:
            r = by_index[index]
            lines.append(f"row {index:>{width}}  {r.row_id or '-'}  REJECTED {r.field}: {r.reason} (value: {r.value})")
        else:
            row = next(accepted)
            lines.append(f"row {index:>{width}}  {row.row_id}  OK  relation={row.relation or '-'} "
                         f"subjects={len(row.subjects)} images={row.num_images} {row.width}x{row.height}")
    relations = sorted({row.relation or "-" for row in rows})
    lines.append(f"{total} rows: {len(rows)} accepted, {len(rejections)} rejected; "
                 f"{sum(r.num_images for r in rows)} images to generate; relations: {', '.join(relations) or '-'}")
    return "\n".join(lines)
