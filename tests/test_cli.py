"""The ``dreamrelation`` CLI on the tiny preset: build-tiny, generate (options and the authors' configs), errors.

Every generate call runs 2 steps at 64 px. Bad input exits with code 2 and an ``error:`` line naming the option
and the value.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_subject, public_data
from PIL import Image
from typer.testing import CliRunner

import cli

FAST = ["--width", "64", "--height", "64", "--steps", "2"]
BOXES = ["--box", "0,0.1,0.5,0.9", "--box", "0.5,0.1,1,0.9"]


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Two subject PNGs and a file that is not an image."""
    folder = tmp_path_factory.mktemp("subjects")
    out = {}
    for name, seed in (("dog", 0), ("cat", 1)):
        out[name] = folder / f"{name}.png"
        make_subject(seed).save(out[name])
    out["text"] = folder / "notes.png"
    out["text"].write_text("not an image")
    return out


@pytest.fixture(scope="module")
def lora_file(tiny_dir, tmp_path_factory) -> Path:
    """A relation LoRA for the tiny UNet (on its own UNet copy), with non-zero up weights so that it changes images."""
    from diffusers import UNet2DConditionModel

    from dreamrelation.model.lora import add_relation_lora, save_relation_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_dir / "unet")
    add_relation_lora(unet, "hug")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.5)
    return save_relation_lora(unet, "hug", tmp_path_factory.mktemp("lora") / "hug")


def subject_args(files, names=("dog", "cat")) -> list[str]:
    args = []
    for name in names:
        args += ["--subject", str(files[name]), "--phrase", name]
    return args


def invoke(runner, args: list[str]):
    result = runner.invoke(cli.app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


# ---- models build-tiny ------------------------------------------------------------------------------------------
def test_build_tiny_writes_a_model_folder_and_refuses_a_non_empty_one(runner, tmp_path):
    target = tmp_path / "tiny"
    result = invoke(runner, ["models", "build-tiny", target])
    assert result.exit_code == 0, result.output
    assert (target / "model_index.json").is_file()
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler",
                "image_encoder", "adapter"):
        assert (target / sub).is_dir(), sub
    assert (target / "adapter" / "ms_adapter.safetensors").is_file()
    assert (target / "adapter" / "adapter_config.json").is_file()

    result = invoke(runner, ["models", "build-tiny", target])
    assert result.exit_code == 2
    assert "not an empty folder" in result.output and str(target) in result.output


# ---- generate ---------------------------------------------------------------------------------------------------
def test_generate_two_subjects(runner, files, tiny_dir, tmp_path):
    out = tmp_path / "out"
    result = invoke(runner, ["generate", "--prompt", "a dog is hugging a cat", *subject_args(files), *BOXES,
                             "--preset", tiny_dir, *FAST, "--num-images", "2", "--seed", "5", "--output", out])
    assert result.exit_code == 0, result.output
    for name in ("0.png", "1.png", "0_layout.png", "1_layout.png"):
        assert Image.open(out / name).size == (64, 64), name
    first, second = pixels(out / "0.png"), pixels(out / "1.png")
    assert np.abs(first - second).mean() > 1, "image k uses seed + k: the two images must differ"
    assert np.abs(pixels(out / "0_layout.png") - first).sum() > 0, "the layout picture has the boxes drawn"

    record = json.loads((out / "generation.json").read_text())
    assert record["prompt"] == "a dog is hugging a cat"
    assert record["subjects"] == [str(files["dog"]), str(files["cat"])]
    assert record["phrases"] == ["dog", "cat"]
    assert record["boxes"] == [[0.0, 0.1, 0.5, 0.9], [0.5, 0.1, 1.0, 0.9]]
    assert record["seeds"] == [5, 6]
    assert (record["width"], record["height"], record["steps"]) == (64, 64, 2)
    assert record["lora"] is None and record["relation"] is None
    assert record["images"] == [str(out / "0.png"), str(out / "1.png")]
    assert record["negative_prompt"]  # the default is written out, not left implicit


def test_generate_defaults_to_the_tiny_preset_at_its_native_size(runner, files, tmp_path):
    """No --preset: the tiny preset, as `batch submit` (the only model this machine has); no size: the model's."""
    out = tmp_path / "out"
    result = invoke(runner, ["generate", "--prompt", "a dog is hugging a cat", *subject_args(files), *BOXES,
                             "--steps", "1", "--output", out])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "generation.json").read_text())["preset"] == "tiny"
    assert Image.open(out / "0.png").size == (128, 128)  # tiny: unet sample_size 16 x vae factor 8


def test_a_box_under_a_pixel_wide_is_drawn(runner, files, tmp_path):
    """0.5..0.505 of 64 px is a third of a pixel: the layout picture still gets a one-pixel box."""
    out = tmp_path / "out"
    result = invoke(runner, ["generate", "--prompt", "a dog is hugging a cat", *subject_args(files),
                             "--box", "0.5,0.5,0.505,0.6", "--box", "0,0,1,1", "--preset", "tiny", *FAST,
                             "--output", out])
    assert result.exit_code == 0, result.output
    assert Image.open(out / "0_layout.png").size == (64, 64)


@pytest.mark.parametrize("name, phrases", [
    ("example_two_objects.yaml", ["cat", "plushie bear"]),
    ("example_three_objects.yaml", ["dog", "cat", "plushie bear"]),
])
def test_generate_from_public_config_with_lora(runner, lora_file, tmp_path, name, phrases):
    config = public_data() / "config" / name
    out = tmp_path / "out"
    result = invoke(runner, ["generate", "--config", config, "--lora", lora_file, "--preset", "tiny", *FAST,
                             "--output", out])
    assert result.exit_code == 0, result.output
    assert Image.open(out / "0.png").size == (64, 64)
    assert (out / "0_layout.png").is_file()
    record = json.loads((out / "generation.json").read_text())
    assert record["prompt"].startswith("A cat is hugging with")
    assert record["phrases"] == phrases and len(record["boxes"]) == len(phrases)
    assert [Path(s).parent for s in record["subjects"]] == [public_data() / "assets" / "image_prompts"] * len(phrases)
    assert record["lora"] == str(lora_file) and record["relation"] == "hug"


def test_the_lora_changes_the_image(runner, lora_file, tmp_path):
    config = public_data() / "config" / "example_two_objects.yaml"
    common = ["generate", "--config", config, "--preset", "tiny", *FAST]
    assert invoke(runner, [*common, "--lora", lora_file, "--output", tmp_path / "a"]).exit_code == 0
    assert invoke(runner, [*common, "--no-lora", "--output", tmp_path / "b"]).exit_code == 0
    assert np.abs(pixels(tmp_path / "a" / "0.png") - pixels(tmp_path / "b" / "0.png")).mean() > 1
    assert json.loads((tmp_path / "b" / "generation.json").read_text())["lora"] is None


def test_config_lora_that_does_not_exist_is_named(runner, tmp_path):
    config = public_data() / "config" / "example_two_objects.yaml"
    result = invoke(runner, ["generate", "--config", config, "--preset", "tiny", *FAST, "--output", tmp_path])
    assert result.exit_code == 2
    assert "lora-trained-xl-hugging-0.1kp-0.001cal-0.6/pytorch_lora_weights.safetensors" in result.output
    assert "--lora" in result.output and "--no-lora" in result.output
    assert not (tmp_path / "0.png").exists()


# ---- bad input: exit code 2, the option and the value named ------------------------------------------------------
BAD = {
    "box outside [0, 1]": (["--box", "0.1,0.2,1.5,0.9", "--box", "0.5,0.1,1,0.9"], ["--box", "0.1,0.2,1.5,0.9"]),
    "box of three numbers": (["--box", "1,2,3", "--box", "0.5,0.1,1,0.9"], ["--box", "1,2,3", "four"]),
    "box not numbers": (["--box", "a,b,c,d", "--box", "0.5,0.1,1,0.9"], ["--box", "a,b,c,d"]),
    "box x0 >= x1": (["--box", "0.6,0.1,0.5,0.9", "--box", "0.5,0.1,1,0.9"], ["--box", "x0 < x1"]),
    "width not a multiple of 8": ([*BOXES, "--width", "100"], ["--width", "100"]),
    "zero steps": ([*BOXES, "--steps", "0"], ["--steps", "0"]),
    "zero images": ([*BOXES, "--num-images", "0"], ["--num-images", "0"]),
    "unknown preset": ([*BOXES, "--preset", "foo"], ["--preset", "'foo'", "tiny", "sdxl"]),
    "box count": (["--box", "0,0.1,0.5,0.9"], ["--subject, --phrase and --box", "2 subjects", "1 boxes"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_option_is_named(runner, files, tmp_path, case):
    args, needles = BAD[case]
    base = ["generate", "--prompt", "a dog is hugging a cat", *subject_args(files), "--preset", "tiny", *FAST]
    result = invoke(runner, [*base, *args, "--output", tmp_path / "out"])
    assert result.exit_code == 2, result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)
    assert not (tmp_path / "out").exists()


def test_missing_and_unreadable_subjects_are_named(runner, files, tmp_path):
    base = ["generate", "--prompt", "a dog is hugging a cat", "--phrase", "dog", "--phrase", "cat", *BOXES,
            "--preset", "tiny", *FAST, "--output", tmp_path / "out"]
    missing = tmp_path / "missing.png"
    result = invoke(runner, [*base, "--subject", files["dog"], "--subject", missing])
    assert result.exit_code == 2
    assert "--subject" in result.output and str(missing) in result.output and "not found" in result.output

    result = invoke(runner, [*base, "--subject", files["dog"], "--subject", files["text"]])
    assert result.exit_code == 2
    assert "--subject" in result.output and str(files["text"]) in result.output
    assert "not a readable image" in result.output


def test_subject_and_phrase_counts_must_match(runner, files, tmp_path):
    result = invoke(runner, ["generate", "--prompt", "a dog", "--subject", files["dog"], "--subject", files["cat"],
                             "--phrase", "dog", *BOXES, "--preset", "tiny", *FAST, "--output", tmp_path])
    assert result.exit_code == 2
    assert "--subject, --phrase and --box" in result.output and "1 phrases" in result.output


def test_missing_inputs_and_conflicting_lora_options(runner, files, lora_file, tmp_path):
    result = invoke(runner, ["generate", "--prompt", "a dog", "--preset", "tiny"])
    assert result.exit_code == 2
    assert "missing --subject, --phrase, --box" in result.output

    result = invoke(runner, ["generate", "--prompt", "a dog is hugging a cat", *subject_args(files), *BOXES,
                             "--lora", lora_file, "--no-lora", "--preset", "tiny", *FAST])
    assert result.exit_code == 2
    assert "--lora" in result.output and "--no-lora" in result.output

    result = invoke(runner, ["generate", "--config", tmp_path / "nope.yaml", "--preset", "tiny"])
    assert result.exit_code == 2
    assert "--config" in result.output and "nope.yaml" in result.output

    not_a_lora = tmp_path / "x.safetensors"
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(not_a_lora))
    result = invoke(runner, ["generate", "--prompt", "a dog is hugging a cat", *subject_args(files), *BOXES,
                             "--lora", not_a_lora, "--preset", "tiny", *FAST, "--output", tmp_path / "out"])
    assert result.exit_code == 2
    assert str(not_a_lora) in result.output and "no LoRA tensors" in result.output
