"""The ``data import-public``, ``train relations`` and ``train distill-encoder`` commands (typer CliRunner).

Bad input exits with code 2 and an ``error:`` line before any model is loaded or Ray is started; ``train relations``
end to end runs the README's command (2 steps) in a subprocess from a working folder, with its own local Ray;
distillation runs one epoch on the tiny preset.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_subject, public_data
from test_data import make_public_folder, make_sample
from test_train_job import write_synthetic_triplets
from typer.testing import CliRunner

import cli

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: str):
    return runner.invoke(cli.app, [str(a) for a in args])


def _image_uris(row) -> list[str]:
    return [row.target, *[s.image for s in row.subjects], *[s.mask for s in row.subjects if s.mask]]


# --------------------------------------------------------------------------------------------------- data import-public

@pytest.mark.slow
def test_import_public_real_sets_into_one_dataset(runner, tmp_path):
    from manifests.triplets import read_triplets

    data = public_data() / "data"
    out = str(tmp_path / "ds")
    for name, relation in (("hug", "hugging"), ("shake", "shaking_hands")):
        result = invoke(runner, "data", "import-public", data / name, "--relation", relation, "--output", out)
        assert result.exit_code == 0, result.output
        assert f"5 triplets of {relation!r} written to {out} (0 skipped)" in result.stdout

    rows, rejected = read_triplets(out)
    assert rejected == [] and len(rows) == 10
    assert sorted({r.relation for r in rows}) == ["hugging", "shaking_hands"]
    assert sum(r.relation == "hugging" for r in rows) == 5
    for row in rows:
        for uri in _image_uris(row):
            assert uri.endswith(".png") and uri.startswith(out), uri
            assert Path(uri).read_bytes().startswith(PNG), uri  # re-encoded, WebP motion.png included

    # importing a relation again replaces its rows instead of adding to them (a small synthetic set: 5 -> 2 rows)
    small = make_public_folder(tmp_path / "hug2", {str(i): {"prompt": f"A dog hugs a cat {i}.",
                                                           "entities": ["dog", "cat"]} for i in range(2)})
    for sid in "01":
        make_sample(small, sid)
    result = invoke(runner, "data", "import-public", small, "--relation", "hugging", "--output", out)
    assert result.exit_code == 0, result.output
    again, rejected = read_triplets(out)
    assert rejected == [] and len(again) == 7
    assert sorted(r.triplet_id for r in again if r.relation == "hugging") == ["hugging-0", "hugging-1"]
    assert [r.prompt for r in again if r.relation == "hugging"] == ["A dog hugs a cat 0.", "A dog hugs a cat 1."]
    assert [r for r in again if r.relation == "shaking_hands"] == [r for r in rows if r.relation == "shaking_hands"]


def test_import_public_reports_broken_sample(runner, tmp_path):
    from manifests.triplets import read_triplets

    root = make_public_folder(tmp_path / "hug", {
        "0": {"prompt": "A dog and a cat hug.", "entities": ["dog", "cat"], "predicate": ["hug"]},
        "1": {"prompt": "A fox is hugging a bear.", "entities": ["fox", "bear"]},
        "2": {"prompt": "A cow hugs a pig.", "entities": ["cow", "pig"], "predicate": ["hugs"]},
    })
    make_sample(root, "0", webp_target=True)
    make_sample(root, "1")
    make_sample(root, "2", skip=("concept_keyposes_two.pth",))
    out = str(tmp_path / "ds")
    result = invoke(runner, "data", "import-public", root, "--relation", "hugging", "--output", out)
    assert result.exit_code == 0, result.output
    assert "skipped sample 2:" in result.stderr and "concept_keyposes_two.pth" in result.stderr, result.stderr
    assert "2 triplets of 'hugging' written" in result.stdout and "(1 skipped)" in result.stdout
    rows, rejected = read_triplets(out)
    assert rejected == [] and [r.triplet_id for r in rows] == ["hugging-0", "hugging-1"]


def test_import_public_errors(runner, tmp_path):
    out = str(tmp_path / "ds")
    # no usable sample at all
    root = make_public_folder(tmp_path / "broken", {"0": {"prompt": "A dog hugs a cat.", "entities": ["dog", "cat"]}})
    make_sample(root, "0", skip=("motion_keyposes.pth",))
    result = invoke(runner, "data", "import-public", root, "--relation", "hugging", "--output", out)
    assert result.exit_code == 2, result.output
    assert "skipped sample 0:" in result.stderr and "error: no usable samples" in result.stderr
    assert not (tmp_path / "ds" / "triplets.parquet").exists()
    # a folder without prompts.json, a missing folder, a bad relation id
    for args, expected in (((tmp_path, "hugging"), "prompts.json"), ((tmp_path / "nope", "hugging"), "DIRECTORY"),
                           ((root, "hug ging"), "relation")):
        result = invoke(runner, "data", "import-public", args[0], "--relation", args[1], "--output", out)
        assert result.exit_code == 2, result.output
        assert "error:" in result.stderr and expected in result.stderr, result.stderr


# ------------------------------------------------------------------------------------------------------ train relations

@pytest.fixture
def no_ray(monkeypatch):
    import cluster.train_job as tj

    def fail(address):
        raise AssertionError("Ray started")

    monkeypatch.setattr(tj, "_init_ray", fail)


def test_train_relations_bad_input_fails_before_ray(runner, tmp_path, no_ray):
    data = str(tmp_path / "data")
    write_synthetic_triplets(data, relations=("hugging",), per_relation=1)
    base = ["train", "relations", data, "--output", tmp_path / "run"]
    cases = [
        (["--relations", "hugging", "--profile", "fancy"], ["--profile", "'fancy'"]),
        (["--relations", ""], ["--relations"]),
        (["--relations", " , "], ["--relations"]),
        (["--relations", "hugging", "--steps", "0"], ["--steps", "0"]),
        (["--relations", "hugging", "--batch-size", "0"], ["--batch-size"]),
        (["--relations", "hugging,dancing"], ["no valid triplets for relation 'dancing'"]),
        (["--relations", "hugging", "--name", "a/b"], ["name", "'a/b'"]),
    ]
    for extra, expected in cases:
        result = invoke(runner, *base, *extra)
        assert result.exit_code == 2, (extra, result.output)
        assert "error:" in result.stderr, (extra, result.output)
        for text in expected:
            assert text in result.stderr, (extra, result.stderr)
    # a data root without triplets.parquet
    result = invoke(runner, "train", "relations", tmp_path / "empty", "--relations", "hugging")
    assert result.exit_code == 2, result.output
    assert "error:" in result.stderr and "not found" in result.stderr


def _readme_command() -> list[str]:
    """The README's local `train relations` command (under "Make the triplets"), as arguments."""
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = [line for line in readme.splitlines() if line.startswith("dreamrelation train relations out/engine")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0])[1:]


@pytest.mark.slow
@pytest.mark.ray
def test_readme_command_with_relative_paths_trains_reports_and_reruns(runner, tiny_dir, tmp_path, monkeypatch,
                                                                      no_ray):
    """The README's command, literally (plus a short recipe), from a working folder: relative paths mean that
    folder inside Ray's trials too; a rerun is reported as done, other settings under the name are refused."""
    import json
    import os
    import subprocess
    import sys

    from test_train_job import _scratch_folders

    from cluster.train_job import TrainJobConfig
    from manifests.registry import LoRARegistry

    write_synthetic_triplets(str(tmp_path / "out" / "engine"), relations=("hugging",), per_relation=1)
    args = [*_readme_command(), "--steps", "2", "--batch-size", "1", "--checkpoint-every", "1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as a user's
    proc = subprocess.run([sys.executable, str(Path(cli.__file__).resolve()), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = tmp_path / "out" / "train" / "train-relations"
    lora = LoRARegistry(str(tmp_path / "out" / "loras")).uri("hugging")
    assert lora == f"{tmp_path}/out/loras/hugging/pytorch_lora_weights.safetensors"
    assert proc.stdout.splitlines()[-2:] == [
        f"hugging: ok  lora: {lora}  loss curve: {run_dir}/loss-hugging.png",
        f"metrics: {run_dir}/metrics.jsonl"], proc.stdout
    assert "Traceback" not in proc.stderr and "None" not in proc.stdout, proc.stderr
    assert "hugging: loss " in proc.stderr and "2/2" in proc.stderr  # the progress bar, with the current loss
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["relation"], r["step"]) for r in rows] == [("hugging", 1), ("hugging", 2)]
    assert all(isinstance(r[k], float) for r in rows for k in ("loss", "denoise", "kml", "attention"))
    assert (run_dir / "loss-hugging.png").read_bytes().startswith(PNG)
    assert json.loads((tmp_path / "out" / "loras" / "hugging" / "card.json").read_text())["steps"] == 2
    assert _scratch_folders(TrainJobConfig(data="", relations=("hugging",), output=f"{tmp_path}/out/train")) == []

    # the same command again (no Ray): already done, where its LoRA is; other settings: refused, exit 2
    monkeypatch.chdir(tmp_path)
    again = invoke(runner, *args)
    assert again.exit_code == 0, again.output
    assert "is already done" in again.stdout and f"hugging: done  lora: {lora}" in again.stdout, again.stdout
    changed = invoke(runner, *args[:-6], "--steps", "3", "--batch-size", "1", "--checkpoint-every", "1")
    assert changed.exit_code == 2, changed.output
    assert changed.stderr.count("\n") == 1 and "error: run 'train-relations'" in changed.stderr
    assert "steps: 2 in the run, 3 now" in changed.stderr and "--name" in changed.stderr, changed.stderr


# ------------------------------------------------------------------------------------------------- distill-encoder

def test_distill_encoder_writes_a_loadable_checkpoint(runner, tiny_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    from dreamrelation.model.presets import load_pipeline

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        make_subject(100 + i, size=64).save(images / f"{i}.png")
    (images / "notes.txt").write_text("not an image")  # ignored
    out = tmp_path / "enc"
    result = invoke(runner, "train", "distill-encoder", images, "--output", out, "--epochs", "1", "--batch-size", "2",
                    "--lr", "1e-3", "--preset", tiny_dir)
    assert result.exit_code == 0, result.output
    checkpoint = out / "local_encoder.safetensors"
    assert checkpoint.is_file() and f"encoder: {checkpoint}" in result.stdout

    pipe = load_pipeline(str(tiny_dir))
    model = pipe.adapter.encoder.load_local_checkpoint(checkpoint)
    assert pipe.adapter.encoder.local_model is model
    state = load_file(str(checkpoint))
    loaded = model.state_dict()
    assert any(not torch.equal(v, pipe.adapter.encoder.vision_model.state_dict()[k]) for k, v in state.items())
    for k, v in state.items():
        if not k.endswith("position_ids"):
            assert torch.equal(loaded[k], v), k


def test_distill_encoder_bad_input(runner, tiny_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke(runner, "train", "distill-encoder", empty, "--output", tmp_path / "enc", "--preset", tiny_dir)
    assert result.exit_code == 2, result.output
    assert "error: no images" in result.stderr
    assert not (tmp_path / "enc").exists()

    images = tmp_path / "images"
    images.mkdir()
    make_subject(0).save(images / "0.png")
    for opt, value in (("--epochs", "0"), ("--batch-size", "0"), ("--lr", "0")):
        result = invoke(runner, "train", "distill-encoder", images, "--output", tmp_path / "enc", "--preset", tiny_dir,
                        opt, value)
        assert result.exit_code == 2, (opt, result.output)
        assert f"error: {opt} must be" in result.stderr, (opt, result.output)
