"""``batch export``: a synthetic relation dataset from a batch run (Hugging Face Parquet, webdataset tars or COCO).

One sample per image ``(row_id, k)`` of the rows with ``status == "ok"`` (the run's final results, read through
``manifests.ledger``): the image, prompt, seed, relation id and phrase, subject phrases with their layout boxes
(normalized and pixel), the per-image metrics, size, row id and k, and what made it (model / adapter / local-encoder
fingerprints, the sha256 of the relation LoRA file), as its result recorded it. Filters (metric minimums, the quality
gate) pick the images; every image not exported is counted under one reason. A dataset card (``README.md``) states
the counts, relations, metric distributions, the model and LoRA versions of the exported images (from their results,
never from the LoRA registry at export time) and filters. Reads and writes go through ``manifests.storage``, so
both the run and the destination can be any fsspec URL (a local folder, ``s3://``...).

The pieces: :mod:`manifests.export_samples` (run -> samples), :mod:`manifests.export_formats` (the writers),
:mod:`manifests.export_card` (the card). Usage::

    from manifests.export import ExportFilter, export_run
    summary = export_run("outputs/batch", "hf", "s3://bucket/datasets/hugging", ExportFilter(min_clip_r=20.0))
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Optional

from manifests import storage
from manifests.export_card import card_facts, render_card
from manifests.export_formats import FORMATS, make_writer
from manifests.export_samples import (
    MAX_REPORTED, METRICS, ExportError, ExportFilter, RelationPhraseFn, Sample, collect_samples, sample_key,
)

logger = logging.getLogger(__name__)

__all__ = ["CARD_FILE", "DEFAULT_SHARD_SIZE", "FORMATS", "METRICS", "ExportError", "ExportFilter", "Sample",
           "export_run", "png_size", "sample_key"]

CARD_FILE = "README.md"
DEFAULT_SHARD_SIZE = 500  # images per shard; a shard is held in memory while it is written

Progress = Callable[[int, int], None]  # (images done, images planned)


def png_size(data: bytes) -> Optional[tuple[int, int]]:
    """(width, height) from a PNG's IHDR chunk, or None when ``data`` is not a PNG."""
    if len(data) >= 24 and data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return struct.unpack(">II", data[16:24])
    return None


def export_run(output: str, format: str, to: str, filters: ExportFilter | None = None, *,
               shard_size: int = DEFAULT_SHARD_SIZE, relation_phrase: RelationPhraseFn | None = None,
               progress: Progress | None = None) -> dict[str, Any]:
    """Export the batch run at ``output`` as a ``format`` dataset (``hf``, ``webdataset`` or ``coco``) at ``to``.

    Args:
        output: the run's output root (``run.json``, ``results/``, ``images/``; for results of older runs, which
            do not record their row, ``manifest.parquet`` or the manifest run.json names).
        format: one of :data:`FORMATS`.
        to: destination folder (path or URL); an earlier export there is replaced.
        filters: per-image metric minimums and ``passed_only`` (default: every image of every ok row).
        shard_size: images per Parquet / tar shard.
        relation_phrase: ``(prompt, subject_phrases) -> phrase`` for rows whose manifest gives none.
        progress: called with (images done, images planned) as images are written.
    Returns:
        The summary: ``samples``, ``rows``, ``images`` (of ok rows in the run), ``filtered_out`` ({reason: images};
        ``samples + sum(filtered_out) == images``), ``rows_error``, ``missing_images`` (URIs, the first 100),
        ``files`` (shards / annotations.json, then README.md), ``format``, ``to``, ``run``.
    Raises:
        ValueError naming ``format`` / ``shard_size``; :class:`ExportError` when the run has no results, the rows of
        older results cannot be found, or no image is left after the filters.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an integer >= 1, got {shard_size!r}")
    if storage.filesystem(str(to))[1].rstrip("/") == storage.filesystem(str(output))[1].rstrip("/"):
        raise ValueError(f"to must be another folder than the run it exports, got {to!r} for the run {output!r}")
    filters = filters or ExportFilter()
    found = collect_samples(output, filters, relation_phrase=relation_phrase)
    if not found.samples:
        raise ExportError(f"no image of the run {output!r} is left to export: {found.images} images in ok rows, "
                          f"filtered out {dict(found.filtered_out)} by the filters {filters.describe() or '(none)'}")
    writer = make_writer(format, to, len(found.samples), shard_size)
    written: list[Sample] = []
    for i, sample in enumerate(found.samples):
        try:
            data = storage.read_bytes(sample.image)
        except FileNotFoundError:  # deleted since the listing: skipped like the images missing from the start
            found.filtered_out["missing_image"] += 1
            if len(found.missing_images) < MAX_REPORTED:
                found.missing_images.append(sample.image)
            logger.warning("image %d of row %r is missing: %s (skipped)", sample.k, sample.row_id, sample.image)
        else:
            size = png_size(data)
            if size is not None and size != (sample.width, sample.height):
                sample = replace(sample, width=size[0], height=size[1])  # the file's size wins over the row's
            writer.add(sample, data)
            written.append(sample)
        if progress:
            progress(i + 1, len(found.samples))
    missing = found.filtered_out.get("missing_image", 0)
    facts = card_facts(found, written, format, to, filters, missing)
    files = writer.close(facts)
    card = storage.join(to, CARD_FILE)
    storage.write_bytes_atomic(card, render_card(facts, writer.card_metadata()).encode())
    files.append(card)
    summary = {
        "format": format, "to": to, "run": output, "samples": len(written), "rows": facts["rows"],
        "images": found.images, "filtered_out": dict(sorted(found.filtered_out.items())),
        "rows_error": found.rows_error, "missing_images": list(found.missing_images), "files": files,
    }
    logger.info("exported %d samples of %d rows from %s to %s (%s)", len(written), facts["rows"], output, to, format)
    return summary
