"""The file systems of roots that other processes write: the LoRA root, datasets, training runs.

fsspec's object-store backends (s3fs, gcsfs) keep a listings cache: once a folder is listed,
`info` and `exists` answer from the listing, with no expiry. For a root that training jobs,
other ingress replicas or other nodes write, that answer goes stale: a file published since is
"not found", and an overwritten file keeps its old size and ETag, so its old version is
served. Measured with s3fs against an S3 API (tests/test_s3_roots.py). These roots are opened
with the listings cache off; each lookup asks the store.
"""

from __future__ import annotations

import fsspec
from fsspec import AbstractFileSystem


def shared_root(uri: str) -> tuple[AbstractFileSystem, str]:
    """(file system, path) of a URI or local path under a root other processes write."""
    return fsspec.core.url_to_fs(uri, use_listings_cache=False)
