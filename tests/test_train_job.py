"""Parallel relation fine-tuning on a real local Ray (one Tune trial per relation), LoRAs registered in S3."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from conftest import make_subject
from manifests import storage

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
RELATIONS = ("hugging", "shaking_hands", "riding")


def write_synthetic_triplets(root: str, relations=RELATIONS, per_relation: int = 2) -> None:
    """A triplet dataset on any fsspec root: coloured-blob images, two subjects, boxes and 17 keypoints each."""
    from manifests.triplets import write_triplets

    rng = np.random.default_rng(0)
    records = []
    for r, relation in enumerate(relations):
        for i in range(per_relation):
            tid = f"{relation}-{i}"

            def put(name: str, seed: int) -> str:
                buf = io.BytesIO()
                make_subject(seed, size=64).save(buf, format="PNG")
                uri = storage.join(root, "images", tid, name)
                storage.write_bytes_atomic(uri, buf.getvalue())
                return uri

            boxes = [[0.05, 0.2, 0.5, 0.9], [0.5, 0.2, 0.95, 0.9]]
            subjects = []
            for j, box in enumerate(boxes):
                kp_t = np.column_stack([rng.uniform(box[0], box[2], 17), rng.uniform(box[1], box[3], 17)])
                subjects.append({"image": put(f"subject{j}.png", 1000 * r + 10 * i + j), "phrase": ["dog", "cat"][j],
                                 "box": box, "mask": None, "target_keypoints": kp_t.tolist(),
                                 "subject_keypoints": rng.uniform(0.1, 0.9, (17, 2)).tolist(),
                                 "target_visibility": None, "subject_visibility": None})
            records.append({"triplet_id": tid, "relation": relation, "target": put("target.png", 5000 + 10 * r + i),
                            "prompt": f"a dog is {relation.replace('_', ' ')} a cat",
                            "relation_phrase": relation.replace("_", " "), "subjects": subjects, "source": "test",
                            "metadata": {}})
    write_triplets(records, root)


def _scratch_folders(config, ranks=(None,)) -> list[str]:
    """The local scratch folders of the run's trials still on disk."""
    import glob
    import tempfile

    from cluster.train_job import scratch_prefix

    config = config.absolute()
    return [f for relation in config.relations for rank in ranks
            for f in glob.glob(f"{tempfile.gettempdir()}/{scratch_prefix(config, relation, rank)}*")]


@pytest.mark.slow
def test_three_relations_train_in_parallel_trials_and_batch_uses_them(ray_local, s3_bucket, tmp_path, monkeypatch):
    import json

    import cluster.train_job as tj
    from batch.job import JobConfig, submit
    from cluster.train_job import TrainJobConfig, run
    from manifests.io import read_manifest, write_manifest
    from manifests.registry import LoRARegistry
    from manifests.run_record import RunMismatch

    data = storage.join(s3_bucket, "triplets")
    write_synthetic_triplets(data)
    loras = storage.join(s3_bucket, "loras")
    config = TrainJobConfig(data=data, relations=RELATIONS, output=storage.join(s3_bucket, "train"), loras=loras,
                            preset="tiny", steps=4, batch_size=1, checkpoint_every=2, max_failures=2,
                            fail_once=("shaking_hands",), name="test-run")
    summary = run(config)
    assert set(summary) == set(RELATIONS)
    assert all(s["status"] == "ok" for s in summary.values()), summary
    registry = LoRARegistry(loras)
    assert registry.relations() == sorted(RELATIONS)
    for relation in RELATIONS:
        assert summary[relation]["lora_uri"] == registry.uri(relation)
        card = registry.card(relation)
        assert card["relation"] == relation and card["steps"] == 4
    # the injected failure happened once, and the retried trial resumed from its checkpoint and finished
    assert storage.exists(storage.join(config.output, "test-run", "_faults", "shaking_hands"))
    assert registry.card("shaking_hands")["final_losses"]["step"] == 4
    assert summary["shaking_hands"]["final"]["resumed_from"] == 2
    assert summary["hugging"]["final"]["resumed_from"] == 0

    # the run folder on S3: settings and status, every step's losses, a loss curve each, the newest checkpoint only
    run_dir = storage.join(config.output, "test-run")
    record = json.loads(storage.read_bytes(storage.join(run_dir, "train.json")))
    assert record["status"] == "finished" and record["settings"]["steps"] == 4
    assert record["settings"]["relations"] == sorted(RELATIONS) and record["settings"]["loras"] == loras
    rows = [json.loads(line) for line in storage.read_bytes(storage.join(run_dir, "metrics.jsonl")).splitlines()]
    assert sorted((r["relation"], r["step"]) for r in rows) == [(rel, s) for rel in sorted(RELATIONS)
                                                                  for s in (1, 2, 3, 4)]
    for row in rows:
        assert {"loss", "denoise", "kml", "attention"} <= set(row) and all(
            isinstance(row[k], float) for k in ("loss", "denoise", "kml", "attention")), row
    last = {r["relation"]: r for r in rows if r["step"] == 4}
    for relation in RELATIONS:
        assert summary[relation]["final"]["loss"] == pytest.approx(last[relation]["loss"])
        assert summary[relation]["loss_curve"] == storage.join(run_dir, f"loss-{relation}.png")
        assert storage.read_bytes(summary[relation]["loss_curve"]).startswith(b"\x89PNG")
        assert [u.rsplit("/", 1)[-1] for u in storage.list_files(storage.join(run_dir, "checkpoints", relation))] \
            == ["step-000004.pt"]
    assert _scratch_folders(config) == []  # removed when each trial ended, the failed attempt's too

    # the same name again: nothing to train and no Ray needed; other settings: refused, naming each difference
    monkeypatch.setattr(tj, "_init_ray", lambda address: (_ for _ in ()).throw(AssertionError("Ray started")))
    again = run(config)
    assert {r: (s["status"], s["lora_uri"]) for r, s in again.items()} == {
        r: ("done", registry.uri(r)) for r in RELATIONS}
    with pytest.raises(RunMismatch) as err:
        run(TrainJobConfig(**{**config.__dict__, "steps": 6, "profile": "public-code"}))
    assert "profile: 'paper' in the run, 'public-code' now; steps: 4 in the run, 6 now" in str(err.value)
    assert "--name" in str(err.value) and "\n" not in str(err.value)

    # batch submit uses the new LoRAs by relation id (rows of an unknown relation would be rejected)
    rows, _ = read_manifest(str(ROOT / "manifests" / "examples" / "example.parquet"))
    picked = [r for r in rows if r.relation in RELATIONS][:6]
    manifest = tmp_path / "m.parquet"
    write_manifest(picked, str(manifest))
    result = submit(JobConfig(manifest=str(manifest), output=str(tmp_path / "out"), loras=loras, actors=1,
                              batch_size=3))
    counts = result["attempt"]["counts"]
    assert (counts["rejected"], counts["ok"]) == (0, len(picked))
    assert result["attempt"]["cache"]["lora_hit_rate"] is not None


@pytest.mark.slow
def test_one_relation_on_two_ddp_workers(ray_local, tmp_path):
    import json

    from cluster.train_job import TrainJobConfig, run
    from manifests.registry import LoRARegistry

    data = str(tmp_path / "data")
    write_synthetic_triplets(data, relations=("hugging",))
    config = TrainJobConfig(data=data, relations=("hugging",), output=str(tmp_path / "train"), preset="tiny",
                            steps=2, batch_size=1, checkpoint_every=1, workers_per_relation=2, name="ddp")
    summary = run(config)
    assert summary["hugging"]["status"] == "ok", summary
    assert LoRARegistry(config.registry_root()).card("hugging")["steps"] == 2
    # rank 0 recorded the steps (once each) and the curve was drawn; every rank's scratch folder is gone
    metrics = (tmp_path / "train" / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2]
    assert (tmp_path / "train" / "ddp" / "loss-hugging.png").read_bytes().startswith(b"\x89PNG")
    assert _scratch_folders(config, ranks=(0, 1)) == []


def test_unknown_relation_fails_before_ray_starts(tmp_path, monkeypatch):
    import cluster.train_job as tj

    write_synthetic_triplets(str(tmp_path / "data"), relations=("hugging",), per_relation=1)
    monkeypatch.setattr(tj, "_init_ray", lambda address: (_ for _ in ()).throw(AssertionError("Ray started")))
    with pytest.raises(ValueError, match="no valid triplets for relation 'dancing'"):
        tj.run(tj.TrainJobConfig(data=str(tmp_path / "data"), relations=("hugging", "dancing")))


@pytest.mark.slow
def test_a_killed_driver_is_resumed_by_rerunning_the_same_command(ray_local, tmp_path):
    """The run name is stable: rerunning after the driver was killed restores the Tune run and finishes it, each
    relation from its newest checkpoint on storage."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from cluster.train_job import TrainJobConfig, run

    data = str(tmp_path / "data")
    write_synthetic_triplets(data, relations=("hugging", "riding"))
    out = tmp_path / "train"
    steps = 80  # enough that the run is still going when both relations pass step 10
    args = ["--relations", "hugging,riding", "--output", str(out), "--steps", str(steps), "--batch-size", "1",
            "--checkpoint-every", "5", "--name", "crash"]
    # Tune saves its run state (which checkpoints it knows) once at the start and then not for 10 minutes: the
    # rerun must find the newer checkpoints on storage by itself
    env = dict(os.environ, TUNE_GLOBAL_CHECKPOINT_S="600")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "train", "relations", data, *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def newest() -> dict[str, int]:
        return {p.parent.name: max(int(f.stem.split("-")[1]) for f in p.parent.glob("step-*.pt"))
                for p in out.glob("crash/checkpoints/*/step-*.pt")}

    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not (
                len(newest()) == 2 and min(newest().values()) >= 10):  # both relations past step 10
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    time.sleep(2)
    at_kill = newest()
    assert set(at_kill) == {"hugging", "riding"} and min(at_kill.values()) >= 10, at_kill
    assert not (out / "loras" / "hugging").exists() and not (out / "loras" / "riding").exists()
    config = TrainJobConfig(data=data, relations=("hugging", "riding"), output=str(out), steps=steps, batch_size=1,
                            checkpoint_every=5, name="crash")
    assert len(_scratch_folders(config)) == 2  # the killed trials could not remove theirs
    summary = run(config)
    assert all(s["status"] == "ok" for s in summary.values()), summary
    assert _scratch_folders(config) == []  # the new attempts removed them, then their own
    assert {r: s["final"]["resumed_from"] for r, s in summary.items()} == at_kill
    # metrics.jsonl: every step once, those before the kill included
    rows = [json.loads(line) for line in (out / "crash" / "metrics.jsonl").read_text().splitlines()]
    assert sorted((r["relation"], r["step"]) for r in rows) == [(rel, s) for rel in ("hugging", "riding")
                                                                  for s in range(1, steps + 1)]


# ------------------------------------------------------------------------------- the run folder, without Ray

def _no_ray(monkeypatch) -> None:
    import cluster.train_job as tj

    monkeypatch.setattr(tj, "_init_ray", lambda address: (_ for _ in ()).throw(AssertionError("Ray started")))


def test_user_paths_become_absolute_and_settings_ignore_where_it_runs(tmp_path, monkeypatch):
    from dataclasses import replace

    from cluster.train_job import TrainJobConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "enc").mkdir()
    config = TrainJobConfig(data="out/engine", relations=("riding", "hugging"), output="out/train/",
                            loras="out/loras", preset="models/mine", local_encoder="enc").absolute()
    assert (config.data, config.output, config.loras, config.preset, config.local_encoder) == (
        f"{tmp_path}/out/engine", f"{tmp_path}/out/train", f"{tmp_path}/out/loras", f"{tmp_path}/models/mine",
        f"{tmp_path}/enc")
    assert config.absolute() == config
    url = TrainJobConfig(data="s3://b/t", relations=("hugging",), output="s3://b/train",
                         local_encoder="owner/repo/epoch_6.pt").absolute()  # a hub file, not a local path
    assert (url.data, url.output, url.preset, url.local_encoder, url.registry_root()) == (
        "s3://b/t", "s3://b/train", "tiny", "owner/repo/epoch_6.pt", "s3://b/train/loras")
    # where and how it runs, or the order of the relations, are not settings
    moved = replace(config, relations=("hugging", "riding"), gpus_per_trial=1.0, max_failures=5, address="auto")
    assert moved.settings() == config.settings()
    assert config.settings()["loras"] == f"{tmp_path}/out/loras" and config.settings()["resolution"] == 1024


def test_a_used_run_name_is_reported_or_refused_before_ray_starts(tmp_path, monkeypatch):
    from dataclasses import replace

    from safetensors.numpy import save

    import cluster.train_job as tj
    from manifests.registry import LoRARegistry
    from manifests.run_record import RunMismatch

    _no_ray(monkeypatch)
    data = str(tmp_path / "data")
    write_synthetic_triplets(data, relations=("hugging",), per_relation=1)
    config = tj.TrainJobConfig(data=data, relations=("hugging",), output=str(tmp_path / "train"), steps=4, name="r1")
    tj._write_run(config, tj.TrainRun(name="r1", settings=config.settings(), status="finished"))
    registry = LoRARegistry(config.registry_root())
    uri = registry.register("hugging", save({"unet.lora_A.weight": np.zeros((1, 1), np.float32)}))

    # finished, same settings: its LoRA, nothing trained
    assert tj.run(config) == {"hugging": {"status": "done", "error": None, "lora_uri": uri, "loss_curve": None,
                                          "final": {}}}
    # other settings: refused, one line naming each difference and how to start another run
    with pytest.raises(RunMismatch) as err:
        tj.run(replace(config, steps=5, loras=str(tmp_path / "other")))
    message = str(err.value)
    assert f"loras: '{tmp_path}/train/loras' in the run, '{tmp_path}/other' now; steps: 4 in the run, 5 now" \
        in message and "pass another --name" in message and "\n" not in message
    # its LoRA removed from the registry since: an error that says so
    (tmp_path / "train" / "loras" / "hugging" / "pytorch_lora_weights.safetensors").unlink()
    gone = tj.run(config)["hugging"]
    assert gone["status"] == "error" and "no longer holds its LoRA" in gone["error"]
    # unfinished: it is resumed (Ray starts)
    tj._write_run(config, tj.TrainRun(name="r1", settings=config.settings(), status="running"))
    with pytest.raises(AssertionError, match="Ray started"):
        tj.run(config)
    # an unreadable train.json, a bad name
    (tmp_path / "train" / "r1" / "train.json").write_text("{")
    with pytest.raises(ValueError, match="train.json of this version"):
        tj.run(config)
    with pytest.raises(ValueError, match="name must be a run name without '/', got 'a/b'"):
        tj.run(replace(config, name="a/b"))


def test_checkpoints_on_storage_keep_the_newest_and_a_trial_resumes_from_it(tmp_path):
    import cluster.train_job as tj

    config = tj.TrainJobConfig(data="d", relations=("hugging",), output=str(tmp_path / "train"), name="r")
    local = tmp_path / "work" / "checkpoints"
    local.mkdir(parents=True)
    assert tj.newest_checkpoint(config, "hugging") is None
    for step in (5, 10):
        (local / f"step-{step:06d}.pt").write_bytes(f"state {step}".encode())
        tj._save_checkpoint(config, "hugging", local / f"step-{step:06d}.pt")
    folder = tmp_path / "train" / "r" / "checkpoints" / "hugging"
    assert sorted(p.name for p in folder.iterdir()) == ["step-000010.pt"]
    assert tj.newest_checkpoint(config, "hugging") == str(folder / "step-000010.pt")

    scratch = tmp_path / "scratch"
    assert tj._restore_checkpoint(config, "hugging", scratch) == 10
    assert (scratch / "checkpoints" / "step-000010.pt").read_bytes() == b"state 10"
    assert tj._restore_checkpoint(config, "riding", tmp_path / "none") == 0


def test_metrics_log_rewrites_one_file_and_a_rerun_continues_it(tmp_path):
    import json

    from cluster.train_job import MetricsLog, plot_losses

    uri = str(tmp_path / "run" / "metrics.jsonl")
    log = MetricsLog(uri, every_s=3600)
    for step in (1, 2, 3):
        log.add({"relation": "hugging", "step": step, "loss": 1.0 / step, "denoise": 0.9 / step, "kml": 2.0,
                 "attention": 0.0}, checkpoint=step == 2)
    log.add({"relation": "riding", "step": 1, "loss": 0.5, "denoise": 0.5, "kml": 1.0, "attention": 0.0})
    written = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["relation"], r["step"]) for r in written] == [("hugging", 1), ("hugging", 2)]  # up to the checkpoint
    assert log.progress() == ({"hugging": 3, "riding": 1}, log.rows[("riding", 1)])
    log.flush()

    again = MetricsLog(uri)  # a rerun resumed hugging from step 2: step 3 is trained again and replaces its line
    assert again.progress()[0] == {"hugging": 3, "riding": 1}
    again.add({"relation": "hugging", "step": 3, "loss": 0.25, "denoise": 0.2, "kml": 2.0, "attention": 0.0})
    again.flush()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["relation"], r["step"], r["loss"]) for r in rows] == [
        ("hugging", 1, 1.0), ("hugging", 2, 0.5), ("hugging", 3, 0.25), ("riding", 1, 0.5)]
    assert [r["step"] for r in again.history("hugging")] == [1, 2, 3]
    png = plot_losses(again.history("hugging"), "hugging")
    assert png.startswith(b"\x89PNG") and len(png) > 5000
