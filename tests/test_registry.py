"""LoRA registry: folder layout and registry.json at a local folder and at memory://, precedence, errors."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
from safetensors.numpy import save

from manifests import storage
from manifests.access import AccessPolicy
from manifests.registry import (
    WEIGHTS_NAME,
    LoRARegistry,
    UnknownRelationError,
    check_relation_id,
)


def lora_bytes(seed: int) -> bytes:
    """A small safetensors file in the diffusers LoRA key layout."""
    rng = np.random.default_rng(seed)
    return save({"unet.down.attn2.to_q.lora.down.weight": rng.standard_normal((4, 8), dtype=np.float32),
                 "unet.down.attn2.to_q.lora.up.weight": rng.standard_normal((8, 4), dtype=np.float32)})


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path) -> str:
    return str(tmp_path / "loras") if request.param == "local" else f"memory://loras-{uuid.uuid4().hex}"


def test_weights_name_matches_the_model_library():
    from dreamrelation.model.lora import LORA_WEIGHTS_NAME

    assert WEIGHTS_NAME == LORA_WEIGHTS_NAME


def test_folder_layout_register_list_read_fingerprint(root, tmp_path):
    reg = LoRARegistry(root)
    assert reg.relations() == []
    uri = reg.register("riding", lora_bytes(0), card={"steps": 500, "base": "tiny"})
    assert uri == storage.join(root, "riding", WEIGHTS_NAME)
    # from a file path and from a folder holding the weights file
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / WEIGHTS_NAME).write_bytes(lora_bytes(1))
    reg.register("hugging", str(tmp_path / "src"))
    reg.register("on-top_of.v2", str(tmp_path / "src" / WEIGHTS_NAME))
    storage.write_bytes_atomic(storage.join(root, "notes", "card.json"), b"{}")  # no weights: not a relation

    assert reg.relations() == ["hugging", "on-top_of.v2", "riding"]
    assert reg.has("riding") and not reg.has("notes") and not reg.has("kissing")
    assert reg.uri("hugging") == storage.join(root, "hugging", WEIGHTS_NAME)
    assert reg.read_bytes("riding") == lora_bytes(0)
    assert reg.read_bytes("hugging") == reg.read_bytes("on-top_of.v2") == lora_bytes(1)
    assert reg.card("riding") == {"base": "tiny", "steps": 500}
    assert reg.card("hugging") is None
    assert not [p for p in storage.list_files(storage.join(root, "riding")) if ".tmp-" in p]

    fp = reg.fingerprint("riding")
    assert isinstance(fp, str) and fp == reg.fingerprint("riding") != reg.fingerprint("hugging")
    reg.register("riding", lora_bytes(2) + b"")  # a retrained LoRA: new version
    assert reg.fingerprint("riding") != fp
    assert reg.read_bytes("riding") == lora_bytes(2)
    assert LoRARegistry(root).relations() == reg.relations()  # another reader sees the same


def test_registry_file_takes_precedence_for_the_ids_it_names(root):
    other = f"memory://elsewhere-{uuid.uuid4().hex}"
    storage.write_bytes_atomic(storage.join(other, "kiss.safetensors"), lora_bytes(3))
    storage.write_bytes_atomic(storage.join(root, "other", "hug.safetensors"), lora_bytes(4))
    storage.write_bytes_atomic(storage.join(root, "runs", "pushing", WEIGHTS_NAME), lora_bytes(5))
    reg = LoRARegistry(root)
    reg.register("hugging", lora_bytes(0))  # folder layout, shadowed by registry.json below
    reg.register("riding", lora_bytes(1))
    index = {"relations": {"hugging": "other/hug.safetensors", "kissing": storage.join(other, "kiss.safetensors"),
                           "pushing": "runs/pushing"}}
    storage.write_bytes_atomic(storage.join(root, "registry.json"), json.dumps(index).encode())
    reg.refresh()
    # an entry outside the registry is refused by default (a registry.json must not point anywhere it likes)
    assert not reg.has("kissing") and "outside the registry" in reg.problem("kissing")
    with pytest.raises(UnknownRelationError, match="--allow-external-loras"):
        reg.uri("kissing")
    reg = LoRARegistry(root, AccessPolicy(allow_external_loras=True))

    assert reg.relations() == ["hugging", "kissing", "pushing", "riding"]
    assert reg.uri("hugging") == storage.join(root, "other", "hug.safetensors")
    assert reg.uri("kissing") == storage.join(other, "kiss.safetensors")
    assert reg.uri("pushing") == storage.join(root, "runs", "pushing", WEIGHTS_NAME)
    assert reg.read_bytes("hugging") == lora_bytes(4)
    assert reg.read_bytes("kissing") == lora_bytes(3)
    assert reg.read_bytes("pushing") == lora_bytes(5)
    assert reg.read_bytes("riding") == lora_bytes(1)
    assert all(reg.has(r) for r in reg.relations())
    with pytest.raises(ValueError, match="'hugging' is mapped by .*registry.json.*shadow"):
        reg.register("hugging", lora_bytes(6))


def test_unknown_relation_is_named_with_the_known_ones(root):
    reg = LoRARegistry(root)
    reg.register("riding", lora_bytes(0))
    with pytest.raises(UnknownRelationError, match=r"unknown relation 'kissing': no LoRA.*known relations: \['riding'\]"):
        reg.uri("kissing")
    with pytest.raises(ValueError, match="'kissing'"):  # UnknownRelationError is a ValueError
        reg.read_bytes("kissing")
    storage.write_bytes_atomic(storage.join(root, "registry.json"),
                               json.dumps({"relations": {"gone": "missing/x.safetensors"}}).encode())
    reg.refresh()
    assert not reg.has("gone")  # caught when rows are validated, not when an actor reaches the row
    assert reg.problem("gone").endswith("missing/x.safetensors, which does not exist")
    with pytest.raises(UnknownRelationError, match="'gone'.*does not exist"):
        reg.read_bytes("gone")


@pytest.mark.parametrize("bad", ["", "../up", "a/b", ".hidden", "sp ace", "x" * 129, None, 3])
def test_bad_relation_ids_are_rejected(bad, root):
    with pytest.raises(ValueError, match="relation must be 1-128 characters from letters"):
        check_relation_id(bad)
    with pytest.raises(ValueError, match="relation must be"):
        LoRARegistry(root).register(bad, lora_bytes(0))


def test_empty_registry_and_bad_inputs(root, tmp_path):
    empty = LoRARegistry(None)
    assert empty.relations() == [] and not empty.has("riding")
    with pytest.raises(UnknownRelationError, match="unknown relation 'riding': no LoRA registry was given"):
        empty.uri("riding")
    with pytest.raises(ValueError, match="no root"):
        empty.register("riding", lora_bytes(0))
    with pytest.raises(ValueError, match="root must be"):
        LoRARegistry("")

    reg = LoRARegistry(root)
    with pytest.raises(ValueError, match="not a safetensors file"):
        reg.register("riding", b"not a safetensors file")
    with pytest.raises(ValueError, match="holds no LoRA tensors"):
        reg.register("riding", save({"weight": np.zeros(2, dtype=np.float32)}))
    with pytest.raises(ValueError, match="not found"):
        reg.register("riding", str(tmp_path / "nowhere.safetensors"))
    with pytest.raises(ValueError, match="card must be a dict"):
        reg.register("riding", lora_bytes(0), card=["x"])
    assert reg.relations() == []  # nothing half-registered

    for content, match in ((b"{not json", "not valid JSON"), (b'{"hugging": "x"}', "must hold"),
                           (b'{"relations": {"a/b": "x"}}', "relation id must be"),
                           (b'{"relations": {"hugging": 3}}', "'hugging' must map to a file location")):
        storage.write_bytes_atomic(storage.join(root, "registry.json"), content)
        with pytest.raises(ValueError, match=match):
            LoRARegistry(root).relations()
