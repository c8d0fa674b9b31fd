"""The data engine on the toy world: the toy preset's annotators (the world's reader as detector and masker, colour
features for keypoints, dreamrelation.engine.toy_annotators) and gates where the truth is known, and `data judge`,
the oracle on an engine output: do the gates keep the targets that show their subjects and relation?"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from conftest import invoke

from dreamrelation.engine.gates import TOY_GATES, TOY_GATES_NOTE, Annotation, Drop, default_gates, gates_for
from dreamrelation.engine.toy_annotators import WRONG_PATTERN, ToyDetector, ToyMasker, phrase_parts
from dreamrelation.toy import oracle, world
from dreamrelation.toy.world import Identity

TWO_SUBJECT = [r.id for r in world.RELATIONS if r.arity == 2]


def _iou(a, b) -> float:
    from dreamrelation.engine.gates import box_iou

    return box_iou(tuple(a), tuple(b))


def _other_shape(ident: Identity) -> Identity:
    return replace(ident, shape=next(s for s in world.SHAPES if s != ident.shape))


def _other_pattern(ident: Identity) -> Identity:
    return replace(ident, pattern=next(p for p in world.PATTERNS if p != ident.pattern))


def test_toy_detector_and_masker_read_the_worlds_scenes():
    """On 40 renders of two-subject relations the detector finds each subject's phrase exactly once, in the
    render's box (its full shape's, hidden parts included), and the masker gives its visible pixels; a phrase of
    the wrong shape finds nothing at the toy gates' threshold, one of the wrong pattern is found at a lower score,
    and a phrase of another world finds nothing."""
    detector, masker = ToyDetector(), ToyMasker()
    assert phrase_parts("A Red striped circle") == ("red", "striped", "circle")
    assert phrase_parts("dog") == (None, None, None)
    box_ious, mask_ious = [], []
    for seed in range(40):
        render = world.scene(TWO_SUBJECT[seed % len(TWO_SUBJECT)], seed)
        phrases = [i.phrase for i in render.identities]
        wrong_shape = [_other_shape(i).phrase for i in render.identities]
        wrong_pattern = [_other_pattern(i).phrase for i in render.identities]
        found = detector.detect(render.image, phrases + wrong_shape + wrong_pattern + ["dog"], TOY_GATES.
                                detection_threshold)
        right, shape_miss, pattern_miss, other = found[:2], found[2:4], found[4:6], found[6]
        assert [len(f) for f in right] == [1, 1], (seed, render.caption)
        assert shape_miss == [[], []] and other == []
        for f, r in zip(pattern_miss, right):
            assert len(f) == 1 and f[0].score == pytest.approx(WRONG_PATTERN * r[0].score)
        masks = masker(render.image, [f[0].box for f in right])
        for k in range(2):
            box_ious.append(_iou(right[k][0].box, render.boxes[k]))
            truth = render.masks[k]
            mask_ious.append((masks[k] & truth).sum() / (masks[k] | truth).sum())
    assert min(box_ious) > 0.85 and np.median(box_ious) > 0.95, sorted(box_ious)[:5]
    assert min(mask_ious) > 0.95, sorted(mask_ious)[:5]
    # no subject there: no box, an empty mask; bad arguments are named
    with pytest.raises(ValueError, match="phrases must be a non-empty list"):
        detector.detect(render.image, [], 0.5)
    with pytest.raises(ValueError, match=r"threshold must be a number in \[0, 1\], got 2"):
        detector.detect(render.image, ["red solid circle"], 2)
    far = masker(render.image, [(0.0, 0.0, 0.01, 0.01)])
    assert far[0].shape == (64, 64) and not far[0].any()


def test_toy_gates_keep_true_scenes_and_drop_wrong_subjects():
    """The toy preset's Annotator (reader, colour features, TOY_GATES) on renders with their subjects' portraits:
    a true scene is kept, its boxes and masks those of the render and its carried keypoints on the subjects; the
    same scene asked about a subject of another shape, or one that is not in it, is dropped as not found. The
    preset's gates and their note are the toy ones."""
    from dreamrelation.engine.gates import Annotator

    assert default_gates("toy") == TOY_GATES and TOY_GATES.detection_threshold == 0.5 and TOY_GATES.max_instances == 1
    assert gates_for("toy") == (TOY_GATES, TOY_GATES_NOTE)
    annotator = Annotator.from_preset("toy", metrics=False)
    assert isinstance(annotator.detector, ToyDetector) and isinstance(annotator.masker, ToyMasker)
    kept = 0
    for seed in range(6):
        render = world.scene(TWO_SUBJECT[seed % len(TWO_SUBJECT)], seed)
        ids = render.identities
        portraits = [world.portrait(i)[0] for i in ids]
        boxes = [tuple(b) for b in render.boxes]
        result = annotator.annotate(render.image, portraits, [i.phrase for i in ids], boxes, render.caption,
                                    render.relation.phrase)
        assert isinstance(result, Annotation), (render.caption, result)
        kept += 1
        for k, subject in enumerate(result.subjects):
            assert _iou(subject.box, render.boxes[k]) > 0.85 and subject.layout_iou > 0.85
            truth = render.masks[k]
            assert (subject.target_mask & truth).sum() / (subject.target_mask | truth).sum() > 0.95
            pts = np.clip((subject.target_keypoints * 64).astype(int), 0, 63)
            on_subject = render.shape_masks[k][pts[:, 1], pts[:, 0]]
            assert on_subject.mean() >= 0.8, (render.caption, k, on_subject)
        wrong = annotator.annotate(render.image, portraits, [_other_shape(ids[0]).phrase, ids[1].phrase], boxes,
                                   render.caption, render.relation.phrase)
        assert isinstance(wrong, Drop) and wrong.reason == "subject_not_found", wrong
        absent = replace(ids[1], colour=next(c for c in world.COLOURS if c not in {i.colour for i in ids}))
        missing = annotator.annotate(render.image, portraits, [ids[0].phrase, absent.phrase], boxes,
                                     render.caption, render.relation.phrase)
        assert isinstance(missing, Drop) and missing.reason == "subject_not_found"
    assert kept == 6


README_LINES = (
    "dreamrelation data toy-world outputs/toy-spec --kind spec --n 16 --relations next_to",
    "dreamrelation data generate outputs/toy-spec/relation_spec.yaml --preset toy --output outputs/toy-engine "
    "--executor local",
    "dreamrelation data judge outputs/toy-engine",
)


@pytest.mark.slow
def test_the_readme_toy_engine_run_keeps_what_the_oracle_finds_better(runner, tmp_path, monkeypatch):
    """The README's toy engine lines, literally, from a fresh folder: `data generate --preset toy` on 16 toy specs
    of `next_to`, then `data judge`: every kept target shows its subjects with the right shape and colour (the
    oracle agrees with the gates), the dropped ones do not, and the relation holds more often among the kept
    targets than among the dropped. Measured: 2 of 16 kept, relation 50% of the kept, 0% of the dropped (the toy
    model rarely draws both subjects recognisably)."""
    import shlex
    from pathlib import Path

    from manifests.io import read_table
    from manifests.triplets import read_triplets

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    monkeypatch.chdir(tmp_path)
    results = []
    for line in README_LINES:
        assert line in readme, line
        results.append(invoke(runner, *shlex.split(line)[1:]))
        assert results[-1].exit_code == 0, (line, results[-1].output)
    assert results[1].output.splitlines()[0] == TOY_GATES_NOTE
    judged, out = results[2], tmp_path / "outputs" / "toy-engine"
    table = read_table(str(out / "oracle.parquet")).to_pylist()
    made = [r for r in table if r["status"] == "made"]
    dropped = [r for r in table if r["status"] == "dropped"]
    assert len(table) == 16 and made and dropped
    assert all(r["shape_colour_ok"] for r in made)
    assert not any(r["shape_colour_ok"] for r in dropped if r["reason"] == "subject_not_found")
    share = lambda rows: sum(r["relation_ok"] for r in rows) / len(rows)  # noqa: E731
    assert share(made) > share(dropped), (share(made), share(dropped))
    assert f"targets the gates kept: {len(made)} targets" in judged.output
    assert f"targets the gates dropped: {len(dropped)} targets" in judged.output
    # the kept triplets' annotations are the oracle's reading of their targets
    for row in read_triplets(str(out / "triplets.parquet"))[0]:
        reading = oracle.read(oracle_image(row.target))
        for subject in row.subjects:
            found = reading.subjects[Identity.parse(subject.phrase).colour]
            assert _iou(subject.box, found.box) > 0.99
    # engine.json names the spec and output as absolute paths: judged again from another folder, the same verdicts
    summary = json.loads((out / "engine.json").read_text())
    assert summary["spec"] == str(tmp_path / "outputs" / "toy-spec" / "relation_spec.yaml")
    assert summary["output"] == str(out)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    again = invoke(runner, "data", "judge", "../outputs/toy-engine")
    assert again.exit_code == 0, again.output
    assert read_table(str(out / "oracle.parquet")).to_pylist() == table
    # not an engine output: one line naming the folder
    other = invoke(runner, "data", "judge", tmp_path)
    assert other.exit_code == 2 and f"{tmp_path}: no engine.json" in other.output


def oracle_image(uri: str):
    from batch.toy_oracle import open_image

    return open_image(uri)
