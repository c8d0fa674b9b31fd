"""The data engine on a real local Ray with the tiny models: the example spec through `data generate`, triplets that
relation-LoRA training accepts, resume, and the CLIP-R gate dropping exactly the samples under its threshold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import invoke

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("one_torch_thread")]  # Ray actors get one thread already

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "manifests" / "examples" / "relation_spec.yaml"
# random tiny models detect arbitrary boxes: these gates let every sample through (each is still measured)
PERMISSIVE = ["--detection-threshold", "0", "--max-instances", "10000", "--min-keypoint-confidence", "0",
              "--max-subject-iou", "1"]


@pytest.fixture(scope="module")
def made(ray_local, runner, tmp_path_factory) -> Path:
    """The example spec (6 samples, 2 relations) through the CLI on the session's local Ray; its output folder."""
    out = tmp_path_factory.mktemp("engine") / "out"
    result = invoke(runner, "data", "generate", SPEC, "--output", out, "--batch-size", 3, *PERMISSIVE)
    assert result.exit_code == 0, result.output
    assert "planned 6  made 6  dropped 0  skipped 0" in result.output
    return out


@pytest.mark.slow
def test_example_spec_makes_triplets_that_training_accepts(made, pipe, tmp_path):
    from dreamrelation.config import TrainConfig
    from dreamrelation.data import LAYOUTS_KEY, example_from_record
    from dreamrelation.training import train_relation_lora
    from manifests.triplets import read_triplets

    summary = json.loads((made / "engine.json").read_text())
    assert (summary["planned"], summary["made"], summary["dropped"], summary["skipped"]) == (6, 6, 0, 0)
    assert summary["total"]["made_by_relation"] == {"hugging": 3, "shaking_hands": 3}
    rows, rejected = read_triplets(str(made))
    assert not rejected
    assert [r.triplet_id for r in rows] == [f"{rel}-{i:05d}" for rel in ("hugging", "shaking_hands") for i in range(3)]
    for row in rows:
        folder = made / "images" / row.triplet_id
        assert row.target == str(folder / "target.png") and Image.open(row.target).size == (64, 64)
        assert [s.image for s in row.subjects] == [str(folder / f"subject_{j}.png") for j in range(2)]
        classes = [s.phrase for s in row.subjects]
        assert row.metadata[LAYOUTS_KEY] == ",".join("coco" if c == "person" else "points" for c in classes)
        assert row.source == "engine:pipeline" and float(row.metadata["clip_r"]) >= 0
        for s in row.subjects:
            assert np.asarray(Image.open(s.mask)).shape == (64, 64)
            assert 0 <= s.box[0] < s.box[2] <= 1 and 0 <= s.box[1] < s.box[3] <= 1
    assert any(row.metadata[LAYOUTS_KEY] == "coco,points" for row in rows)  # "person" went through ViTPose

    examples = [example_from_record(r.to_record()) for r in rows if r.relation == "hugging"]
    assert [e.keypoint_layouts for e in examples] == [("points", "points")] * 3
    assert all(e.visibility is not None and e.target_masks[0].shape == (64, 64) for e in examples)
    config = TrainConfig(relation="hugging", steps=2, batch_size=2, resolution=64, checkpoint_every=1000)
    result = train_relation_lora(pipe, examples, config, tmp_path)
    assert result.lora_path.is_file() and result.card["examples"] == 3
    assert np.isfinite(result.card["final_losses"]["loss"])


@pytest.mark.slow
def test_rerun_skips_done_samples_and_a_lost_outcome_file_reruns_only_its_samples(made, ray_local, tmp_path):
    from batch.engine_job import EngineJobConfig, run
    from batch.engine_worker import EngineConfig
    from dreamrelation.engine import GateConfig
    from manifests import storage
    from manifests.engine_outcome import read_outcomes
    from manifests.relation_spec import read_relation_specs, write_relation_specs
    from manifests.triplets import read_triplets

    gates = dict(detection_threshold=0.0, max_instances=10_000, min_keypoint_confidence=0.0, max_subject_iou=None)

    def config(spec, **extra):
        engine = EngineConfig(output=str(made), gates=GateConfig(**gates, **extra))
        return EngineJobConfig(spec=str(spec), output=str(made), engine=engine, batch_size=3)

    again = run(config(SPEC))
    assert (again["planned"], again["made"], again["dropped"], again["skipped"]) == (6, 0, 0, 6)
    assert again["total"]["made"] == 6

    # a relation added to the spec: only its samples run ("riding" is a phrase the tiny CLIP scores above 0)
    riding = {"relation": "riding", "relation_phrase": "riding", "templates": ["A {0} is riding a {1}."],
              "classes": ["person", "horse", "dog", "bicycle"], "count": 3, "width": 64, "height": 64, "steps": 2}
    spec = tmp_path / "spec.yaml"
    write_relation_specs([*read_relation_specs(str(SPEC)), riding], str(spec))
    grown = run(config(spec))
    assert (grown["planned"], grown["made"], grown["dropped"], grown["skipped"]) == (9, 3, 0, 6)
    assert grown["total"]["made_by_relation"] == {"hugging": 3, "riding": 3, "shaking_hands": 3}

    # lose the riding samples' outcome file; rerun with a CLIP-R threshold between their observed values
    parts = {tuple(sorted(o.sample_id for o in read_outcomes(p))): p
             for p in storage.list_files(str(made / "outcomes"), ".parquet")}
    lost_ids = ("riding-00000", "riding-00001", "riding-00002")
    assert len(parts) == 3 and lost_ids in parts
    clip_r = {o.sample_id: o.metrics["clip_r"] for o in read_outcomes(parts[lost_ids])}
    values = sorted(clip_r.values())
    gap = int(np.argmax(np.diff(values)))
    assert values[gap + 1] - values[gap] > 1e-3, values
    threshold = (values[gap] + values[gap + 1]) / 2
    under = sorted(k for k, v in clip_r.items() if v < threshold)
    Path(parts[lost_ids]).unlink()

    summary = run(config(spec, min_clip_r=threshold))
    assert (summary["planned"], summary["skipped"]) == (9, 6)
    assert summary["made"] + summary["dropped"] == 3 and summary["dropped"] == len(under) >= 1
    assert summary["dropped_by_reason"] == {"low_clip_r": len(under)}
    assert sorted(d["sample_id"] for d in summary["drops"]) == under
    dropped = read_outcomes(str(made / "dropped.parquet"))
    assert sorted(o.sample_id for o in dropped) == under
    for o in dropped:  # the same images as the first run: the same CLIP-R
        assert (o.stage, o.reason) == ("gate", "low_clip_r")
        assert o.metrics["clip_r"] == pytest.approx(clip_r[o.sample_id], abs=1e-3)
    rows, _ = read_triplets(str(made))
    kept = {r.triplet_id for r in rows}
    assert kept == {f"{rel}-{i:05d}" for rel in ("hugging", "shaking_hands", "riding") for i in range(3)} - set(under)
    on_disk = json.loads((made / "engine.json").read_text())
    assert on_disk["total"]["dropped_by_reason"] == {"low_clip_r": len(under)}
    assert on_disk["total"]["made"] + on_disk["total"]["dropped"] == 9
