"""Relation-LoRA fine-tuning on the tiny preset: only the LoRA learns, the loss falls, KML reaches the LoRA, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_subject
from dreamrelation.config import TrainConfig
from dreamrelation.data import TripletExample
from dreamrelation.training import RelationLossModel, TrainingInterrupted, train_relation_lora


def synthetic_examples(n: int = 2, seed: int = 0) -> list[TripletExample]:
    """Two-subject triplets: a target with two coloured blobs, the subject images, boxes and keypoints."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        target = make_subject(100 + i, size=96)
        subjects = [make_subject(200 + 2 * i), make_subject(201 + 2 * i)]
        boxes = np.array([[0.05, 0.2, 0.5, 0.9], [0.5, 0.2, 0.95, 0.9]], dtype=np.float32)
        kp_t = np.stack([np.column_stack([rng.uniform(b[0], b[2], 17), rng.uniform(b[1], b[3], 17)]) for b in boxes])
        kp_s = rng.uniform(0.1, 0.9, (2, 17, 2))
        out.append(TripletExample(
            target=target, prompt="a dog is hugging a cat", relation_phrase="hugging", subject_images=subjects,
            phrases=["dog", "cat"], boxes=boxes, target_masks=[None, None], target_keypoints=kp_t.astype(np.float32),
            subject_keypoints=kp_s.astype(np.float32), visibility=None, relation="hugging", triplet_id=f"t{i}"))
    return out


def config(**kw) -> TrainConfig:
    base = dict(relation="hugging", steps=4, batch_size=2, resolution=64, checkpoint_every=2, augment=True)
    base.update(kw)
    return TrainConfig(**base)


def fresh(tiny_dir):
    from dreamrelation.presets import load_pipeline

    return load_pipeline(str(tiny_dir))


def frozen_state(pipe) -> dict[str, torch.Tensor]:
    modules = {"unet": pipe.unet, "vae": pipe.vae, "te": pipe.text_encoder, "te2": pipe.text_encoder_2,
               "adapter": pipe.adapter}
    return {f"{m}.{n.replace('.base_layer', '')}": p.detach().clone() for m, mod in modules.items()
            for n, p in mod.named_parameters()
            if ".lora_" not in n}


def lora_state(pipe, relation="hugging") -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if f".{relation}." in n}


def test_only_the_lora_changes(tiny_dir, tmp_path):
    pipe = fresh(tiny_dir)
    before = frozen_state(pipe)
    result = train_relation_lora(pipe, synthetic_examples(), config(), tmp_path)
    after = frozen_state(pipe)
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [], changed[:5]
    trained = lora_state(pipe)
    assert trained and any(torch.count_nonzero(v) for k, v in trained.items() if "lora_B" in k)
    assert result.lora_path.is_file()
    card = result.card
    assert (card["relation"], card["profile"], card["steps"], card["examples"]) == ("hugging", "paper", 4, 2)
    assert set(card["final_losses"]) >= {"loss", "denoise", "kml", "attention"} and len(card["data_hash"]) == 16
    assert sum(p.numel() for p in pipe.unet.parameters() if p.requires_grad) == sum(v.numel() for v in
                                                                                    trained.values())


@pytest.mark.slow
def test_the_loss_on_a_fixed_set_falls_over_200_steps(tiny_dir, tmp_path):
    """Mean loss over 16 fixed (example, timestep, noise) draws, before and after 200 steps (lr 3e-3, batch 1)."""
    pipe = fresh(tiny_dir)
    examples = synthetic_examples()
    cfg = config(steps=200, batch_size=1, checkpoint_every=1000, augment=False, learning_rate=3e-3)
    before = RelationLossModel(pipe, examples, cfg).evaluate()
    train_relation_lora(pipe, examples, cfg, tmp_path)
    after = RelationLossModel(pipe, examples, cfg, add_lora=False).evaluate()
    print(f"fixed-set loss: before {before:.4f}, after 200 steps {after:.4f}")
    assert after < 0.97 * before


def test_kml_gradient_reaches_the_lora_and_nothing_frozen(tiny_dir):
    pipe = fresh(tiny_dir)
    model = RelationLossModel(pipe, synthetic_examples(1), config(profile="public-code"))
    with torch.no_grad():  # a non-zero LoRA so that gradients reach both A and B
        for n, p in pipe.unet.named_parameters():
            if ".lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    _, parts = model.example_loss(0, np.random.default_rng(0), timestep=100)  # under the public-code gate (333)
    assert float(parts["kml"].detach()) > 0
    parts["kml"].backward()
    lora = [(n, p) for n, p in pipe.unet.named_parameters() if ".lora_" in n]
    assert all(p.grad is not None for _, p in lora)
    assert sum(float(p.grad.abs().sum()) for _, p in lora) > 0
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.adapter):
        for n, p in module.named_parameters():
            if ".lora_" not in n:
                assert p.grad is None and not p.requires_grad, n
    # above the gate the KML term is zero and carries no gradient signal
    _, gated = model.example_loss(0, np.random.default_rng(0), timestep=800)
    assert float(gated["kml"].detach()) == 0.0


def test_a_killed_run_resumes_and_matches_an_uninterrupted_one(tiny_dir, tmp_path):
    examples = synthetic_examples()
    cfg = config(steps=6, checkpoint_every=3)

    def crash_after(step: int, parts) -> None:
        if step == 4:  # one step past the checkpoint at 3: that work is lost, as in a real crash
            raise TrainingInterrupted("simulated crash")

    with pytest.raises(TrainingInterrupted):
        train_relation_lora(fresh(tiny_dir), examples, cfg, tmp_path / "a", callback=crash_after)
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").glob("*.pt")) == ["step-000003.pt"]
    resumed = train_relation_lora(fresh(tiny_dir), examples, cfg, tmp_path / "a")  # a new process, same folder
    assert resumed.resumed_from == 3
    straight = train_relation_lora(fresh(tiny_dir), examples, cfg, tmp_path / "b")
    assert straight.resumed_from == 0
    from safetensors.torch import load_file

    a, b = load_file(str(resumed.lora_path)), load_file(str(straight.lora_path))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    assert [h["step"] for h in resumed.history] == list(range(1, 7))
    np.testing.assert_allclose([h["loss"] for h in resumed.history], [h["loss"] for h in straight.history],
                               rtol=1e-4)


def test_a_trained_lora_loads_into_the_pipeline_and_changes_the_image(tiny_dir, tmp_path, subjects):
    from conftest import FAST

    result = train_relation_lora(fresh(tiny_dir), synthetic_examples(), config(steps=2, learning_rate=1e-2),
                                 tmp_path)
    pipe = fresh(tiny_dir)
    args = ("a dog is hugging a cat", subjects[:2], ["dog", "cat"], [[0, 0, 0.5, 1], [0.5, 0, 1, 1]])
    base = pipe(*args, seed=1, output_type="np", **FAST).images
    pipe.load_relation_lora("hugging", str(result.lora_path))
    with_lora = pipe(*args, seed=1, relation="hugging", output_type="np", **FAST).images
    assert np.abs(with_lora - base).max() > 0


def test_fine_tune_on_the_authors_public_samples(tiny_dir, tmp_path):
    from conftest import public_data
    from dreamrelation.data import example_from_record, import_public_folder

    records, problems = import_public_folder(public_data() / "data" / "shake", "shaking_hands")
    assert len(records) == 5 and problems == []
    examples = [example_from_record(r) for r in records]
    result = train_relation_lora(fresh(tiny_dir), examples, config(relation="shaking_hands", steps=2,
                                                                   profile="public-code"), tmp_path)
    assert result.card["examples"] == 5 and result.lora_path.is_file()
    assert np.isfinite(result.card["final_losses"]["loss"])


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="resolution must be divisible by 8, got 100"):
        TrainConfig(relation="x", resolution=100)
    with pytest.raises(ValueError, match="relation must be a non-empty id"):
        TrainConfig(relation="")
    with pytest.raises(ValueError, match="profile"):
        from dreamrelation.losses import loss_config

        loss_config("fast")
    with pytest.raises(ValueError, match="examples is empty"):
        train_relation_lora(None, [], config(), "/tmp/unused")
