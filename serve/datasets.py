"""Training datasets under `dataset_root`: what `PUT /datasets/{name}` stores, `GET` lists and
`DELETE` removes.

A dataset is a folder of `<stem>.png` + `<stem>.txt` (caption) pairs, the layout the training
job reads (cluster/train). Every image is decoded before anything is written, and a dataset is
replaced in one step, so a job never sees half of an upload.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import posixpath
import re
import uuid

from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, ConfigDict, Field

from deployments.errors import Conflict, InvalidRequest, NotFound
from deployments.media import MAX_DATASET_IMAGE_PIXELS, load_image
from deployments.storage import shared_root
from serve import tenants

MAX_DATASET_IMAGES = 10_000
MAX_NAME_CHARS = 256
STAGING_FOLDER = ".staging"
IMAGE_SUFFIX = ".png"
CAPTION_SUFFIX = ".txt"
# An uploaded file's name becomes `<stem>.png` + `<stem>.txt`: plain characters, no folders.
FILE_STEM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.()+-]{0,127}$")
NAME_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class DatasetImage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    filename: str = Field(min_length=1, max_length=256, description="e.g. img01.jpg")
    content: str = Field(min_length=1, description="The image file, base64.")
    caption: str = Field(default="", max_length=4000)


class DatasetUpload(BaseModel):
    """`PUT /datasets/{name}` as JSON: the whole dataset; it replaces any of that name."""

    model_config = ConfigDict(extra="forbid")

    images: list[DatasetImage] = Field(min_length=1, max_length=MAX_DATASET_IMAGES)


def check_dataset_name(name: str, field: str = "name") -> str:
    """A dataset name: folders of plain parts under the dataset root, never outside it."""
    parts = name.split("/")
    if (
        not name
        or len(name) > MAX_NAME_CHARS
        or "://" in name
        or name.startswith("/")
        or any(not NAME_PART.match(part) or part in (".", "..") for part in parts)
    ):
        raise InvalidRequest(
            f"{field}: {name!r} is not a dataset name (relative, letters, digits, '_', '-', '.' "
            "in each part; no '..', no absolute path, no hidden parts)"
        )
    return name


def image_as_png(data: bytes, filename: str, field: str) -> bytes:
    """The image fully decoded (a truncated file fails here, not in training) within
    deployments/media.py's pixel limit (413 over it), as PNG bytes."""
    with load_image(data, f"{field}: {filename}", MAX_DATASET_IMAGE_PIXELS) as image:
        if image.format == "PNG":
            return data
        out = io.BytesIO()
        keep = image if image.mode in ("RGB", "RGBA", "L", "LA") else image.convert("RGB")
        keep.save(out, format="PNG")
        return out.getvalue()


def _stem(filename: str, field: str) -> str:
    stem = posixpath.splitext(filename)[0]
    if "/" in filename or "\\" in filename or not FILE_STEM.match(stem) or stem.endswith("."):
        raise InvalidRequest(f"{field}: {filename!r} is not a plain file name")
    return stem


class Datasets:
    """Datasets under one fsspec root: `<name>/<stem>.png` + `<stem>.txt` pairs. A tenant
    key's names are its own (`tenants/<tenant>/<name>`) or, to read, shared ones."""

    def __init__(self, root: str):
        self.fs, root_path = shared_root(root)
        self.root = root_path.rstrip("/") or "/"
        self._is_local = isinstance(self.fs, LocalFileSystem)

    def pairs_from_json(self, upload: DatasetUpload) -> dict[str, tuple[bytes, str]]:
        """stem -> (PNG bytes, caption), every image decoded; nothing is written."""
        files = []
        for index, item in enumerate(upload.images):
            field = f"images.{index}.content"
            content = (
                item.content.split(",", 1)[1] if item.content.startswith("data:") else item.content
            )
            try:
                data = base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError) as e:
                raise InvalidRequest(f"{field}: not valid base64 ({e})") from e
            files.append((f"images.{index}", item.filename, data, item.caption))
        return self._pairs(files)

    def pairs_from_form(self, parts: list[tuple[str, str | None, bytes]]) -> dict:
        """The same from multipart parts (field name, file name or None, bytes): image files,
        and captions as `<stem>.txt` files or as text fields named `<stem>.txt`."""
        captions, images = {}, []
        for field, filename, data in parts:
            name = filename if filename is not None else field
            if name.lower().endswith(CAPTION_SUFFIX):
                try:
                    captions[_stem(name, field)] = data.decode("utf-8").strip()
                except UnicodeDecodeError as e:
                    raise InvalidRequest(f"{field}: {name} is not UTF-8 text") from e
            elif filename is not None:
                images.append((field, filename, data))
        stems = {_stem(filename, field) for field, filename, _ in images}
        for stem in captions:
            if stem not in stems:
                raise InvalidRequest(f"{stem}{CAPTION_SUFFIX}: a caption for no uploaded image")
        files = [(f, n, d, captions.get(_stem(n, f), "")) for f, n, d in images]
        if not files:
            raise InvalidRequest("images: no image files in the upload")
        if len(files) > MAX_DATASET_IMAGES:
            raise InvalidRequest(f"images: {len(files)} files; at most {MAX_DATASET_IMAGES}")
        return self._pairs(files)

    def _pairs(self, files: list[tuple[str, str, bytes, str]]) -> dict[str, tuple[bytes, str]]:
        pairs = {}
        for field, filename, data, caption in files:
            stem = _stem(filename, field)
            if stem in pairs:
                raise InvalidRequest(f"{field}: {filename}: another image is also named {stem}")
            pairs[stem] = (image_as_png(data, filename, field), caption)
        return pairs

    def write(
        self, name: str, pairs: dict[str, tuple[bytes, str]], tenant: str | None = None
    ) -> dict:
        """Write the dataset in one step: staged whole, then moved over any old one. Conflict
        when the old one holds other datasets, which replacing it must not take along."""
        stored = tenants.owned(tenant, check_dataset_name(name))
        target = posixpath.join(self.root, stored)
        if not self._inside_root(target):
            raise InvalidRequest(f"name: {name} leads out of the dataset root")
        self._check_no_nested(
            target, f"name: dataset {name}", "delete those or choose another name"
        )
        staged = posixpath.join(self.root, STAGING_FOLDER, uuid.uuid4().hex)
        self.fs.makedirs(staged, exist_ok=True)
        try:
            for stem, (png, caption) in pairs.items():
                self.fs.pipe_file(posixpath.join(staged, stem + IMAGE_SUFFIX), png)
                self.fs.pipe_file(posixpath.join(staged, stem + CAPTION_SUFFIX), caption.encode())
            self._replace(staged, target)
        finally:
            if self.fs.exists(staged):
                self.fs.rm(staged, recursive=True)
        return self.describe(name, tenant)

    def _replace(self, staged: str, target: str) -> None:
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        old = f"{staged}.old"
        if self.fs.exists(target):
            self.fs.mv(target, old, recursive=True)
        if self._is_local:
            os.replace(staged, target)
        else:
            self.fs.mv(staged, target, recursive=True)
        if self.fs.exists(old):
            self.fs.rm(old, recursive=True)

    def owned(self, name: str, tenant: str | None) -> str:
        """The stored name of a dataset the key may delete: its own. Forbidden for a shared one
        a tenant key sees, NotFound when there is none."""
        check_dataset_name(name)
        if tenant is None:
            return name
        for stored in tenants.readable(tenant, name):  # its own, then the shared one
            if self._exists(stored):
                if stored == name:
                    raise tenants.read_only(name)
                return stored
        raise NotFound(f"dataset not found: {name}")

    def locate(self, name: str, tenant: str | None) -> str:
        """The stored name of the dataset `name` means for a key: its own, else the shared one;
        NotFound when neither exists."""
        for stored in tenants.readable(tenant, check_dataset_name(name)):
            if self._exists(stored):
                return stored
        raise NotFound(f"dataset not found: {name}")

    def _exists(self, stored: str) -> bool:
        target = posixpath.join(self.root, stored)
        return self._inside_root(target) and self.fs.isdir(target)

    def delete(self, stored: str, name: str) -> dict:
        """Remove the dataset stored as `stored` (`name` as the key sees it) in one step: moved
        aside whole, then deleted, so a reader sees all of it or none. NotFound when absent, or
        when its path leads out of the root through a symlink (never followed); Conflict when
        it holds other datasets, which deleting it must not take along."""
        target = posixpath.join(self.root, stored)
        if not self._exists(stored):
            raise NotFound(f"dataset not found: {name}")
        self._check_no_nested(target, f"dataset {name}", "delete those first")
        doomed = posixpath.join(self.root, STAGING_FOLDER, f"{uuid.uuid4().hex}.deleted")
        self.fs.makedirs(posixpath.dirname(doomed), exist_ok=True)
        if self._is_local:
            os.replace(target, doomed)
        else:
            self.fs.mv(target, doomed, recursive=True)
        self.fs.rm(doomed, recursive=True)
        return {"deleted": name}

    def _check_no_nested(self, target: str, what: str, remedy: str) -> None:
        """Conflict when the folder at `target` holds other datasets (folders), which replacing
        or deleting it must not take along."""
        try:
            listing = self.fs.ls(target, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return
        nested = sorted(
            posixpath.basename(entry["name"].rstrip("/"))
            for entry in listing
            if entry.get("type") == "directory"
        )
        if nested:
            raise Conflict(f"{what} holds other datasets ({', '.join(nested[:5])}); {remedy}")

    def _inside_root(self, path: str) -> bool:
        if not self._is_local:
            return True  # object stores have no symlinks
        root = os.path.realpath(self.root)
        return os.path.realpath(path).startswith(root + os.sep)

    def describe(self, name: str, tenant: str | None = None) -> dict:
        """The dataset's images (name, bytes, caption); NotFound when absent. Neither the
        folder nor a file in it is read through a symlink leading out of the root."""
        folder = posixpath.join(self.root, self.locate(name, tenant))
        try:
            listing = self.fs.ls(folder, detail=True)
        except FileNotFoundError as e:
            raise NotFound(f"dataset not found: {name}") from e
        sizes = {
            posixpath.basename(i["name"]): int(i.get("size") or 0)
            for i in listing
            if i.get("type") == "file" and self._inside_root(i["name"])
        }
        images = []
        for filename in sorted(sizes):
            if filename.endswith(IMAGE_SUFFIX):
                caption_name = filename[: -len(IMAGE_SUFFIX)] + CAPTION_SUFFIX
                caption_file = posixpath.join(folder, caption_name)
                caption = ""
                if caption_name in sizes:
                    caption = self.fs.cat_file(caption_file).decode("utf-8", "replace")
                images.append(
                    {"filename": filename, "size_bytes": sizes[filename], "caption": caption}
                )
        return {"name": name, "images": images}
