"""LoRA registry: relation id -> relation LoRA file, at a storage root (any fsspec URL).

Shared by ``batch`` (which reads it: each actor resolves a manifest row's ``relation`` to a LoRA) and by training
jobs (which write it with :meth:`LoRARegistry.register`). Two ways to name a relation's LoRA, both under ``root``:

- folder layout: ``{root}/{relation}/pytorch_lora_weights.safetensors`` (the diffusers file name, what
  ``dreamrelation.model.lora.save_relation_lora`` writes), plus an optional ``{root}/{relation}/card.json``;
- a registry file ``{root}/registry.json`` = ``{"relations": {"hugging": "s3://other/hug.safetensors", ...}}``;
  each value is a URL, an absolute path, or a path relative to ``root``; a value that does not end in
  ``.safetensors`` names a folder holding ``pytorch_lora_weights.safetensors``. It takes precedence over the
  folder layout for the ids it names.

No torch here: files are checked as safetensors by their JSON header only. ``registry.json`` is read once per
instance (a job runs over a fixed set of LoRAs); :meth:`LoRARegistry.refresh` reads it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from typing import Any

from . import storage
from .access import AccessPolicy, inside
from .schema import KEY_PATTERN, check_key

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # == dreamrelation.model.lora.LORA_WEIGHTS_NAME (no import: layering)
CARD_NAME = "card.json"
REGISTRY_FILE = "registry.json"


class UnknownRelationError(ValueError):
    """A relation id with no LoRA in the registry (a row-level error in ``batch``, not a systemic one)."""


def check_relation_id(relation: Any, name: str = "relation") -> str:
    """Return ``relation`` if it is a valid relation id: the manifest's key rule (letters, digits, ``-_.``)."""
    return check_key(relation, name)


def check_safetensors(data: bytes, what: str) -> None:
    """Raise ``ValueError`` unless ``data`` is a safetensors file holding LoRA tensors (header check, no torch)."""
    if len(data) < 8:
        raise ValueError(f"{what} is not a safetensors file: {len(data)} bytes")
    (n,) = struct.unpack("<Q", data[:8])
    try:
        if 8 + n > len(data):
            raise ValueError(f"header length {n} exceeds the file size {len(data)}")
        header = json.loads(data[8:8 + n])
    except ValueError as e:
        raise ValueError(f"{what} is not a safetensors file: {e}") from None
    keys = [k for k in header if k != "__metadata__"]
    if not any("lora" in k for k in keys):
        raise ValueError(f"{what} holds no LoRA tensors (no key contains 'lora'; first keys: {keys[:3]})")


def _is_absolute(location: str) -> bool:
    return "://" in location or location.startswith("/") or os.path.isabs(location)


class LoRARegistry:
    """Relation id -> LoRA URI at a storage root; ``root=None`` is an empty registry (no relation has a LoRA).

    ``access``: what the registry may point at. By default a ``registry.json`` entry must resolve inside the
    registry's root (``AccessPolicy.allow_external_loras`` lifts that, and the entry's URI must then pass the
    policy's scheme and address rules)."""

    def __init__(self, root: str | os.PathLike | None, access: AccessPolicy | None = None):
        self.root = None if root is None else str(root).rstrip("/")
        if self.root == "":
            raise ValueError(f"root must be a storage URL or path (or None), got {root!r}")
        self.access = access or AccessPolicy()
        self._index: dict[str, str] | None = None  # registry.json, resolved to URIs; read lazily

    def __repr__(self) -> str:
        return f"LoRARegistry({self.root!r})"

    # ---- reading ------------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Forget the cached ``registry.json`` (it is read again on next use)."""
        self._index = None

    def _registry_file(self) -> dict[str, str]:
        """``registry.json`` as {relation: uri}; empty when absent."""
        if self._index is None:
            self._index = {} if self.root is None else self._read_registry_file()
        return self._index

    def _read_registry_file(self) -> dict[str, str]:
        uri = storage.join(self.root, REGISTRY_FILE)
        if not storage.exists(uri):
            return {}
        try:
            data = json.loads(storage.read_bytes(uri))
        except ValueError as e:
            raise ValueError(f"{uri} is not valid JSON: {e}") from None
        relations = data.get("relations") if isinstance(data, dict) else None
        if not isinstance(relations, dict):
            raise ValueError(f"{uri} must hold {{\"relations\": {{relation: location}}}}, got {data!r:.200}")
        index = {}
        for relation, location in relations.items():
            check_relation_id(relation, f"{uri}: relation id")
            if not isinstance(location, str) or not location.strip():
                raise ValueError(f"{uri}: relation {relation!r} must map to a file location, got {location!r}")
            location = location.strip()
            if not _is_absolute(location):
                location = storage.join(self.root, location)
            if not location.endswith(".safetensors"):
                location = storage.join(location, WEIGHTS_NAME)
            index[relation] = location
        return index

    def _folder_uri(self, relation: str) -> str:
        return storage.join(self.root, relation, WEIGHTS_NAME)

    def _folder_relations(self) -> list[str]:
        if self.root is None:
            return []
        fs, path = storage.filesystem(self.root)
        found = []
        for p in fs.glob(f"{path.rstrip('/')}/*/{WEIGHTS_NAME}"):
            relation = p.rstrip("/").rsplit("/", 2)[-2]
            if KEY_PATTERN.match(relation):
                found.append(relation)
            else:
                logger.debug("ignoring folder %r under %s: not a relation id", relation, self.root)
        return found

    def relations(self) -> list[str]:
        """Every relation id with a LoRA (sorted)."""
        return sorted(set(self._folder_relations()) | set(self._registry_file()))

    def problem(self, relation: str) -> str | None:
        """Why ``relation`` has no usable LoRA here (unknown; a ``registry.json`` entry outside the registry, not
        allowed by the access policy, or naming a file that does not exist), or None when it has one."""
        check_relation_id(relation)
        if self.root is None:
            return f"unknown relation {relation!r}: no LoRA registry was given (--loras)"
        if relation in self._registry_file():
            uri = self._registry_file()[relation]
            where = f"{storage.join(self.root, REGISTRY_FILE)} maps relation {relation!r} to {uri}"
            if not inside(uri, self.root):
                if not self.access.allow_external_loras:
                    return f"{where}, outside the registry (allowed with --allow-external-loras)"
                refused = self.access.reason(uri, "LoRA file")
                if refused:
                    return f"{where}: {refused}"
            if not storage.exists(uri):
                return f"{where}, which does not exist"
            return None
        if storage.exists(self._folder_uri(relation)):
            return None
        return f"unknown relation {relation!r}: no LoRA in the registry"

    def has(self, relation: str) -> bool:
        return self.problem(relation) is None

    def uri(self, relation: str) -> str:
        """The LoRA file of ``relation``; :class:`UnknownRelationError` (a ``ValueError``) naming why if it has none
        (:meth:`problem`)."""
        problem = self.problem(relation)
        if problem is not None:
            raise UnknownRelationError(f"{problem} (registry {self.root!r}; known relations: {self.relations()})")
        if relation in self._registry_file():
            return self._registry_file()[relation]
        return self._folder_uri(relation)

    def read_bytes(self, relation: str) -> bytes:
        """The LoRA file's bytes (a safetensors file; ``safetensors.torch.load`` turns it into a state dict)."""
        uri = self.uri(relation)
        try:
            return storage.read_bytes(uri)
        except FileNotFoundError:
            raise UnknownRelationError(f"relation {relation!r}: {REGISTRY_FILE} at {self.root!r} points to "
                                       f"{uri}, which does not exist") from None

    def fingerprint(self, relation: str) -> str:
        """A short id of the LoRA file's current version, from its metadata (ETag or mtime, and size): one stat,
        no download; a content hash only where the store reports neither."""
        uri = self.uri(relation)
        fs, path = storage.filesystem(uri)
        info = fs.info(path)
        token = next((info[k] for k in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created")
                      if info.get(k) is not None), None)
        if token is None:
            token = hashlib.sha256(storage.read_bytes(uri)).hexdigest()
        return hashlib.sha256(f"{uri}\0{info.get('size')}\0{token}".encode()).hexdigest()[:16]

    def card(self, relation: str) -> dict | None:
        """``{root}/{relation}/card.json`` if present (folder layout only), else None."""
        check_relation_id(relation)
        if self.root is None:
            return None
        uri = storage.join(self.root, relation, CARD_NAME)
        return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None

    # ---- writing ------------------------------------------------------------------------------------------
    def register(self, relation: str, source: bytes | str | os.PathLike, card: dict | None = None) -> str:
        """Write a relation LoRA to ``{root}/{relation}/pytorch_lora_weights.safetensors``; returns its URI.

        ``source``: the file's bytes, or a path / URL of a ``.safetensors`` file or of a folder holding
        ``pytorch_lora_weights.safetensors``. Each file is written atomically, the card first and the weights
        last, so a reader never sees a relation whose weights are partial.
        """
        check_relation_id(relation)
        if self.root is None:
            raise ValueError(f"cannot register relation {relation!r}: this registry has no root (root=None)")
        if relation in self._registry_file():
            raise ValueError(f"relation {relation!r} is mapped by {storage.join(self.root, REGISTRY_FILE)} to "
                             f"{self._registry_file()[relation]}, which would shadow a registered file; "
                             "edit that entry instead")
        if isinstance(source, (bytes, bytearray, memoryview)):
            data, what = bytes(source), f"LoRA bytes for relation {relation!r}"
        elif isinstance(source, (str, os.PathLike)):
            location = str(source)
            if not location.endswith(".safetensors"):
                location = storage.join(location, WEIGHTS_NAME)
            if not storage.exists(location):
                raise ValueError(f"source for relation {relation!r} not found: {location}")
            data, what = storage.read_bytes(location), location
        else:
            raise ValueError(f"source must be bytes or a path/URL, got {type(source).__name__}")
        check_safetensors(data, what)
        if card is not None:
            if not isinstance(card, dict):
                raise ValueError(f"card must be a dict (written as JSON), got {type(card).__name__}")
            card_json = json.dumps(card, indent=2, sort_keys=True, default=str).encode()
            storage.write_bytes_atomic(storage.join(self.root, relation, CARD_NAME), card_json)
        uri = self._folder_uri(relation)
        storage.write_bytes_atomic(uri, data)
        logger.info("registered relation %r: %s (%d bytes)", relation, uri, len(data))
        return uri
