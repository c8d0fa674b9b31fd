"""The batch job end to end on a real local Ray: actor pool, rejections, resume, a killed actor, S3 storage."""

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
from manifests.io import ManifestError, read_manifest, read_results, read_table, write_manifest

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "manifests" / "examples" / "example.parquet"
EXAMPLE_LORAS = ROOT / "manifests" / "examples" / "loras"
SUBJECTS = ROOT / "manifests" / "examples" / "subjects"


def example_rows():
    rows, rejected = read_manifest(str(EXAMPLE))
    assert not rejected
    return rows


def many_rows(n: int, steps: int = 4, prefix: str = "r"):
    """``n`` rows cycling over the example rows, with new ids and seeds."""
    base = example_rows()
    return [base[i % len(base)].model_copy(update={"row_id": f"{prefix}-{i:03d}", "seed": 5000 + i, "steps": steps})
            for i in range(n)]


def job(manifest, output, **kw):
    from batch.job import JobConfig

    kw.setdefault("loras", str(EXAMPLE_LORAS))
    return JobConfig(manifest=str(manifest), output=str(output), **kw)


def assert_complete(output: str, row_ids: list[str], expected_images: dict[str, int]) -> list[dict]:
    """Every row has exactly one result, status ok, and all its images as whole PNG files; no partial files."""
    results = read_results(storage.join(output, "results")).to_pylist()
    ids = [r["row_id"] for r in results]
    assert len(ids) == len(set(ids)), "a row has two results"
    assert sorted(ids) == sorted(row_ids)
    for r in results:
        assert r["status"] == "ok", r
        assert len(r["images"]) == expected_images[r["row_id"]]
        for k, uri in enumerate(r["images"]):
            assert uri == storage.join(output, "images", r["row_id"], f"{k}.png")
            Image.open(io.BytesIO(storage.read_bytes(uri))).verify()
    fs, path = storage.filesystem(output)
    leftovers = [p for p in fs.find(path) if ".tmp-" in p]
    assert not leftovers, leftovers
    return results


def test_example_manifest_on_two_actors(ray_local, tmp_path):
    from batch.job import submit

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
    run = json.loads((out / "run.json").read_text())
    assert run == summary
    assert run["read"] == run["accepted"] + run["rejected"] == len(rows)
    assert run["ok"] + run["error"] + run["skipped"] == run["accepted"]
    assert run["images"] == sum(r.num_images for r in rows)
    assert run["configuration"]["actors"] == 2
    assert set(run["seconds_per_stage"]) >= {"generate", "load", "lora", "metrics", "write"}
    assert run["images_per_second"] > 0
    assert read_table(str(out / "rejected.parquet")).num_rows == 0

    # a second submission finds every row done: nothing runs, nothing is duplicated
    again = submit(job(EXAMPLE, out, actors=2, batch_size=4))
    assert (again["skipped"], again["ok"], again["error"]) == (len(rows), 0, 0)
    assert_complete(str(out), [r.row_id for r in rows], {r.row_id: r.num_images for r in rows})


def test_bad_rows_are_rejected_with_reasons_and_the_rest_completes(ray_local, tmp_path):
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
        bad(good[0].row_id),  # duplicate row_id
        bad("box-outside", subject_box=[0.0, 0.1, 1.4, 0.9]),
        bad("box-reversed", subject_box=[0.7, 0.1, 0.2, 0.9]),
        bad("box-nan", subject_box=[0.0, float("nan"), 0.5, 0.9]),
        bad("missing-image", subject_image=str(tmp_path / "nope.png")),
        bad("not-image", subject_image=str(tmp_path / "not-an-image.png")),
        bad("unknown-relation", relation="juggling"),
        bad("empty-prompt", prompt="   "),
    ]
    from manifests.io import MANIFEST_SCHEMA

    table = pa.Table.from_pylist(dicts + bad_rows, schema=MANIFEST_SCHEMA)
    manifest = tmp_path / "bad.parquet"
    pq.write_table(table, manifest)
    out = tmp_path / "out"
    summary = submit(job(manifest, out, actors=1))
    assert (summary["read"], summary["accepted"], summary["rejected"]) == (11, 3, 8)
    assert summary["ok"] == 3
    rejected = {(r["row_id"], r["field"]): r["reason"] for r in read_table(str(out / "rejected.parquet")).to_pylist()}
    fields = {row_id: field for row_id, field in rejected}
    assert fields[good[0].row_id] == "row_id" and "duplicate" in rejected[(good[0].row_id, "row_id")]
    assert fields["box-outside"].startswith("subjects.0.box")
    assert fields["box-reversed"].startswith("subjects.0.box")
    assert fields["box-nan"].startswith("subjects.0.box")
    assert fields["missing-image"] == "subjects.0.image" and "not found" in rejected[("missing-image", "subjects.0.image")]
    assert fields["not-image"] == "subjects.0.image"
    assert fields["unknown-relation"] == "relation" and "juggling" in rejected[("unknown-relation", "relation")]
    assert fields["empty-prompt"] == "prompt"
    assert_complete(str(out), [r.row_id for r in good], {r.row_id: r.num_images for r in good})

    # wrong types: a seed column of strings rejects every row, naming the field; no actor starts
    typed = pa.Table.from_pylist(dicts, schema=MANIFEST_SCHEMA)
    typed = typed.set_column(typed.schema.get_field_index("seed"), "seed", pa.array(["x1", "2", "abc"]))
    pq.write_table(typed, tmp_path / "types.parquet")
    summary = submit(job(tmp_path / "types.parquet", tmp_path / "out-types"))
    assert (summary["accepted"], summary["rejected"]) == (0, 3)
    assert {r["field"] for r in read_table(str(tmp_path / "out-types" / "rejected.parquet")).to_pylist()} == {"seed"}


def test_bad_manifest_files_fail_before_any_model_loads(tmp_path, monkeypatch):
    import batch.job as job_module

    def no_actors(*a, **k):
        raise AssertionError("actors started for a bad manifest")

    monkeypatch.setattr(job_module, "_run_actors", no_actors)
    (tmp_path / "m.parquet").write_text("row_id,prompt\n1,a dog\n")
    with pytest.raises(ManifestError, match="m.parquet"):
        job_module.submit(job(tmp_path / "m.parquet", tmp_path / "out"))
    pq.write_table(pa.table({"row_id": ["a"], "prompt_text": ["x"]}), tmp_path / "cols.parquet")
    with pytest.raises(ManifestError) as info:
        job_module.submit(job(tmp_path / "cols.parquet", tmp_path / "out"))
    assert "prompt" in str(info.value) and "subjects" in str(info.value)
    with pytest.raises(ManifestError, match="nope.parquet"):
        job_module.submit(job(tmp_path / "nope.parquet", tmp_path / "out"))


def _count_results(out: Path) -> int:
    folder = out / "results"
    if not folder.is_dir():
        return 0
    return sum(pq.read_metadata(p).num_rows for p in folder.glob("*.parquet"))


def test_resume_after_the_driver_is_killed(ray_local, tmp_path):
    from batch.job import submit

    rows = many_rows(16, steps=12, prefix="resume")
    manifest = tmp_path / "m.parquet"
    write_manifest(rows, str(manifest))
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(ROOT / "cli.py"), "batch", "submit", str(manifest), "--output", str(out),
           "--loras", str(EXAMPLE_LORAS), "--actors", "1", "--batch-size", "2", "--no-metrics"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while _count_results(out) < 4 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, "the first run finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, mid-run
    finally:
        proc.wait(timeout=60)
    done_before = {r["row_id"] for r in read_results(str(out / "results")).to_pylist()}
    assert 4 <= len(done_before) < 16
    summary = submit(job(manifest, out, actors=1, batch_size=2))
    assert summary["skipped"] == len(done_before)
    assert summary["ok"] == 16 - len(done_before)
    assert_complete(str(out), [r.row_id for r in rows], {r.row_id: r.num_images for r in rows})


def _actor_pids() -> list[int]:
    """Processes of live generation actors (Ray titles them ``ray::MapWorker(MapBatches(GenerationActor))``)."""
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if "GenerationActor" in " ".join(p.info["cmdline"] or []):
            pids.append(p.info["pid"])
    return pids


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
    assert outcome["summary"]["ok"] == 16
    assert_complete(str(out), [r.row_id for r in rows], {r.row_id: r.num_images for r in rows})


def test_s3_end_to_end(ray_local, s3_bucket):
    """Manifest, subject images, LoRAs and outputs all in a bucket of a local S3 server."""
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
    assert (summary["accepted"], summary["ok"]) == (8, 8)
    assert_complete(out, [r.row_id for r in rows], {r.row_id: r.num_images for r in rows})
    assert json.loads(storage.read_bytes(storage.join(out, "run.json")))["ok"] == 8
    assert storage.exists(storage.join(out, "rejected.parquet"))
