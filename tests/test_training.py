"""Relation-LoRA fine-tuning on the tiny preset: only the LoRA learns, the loss falls, KML reaches the LoRA, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_subject

from dreamrelation.model.config import TrainConfig
from dreamrelation.train.data import TripletExample
from dreamrelation.train.training import (
    RelationLossModel,
    TrainingInterrupted,
    resolve_train_config,
    train_relation_lora,
)


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
    from dreamrelation.model.presets import load_pipeline

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

    from dreamrelation.train.data import example_from_record, import_public_folder

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
        from dreamrelation.train.losses import loss_config

        loss_config("fast")
    with pytest.raises(ValueError, match="examples is empty"):
        train_relation_lora(None, [], config(), "/tmp/unused")


# ------------------------------------------------------------------------------------------------ ablations
@pytest.mark.parametrize("profile, expected", [
    ("paper", dict(kml_weight=1e-3, kml_t_max=None, attention_weight=0.0, augment=False)),
    ("public-code", dict(kml_weight=0.1, kml_t_max=333, attention_weight=1e-3, augment=True)),
    ("no-kml", dict(kml_weight=0.0, kml_t_max=None, attention_weight=0.0, augment=False)),
])
def test_profiles_fill_in_every_knob_and_options_override_them(profile, expected):
    full = resolve_train_config(TrainConfig(relation="r", profile=profile))
    assert {k: getattr(full, k) for k in expected} == expected
    assert resolve_train_config(full) == full  # idempotent: a card's config trains the same run again
    knobs = dict(kml_weight=0.5, kml_t_max=999, attention_weight=0.25, augment=not expected["augment"])
    assert {k: getattr(resolve_train_config(TrainConfig(relation="r", profile=profile, **knobs)), k)
            for k in knobs} == knobs


@pytest.mark.parametrize("kwargs, message", [
    (dict(profile="fast"), "profile must be one of ['paper', 'public-code', 'no-kml'], got 'fast'"),
    (dict(kml_weight=-1.0), "kml_weight must be a finite number >= 0, got -1.0"),
    (dict(attention_weight=float("inf")), "attention_weight must be a finite number >= 0, got inf"),
    (dict(kml_t_max=1000), "kml_t_max must be an integer in [0, 999], got 1000"),
    (dict(learning_rate=0.0), "learning_rate must be a finite number > 0, got 0.0"),
    (dict(seed=-1), "seed must be an integer >= 0, got -1"),
    (dict(rank=0), "rank must be a positive integer, got 0"),
    (dict(local_grid=0), "local_grid must be a positive integer, got 0"),
])
def test_knob_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError) as info:
        TrainConfig(relation="r", **kwargs)
    assert str(info.value) == message


def test_no_kml_profile_trains_on_the_denoising_loss_alone(tiny_dir):
    model = RelationLossModel(fresh(tiny_dir), synthetic_examples(1), config(profile="no-kml", augment=None))
    assert (model.losses.kml_weight, model.config.augment) == (0.0, False)
    loss, parts = model.example_loss(0, np.random.default_rng(0), timestep=100)
    assert float(parts["kml"].detach()) > 0
    assert float(loss.detach()) == pytest.approx(float(parts["denoise"].detach()), rel=1e-6)


def test_every_knob_reaches_the_run_and_its_card(tiny_dir, tmp_path):
    cfg = config(steps=1, batch_size=1, kml_weight=0.5, kml_t_max=500, attention_weight=0.01, rank=2,
                 learning_rate=2e-3, seed=3, augment=None, local_grid=2, profile="public-code")
    pipe = fresh(tiny_dir)
    result = train_relation_lora(pipe, synthetic_examples(1), cfg, tmp_path)
    card = json.loads((tmp_path / "card.json").read_text())
    assert card == json.loads(json.dumps(result.card))
    assert card["config"] == {**cfg.to_dict(), "augment": True}  # every knob, the profile's augment filled in
    assert card["loss_weights"] == {"kml_weight": 0.5, "kml_t_max": 500, "attention_weight": 0.01}
    assert "mean over latent channels" in card["kml_reduction"] and "sums" in card["kml_reduction"]
    assert card["local_encoder"] == {"used": True, "source": None, "fingerprint": None, "local_grid": 2}
    lora_a = [p for n, p in pipe.unet.named_parameters() if ".lora_A.hugging." in n]
    assert lora_a and all(p.shape[0] == 2 for p in lora_a)  # rank 2
    assert pipe.adapter.encoder.config.local_grid == 2
    tokens = pipe.encode_subjects(synthetic_examples(1)[0].subject_images)
    assert tokens.shape[1] == 1 + (32 // 8) ** 2 + 4  # 2 x 2 local tokens per subject


def test_cli_train_relations_names_the_bad_knob(runner, tmp_path):
    import cli

    for args, message in ((["--kml-max-t", "1000"], "--kml-max-t must be an integer in [0, 999], got 1000"),
                          (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
                          (["--attention-loss-weight", "-1"], "--attention-loss-weight must be a finite number >= 0"),
                          (["--local-grid", "0"], "--local-grid must be a positive integer, got 0"),
                          (["--profile", "fast"], "--profile must be one of ['paper', 'public-code', 'no-kml']")):
        result = runner.invoke(cli.app, ["train", "relations", str(tmp_path / "data"), "--relations", "r", *args])
        assert result.exit_code == 2 and f"error: {message}" in result.stderr, (args, result.output)


def test_train_job_passes_the_knobs_on(tmp_path):
    from cluster.train_job import TrainJobConfig

    job = TrainJobConfig(data="d", relations=("r",), profile="no-kml", seed=7, learning_rate=3e-4, rank=8,
                         kml_weight=0.2, kml_t_max=100, attention_weight=0.1, augment=True, local_grid=8,
                         use_local_tokens=False, local_encoder=str(tmp_path / "enc"))
    cfg = job.train_config("r")
    assert (cfg.profile, cfg.seed, cfg.learning_rate, cfg.rank, cfg.kml_weight, cfg.kml_t_max, cfg.attention_weight,
            cfg.augment, cfg.local_grid, cfg.use_local_tokens) == ("no-kml", 7, 3e-4, 8, 0.2, 100, 0.1, True, 8, False)
    default = TrainJobConfig(data="d", relations=("r",)).train_config("r")
    assert default == TrainConfig(relation="r", resolution=64)  # unset knobs: TrainConfig's and the profile's
