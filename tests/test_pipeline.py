"""DreamRelationPipeline on the tiny preset: determinism, batching, subject counts, layouts and input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import FAST

TWO_BOXES = [[0.0, 0.1, 0.5, 0.9], [0.5, 0.1, 1.0, 0.9]]


def arr(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_same_seed_same_image_other_seed_other_image(pipe, subjects):
    kw = dict(subject_images=subjects[:2], subject_phrases=["dog", "cat"], boxes=TWO_BOXES, **FAST)
    a = pipe("a dog hugging a cat", seed=7, **kw).images[0]
    b = pipe("a dog hugging a cat", seed=7, **kw).images[0]
    c = pipe("a dog hugging a cat", seed=8, **kw).images[0]
    assert a.size == (64, 64)
    assert np.array_equal(arr(a), arr(b))
    assert np.abs(arr(a) - arr(c)).mean() > 5


@pytest.mark.parametrize("n", [1, 2, 3])
def test_one_two_three_subjects(pipe, subjects, n):
    boxes = [[j / n, 0.0, (j + 1) / n, 1.0] for j in range(n)]
    out = pipe("subjects together", subjects[:n], ["dog", "cat", "bear"][:n], boxes, seed=1, **FAST)
    assert len(out.images) == 1 and out.images[0].size == (64, 64)


def test_subject_images_and_layout_change_the_image(pipe, subjects):
    base = dict(subject_phrases=["dog", "cat"], seed=3, **FAST)
    a = arr(pipe("a dog hugging a cat", subjects[:2], boxes=TWO_BOXES, **base).images[0])
    other_images = arr(pipe("a dog hugging a cat", subjects[2:4], boxes=TWO_BOXES, **base).images[0])
    other_layout = arr(pipe("a dog hugging a cat", subjects[:2], boxes=[[0, 0, 0.3, 0.3], [0.6, 0.6, 1, 1]],
                            **base).images[0])
    no_image_branch = arr(pipe("a dog hugging a cat", subjects[:2], boxes=TWO_BOXES, **{**base, "scale": 0.0}).images[0])
    for other in (other_images, other_layout, no_image_branch):
        assert np.abs(a - other).max() > 0


def test_batch_of_four_matches_four_single_calls(pipe, subjects):
    prompts = ["a dog hugging a cat", "a cat riding a dog", "two friends", "a dog next to a cat"]
    images = [[subjects[i % 4], subjects[(i + 1) % 4]] for i in range(4)]
    phrases = [["dog", "cat"]] * 4
    boxes = [TWO_BOXES, [[0.1, 0.1, 0.6, 0.6], [0.4, 0.4, 0.9, 0.9]], TWO_BOXES, [[0, 0, 1, 0.5], [0, 0.5, 1, 1]]]
    seeds = [11, 12, 13, 14]
    batch = pipe(prompts, images, phrases, boxes, seed=seeds, output_type="np", **FAST).images
    for i in range(4):
        single = pipe(prompts[i], images[i], phrases[i], boxes[i], seed=seeds[i], output_type="np", **FAST).images
        np.testing.assert_allclose(batch[i], single[0], atol=1e-4)


def test_non_square_size(pipe, subjects):
    out = pipe("a dog hugging a cat", subjects[:2], ["dog", "cat"], TWO_BOXES, seed=1,
               **{**FAST, "width": 96, "height": 64})
    assert out.images[0].size == (96, 64)


def test_local_tokens_switch_changes_output(pipe, subjects):
    kw = dict(seed=2, **FAST)
    on = arr(pipe("a dog hugging a cat", subjects[:2], ["dog", "cat"], TWO_BOXES, **kw).images[0])
    off = arr(pipe("a dog hugging a cat", subjects[:2], ["dog", "cat"], TWO_BOXES, use_local_tokens=False,
                   **kw).images[0])
    assert np.abs(on - off).max() > 0


def test_precomputed_subject_embeds_equal_images(pipe, subjects):
    tokens = pipe.encode_subjects(subjects[:2])  # (2, T, W)
    a = pipe("a dog hugging a cat", subjects[:2], ["dog", "cat"], TWO_BOXES, seed=4, output_type="np", **FAST)
    b = pipe("a dog hugging a cat", None, ["dog", "cat"], TWO_BOXES, subject_embeds=tokens.unsqueeze(0), seed=4,
             output_type="np", **FAST)
    np.testing.assert_array_equal(a.images, b.images)


@pytest.mark.parametrize(
    "change, field, value",
    [
        (dict(boxes=[[0.0, 0.1, 1.2, 0.9], [0.5, 0.1, 1.0, 0.9]]), "boxes[0][0]", "1.2"),
        (dict(boxes=[[0.6, 0.1, 0.5, 0.9], [0.5, 0.1, 1.0, 0.9]]), "x0 < x1", "0.6"),
        (dict(boxes=[[0.0, 0.1, float("nan"), 0.9], [0.5, 0.1, 1.0, 0.9]]), "boxes[0][0]", "nan"),
        (dict(boxes=[[0.0, 0.1, 0.5]], subject_phrases=["dog"], subject_images=[None]), "boxes[0][0]", "[0.0, 0.1, 0.5]"),
        (dict(subject_phrases=["dog"]), "2 boxes but 1 subject_phrases", "dog"),
        (dict(subject_images=["not-an-image.png", None]), "subject_images[0][0]", "str"),
        (dict(subject_phrases=["dog", ""]), "subject_phrases[0][1]", "''"),
        (dict(prompt="   "), "prompt[0]", "'   '"),
        (dict(height=100), "height", "100"),
        (dict(width=0), "width", "0"),
        (dict(num_inference_steps=0), "num_inference_steps", "0"),
        (dict(seed=-1), "seed[0]", "-1"),
        (dict(scale=float("inf")), "scale[0]", "inf"),
        (dict(relation="hugging"), "relation 'hugging'", "hugging"),
    ],
)
def test_bad_inputs_name_field_and_value(pipe, subjects, change, field, value):
    kw = dict(prompt="a dog hugging a cat", subject_images=subjects[:2], subject_phrases=["dog", "cat"],
              boxes=TWO_BOXES, **FAST)
    kw.update(change)
    with pytest.raises(ValueError) as info:
        pipe(**kw)
    assert field in str(info.value) and value in str(info.value)


def test_image_count_mismatch_is_named(pipe, subjects):
    with pytest.raises(ValueError, match=r"row 0: 3 subject_images but 2 subject_phrases"):
        pipe("x y", subjects[:3], ["dog", "cat"], TWO_BOXES, **FAST)


def test_rows_with_different_subject_counts_cannot_batch(pipe, subjects):
    with pytest.raises(ValueError, match=r"same number of subjects, got \[1, 2\]"):
        pipe(["a", "b"], [[subjects[0]], subjects[:2]], [["dog"], ["dog", "cat"]], [[TWO_BOXES[0]], TWO_BOXES],
             **FAST)


def test_unconditional_branch_gets_no_image_attention(pipe, subjects):
    """With guidance 1 (no CFG) the image branch still acts; the CFG batch doubles with zero tokens and boxes."""
    seen = []
    proc = next(p for p in pipe.adapter.processors if p.to_k_ip is not None)
    original = type(proc).__call__

    def spy(self, attn, hidden_states, *args, ip_boxes=None, **kwargs):
        if self is proc:
            seen.append(ip_boxes.clone())
        return original(self, attn, hidden_states, *args, ip_boxes=ip_boxes, **kwargs)

    type(proc).__call__ = spy
    try:
        pipe("a dog hugging a cat", subjects[:2], ["dog", "cat"], TWO_BOXES, guidance_scale=5.0, **FAST)
    finally:
        type(proc).__call__ = original
    boxes = seen[0]  # (2B, N, 4): [uncond | cond]
    assert boxes.shape == (2, 2, 4)
    assert torch.count_nonzero(boxes[0]) == 0
    torch.testing.assert_close(boxes[1], torch.tensor(TWO_BOXES))
