"""`GET /loras`: every file under the LoRA root with its size, sha256 and detected facts.

Hashing and parsing read the whole file, so each file version (the store's `LoraRef.key`) is
inspected once and remembered; listing again only lists the root.
"""

from __future__ import annotations

import hashlib

from serve.errors import LoraIncompatible, LoraNotFound
from serve.loras.files import parse_lora_file
from serve.loras.formats import inspect_lora
from serve.loras.store import LoraRef, LoraStore


class Catalog:
    def __init__(self, store: LoraStore):
        self.store = store
        self._entries: dict[str, dict] = {}  # LoraRef.key -> entry

    def entries(self, family: str | None = None) -> list[dict]:
        """One entry per servable file, sorted by name; `family` keeps that family's only."""
        entries = {}
        for ref, _size in self.store.list_files():
            try:
                entries[ref.key] = self.entry_of(ref)
            except LoraNotFound:
                continue  # deleted while listing
        self._entries = entries  # forget versions that no longer exist
        return [e for e in entries.values() if family is None or e["family"] == family]

    def entry_of(self, ref: LoraRef) -> dict:
        """The entry of one file version, inspected on first use."""
        entry = self._entries.get(ref.key)
        if entry is None:
            entry = self.remember(ref, self.store.read_bytes(ref))
        return entry

    def remember(self, ref: LoraRef, data: bytes) -> dict:
        """Inspect a file whose bytes are at hand (one just written) and keep its entry."""
        entry = inspect_file(data, ref)
        self._entries[ref.key] = entry
        return entry


def inspect_file(data: bytes, ref: LoraRef) -> dict:
    """name, size_bytes, sha256 and the facts of `inspect_lora`; a file that does not parse is
    listed with `error` and no facts, so a bad file in the root is visible, not hidden."""
    entry = {"name": ref.name, "size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    try:
        tensors, metadata = parse_lora_file(data, ref.name)
    except LoraIncompatible as e:
        return {**entry, "format": None, "family": None, "error": e.message}
    return {**entry, **inspect_lora(tensors, metadata).model_dump(), "error": None}
