"""The LoRA store: `.safetensors` files under one fsspec root, addressed by relative name.

A name never leaves the root: it is checked as text before any file-system call, and on a local
root the resolved path (symlinks followed) must still lie inside the root. Hidden parts (`.x`)
are never names: uploads are staged under the root's hidden `.uploads/` folder, and a file
becomes visible only when `publish` moves it into place in one step.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import struct
import threading
import time
import uuid
from collections import OrderedDict
from typing import BinaryIO

from fsspec.implementations.local import LocalFileSystem

from deployments.errors import LoraNotFound
from deployments.loras.files import MAX_HEADER_BYTES, read_header
from deployments.schemas import LoraRef
from deployments.storage import shared_root

LORA_SUFFIX = ".safetensors"
MAX_NAME_CHARS = 512
# A file or folder name's limit on common file systems (NAME_MAX): a longer part is no file
# here, and asking the file system about it fails with ENAMETOOLONG rather than not found.
MAX_NAME_PART_BYTES = 255
STAGING_FOLDER = ".uploads"
PRIVATE_FOLDER = ".loraplex"  # loraplex's own files in the root (the catalog's index)
COPY_CHUNK_BYTES = 8 * 1024 * 1024
# Bounds the memory of the recent resolves and of the headers' metadata, by names / versions.
MAX_REMEMBERED = 4096


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
    if any(part.startswith(".") for part in parts):
        raise LoraNotFound(f"LoRA not found: {name} (hidden files and folders are not served)")
    if any(len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_PART_BYTES for part in parts):
        raise LoraNotFound(
            f"LoRA not found: {name} (a file or folder name over {MAX_NAME_PART_BYTES} bytes)"
        )
    if not name.endswith(LORA_SUFFIX):
        raise LoraNotFound(f"LoRA not found: {name} (only {LORA_SUFFIX} files are served)")
    return name


class LoraStore:
    def __init__(self, root: str):
        self.root_uri = root
        self.fs, root_path = shared_root(root)
        self.root = root_path.rstrip("/") or "/"
        self.is_local = isinstance(self.fs, LocalFileSystem)
        """A folder of this machine's file system (which may itself be a network mount)."""
        # name -> (monotonic time resolved, version), for `resolve(max_age_s=...)`; and the
        # header metadata of file versions (a version's content never changes).
        self._recent: OrderedDict[str, tuple[float, LoraRef]] = OrderedDict()
        self._metadata: OrderedDict[LoraRef, dict[str, str]] = OrderedDict()
        self._remembered_lock = threading.Lock()  # resolves run in worker threads

    def path_of(self, name: str) -> str:
        """The file-system path of a checked name (no I/O)."""
        return posixpath.join(self.root, check_name(name))

    def resolve(self, name: str, max_age_s: float = 0.0) -> LoraRef:
        """The current version of `name`; LoraNotFound when absent or outside the root. With
        `max_age_s` above 0, a version this store resolved at most that long ago answers
        instead of the root (where each resolve is a request on an object store). Only found
        files are remembered, so a newly published file is found at once; this store's own
        writes and deletes update what it remembers."""
        if max_age_s > 0:
            with self._remembered_lock:
                recent = self._recent.get(name)
            if recent is not None and time.monotonic() - recent[0] <= max_age_s:
                return recent[1]
        try:
            ref = self._resolve_in_root(name)
        except LoraNotFound:
            self._forget(name)
            raise
        with self._remembered_lock:
            self._recent[name] = (time.monotonic(), ref)
            self._recent.move_to_end(name)
            _trim(self._recent)
        return ref

    def _resolve_in_root(self, name: str) -> LoraRef:
        path = self.path_of(name)
        if self.is_local and not self._inside_root(path):
            raise _not_found(name)
        try:
            info = self.fs.info(path)
        except (FileNotFoundError, NotADirectoryError) as e:
            raise _not_found(name) from e
        if info.get("type") != "file":
            raise _not_found(name)
        return LoraRef(name=name, version=_version_of(info))

    def _forget(self, name: str) -> None:
        with self._remembered_lock:
            self._recent.pop(name, None)

    def list_files(self) -> list[tuple[LoraRef, int]]:
        """Every servable file under the root, sorted by name, with its size in bytes."""
        try:
            found = self.fs.find(self.root, withdirs=False, detail=True)
        except FileNotFoundError:
            return []
        files = []
        for path, info in found.items():
            name = posixpath.relpath(path, self.root)
            try:
                check_name(name)
            except LoraNotFound:
                continue  # hidden, not .safetensors, or an odd name: never servable
            if self.is_local and not self._inside_root(posixpath.join(self.root, name)):
                continue
            files.append((LoraRef(name=name, version=_version_of(info)), int(info["size"])))
        return sorted(files, key=lambda item: item[0].name)

    def exists(self, name: str) -> bool:
        try:
            self.resolve(name)
        except LoraNotFound:
            return False
        return True

    def delete(self, name: str) -> LoraRef:
        """Remove a file; LoraNotFound when absent. Replicas holding it keep nothing stale:
        their cache key includes the file version, so a new file of that name loads afresh."""
        ref = self.resolve(name)
        self._forget(name)
        try:
            self.fs.rm_file(self.path_of(name))
        except FileNotFoundError as e:
            raise _not_found(name) from e
        return ref

    def staging_path(self, *parts: str) -> str:
        """A path under the hidden staging folder (callers pass checked ids only)."""
        return posixpath.join(self.root, STAGING_FOLDER, *parts)

    def private_path(self, *parts: str) -> str:
        """A path under the root's hidden folder for loraplex's own files, which is never listed
        or served (callers pass fixed names only)."""
        return posixpath.join(self.root, PRIVATE_FOLDER, *parts)

    def write_staged(self, path: str, data: bytes) -> None:
        """Write `data` to a path in the root's hidden folders in one step: a reader sees all of
        it or nothing."""
        temporary = f"{path}.{uuid.uuid4().hex}.tmp"
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        self.fs.pipe_file(temporary, data)
        self._move(temporary, path)

    def write(self, name: str, data: bytes) -> LoraRef:
        """Write a file under `name` in one step (staged, then moved into place)."""
        staged = self.staging_path(f"{uuid.uuid4().hex}.tmp")
        self.fs.makedirs(posixpath.dirname(staged), exist_ok=True)
        self.fs.pipe_file(staged, data)
        try:
            return self.publish(staged, name)
        except BaseException:
            self.fs.rm_file(staged)
            raise

    def publish(self, staged_path: str, name: str) -> LoraRef:
        """Move a staged file to `name` (replacing any file there) and return its version."""
        path = self.path_of(name)
        if self.is_local and not self._inside_root(path):
            raise _not_found(name)
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        self._move(staged_path, path)
        return self.resolve(name)

    def _move(self, source: str, target: str) -> None:
        if self.is_local:
            os.replace(source, target)  # atomic on one file system; .uploads/ is on the root's
        else:
            self.fs.mv(source, target)  # object stores: a copy, visible once complete

    def read_bytes(self, ref: LoraRef) -> bytes:
        """The file's bytes; LoraNotFound if it vanished since it was resolved."""
        try:
            return self.fs.cat_file(self.path_of(ref.name))
        except FileNotFoundError as e:
            raise _not_found(ref.name) from e

    def copy_to(self, ref: LoraRef, out: BinaryIO) -> int:
        """Stream the file into `out`, in chunks (a file may be gigabytes); its size in bytes.
        LoraNotFound if it vanished since it was resolved."""
        size = 0
        try:
            with self.fs.open(self.path_of(ref.name), "rb") as file:
                while chunk := file.read(COPY_CHUNK_BYTES):
                    out.write(chunk)
                    size += len(chunk)
        except FileNotFoundError as e:
            raise _not_found(ref.name) from e
        return size

    def read_metadata(self, ref: LoraRef) -> dict[str, str]:
        """The file's safetensors metadata, reading only its header, never the tensors; read
        once per version."""
        with self._remembered_lock:
            known = self._metadata.get(ref)
        if known is not None:
            return dict(known)
        metadata = self._read_metadata(ref)
        with self._remembered_lock:
            self._metadata[ref] = metadata
            _trim(self._metadata)
        return dict(metadata)

    def _read_metadata(self, ref: LoraRef) -> dict[str, str]:
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


def _trim(remembered: OrderedDict) -> None:
    """Drop the oldest entries beyond MAX_REMEMBERED (callers hold the lock)."""
    while len(remembered) > MAX_REMEMBERED:
        remembered.popitem(last=False)


def _version_of(info: dict) -> str:
    etag = info.get("ETag") or info.get("etag")
    stamp = info.get("mtime") or info.get("LastModified") or info.get("created") or ""
    raw = f"{info.get('size')}|{etag or stamp}"
    return hashlib.sha256(raw.encode()).hexdigest()[:12]
