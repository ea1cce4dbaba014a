"""`GET /loras`: every file under the LoRA root with its size, sha256 and detected facts.

Hashing and parsing read the whole file, so each file version (the store's `LoraRef.key`) is
inspected once and remembered; listing again only lists the root. What was inspected is also
kept in an index file in the root's hidden folder, so another ingress replica, or this one after
a restart, lists a root of thousands of adapters without downloading every file again. The index
is only a cache: entries are by file version, so a changed file is inspected again, and an index
that is missing, unreadable or of another format is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging

from deployments.errors import LoraIncompatible, LoraNotFound
from deployments.loras.files import parse_lora_file
from deployments.loras.formats import inspect_lora
from deployments.loras.store import LoraStore
from deployments.schemas import LoraRef

logger = logging.getLogger(__name__)

INDEX_FILE = "catalog.json"
# 2: entries carry the adapter `kind`; 3: files with unusable metadata or values carry `error`
INDEX_FORMAT = 3
_NO_FACTS = {"format": None, "kind": None, "family": None}  # what a file with `error` lists


class Catalog:
    def __init__(self, store: LoraStore):
        self.store = store
        self._entries: dict[str, dict] = {}  # LoraRef.key -> entry
        self._indexed: set[str] | None = None  # the keys the index holds; None: not read yet

    def entries(self, family: str | None = None) -> list[dict]:
        """One entry per servable file, sorted by name; `family` keeps that family's only."""
        refs = [ref for ref, _size in self.store.list_files()]
        if self._indexed is None or any(ref.key not in self._entries for ref in refs):
            # Files this replica has not inspected: another ingress replica may have since,
            # and one read of the index costs less than reading even one of them.
            indexed = self._read_index()
            self._entries = {**indexed, **self._entries}
            self._indexed = set(indexed)
        entries = {}
        for ref in refs:
            try:
                entries[ref.key] = self.entry_of(ref)
            except LoraNotFound:
                continue  # deleted while listing
        self._entries = entries  # forget versions that no longer exist
        if set(entries) != self._indexed:
            self._write_index(entries)
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

    def _read_index(self) -> dict[str, dict]:
        try:
            index = json.loads(self.store.fs.cat_file(self.store.private_path(INDEX_FILE)))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            logger.warning("LoRA catalog index unreadable, rebuilding it: %s", e)
            return {}
        if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
            return {}
        entries = index.get("entries")
        if not isinstance(entries, dict):
            return {}
        return {k: v for k, v in entries.items() if isinstance(v, dict) and "name" in v}

    def _write_index(self, entries: dict[str, dict]) -> None:
        """Replace the index in one step. Each replica reads the index again before it
        inspects a file, so what another one added is kept; two writing at once: the last one
        wins, and what the other added is inspected again by whoever lists next."""
        data = json.dumps({"format": INDEX_FORMAT, "entries": entries}).encode()
        try:
            self.store.write_staged(self.store.private_path(INDEX_FILE), data)
        except OSError as e:  # a read-only root still lists, each replica inspecting for itself
            logger.warning("LoRA catalog index not written: %s", e)
        self._indexed = set(entries)  # tried again only once the files change


def inspect_file(data: bytes, ref: LoraRef) -> dict:
    """name, size_bytes, sha256 and the facts of `inspect_lora`; a file that does not parse, or
    that a load would refuse for its metadata or values, is listed with `error` and no facts, so
    a bad file in the root is visible, not hidden."""
    entry = {"name": ref.name, "size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    try:
        tensors, metadata = parse_lora_file(data, ref.name)
        facts = inspect_lora(tensors, metadata, ref.name).model_dump()
    except LoraIncompatible as e:
        return {**entry, **_NO_FACTS, "error": e.message}
    except Exception as e:  # one file the checks missed must not fail the listing for everyone
        logger.exception("LoRA %s could not be inspected", ref.name)
        why = f"Failed to load LoRA: {ref.name}: could not be inspected ({type(e).__name__})"
        return {**entry, **_NO_FACTS, "error": why}
    return {**entry, **facts, "error": None}
