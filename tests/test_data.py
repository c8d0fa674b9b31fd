"""dreamrelation.train.data: the public-folder importer (synthetic and real), examples, augmentation, tensors."""

from __future__ import annotations

import dataclasses
import io
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from dreamrelation.train.data import (
    AP10K_FLIP,
    AP10K_KEYPOINTS,
    COCO_KEYPOINTS,
    KEYPOINT_FLIPS,
    LAYOUTS_KEY,
    TripletExample,
    augment,
    example_from_record,
    import_public_folder,
    mask_box,
    to_tensors,
)
from manifests.triplets import TripletRow, read_triplets, write_triplets
from tests.conftest import make_subject, public_data

PNG = b"\x89PNG\r\n\x1a\n"
W, H = 96, 64  # synthetic targets are not square


# ------------------------------------------------------------------------------------------- synthetic public folder

def _save(image: Image.Image, path: Path, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    path.write_bytes(buffer.getvalue())


def _grid_keypoints(box: tuple[float, float, float, float], jitter: float = 0.0) -> np.ndarray:
    """17 normalized keypoints spread inside ``box``."""
    x0, y0, x1, y1 = box
    j = np.arange(17)
    xs = x0 + (x1 - x0) * (0.1 + 0.8 * ((j * 5) % 17) / 16) + jitter
    ys = y0 + (y1 - y0) * (0.1 + 0.8 * j / 16)
    return np.stack([xs, ys], -1).astype(np.float32)


BOXES = ((2 / 32, 2 / 16, 14 / 32, 14 / 16), (18 / 32, 3 / 16, 30 / 32, 15 / 16))  # subject masks (pixel-aligned)


def make_sample(root: Path, sid: str, *, webp_target: bool = False, swap_target_sets: bool = False,
                pixel_keypoints: bool = False, skip: tuple[str, ...] = ()) -> None:
    video, masks = root / "videos" / sid, root / "masks" / sid
    video.mkdir(parents=True, exist_ok=True)
    _save(make_subject(int(sid) * 7, 40).resize((W, H)), video / "motion.png", "WEBP" if webp_target else "PNG")
    for k in range(2):
        _save(make_subject(int(sid) * 7 + k + 1, 48), video / f"concept{k}.png")
        mask = Image.new("L", (W, H), 0)
        x0, y0, x1, y1 = BOXES[k]
        ImageDraw.Draw(mask).rectangle([round(x0 * W), round(y0 * H), round(x1 * W) - 1, round(y1 * H) - 1], fill=255)
        _save(mask, masks / f"motion{k}.png")
    target_sets = np.stack([_grid_keypoints(b) for b in BOXES])  # (2, 17, 2)
    if swap_target_sets:
        target_sets = target_sets[::-1].copy()
    if pixel_keypoints:
        target_sets = target_sets * np.array([W, H], np.float32)
    torch.save(torch.from_numpy(target_sets), video / "motion_keyposes.pth")
    for k, name in enumerate(("one", "two")):
        torch.save(torch.from_numpy(_grid_keypoints((0.2, 0.2, 0.8, 0.8), 0.01 * k))[None],
                   video / f"concept_keyposes_{name}.pth")
    for name in skip:
        (video / name).unlink()


def make_public_folder(root: Path, prompts: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "prompts.json").write_text(json.dumps(prompts))
    return root


@pytest.fixture
def synthetic(tmp_path) -> Path:
    """3 samples: 0 good with predicate (target is WebP bytes in motion.png, target keypoint sets swapped), 1 good
    without predicate (pixel keypoints), 2 broken (missing concept_keyposes_two.pth)."""
    root = make_public_folder(tmp_path / "hug", {
        "0": {"prompt": "A dog and a cat hug.", "entities": ["dog", "cat"], "predicate": ["hug"]},
        "1": {"prompt": "A fox is hugging a bear.", "entities": ["fox", "bear"]},
        "2": {"prompt": "A cow hugs a pig.", "entities": ["cow", "pig"], "predicate": ["hugs"]},
    })
    make_sample(root, "0", webp_target=True, swap_target_sets=True)
    make_sample(root, "1", pixel_keypoints=True)
    make_sample(root, "2", skip=("concept_keyposes_two.pth",))
    return root


def test_import_synthetic_folder(synthetic):
    assert Image.open(synthetic / "videos/0/motion.png").format == "WEBP"
    records, problems = import_public_folder(str(synthetic), "hugging")
    assert [r["triplet_id"] for r in records] == ["hugging-0", "hugging-1"]
    assert len(problems) == 1 and problems[0]["sample"] == "2"
    assert "missing keypoint file" in problems[0]["reason"] and "concept_keyposes_two.pth" in problems[0]["reason"]

    rows = [TripletRow.model_validate(r) for r in records]  # the records are TripletRow-shaped
    first, second = rows
    assert first.relation_phrase == "hug" and first.metadata["relation_phrase_from"] == "predicate"
    assert second.relation_phrase == "hugging" and second.metadata["relation_phrase_from"] == "prompt"
    assert first.target == str(synthetic / "videos/0/motion.png")  # the originals
    assert [s.phrase for s in first.subjects] == ["dog", "cat"]
    for r in rows:
        for k, s in enumerate(r.subjects):
            assert s.box == pytest.approx(list(BOXES[k]), abs=1e-6)  # from the masks, pixel-edge convention
            # each subject gets the keypoint set lying in its mask (sample 0's file order is swapped) ...
            np.testing.assert_allclose(s.target_keypoints, _grid_keypoints(BOXES[k]), atol=1e-5)
            np.testing.assert_allclose(s.subject_keypoints, _grid_keypoints((0.2, 0.2, 0.8, 0.8), 0.01 * k),
                                       atol=1e-6)  # ... and pixel keypoints (sample 1) are normalized
    assert first.metadata["target_keypoint_sets"] == "1,0" and "target_keypoint_sets" not in second.metadata


def test_import_keeps_file_order_when_asked(synthetic):
    records, _ = import_public_folder(str(synthetic), "hugging", match_keypoints=False)
    np.testing.assert_allclose(records[0]["subjects"][0]["target_keypoints"], _grid_keypoints(BOXES[1]), atol=1e-5)


def test_import_reencodes_to_png_in_output(synthetic, tmp_path):
    out = str(tmp_path / "dataset")
    records, problems = import_public_folder(str(synthetic), "hugging", output=out)
    assert len(records) == 2 and len(problems) == 1
    r = records[0]
    assert r["target"] == f"{out}/images/hugging-0/target.png"
    assert [s["image"] for s in r["subjects"]] == [f"{out}/images/hugging-0/subject{k}.png" for k in range(2)]
    assert [s["mask"] for s in r["subjects"]] == [f"{out}/images/hugging-0/mask{k}.png" for k in range(2)]
    for uri in [r["target"], *[s["image"] for s in r["subjects"]], *[s["mask"] for s in r["subjects"]]]:
        assert Path(uri).read_bytes().startswith(PNG)  # real PNGs, WebP source included
    original = np.asarray(Image.open(synthetic / "videos/0/motion.png").convert("RGB"))
    np.testing.assert_array_equal(np.asarray(Image.open(r["target"])), original)  # lossless re-encode

    # the records are a dataset: write, read back, load as examples
    write_triplets(records, out)
    rows, rejected = read_triplets(out)
    assert rejected == [] and [row.target for row in rows] == [rec["target"] for rec in records]
    example = example_from_record(rows[0].to_record())
    assert example.target.size == (W, H) and example.num_subjects == 2
    assert example.target_masks[1].shape == (H, W) and mask_box(example.target_masks[1]) == pytest.approx(BOXES[1])


def test_import_writes_through_fsspec(synthetic):
    out = f"memory://import-{uuid.uuid4().hex[:8]}"
    records, _ = import_public_folder(str(synthetic), "hugging", output=out)
    assert records[1]["subjects"][0]["image"] == f"{out}/images/hugging-1/subject0.png"
    write_triplets(records, out)
    rows, rejected = read_triplets(out)
    assert rejected == [] and len(rows) == 2
    example = example_from_record(rows[0].to_record())  # default loader: fsspec
    assert example.target.size == (W, H) and example.target_masks[0].any()


def test_import_reports_each_kind_of_broken_sample(tmp_path):
    prompts = {str(i): {"prompt": f"A dog hugs a cat {i}.", "entities": ["dog", "cat"]} for i in range(7)}
    prompts["1"]["entities"] = ["dog", "cat", "owl"]
    prompts["6"] = {"prompt": "no folder", "entities": ["dog", "cat"]}
    root = make_public_folder(tmp_path / "broken", prompts)
    for sid in "0123457":
        make_sample(root, sid)
    (root / "videos/2/concept1.png").write_bytes(b"not an image at all")
    (root / "masks/3/motion1.png").unlink()
    (root / "videos/4/motion_keyposes.pth").write_bytes(b"garbage")
    torch.save(torch.zeros(3, 17, 2) + 0.5, root / "videos/5/motion_keyposes.pth")
    records, problems = import_public_folder(str(root), "hugging")
    assert [r["triplet_id"] for r in records] == ["hugging-0"]
    reasons = {p["sample"]: p["reason"] for p in problems}
    assert sorted(reasons) == ["1", "2", "3", "4", "5", "6", "7"]
    assert "entity count mismatch" in reasons["1"]
    assert "unreadable image" in reasons["2"] and "concept1.png" in reasons["2"]
    assert "missing mask" in reasons["3"] and "motion1.png" in reasons["3"]
    assert "unreadable keypoint file" in reasons["4"]
    assert "entity count mismatch" in reasons["5"] and "3 keypoint sets" in reasons["5"]
    assert "missing sample folder" in reasons["6"]
    assert "no entry in prompts.json" in reasons["7"]


def test_import_without_prompts_json_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="prompts.json"):
        import_public_folder(str(tmp_path), "hugging")
    with pytest.raises(ValueError, match="relation"):
        import_public_folder(str(tmp_path), "hug ging")


# --------------------------------------------------------------------------------------------- real public samples

@pytest.mark.parametrize("name, relation", [("hug", "hugging"), ("shake", "shaking_hands")])
def test_import_real_public_sets(name, relation):
    folder = public_data() / "data" / name
    records, problems = import_public_folder(str(folder), relation)
    assert problems == [] and len(records) == 5
    rows = [TripletRow.model_validate(r) for r in records]
    for row in rows:
        assert row.relation == relation and len(row.subjects) == 2
        assert row.metadata["relation_phrase_from"] == ("predicate" if name == "hug" else "prompt")
        for s in row.subjects:
            assert all(0.0 <= v <= 1.0 for v in s.box)
            assert np.all((np.array(s.target_keypoints) >= 0) & (np.array(s.target_keypoints) <= 1))
            assert np.all((np.array(s.subject_keypoints) >= 0) & (np.array(s.subject_keypoints) <= 1))
    if name == "shake":  # no predicate: derived from the prompt
        assert all("shak" in r.relation_phrase and "wolf" not in r.relation_phrase for r in rows)
        assert rows[0].relation_phrase == "shakes hands with"
        # the subjects stand apart, so each one's target keypoints must lie in its own mask
        for record in records:
            example = example_from_record(record)
            for k in range(2):
                px = np.clip((example.target_keypoints[k] * 1024).astype(int), 0, 1023)
                inside = [example.target_masks[m][px[:, 1], px[:, 0]].mean() for m in range(2)]
                assert inside[k] > 0.6 and inside[1 - k] < 0.3, (record["triplet_id"], k, inside)
    example = augment(example_from_record(records[0]), 128, np.random.default_rng(0))
    batch = to_tensors(example)
    assert batch["target"].shape == (3, 128, 128) and batch["subjects"].shape == (2, 3, 128, 128)


# --------------------------------------------------------------------------------------------------- augmentation

def _example(target: Image.Image, kp: np.ndarray, boxes, masks=None) -> TripletExample:
    s = len(boxes)
    return TripletExample(
        target=target, prompt="A dog hugs a cat.", relation_phrase="hugs",
        subject_images=[make_subject(k, 32) for k in range(s)], phrases=["dog", "cat"][:s],
        boxes=np.asarray(boxes, np.float32), target_masks=masks or [None] * s,
        target_keypoints=kp, subject_keypoints=np.stack([_grid_keypoints((0.2, 0.2, 0.8, 0.8))] * s))


def _dot_image(width: int, height: int, point: tuple[float, float], radius: float = 3.0) -> Image.Image:
    """Black image with a white disk centred at the continuous pixel position ``point``."""
    yy, xx = np.mgrid[0:height, 0:width] + 0.5  # pixel centres
    disk = (xx - point[0]) ** 2 + (yy - point[1]) ** 2 <= radius ** 2
    return Image.fromarray(np.repeat(disk[..., None] * 255, 3, -1).astype(np.uint8))


def _centroid(image: Image.Image) -> np.ndarray:
    g = np.asarray(image.convert("L"), np.float64)
    weight = np.clip(g - 40, 0, None)
    yy, xx = np.mgrid[0:g.shape[0], 0:g.shape[1]] + 0.5
    return np.array([(weight * xx).sum(), (weight * yy).sum()]) / weight.sum()


def test_keypoints_move_with_the_image():
    width, height, size = 240, 180, 96
    box = (0.3, 0.25, 0.75, 0.85)
    kp = np.stack([_grid_keypoints(box)])  # (1, 17, 2)
    kp[0, 0] = [0.41, 0.37]  # left eye: the one we draw
    target = _dot_image(width, height, (0.41 * width, 0.37 * height))
    flips = set()
    for seed in range(12):
        out = augment(_example(target, kp, [box]), size, np.random.default_rng(seed), crop_scale=(0.3, 1.0))
        # the drawn left eye: keypoint 0, or keypoint 1 (right eye) when the result was flipped
        found = _centroid(out.target)
        candidates = {j: out.target_keypoints[0, j] * size for j in (0, 1)}
        j = min(candidates, key=lambda j: np.abs(candidates[j] - found).max())
        assert np.abs(candidates[j] - found).max() <= 1.5, (seed, found, candidates)
        flips.add(j)
        assert out.target.size == (size, size) and all(im.size == (size, size) for im in out.subject_images)
    assert flips == {0, 1}  # both flipped and unflipped results were checked


def test_flip_mirrors_x_and_swaps_left_right():
    assert AP10K_KEYPOINTS[AP10K_FLIP[0]] == "right_eye" and AP10K_KEYPOINTS[AP10K_FLIP[1]] == "left_eye"
    assert AP10K_KEYPOINTS[AP10K_FLIP[7]] == "right_front_paw" and AP10K_KEYPOINTS[AP10K_FLIP[13]] == "right_back_paw"
    assert [AP10K_FLIP[j] for j in (2, 3, 4)] == [2, 3, 4] and all(AP10K_FLIP[AP10K_FLIP[j]] == j for j in range(17))
    box = (0.1, 0.2, 0.6, 0.9)
    kp = np.stack([_grid_keypoints(box)])
    visibility = np.linspace(0, 1, 17, dtype=np.float32)[None]
    example = _example(Image.new("RGB", (64, 64)), kp, [box])
    example = dataclasses.replace(example, visibility=visibility)
    out = augment(example, 64, np.random.default_rng(0), flip_p=1.0, crop_scale=(1.0, 1.0))
    for j in range(17):
        np.testing.assert_allclose(out.target_keypoints[0, j], [1 - kp[0, AP10K_FLIP[j], 0], kp[0, AP10K_FLIP[j], 1]],
                                   atol=1e-6)
    np.testing.assert_allclose(out.target_keypoints[0, 0], [1 - kp[0, 1, 0], kp[0, 1, 1]], atol=1e-6)  # L eye <- R eye
    np.testing.assert_allclose(out.visibility[0], visibility[0, list(AP10K_FLIP)])
    np.testing.assert_allclose(out.boxes[0], [0.4, 0.2, 0.9, 0.9], atol=1e-6)
    np.testing.assert_array_equal(out.subject_keypoints, example.subject_keypoints)  # subject images are not flipped


def test_flip_follows_each_subjects_keypoint_layout():
    """Engine points keep their order under a flip (they name places); COCO keypoints swap left and right."""
    assert COCO_KEYPOINTS[KEYPOINT_FLIPS["coco"][1]] == "right_eye"
    assert COCO_KEYPOINTS[KEYPOINT_FLIPS["coco"][16]] == "left_ankle" and KEYPOINT_FLIPS["coco"][0] == 0
    boxes = [(0.05, 0.1, 0.45, 0.9), (0.55, 0.1, 0.95, 0.9)]
    kp = np.stack([_grid_keypoints(b) for b in boxes])
    example = dataclasses.replace(_example(Image.new("RGB", (64, 64)), kp, boxes), keypoint_layouts=("points", "coco"))
    out = augment(example, 64, np.random.default_rng(0), flip_p=1.0, crop_scale=(1.0, 1.0))
    np.testing.assert_allclose(out.target_keypoints[0, :, 0], 1 - kp[0, :, 0], atol=1e-6)  # same order, mirrored
    coco = list(KEYPOINT_FLIPS["coco"])
    np.testing.assert_allclose(out.target_keypoints[1, :, 0], 1 - kp[1, coco, 0], atol=1e-6)
    assert out.keypoint_layouts == ("points", "coco")
    with pytest.raises(ValueError, match="keypoint_layouts"):
        dataclasses.replace(example, keypoint_layouts=("points", "xpose"))


def test_layouts_come_from_triplet_metadata(tmp_path):
    target = tmp_path / "t.png"
    Image.new("RGB", (32, 32)).save(target)
    kp = _grid_keypoints((0.1, 0.1, 0.9, 0.9)).tolist()
    subject = {"image": str(target), "phrase": "dog", "box": [0.1, 0.1, 0.9, 0.9], "mask": None,
               "target_keypoints": kp, "subject_keypoints": kp}
    record = {"triplet_id": "t", "relation": "r", "target": str(target), "prompt": "a dog", "relation_phrase": "sits",
              "subjects": [subject], "metadata": {LAYOUTS_KEY: "points"}}
    assert example_from_record(record).keypoint_layouts == ("points",)
    assert example_from_record({**record, "metadata": {}}).keypoint_layouts == ("ap10k",)


def test_masks_and_boxes_move_together():
    width, height, size = 200, 150, 80
    masks, boxes = [], []
    for k, (cx, cy, rx, ry) in enumerate([(60, 70, 40, 50), (140, 80, 35, 45)]):
        yy, xx = np.mgrid[0:height, 0:width] + 0.5
        m = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        masks.append(m)
        boxes.append(mask_box(m))
    kp = np.stack([_grid_keypoints(b) for b in boxes])
    example = _example(make_subject(3, 16).resize((width, height)), kp, boxes, masks)
    for seed in range(10):
        out = augment(example, size, np.random.default_rng(seed), crop_scale=(0.5, 1.0))
        for k in range(2):
            assert out.target_masks[k].shape == (size, size)
            np.testing.assert_allclose(np.array(mask_box(out.target_masks[k])) * size, out.boxes[k] * size, atol=1.0)


def test_cropped_away_keypoints_get_visibility_zero():
    box = (0.4, 0.4, 0.6, 0.6)
    kp = np.stack([_grid_keypoints(box)])
    kp[0, 5] = [0.02, 0.97]  # far from the subject box: a small crop around the box drops it
    example = _example(Image.new("RGB", (200, 200)), kp, [box])
    out = augment(example, 64, np.random.default_rng(1), flip_p=0.0, crop_scale=(0.3, 0.3))
    assert out.visibility is not None and out.visibility[0, 5] == 0.0 and out.visibility[0].sum() == 16
    assert 0.0 <= out.target_keypoints[0, 5].min() and out.target_keypoints[0, 5].max() <= 1.0
    inside = augment(example, 64, np.random.default_rng(1), flip_p=0.0, crop_scale=(1.0, 1.0))
    assert inside.visibility is None  # nothing left the image


def test_augment_is_deterministic_for_a_seed():
    box = (0.2, 0.2, 0.7, 0.8)
    example = _example(make_subject(5, 16).resize((120, 90)), np.stack([_grid_keypoints(box)]), [box])

    def run(seed):
        out = augment(example, 48, np.random.default_rng(seed))
        return np.asarray(out.target), out.boxes, out.target_keypoints

    for a, b in zip(run(7), run(7)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(run(7), run(8)))


def test_augment_checks_its_arguments():
    box = (0.2, 0.2, 0.7, 0.8)
    example = _example(Image.new("RGB", (32, 32)), np.stack([_grid_keypoints(box)]), [box])
    with pytest.raises(ValueError, match="crop_scale"):
        augment(example, 16, np.random.default_rng(0), crop_scale=(0.9, 0.5))
    with pytest.raises(ValueError, match="flip_p"):
        augment(example, 16, np.random.default_rng(0), flip_p=2.0)


# ---------------------------------------------------------------------------------------------- example, tensors

def test_example_checks_shapes():
    box = (0.2, 0.2, 0.7, 0.8)
    with pytest.raises(ValueError, match="target_keypoints"):
        _example(Image.new("RGB", (32, 32)), np.zeros((1, 16, 2)), [box])
    with pytest.raises(ValueError, match=r"target_masks\[0\]"):
        _example(Image.new("RGB", (32, 32)), np.zeros((1, 17, 2)), [box], masks=[np.zeros((8, 8), bool)])


def test_example_from_record_clips_and_combines_visibility():
    images = {"t": Image.new("RGB", (40, 30)), "s0": make_subject(1, 20), "m0": Image.new("L", (40, 30), 255)}
    kp = _grid_keypoints((0.1, 0.1, 0.9, 0.9)).tolist()
    kp[0] = [-0.04, 1.03]
    record = {"triplet_id": "t1", "relation": "hugging", "target": "t", "prompt": "A dog.", "relation_phrase": "x",
              "subjects": [{"image": "s0", "phrase": "dog", "box": [0.0, 0.0, 1.0, 1.0], "mask": "m0",
                            "target_keypoints": kp, "subject_keypoints": kp, "target_visibility": [0.5] * 17,
                            "subject_visibility": None}]}
    example = example_from_record(record, images.__getitem__)
    np.testing.assert_allclose(example.target_keypoints[0, 0], [0.0, 1.0])
    np.testing.assert_allclose(example.visibility, np.full((1, 17), 0.5))
    assert example.target_masks[0].all() and example.relation == "hugging"


def test_to_tensors():
    boxes = [(0.1, 0.2, 0.5, 0.9), (0.5, 0.1, 0.95, 0.6)]
    example = _example(make_subject(2, 16).resize((48, 32)), np.stack([_grid_keypoints(b) for b in boxes]), boxes)
    batch = to_tensors(example, size=24)
    assert batch["target"].shape == (3, 24, 24) and batch["subjects"].shape == (2, 3, 24, 24)
    assert batch["target"].dtype == torch.float32 and -1.0 <= batch["target"].min() <= batch["target"].max() <= 1.0
    assert batch["boxes"].shape == (2, 4) and batch["target_keypoints"].shape == (2, 17, 2)
    assert batch["subject_keypoints"].shape == (2, 17, 2) and torch.equal(batch["visibility"], torch.ones(2, 17))
    assert batch["masks"].shape == (2, 24, 24)  # box-filled: these subjects have no mask
    assert batch["masks"][0, 5:22, 2:12].min() == 1 and batch["masks"][0].sum() < 24 * 24
    plain = to_tensors(example)
    assert plain["target"].shape == (3, 32, 48) and plain["subjects"].shape == (2, 3, 32, 48)
