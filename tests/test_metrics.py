"""Per-image metrics on the tiny CLIP / DINO models (built once per module under a fixed seed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dreamrelation import metrics as M
from dreamrelation.metrics import (
    CLIP_ID,
    DINO_ID,
    MetricModels,
    build_tiny_metric_components,
    build_tiny_metric_models,
    crop_box,
    get_metric_models,
    metric_model_refs,
    pair_scores,
)
from conftest import make_subject

KEYS = {"clip_t", "clip_r", "clip_i", "clip_i_crop", "dino", "clip_i_per_subject", "clip_i_crop_per_subject",
        "dino_per_subject"}


@pytest.fixture(scope="module")
def metric_dir(tmp_path_factory):
    return build_tiny_metric_models(tmp_path_factory.mktemp("model") / "metrics")


@pytest.fixture(scope="module")
def models(metric_dir) -> MetricModels:
    return MetricModels(metric_dir / "clip", metric_dir / "dino")


def noise(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype("uint8"))


def row_args(images, subjects_per_image=2):
    n = len(images)
    subjects = [[make_subject(10 + j) for j in range(subjects_per_image)] for _ in range(n)]
    boxes = [[[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]][:subjects_per_image] for _ in range(n)]
    prompts = [f"A dog is hugging a cat, take {i}." for i in range(n)]
    return images, prompts, ["hugging"] * n, subjects, boxes


# ------------------------------------------------------------------------------------------ the folder
def test_tiny_folder_layout(metric_dir):
    clip_cfg = json.loads((metric_dir / "clip" / "config.json").read_text())
    dino_cfg = json.loads((metric_dir / "dino" / "config.json").read_text())
    assert clip_cfg["projection_dim"] == 16 and clip_cfg["vision_config"]["image_size"] == 32
    assert dino_cfg["patch_size"] == 16 and dino_cfg["image_size"] == 64 and dino_cfg["hidden_size"] == 32
    assert (metric_dir / "clip" / "tokenizer_config.json").is_file()
    pre = json.loads((metric_dir / "dino" / M.PREPROCESS_FILE).read_text())
    assert pre["mean"] == list(M.IMAGENET_MEAN) and pre["crop"] == 64


def test_build_is_deterministic():
    a, b = build_tiny_metric_components(seed=0), build_tiny_metric_components(seed=0)
    for name in ("clip", "dino"):
        for (key, x), y in zip(a[name].state_dict().items(), b[name].state_dict().values()):
            assert torch.equal(x, y), f"{name}.{key} differs between two builds with the same seed"


def test_loaded_folder_equals_in_memory_models(models):
    built = build_tiny_metric_components(seed=0)
    in_memory = MetricModels.from_models(built["clip"], built["tokenizer"], built["dino"])
    args = row_args([noise(1), noise(2)])
    assert in_memory.score(*args) == models.score(*args)


# ---------------------------------------------------------------------------------------- embeddings
def test_embedding_shapes_and_norms(models):
    images = [noise(0), noise(1, (80, 48)), make_subject(3)]
    for embeds, dim in ((models.image_embeds(images), 16), (models.dino_embeds(images), 32),
                        (models.text_embeds(["a dog", "a cat", "x"]), 16)):
        assert embeds.shape == (3, dim) and embeds.dtype == torch.float32
        torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(3))


def test_text_embeds_differ_and_long_prompts_truncate(models):
    a, b, long = models.text_embeds(["a dog hugging a cat", "a lion playing guitar", "word " * 200])
    assert not torch.allclose(a, b)
    assert torch.isfinite(long).all()


def test_empty_inputs_are_rejected(models):
    with pytest.raises(ValueError, match="images"):
        models.image_embeds([])
    with pytest.raises(ValueError, match="texts"):
        models.text_embeds([])


# -------------------------------------------------------------------------------------------- scores
def test_scores_keys_and_range(models):
    results = models.score(*row_args([noise(0), noise(1)], subjects_per_image=2))
    assert len(results) == 2
    for r in results:
        assert set(r) == KEYS
        for key in ("clip_t", "clip_r", "clip_i", "clip_i_crop", "dino"):
            assert 0.0 <= r[key] <= 100.0, (key, r[key])
        for key in ("clip_i", "clip_i_crop", "dino"):
            per = r[f"{key}_per_subject"]
            assert len(per) == 2 and all(0.0 <= v <= 100.0 for v in per)
            assert r[key] == pytest.approx(sum(per) / 2)


def test_image_against_itself_scores_100(models):
    image = noise(5)
    [r] = models.score([image], ["a dog"], ["sitting"], [[image.copy()]], [[[0.0, 0.0, 1.0, 1.0]]])
    assert r["clip_i"] == pytest.approx(100.0, abs=1e-3)
    assert r["clip_i_crop"] == pytest.approx(100.0, abs=1e-3)
    assert r["dino"] == pytest.approx(100.0, abs=1e-3)


def test_box_crop_is_used(models):
    """Changing pixels outside subject 0's box moves clip_i but leaves clip_i_crop alone."""
    a = noise(7)
    pixels = np.asarray(a).copy()
    pixels[:, 40:] = 255 - pixels[:, 40:]  # box [0, 0, 0.5, 1] covers columns 0..31 of 64
    b = Image.fromarray(pixels)
    subject, box = make_subject(11), [0.0, 0.0, 0.5, 1.0]
    ra, rb = models.score([a, b], ["a dog"] * 2, ["sitting"] * 2, [[subject], [subject]], [[box], [box]])
    assert ra["clip_i_crop"] == pytest.approx(rb["clip_i_crop"], abs=1e-4)
    assert ra["clip_i"] != pytest.approx(rb["clip_i"], abs=1e-4)
    assert ra["dino"] != pytest.approx(rb["dino"], abs=1e-4)


def test_batch_equals_single_calls(models):
    images, prompts, phrases, subjects, boxes = row_args([noise(20), noise(21, (96, 64)), noise(22)])
    batched = models.score(images, prompts, phrases, subjects, boxes)
    for i, expected in enumerate(batched):
        [single] = models.score([images[i]], [prompts[i]], [phrases[i]], [subjects[i]], [boxes[i]])
        assert single.keys() == expected.keys()
        for key, value in single.items():
            assert value == pytest.approx(expected[key], abs=1e-3), key


def test_each_unique_subject_is_encoded_once(models, monkeypatch):
    seen: list[int] = []
    original = MetricModels.image_embeds

    def spy(self, images):
        seen.append(len(images))
        return original(self, images)

    monkeypatch.setattr(MetricModels, "image_embeds", spy)
    s = make_subject(30)
    subjects = [[s, make_subject(31)], [s.copy()], [s]]  # one object twice, an equal copy, a second subject
    boxes = [[[0, 0, 1, 1], [0, 0, 0.5, 0.5]], [[0.2, 0.2, 0.8, 0.8]], [[0, 0, 1, 1]]]
    results = models.score([noise(0)] * 3, ["a"] * 3, ["b"] * 3, subjects, boxes)
    assert seen == [3 + 2 + 4]  # one forward: 3 generated images, 2 unique subjects, 4 box crops
    assert [len(r["clip_i_per_subject"]) for r in results] == [2, 1, 1]


def test_image_without_subjects_gets_none(models):
    [r] = models.score([noise(0)], ["a dog"], ["sitting"], [[]], [[]])
    assert r["clip_i"] is None and r["dino"] is None and r["clip_i_per_subject"] == []
    assert 0.0 <= r["clip_t"] <= 100.0


@pytest.mark.parametrize("change, match", [
    (dict(prompts=["a", "b"]), "prompts must have one entry per image"),
    (dict(boxes=[[]]), r"boxes\[0\] must have one box per subject"),
    (dict(boxes=[[[0.5, 0.0, 0.4, 1.0]]]), r"boxes\[0\]\[0\]"),
    (dict(boxes=[[[0.0, 0.0, float("nan"), 1.0]]]), r"boxes\[0\]\[0\]"),
    (dict(subject_images=[["not an image"]]), r"subject_images\[0\]\[0\]"),
    (dict(images=[None]), r"images\[0\]"),
])
def test_bad_arguments_name_the_argument(models, change, match):
    args = dict(images=[noise(0)], prompts=["a dog"], relation_phrases=["sitting"],
                subject_images=[[make_subject(1)]], boxes=[[[0.0, 0.0, 1.0, 1.0]]])
    with pytest.raises(ValueError, match=match):
        models.score(**{**args, **change})


# -------------------------------------------------------------------------------------- pure helpers
def test_pair_scores():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [4.0, 3.0]])
    torch.testing.assert_close(pair_scores(a, b), torch.tensor([100.0, 0.0, 0.0, 96.0]))
    with pytest.raises(ValueError, match="a and b"):
        pair_scores(a, b[:2])


def test_crop_box_pixels():
    image = noise(0, (100, 50))
    assert crop_box(image, [0.0, 0.0, 1.0, 1.0]).size == (100, 50)
    assert crop_box(image, [0.101, 0.2, 0.5, 0.6]).size == (40, 20)  # edges rounded outwards: x 10..50, y 10..30
    assert crop_box(image, [0.5, 0.5, 0.5001, 0.5001]).size == (1, 1)
    assert crop_box(image, [0.9999, 0.9999, 1.0, 1.0]).size == (1, 1)
    with pytest.raises(ValueError, match="box"):
        crop_box(image, [0.0, 0.0, 1.2, 1.0])


# ---------------------------------------------------------------------------------- presets / holder
def test_refs_pick_the_tiny_folder(metric_dir, tmp_path):
    model_dir = metric_dir.parent
    assert metric_model_refs(model_dir) == (str(metric_dir / "clip"), str(metric_dir / "dino"))
    assert metric_model_refs(tmp_path) == (CLIP_ID, DINO_ID)  # a folder without metrics/: the public ids
    assert metric_model_refs("sdxl") == (CLIP_ID, DINO_ID)
    models = MetricModels.for_preset(model_dir)
    assert models.clip.config.projection_dim == 16 and models.dino.config.hidden_size == 32


def test_tiny_preset_builds_its_metric_models(tiny_dir):
    clip, dino = metric_model_refs("tiny")
    assert clip == str(tiny_dir / "metrics" / "clip") and dino == str(tiny_dir / "metrics" / "dino")
    assert metric_model_refs("tiny") == (clip, dino)  # second call: already there, nothing rebuilt


def test_models_are_held_once_per_process(metric_dir, monkeypatch):
    monkeypatch.setattr(M, "_HELD", {})
    a = get_metric_models(metric_dir / "clip", metric_dir / "dino")
    b = get_metric_models(str(metric_dir / "clip"), str(metric_dir / "dino"), device="cpu")
    assert a is b
    assert len(M._HELD) == 1
