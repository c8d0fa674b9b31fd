"""Per-actor caches of the batch worker: relation LoRAs and subject encodings (plain Python + torch, no ray).

- :class:`LRU`: a small least-recently-used map with hit / miss / eviction counters.
- :class:`LoRACache`: relation id -> LoRA state dict (read through a :class:`~manifests.registry.LoRARegistry`),
  kept in an LRU in CPU memory, and installed into ONE adapter slot of the pipeline. Reading a LoRA file is the
  slow part (REFERENCE.md 5: loading from a file costs far more than from an in-memory state dict); swapping the
  slot's weights from memory takes milliseconds, in place (hotswap) when the UNet is compiled.
- :class:`SubjectEncodingCache`: image content hash -> CLIP tokens of that subject image, so a product image that
  recurs across thousands of rows goes through the image encoder once; misses are encoded in one batched call.

None of the three is thread-safe: an actor handles one batch at a time.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import PIL.Image
import torch

from manifests.registry import LoRARegistry, check_relation_id

logger = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
_MISSING = object()


class LRU(Generic[K, V]):
    """Least-recently-used map holding at most ``capacity`` entries.

    ``get`` counts a hit or a miss; ``put`` evicts the least recently used entries beyond ``capacity`` (counted,
    and passed to ``on_evict(key, value)``).
    """

    def __init__(self, capacity: int, on_evict: Callable[[K, V], None] | None = None):
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")
        self.capacity = capacity
        self.on_evict = on_evict
        self._data: OrderedDict[K, V] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __contains__(self, key: object) -> bool:  # no counting, no recency change
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def keys(self) -> list[K]:
        """Keys from least to most recently used."""
        return list(self._data)

    def peek(self, key: K, default: Any = None) -> V | Any:
        """The value of ``key`` or ``default``, without counting a lookup or changing its recency."""
        return self._data.get(key, default)

    def get(self, key: K, default: Any = None) -> V | Any:
        """The value of ``key`` (now the most recently used) or ``default``; counts a hit or a miss."""
        value = self._data.get(key, _MISSING)
        if value is _MISSING:
            self.misses += 1
            return default
        self.hits += 1
        self._data.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        """Insert or replace ``key`` as the most recently used entry; evict beyond ``capacity``."""
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.capacity:
            old_key, old_value = self._data.popitem(last=False)
            self.evictions += 1
            logger.debug("LRU evicted %r", old_key)
            if self.on_evict is not None:
                self.on_evict(old_key, old_value)

    def get_or_load(self, key: K, loader: Callable[[K], V]) -> tuple[V, bool]:
        """``(value, hit)``: from memory on a hit, else ``loader(key)`` (stored; nothing stored if it raises)."""
        value = self.get(key, _MISSING)
        if value is not _MISSING:
            return value, True
        value = loader(key)
        self.put(key, value)
        return value, False

    def clear(self) -> None:
        """Drop every entry (not counted as evictions, no ``on_evict``); counters stay."""
        self._data.clear()

    def stats(self) -> dict[str, Any]:
        lookups = self.hits + self.misses
        return {"capacity": self.capacity, "size": len(self._data), "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions, "hit_rate": self.hits / lookups if lookups else None}


class _Counted:
    """Counters and membership of a cache built on ``self._lru``."""

    _lru: LRU

    @property
    def hits(self) -> int:
        return self._lru.hits

    @property
    def misses(self) -> int:
        return self._lru.misses

    @property
    def evictions(self) -> int:
        return self._lru.evictions

    def __contains__(self, key: object) -> bool:
        return key in self._lru


# ---- relation LoRAs -----------------------------------------------------------------------------------------
def is_compiled(module: torch.nn.Module) -> bool:
    """True for a ``torch.compile`` wrapper (``OptimizedModule``) or a module compiled in place (``.compile()``)."""
    return hasattr(module, "_orig_mod") or getattr(module, "_compiled_call_impl", None) is not None


def lora_rank(state_dict: dict[str, torch.Tensor]) -> int:
    """Largest LoRA rank in a state dict (diffusers ``lora.down`` or peft ``lora_A`` keys: rank is dim 0)."""
    ranks = [v.shape[0] for k, v in state_dict.items() if ".lora.down." in k or ".lora_A." in k]
    if not ranks:
        raise ValueError(f"not a LoRA state dict: no 'lora.down' / 'lora_A' keys (first keys: {list(state_dict)[:3]})")
    return max(ranks)


@dataclass(frozen=True)
class _LoadedLoRA:
    """A relation LoRA read from the registry: its state dict (CPU) and where exactly it came from."""

    state: dict[str, torch.Tensor]
    uri: str
    sha256: str


class LoRACache(_Counted):
    """Relation LoRAs for one pipeline: an LRU of state dicts in CPU memory, one adapter slot in the UNet.

    ``activate(relation)`` installs ``relation``'s LoRA in the slot (nothing when it already is the active one);
    the caller then generates with ``pipe(..., relation=cache.relation_arg(relation))``. Switching relations
    replaces the slot's weights: in place with ``hotswap`` (``enable_lora_hotswap`` before the first load, padded
    to ``target_rank``; no re-injection and no recompile of a compiled UNet), otherwise unload + load.
    ``capacity`` is the number of state dicts held in memory (about 12 MB each for the real SDXL UNet at rank 4).

    State dicts stay on CPU: loading copies them into the slot's parameters on the pipeline's device, so the cached
    tensors are never aliased by the model (a later in-place swap cannot overwrite them).
    """

    def __init__(self, pipe, registry: LoRARegistry, capacity: int = 8, hotswap: bool | None = None,
                 slot_name: str = "relation", target_rank: int | None = None):
        self.pipe = pipe
        self.registry = registry
        self.slot_name = check_relation_id(slot_name, "slot_name")
        self.hotswap = is_compiled(pipe.unet) if hotswap is None else bool(hotswap)
        if target_rank is not None and (not isinstance(target_rank, int) or target_rank < 1):
            raise ValueError(f"target_rank must be a positive integer or None, got {target_rank!r}")
        self.target_rank = target_rank  # hotswap padding; None: the rank of the first LoRA loaded
        self._lru: LRU[str, _LoadedLoRA] = LRU(capacity)
        self.active: str | None = None  # relation whose weights are in the slot
        self._hotswap_ready = False  # the slot was loaded by us after enable_lora_hotswap
        self.swaps = 0
        self.swap_seconds = 0.0

    def relation_arg(self, relation: str | None) -> str | None:
        """The ``relation=`` argument of the pipeline call for rows of ``relation`` (after :meth:`activate`)."""
        return None if relation is None else self.slot_name

    def _read(self, relation: str) -> _LoadedLoRA:
        from safetensors.torch import load

        data = self.registry.read_bytes(relation)
        return _LoadedLoRA(load(data), self.registry.uri(relation), hashlib.sha256(data).hexdigest())

    def source(self, relation: str | None) -> tuple[str, str] | None:
        """(URI, sha256 of the bytes) of the file ``relation``'s cached LoRA was read from (provenance); None for
        no relation or one not loaded."""
        loaded = self._lru.peek(relation) if relation is not None else None
        return (loaded.uri, loaded.sha256) if loaded is not None else None

    def activate(self, relation: str | None) -> bool | None:
        """Make ``relation``'s LoRA the one in the slot; True if its state dict came from the cache, False if
        it was read from storage, None for ``relation=None`` (generate without a LoRA: the slot is kept)."""
        if relation is None:
            return None
        loaded, hit = self._lru.get_or_load(relation, self._read)
        state = loaded.state
        if relation != self.active:
            start = time.perf_counter()
            self._install(relation, state)
            self.swap_seconds += time.perf_counter() - start
            self.swaps += 1
            self.active = relation
        return hit

    def _slot_loaded(self) -> bool:
        return self.slot_name in self.pipe.loaded_relations()

    def _install(self, relation: str, state: dict[str, torch.Tensor]) -> None:
        self.active = None  # until the new weights are fully in place
        if not self.hotswap:
            if self._slot_loaded():
                self.pipe.unload_relation_lora(self.slot_name)  # diffusers #8532: repeated load/unload leaks a little
            self.pipe.load_relation_lora(self.slot_name, state)
            return
        rank = lora_rank(state)
        if self._hotswap_ready and self._slot_loaded():
            if rank <= self.target_rank:
                try:
                    self.pipe.load_relation_lora(self.slot_name, state, hotswap=True)
                    return
                except Exception as e:  # e.g. a LoRA targeting other modules: fall back to a fresh slot
                    logger.warning("hotswap of relation %r failed (%s); reloading the LoRA slot", relation, e)
            else:  # a larger rank cannot be swapped into the padded slot
                logger.warning("relation %r has LoRA rank %d > hotswap target rank %d: reloading the slot "
                               "(a compiled UNet recompiles once)", relation, rank, self.target_rank)
        self._hotswap_ready = False
        if self._slot_loaded():
            self.pipe.unload_relation_lora(self.slot_name)
        self.target_rank = max(rank, self.target_rank or 0)
        # pads the slot's LoRA to target_rank and makes its scaling a tensor, so later swaps keep every shape
        self.pipe.enable_lora_hotswap(target_rank=self.target_rank, check_compiled="warn")
        self.pipe.load_relation_lora(self.slot_name, state)
        self._hotswap_ready = True

    def close(self) -> None:
        """Remove the slot from the pipeline and drop every cached state dict."""
        if self._slot_loaded():
            self.pipe.unload_relation_lora(self.slot_name)
        self.active = None
        self._hotswap_ready = False
        self._lru.clear()

    def stats(self) -> dict[str, Any]:
        return {**self._lru.stats(), "swaps": self.swaps, "swap_seconds": self.swap_seconds,
                "hotswap": self.hotswap, "active": self.active}


# ---- subject encodings --------------------------------------------------------------------------------------
def content_key(data: bytes, use_local_tokens: bool) -> str:
    """Cache key of a subject image: sha256 of its file bytes, plus the token variant it is encoded with."""
    return f"{hashlib.sha256(data).hexdigest()}:{'local' if use_local_tokens else 'global'}"


class SubjectEncodingCache(_Counted):
    """Subject image -> its CLIP tokens (T, W), keyed by :func:`content_key`, LRU of ``capacity`` images.

    ``encode`` maps K images to a (K, T, W) tensor (e.g. ``pipe.encode_subjects``). Tensors are kept where
    ``encode`` returns them (the pipeline's device, by default) unless ``device`` is given: on a GPU that avoids
    a device -> host -> device round trip per row, at about 0.9 MB per image for the real SDXL encoder in bf16
    (273 tokens x 1664), i.e. ~230 MB at the default capacity; pass ``device="cpu"`` to keep GPU memory free.
    """

    def __init__(self, encode: Callable[[list[PIL.Image.Image]], torch.Tensor], capacity: int = 256,
                 device: str | torch.device | None = None, use_local_tokens: bool = True):
        self.encode = encode
        self.device = device
        self.use_local_tokens = use_local_tokens
        self._lru: LRU[str, torch.Tensor] = LRU(capacity)
        self.encode_calls = 0
        self.encode_seconds = 0.0

    @classmethod
    def for_pipeline(cls, pipe, capacity: int = 256, use_local_tokens: bool | None = None,
                     device: str | torch.device | None = None) -> SubjectEncodingCache:
        """A cache over ``pipe.encode_subjects`` with the local-token setting resolved once (default: the
        adapter's config), so :meth:`key` and the encoder always agree."""
        if use_local_tokens is None:
            use_local_tokens = pipe.adapter.encoder.config.use_local_tokens
        use_local = bool(use_local_tokens)
        return cls(lambda images: pipe.encode_subjects(images, use_local), capacity, device, use_local)

    def key(self, data: bytes) -> str:
        """:func:`content_key` of an image file's bytes for this cache's token variant."""
        return content_key(data, self.use_local_tokens)

    def get(self, items: Sequence[tuple[str, PIL.Image.Image]]) -> tuple[torch.Tensor, int]:
        """``[(key, image), ...]`` -> (tokens (K, T, W) in the order given, number of hits).

        Keys seen before come from memory; the others are encoded in ONE call of ``encode``. A key repeated
        within the call is encoded once and counts as a hit for its repeats (hits + misses = len(items)).
        """
        if not items:
            raise ValueError("items must hold at least one (key, image) pair, got none")
        found: dict[str, torch.Tensor] = {}
        todo: dict[str, PIL.Image.Image] = {}  # key -> image, first occurrence order
        hits = 0
        for key, image in items:
            if key in found or key in todo:
                self._lru.hits += 1  # a repeat within this call: served without its own encoding
                hits += 1
                continue
            value = self._lru.get(key)
            if value is None:
                todo[key] = image
            else:
                found[key] = value
                hits += 1
        if todo:
            start = time.perf_counter()
            tokens = self.encode(list(todo.values()))  # (M, T, W)
            self.encode_seconds += time.perf_counter() - start
            self.encode_calls += 1
            if tokens.shape[0] != len(todo):
                raise ValueError(f"encode returned {tokens.shape[0]} encodings for {len(todo)} images "
                                 f"(shape {tuple(tokens.shape)})")
            for key, t in zip(todo, tokens):
                # clone: each entry owns its storage, so evicting one frees it (a view would pin the batch)
                t = (t if self.device is None else t.to(self.device)).clone()
                found[key] = t
                self._lru.put(key, t)
        return torch.stack([found[key] for key, _ in items]), hits  # (K, T, W)

    def stats(self) -> dict[str, Any]:
        return {**self._lru.stats(), "encode_calls": self.encode_calls, "encode_seconds": self.encode_seconds}
