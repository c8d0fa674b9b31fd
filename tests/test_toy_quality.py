"""Quality, measured: the shipped toy preset (dreamrelation/toy/weights) judged by the toy world's exact oracle.

The floors below sit under what the preset measured when it was trained (its card.json, README "The toy preset"),
by enough to absorb float differences between machines, and far above what a model that draws nothing right
would score: a regression in the model, the pipeline, the adapter's masks or the metric models shows here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import invoke
from test_evaluate import readme_command

from dreamrelation.model.preset_names import TOY_MODEL_DIR
from dreamrelation.toy import world

ROOT = Path(__file__).resolve().parents[1]
# oracle floors for 32 seen-relation cases through the adapter (subject images + boxes), seed 11
FLOOR_SHAPE_COLOUR = 0.12  # measured: 0.22 (7 of 32); the base model on the held-out relation: 0.03
FLOOR_RELATION = 0.12  # measured: 0.19 (6 of 32); random images: 0.015 (test_toy_world)
# the README's gated toy run (test_the_readme_gated_toy_run_keeps_what_the_oracle_finds_better): relation rates
GATE_PASSED_LEAD = 0.2  # passed attempts over failed ones; measured: 45.5% (5 of 11) against 5.6% (1 of 18)
GATE_FINAL_LEAD = 0.0  # kept images over first attempts; measured: 31.2% and 31.2% (no lead on 16 rows)

pytestmark = pytest.mark.skipif(not (TOY_MODEL_DIR / "model_index.json").is_file(),
                                reason=f"no toy preset weights in {TOY_MODEL_DIR}")


@pytest.fixture(scope="module")
def toy_pipe():
    from dreamrelation.model.presets import load_pipeline

    pipe = load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_card_describes_the_shipped_folder():
    card = json.loads((TOY_MODEL_DIR / "card.json").read_text())
    files = [p for p in TOY_MODEL_DIR.rglob("*") if p.is_file() and p.name != "card.json"]
    assert card["size_bytes"] == sum(p.stat().st_size for p in files)
    assert card["data"]["held_out"] not in card["data"]["relations"]
    assert set(card["stages"]) == {"vae", "base", "adapter", "clip"}
    assert card["command"].startswith("dreamrelation models train-toy OUTPUT")
    for name in ("base_seen", "base_held_out", "adapter_seen", "adapter_held_out"):
        assert card["oracle"][name]["cases"] >= 64


@pytest.mark.slow
def test_the_toy_preset_draws_the_subjects_in_their_boxes(toy_pipe):
    from dreamrelation.train.toy_model import measure, training_relations

    held_out = json.loads((TOY_MODEL_DIR / "card.json").read_text())["data"]["held_out"]
    m = measure(toy_pipe, training_relations(held_out), 32, seed=11, adapter=True)
    assert m["shape_colour"]["rate"] >= FLOOR_SHAPE_COLOUR, m
    assert m["relation"]["rate"] >= FLOOR_RELATION, m


@pytest.mark.slow
@pytest.mark.ray
def test_the_readme_toy_run_judged_by_the_oracle(ray_local, runner, tmp_path, monkeypatch):
    """The README's toy lines, typed literally from the project's folder (their paths are the repository's),
    writing to a scratch output: the run, then `batch judge` on it."""
    submit = readme_command("batch submit manifests/examples/toy/manifest.parquet")
    judge = readme_command("batch judge outputs/toy")
    out = tmp_path / "toy"
    submit[submit.index("--output") + 1] = str(out)
    judge[judge.index("outputs/toy")] = str(out)
    monkeypatch.chdir(ROOT)
    ran = invoke(runner, *submit)
    assert ran.exit_code == 0, ran.output
    judged = invoke(runner, *judge)
    assert judged.exit_code == 0, judged.output
    first = judged.output.splitlines()[0]
    assert first.startswith("final images: 16 images; identity "), judged.output
    shape_colour = float(first.split("shape + colour ")[1].split("%")[0]) / 100
    assert shape_colour >= FLOOR_SHAPE_COLOUR, first
    assert (out / "oracle.parquet").is_file() and (out / "report.html").is_file()


def test_every_toy_example_row_is_a_seen_relation():
    from manifests.io import read_manifest

    card = json.loads((TOY_MODEL_DIR / "card.json").read_text())
    rows, rejected = read_manifest(str(ROOT / "manifests" / "examples" / "toy" / "manifest.parquet"))
    assert not rejected and len(rows) == 16
    assert all(r.relation is None and r.metadata["toy_relation"] in card["data"]["relations"] for r in rows)
    assert all(world.Identity.parse(s.phrase) for r in rows for s in r.subjects)


@pytest.mark.slow
def test_the_readme_toy_paper_line(runner, tmp_path, monkeypatch):
    """The README's `eval toy-paper` line from a fresh folder, shortened (1 LoRA step, 2 cases, 2 configurations;
    as written it runs 11 minutes): the table lands where the README says."""
    args = readme_command("eval toy-paper")
    monkeypatch.chdir(tmp_path)
    result = invoke(runner, *args, "--steps", 1, "--batch-size", 1, "--cases", 2, "--configs", "base,lora_kml")
    assert result.exit_code == 0, result.output
    table = (tmp_path / args[2] / "paper_in_miniature.md").read_text()
    assert "held-out relation `on_top_of` on preset `toy`" in table and "| lora_kml | yes | yes |" in table
    assert table in result.output
    assert "lora_kml: LoRA: 100%" in result.output and "1/1" in result.output  # the LoRA's step bar, to its end


@pytest.mark.slow
@pytest.mark.ray
def test_the_readme_gated_toy_run_keeps_what_the_oracle_finds_better(ray_local, runner, tmp_path):
    """The README's gated toy run (the example toy manifest under ``--min-clip-t 50 --max-attempts 3``; the toy
    CLIP's CLIP-T of such images: median ~47), typed literally but writing to a scratch output, then `batch judge`.
    The attempts the gate passed must show their relation more often than those it failed, and the kept images at
    least as often as the first attempts (what the run keeps without the gate)."""
    submit = readme_command("--min-clip-t")
    judge = readme_command("batch judge outputs/toy-gate")
    out = tmp_path / "toy-gate"
    submit[submit.index("--output") + 1] = str(out)
    judge[judge.index("outputs/toy-gate")] = str(out)
    example = "manifests/examples/toy/manifest.parquet"
    submit[submit.index(example)] = str(ROOT / example)
    result = invoke(runner, *submit)
    assert result.exit_code == 0, result.output
    result = invoke(runner, *judge)
    assert result.exit_code == 0, result.output
    rates = {line.split(":")[0]: float(line.split("relation ")[1].split("%")[0]) / 100
             for line in result.output.splitlines() if " images; identity " in line}
    assert rates["attempts the gate passed"] >= rates["attempts the gate failed"] + GATE_PASSED_LEAD, rates
    assert rates["final images"] >= rates["first attempts (no gate)"] + GATE_FINAL_LEAD, rates


def test_the_relation_figures_script_draws_held_out_scenes_from_a_trained_relations_words(toy_pipe):
    """scripts/toy_relation_figures.py (README "The paper in miniature"): the held-out scenes keep their subjects,
    portraits and boxes and take the caption of a trained relation; the oracle judges them on the held-out one."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("toy_relation_figures", ROOT / "scripts" / "toy_relation_figures.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    calls = []

    def recording_pipe(prompts, images, phrases, boxes, **kwargs):
        calls.append((prompts, phrases, boxes))
        return toy_pipe(prompts, images, phrases, boxes, **kwargs)

    rates = script.reworded(recording_pipe, "on_top_of", "next_to", 2)
    scenes = [world.random_scene(script.SEED * 7919 + i, 64, ["on_top_of"]) for i in range(2)]
    [(prompts, phrases, boxes)] = calls
    assert prompts == [f"A {s.identities[0].phrase} is next to a {s.identities[1].phrase}." for s in scenes]
    assert phrases == [[i.phrase for i in s.identities] for s in scenes]
    assert boxes == [s.boxes.tolist() for s in scenes]
    assert rates["cases"] == 2 and 0.0 <= rates["shape_colour"]["rate"] <= 1.0
