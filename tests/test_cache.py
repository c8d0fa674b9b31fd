"""Per-actor caches: LRU counters, relation LoRAs through a registry (cache hit == storage miss == direct load,
hotswap == reload), and subject encodings (one batched encode for the misses, same tokens, same images)."""

from __future__ import annotations

import hashlib
import io
import uuid
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import FAST

from batch.cache import (
    LRU,
    LoRACache,
    SubjectEncodingCache,
    content_key,
    is_compiled,
    lora_rank,
)
from dreamrelation.model.config import LoRAConfig
from dreamrelation.model.lora import add_relation_lora, save_relation_lora
from manifests.registry import LoRARegistry, UnknownRelationError

RELATIONS = ("hugging", "riding", "pushing")  # rank 4
WIDE = "kissing"  # rank 8: larger than the first LoRA's, exercises the hotswap slot's regrowth
PHRASES, BOXES = ["dog", "cat"], [[0, 0, 0.5, 1], [0.5, 0, 1, 1]]


def run(pipe, subjects=None, relation=None, **kw) -> np.ndarray:
    return pipe("a dog hugging a cat", subjects[:2] if subjects is not None else None, PHRASES, BOXES, seed=5,
                relation=relation, output_type="np", **FAST, **kw).images


@pytest.fixture(scope="module")
def lora_files(tiny_dir, tmp_path_factory) -> dict:
    """relation -> path of a trained-looking LoRA file (random non-zero lora_B), made on a separate tiny pipeline."""
    from dreamrelation.model.presets import load_pipeline

    src = load_pipeline(str(tiny_dir))
    out = tmp_path_factory.mktemp("lora-src")
    files = {}
    for i, relation in enumerate((*RELATIONS, WIDE)):
        config = LoRAConfig(rank=8, alpha=8.0) if relation == WIDE else LoRAConfig()
        with warnings.catch_warnings():  # several adapters on one UNet is intended here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            add_relation_lora(src.unet, relation, config)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in src.unet.named_parameters():
                if f".lora_B.{relation}." in name:
                    p.normal_(0.0, 0.2, generator=g)
        files[relation] = save_relation_lora(src.unet, relation, out / relation)
    return files


@pytest.fixture(scope="module")
def registries(lora_files, tmp_path_factory) -> dict[str, LoRARegistry]:
    regs = {"local": LoRARegistry(str(tmp_path_factory.mktemp("loras"))),
            "memory": LoRARegistry(f"memory://loras-{uuid.uuid4().hex}")}
    for reg in regs.values():
        for relation, path in lora_files.items():
            reg.register(relation, str(path), card={"relation": relation})
    return regs


@pytest.fixture(scope="module")
def reference_images(pipe, subjects, lora_files) -> dict:
    """relation (None = base) -> image with that LoRA loaded directly by path under its own adapter name."""
    out = {None: run(pipe, subjects)}
    for relation, path in lora_files.items():
        pipe.load_relation_lora(relation, str(path))
        try:
            out[relation] = run(pipe, subjects, relation=relation)
        finally:
            pipe.unload_relation_lora(relation)
    assert pipe.loaded_relations() == []
    return out


# ---- LRU ----------------------------------------------------------------------------------------------------
def test_lru_counters_for_a_known_order():
    evicted, loads = [], []
    lru = LRU(2, on_evict=lambda k, v: evicted.append((k, v)))
    hits = [lru.get_or_load(k, lambda key: loads.append(key) or key.lower())[1] for k in "ABACBA"]
    # A miss, B miss, A hit, C miss (evicts B), B miss (evicts A), A miss (evicts C)
    assert hits == [False, False, True, False, False, False]
    assert (lru.hits, lru.misses, lru.evictions) == (1, 5, 3)
    assert loads == ["A", "B", "C", "B", "A"]
    assert evicted == [("B", "b"), ("A", "a"), ("C", "c")]
    assert lru.keys() == ["B", "A"] and "A" in lru and "C" not in lru and len(lru) == 2
    assert lru.stats() == {"capacity": 2, "size": 2, "hits": 1, "misses": 5, "evictions": 3, "hit_rate": 1 / 6}


def test_lru_loader_failure_stores_nothing_and_capacity_is_checked():
    lru = LRU(1)

    def fail(key):
        raise OSError("storage down")

    with pytest.raises(OSError, match="storage down"):
        lru.get_or_load("A", fail)
    assert "A" not in lru and len(lru) == 0
    assert lru.get_or_load("A", str.lower) == ("a", False)
    assert lru.get_or_load("A", fail) == ("a", True)
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match="capacity must be an integer >= 1"):
            LRU(bad)


# ---- LoRA cache ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["local", "memory"])
def test_lora_cache_counters_with_more_relations_than_slots(pipe, registries, where):
    reg = registries[where]
    reads = []
    read_bytes = reg.read_bytes
    reg.read_bytes = lambda relation: reads.append(relation) or read_bytes(relation)  # count storage reads
    cache = LoRACache(pipe, reg, capacity=2)
    try:
        assert cache.hotswap is False  # the tiny UNet is not compiled
        a, b, c = RELATIONS
        order = [a, b, None, a, c, b, a, c, c]
        got = [cache.activate(r) for r in order]
        # a miss, b miss, (no LoRA), a hit, c miss (evicts b), b miss (evicts a), a miss (evicts c), c miss
        # (evicts b), c hit and already in the slot (no swap)
        assert got == [False, False, None, True, False, False, False, False, True]
        assert reads == [a, b, c, b, a, c]
        stats = cache.stats()
        assert {k: stats[k] for k in ("hits", "misses", "evictions", "swaps", "size", "capacity")} == \
            {"hits": 2, "misses": 6, "evictions": 4, "swaps": 7, "size": 2, "capacity": 2}
        assert stats["swap_seconds"] > 0 and stats["active"] == c
        assert pipe.loaded_relations() == [cache.slot_name]  # one slot, whatever the number of relations
        assert cache.relation_arg(c) == cache.slot_name and cache.relation_arg(None) is None
        with pytest.raises(UnknownRelationError, match="unknown relation 'dancing': no LoRA.*known relations"):
            cache.activate("dancing")
        assert cache.active == c
    finally:
        cache.close()
        del reg.read_bytes
    assert pipe.loaded_relations() == [] and len(cache._lru) == 0


def test_lora_cache_hit_equals_storage_miss_equals_direct_load(pipe, subjects, registries, reference_images):
    cache = LoRACache(pipe, registries["memory"], capacity=2, hotswap=False)
    try:
        images = {}
        for relation in ("hugging", "riding", None, "hugging", "pushing", "riding"):
            hit = cache.activate(relation)
            images[relation, hit] = run(pipe, subjects, relation=cache.relation_arg(relation))
        assert cache.stats()["evictions"] == 2
        np.testing.assert_array_equal(images["hugging", True], images["hugging", False])
        np.testing.assert_array_equal(images["riding", False], reference_images["riding"])
        np.testing.assert_array_equal(images["hugging", False], reference_images["hugging"])
        np.testing.assert_array_equal(images["pushing", False], reference_images["pushing"])
        np.testing.assert_array_equal(images[None, None], reference_images[None])  # activate(None): base image
    finally:
        cache.close()
    # each relation changes the image, and differently
    refs = [reference_images[r] for r in (None, *RELATIONS)]
    for i in range(len(refs)):
        for j in range(i):
            assert np.abs(refs[i] - refs[j]).max() > 1e-3


def test_hotswap_swaps_in_place_and_matches_reload(tiny_dir, subjects, registries, reference_images):
    from dreamrelation.model.presets import load_pipeline

    fresh = load_pipeline(str(tiny_dir))  # enable_lora_hotswap needs a UNet that never held a LoRA
    cache = LoRACache(fresh, registries["local"], capacity=2, hotswap=True)

    def lora_params():
        return {n: p for n, p in fresh.unet.named_parameters() if ".lora_" in n}

    assert cache.activate("hugging") is False
    first = lora_params()
    assert {p.shape[0] for n, p in first.items() if ".lora_A." in n} == {4} and cache.target_rank == 4
    images = {"hugging": run(fresh, subjects, relation=cache.relation_arg("hugging"))}
    for relation in ("riding", "hugging", "pushing"):
        cache.activate(relation)
        params = lora_params()
        assert params.keys() == first.keys() and all(params[n] is first[n] for n in first)  # no re-injection
        images[relation] = run(fresh, subjects, relation=cache.relation_arg(relation))
    assert (cache.hits, cache.misses, cache.evictions, cache.swaps) == (1, 3, 1, 4)
    for relation, image in images.items():
        np.testing.assert_allclose(image, reference_images[relation], atol=1e-5, err_msg=relation)

    # a LoRA of larger rank than the slot's: the slot is rebuilt at the larger rank, then swaps stay in place
    cache.activate(WIDE)
    assert cache.target_rank == 8
    np.testing.assert_allclose(run(fresh, subjects, relation=cache.slot_name), reference_images[WIDE], atol=1e-5)
    wide = lora_params()
    cache.activate("riding")
    assert all(lora_params()[n] is wide[n] for n in wide)
    np.testing.assert_allclose(run(fresh, subjects, relation=cache.slot_name), reference_images["riding"], atol=1e-5)
    cache.close()
    assert fresh.loaded_relations() == []


def test_hotswap_defaults_to_compiled_unets_and_rank_is_read():
    linear = torch.nn.Linear(2, 2)
    assert not is_compiled(linear) and is_compiled(torch.compile(linear))
    reg = LoRARegistry(None)
    assert LoRACache(SimpleNamespace(unet=torch.compile(linear)), reg).hotswap is True
    assert LoRACache(SimpleNamespace(unet=linear), reg).hotswap is False
    assert lora_rank({"unet.a.lora.down.weight": torch.zeros(4, 8), "unet.b.lora_A.weight": torch.zeros(6, 8)}) == 6
    with pytest.raises(ValueError, match="not a LoRA state dict"):
        lora_rank({"weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="capacity must be"):
        LoRACache(SimpleNamespace(unet=linear), reg, capacity=0)
    with pytest.raises(ValueError, match="relation 'x'"):
        LoRACache(SimpleNamespace(unet=linear), reg).activate("x")


# ---- subject encodings --------------------------------------------------------------------------------------
def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_content_key(subjects):
    a, b = png_bytes(subjects[0]), png_bytes(subjects[1])
    assert content_key(a, True) == content_key(a, True) != content_key(a, False)
    assert content_key(a, True) != content_key(b, True)
    assert content_key(a, False).startswith(hashlib.sha256(a).hexdigest())


def test_subject_cache_batches_misses_and_matches_the_encoder(pipe, subjects):
    calls = []

    def encode(images):
        calls.append(len(images))
        return pipe.encode_subjects(images)

    cache = SubjectEncodingCache(encode, capacity=2, use_local_tokens=pipe.adapter.encoder.config.use_local_tokens)
    k = [cache.key(png_bytes(img)) for img in subjects[:3]]
    i = subjects[:3]

    out, hits = cache.get([(k[0], i[0]), (k[1], i[1])])
    assert hits == 0 and calls == [2]  # both misses in one call
    torch.testing.assert_close(out, pipe.encode_subjects(i[:2]), rtol=0, atol=1e-6)
    out, hits = cache.get([(k[1], i[1]), (k[2], i[2]), (k[1], i[1])])
    assert hits == 2 and calls == [2, 1]  # k1 from memory, k2 encoded alone, the repeat of k1 is a hit
    torch.testing.assert_close(out, pipe.encode_subjects([i[1], i[2], i[1]]), rtol=0, atol=1e-6)
    assert torch.equal(out[0], out[2])
    out, hits = cache.get([(k[0], i[0]), (k[1], i[1])])  # k0 was evicted (capacity 2)
    assert hits == 1 and calls == [2, 1, 1]
    torch.testing.assert_close(out, pipe.encode_subjects(i[:2]), rtol=0, atol=1e-6)
    stats = cache.stats()
    assert {s: stats[s] for s in ("hits", "misses", "evictions", "encode_calls", "size")} == \
        {"hits": 3, "misses": 4, "evictions": 2, "encode_calls": 3, "size": 2}
    assert k[0] in cache and k[2] not in cache
    with pytest.raises(ValueError, match="at least one"):
        cache.get([])
    bad = SubjectEncodingCache(lambda images: torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match="encode returned 1 encodings for 2 images"):
        bad.get([("a", i[0]), ("b", i[1])])


def test_images_from_cached_encodings_equal_images_from_subject_images(pipe, subjects):
    cache = SubjectEncodingCache.for_pipeline(pipe, capacity=8, device="cpu")
    assert cache.use_local_tokens == pipe.adapter.encoder.config.use_local_tokens
    items = [(cache.key(png_bytes(img)), img) for img in subjects[:2]]
    from_images = run(pipe, subjects)
    miss, hits = cache.get(items)
    assert hits == 0 and miss.device.type == "cpu"
    from_miss = run(pipe, subject_embeds=miss.view(1, 2, *miss.shape[1:]))  # (K, T, W) -> (B, N, T, W)
    hit, hits = cache.get(items)
    assert hits == 2 and cache.encode_calls == 1
    from_hit = run(pipe, subject_embeds=hit.view(1, 2, *hit.shape[1:]))
    np.testing.assert_array_equal(from_miss, from_images)
    np.testing.assert_array_equal(from_hit, from_images)
