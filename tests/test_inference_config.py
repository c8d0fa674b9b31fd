"""The authors' YAML inference configs: the public examples parse; bad ones fail naming the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import public_data

from dreamrelation.model.inference_config import (
    AuthorsConfig,
    load_authors_config,
    resolve_path,
)


@pytest.mark.parametrize("name, phrases", [
    ("example_two_objects.yaml", ["cat", "plushie bear"]),
    ("example_three_objects.yaml", ["dog", "cat", "plushie bear"]),
])
def test_public_configs_parse(name, phrases):
    root = public_data()
    cfg = load_authors_config(root / "config" / name)
    assert isinstance(cfg, AuthorsConfig)
    assert cfg.prompt.startswith("A cat is hugging with")
    assert cfg.phrases == phrases
    assert len(cfg.images) == len(cfg.boxes) == len(phrases)
    for image in cfg.images:  # "assets/..." resolves against the config folder's parent
        assert image.is_file(), image
        assert image.parent == root / "assets" / "image_prompts"
    for box in cfg.boxes:
        assert len(box) == 4 and all(type(v) is float for v in box)
        assert box[0] < box[2] and box[1] < box[3]
    assert cfg.boxes[0] == ([0.0, 0.2, 0.55, 0.85] if len(phrases) == 2 else [0.0, 0.2, 0.45, 0.85])
    assert cfg.lora == root / "lora-weights/lora-trained-xl-hugging-0.1kp-0.001cal-0.6/pytorch_lora_weights.safetensors"
    assert not cfg.lora.exists()  # not part of the public sample: the caller decides what a missing LoRA means


def _write(tmp_path: Path, data, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


VALID = dict(prompt="a dog hugs a cat", images_path=["a.png", "b.png"], boxes=[[[0, 0, 0.5, 1], [0.5, 0, 1, 1]]],
             phrases=[["dog", "cat"]])


def test_flat_layout_and_class_names_are_accepted(tmp_path):
    data = dict(VALID, boxes=[[0, 0, 0.5, 1], [0.5, 0, 1, 1]], class_names=["dog", "cat"])
    del data["phrases"]
    cfg = load_authors_config(_write(tmp_path, data))
    assert cfg.boxes == [[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]]
    assert cfg.phrases == ["dog", "cat"]
    assert cfg.lora is None
    # not found anywhere: expected beside the config's parent, as in the authors' layout
    assert cfg.images == [tmp_path.parent / "a.png", tmp_path.parent / "b.png"]


def test_single_subject_flat_layout(tmp_path):
    cfg = load_authors_config(_write(tmp_path, dict(VALID, images_path=["a.png"], boxes=[[0.1, 0.1, 0.9, 0.9]],
                                                    phrases=["dog"])))
    assert cfg.boxes == [[0.1, 0.1, 0.9, 0.9]] and cfg.phrases == ["dog"]


def test_paths_resolve_next_to_the_config_first(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(b"")
    monkeypatch.chdir(tmp_path.parent)
    cfg_path = _write(tmp_path, VALID)
    assert resolve_path("a.png", cfg_path) == tmp_path / "a.png"
    assert resolve_path(str(tmp_path / "x.png"), cfg_path) == tmp_path / "x.png"  # absolute: as is


@pytest.mark.parametrize("change, message", [
    (dict(prompt=None), "'prompt' must be a non-empty string"),
    (dict(prompt=""), "'prompt' must be a non-empty string"),
    (dict(images_path="a.png"), "'images_path' must be a non-empty list of paths, got 'a.png'"),
    (dict(boxes=[[[0, 0, 1]]]), "boxes[0] must be four numbers [x0, y0, x1, y1], got [0, 0, 1]"),
    (dict(boxes=[[["a", 0, 1, 1], [0, 0, 1, 1]]]), "boxes[0] must be four numbers"),
    (dict(boxes=[]), "field 'boxes' must be a non-empty list, got []"),
    (dict(phrases=[["dog"]]), "got 2 images_path, 1 phrases, 2 boxes"),
    (dict(phrases=[["dog", ""]]), "field 'phrases' must hold non-empty strings"),
    (dict(phrases=None), "needs 'phrases' or 'class_names'"),
    (dict(lora_weights=3), "field 'lora_weights' must be a path, got 3"),
])
def test_bad_fields_are_named(tmp_path, change, message):
    path = _write(tmp_path, {**VALID, **change})
    with pytest.raises(ValueError) as info:
        load_authors_config(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("field", ["prompt", "images_path", "boxes"])
def test_missing_field_is_named(tmp_path, field):
    data = {k: v for k, v in VALID.items() if k != field}
    with pytest.raises(ValueError, match=f"missing field '{field}'"):
        load_authors_config(_write(tmp_path, data))


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just a string\n", "str"), ("", "NoneType")])
def test_non_mapping_yaml_is_an_error(tmp_path, text, kind):
    with pytest.raises(ValueError, match=f"expected a mapping .* got {kind}"):
        load_authors_config(_write(tmp_path, text))


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not valid YAML"):
        load_authors_config(_write(tmp_path, "prompt: [unclosed\n"))
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_authors_config(tmp_path / "nope.yaml")
