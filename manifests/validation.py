"""Row validation of manifests: the pure checks every path runs, on a laptop or on Ray workers.

:class:`RowValidator` turns raw rows (dicts, as Arrow's ``to_pylist`` gives them) into ``GenerationRow``s or
``Rejection``s that name the field and the reason. Checks, cheapest first: the row schema (pydantic), the relation
against the LoRA registry, then the subject images (one small read per distinct image, several in flight at once:
on an object store each is a round trip). Duplicate row ids need the whole table; :func:`validate_records` tracks
them for an in-memory list, the batch job does it on the ``row_id`` column alone (``batch.job``).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from pydantic import ValidationError

from manifests import storage
from manifests.access import AccessPolicy
from manifests.registry import LoRARegistry
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


DEFAULT_MAX_IMAGE_PIXELS = 40_000_000  # ~40 MP: a 6000 x 6000 photo passes, a decompression bomb does not
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
HEADER_BYTES = 64 * 1024  # what the check may read: enough for any of these formats' header


def image_header(data_or_file) -> tuple[str, int, int]:
    """(format, width, height) from an image's header only (Pillow opens lazily: no pixel is decoded). Raises
    ``ValueError`` when it is not one of :data:`IMAGE_FORMATS`."""
    from PIL import Image

    try:
        with warnings.catch_warnings():  # the size is judged here (pixel_cap_reason), not by Pillow's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(data_or_file) as im:
                fmt, (width, height) = (im.format or "?"), im.size
    except Image.DecompressionBombError as e:  # Pillow's own limit (2x its default cap)
        raise ValueError(f"a decompression bomb ({e})") from None
    except Exception as e:  # noqa: BLE001 - whatever Pillow says about bytes that are not an image
        raise ValueError(f"not an image ({', '.join(IMAGE_FORMATS)}): {type(e).__name__}") from None
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"an image format that is not accepted ({fmt}; accepted: {', '.join(IMAGE_FORMATS)})")
    return fmt, width, height


def pixel_cap_reason(width: int, height: int, max_pixels: int) -> Optional[str]:
    """Why a ``width`` x ``height`` image is too large (the dimensions, the cap and the option), or None."""
    if width * height <= max_pixels:
        return None
    return (f"{width}x{height} pixels ({width * height / 1e6:.1f} MP) is over the cap of {max_pixels / 1e6:g} MP "
            f"(--max-image-pixels)")


def check_image_file(uri: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Optional[str]:
    """An image check: the file exists, its header says PNG, JPEG, WebP, GIF or BMP, and its dimensions are within
    ``max_pixels``. Reads the header only (at most :data:`HEADER_BYTES`), so it stays cheap on object stores and a
    decompression bomb is never decoded. Returns the reason it is not usable, or None."""
    import io

    try:
        fs, path = storage.filesystem(uri)
        if not fs.isfile(path):
            return f"subject image not found: {uri}"
        with fs.open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except Exception as e:  # noqa: BLE001 - any storage failure makes this image unusable for this row
        return f"subject image unreadable: {uri} ({type(e).__name__}: {e})"
    if not (head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")):
        return f"subject image is not an image (PNG, JPEG, WebP, GIF or BMP): {uri}"
    try:
        _, width, height = image_header(io.BytesIO(head))
    except ValueError as e:
        return f"subject image {uri}: {e}"
    too_big = pixel_cap_reason(width, height, max_pixels)
    return f"subject image {uri}: {too_big}" if too_big else None


class RowValidator:
    """The per-row checks, with a memory of the images it has checked (one check per distinct URI).

    ``check_image(uri)``: a reason or None (e.g. :func:`check_image_file`); ``known_relations``: relation ids with a
    LoRA (a collection or a predicate; None: not checked); ``base_uri``: the manifest's URI or folder, against which
    relative subject image paths are resolved (None: left as they are).
    """

    def __init__(self, check_image: ImageCheck | None = None, known_relations: KnownRelations | None = None,
                 base_uri: str | None = None, image_threads: int = IMAGE_CHECK_THREADS,
                 relation_problem: Callable[[str], Optional[str]] | None = None,
                 access: AccessPolicy | None = None, max_row_cost: float | None = None):
        if known_relations is not None and relation_problem is not None:
            raise ValueError("give known_relations or relation_problem, not both")
        if known_relations is not None:
            is_known = known_relations if callable(known_relations) else frozenset(known_relations).__contains__
            relation_problem = lambda r: (None if is_known(r)  # noqa: E731
                                          else f"unknown relation {r!r}: no LoRA in the registry")
        self._relation_problem = relation_problem
        self._relation_verdicts: dict[str, Optional[str]] = {}  # one lookup per relation (a registry lookup: a stat)
        self.access = access
        self.max_row_cost = max_row_cost
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
            problem = self._relation(row.relation) if row.relation is not None else None
            if problem:
                out.append(Rejection.of(index, "relation", problem, row.relation, row_id=row.row_id))
                continue
            cost = row_cost(row)
            if self.max_row_cost is not None and cost > self.max_row_cost:
                out.append(Rejection.of(index, "(row)", f"row cost {cost:,.0f} megapixel-steps ({row.width}x"
                                        f"{row.height} x {row.steps} steps x {row.num_images} images) is over the "
                                        f"budget of {self.max_row_cost:,.0f} (--max-row-cost)",
                                        f"{row.width}x{row.height}x{row.steps}x{row.num_images}", row_id=row.row_id))
                continue
            refused = self._refused_image(row)
            if refused:
                k, reason = refused
                out.append(Rejection.of(index, f"subjects.{k}.image", reason, row.subjects[k].image,
                                        row_id=row.row_id))
                continue
            out.append(row)
        if self.check_image is not None:
            self._check_images({s.image for r in out if isinstance(r, GenerationRow) for s in r.subjects})
            out = [self._image_verdict(index, r) for (index, _), r in zip(rows, out)]
        return out

    def _refused_image(self, row: GenerationRow) -> tuple[int, str] | None:
        """(k, why) of the first subject image the access policy does not let the workers fetch."""
        if self.access is None:
            return None
        for k, subject in enumerate(row.subjects):
            reason = self.access.reason(subject.image)
            if reason:
                return k, reason
        return None

    def _relation(self, relation: str) -> Optional[str]:
        if self._relation_problem is None:
            return None
        if relation not in self._relation_verdicts:
            self._relation_verdicts[relation] = self._relation_problem(relation)
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


@dataclass(frozen=True)
class Checks:
    """The row checks a job runs, as plain data (they travel to Ray workers): subject images (their headers, the
    pixel cap), the row budget, and where images and LoRA files may come from."""

    check_images: bool = True
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_row_cost: Optional[float] = None  # megapixel-steps (row_cost); None: no budget
    access: AccessPolicy = field(default_factory=AccessPolicy)

    def validator(self, base_uri: str | None, loras: str | None, relations: bool = True) -> "RowValidator":
        """A :class:`RowValidator` with these checks, relations looked up in the registry at ``loras`` (not at all
        with ``relations=False``: ``manifest validate`` without ``--loras``)."""
        image_check = functools.partial(check_image_file, max_pixels=self.max_image_pixels)
        problem = LoRARegistry(loras, self.access).problem if relations else None
        return RowValidator(image_check if self.check_images else None, base_uri=base_uri, relation_problem=problem,
                            access=self.access, max_row_cost=self.max_row_cost)


def row_cost(row: GenerationRow) -> float:
    """What a row asks of a GPU, in megapixel-steps: width x height / 1e6 x steps x images (a quality gate may
    multiply it by up to ``--max-attempts``). The paper's setting (1024 px, 30 steps, one image) costs 31."""
    return row.width * row.height / 1e6 * row.steps * row.num_images


DEFAULT_MAX_ROW_COST = 1000.0  # 16 images at 1024 px and 60 steps; a 4096 px row of 16 x 200 steps is 53,687


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
