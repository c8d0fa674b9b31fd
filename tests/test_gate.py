"""The quality gate of ``batch submit`` (issue 7): an image under a minimum score is made again with the next seed of
its row's schedule (``seed + k + attempt * num_images``) until it passes or ``--max-attempts`` images were made.

The core runs through :class:`batch.worker.Worker` on the tiny preset (no Ray): a run without a gate gives the
scores of attempt 0, the threshold is set between them (the median CLIP-I, so some images fall under it), and the
gated run must regenerate exactly those images, batched across rows, record every attempt with its scheduled seed,
keep rejected attempts under ``attempts/`` and make the same images again in a rerun. One test goes through the CLI
on a local Ray: the attempt record's and run.json's gate counts, and the rows the results carry. (The tiny model's CLIP-T is 0 for every image,
so the tests gate on CLIP-I, which varies.)
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batch.worker import Worker, WorkerConfig
from conftest import invoke  # noqa: F401  (the `runner` fixture comes from conftest)
from manifests.io import (
    MANIFEST_SCHEMA,
    RESULT_SCHEMA,
    image_key,
    read_manifest,
    read_results,
    read_table,
    write_results,
)
from manifests.schema import GateAttempt, GateSpec, GenerationRow, ResultRow

EXAMPLE = Path(__file__).resolve().parents[1] / "manifests" / "examples" / "example.parquet"
MAX_ATTEMPTS = 2


def gate_rows() -> list[GenerationRow]:
    """Four rows with two subjects and no relation LoRA, 1 or 2 images each (6 images), tiny and fast."""
    rows, rejected = read_manifest(str(EXAMPLE))
    assert not rejected
    base = next(r for r in rows if r.relation is None and len(r.subjects) == 2)
    return [base.model_copy(update={"row_id": f"gate-{i}", "seed": 2000 + 100 * i, "num_images": n, "steps": 2,
                                    "width": 64, "height": 64})
            for i, n in enumerate((2, 1, 2, 1))]


class RecordingPipe:
    """The pipeline, with the batch size of every call recorded (to see which images denoise together)."""

    def __init__(self, pipe):
        self._pipe = pipe
        self.calls: list[list[int]] = []  # the seeds of each call

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, *args, **kwargs):
        self.calls.append(list(kwargs["seed"]))
        return self._pipe(*args, **kwargs)


def pixels(uri: str) -> np.ndarray:
    with Image.open(uri) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def relative(uri: str, root: Path) -> str:
    return os.path.relpath(uri, root)


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ---- the gate spec and the schedule (no model) ---------------------------------------------------------------------
@pytest.mark.parametrize("options, words", [
    (dict(min_clip_i=math.nan), "--min-clip-i must be a finite number"),
    (dict(min_dino=math.inf), "--min-dino must be a finite number"),
    (dict(min_clip_t=20.0, max_attempts=0), "--max-attempts must be an integer in [1, 20], got 0"),
    (dict(min_clip_t=20.0, max_attempts=21), "--max-attempts must be an integer in [1, 20], got 21"),
    (dict(max_attempts=3), "--max-attempts 3 needs a threshold"),
    (dict(min_aesthetic=5.0), "unknown gate metric 'aesthetic'"),
])
def test_gate_options_are_checked_and_errors_name_the_option(options, words):
    with pytest.raises(ValueError) as info:
        GateSpec.from_options(**options)
    assert words in str(info.value)


def test_gate_spec_and_verdicts():
    assert GateSpec.from_options() is None  # no threshold: no gate, today's behaviour
    gate = GateSpec.from_options(max_attempts=3, min_dino=40, min_clip_r=25.5, min_clip_t=None)
    assert gate.thresholds == {"clip_r": 25.5, "dino": 40.0} and gate.max_attempts == 3
    assert GateSpec.model_validate(gate.model_dump()) == gate  # it travels as a dict to the actors
    assert gate.failed({"clip_r": 25.5, "dino": 40.0}) == []  # a minimum is inclusive
    assert gate.failed({"clip_r": 25.4999, "dino": 41.0}) == ["clip_r"]
    assert gate.failed({"clip_r": 10.0, "dino": 39.0}) == ["clip_r", "dino"]
    assert gate.failed({"clip_r": 30.0}) == ["dino"]  # an image that was not scored does not pass
    with pytest.raises(ValueError, match="needs at least one threshold"):
        GateSpec(thresholds={})


def test_seed_schedule():
    row = gate_rows()[0]  # seed 2000, 2 images
    assert [[row.image_seed(k, a) for k in range(2)] for a in range(3)] == [[2000, 2001], [2002, 2003], [2004, 2005]]
    seeds = {GenerationRow.model_validate({**row.model_dump(), "num_images": n}).image_seed(k, a)
             for n in (3,) for k in range(3) for a in range(20)}
    assert len(seeds) == 60  # no two (image, attempt) pairs share a seed
    with pytest.raises(ValueError, match="k must be in"):
        row.image_seed(2)


def test_gate_needs_metrics():
    with pytest.raises(ValueError, match=r"quality gate \(--min-clip-i 30\) needs metrics"):
        WorkerConfig(output="memory://x", metrics=False, gate=GateSpec(thresholds={"clip_i": 30}))
    config = WorkerConfig(output="memory://x", gate=GateSpec(thresholds={"clip_i": 30}, max_attempts=2))
    assert config.gate == {"thresholds": {"clip_i": 30.0}, "max_attempts": 2}  # a plain dict: JSON, picklable
    assert json.loads(json.dumps(config.to_dict()))["gate"] == config.gate


def test_result_files_without_the_gate_columns_still_read(tmp_path):
    """A results file written before the gate (no gate / attempts columns) reads with nulls that mean defaults."""
    old_schema = pa.schema([f for f in RESULT_SCHEMA if f.name not in ("gate", "attempts")])
    (tmp_path / "results").mkdir()
    pq.write_table(pa.Table.from_pylist([{"row_id": "old", "status": "ok", "images": ["a.png"], "clip_i": [50.0],
                                          "attempt": 1}], schema=old_schema),
                   tmp_path / "results" / "old.parquet")
    attempts = [GateAttempt(k=0, attempt=0, seed=7, image="x/attempts/0-0.png", clip_i=20.0, passed=False,
                            failed=["clip_i"]),
                GateAttempt(k=0, attempt=1, seed=8, image="x/0.png", clip_i=60.0, passed=True)]
    new = ResultRow(row_id="new", status="ok", images=["x/0.png"], clip_i=[60.0], attempt=2, gate="passed",
                    attempts=attempts)
    write_results([new], str(tmp_path / "results" / "new.parquet"))
    table = read_results(str(tmp_path / "results"))
    assert table.schema == RESULT_SCHEMA
    rows = {r["row_id"]: ResultRow.model_validate(r) for r in table.to_pylist()}
    assert (rows["old"].gate, rows["old"].attempts, rows["old"].attempt) == (None, [], 1)
    assert rows["new"].attempts == attempts and rows["new"].gate == "passed" and rows["new"].attempt == 2
    with pytest.raises(ValueError, match="attempt=1 but its attempts go up to index 1"):
        ResultRow(row_id="bad", status="ok", images=["x/0.png"], attempt=1, gate="passed", attempts=attempts)
    with pytest.raises(ValueError, match="passed=True but failed=\\['clip_i'\\]"):
        GateAttempt(k=0, attempt=0, seed=7, image="i.png", passed=True, failed=["clip_i"])


# ---- the gate in the worker ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def baseline(tiny_dir, tmp_path_factory):
    """No gate: the rows' attempt-0 images and their scores (the worker whose models the gated runs share)."""
    out = tmp_path_factory.mktemp("gate-baseline")
    worker = Worker(WorkerConfig(output=str(out), preset="tiny", device="cpu"))
    results = worker.process([r.model_dump() for r in gate_rows()])
    assert all(r.status == "ok" for r in results), [r.error for r in results]
    return worker, out, results


@pytest.fixture(scope="module")
def threshold(baseline) -> float:
    """Between the 3rd and 4th of the 6 attempt-0 CLIP-I scores: three images fall under it."""
    values = sorted(v for r in baseline[2] for v in r.clip_i)
    assert len(values) == 6 and values[2] < values[3], values
    return round((values[2] + values[3]) / 2, 4)


@pytest.fixture(scope="module")
def gated(baseline, threshold, tmp_path_factory):
    """The same rows under ``--min-clip-i threshold --max-attempts 2`` (the baseline's models, its calls recorded)."""
    worker, _, _ = baseline
    out = tmp_path_factory.mktemp("gate-run")
    pipe = RecordingPipe(worker.pipe)
    gate = GateSpec(thresholds={"clip_i": threshold}, max_attempts=MAX_ATTEMPTS)
    gated_worker = Worker(WorkerConfig(output=str(out), preset="tiny", device="cpu", gate=gate), pipe=pipe,
                          scorer=worker.scorer)
    results = gated_worker.process([r.model_dump() for r in gate_rows()])
    assert all(r.status == "ok" for r in results), [r.error for r in results]
    return out, results, pipe.calls


def test_exactly_the_images_under_the_threshold_are_regenerated(baseline, threshold, gated):
    _, base_out, base_results = baseline
    out, results, calls = gated
    under = {(r.row_id, k) for r in base_results for k, v in enumerate(r.clip_i) if v < threshold}
    assert len(under) == 3
    retried = {(r.row_id, a.k) for r in results for a in r.attempts if a.attempt >= 1}
    assert retried == under
    # exactly the rows with an image under the threshold used more than one attempt
    assert {r.row_id for r in results if r.attempt > 1} == {row_id for row_id, _ in under}
    # attempt 0 is today's generation: the same images (byte for byte) and scores as the run without a gate
    for r, b in zip(results, base_results):
        first = sorted((a for a in r.attempts if a.attempt == 0), key=lambda a: a.k)
        assert [a.clip_i for a in first] == b.clip_i
        for a, key in zip(first, b.images):
            assert (out / a.image).read_bytes() == (base_out / key).read_bytes()
            assert a.failed == (["clip_i"] if a.clip_i < threshold else []) and a.passed == (a.clip_i >= threshold)
    # the first pass denoised 4 + 2 images; the retries of the three rows denoised together, in one call
    retry_seeds = sorted(a.seed for r in results for a in r.attempts if a.attempt == 1)
    assert [len(c) for c in calls[:2]] == [4, 2] and len(calls) == 3
    assert sorted(calls[2]) == retry_seeds


def test_every_attempt_is_recorded_with_its_scheduled_seed(threshold, gated):
    out, results, _ = gated
    rows = {r.row_id: r for r in gate_rows()}
    for r in results:
        row = rows[r.row_id]
        assert [(a.k, a.attempt) for a in r.attempts] == sorted((a.k, a.attempt) for a in r.attempts)
        expected_files = []
        for k in range(row.num_images):
            tries = [a for a in r.attempts if a.k == k]
            assert [a.attempt for a in tries] == list(range(len(tries)))  # 0, 1, ... without gaps
            assert [a.seed for a in tries] == [row.seed + k + a * row.num_images for a in range(len(tries))]
            for a in tries:
                assert a.passed == (a.clip_i >= threshold) and a.failed == ([] if a.passed else ["clip_i"])
            # stop at the first pass, or at --max-attempts
            assert all(not a.passed for a in tries[:-1])
            assert tries[-1].passed or len(tries) == MAX_ATTEMPTS
            # the final image is the last attempt, at {k}.png; the rejected ones stay under attempts/
            final = tries[-1]
            assert final.image == r.images[k] == image_key(r.row_id, k) == f"images/{r.row_id}/{k}.png"
            assert r.clip_i[k] == final.clip_i and r.dino[k] == final.dino
            for a in tries[:-1]:
                assert a.image == image_key(r.row_id, k, a.attempt) == f"images/{r.row_id}/attempts/{k}-{a.attempt}.png"
            expected_files += [relative(str(out / a.image), out / "images" / r.row_id) for a in tries]
        assert files_under(out / "images" / r.row_id) == sorted(expected_files)
        assert r.attempt == max(a.attempt for a in r.attempts) + 1
        finals_passed = [next(a for a in r.attempts if a.image == uri).passed for uri in r.images]
        assert r.gate == ("passed" if all(finals_passed) else "failed")


def test_regenerated_images_equal_a_generation_at_the_recorded_seed(baseline, gated, tmp_path):
    """A retried image is the image of its seed: the same row made alone with that seed (no gate) gives it, up to
    one pixel level (another batch composition)."""
    worker, base_out, _ = baseline
    out, results, _ = gated
    rows = {r.row_id: r for r in gate_rows()}
    retried = [(r, a) for r in results for a in r.attempts if a.attempt >= 1]
    alone = worker.process([rows[r.row_id].model_copy(update={"row_id": f"alone-{i}", "seed": a.seed,
                                                              "num_images": 1}).model_dump()
                            for i, (r, a) in enumerate(retried)])
    for (r, a), single in zip(retried, alone):
        diff = np.abs(pixels(out / a.image) - pixels(base_out / single.images[0]))
        assert diff.max() <= 1, (r.row_id, a.k, a.attempt, diff.max())
        assert single.clip_i[0] == pytest.approx(a.clip_i, abs=0.5)


def test_max_attempts_stops_a_slot_that_never_passes(baseline, tmp_path):
    """A minimum no image reaches (CLIP-I 100: an exact copy of the subjects) makes max_attempts images per slot."""
    worker, _, _ = baseline
    row = gate_rows()[1]  # one image, seed 2100
    gate = GateSpec(thresholds={"clip_i": 100.0}, max_attempts=3)
    w = Worker(WorkerConfig(output=str(tmp_path), preset="tiny", device="cpu", gate=gate), pipe=worker.pipe,
               scorer=worker.scorer)
    (r,) = w.process([row.model_dump()])
    assert r.status == "ok" and r.gate == "failed" and r.attempt == 3
    assert [(a.attempt, a.seed, a.passed, a.failed) for a in r.attempts] == [
        (0, 2100, False, ["clip_i"]), (1, 2101, False, ["clip_i"]), (2, 2102, False, ["clip_i"])]
    assert files_under(tmp_path / "images" / row.row_id) == ["0.png", "attempts/0-0.png", "attempts/0-1.png"]
    assert r.images == [r.attempts[-1].image] and r.clip_i == [r.attempts[-1].clip_i]


def test_a_rerun_makes_the_same_images_and_records(threshold, gated, tmp_path):
    """A fresh worker (its own models and caches) on a new output folder: the same attempts, byte-identical images."""
    out, results, _ = gated
    gate = GateSpec(thresholds={"clip_i": threshold}, max_attempts=MAX_ATTEMPTS)
    fresh = Worker(WorkerConfig(output=str(tmp_path), preset="tiny", device="cpu", gate=gate))
    again = fresh.process([r.model_dump() for r in gate_rows()])

    for r, g in zip(results, again):
        assert g.attempts == r.attempts  # image keys are relative to the output root: the records are equal
        assert (g.gate, g.attempt, g.clip_i, g.dino) == (r.gate, r.attempt, r.clip_i, r.dino)
        assert files_under(tmp_path / "images" / g.row_id) == files_under(out / "images" / r.row_id)
        for a, b in zip(r.attempts, g.attempts):
            assert (out / a.image).read_bytes() == (tmp_path / b.image).read_bytes()


# ---- through the CLI on a local Ray ------------------------------------------------------------------------------
@pytest.mark.parametrize("args, words", [
    (["--min-clip-i", "nan"], "--min-clip-i must be a finite number"),
    (["--min-clip-i", "50", "--max-attempts", "0"], "--max-attempts must be an integer in [1, 20]"),
    (["--max-attempts", "3"], "--max-attempts 3 needs a threshold"),
    (["--min-dino", "50", "--no-metrics"], "needs metrics"),
])
def test_cli_rejects_a_bad_gate_before_anything_runs(runner, tmp_path, args, words):
    out = tmp_path / "out"
    result = invoke(runner, "batch", "submit", EXAMPLE, "--output", out, *args)
    assert result.exit_code == 2, result.output
    assert words in result.output
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.ray
def test_submit_with_a_gate_on_ray(ray_local, runner, baseline, threshold, gated, tmp_path):
    """``batch submit --min-clip-i T --max-attempts 2`` on a local Ray: the attempt record and run.json count the
    gate's outcome from the result rows, the results carry the rows they were made from (a bad row is rejected),
    the actor makes the same attempts as the worker above (same rows, same batches), and a resubmission skips
    every row while run.json still reports the whole run."""
    from manifests.ledger import ledger_records

    rows = gate_rows()
    bad = {**rows[0].model_dump(), "row_id": "gate-bad-box"}
    bad["subjects"] = [{**bad["subjects"][0], "box": [0.7, 0.1, 0.2, 0.9]}, bad["subjects"][1]]
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist([r.model_dump() for r in rows] + [bad], schema=MANIFEST_SCHEMA), manifest)
    out = tmp_path / "out"
    result = invoke(runner, "batch", "submit", manifest, "--output", out, "--actors", "1", "--min-clip-i",
                    threshold, "--max-attempts", MAX_ATTEMPTS, "--device", "cpu")
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    attempt = json.loads((out / "attempts" / "0001.json").read_text())
    results = [ResultRow.model_validate(r) for r in ledger_records(str(out))]
    attempts = {r.row_id: r.attempts for r in results}
    assert run["rows"] == {"read": 5, "ok": 4, "error": 0, "rejected": 1, "pending": 0}
    assert attempt["gate"] == {
        "thresholds": {"clip_i": threshold}, "max_attempts": MAX_ATTEMPTS,
        "passed": sum(r.gate == "passed" for r in results), "failed": sum(r.gate == "failed" for r in results),
        "attempts": sum(len(a) for a in attempts.values()),
        "extra_images": sum(len(attempts[r.row_id]) - len(r.images) for r in results),
    }
    assert attempt["gate"]["passed"] + attempt["gate"]["failed"] == 4 and attempt["gate"]["extra_images"] == 3
    assert run["gate"] == {"passed": attempt["gate"]["passed"], "failed": attempt["gate"]["failed"]}
    assert run["settings"]["gate"] == {"thresholds": {"clip_i": threshold}, "max_attempts": 2}
    assert f"gate: passed {attempt['gate']['passed']}" in result.output
    # each result carries the row it was made from, as the export and the report read it
    assert [GenerationRow.model_validate_json(r.request) for r in results] == rows  # sorted by row id, as rows
    assert read_table(str(out / "rejected.parquet")).column("row_id").to_pylist() == ["gate-bad-box"]
    # the same attempts as the worker run (the actor got the four rows in one call, as the worker did)
    by_id = {r.row_id: r for r in gated[1]}
    for r in results:
        assert [(a.k, a.attempt, a.seed, a.passed) for a in attempts[r.row_id]] == \
            [(a.k, a.attempt, a.seed, a.passed) for a in by_id[r.row_id].attempts]
    # status and the report show the gate
    status = json.loads(invoke(runner, "batch", "status", out).output)
    assert (status["gate_passed"], status["gate_failed"]) == (run["gate"]["passed"], run["gate"]["failed"])
    assert "gate passed" in (out / "report.html").read_text()
    # resume: every row has a result; nothing runs again, and run.json still describes the whole run
    again = invoke(runner, "batch", "submit", manifest, "--output", out, "--actors", "1", "--min-clip-i", threshold,
                   "--max-attempts", MAX_ATTEMPTS, "--device", "cpu")
    assert again.exit_code == 0, again.output
    second = json.loads((out / "attempts" / "0002.json").read_text())
    assert (second["counts"]["skipped"], second["counts"]["processed"], second["gate"]["attempts"]) == (4, 0, 0)
    assert json.loads((out / "run.json").read_text())["rows"] == run["rows"]
