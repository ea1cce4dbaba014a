"""Resumable uploads, staged under the LoRA root's hidden `.uploads/<upload_id>/` folder.

The state lives in the store, not in a process: `upload.json` says what the client announced,
and each chunk is its own part file named by its offset, written in one step, so the offset to
resume from is the sum of the part sizes and any ingress replica can take the next chunk. A
half-received chunk is never stored, so an interrupted client resumes from the last whole one.
Nothing here is visible as a LoRA until the ingress validates the assembled file and publishes it.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import struct
import time
import uuid

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deployments.errors import (
    Conflict,
    InvalidRequest,
    LoraIncompatible,
    LoraNotFound,
    NotFound,
    TooLarge,
)
from deployments.loras.files import read_header
from deployments.loras.metadata import metadata_problem
from deployments.loras.store import LoraStore, check_name

_UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")
_STATE_FILE = "upload.json"
_PART_SUFFIX = ".part"
_OFFSET_DIGITS = 20
MAX_METADATA_ENTRIES = 64
MAX_METADATA_CHARS = 64 * 1024


def checked_target(name: str, field: str) -> str:
    """A name a LoRA may be written to; InvalidRequest naming the field otherwise."""
    try:
        return check_name(name)
    except LoraNotFound as e:
        reason = e.message.partition(" (")[2].rstrip(")") or "not a valid LoRA file name"
        raise InvalidRequest(f"{field}: {name!r}: {reason}") from e


class UploadStart(BaseModel):
    """`POST /loras/uploads`: what the client is about to send."""

    model_config = ConfigDict(extra="forbid")

    filename: str = Field(
        min_length=1,
        max_length=512,
        description="Name to publish under, relative to the LoRA root (sub-folders allowed).",
    )
    total_size: int = Field(ge=8, description="The file's size in bytes.")
    sha256: str = Field(
        pattern=r"^[0-9a-fA-F]{64}$", description="Hex sha256 of the whole file; checked."
    )
    metadata: dict[str, str | list[str]] = Field(
        default_factory=dict,
        max_length=MAX_METADATA_ENTRIES,
        description="Merged into the file's safetensors metadata on publish (e.g. "
        "trigger_words); lists are stored as JSON. The published file's sha256 then differs.",
    )
    family: str | None = Field(
        default=None, description="Validate against this family's model instead of detecting it."
    )
    overwrite: bool = Field(default=False, description="Replace a file of the same name.")

    @field_validator("filename")
    @classmethod
    def _servable_name(cls, filename: str) -> str:
        # InvalidRequest, not ValueError: it passes through pydantic with its own message.
        return checked_target(filename, "filename")

    @field_validator("metadata")
    @classmethod
    def _bounded_metadata(cls, metadata: dict) -> dict:
        if len(json.dumps(metadata)) > MAX_METADATA_CHARS:
            raise ValueError(f"at most {MAX_METADATA_CHARS} characters as JSON")
        return metadata

    def check_metadata(self) -> None:
        """InvalidRequest naming the first metadata value loraplex could not use, so a client
        hears of it before sending any byte; `complete` checks the merged file once more. Not
        a validator: an upload staged before a check was added must still load, to be
        completed (and refused) or removed."""
        problem = metadata_problem(self.file_metadata())
        if problem:
            raise InvalidRequest(f"metadata.{problem}")

    def file_metadata(self) -> dict[str, str]:
        """The metadata as safetensors stores it: string values only."""
        return _as_text(self.metadata)


def _as_text(metadata: dict[str, str | list[str]]) -> dict[str, str]:
    return {
        key: value if isinstance(value, str) else json.dumps(value)
        for key, value in metadata.items()
    }


class UploadState(BaseModel):
    upload_id: str
    start: UploadStart
    created_s: float
    tenant: str | None = None
    """The tenant of the key that began it: only that tenant's keys (or keys without a tenant)
    reach it, and it publishes into that tenant's folder."""
    offset: int = 0
    """Bytes received so far: where the next chunk starts."""


class Uploads:
    def __init__(self, store: LoraStore, max_lora_bytes: int, expiry_s: int):
        self.store = store
        self.max_lora_bytes = max_lora_bytes
        self.expiry_s = expiry_s

    def start(self, start: UploadStart, tenant: str | None = None) -> UploadState:
        if start.total_size > self.max_lora_bytes:
            raise TooLarge(
                f"total_size: {start.total_size} bytes is over the limit of {self.max_lora_bytes}"
            )
        self.remove_expired()
        state = UploadState(
            upload_id=uuid.uuid4().hex, start=start, created_s=time.time(), tenant=tenant
        )
        self.store.write_staged(self._path(state.upload_id, _STATE_FILE), state_json(state))
        return state

    def describe(self, state: UploadState) -> dict:
        """What the upload routes return: enough for a client to resume."""
        return {
            "upload_id": state.upload_id,
            "filename": state.start.filename,
            "offset": state.offset,
            "total_size": state.start.total_size,
            "expires_at_s": state.created_s + self.expiry_s,
        }

    def state(self, upload_id: str, tenant: str | None = None) -> UploadState:
        """The upload and its current offset; NotFound when unknown or expired, or when it is
        another tenant's (`tenant` None: any upload)."""
        if not _UPLOAD_ID.match(upload_id):
            raise NotFound(f"upload not found: {upload_id}")
        state = self._load(upload_id)
        if state is None or tenant not in (None, state.tenant):
            raise NotFound(f"upload not found: {upload_id}")
        if self._expired(state):
            self.remove(upload_id)
            raise NotFound(f"upload not found: {upload_id} (expired)")
        state.offset = sum(size for _, size in self._parts(upload_id))
        return state

    def append(
        self, upload_id: str, offset: int, chunk: bytes, tenant: str | None = None
    ) -> UploadState:
        """Store one chunk at `offset`, which must be the bytes received so far."""
        state = self.state(upload_id, tenant)
        if offset != state.offset:
            raise Conflict(
                f"offset: expected {state.offset} (bytes received so far), got {offset}; "
                f"resume from {state.offset}"
            )
        if offset + len(chunk) > state.start.total_size:
            raise InvalidRequest(
                f"offset: {offset} + {len(chunk)} bytes is past total_size {state.start.total_size}"
            )
        if chunk:
            part = f"{offset:0{_OFFSET_DIGITS}d}{_PART_SUFFIX}"
            self.store.write_staged(self._path(upload_id, part), chunk)
        state.offset += len(chunk)
        return state

    def assemble(self, upload_id: str, tenant: str | None = None) -> tuple[UploadState, bytes]:
        """The whole file, checked against the announced size and sha256. A wrong sha256
        removes the upload: its bytes are wrong somewhere, so resuming cannot fix it."""
        state = self.state(upload_id, tenant)
        if state.offset != state.start.total_size:
            raise Conflict(
                f"total_size: received {state.offset} of {state.start.total_size} bytes; "
                f"resume from offset {state.offset}"
            )
        data = b"".join(
            self.store.fs.cat_file(self._path(upload_id, part))
            for part, _ in self._parts(upload_id)
        )
        digest = hashlib.sha256(data).hexdigest()
        if digest != state.start.sha256.lower():
            self.remove(upload_id)
            raise InvalidRequest(
                f"sha256: the received bytes hash to {digest}, not {state.start.sha256.lower()}; "
                "the upload was discarded"
            )
        return state, data

    def remove(self, upload_id: str) -> None:
        if not _UPLOAD_ID.match(upload_id):
            raise NotFound(f"upload not found: {upload_id}")
        try:
            self.store.fs.rm(self._path(upload_id), recursive=True)
        except FileNotFoundError:
            pass

    def remove_expired(self) -> None:
        try:
            folders = self.store.fs.ls(self.store.staging_path(), detail=False)
        except FileNotFoundError:
            return
        for folder in folders:
            upload_id = posixpath.basename(folder.rstrip("/"))
            state = self._load(upload_id) if _UPLOAD_ID.match(upload_id) else None
            if state is not None and self._expired(state):
                self.remove(upload_id)

    def _load(self, upload_id: str) -> UploadState | None:
        try:
            raw = self.store.fs.cat_file(self._path(upload_id, _STATE_FILE))
        except FileNotFoundError:
            return None
        return UploadState.model_validate_json(raw)

    def _expired(self, state: UploadState) -> bool:
        return time.time() - state.created_s > self.expiry_s

    def _parts(self, upload_id: str) -> list[tuple[str, int]]:
        """(file name, size) of each stored chunk, in offset order."""
        listing = self.store.fs.ls(self._path(upload_id), detail=True)
        parts = [
            (posixpath.basename(item["name"]), int(item["size"]))
            for item in listing
            if item["name"].endswith(_PART_SUFFIX)
        ]
        return sorted(parts)

    def _path(self, upload_id: str, *parts: str) -> str:
        return self.store.staging_path(upload_id, *parts)


def state_json(state: UploadState) -> bytes:
    return state.model_dump_json(exclude={"offset"}).encode()


def with_metadata(data: bytes, extra: dict[str, str], name: str) -> bytes:
    """The file with `extra` merged into its safetensors metadata, tensor bytes untouched.

    safetensors has no call that changes metadata without re-serializing every tensor; the
    format is an 8-byte header length, a JSON header whose offsets are relative to the data
    after it, then the data, so a new header in front of the same data is a valid file."""
    if not extra:
        return data
    header = read_header(data, name)
    (header_len,) = struct.unpack("<Q", data[:8])
    stored = header.get("__metadata__") or {}
    if not isinstance(stored, dict):  # what safetensors itself refuses to read
        raise LoraIncompatible(f"Failed to load LoRA: {name}: corrupt safetensors metadata")
    header["__metadata__"] = {**stored, **extra}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keep tensor data 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(encoded)) + encoded + data[8 + header_len :]
