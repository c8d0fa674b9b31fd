"""``batch export`` on a real tiny run (the worker core, no Ray): every format round-trips through its own reader
(``datasets``, ``webdataset``, COCO checks), the counts match the filters, and the card states the run's facts.

The run: 4 example rows at 64 px, 2 steps (7 images; one row id with dots, one row without a relation, three
subjects in one row) plus a row whose subject image is missing (status "error"), written by
``Worker.process_and_write`` (so each result carries its request and provenance), and a format-2 ``run.json``. An
older run (results without request or provenance, a legacy ``run.json`` and ``manifest.parquet``) is made from it.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from conftest import invoke
from manifests import storage
from manifests.export import ExportError, ExportFilter, export_run, png_size, sample_key
from manifests.export_samples import LABELED_PROVENANCE, METRICS
from manifests.io import RESULT_SCHEMA, read_manifest, write_manifest, write_results
from manifests.ledger import ledger_records, read_ledger
from manifests.run_record import RunRecord, write_run

EXAMPLES = Path(__file__).resolve().parents[1] / "manifests" / "examples"
LORAS = EXAMPLES / "loras"
SIZE = 64
# the columns of results written before results recorded their request, seeds and provenance
LEGACY_COLUMNS = ("row_id", "status", "error", "images", *METRICS, "relation", "seconds_load", "seconds_lora",
                  "seconds_generate", "seconds_write", "seconds_metrics", "lora_cache_hit", "subject_cache_hits",
                  "attempt", "gate", "attempts", "finished_at")


# ---- the run ----------------------------------------------------------------------------------------------------
def run_rows(tmp: Path) -> list[dict]:
    rows, rejected = read_manifest(str(EXAMPLES / "example.parquet"))
    assert not rejected
    by_id = {r.row_id: r.model_dump() for r in rows}
    fast = dict(width=SIZE, height=SIZE, steps=2)
    bad_subjects = copy.deepcopy(by_id["ex-01-hugging"]["subjects"])
    bad_subjects[1]["image"] = str(tmp / "absent.png")
    return [
        {**by_id["ex-00-hugging"], **fast},  # 2 images
        {**by_id["ex-05-shaking_hands"], **fast, "row_id": "ex.05.shaking"},  # dots in the row id
        {**by_id["ex-10-riding"], **fast, "num_images": 2},
        {**by_id["ex-15-none"], **fast},  # no relation, no relation phrase, 3 subjects, 2 images
        {**by_id["ex-01-hugging"], **fast, "row_id": "ex-bad", "subjects": bad_subjects},  # -> status "error"
    ]


def write_run_files(out: str, rows: list[dict], results, fingerprints: dict | None = None,
                    loras: Path | str = LORAS) -> None:
    """``run.json`` as ``batch submit`` writes it (format 2: settings, fingerprints, whole-run counts)."""
    ok = [r for r in results if r.status == "ok"]
    record = RunRecord(
        output=out, status="completed", fingerprints=fingerprints or {},
        settings=dict(manifest=str(EXAMPLES / "example.parquet"), preset="tiny", local_encoder=None,
                      loras=str(loras), use_local_tokens=False, dtype="auto", metrics=True, gate=None),
        rows=dict(read=len(rows), ok=len(ok), error=len(results) - len(ok), rejected=0, pending=0),
        images=sum(len(r.images) for r in ok))
    write_run(out, record)


def make_legacy(src: Path, dst: Path, rows: list[dict]) -> Path:
    """A copy of the run as an older version wrote it: results without request, seeds or provenance and with
    absolute image URIs, ``manifest.parquet``, and a run.json with ``configuration`` and top-level counts."""
    shutil.copytree(src, dst)
    records = [{c: r[c] for c in LEGACY_COLUMNS} for r in ledger_records(str(dst))]
    for f in (dst / "results").glob("*.parquet"):
        f.unlink()
    schema = pa.schema([RESULT_SCHEMA.field(c) for c in LEGACY_COLUMNS])
    pq.write_table(pa.Table.from_pylist(records, schema=schema), dst / "results" / "part-old.parquet")
    write_manifest(rows, str(dst / "manifest.parquet"))
    ok = [r for r in records if r["status"] == "ok"]
    run = {"manifest": str(EXAMPLES / "example.parquet"), "output": str(dst), "read": len(rows),
           "accepted": len(rows), "rejected": 0, "ok": len(ok), "error": len(records) - len(ok),
           "images": sum(len(r["images"]) for r in ok),
           "configuration": {"manifest": str(EXAMPLES / "example.parquet"), "output": str(dst), "preset": "tiny",
                             "loras": str(LORAS), "worker": {"output": str(dst), "preset": "tiny",
                                                             "loras": str(LORAS)}}}
    (dst / "run.json").write_text(json.dumps(run))
    return dst


@pytest.fixture(scope="module")
def worker(tiny_dir, tmp_path_factory):
    from batch.worker import Worker, WorkerConfig

    out = tmp_path_factory.mktemp("export-run")
    return Worker(WorkerConfig(output=str(out), preset="tiny", loras=str(LORAS), device="cpu"))


@pytest.fixture(scope="module")
def run(worker, tmp_path_factory):
    """(run folder, rows, results by row id)."""
    out = worker.config.output
    rows = run_rows(tmp_path_factory.mktemp("export-inputs"))
    results = worker.process_and_write(rows)
    assert [r.status for r in results] == ["ok"] * 4 + ["error"], [r.error for r in results]
    assert all(r.request and r.model_fingerprint for r in results)  # self-contained, with provenance
    write_run_files(out, rows, results, worker.fingerprints)
    assert not (Path(out) / "manifest.parquet").exists()  # batch submit no longer writes one
    return Path(out), rows, {r.row_id: r for r in results}


def images_of(results: dict) -> list[tuple[str, int]]:
    return sorted((rid, k) for rid, r in results.items() if r.status == "ok" for k in range(len(r.images)))


def threshold(results: dict, metric: str, kept: int) -> tuple[float, set[tuple[str, int]]]:
    """A minimum of ``metric`` between two observed values that keeps ``kept`` images, and those images."""
    values = sorted({v for r in results.values() for v in getattr(r, metric)}, reverse=True)
    assert len(values) > kept, f"{metric}: too few distinct values {values}"
    cut = (values[kept - 1] + values[kept]) / 2
    keep = {(rid, k) for rid, r in results.items() for k, v in enumerate(getattr(r, metric)) if v >= cut}
    assert len(keep) == kept
    return cut, keep


def copy_run(src: Path, dst: Path, edit=None) -> Path:
    """A copy of the run folder (image keys are relative: nothing to rewrite); ``edit(records)`` may change the
    results (as stored: image keys, not URIs)."""
    shutil.copytree(src, dst)
    if edit:
        records = read_ledger(str(dst)).to_pylist()
        edit(records)
        for f in (dst / "results").glob("*.parquet"):
            f.unlink()
        write_results(records, str(dst / "results" / "part-copy.parquet"))
    return dst


def uri_of(out: Path | str, key: str) -> str:
    return storage.resolve(str(out), key)


def read_card(folder: Path) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def card_section(body: str, title: str) -> str:
    """The text of the card's ``## {title}`` section."""
    sections = {part.split("\n", 1)[0]: part for part in body.split("\n## ")}
    return sections[title]


# ---- hf ---------------------------------------------------------------------------------------------------------
def test_hf_export_loads_with_datasets_and_the_filter_counts(run, tmp_path):
    import datasets

    out, rows, results = run
    cut, keep = threshold(results, "clip_i_crop", kept=5)
    dest = tmp_path / "hf"
    summary = export_run(str(out), "hf", str(dest), ExportFilter(min_clip_i_crop=cut), shard_size=2)
    n_images = len(images_of(results))
    assert summary["samples"] == 5 and summary["images"] == n_images == 7
    assert summary["filtered_out"] == {"below_min_clip_i_crop": n_images - 5}
    assert summary["rows"] == len({rid for rid, _ in keep}) and summary["rows_error"] == 1
    shards = sorted(p.name for p in (dest / "data").iterdir())
    assert shards == ["train-00000-of-00003.parquet", "train-00001-of-00003.parquet", "train-00002-of-00003.parquet"]
    assert summary["files"] == [str(dest / "data" / s) for s in shards] + [str(dest / "README.md")]

    meta = json.loads(pq.read_schema(dest / "data" / shards[0]).metadata[b"huggingface"])
    assert meta["info"]["features"]["image"] == {"_type": "Image"}

    ds = datasets.load_dataset(str(dest), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert ds.num_rows == 5
    assert isinstance(ds.features["image"], datasets.Image)
    by_row = {r["row_id"]: r for r in rows}
    assert {(x["row_id"], x["k"]) for x in ds} == keep
    for x in ds:
        row, result = by_row[x["row_id"]], results[x["row_id"]]
        assert x["image"].size == (SIZE, SIZE)
        assert x["key"] == sample_key(x["row_id"], x["k"])
        assert x["prompt"] == row["prompt"] and x["seed"] == row["seed"] + x["k"]
        assert x["relation"] == row["relation"]
        assert x["subject_phrases"] == [s["phrase"] for s in row["subjects"]]
        assert x["boxes"] == [s["box"] for s in row["subjects"]]
        assert x["boxes_pixel"] == [[round(v * SIZE, 3) for v in s["box"]] for s in row["subjects"]]
        assert (x["width"], x["height"]) == (SIZE, SIZE)
        for m in METRICS:
            assert x[m] == getattr(result, m)[x["k"]]
        assert x["clip_i_crop"] >= cut
        assert x["seed"] == result.seeds[x["k"]]
        for label in LABELED_PROVENANCE:
            assert x[label] == getattr(result, label)
        with Image.open(uri_of(out, result.images[x["k"]])) as im:
            assert list(x["image"].convert("RGB").getdata()) == list(im.convert("RGB").getdata())

    header, body = read_card(dest)
    assert header["configs"] == [{"config_name": "default",
                                  "data_files": [{"split": "train", "path": "data/train-*"}]}]
    shard_bytes = sum((dest / "data" / s).stat().st_size for s in shards)
    assert header["dataset_info"]["splits"] == [{"name": "train", "num_examples": 5, "num_bytes": shard_bytes}]
    assert {"name": "image", "dtype": "image"} in header["dataset_info"]["features"]
    assert datasets.Features._from_yaml_list(header["dataset_info"]["features"]) == ds.features
    assert "| 5 | " + str(summary["rows"]) + " |" in body
    assert "**Warning**" in body and "`tiny`" in body
    assert f"`min_clip_i_crop = {cut}`" in body and f"below_min_clip_i_crop: {n_images - 5}" in body
    for label in LABELED_PROVENANCE:  # nullable strings
        assert ds.features[label] == datasets.Value("string")
    versions = card_section(body, "Model and LoRA versions")
    for rid in {rid for rid, _ in keep}:  # what made the images, as their results recorded it
        result = results[rid]
        assert f"`{result.model_fingerprint}`" in versions and f"`{result.adapter_fingerprint}`" in versions
        if result.relation is not None:
            assert f"`{result.lora_sha256}`" in versions and f"`{result.lora_uri}`" in versions
    values = [x["clip_i_crop"] for x in ds]
    mean = round(sum(values) / len(values), 3)
    assert f"| clip_i_crop | 5 | {mean} |" in body


# ---- webdataset -------------------------------------------------------------------------------------------------
def test_webdataset_tar_lists_every_sample(run, tmp_path):
    import webdataset as wds

    out, rows, results = run
    cut, keep = threshold(results, "dino", kept=4)
    dest = tmp_path / "wds"
    summary = export_run(str(out), "webdataset", str(dest), ExportFilter(min_dino=cut), shard_size=3)
    assert summary["samples"] == 4 and summary["filtered_out"] == {"below_min_dino": 3}
    shards = sorted(dest.glob("shard-*.tar"))
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar"]
    keys = {sample_key(rid, k) for rid, k in keep}
    names = [m for p in shards for m in tarfile.open(p).getnames()]
    assert sorted(names) == sorted([f"{key}.png" for key in keys] + [f"{key}.json" for key in keys])
    assert all("." not in n.rsplit(".", 1)[0] for n in names)  # "ex.05.shaking" -> "ex~05~shaking_0"

    items = list(wds.WebDataset([str(p) for p in shards], shardshuffle=False))
    assert {item["__key__"] for item in items} == keys and len(items) == 4
    for item in items:
        labels = json.loads(item["json"])
        assert sample_key(labels["row_id"], labels["k"]) == item["__key__"]
        assert labels["dino"] == results[labels["row_id"]].dino[labels["k"]] >= cut
        assert png_size(item["png"]) == (labels["width"], labels["height"]) == (SIZE, SIZE)
        assert Image.open(io.BytesIO(item["png"])).size == (SIZE, SIZE)
    header, body = read_card(dest)
    assert header["configs"][0]["data_files"] == [{"split": "train", "path": "shard-*.tar"}]
    assert "webdataset" in body
    import datasets  # the card's config also lets `datasets` read the tars

    assert datasets.load_dataset(str(dest), split="train", cache_dir=str(tmp_path / "hf-cache")).num_rows == 4


# ---- coco -------------------------------------------------------------------------------------------------------
def check_coco(doc: dict, folder: Path) -> None:
    """COCO detection JSON: unique ids, references resolve, bbox pixel xywh inside the image, categories = phrases."""
    assert set(doc) >= {"info", "images", "annotations", "categories"}
    image_ids = [im["id"] for im in doc["images"]]
    ann_ids = [a["id"] for a in doc["annotations"]]
    cat_ids = [c["id"] for c in doc["categories"]]
    for ids in (image_ids, ann_ids, cat_ids):
        assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i >= 1 for i in ids)
    assert sorted(cat_ids) == list(range(1, len(cat_ids) + 1))
    images = {im["id"]: im for im in doc["images"]}
    names = {c["id"]: c["name"] for c in doc["categories"]}
    for im in doc["images"]:
        with Image.open(folder / "images" / im["file_name"]) as pic:
            assert pic.size == (im["width"], im["height"])
    used = set()
    for a in doc["annotations"]:
        im = images[a["image_id"]]
        x, y, w, h = a["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0
        assert x + w <= im["width"] + 1e-6 and y + h <= im["height"] + 1e-6
        assert a["area"] == pytest.approx(w * h, abs=1e-2) and a["iscrowd"] == 0
        j = a["attributes"]["subject_index"]
        assert names[a["category_id"]] == im["subject_phrases"][j]
        assert a["attributes"]["relation"] == im["relation"]
        assert a["attributes"]["relation_phrase"] == im["relation_phrase"]
        used.add(names[a["category_id"]])
    assert used == set(names.values())  # one category per distinct subject phrase, none unused
    assert len(doc["annotations"]) == sum(len(im["subject_phrases"]) for im in doc["images"])
    # the reference reader: pycocotools indexes it, and each annotation's mask is its box
    from pycocotools.coco import COCO

    coco = COCO(str(folder / "annotations.json"))
    assert sorted(coco.getImgIds()) == sorted(images) and len(coco.getAnnIds()) == len(doc["annotations"])
    for a in doc["annotations"]:
        mask = coco.annToMask(coco.loadAnns(a["id"])[0])
        im = images[a["image_id"]]
        assert mask.shape == (im["height"], im["width"]) and mask.dtype.kind == "u"
        assert abs(int(mask.sum()) - a["area"]) <= 2 * (a["bbox"][2] + a["bbox"][3]) + 4  # pixel edges
        ys, xs = mask.nonzero()
        x, y, w, h = a["bbox"]
        assert xs.min() >= int(x) - 1 and xs.max() <= x + w and ys.min() >= int(y) - 1 and ys.max() <= y + h


def test_coco_json_validates(run, tmp_path):
    out, rows, results = run
    cut, keep = threshold(results, "clip_i", kept=6)
    dest = tmp_path / "coco"
    summary = export_run(str(out), "coco", str(dest), ExportFilter(min_clip_i=cut))
    assert summary["samples"] == 6 and summary["files"] == [str(dest / "annotations.json"), str(dest / "README.md")]
    doc = json.loads((dest / "annotations.json").read_text())
    check_coco(doc, dest)
    assert {(im["row_id"], im["k"]) for im in doc["images"]} == keep
    assert sorted(p.name for p in (dest / "images").iterdir()) == sorted(f"{sample_key(*s)}.png" for s in keep)
    by_row = {r["row_id"]: r for r in rows}
    for a in doc["annotations"]:
        im = next(i for i in doc["images"] if i["id"] == a["image_id"])
        box = by_row[im["row_id"]]["subjects"][a["attributes"]["subject_index"]]["box"]
        expected = [box[0] * SIZE, box[1] * SIZE, (box[2] - box[0]) * SIZE, (box[3] - box[1]) * SIZE]
        assert a["bbox"] == pytest.approx(expected, abs=2e-3)
    info = doc["info"]["dreamrelation"]
    assert info["samples"] == 6 and info["filters"] == {"min_clip_i": cut} and info["tiny_preset"] is True
    assert info["model"]["preset"] == "tiny" and info["model"]["presets"] == [{"preset": "tiny", "samples": 6}]
    assert info["run"] == {"read": 5, "ok": 4, "error": 1, "rejected": 0, "pending": 0, "images": 7, "attempts": 0}
    for im in doc["images"]:  # each image entry says what made it
        result = results[im["row_id"]]
        assert {label: im[label] for label in LABELED_PROVENANCE} == \
            {label: getattr(result, label) for label in LABELED_PROVENANCE}

    # a second export to the same place with a stricter filter replaces the first: no stale images
    cut2, keep2 = threshold(results, "clip_i", kept=2)
    export_run(str(out), "coco", str(dest), ExportFilter(min_clip_i=cut2))
    assert sorted(p.name for p in (dest / "images").iterdir()) == sorted(f"{sample_key(*s)}.png" for s in keep2)
    check_coco(json.loads((dest / "annotations.json").read_text()), dest)


# ---- the gate, missing images, older runs ------------------------------------------------------------------------
def test_passed_only_and_the_seeds_of_gate_attempts(run, tmp_path):
    """Rows gated "failed" are dropped with --passed-only; the seed of an image is the one its result recorded, or,
    for a result that recorded none (older versions), its final attempt's."""
    import webdataset as wds

    out, rows, results = run
    hug = results["ex-00-hugging"]
    assert hug.images[1] == "images/ex-00-hugging/1.png"  # a key, relative to the run folder

    def edit(records):
        by_id = {r["row_id"]: r for r in records}
        by_id["ex-00-hugging"].update(gate="passed", attempt=2, seeds=[], attempts=[  # no seeds: from the attempts
            {"k": 0, "attempt": 0, "seed": 1000, "image": by_id["ex-00-hugging"]["images"][0], "passed": True},
            {"k": 1, "attempt": 0, "seed": 1001, "image": "images/ex-00-hugging/attempts/1-0.png", "passed": False,
             "failed": ["dino"]},
            {"k": 1, "attempt": 1, "seed": 1003, "image": by_id["ex-00-hugging"]["images"][1], "passed": True},
        ])
        by_id["ex-10-riding"]["gate"] = "failed"
        by_id["ex.05.shaking"].update(gate="passed", seeds=[777])

    copy = copy_run(out, tmp_path / "gated", edit)
    dest = tmp_path / "wds"
    summary = export_run(str(copy), "webdataset", str(dest), ExportFilter(passed_only=True))
    kept = {(rid, k) for rid, k in images_of(results) if rid != "ex-10-riding"}
    assert summary["samples"] == len(kept) == 5 and summary["filtered_out"] == {"gate_failed": 2}
    labels = {}
    for item in wds.WebDataset(str(dest / "shard-000000.tar"), shardshuffle=False):
        data = json.loads(item["json"])
        labels[(data["row_id"], data["k"])] = data
    assert set(labels) == kept
    assert [labels[("ex-00-hugging", k)]["seed"] for k in (0, 1)] == [1000, 1003]
    assert labels[("ex.05.shaking", 0)]["seed"] == 777
    assert labels[("ex-15-none", 1)]["seed"] == next(r for r in rows if r["row_id"] == "ex-15-none")["seed"] + 1
    assert labels[("ex-00-hugging", 0)]["gate"] == "passed" and labels[("ex-15-none", 0)]["gate"] is None
    # without --passed-only every ok row is exported
    assert export_run(str(copy), "webdataset", str(tmp_path / "all"))["samples"] == 7


def test_a_copied_run_exports_its_own_images_and_a_missing_one_is_skipped(run, tmp_path):
    """A run folder copied as it is (image keys are relative) exports the copy's images; an image missing from the
    copy is reported and skipped. The rows come from the results' requests: the run's manifest is not needed."""
    out, rows, results = run
    copy = tmp_path / "holed"
    shutil.copytree(out, copy)
    run_json = json.loads((copy / "run.json").read_text())
    run_json["settings"]["manifest"] = str(tmp_path / "gone.parquet")
    (copy / "run.json").write_text(json.dumps(run_json))
    gone = copy / "images" / "ex-10-riding" / "1.png"
    gone.unlink()
    Image.new("RGB", (SIZE, SIZE), (255, 0, 255)).save(copy / "images" / "ex-00-hugging" / "0.png")
    summary = export_run(str(copy), "hf", str(tmp_path / "hf"))
    assert summary["samples"] == 6 and summary["filtered_out"] == {"missing_image": 1}
    assert summary["missing_images"] == [str(gone)]
    table = pq.read_table(tmp_path / "hf" / "data" / "train-00000-of-00001.parquet").to_pylist()
    assert sorted((x["row_id"], x["k"]) for x in table) == [s for s in images_of(results) if s != ("ex-10-riding", 1)]
    images = {(x["row_id"], x["k"]): Image.open(io.BytesIO(x["image"]["bytes"])).convert("RGB") for x in table}
    assert set(images[("ex-00-hugging", 0)].getdata()) == {(255, 0, 255)}  # the copy's image, not the run's
    with Image.open(out / "images" / "ex-00-hugging" / "1.png") as original:
        assert list(images[("ex-00-hugging", 1)].getdata()) == list(original.convert("RGB").getdata())
    # without a relation_phrase function, a row whose manifest gives no phrase has none
    assert {x["relation_phrase"] for x in table if x["row_id"] == "ex-15-none"} == {None}
    assert {x["relation_phrase"] for x in table if x["row_id"] == "ex-10-riding"} == {"riding"}
    _, body = read_card(tmp_path / "hf")
    assert "recorded request" in body


def test_an_older_run_reads_its_manifest(run, tmp_path):
    """A run of an older version: results without request, seeds or provenance, a legacy run.json
    (``configuration``, top-level counts) and ``manifest.parquet``, else the manifest run.json names."""
    import webdataset as wds

    out, rows, results = run
    old = make_legacy(out, tmp_path / "old", rows)
    assert all(not r.get("request") for r in ledger_records(str(old)))
    summary = export_run(str(old), "webdataset", str(tmp_path / "wds"))
    assert summary["samples"] == 7
    by_row = {r["row_id"]: r for r in rows}
    for item in wds.WebDataset(str(tmp_path / "wds" / "shard-000000.tar"), shardshuffle=False):
        labels = json.loads(item["json"])
        row = by_row[labels["row_id"]]
        assert labels["prompt"] == row["prompt"] and labels["seed"] == row["seed"] + labels["k"]
        assert labels["boxes"] == [s["box"] for s in row["subjects"]]
        assert all(labels[p] is None for p in LABELED_PROVENANCE)  # not recorded by older runs
    _, body = read_card(tmp_path / "wds")
    assert "**Warning**" in body and f"rows from `{old / 'manifest.parquet'}`" in body
    assert "(none recorded)" in card_section(body, "Model and LoRA versions")
    source = card_section(body, "Source run")
    assert "- ok: 4" in source and "- error: 1" in source and "- images: 7" in source

    manifest = old / "manifest.parquet"
    manifest.rename(old / "rows.parquet")
    run_json = json.loads((old / "run.json").read_text())
    (old / "run.json").write_text(json.dumps({**run_json, "manifest": "rows.parquet"}))  # relative to the run
    summary = export_run(str(old), "coco", str(tmp_path / "coco"))
    assert summary["samples"] == 7
    check_coco(json.loads((tmp_path / "coco" / "annotations.json").read_text()), tmp_path / "coco")
    (old / "rows.parquet").unlink()
    with pytest.raises(ExportError, match="rows.parquet"):
        export_run(str(old), "coco", str(tmp_path / "coco2"))


# ---- provenance: the card and labels describe the weights that made the images ----------------------------------
@pytest.fixture
def registry_run(worker, run, tmp_path):
    """A small run (two relations) with its own copy of the LoRA registry: (run folder, registry, results by row
    id, sha256 of each relation's LoRA file when the run was made)."""
    from batch.worker import Worker, WorkerConfig

    _, rows, _ = run
    registry = tmp_path / "loras"
    shutil.copytree(LORAS, registry)
    sha = {r: hashlib.sha256((registry / r / "pytorch_lora_weights.safetensors").read_bytes()).hexdigest()
           for r in ("hugging", "shaking_hands")}
    out = tmp_path / "run"
    own = Worker(WorkerConfig(output=str(out), preset="tiny", loras=str(registry), device="cpu"),
                 pipe=worker.pipe, scorer=worker.scorer)
    picked = [{**rows[0], "num_images": 1}, rows[1]]  # hugging, shaking_hands
    results = own.process_and_write(picked)
    assert [r.status for r in results] == ["ok", "ok"], [r.error for r in results]
    write_run_files(str(out), picked, results, own.fingerprints, loras=registry)
    return out, registry, {r.row_id: r for r in results}, sha


def export_labels(out: Path, dest: Path) -> tuple[dict, str]:
    """Export ``out`` as webdataset to ``dest``: (labels by (row_id, k), the card's LoRA section)."""
    import webdataset as wds

    export_run(str(out), "webdataset", str(dest))
    labels = {}
    for item in wds.WebDataset(str(dest / "shard-000000.tar"), shardshuffle=False):
        data = json.loads(item["json"])
        labels[(data["row_id"], data["k"])] = data
    _, body = read_card(dest)
    return labels, card_section(body, "Model and LoRA versions")


def test_a_replaced_lora_does_not_change_what_an_export_says_made_the_images(registry_run, tmp_path):
    out, registry, results, sha = registry_run
    assert {r.relation: r.lora_sha256 for r in results.values()} == sha
    before_labels, before = export_labels(out, tmp_path / "before")

    weights = registry / "hugging" / "pytorch_lora_weights.safetensors"
    weights.write_bytes((registry / "riding" / "pytorch_lora_weights.safetensors").read_bytes())  # other bytes
    replaced = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert replaced != sha["hugging"]

    labels, section = export_labels(out, tmp_path / "after")
    assert labels == before_labels and section == before
    assert labels[("ex-00-hugging", 0)]["lora_sha256"] == sha["hugging"] == results["ex-00-hugging"].lora_sha256
    assert labels[("ex.05.shaking", 0)]["lora_sha256"] == sha["shaking_hands"] == \
        results["ex.05.shaking"].lora_sha256
    for result in results.values():  # the card: per relation, the file that made its images and their count
        assert f"| `{result.relation}` | `{result.lora_uri}` | `{sha[result.relation]}` | 1 |" in section
    assert replaced not in section


def test_an_export_needs_no_lora_registry(registry_run, tmp_path):
    out, registry, results, sha = registry_run
    _, before = export_labels(out, tmp_path / "before")
    shutil.rmtree(registry)
    labels, section = export_labels(out, tmp_path / "after")
    assert section == before
    assert {labels[(rid, 0)]["lora_sha256"] for rid in results} == set(sha.values())


def test_every_sample_carries_the_provenance_of_its_result(run, tmp_path):
    out, _, results = run
    labels, section = export_labels(out, tmp_path / "wds")
    assert len(labels) == 7
    for (rid, _), data in labels.items():
        result = results[rid]
        assert result.model_fingerprint is not None and data["model_fingerprint"] == result.model_fingerprint
        assert {p: data[p] for p in LABELED_PROVENANCE} == {p: getattr(result, p) for p in LABELED_PROVENANCE}
        assert (data["lora_sha256"] is None) == (result.relation is None)
    fingerprint = results["ex-00-hugging"].model_fingerprint
    assert f"| model | `{fingerprint}` | 7 |" in section


def test_errors_name_the_value(run, tmp_path):
    out, _, results = run
    with pytest.raises(ValueError, match="'parquet'"):
        export_run(str(out), "parquet", str(tmp_path / "x"))
    with pytest.raises(ValueError, match="another folder"):
        export_run(str(out), "coco", str(out))
    with pytest.raises(ValueError, match="shard_size"):
        export_run(str(out), "hf", str(tmp_path / "x"), shard_size=0)
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    with pytest.raises(ExportError, match=str(empty)):
        export_run(str(empty), "hf", str(tmp_path / "x"))
    top = max(v for r in results.values() for v in r.clip_t)
    with pytest.raises(ExportError, match="below_min_clip_t"):
        export_run(str(out), "hf", str(tmp_path / "x"), ExportFilter(min_clip_t=top + 1))
    with pytest.raises(ValueError, match="min_dino"):
        ExportFilter(min_dino=math.nan)
    assert not (tmp_path / "x").exists()


# ---- CLI and S3 -------------------------------------------------------------------------------------------------
def test_cli_export(run, runner, tmp_path):
    out, rows, results = run
    cut_i, _ = threshold(results, "clip_i", kept=5)
    cut_d, _ = threshold(results, "dino", kept=4)
    reasons: dict[str, int] = {}
    keep = set()
    for rid, k in images_of(results):  # each dropped image counts under its first failing filter (METRICS order)
        if results[rid].clip_i[k] < cut_i:
            reasons["below_min_clip_i"] = reasons.get("below_min_clip_i", 0) + 1
        elif results[rid].dino[k] < cut_d:
            reasons["below_min_dino"] = reasons.get("below_min_dino", 0) + 1
        else:
            keep.add((rid, k))
    dest = tmp_path / "cli-coco"
    result = invoke(runner, "batch", "export", out, "--format", "coco", "--to", dest, "--min-clip-i", cut_i,
                    "--min-dino", cut_d)
    assert result.exit_code == 0, result.output
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
    assert f"samples {len(keep)} " in result.output and f"filtered out: {dropped} " in result.output
    doc = json.loads((dest / "annotations.json").read_text())
    assert {(im["row_id"], im["k"]) for im in doc["images"]} == keep

    # the CLI derives the relation phrase of rows whose manifest has none, as the worker does
    from dreamrelation.relation_phrase import relation_phrase

    every = invoke(runner, "batch", "export", out, "--format", "webdataset", "--to", tmp_path / "cli-wds")
    assert every.exit_code == 0, every.output
    with tarfile.open(tmp_path / "cli-wds" / "shard-000000.tar") as tar:
        labels = json.loads(tar.extractfile(f"{sample_key('ex-15-none', 0)}.json").read())
    row = next(r for r in rows if r["row_id"] == "ex-15-none")
    assert labels["relation_phrase"] == relation_phrase(row["prompt"], [s["phrase"] for s in row["subjects"]])
    assert labels["relation_phrase"] and labels["relation_phrase"] != row["prompt"]

    bad = invoke(runner, "batch", "export", out, "--format", "tfrecord", "--to", dest)
    assert bad.exit_code == 2 and "--format" in bad.output and "'tfrecord'" in bad.output
    missing = invoke(runner, "batch", "export", tmp_path / "nowhere", "--format", "hf", "--to", dest)
    assert missing.exit_code == 2 and "nowhere" in missing.output


def test_export_from_and_to_s3(worker, run, s3_bucket, tmp_path):
    """A run written to S3 (the same worker's models) exported to S3, then loaded with datasets."""
    import datasets

    from batch.worker import Worker, WorkerConfig

    _, rows, _ = run
    out = f"{s3_bucket}/runs/one"
    s3_worker = Worker(WorkerConfig(output=out, preset="tiny", loras=str(LORAS), device="cpu"),
                       pipe=worker.pipe, scorer=worker.scorer)
    results = s3_worker.process_and_write(rows[:2])
    assert all(r.status == "ok" and r.images[0] == f"images/{r.row_id}/0.png" for r in results)
    assert all(uri.startswith(f"{out}/images/") for r in ledger_records(out) for uri in r["images"])
    write_run_files(out, rows[:2], results, s3_worker.fingerprints)
    dest = f"{s3_bucket}/datasets/one"
    summary = export_run(out, "hf", dest)
    assert summary["samples"] == 3 and summary["files"][-1] == f"{dest}/README.md"
    fs, path = storage.filesystem(dest)
    fs.invalidate_cache()
    fs.get(path, str(tmp_path / "local"), recursive=True)
    ds = datasets.load_dataset(str(tmp_path / "local"), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert sorted((x["row_id"], x["k"]) for x in ds) == [("ex-00-hugging", 0), ("ex-00-hugging", 1),
                                                         ("ex.05.shaking", 0)]
    assert all(x["image"].size == (SIZE, SIZE) for x in ds)
