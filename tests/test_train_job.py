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


@pytest.mark.slow
def test_three_relations_train_in_parallel_trials_and_batch_uses_them(ray_local, s3_bucket, tmp_path):
    from batch.job import JobConfig, submit
    from cluster.train_job import TrainJobConfig, run
    from manifests.io import read_manifest, write_manifest
    from manifests.registry import LoRARegistry

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
    from cluster.train_job import TrainJobConfig, run
    from manifests.registry import LoRARegistry

    data = str(tmp_path / "data")
    write_synthetic_triplets(data, relations=("hugging",))
    config = TrainJobConfig(data=data, relations=("hugging",), output=str(tmp_path / "train"), preset="tiny",
                            steps=2, batch_size=1, checkpoint_every=1, workers_per_relation=2, name="ddp")
    summary = run(config)
    assert summary["hugging"]["status"] == "ok", summary
    assert LoRARegistry(config.registry_root()).card("hugging")["steps"] == 2


def test_unknown_relation_fails_before_ray_starts(tmp_path, monkeypatch):
    import cluster.train_job as tj

    write_synthetic_triplets(str(tmp_path / "data"), relations=("hugging",), per_relation=1)
    monkeypatch.setattr(tj, "_init_ray", lambda address: (_ for _ in ()).throw(AssertionError("Ray started")))
    with pytest.raises(ValueError, match="no valid triplets for relation 'dancing'"):
        tj.run(tj.TrainJobConfig(data=str(tmp_path / "data"), relations=("hugging", "dancing")))


@pytest.mark.slow
def test_a_killed_driver_is_resumed_by_rerunning_the_same_command(ray_local, tmp_path):
    """The run name is stable: rerunning after the driver was killed restores the Tune run and finishes it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from cluster.train_job import TrainJobConfig, run

    data = str(tmp_path / "data")
    write_synthetic_triplets(data, relations=("hugging", "riding"))
    out = tmp_path / "train"
    steps = 200
    args = ["--relations", "hugging,riding", "--output", str(out), "--steps", str(steps), "--batch-size", "1",
            "--checkpoint-every", "5", "--name", "crash"]
    env = dict(os.environ, TUNE_GLOBAL_CHECKPOINT_S="1")  # Tune saves its run state every second
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "train", "relations", data, *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and len(list(out.glob("crash/*/checkpoint_*"))) < 2:
            time.sleep(0.2)
        time.sleep(3)  # a few more steps and a save of the run state
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert not (out / "loras" / "hugging").exists() and not (out / "loras" / "riding").exists()
    summary = run(TrainJobConfig(data=data, relations=("hugging", "riding"), output=str(out), steps=steps,
                                 batch_size=1, checkpoint_every=5, name="crash"))
    assert all(s["status"] == "ok" for s in summary.values()), summary
    assert max(s["final"]["resumed_from"] for s in summary.values()) > 0
