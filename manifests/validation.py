"""Row validation of manifests: the pure checks every path runs, on a laptop or on Ray workers.

:class:`RowValidator` turns raw rows (dicts, as Arrow's ``to_pylist`` gives them) into ``GenerationRow``s or
``Rejection``s that name the field and the reason. Checks, cheapest first: the row schema (pydantic), the relation
against the LoRA registry, then the subject images (one small read per distinct image, several in flight at once:
on an object store each is a round trip). Duplicate row ids need the whole table; :func:`validate_records` tracks
them for an in-memory list, the batch job does it on the ``row_id`` column alone (``batch.job``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Union

from pydantic import ValidationError

from manifests import storage
from manifests.schema import GenerationRow, Rejection

ImageCheck = Callable[[str], Optional[str]]
KnownRelations = Union[Collection[str], Callable[[str], bool]]
IMAGE_CHECK_THREADS = 16
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")


def _plain(value: Any) -> Any:
    """Arrow / numpy values as plain Python (lists, dicts), so pydantic sees what a JSON reader would give."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "tolist") and not isinstance(value, bytes):
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


def resolve_images(record: Any, base_folder: str) -> Any:
    """``record`` with relative subject image paths resolved against ``base_folder``."""
    if isinstance(record, dict) and isinstance(record.get("subjects"), list):
        record = dict(record)
        record["subjects"] = [
            {**s, "image": storage.resolve(base_folder, s["image"])}
            if isinstance(s, dict) and isinstance(s.get("image"), str) and s["image"].strip() else s
            for s in record["subjects"]]
    return record


def base_folder(base_uri: str) -> str:
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


def check_image_file(uri: str) -> Optional[str]:
    """An image check: the file exists and starts like an image (PNG, JPEG, WebP, GIF, BMP). Reads 16 bytes, so it
    stays cheap on object stores. Returns the reason it is not usable, or None."""
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


class RowValidator:
    """The per-row checks, with a memory of the images it has checked (one check per distinct URI).

    ``check_image(uri)``: a reason or None (e.g. :func:`check_image_file`); ``known_relations``: relation ids with a
    LoRA (a collection or a predicate; None: not checked); ``base_uri``: the manifest's URI or folder, against which
    relative subject image paths are resolved (None: left as they are).
    """

    def __init__(self, check_image: ImageCheck | None = None, known_relations: KnownRelations | None = None,
                 base_uri: str | None = None, image_threads: int = IMAGE_CHECK_THREADS):
        if known_relations is not None and not callable(known_relations):
            known_relations = frozenset(known_relations).__contains__
        self._known_relations = known_relations
        self._relation_verdicts: dict[str, bool] = {}  # one lookup per relation (a registry lookup is a stat)
        self.check_image = check_image
        self.base = base_folder(str(base_uri)) if base_uri is not None else None
        self.image_threads = image_threads
        self.image_errors: dict[str, Optional[str]] = {}

    def check(self, rows: Sequence[tuple[int, Any]]) -> list[GenerationRow | Rejection]:
        """``[(index, raw row), ...]`` -> a ``GenerationRow`` or a ``Rejection`` for each, in order."""
        out: list[GenerationRow | Rejection] = []
        for index, record in rows:
            record = normalize_record(record)
            row_id = record.get("row_id") if isinstance(record, dict) else None
            if self.base is not None:
                record = resolve_images(record, self.base)
            try:
                row = GenerationRow.model_validate(record)
            except ValidationError as e:
                out.append(Rejection.from_error(index, e, row_id=row_id))
                continue
            if row.relation is not None and not self._relation_known(row.relation):
                out.append(Rejection.of(index, "relation", f"unknown relation {row.relation!r}: no LoRA in the "
                                        "registry", row.relation, row_id=row.row_id))
                continue
            out.append(row)
        if self.check_image is not None:
            self._check_images({s.image for r in out if isinstance(r, GenerationRow) for s in r.subjects})
            out = [self._image_verdict(index, r) for (index, _), r in zip(rows, out)]
        return out

    def _relation_known(self, relation: str) -> bool:
        if self._known_relations is None:
            return True
        if relation not in self._relation_verdicts:
            self._relation_verdicts[relation] = bool(self._known_relations(relation))
        return self._relation_verdicts[relation]

    def _check_images(self, uris: set[str]) -> None:
        todo = sorted(u for u in uris if u not in self.image_errors)
        if len(todo) > 1 and self.image_threads > 1:
            with ThreadPoolExecutor(min(self.image_threads, len(todo))) as pool:
                self.image_errors.update(zip(todo, pool.map(self.check_image, todo)))
        else:
            self.image_errors.update((u, self.check_image(u)) for u in todo)

    def _image_verdict(self, index: int, row: GenerationRow | Rejection) -> GenerationRow | Rejection:
        if isinstance(row, Rejection):
            return row
        for k, subject in enumerate(row.subjects):
            reason = self.image_errors[subject.image]
            if reason:
                return Rejection.of(index, f"subjects.{k}.image", reason, subject.image, row_id=row.row_id)
        return row


def duplicate_rejection(index: int, row_id: str, first: int) -> Rejection:
    """The rejection of a later occurrence of ``row_id`` (the first one, at row ``first``, is the one checked)."""
    return Rejection.of(index, "row_id", f"duplicate row_id (first at row {first})", row_id, row_id=row_id)


def validate_records(records: Iterable[Any], check_image: ImageCheck | None = None,
                     known_relations: KnownRelations | None = None, base_uri: str | None = None,
                     chunk: int = 1024) -> tuple[list[GenerationRow], list[Rejection]]:
    """Validate raw rows (dicts) held in memory. Every row ends up accepted or rejected (one ``Rejection`` each):
    a duplicate ``row_id`` (each occurrence after the first, whatever the first's fate), then the checks of
    :class:`RowValidator`."""
    validator = RowValidator(check_image, known_relations, base_uri)
    first_seen: dict[str, int] = {}
    accepted: list[GenerationRow] = []
    rejected: list[Rejection] = []
    pending: list[tuple[int, Any]] = []

    def flush() -> None:
        for result in validator.check(pending):
            (accepted if isinstance(result, GenerationRow) else rejected).append(result)
        pending.clear()

    for index, record in enumerate(records):
        row_id = record.get("row_id") if isinstance(record, dict) else None
        if isinstance(row_id, str):
            if row_id in first_seen:
                rejected.append(duplicate_rejection(index, row_id, first_seen[row_id]))
                continue
            first_seen[row_id] = index
        pending.append((index, record))
        if len(pending) >= chunk:
            flush()
    flush()
    rejected.sort(key=lambda r: r.index)
    return accepted, rejected
