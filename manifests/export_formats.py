"""Dataset writers of ``batch export``: Hugging Face Parquet shards, webdataset tar shards, COCO JSON + images.

Each writer receives the samples one at a time (``add(sample, png_bytes)``), writes through ``manifests.storage``
(atomic writes, any fsspec URL) and returns the files it wrote from ``close(facts)``; ``facts`` are the dataset
card's facts (COCO keeps them in ``info``). A shard is held in memory until it is full (``shard_size`` images).
After writing, files of an earlier export to the same place that this one did not write (shards of another count,
images of samples now filtered out) are removed, so a folder always holds exactly one export.

Layouts (``{to}`` is the destination):

- ``hf``: ``{to}/data/train-00000-of-00002.parquet``...; one row per image with the columns of :data:`HF_FEATURES`,
  the image as a ``{"bytes", "path"}`` struct, and the ``datasets`` features JSON in the Arrow schema metadata
  (``b"huggingface"``), so ``datasets.load_dataset(to, split="train")`` decodes images as PIL images.
- ``webdataset``: ``{to}/shard-000000.tar``...; members ``{key}.png`` and ``{key}.json`` (``Sample.labels``).
- ``coco``: ``{to}/annotations.json`` and ``{to}/images/{key}.png``; one annotation per subject, ``bbox`` pixel
  ``[x, y, width, height]``, a ``segmentation`` polygon (the layout box: a batch run has no subject masks; so
  ``pycocotools``' ``annToMask``/``showAnns`` work), category = subject phrase, the relation as annotation ``attributes``; each image entry
  also holds the sample's labels (prompt, seed, metrics, gate, provenance).

Every layout carries each sample's provenance labels (:data:`manifests.export_samples.LABELED_PROVENANCE`: model /
adapter / local-encoder fingerprints and the relation LoRA's sha256), nullable strings.
"""

from __future__ import annotations

import io
import json
import logging
import math
import tarfile
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from manifests import storage
from manifests.export_samples import LABELED_PROVENANCE, METRICS, Sample

logger = logging.getLogger(__name__)

__all__ = ["FORMATS", "HF_FEATURES", "HF_SCHEMA", "CocoWriter", "HFWriter", "WebDatasetWriter", "features_yaml",
           "make_writer"]

FORMATS = ("hf", "webdataset", "coco")
TAR_MTIME = 1_700_000_000  # a fixed member time: the same export gives the same tar bytes


def _value(dtype: str) -> dict[str, str]:
    return {"dtype": dtype, "_type": "Value"}


def _sequence(feature: dict[str, Any]) -> dict[str, Any]:
    return {"feature": feature, "_type": "Sequence"}  # "Sequence": read by datasets 3 and by 4+ (as List)


# The `datasets` features of the hf layout, in column order (the JSON that `datasets.Features.to_dict` gives).
HF_FEATURES: dict[str, dict[str, Any]] = {
    "key": _value("string"),
    "image": {"_type": "Image"},
    "row_id": _value("string"),
    "k": _value("int32"),
    "prompt": _value("string"),
    "seed": _value("int64"),
    "relation": _value("string"),
    "relation_phrase": _value("string"),
    "subject_phrases": _sequence(_value("string")),
    "boxes": _sequence(_sequence(_value("float64"))),  # (n_subjects, 4) normalized xyxy
    "boxes_pixel": _sequence(_sequence(_value("float64"))),  # (n_subjects, 4) pixel xyxy
    "width": _value("int32"),
    "height": _value("int32"),
    **{m: _value("float64") for m in METRICS},
    "gate": _value("string"),
    # provenance (null: not recorded by the run, or no relation LoRA / local encoder): what made the image
    **{p: _value("string") for p in LABELED_PROVENANCE},
}
_ARROW_VALUES = {"string": pa.string(), "int32": pa.int32(), "int64": pa.int64(), "float64": pa.float64()}
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets.Image's storage


def _arrow_type(feature: dict[str, Any]) -> pa.DataType:
    kind = feature["_type"]
    if kind == "Value":
        return _ARROW_VALUES[feature["dtype"]]
    if kind == "Image":
        return IMAGE_TYPE
    return pa.list_(_arrow_type(feature["feature"]))


HF_SCHEMA = pa.schema([pa.field(name, _arrow_type(f)) for name, f in HF_FEATURES.items()],
                      metadata={b"huggingface": json.dumps({"info": {"features": HF_FEATURES}}).encode()})


def features_yaml(features: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Features JSON -> the ``dataset_info.features`` list of a dataset card's YAML header."""

    def spec(feature: dict[str, Any]) -> Any:
        kind = feature["_type"]
        if kind == "Value":
            return feature["dtype"]
        if kind == "Image":
            return "image"
        inner = spec(feature["feature"])
        return {"sequence": inner}

    out = []
    for name, feature in features.items():
        s = spec(feature)
        out.append({"name": name, **(s if isinstance(s, dict) else {"dtype": s})})
    return out


def _configs(path: str) -> list[dict[str, Any]]:
    return [{"config_name": "default", "data_files": [{"split": "train", "path": path}]}]


class _Writer:
    """Shared parts: destination, shard size, the list of files written, removal of an earlier export's files."""

    name = ""

    def __init__(self, to: str, total: int, shard_size: int):
        self.to = str(to).rstrip("/") or str(to)
        self.total = total
        self.shard_size = shard_size
        self.n_shards = max(1, math.ceil(total / shard_size))
        self.files: list[str] = []
        self.count = 0

    def card_metadata(self) -> dict[str, Any]:
        """Entries of the card's YAML header that belong to this layout."""
        return {}

    def _remove_stale(self, folder: str, prefix: str, suffix: str, keep: set[str]) -> None:
        """Delete files ``{folder}/{prefix}*{suffix}`` other than ``keep`` (compared as paths of the filesystem,
        so relative local paths and ``file://`` URLs match the listing)."""
        kept = {storage.filesystem(u)[1] for u in keep}
        stale = [path for path in (storage.filesystem(u)[1] for u in storage.list_files(folder, suffix))
                 if path.rsplit("/", 1)[-1].startswith(prefix) and path not in kept]
        if stale:
            fs, _ = storage.filesystem(folder)
            for path in stale:
                fs.rm(path)
            logger.info("removed %d files of an earlier export under %s", len(stale), folder)


class HFWriter(_Writer):
    """Hugging Face Parquet shards (see the module docstring)."""

    name = "hf"
    ROW_GROUP = 100  # rows per Parquet row group (the Hub's viewer reads row groups)

    def __init__(self, to: str, total: int, shard_size: int):
        super().__init__(to, total, shard_size)
        self.rows: list[dict[str, Any]] = []
        self.num_bytes = 0  # Parquet bytes written: the card's split size

    def shard_uri(self, index: int) -> str:
        return storage.join(self.to, "data", f"train-{index:05d}-of-{self.n_shards:05d}.parquet")

    def add(self, sample: Sample, data: bytes) -> None:
        labels = sample.labels()
        self.rows.append({name: labels[name] for name in HF_FEATURES if name != "image"}
                         | {"image": {"bytes": data, "path": f"{sample.key}.png"}})
        self.count += 1
        if len(self.rows) >= self.shard_size and len(self.files) < self.n_shards - 1:
            self._flush()

    def _flush(self) -> None:
        table = pa.Table.from_pylist(self.rows, schema=HF_SCHEMA)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, row_group_size=self.ROW_GROUP)
        uri = self.shard_uri(len(self.files))
        data = sink.getvalue().to_pybytes()
        storage.write_bytes_atomic(uri, data)
        self.num_bytes += len(data)
        self.files.append(uri)
        self.rows = []

    def close(self, facts: dict[str, Any]) -> list[str]:
        while len(self.files) < self.n_shards:  # the last shard (and, if images vanished, empty ones)
            self._flush()
        self._remove_stale(storage.join(self.to, "data"), "train-", ".parquet", set(self.files))
        return list(self.files)

    def card_metadata(self) -> dict[str, Any]:
        return {"configs": _configs("data/train-*"),
                "dataset_info": {"features": features_yaml(HF_FEATURES),
                                 "splits": [{"name": "train", "num_examples": self.count,
                                             "num_bytes": self.num_bytes}]}}


class WebDatasetWriter(_Writer):
    """webdataset tar shards (see the module docstring)."""

    name = "webdataset"

    def __init__(self, to: str, total: int, shard_size: int):
        super().__init__(to, total, shard_size)
        self.buffer: io.BytesIO | None = None
        self.tar: tarfile.TarFile | None = None
        self.in_shard = 0

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
        self.tar.addfile(info, io.BytesIO(data))  # type: ignore[union-attr]

    def add(self, sample: Sample, data: bytes) -> None:
        if self.tar is None:
            self.buffer = io.BytesIO()
            self.tar = tarfile.open(fileobj=self.buffer, mode="w", format=tarfile.USTAR_FORMAT)
        self._member(f"{sample.key}.png", data)
        self._member(f"{sample.key}.json", json.dumps(sample.labels(), sort_keys=True).encode())
        self.in_shard += 1
        self.count += 1
        if self.in_shard >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        uri = storage.join(self.to, f"shard-{len(self.files):06d}.tar")
        storage.write_bytes_atomic(uri, self.buffer.getvalue())  # type: ignore[union-attr]
        self.files.append(uri)
        self.tar, self.buffer, self.in_shard = None, None, 0

    def close(self, facts: dict[str, Any]) -> list[str]:
        self._flush()
        self._remove_stale(self.to, "shard-", ".tar", set(self.files))
        return list(self.files)

    def card_metadata(self) -> dict[str, Any]:
        return {"configs": _configs("shard-*.tar")}


class CocoWriter(_Writer):
    """COCO ``annotations.json`` + ``images/`` (see the module docstring)."""

    name = "coco"

    def __init__(self, to: str, total: int, shard_size: int):
        super().__init__(to, total, shard_size)
        self.images: list[dict[str, Any]] = []
        self.subjects: list[tuple[int, Sample]] = []  # (image id, sample): annotations are made at close
        self.image_uris: set[str] = set()

    def add(self, sample: Sample, data: bytes) -> None:
        uri = storage.join(self.to, "images", f"{sample.key}.png")
        storage.write_bytes_atomic(uri, data)
        self.image_uris.add(uri)
        image_id = len(self.images) + 1
        labels = sample.labels()
        self.images.append({"id": image_id, "file_name": f"{sample.key}.png", "width": sample.width,
                            "height": sample.height,
                            **{k: labels[k] for k in ("key", "row_id", "k", "prompt", "seed", "relation",
                                                      "relation_phrase", "subject_phrases", *METRICS, "gate",
                                                      *LABELED_PROVENANCE)}})
        self.subjects.append((image_id, sample))
        self.count += 1

    def document(self, facts: dict[str, Any]) -> dict[str, Any]:
        """The COCO JSON: info, licenses, images, categories (one per subject phrase), annotations."""
        names = sorted({p for _, s in self.subjects for p in s.subject_phrases})
        category = {name: i for i, name in enumerate(names, start=1)}
        annotations = []
        for image_id, sample in self.subjects:
            for j, (phrase, (x0, y0, x1, y1)) in enumerate(zip(sample.subject_phrases, sample.pixel_boxes())):
                w, h = round(x1 - x0, 3), round(y1 - y0, 3)
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": category[phrase],
                    "bbox": [x0, y0, w, h], "area": round(w * h, 3), "iscrowd": 0,
                    "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
                    "attributes": {"relation": sample.relation, "relation_phrase": sample.relation_phrase,
                                   "subject_index": j},
                })
        info = {"description": facts.get("title", "DreamRelation synthetic relation dataset"), "version": "1.0",
                "year": int(str(facts.get("date_created", "0"))[:4] or 0), "contributor": "dreamrelation batch export",
                "url": "", "date_created": facts.get("date_created", ""), "dreamrelation": facts}
        return {"info": info, "licenses": [], "images": self.images,
                "categories": [{"id": i, "name": n, "supercategory": "subject"} for n, i in category.items()],
                "annotations": annotations}

    def close(self, facts: dict[str, Any]) -> list[str]:
        uri = storage.join(self.to, "annotations.json")
        storage.write_bytes_atomic(uri, json.dumps(self.document(facts), indent=1).encode())
        self._remove_stale(storage.join(self.to, "images"), "", ".png", self.image_uris)
        self.files = [uri]
        return list(self.files)


_WRITERS = {"hf": HFWriter, "webdataset": WebDatasetWriter, "coco": CocoWriter}


def make_writer(format: str, to: str, total: int, shard_size: int) -> HFWriter | WebDatasetWriter | CocoWriter:
    """The writer of ``format`` (one of :data:`FORMATS`) for ``total`` planned samples."""
    if format not in _WRITERS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an integer >= 1, got {shard_size!r}")
    return _WRITERS[format](to, total, shard_size)
