"""The batch job end to end on a real local Ray: Ray Data reads and validates the manifest on the workers, the actor
pool generates, and every run keeps its word: an identity (settings fixed by the first submission), one writer at a
time (the lease), attempts with records, a ledger read one way by every reader, provenance, clean stops."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from manifests import storage
from manifests.io import (
    MANIFEST_SCHEMA,
    ManifestError,
    read_manifest,
    read_table,
    write_manifest,
)
from manifests.ledger import ledger_records, read_files, result_files

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "manifests" / "examples" / "example.parquet"
EXAMPLE_LORAS = ROOT / "manifests" / "examples" / "loras"
SUBJECTS = ROOT / "manifests" / "examples" / "subjects"
CLI = [sys.executable, str(ROOT / "cli.py")]


def example_rows():
    rows, rejected = read_manifest(str(EXAMPLE))
    assert not rejected
    return rows


def many_rows(n: int, steps: int = 4, prefix: str = "r", size: int | None = None):
    """``n`` rows cycling over the example rows, with new ids and seeds (and ``size`` x ``size`` pixels)."""
    base = example_rows()
    sized = {"width": size, "height": size} if size else {}
    return [base[i % len(base)].model_copy(update={"row_id": f"{prefix}-{i:03d}", "seed": 5000 + i, "steps": steps,
                                                   **sized})
            for i in range(n)]


def job(manifest, output, **kw):
    from batch.job import JobConfig

    kw.setdefault("loras", str(EXAMPLE_LORAS))
    return JobConfig(manifest=str(manifest), output=str(output), **kw)


def assert_complete(output: str, row_ids: list[str], expected_images: dict[str, int]) -> list[dict]:
    """Every row has exactly one final result in the ledger, status ok, and all its images as whole PNG files; no
    row has two results in one attempt; no partial files."""
    results = ledger_records(output)
    assert sorted(r["row_id"] for r in results) == sorted(row_ids)
    for r in results:
        assert r["status"] == "ok", r
        assert len(r["images"]) == expected_images[r["row_id"]]
        for k, uri in enumerate(r["images"]):
            assert uri == storage.join(output, "images", r["row_id"], f"{k}.png")
            Image.open(io.BytesIO(storage.read_bytes(uri))).verify()
    every = read_files(result_files(output), ["row_id", "attempt_id"]).to_pylist()
    pairs = [(r["row_id"], r["attempt_id"]) for r in every]
    assert len(pairs) == len(set(pairs)), "a row has two results in one attempt"
    fs, path = storage.filesystem(output)
    leftovers = [p for p in fs.find(path) if ".tmp-" in p]
    assert not leftovers, leftovers
    return results


def attempt_record(output, attempt_id: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(str(output), "attempts", f"{attempt_id}.json")))


def run_json(output) -> dict:
    return json.loads(storage.read_bytes(storage.join(str(output), "run.json")))


# ---- the main path --------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.ray
def test_example_manifest_on_two_actors(ray_local, tmp_path):
    import hashlib

    from batch.job import submit
    from dreamrelation.provenance import model_fingerprints

    rows = example_rows()
    assert len(rows) >= 16 and len({r.relation for r in rows if r.relation}) >= 3
    assert {len(r.subjects) for r in rows} == {1, 2, 3}
    out = tmp_path / "out"
    summary = submit(job(EXAMPLE, out, actors=2, batch_size=4))
    results = assert_complete(str(out), [r.row_id for r in rows], {r.row_id: r.num_images for r in rows})
    for r in results:
        for metric in ("clip_t", "clip_r", "clip_i", "clip_i_crop", "dino"):
            assert len(r[metric]) == len(r["images"])
            assert all(0.0 <= v <= 100.0 for v in r[metric])
    run, attempt = run_json(out), attempt_record(out, "0001")
    assert (summary["run"], summary["attempt"]) == (run, attempt)
    n_images = sum(r.num_images for r in rows)
    assert run["rows"] == {"read": len(rows), "ok": len(rows), "error": 0, "rejected": 0, "pending": 0}
    assert run["images"] == n_images and run["attempts"] == ["0001"] and run["status"] == "completed"
    assert attempt["counts"] == {"read": len(rows), "rejected": 0, "skipped": 0, "processed": len(rows),
                                 "ok": len(rows), "error": 0, "images": n_images}
    assert set(attempt["seconds_per_stage"]) >= {"generate", "load", "lora", "metrics", "write"}
    assert attempt["images_per_second"] > 0 and attempt["execution"]["actors"] == 2
    assert run["settings"]["manifest"] == str(EXAMPLE) and run["settings"]["preset"] == "tiny"
    assert read_table(str(out / "rejected.parquet")).num_rows == 0
    assert not (out / "lease.json").exists()  # released
    # provenance: the weights and the exact LoRA files, per row; the run records the fingerprints too
    fingerprints = model_fingerprints("tiny")
    assert run["fingerprints"] == fingerprints
    for r in results:
        assert (r["model_preset"], r["model_fingerprint"], r["adapter_fingerprint"]) == \
            ("tiny", fingerprints["model"], fingerprints["adapter"])
        if r["relation"]:
            lora = EXAMPLE_LORAS / r["relation"] / "pytorch_lora_weights.safetensors"
            assert r["lora_sha256"] == hashlib.sha256(lora.read_bytes()).hexdigest()
    # the files store keys relative to the run folder
    raw = read_files(result_files(str(out)), ["row_id", "images"]).to_pylist()
    assert all(k == f"images/{r['row_id']}/{i}.png" for r in raw for i, k in enumerate(r["images"]))

    # a second submission finds every row done: nothing runs, nothing is duplicated, run.json still has the run
    again = submit(job(EXAMPLE, out, actors=2, batch_size=4))
    assert again["attempt"]["counts"] == {"read": len(rows), "rejected": 0, "skipped": len(rows), "processed": 0,
                                          "ok": 0, "error": 0, "images": 0}
    assert again["run"]["rows"] == run["rows"] and again["run"]["images"] == n_images
    assert again["run"]["attempts"] == ["0001", "0002"]
    assert_complete(str(out), [r.row_id for r in rows], {r.row_id: r.num_images for r in rows})


@pytest.mark.slow
def test_bad_rows_are_rejected_with_reasons_and_row_numbers(ray_local, tmp_path):
    from batch.job import submit

    (tmp_path / "not-an-image.png").write_bytes(b"this is text, not an image")
    good = example_rows()[:3]
    dicts = [r.model_dump(mode="json") for r in good]
    template = dict(dicts[0], subjects=[dict(dicts[0]["subjects"][0])])

    def bad(row_id, **change):
        d = json.loads(json.dumps(template))
        d["row_id"] = row_id
        for key, value in change.items():
            if key.startswith("subject_"):
                d["subjects"][0][key.removeprefix("subject_")] = value
            else:
                d[key] = value
        return d

    bad_rows = [
        bad(good[0].row_id),  # duplicate row_id: row 3, first at row 0
        bad("box-outside", subject_box=[0.0, 0.1, 1.4, 0.9]),
        bad("box-reversed", subject_box=[0.7, 0.1, 0.2, 0.9]),
        bad("box-nan", subject_box=[0.0, float("nan"), 0.5, 0.9]),
        bad("missing-image", subject_image=str(tmp_path / "nope.png")),
        bad("not-image", subject_image=str(tmp_path / "not-an-image.png")),
        bad("unknown-relation", relation="juggling"),
        bad("empty-prompt", prompt="   "),
    ]
    table = pa.Table.from_pylist(dicts + bad_rows, schema=MANIFEST_SCHEMA)
    manifest = tmp_path / "bad.parquet"
    pq.write_table(table, manifest, row_group_size=4)  # several row groups: row numbers cross their borders
    out = tmp_path / "out"
    summary = submit(job(manifest, out, actors=1))
    counts = summary["attempt"]["counts"]
    assert (counts["read"], counts["rejected"], counts["processed"], counts["ok"]) == (11, 8, 3, 3)
    assert summary["run"]["rows"] == {"read": 11, "ok": 3, "error": 0, "rejected": 8, "pending": 0}
    rejected = read_table(str(out / "rejected.parquet")).to_pylist()
    assert [r["index"] for r in rejected] == list(range(3, 11))  # sorted by row number, each row once
    by_id = {r["row_id"]: r for r in rejected}
    assert by_id[good[0].row_id]["field"] == "row_id"
    assert by_id[good[0].row_id]["reason"] == "duplicate row_id (first at row 0)"
    assert by_id["box-outside"]["field"].startswith("subjects.0.box") and by_id["box-outside"]["index"] == 4
    assert by_id["box-reversed"]["field"].startswith("subjects.0.box")
    assert by_id["box-nan"]["field"].startswith("subjects.0.box")
    assert by_id["missing-image"]["field"] == "subjects.0.image" and "not found" in by_id["missing-image"]["reason"]
    assert by_id["not-image"]["field"] == "subjects.0.image"
    assert by_id["unknown-relation"]["field"] == "relation" and "juggling" in by_id["unknown-relation"]["reason"]
    assert by_id["empty-prompt"]["field"] == "prompt" and by_id["empty-prompt"]["index"] == 10
    assert_complete(str(out), [r.row_id for r in good], {r.row_id: r.num_images for r in good})

    # wrong types: a seed column of strings rejects every row, naming the field; no actor starts
    typed = pa.Table.from_pylist(dicts, schema=MANIFEST_SCHEMA)
    typed = typed.set_column(typed.schema.get_field_index("seed"), "seed", pa.array(["x1", "2", "abc"]))
    pq.write_table(typed, tmp_path / "types.parquet")
    summary = submit(job(tmp_path / "types.parquet", tmp_path / "out-types"))
    assert (summary["attempt"]["counts"]["processed"], summary["attempt"]["counts"]["rejected"]) == (0, 3)
    assert {r["field"] for r in read_table(str(tmp_path / "out-types" / "rejected.parquet")).to_pylist()} == {"seed"}


def test_bad_manifest_files_fail_before_anything_is_written(tmp_path, monkeypatch):
    import batch.job as job_module

    def no_run(*a, **k):
        raise AssertionError("a run started for a bad manifest")

    monkeypatch.setattr(job_module, "_attempt", no_run)
    (tmp_path / "m.parquet").write_text("row_id,prompt\n1,a dog\n")
    with pytest.raises(ManifestError, match="m.parquet"):
        job_module.submit(job(tmp_path / "m.parquet", tmp_path / "out"))
    pq.write_table(pa.table({"row_id": ["a"], "prompt_text": ["x"]}), tmp_path / "cols.parquet")
    with pytest.raises(ManifestError) as info:
        job_module.submit(job(tmp_path / "cols.parquet", tmp_path / "out"))
    assert "prompt" in str(info.value) and "subjects" in str(info.value)
    with pytest.raises(ManifestError, match="nope.parquet"):
        job_module.submit(job(tmp_path / "nope.parquet", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# ---- a run is a thing: settings, attempts, generations --------------------------------------------------------
def small_manifest(tmp_path: Path, n: int = 6, prefix: str = "s") -> Path:
    manifest = tmp_path / f"{prefix}.parquet"
    write_manifest(many_rows(n, steps=2, prefix=prefix, size=64), str(manifest))
    return manifest


@pytest.mark.slow
def test_a_run_refuses_other_settings_and_names_each_difference(ray_local, tmp_path, monkeypatch):
    """The first submission, from another folder with relative paths, records absolute URIs (result images resolve
    from anywhere); the same run spelled with absolute paths is the same run; other settings are refused."""
    from batch.job import submit
    from batch.worker import WorkerConfig
    from manifests.run_record import RunMismatch
    from manifests.schema import GateSpec

    manifest = small_manifest(tmp_path)
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    monkeypatch.chdir(out.parent)
    first = submit(job("../s.parquet", "out", batch_size=2, loras=os.path.relpath(EXAMPLE_LORAS, out.parent)))
    assert first["run"]["settings"]["manifest"] == str(manifest)
    assert first["run"]["settings"]["loras"] == str(EXAMPLE_LORAS) and first["run"]["output"] == str(out)
    monkeypatch.chdir(tmp_path)
    for r in ledger_records(str(out)):
        assert all(Path(u).is_absolute() and Path(u).is_file() for u in r["images"])
    before = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and p.name != "lease.json")
    gate = GateSpec(thresholds={"clip_i": 50.0})
    for config, words in [
        (job(manifest, out, batch_size=2, preset=str(ROOT / "nowhere")), ["preset"]),
        (job(manifest, out, batch_size=2, worker=WorkerConfig(output=str(out), gate=gate)), ["gate"]),
        (job(small_manifest(tmp_path, prefix="other"), out, batch_size=2), ["manifest"]),
        (job(manifest, out, batch_size=2, loras=None, worker=WorkerConfig(output=str(out), metrics=False)),
         ["loras", "metrics"]),
        (job(manifest, out, batch_size=2, new_attempt=True, worker=WorkerConfig(output=str(out), gate=gate)),
         ["gate", "new --output"]),  # --new-attempt never accepts settings that change images
    ]:
        with pytest.raises(RunMismatch) as info:
            submit(config)
        assert all(w in str(info.value) for w in words), (words, str(info.value))
    with pytest.raises(RunMismatch, match=r"batch_size: 2 in the run, 3 now.*--new-attempt"):
        submit(job(manifest, out, batch_size=3))
    after = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and p.name != "lease.json")
    assert after == before and run_json(out) == first["run"]  # nothing written by a refused submission
    assert not (out / "lease.json").exists()
    # other execution settings with --new-attempt: a new attempt, recorded with its own settings
    again = submit(job(manifest, out, batch_size=3, new_attempt=True))
    assert again["attempt"]["execution"]["batch_size"] == 3 and again["attempt"]["flags"]["new_attempt"]
    assert again["run"]["execution"]["batch_size"] == 3 and again["run"]["attempts"] == ["0001", "0002"]


@pytest.mark.slow
def test_errors_are_retried_only_when_asked_and_no_resume_starts_a_new_generation(ray_local, tmp_path):
    """A row whose subject image is missing (image checks off: a per-row error) stays an error on resume; with
    --retry-errors, after the image appears, it runs again and its new result is the ledger's. Then --no-resume
    starts a new generation of the whole run."""
    from batch.job import submit
    from batch.report import status

    rows = many_rows(4, steps=2, prefix="e", size=64)
    late = tmp_path / "late.png"
    rows[1] = rows[1].model_copy(update={"subjects": [rows[1].subjects[0].model_copy(update={"image": str(late)}),
                                                      *rows[1].subjects[1:]]})
    manifest = tmp_path / "m.parquet"
    write_manifest(rows, str(manifest))
    out = tmp_path / "out"
    first = submit(job(manifest, out, check_images=False))
    assert first["run"]["rows"] == {"read": 4, "ok": 3, "error": 1, "rejected": 0, "pending": 0}
    assert first["attempt"]["error_samples"][0][0] == rows[1].row_id
    late.write_bytes((SUBJECTS / Path(rows[0].subjects[0].image).name).read_bytes())
    resumed = submit(job(manifest, out, check_images=False))
    assert resumed["attempt"]["counts"]["processed"] == 0 and resumed["run"]["rows"]["error"] == 1
    retried = submit(job(manifest, out, check_images=False, retry_errors=True))
    assert retried["attempt"]["counts"]["processed"] == 1 and retried["attempt"]["counts"]["ok"] == 1
    assert retried["run"]["rows"] == {"read": 4, "ok": 4, "error": 0, "rejected": 0, "pending": 0}
    # both results of the row are kept, each under its attempt; every reader sees the latest
    every = read_files(result_files(str(out)), ["row_id", "status", "attempt_id"]).to_pylist()
    assert sorted((r["attempt_id"], r["status"]) for r in every if r["row_id"] == rows[1].row_id) == \
        [("0001", "error"), ("0003", "ok")]
    st = status(str(out))
    assert (st["ok"], st["error"], st["attempts"]) == (4, 0, 3)

    # --no-resume: a new generation that regenerates every row; the old one stays readable under its attempts
    fresh = submit(job(manifest, out, check_images=False, resume=False))
    assert fresh["attempt"]["generation"] == 1 and fresh["attempt"]["counts"]["processed"] == 4
    assert fresh["run"]["generation"] == 1 and fresh["run"]["rows"]["ok"] == 4
    records = ledger_records(str(out))
    assert len(records) == 4 and {r["attempt_id"] for r in records} == {"0004"}
    assert status(str(out))["rows_with_results"] == 4  # the old generation is not mixed in
    assert (out / "results" / "0001").is_dir()
    old = ledger_records(str(out), generation=0)
    assert {r["row_id"]: r["attempt_id"] for r in old} == {**{r.row_id: "0001" for r in rows}, rows[1].row_id: "0003"}
    # a resume of the new generation skips its rows
    assert submit(job(manifest, out, check_images=False))["attempt"]["counts"]["skipped"] == 4


def _count_results(out: Path) -> int:
    folder = out / "results"
    if not folder.is_dir():
        return 0
    return sum(pq.read_metadata(p).num_rows for p in folder.rglob("*.parquet"))


@pytest.mark.slow
def test_two_concurrent_submits_one_runs_the_other_refuses(ray_local, tmp_path):
    from batch.job import JobError, submit

    manifest = small_manifest(tmp_path, n=8)
    out = tmp_path / "out"
    outcome: dict = {}

    def first():
        outcome["first"] = submit(job(manifest, out, batch_size=2))

    thread = threading.Thread(target=first)
    thread.start()
    deadline = time.time() + 60
    while not (out / "lease.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(JobError) as info:
        submit(job(manifest, out, batch_size=2))
    lease = json.loads((out / "lease.json").read_text()) if (out / "lease.json").exists() else None
    thread.join(timeout=300)
    assert "is leased by owner" in str(info.value) and "--steal-lease" in str(info.value)
    assert lease is None or f"pid {lease['pid']}" in str(info.value)
    assert outcome["first"]["run"]["rows"]["ok"] == 8 and outcome["first"]["run"]["attempts"] == ["0001"]
    every = read_files(result_files(str(out)), ["row_id"]).to_pylist()
    assert len(every) == 8  # no row generated twice
    assert [p.name for p in (out / "attempts").glob("*.json")] == ["0001.json"]


def test_the_cli_refuses_a_leased_output_in_one_line(tmp_path):
    from manifests.lease import Lease

    out = tmp_path / "out"
    lease = Lease(str(out), "0007")
    lease.acquire()
    try:
        r = subprocess.run([*CLI, "batch", "submit", str(EXAMPLE), "--output", str(out)], capture_output=True,
                           text=True, timeout=120)
    finally:
        lease.release()
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the output root") and "owner 0007" in lines[0], r.stderr


# ---- stops: killed drivers and actors, Ctrl-C, storage outages ------------------------------------------------
def _wait_for_results(proc, out: Path, n: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while _count_results(out) < n and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be stopped"
    assert _count_results(out) >= n


def _cli_run(tmp_path: Path, prefix: str):
    """``batch submit`` of 24 small rows in a process of its own (its own Ray), one row per call, no metrics:
    (rows, manifest, output, the process)."""
    rows = many_rows(24, steps=8, prefix=prefix, size=64)
    manifest, out = tmp_path / "m.parquet", tmp_path / "out"
    write_manifest(rows, str(manifest))
    return rows, manifest, out, _cli_start(manifest, out)


def _cli_start(manifest: Path, out: Path) -> subprocess.Popen:
    cmd = [*CLI, "batch", "submit", str(manifest), "--output", str(out), "--loras", str(EXAMPLE_LORAS),
           "--actors", "1", "--batch-size", "1", "--no-metrics"]
    return subprocess.Popen(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _no_metrics(out):
    from batch.worker import WorkerConfig

    return WorkerConfig(output=str(out), metrics=False)


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_a_killed_driver_loses_nothing_and_the_run_resumes(ray_local, tmp_path):
    """One run, three drivers: Ctrl-C stops the first cleanly (exit 130, records written, its Ray gone); the second
    resumes and is SIGKILLed mid-run with its Ray (no records); the third, in-process, resumes and completes."""
    import psutil

    from batch.job import submit

    rows, manifest, out, proc = _cli_run(tmp_path, "stop")
    _wait_for_results(proc, out, 2)
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted: attempt 0001 stopped" in stderr and "Resume: submit the same command again" in stderr
    assert "Traceback" not in stderr
    record = attempt_record(out, "0001")
    assert record["status"] == "interrupted" and record["ended_at"] and record["counts"]["skipped"] is None
    run = run_json(out)
    done_at_stop = len(ledger_records(str(out)))
    assert run["status"] == "interrupted" and run["rows"]["ok"] == done_at_stop
    assert run["rows"]["ok"] + run["rows"]["pending"] == 24
    assert not (out / "lease.json").exists()
    time.sleep(2)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE], \
        "Ray processes of the job outlived it"

    proc = _cli_start(manifest, out)  # the same command resumes ...
    try:
        _wait_for_results(proc, out, done_at_stop + 2)
        children = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGKILL)  # ... and dies with the Ray it started, mid-run: no records written
    finally:
        proc.wait(timeout=60)
    _, alive = psutil.wait_procs(children, timeout=60)  # an actor outside the group may finish one more row
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], "Ray processes of the killed job live on"
    done_before = {r["row_id"] for r in ledger_records(str(out))}
    assert done_at_stop + 2 <= len(done_before) < 24
    assert attempt_record(out, "0002")["status"] == "running"  # it never got to say how it ended
    # the dead driver's lease does not block (its pid is gone); the same settings resume the run
    summary = submit(job(manifest, out, actors=1, batch_size=1, worker=_no_metrics(out)))
    assert summary["attempt"]["attempt_id"] == "0003"
    assert summary["attempt"]["counts"]["skipped"] == len(done_before)
    assert summary["attempt"]["counts"]["ok"] == 24 - len(done_before)
    assert summary["run"]["rows"]["ok"] == 24 and summary["run"]["status"] == "completed"
    assert_complete(str(out), [r.row_id for r in rows], {r.row_id: r.num_images for r in rows})


def _actor_pids() -> list[int]:
    """Processes of live generation actors (Ray titles them ``ray::MapWorker(MapBatches(GenerationActor))``)."""
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if "GenerationActor" in " ".join(p.info["cmdline"] or []):
            pids.append(p.info["pid"])
    return pids


@pytest.mark.slow
def test_an_actor_killed_mid_run_does_not_lose_rows(ray_local, tmp_path):
    from batch.job import submit

    rows = many_rows(16, steps=12, prefix="kill")
    manifest = tmp_path / "m.parquet"
    write_manifest(rows, str(manifest))
    out = tmp_path / "out"
    outcome: dict = {}

    def run():
        try:
            outcome["summary"] = submit(job(manifest, out, actors=2, batch_size=2))
        except BaseException as exc:  # surfaced below
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    killed = None
    deadline = time.time() + 240
    while killed is None and thread.is_alive() and time.time() < deadline:
        if _count_results(out) >= 2:
            pids = _actor_pids()
            if pids:
                killed = pids[0]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    thread.join(timeout=300)
    assert "error" not in outcome, outcome.get("error")
    assert killed is not None, "no actor was killed: the run ended first"
    assert outcome["summary"]["run"]["rows"]["ok"] == 16
    assert_complete(str(out), [r.row_id for r in rows], {r.row_id: r.num_images for r in rows})


def test_an_unreachable_store_is_one_line(tmp_path):
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "AKIACANARY", "AWS_SECRET_ACCESS_KEY": "canary-secret",
           "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1", "AWS_EC2_METADATA_DISABLED": "true"}
    r = subprocess.run([*CLI, "batch", "submit", str(EXAMPLE), "--output", "s3://bucket/run"], capture_output=True,
                       text=True, env=env, timeout=180)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: cannot write to output s3://bucket/run") and "127.0.0.1:9" in lines[0]
    assert "canary-secret" not in r.stderr + r.stdout
    debug = subprocess.run([*CLI, "--debug", "batch", "submit", str(EXAMPLE), "--output", "s3://bucket/run"],
                           capture_output=True, text=True, env=env, timeout=180)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


# ---- object storage -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_s3_end_to_end(ray_local, s3_bucket):
    """Manifest, subject images, LoRAs and outputs all in a bucket of a local S3 server; a resubmission resumes."""
    from batch.job import submit
    from manifests.registry import LoRARegistry

    for image in SUBJECTS.glob("*.png"):
        storage.write_bytes_atomic(storage.join(s3_bucket, "assets", "subjects", image.name), image.read_bytes())
    registry = LoRARegistry(storage.join(s3_bucket, "loras"))
    for relation in ("hugging", "shaking_hands", "riding"):
        registry.register(relation, str(EXAMPLE_LORAS / relation / "pytorch_lora_weights.safetensors"))
    rows = []
    for r in example_rows()[:8]:
        subjects = [s.model_copy(update={"image": "subjects/" + Path(s.image).name}) for s in r.subjects]
        rows.append(r.model_copy(update={"subjects": subjects}))  # relative to the manifest's folder
    manifest = storage.join(s3_bucket, "assets", "manifest.parquet")
    write_manifest(rows, manifest)
    out = storage.join(s3_bucket, "runs", "one")
    summary = submit(job(manifest, out, loras=storage.join(s3_bucket, "loras"), actors=1, batch_size=4))
    assert summary["run"]["rows"] == {"read": 8, "ok": 8, "error": 0, "rejected": 0, "pending": 0}
    assert_complete(out, [r.row_id for r in rows], {r.row_id: r.num_images for r in rows})
    assert run_json(out)["rows"]["ok"] == 8
    assert storage.exists(storage.join(out, "rejected.parquet"))
    assert not storage.exists(storage.join(out, "lease.json"))
    again = submit(job(manifest, out, loras=storage.join(s3_bucket, "loras"), actors=1, batch_size=4))
    assert again["attempt"]["counts"]["skipped"] == 8 and again["run"]["rows"]["ok"] == 8
