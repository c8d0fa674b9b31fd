"""The toy preset: its tokenizer, `models train-toy` (stages, checkpoints, resume, refusal, the model folder loaded
like any preset, its card) and the paper in miniature (`eval toy-paper`) on a briefly trained toy model. What the
shipped toy weights can do is measured in tests/test_toy_quality.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import invoke

from dreamrelation.model import preset_names
from dreamrelation.toy import world
from dreamrelation.toy.oracle import wilson
from dreamrelation.train.toy_model import (
    CHECKPOINTS,
    SettingsChanged,
    ToySettings,
    build_toy_tokenizer,
    train_toy,
    world_words,
)
from dreamrelation.train.toy_paper import run_paper, toy_example

QUICK = dict(scenes=24, vae_steps=2, vae_batch=4, base_steps=2, base_batch=4, adapter_steps=2, adapter_batch=2,
             clip_steps=2, clip_batch=8, checkpoint_every=1)


def test_every_world_word_is_one_token_and_other_text_falls_back_to_characters():
    tok = build_toy_tokenizer()
    caption = world.scene("on_top_of", 3).caption
    pieces = tok.tokenize(caption)
    assert len(pieces) == len(caption.replace(",", " ,").replace(".", " .").split())
    for word in world_words():
        assert tok.tokenize(word) == [word + "</w>"], word
    assert tok.tokenize("zebra") == ["z", "e", "b", "r", "a</w>"]  # not a world word: its characters
    assert len(set(tok.convert_tokens_to_ids(pieces))) > 5 and tok.unk_token_id not in tok(caption).input_ids[1:-1]


def test_wilson_interval():
    low, high = wilson(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0 and wilson(0, 0) == (0.0, 1.0)


def test_settings_are_checked_by_name():
    with pytest.raises(ValueError, match="base_steps must be a positive integer, got 0"):
        ToySettings(base_steps=0)
    with pytest.raises(ValueError, match="relation must be one of"):
        ToySettings(held_out="hugging")


def test_the_toy_preset_names_its_folder_or_the_command_that_makes_it(tmp_path, monkeypatch):
    from dreamrelation.model.presets import resolve_spec

    monkeypatch.setattr(preset_names, "TOY_MODEL_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="models train-toy"):
        resolve_spec("toy")
    assert preset_names.is_named("toy") and not preset_names.is_named("./toy")
    assert preset_names.training_resolution("toy") == preset_names.training_resolution("tiny") == 64
    assert preset_names.training_resolution("sdxl") == 1024


def test_a_render_is_a_fine_tuning_triplet():
    render = world.scene("stacked", 5)
    ex = toy_example(render, "toy-00001")
    assert ex.num_subjects == 3 and ex.prompt == render.caption and ex.relation == "stacked"
    assert ex.keypoint_layouts == ("points",) * 3 and ex.subject_keypoints.shape == (3, 17, 2)
    np.testing.assert_allclose(ex.boxes, render.boxes.astype(np.float32))
    assert ex.subject_images[0].tobytes() == world.portrait(render.identities[0])[0].tobytes()


def test_train_toy_cli_refuses_a_folder_that_is_not_a_run(runner, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = invoke(runner, "models", "train-toy", tmp_path)
    assert result.exit_code == 2 and "holds no toy training run" in result.output
    result = invoke(runner, "models", "train-toy", tmp_path / "new", "--held-out", "hugging")
    assert result.exit_code == 2 and "--held-out: relation must be one of" in result.output
    assert not (tmp_path / "new").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A toy training run of a few steps per stage (the weights learn nothing here; the plumbing is the point)."""
    out = tmp_path_factory.mktemp("toy-run")
    train_toy(out, ToySettings(**QUICK), measure_cases=0)
    return out


@pytest.mark.slow
def test_train_toy_writes_a_model_folder_that_loads_as_a_preset(trained):
    from dreamrelation.model.presets import load_pipeline

    model = trained / "model"
    for part in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                 "tokenizer/tokenizer_config.json", "adapter/ms_adapter.safetensors", "image_encoder/model.safetensors",
                 "metrics/clip/config.json", "metrics/dino/config.json", "card.json"):
        assert (model / part).is_file(), part
    card = json.loads((trained / "card.json").read_text())
    assert card == json.loads((model / "card.json").read_text())
    assert {k: v["steps"] for k, v in card["stages"].items()} == {"vae": 2, "base": 2, "adapter": 2, "clip": 2}
    assert card["data"]["held_out"] == "on_top_of" and "on_top_of" not in card["data"]["relations"]
    assert card["size_bytes"] > 1e6 and card["machine"]["cpus"] >= 1
    assert "oracle" not in card  # measure_cases=0
    vae = json.loads((model / "vae/config.json").read_text())
    assert vae["scaling_factor"] == pytest.approx(card["stages"]["vae"]["scaling_factor"], rel=1e-5)
    pipe = load_pipeline(str(model))
    assert pipe.vae_scale_factor == 4 and pipe.tokenizer.tokenize("red") == ["red</w>"]
    image = pipe("A red solid circle is next to a blue striped square.", [world.portrait(i)[0] for i in (
        world.Identity("circle", "red", "solid"), world.Identity("square", "blue", "striped"))],
        ["red solid circle", "blue striped square"], [[0.05, 0.3, 0.45, 0.7], [0.55, 0.3, 0.95, 0.7]],
        num_inference_steps=2, height=64, width=64, progress=False).images[0]
    assert image.size == (64, 64)


@pytest.mark.slow
def test_train_toy_resumes_grows_steps_and_refuses_other_settings(trained):
    before = torch.load(trained / CHECKPOINTS / "base.pt", weights_only=False)
    assert before["step"] == 2 and before["settings"]["base_batch"] == 4
    with pytest.raises(SettingsChanged, match=r"scenes=24 there, 30 now"):
        train_toy(trained, ToySettings(**{**QUICK, "scenes": 30}), measure_cases=0)
    vae = (trained / CHECKPOINTS / "vae.pt").read_bytes()
    with pytest.raises(SettingsChanged, match=r"base.pt was trained with other settings: vae_steps=2 there, 3 now"):
        train_toy(trained, ToySettings(**{**QUICK, "vae_steps": 3}), measure_cases=0)  # base sits on that VAE
    with pytest.raises(SettingsChanged, match=r"clip.pt is at step 2, beyond clip_steps=1"):
        train_toy(trained, ToySettings(**{**QUICK, "clip_steps": 1}), measure_cases=0)
    assert (trained / CHECKPOINTS / "vae.pt").read_bytes() == vae  # refused before anything trained
    result = train_toy(trained, ToySettings(**{**QUICK, "clip_steps": 3}), measure_cases=0)
    assert result.card["stages"]["clip"]["steps"] == 3
    assert torch.load(trained / CHECKPOINTS / "clip.pt", weights_only=False)["step"] == 3
    after = torch.load(trained / CHECKPOINTS / "base.pt", weights_only=False)
    assert after["step"] == 2 and all(torch.equal(after["modules"]["unet"][k], v)
                                      for k, v in before["modules"]["unet"].items())  # a finished stage stays


@pytest.mark.slow
def test_the_paper_in_miniature_writes_its_table(trained, tmp_path):
    from dreamrelation.train.toy_paper import PaperSettings

    report = run_paper(str(trained / "model"), tmp_path, PaperSettings(triplets=2, steps=1, batch_size=1, cases=2,
                                                                       sampling_steps=2),
                       configs=("base", "lora_kml_no_local"))
    assert report["held_out"] == "on_top_of" and list(report["results"]) == ["base", "lora_kml_no_local"]
    kml = report["results"]["lora_kml_no_local"]
    assert kml["profile"] == "paper" and kml["local_tokens"] is False and kml["cases"] == 2
    assert (tmp_path / "loras" / "lora_kml_no_local" / "pytorch_lora_weights.safetensors").is_file()
    table = (tmp_path / "paper_in_miniature.md").read_text()
    assert "| base | - | - |" in table and "| lora_kml_no_local | yes | no |" in table
    assert "| identity accuracy | shape + colour | relation accuracy | both |" in table
    assert json.loads((tmp_path / "paper_in_miniature.json").read_text()) == report


def test_the_command_defaults_are_the_settings_defaults():
    import inspect
    from dataclasses import asdict

    from commands.generate import train_toy_cmd

    params = inspect.signature(train_toy_cmd).parameters
    shared = {k: v for k, v in asdict(ToySettings()).items() if k in params}
    assert len(shared) >= 8 and all(params[k].default == v for k, v in shared.items()), shared


def test_the_paper_command_defaults_are_the_settings_defaults():
    import inspect
    from dataclasses import asdict

    from commands.eval import eval_toy_paper
    from dreamrelation.train.toy_paper import PaperSettings

    params = inspect.signature(eval_toy_paper).parameters
    defaults = asdict(PaperSettings())
    defaults["lr"] = defaults.pop("learning_rate")
    shared = {k: v for k, v in defaults.items() if k in params}
    assert len(shared) >= 6 and all(params[k].default == v for k, v in shared.items()), shared


@pytest.mark.slow
def test_the_readme_train_toy_line(runner, tmp_path, monkeypatch):
    """The README's `models train-toy` line from a fresh folder (its relative OUTPUT), with a few steps per stage
    appended (the line as written trains for 75 minutes): the model folder and the card land under OUTPUT."""
    from test_evaluate import readme_command

    args = readme_command("models train-toy")
    monkeypatch.chdir(tmp_path)
    quick = [f"--{k.replace('_', '-')}={v}" for k, v in QUICK.items() if "batch" not in k]
    result = invoke(runner, *args, *quick, "--eval-cases", 2)
    assert result.exit_code == 0, result.output
    out = tmp_path / args[2]
    assert f"toy model written to {out / 'model'}" in result.output
    assert "base_seen: identity " in result.output and "of 2 (oracle)" in result.output
    assert json.loads((out / "card.json").read_text())["oracle"]["adapter_held_out"]["cases"] == 2
