"""The batch worker core without Ray, on the tiny preset with the example manifest and the example LoRAs.

One result per row in input order; images at ``{out}/images/{row_id}/{k}.png`` of the row's size; per-image metrics in
[0, 100]; result files under deterministic names; bad rows (missing / non-image subject, relation without a LoRA)
become error rows while their batch-mates complete; the LoRA and subject caches never change an image (byte for
byte), batching changes it by at most one pixel level. The example LoRAs must still fit the tiny model.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import make_subject
from PIL import Image

from batch.worker import Worker, WorkerConfig
from manifests.io import image_key, read_manifest, read_table
from manifests.ledger import part_uri
from manifests.registry import LoRARegistry

EXAMPLES = Path(__file__).resolve().parents[1] / "manifests" / "examples"
LORAS = EXAMPLES / "loras"
METRICS = ("clip_t", "clip_r", "clip_i", "clip_i_crop", "dino")


@pytest.fixture(scope="module")
def example_rows() -> list[dict]:
    """The 18 example rows as dicts (absolute image paths), by row_id."""
    rows, rejected = read_manifest(str(EXAMPLES / "example.parquet"))
    assert not rejected
    return [r.model_dump() for r in rows]


def by_relation(rows: list[dict], relation: str | None) -> list[dict]:
    return [r for r in rows if r["relation"] == relation]


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("worker-out")


@pytest.fixture(scope="module")
def worker(tiny_dir, out) -> Worker:
    """The module's worker: one LoRA slot in memory (lora_cache_size=1), so relation switches read from storage."""
    return Worker(WorkerConfig(output=str(out), preset="tiny", loras=str(LORAS), device="cpu", lora_cache_size=1))


def variant(row: dict, row_id: str, **changes) -> dict:
    return {**row, "row_id": row_id, **changes}


def files(where, result) -> list[str]:
    """The image files of a result: its keys under the output root (a path, or a Worker whose output it is)."""
    root = where.config.output if isinstance(where, Worker) else where
    return [str(Path(root) / key) for key in result.images]


def pixels(uri: str) -> np.ndarray:
    with Image.open(uri) as im:
        return np.asarray(im.convert("RGB"))


def assert_same_image(a: str, b: str, exact: bool = True) -> None:
    """The same PNG bytes; with ``exact=False`` (another batch composition: float sums in another order, as in
    test_pipeline's batch test) pixels at most one level apart."""
    if Path(a).read_bytes() == Path(b).read_bytes():
        return
    assert not exact, f"{a} and {b} differ"
    diff = np.abs(pixels(a).astype(int) - pixels(b).astype(int))
    assert diff.max() <= 1, f"{a} and {b} differ by up to {diff.max()} levels"


def tmp_files(root: Path) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if ".tmp-" in f]


# ---- the whole example manifest ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def example_results(worker, example_rows):
    """Every example row through process_and_write, in two calls (the job sends chunks of rows)."""
    return (worker.process_and_write(example_rows[:9]) + worker.process_and_write(example_rows[9:]))


def test_every_row_gets_one_result_in_input_order(example_rows, example_results):
    assert [r.row_id for r in example_results] == [r["row_id"] for r in example_rows]
    assert [r.status for r in example_results] == ["ok"] * len(example_rows), \
        [(r.row_id, r.error) for r in example_results if r.status != "ok"]
    assert {r.relation for r in example_results} == {"hugging", "shaking_hands", "riding", None}


def test_images_are_pngs_of_the_rows_size_at_their_keys(example_rows, example_results, out):
    for row, result in zip(example_rows, example_results):
        expected = [f"images/{row['row_id']}/{k}.png" for k in range(row["num_images"])]
        assert result.images == expected == [image_key(row["row_id"], k) for k in range(row["num_images"])]
        for uri in files(out, result):
            with Image.open(uri) as im:
                assert im.format == "PNG"
                assert im.size == (row["width"], row["height"])
        # nothing else in the row's folder
        names = sorted(f"{k}.png" for k in range(row["num_images"]))
        assert sorted(os.listdir(out / "images" / row["row_id"])) == names


def test_a_row_starts_by_removing_what_a_killed_writer_left_in_its_folder(worker, example_rows, out):
    """An actor killed between writing a temporary and renaming it leaves ``{k}.png.tmp-*``; Ray retries the row on
    another actor, which owns the row now and clears them."""
    row = variant(example_rows[0], "stale-tmp", num_images=1)
    folder = out / "images" / "stale-tmp"
    (folder / "attempts").mkdir(parents=True)
    for stale in (folder / "0.png.tmp-dead", folder / "attempts" / "0-0.png.tmp-dead"):
        stale.write_bytes(b"\x89PNG half")
    [result] = worker.process([row])
    assert result.status == "ok", result.error
    assert tmp_files(folder) == []
    assert sorted(os.listdir(folder)) == ["0.png", "attempts"]


def test_metrics_have_one_value_per_image_in_range(example_rows, example_results):
    for row, result in zip(example_rows, example_results):
        for m in METRICS:
            values = getattr(result, m)
            assert len(values) == row["num_images"], (result.row_id, m, values)
            assert all(0.0 <= v <= 100.0 for v in values), (result.row_id, m, values)
        assert result.seconds_generate > 0 and result.seconds_metrics > 0
        if row["relation"] is None:
            assert result.lora_cache_hit is None
        else:
            assert isinstance(result.lora_cache_hit, bool)


def test_result_files_are_deterministic_and_never_partial(worker, example_rows, example_results, out):
    results_dir = out / "results"
    files = sorted(os.listdir(results_dir))
    first, second = (Path(part_uri(str(out), "", [r["row_id"] for r in part])).name
                     for part in (example_rows[:9], example_rows[9:]))
    assert first in files and second in files
    table = read_table(str(results_dir / first))
    assert table.column("row_id").to_pylist() == [r["row_id"] for r in example_rows[:9]]
    # the same rows again (in another order): the same file is overwritten, nothing is added
    again = worker.process_and_write(list(reversed(example_rows[:2])))
    name = Path(part_uri(str(out), "", [r.row_id for r in again])).name
    worker.process_and_write(example_rows[:2])
    files_after = sorted(os.listdir(results_dir))
    assert name in files_after and files_after.count(name) == 1
    assert len(files_after) == len(set(files) | {name})
    assert tmp_files(out) == []


def test_result_rows_carry_their_provenance(worker, example_rows, example_results, tiny_dir):
    """Each result says what made it: the weights' fingerprints, the LoRA file and its sha256, each image's seed,
    and the manifest row it was made from."""
    import hashlib

    from dreamrelation.provenance import model_fingerprints
    from manifests.schema import GenerationRow

    fingerprints = model_fingerprints("tiny")
    for row, result in zip(example_rows, example_results):
        assert result.model_preset == "tiny"
        assert (result.model_fingerprint, result.adapter_fingerprint) == (fingerprints["model"],
                                                                         fingerprints["adapter"])
        assert result.local_encoder_fingerprint is None  # the tiny preset has no distilled local encoder
        assert result.seeds == [row["seed"] + k for k in range(row["num_images"])]
        assert GenerationRow.model_validate_json(result.request) == GenerationRow.model_validate(row)
        if row["relation"] is None:
            assert result.lora_uri is None and result.lora_sha256 is None
        else:
            lora = LORAS / row["relation"] / "pytorch_lora_weights.safetensors"
            assert result.lora_uri == str(lora)
            assert result.lora_sha256 == hashlib.sha256(lora.read_bytes()).hexdigest()


def test_a_worker_refuses_weights_other_than_the_runs(tiny_dir, out):
    from manifests.run_record import RunMismatch

    with pytest.raises(RunMismatch, match="changed since the run started.*model"):
        Worker(WorkerConfig(output=str(out), preset="tiny", device="cpu",
                            expect_fingerprints={"model": "0000000000000000"}))


# ---- bad rows -----------------------------------------------------------------------------------------------
def test_missing_or_non_image_subject_fails_only_its_row(worker, example_rows, tmp_path, out):
    good = by_relation(example_rows, "hugging")[1]  # two subjects
    not_image = tmp_path / "notes.png"
    not_image.write_bytes(b"not an image")
    rows = [
        variant(good, "w-bad-missing", subjects=[good["subjects"][0],
                                                  {**good["subjects"][1], "image": str(tmp_path / "absent.png")}]),
        variant(good, "w-good-1"),
        variant(good, "w-bad-notimage", subjects=[{**good["subjects"][0], "image": str(not_image)},
                                                  good["subjects"][1]]),
        variant(good, "w-good-2", seed=good["seed"] + 7),
    ]
    results = worker.process_and_write(rows)
    assert [r.row_id for r in results] == [r["row_id"] for r in rows]
    status = {r.row_id: r for r in results}
    assert status["w-good-1"].status == status["w-good-2"].status == "ok"
    assert status["w-bad-missing"].status == "error" and "subjects[1].image" in status["w-bad-missing"].error
    assert "absent.png" in status["w-bad-missing"].error
    assert status["w-bad-notimage"].status == "error" and "subjects[0].image" in status["w-bad-notimage"].error
    for rid in ("w-bad-missing", "w-bad-notimage"):
        assert status[rid].images == [] and all(getattr(status[rid], m) == [] for m in METRICS)
        assert not (out / "images" / rid).exists()
    assert tmp_files(out) == []


def test_relation_without_a_lora_fails_only_its_rows(worker, example_rows):
    hug, plain = by_relation(example_rows, "hugging")[0], by_relation(example_rows, None)[0]
    rows = [variant(hug, "w-unknown-rel", relation="kissing"), variant(plain, "w-plain"), variant(hug, "w-hug")]
    results = worker.process(rows)
    assert [r.status for r in results] == ["error", "ok", "ok"], [r.error for r in results]
    assert "'kissing'" in results[0].error and "LoRA" in results[0].error
    assert results[0].relation == "kissing"


def test_the_local_grid_is_the_runs_and_a_lora_trained_with_another_fails_its_rows(tiny_dir, example_rows,
                                                                                    tmp_path):
    """--local-grid sets the local tokens per subject (n x n); a relation LoRA whose card says it was trained
    with another grid (the paper's Table 6 ablation) fails its rows with a reason naming both, the rest run."""
    import json
    import shutil

    import torch

    loras = tmp_path / "loras"
    shutil.copytree(LORAS, loras)
    card = json.loads((loras / "hugging" / "card.json").read_text())
    (loras / "hugging" / "card.json").write_text(json.dumps({**card, "config": {"local_grid": 2}}))
    hug, ride = by_relation(example_rows, "hugging")[0], by_relation(example_rows, "riding")[0]
    rows = [variant(hug, "g-hug"), variant(ride, "g-ride")]
    with pytest.raises(ValueError, match="--local-grid must be an integer from 1 to 16, got 0"):
        WorkerConfig(output=str(tmp_path / "o"), local_grid=0)

    four = Worker(WorkerConfig(output=str(tmp_path / "o4"), preset="tiny", loras=str(loras), device="cpu",
                               metrics=False))
    assert four.pipe.adapter.encoder.config.local_grid == 4  # the preset's
    results = four.process(rows)
    assert [r.status for r in results] == ["error", "ok"]
    assert results[0].error == ("relation 'hugging': its LoRA was trained with --local-grid 2, this run generates "
                                "with 4 local tokens per side: pass --local-grid 2")
    two = Worker(WorkerConfig(output=str(tmp_path / "o2"), preset="tiny", loras=str(loras), device="cpu",
                              metrics=False, local_grid=2))
    encoder = two.pipe.adapter.encoder
    assert encoder.config.local_grid == 2
    with torch.no_grad():
        n_two = encoder([make_subject(1)]).shape[1]
        n_four = four.pipe.adapter.encoder([make_subject(1)]).shape[1]
    assert n_four - n_two == 4 * 4 - 2 * 2  # 16 local tokens per subject at grid 4, 4 at grid 2
    results = two.process(rows)
    assert [r.status for r in results] == ["ok", "ok"]
    # the grid changes the image: the same row at grid 2 and at grid 4 (no LoRA) differ
    plain = variant(by_relation(example_rows, None)[0], "g-plain")
    a = pixels(files(two, two.process([plain])[0])[0]).astype(int)
    b = pixels(files(four, four.process([plain])[0])[0]).astype(int)
    assert np.abs(a - b).mean() > 0


# ---- identical images whatever the batching and the caches --------------------------------------------------
def test_image_is_the_same_in_a_batch_and_alone(worker, example_rows):
    rows = by_relation(example_rows, "shaking_hands")[:3]  # 1 + 2 + 1 images: one batch of 4
    batch = worker.process([variant(r, f"w-batch-{i}") for i, r in enumerate(rows)])
    alone = [worker.process([variant(r, f"w-alone-{i}")])[0] for i, r in enumerate(rows)]
    for b, a in zip(batch, alone):
        assert b.status == a.status == "ok"
        assert len(b.images) == len(a.images)
        for ub, ua in zip(files(worker, b), files(worker, a)):
            assert_same_image(ub, ua, exact=False)


def test_lora_cache_counters_and_images_for_a_known_order(worker, example_rows):
    """Capacity 1, relations A A B A C C (after a warm-up row of C): miss hit miss miss miss hit."""
    a, b, c = (by_relation(example_rows, rel)[0] for rel in ("hugging", "shaking_hands", "riding"))
    worker.process([variant(c, "w-lru-warmup")])  # known state: the cache holds C, the slot holds C
    before = worker.stats()["lora_cache"]
    order = [("A0", a), ("A1", a), ("B", b), ("A2", a), ("C0", c), ("C1", c)]
    results = {name: worker.process([variant(row, f"w-lru-{name}")])[0] for name, row in order}
    after = worker.stats()["lora_cache"]
    delta = {k: after[k] - before[k] for k in ("hits", "misses", "evictions", "swaps")}
    assert delta == {"hits": 2, "misses": 4, "evictions": 4, "swaps": 4}, (before, after)
    assert after["size"] == 1 and after["capacity"] == 1 and after["active"] == "riding"
    assert [results[n].lora_cache_hit for n, _ in order] == [False, True, False, False, False, True]
    assert all(r.status == "ok" for r in results.values())
    # A from storage (A0, A2) and from the cache (A1): the same image; likewise C
    first = {name: files(worker, r)[0] for name, r in results.items()}
    assert_same_image(first["A0"], first["A1"])
    assert_same_image(first["A0"], first["A2"])
    assert_same_image(first["C0"], first["C1"])
    # and the relation matters: the same row under another LoRA is another image
    other = worker.process([variant(a, "w-lru-A-as-B", relation="shaking_hands")])[0]
    assert Path(files(worker, other)[0]).read_bytes() != Path(first["A0"]).read_bytes()


def test_subject_cache_encodes_a_recurring_image_once(worker, example_rows, tiny_dir, tmp_path):
    """Two subject images new to the worker, used by three rows: two encodings, four hits; a fresh worker (empty
    caches, same calls) makes the same images, byte for byte."""
    for name, seed in (("s1", 901), ("s2", 902)):
        make_subject(seed).save(tmp_path / f"{name}.png")
    base = by_relation(example_rows, "hugging")[0]
    s1, s2 = ({**base["subjects"][j], "image": str(tmp_path / f"s{j + 1}.png")} for j in (0, 1))
    rows = [variant(base, "w-subj-0", subjects=[s1, s2]),
            variant(base, "w-subj-1", subjects=[s2, {**s1, "box": base["subjects"][1]["box"]}], seed=5),
            variant(base, "w-subj-2", subjects=[s1, s2], seed=6)]
    before = worker.stats()["subject_cache"]
    results = worker.process(rows[:1]) + worker.process(rows[1:])
    after = worker.stats()["subject_cache"]
    assert after["misses"] - before["misses"] == 2
    assert after["hits"] - before["hits"] == 4
    assert after["encode_calls"] - before["encode_calls"] == 1
    assert [r.subject_cache_hits for r in results] == [0, 2, 2]

    fresh_out = tmp_path / "fresh"
    fresh = Worker(WorkerConfig(output=str(fresh_out), preset="tiny", loras=str(LORAS), device="cpu"))
    again = fresh.process(rows[:1]) + fresh.process(rows[1:])  # the same calls: only the cache state differs
    assert fresh.stats()["subject_cache"]["misses"] == 2
    for r, g in zip(results, again):
        assert r.status == g.status == "ok"
        assert all(Path(f).is_file() and Path(f).is_relative_to(fresh_out) for f in files(fresh, g))
        for ur, ug in zip(files(worker, r), files(fresh, g)):
            assert_same_image(ur, ug)


# ---- the example LoRAs fit the tiny model ---------------------------------------------------------------------
def test_example_loras_fit_the_tiny_model(tiny_dir):
    """Every example LoRA has exactly the keys and shapes of a fresh rank-4 relation LoRA on the current tiny UNet,
    and loads into the pipeline."""
    import warnings

    from diffusers import UNet2DConditionModel
    from safetensors.torch import load

    from dreamrelation.model.lora import add_relation_lora, relation_lora_state_dict
    from dreamrelation.model.presets import load_pipeline

    hint = "the example LoRAs do not fit the tiny model; regenerate with python scripts/make_example_loras.py"
    unet = UNet2DConditionModel.from_pretrained(tiny_dir / "unet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        add_relation_lora(unet, "probe")
    expected = {k.removeprefix("unet."): tuple(v.shape) for k, v in relation_lora_state_dict(unet, "probe").items()}
    registry = LoRARegistry(str(LORAS))
    assert registry.relations() == ["hugging", "riding", "shaking_hands"]
    pipe = load_pipeline(str(tiny_dir))
    warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # several adapters: intended here
    for relation in registry.relations():
        state = load(registry.read_bytes(relation))
        found = {k.removeprefix("unet."): tuple(v.shape) for k, v in state.items()}
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        if missing or unexpected or wrong:
            pytest.fail(f"{relation}: {hint} (missing keys {missing[:3]}, unexpected keys {unexpected[:3]}, "
                        f"wrong shapes {[(k, found[k], expected[k]) for k in wrong[:3]]})")
        try:
            pipe.load_relation_lora(relation, state)
        except Exception as exc:  # noqa: BLE001 - any load failure means the files are stale
            pytest.fail(f"{relation}: {hint} ({type(exc).__name__}: {exc})")
    assert pipe.loaded_relations() == ["hugging", "riding", "shaking_hands"]
