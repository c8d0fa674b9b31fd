"""The data engine on a real local Ray with the tiny models: the README's `data generate` example typed literally,
triplets that relation-LoRA training accepts, resume, and gates that change judging again (the CLIP-R gate
dropping exactly the samples under its threshold)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("one_torch_thread")]  # Ray actors get one thread already

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "manifests" / "examples" / "relation_spec.yaml"
README_EXAMPLE = "dreamrelation data generate manifests/examples/relation_spec.yaml --output out/engine --preset tiny"


def readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("### Make the triplets: `dreamrelation data generate`")[1].split("\n## ")[0]


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory) -> tuple[Path, str]:
    """The README's example, typed as written in a shell: the `dreamrelation` command in a folder holding the
    example spec at the path it names, starting its own local Ray. Its output folder and what it printed."""
    assert README_EXAMPLE in readme_section().splitlines()  # the test runs what the README says
    cwd = tmp_path_factory.mktemp("readme")
    (cwd / "manifests" / "examples").mkdir(parents=True)
    shutil.copy(SPEC, cwd / "manifests" / "examples" / "relation_spec.yaml")
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0"}
    command = [str(Path(sys.executable).parent / "dreamrelation"), *shlex.split(README_EXAMPLE)[1:]]
    try:
        result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return cwd / "out" / "engine", result.stdout


@pytest.fixture(scope="module")
def made(readme_run) -> Path:
    return readme_run[0]


@pytest.mark.slow
def test_readme_example_makes_triplets_that_training_accepts(readme_run, pipe, tmp_path):
    from dreamrelation.engine.gates import TINY_GATES, TINY_GATES_NOTE, KeypointConfig
    from dreamrelation.model.config import TrainConfig
    from dreamrelation.train.data import LAYOUTS_KEY, example_from_record
    from dreamrelation.train.training import train_relation_lora
    from manifests.triplets import read_triplets

    made, printed = readme_run
    assert printed.splitlines()[0] == TINY_GATES_NOTE  # said before the run starts
    assert "planned 6  made 6  dropped 0  skipped 0  (6 triplets in the dataset)" in printed
    assert "targets made by the base adapter without a relation LoRA (no --loras registry)" in printed
    summary = json.loads((made / "engine.json").read_text())
    assert (summary["planned"], summary["made"], summary["dropped"], summary["skipped"]) == (6, 6, 0, 0)
    assert summary["total"]["made_by_relation"] == {"hugging": 3, "shaking_hands": 3}
    # engine.json holds the gates and keypoint choices in force, and what the subjects got
    assert summary["gates"] == {**TINY_GATES.__dict__} and summary["gates_note"] == TINY_GATES_NOTE
    assert (summary["gates"]["min_clip_r"], summary["gates"]["max_copy_paste_dino"]) == (0.0, 100.0)  # both on
    assert summary["keypoints"]["animal"] == "ap10k" and summary["keypoints"]["animal_dataset_index"] == 3
    assert summary["keypoints"]["animal_pose"].endswith("vitpose_ap10k") and summary["targets_without_lora"] == 6
    rows, rejected = read_triplets(str(made))
    assert not rejected
    assert [r.triplet_id for r in rows] == [f"{rel}-{i:05d}" for rel in ("hugging", "shaking_hands") for i in range(3)]
    for row in rows:
        folder = made / "images" / row.triplet_id
        assert row.target == str(folder / "target.png") and Image.open(row.target).size == (64, 64)
        assert [s.image for s in row.subjects] == [str(folder / f"subject_{j}.png") for j in range(2)]
        classes = [s.phrase for s in row.subjects]
        # people COCO, animals AP-10K (the tiny ViTPose++ twin), toys and robots carried points
        assert row.metadata[LAYOUTS_KEY] == ",".join(KeypointConfig().layout(c) for c in classes)
        assert row.source == "engine:pipeline" and float(row.metadata["clip_r"]) >= 0
        assert row.metadata["target_lora"] == ""
        for s in row.subjects:
            assert np.asarray(Image.open(s.mask)).shape == (64, 64)
            assert 0 <= s.box[0] < s.box[2] <= 1 and 0 <= s.box[1] < s.box[3] <= 1
    assert any(row.metadata[LAYOUTS_KEY] == "coco,points" for row in rows)  # "person" went through ViTPose
    assert any(row.metadata[LAYOUTS_KEY] == "ap10k,points" for row in rows)  # "monkey" too, with AP-10K
    assert sum(summary["keypoint_layouts"].values()) == 12 and summary["keypoint_layouts"]["ap10k"] >= 1

    examples = [example_from_record(r.to_record()) for r in rows if r.relation == "hugging"]
    assert [e.keypoint_layouts for e in examples] == [
        tuple(KeypointConfig().layout(s.phrase) for s in r.subjects) for r in rows if r.relation == "hugging"]
    assert all(e.visibility is not None and e.target_masks[0].shape == (64, 64) for e in examples)
    config = TrainConfig(relation="hugging", steps=2, batch_size=2, resolution=64, checkpoint_every=1000)
    result = train_relation_lora(pipe, examples, config, tmp_path)
    assert result.lora_path.is_file() and result.card["examples"] == 3
    assert np.isfinite(result.card["final_losses"]["loss"])


@pytest.mark.slow
def test_rerun_skips_samples_judged_with_the_same_gates_and_judges_again_under_others(made, ray_local, tmp_path):
    from dataclasses import replace

    from batch.engine_job import EngineJobConfig, run, summary_lines
    from batch.engine_worker import EngineConfig
    from dreamrelation.engine.gates import TINY_GATES
    from manifests import storage
    from manifests.engine_outcome import read_outcomes
    from manifests.relation_spec import read_relation_specs, write_relation_specs
    from manifests.triplets import read_triplets

    def config(spec, **gates):  # no gates given: the tiny preset's, as in the README's run
        engine = EngineConfig(output=str(made), gates=replace(TINY_GATES, **gates) if gates else None)
        return EngineJobConfig(spec=str(spec), output=str(made), engine=engine, batch_size=3)

    again = run(config(SPEC))
    assert (again["planned"], again["made"], again["dropped"], again["skipped"], again["rejudged"]) == (6, 0, 0, 6, 0)
    assert again["total"]["made"] == 6
    assert f"skipped 6 samples already judged with these gates in {made} (resume; --no-resume starts over, " \
           "--retry-errors reruns errors)" in summary_lines(again)

    # a relation added to the spec: only its samples run ("riding" is a phrase the tiny CLIP scores above 0)
    riding = {"relation": "riding", "relation_phrase": "riding", "templates": ["A {0} is riding a {1}."],
              "classes": ["person", "horse", "dog", "bicycle"], "count": 3, "width": 64, "height": 64, "steps": 2}
    spec = tmp_path / "spec.yaml"
    write_relation_specs([*read_relation_specs(str(SPEC)), riding], str(spec))
    grown = run(config(spec))
    assert (grown["planned"], grown["made"], grown["dropped"], grown["skipped"]) == (9, 3, 0, 6)
    assert grown["total"]["made_by_relation"] == {"hugging": 3, "riding": 3, "shaking_hands": 3}

    # lose the riding samples' outcome file; rerun with a CLIP-R threshold between their observed values: the
    # riding samples run again, and every other sample, judged under other gates, is judged again on its images
    parts = {tuple(sorted(o.sample_id for o in read_outcomes(p))): p
             for p in storage.list_files(str(made / "outcomes"), ".parquet")}
    lost_ids = ("riding-00000", "riding-00001", "riding-00002")
    assert len(parts) == 3 and lost_ids in parts
    clip_r = {o.sample_id: o.metrics["clip_r"] for o in read_outcomes(str(made / "outcomes"))}
    values = sorted(clip_r[i] for i in lost_ids)
    gap = int(np.argmax(np.diff(values)))
    assert values[gap + 1] - values[gap] > 1e-3, values
    threshold = (values[gap] + values[gap + 1]) / 2
    under = sorted(k for k, v in clip_r.items() if v < threshold)
    assert 1 <= len([i for i in under if i in lost_ids]) < 3
    Path(parts[lost_ids]).unlink()

    stricter = run(config(spec, min_clip_r=threshold))
    assert (stricter["planned"], stricter["skipped"], stricter["rejudged"]) == (9, 0, 6)
    assert stricter["made"] + stricter["dropped"] == 9 and stricter["dropped"] == len(under)
    assert stricter["dropped_by_reason"] == {"low_clip_r": len(under)}
    assert sorted(d["sample_id"] for d in stricter["drops"]) == under
    assert "judged again: 6 samples decided under other gate or keypoint settings (their images reused)" \
        in summary_lines(stricter)
    dropped = read_outcomes(str(made / "dropped.parquet"))
    assert sorted(o.sample_id for o in dropped) == under
    for o in dropped:  # the same images as the first run: the same CLIP-R
        assert (o.stage, o.reason) == ("gate", "low_clip_r")
        assert o.metrics["clip_r"] == pytest.approx(clip_r[o.sample_id], abs=1e-3)
    rows, _ = read_triplets(str(made))
    everything = {f"{rel}-{i:05d}" for rel in ("hugging", "shaking_hands", "riding") for i in range(3)}
    assert {r.triplet_id for r in rows} == everything - set(under)
    on_disk = json.loads((made / "engine.json").read_text())
    assert on_disk["total"]["dropped_by_reason"] == {"low_clip_r": len(under)}
    assert on_disk["gates"]["min_clip_r"] == threshold and on_disk["judged_with"] != grown["judged_with"]

    # back to the README's gates: the verdicts made under them count again; the riding samples, judged only under
    # the stricter gates, are judged again on their images (nothing is generated again)
    back = run(config(spec))
    assert (back["skipped"], back["rejudged"], back["made"], back["dropped"]) == (6, 3, 3, 0)
    assert back["seconds_per_stage"]["generate"] == 0.0 and back["total"]["made"] == 9
    assert {r.triplet_id for r in read_triplets(str(made))[0]} == everything
