"""The LoRA store: `.safetensors` files under one fsspec root, addressed by relative name.

A name never leaves the root: it is checked as text before any file-system call, and on a local
root the resolved path (symlinks followed) must still lie inside the root.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import struct
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem

from serve.errors import LoraNotFound
from serve.loras.files import MAX_HEADER_BYTES, read_header

LORA_SUFFIX = ".safetensors"
MAX_NAME_CHARS = 512


@dataclass(frozen=True)
class LoraRef:
    """One version of one adapter file."""

    name: str
    """Path relative to the root, with forward slashes."""
    version: str
    """Changes whenever the file's content may have changed (size, mtime or ETag)."""

    @property
    def key(self) -> str:
        """The multiplexed model id: a replica caches adapters per file version."""
        return f"{self.name}@{self.version}"


def _not_found(name: str) -> LoraNotFound:
    return LoraNotFound(f"LoRA not found: {name}")


def check_name(name: str) -> str:
    """The normalised relative name, or LoraNotFound for a name the store never serves."""
    if not name or len(name) > MAX_NAME_CHARS or "\x00" in name or "\\" in name:
        raise _not_found(name)
    if name.startswith("/") or "://" in name or (len(name) > 1 and name[1] == ":"):
        raise LoraNotFound(f"LoRA not found: {name} (names are relative to the LoRA root)")
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise LoraNotFound(f"LoRA not found: {name} (names may not contain '..' or empty parts)")
    if not name.endswith(LORA_SUFFIX):
        raise LoraNotFound(f"LoRA not found: {name} (only {LORA_SUFFIX} files are served)")
    return name


class LoraStore:
    def __init__(self, root: str):
        self.root_uri = root
        self.fs, root_path = fsspec.core.url_to_fs(root)
        self.root = root_path.rstrip("/") or "/"
        self._is_local = isinstance(self.fs, LocalFileSystem)

    def path_of(self, name: str) -> str:
        """The file-system path of a checked name (no I/O)."""
        return posixpath.join(self.root, check_name(name))

    def resolve(self, name: str) -> LoraRef:
        """The current version of `name`; LoraNotFound when absent or outside the root."""
        path = self.path_of(name)
        if self._is_local and not self._inside_root(path):
            raise _not_found(name)
        try:
            info = self.fs.info(path)
        except (FileNotFoundError, NotADirectoryError) as e:
            raise _not_found(name) from e
        if info.get("type") != "file":
            raise _not_found(name)
        return LoraRef(name=name, version=_version_of(info))

    def read_bytes(self, ref: LoraRef) -> bytes:
        """The file's bytes; LoraNotFound if it vanished since it was resolved."""
        try:
            return self.fs.cat_file(self.path_of(ref.name))
        except FileNotFoundError as e:
            raise _not_found(ref.name) from e

    def read_metadata(self, ref: LoraRef) -> dict[str, str]:
        """The file's safetensors metadata, reading only its header, never the tensors."""
        try:
            with self.fs.open(self.path_of(ref.name), "rb") as file:
                head = file.read(8)
                length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
                head += file.read(min(length, MAX_HEADER_BYTES))
        except FileNotFoundError as e:
            raise _not_found(ref.name) from e
        metadata = read_header(head, ref.name).get("__metadata__") or {}
        return {str(k): str(v) for k, v in metadata.items()}

    def _inside_root(self, path: str) -> bool:
        root = os.path.realpath(self.root)
        return os.path.realpath(path).startswith(root + os.sep)


def _version_of(info: dict) -> str:
    etag = info.get("ETag") or info.get("etag")
    stamp = info.get("mtime") or info.get("LastModified") or info.get("created") or ""
    raw = f"{info.get('size')}|{etag or stamp}"
    return hashlib.sha256(raw.encode()).hexdigest()[:12]
