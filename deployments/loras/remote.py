"""LoRAs by URL: the allowlist check, and a node-local disk cache of fetched files.

The ingress checks a URL against the allowlist and names the adapter after it; a replica fetches
the file through `RemoteLoraCache`, each hop's address checked as it connects
(deployments/outbound.py), into the node's disk cache (disk_cache.py: one download per
URL at a time across the node's replicas, a byte budget, least recently used dropped first). A
cached file is named by the sha256 of its normalised URL, so a URL is taken to name one
immutable file (as versioned hub and bucket URLs do): a changed file needs a new URL.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import BinaryIO

import fsspec
import httpx
from filelock import Timeout

from deployments import outbound
from deployments.config import RemoteLoraConfig
from deployments.errors import InvalidRequest, LoraNotFound, RemoteFetchFailed, TooLarge
from deployments.loras.disk_cache import DiskCache, OverBudget
from deployments.outbound import DEFAULT_PORTS, HTTP_SCHEMES, Resolver, system_resolver
from deployments.schemas import LoraRef

CHUNK_BYTES = 1024 * 1024
LOCK_SLACK_S = 60  # a waiter allows the download it waits for this much beyond timeout_s


@dataclass(frozen=True)
class RemoteSource:
    """A URL that passed the allowlist, in normal form."""

    url: str
    """Lower-case scheme and host, default port and fragment dropped: the cache's identity."""

    @property
    def digest(self) -> str:
        """sha256 of the URL: the cached file's name."""
        return hashlib.sha256(self.url.encode()).hexdigest()

    @property
    def display(self) -> str:
        """The URL without its query, which may hold a signature: safe for logs and /models."""
        return self.url.split("?", 1)[0]

    @property
    def ref(self) -> LoraRef:
        """Named like a store file, so its key (`name@version`) is the multiplexed model id."""
        return LoraRef(name=self.display, version=self.digest[:16])


def check_url(url: str, config: RemoteLoraConfig, field: str) -> RemoteSource:
    """The URL in normal form; InvalidRequest naming `field` unless the config allows it
    (scheme, host, port and an IP literal's address: deployments/outbound.py). A host name's
    addresses are checked when it is fetched."""
    if not config.enabled:
        raise InvalidRequest(f"{field}: URL sources are disabled on this server")
    parts = outbound.check_url(url, config.url_rules, field)
    scheme, host, port = parts.scheme.lower(), parts.hostname or "", parts.port
    if parts.path in ("", "/"):
        raise InvalidRequest(f"{field}: the URL names no file")
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != DEFAULT_PORTS.get(scheme):
        netloc = f"{netloc}:{port}"
    query = f"?{parts.query}" if parts.query else ""
    return RemoteSource(url=f"{scheme}://{netloc}{parts.path}{query}")


class RemoteLoraCache:
    """Fetches allowed URLs into the node's disk cache (disk_cache.py), a file named by the
    sha256 of its URL; thread- and process-safe."""

    def __init__(self, config: RemoteLoraConfig, resolver: Resolver = system_resolver):
        self.config = config
        self.resolver = resolver
        """How host names become addresses (tests pass their own)."""
        self.cache = DiskCache(
            config.cache_dir,
            config.cache_budget_bytes,
            lock_wait_s=config.timeout_s + LOCK_SLACK_S,
            stale_part_s=config.timeout_s * 2 + 60,
        )

    def fetch(self, url: str) -> bytes:
        """The file's bytes, downloaded on first use and read from the cache after that."""
        source = check_url(url, self.config, "url")
        try:
            return self.cache.fetch(source.digest, lambda out: self._download(source, out))
        except Timeout as e:
            raise RemoteFetchFailed(
                f"url {source.display}: another download of it took over "
                f"{self.cache.lock_wait_s:g} s (timeout_s)"
            ) from e
        except OverBudget as e:
            raise TooLarge(
                f"url {source.display}: {e.size_bytes} bytes is over the cache budget "
                f"(cache_budget_bytes={self.config.cache_budget_bytes})"
            ) from e

    def stats(self) -> dict:
        """Counters of this process, plus what the shared cache folder holds now."""
        return self.cache.stats()

    def _download(self, source: RemoteSource, out: BinaryIO) -> int:
        """Write the URL's bytes into `out`; their size. Every limit is checked as bytes arrive."""
        deadline = time.monotonic() + self.config.timeout_s
        if source.url.split("://", 1)[0] in HTTP_SCHEMES:
            return self._download_http(source, out, deadline)
        return self._download_fsspec(source, out, deadline)

    def _download_http(self, source: RemoteSource, out: BinaryIO, deadline: float) -> int:
        field = f"url {source.display}"
        rules = self.config.url_rules
        try:
            with outbound.open_http(
                source.url, rules, field, self.config.timeout_s, self.resolver
            ) as response:
                self._check_status(source, response)
                self._check_declared_size(source, response.headers)
                return self._copy(source, response.iter_bytes(CHUNK_BYTES), out, deadline)
        except httpx.TimeoutException as e:
            raise self._timed_out(source) from e
        except httpx.HTTPError as e:
            raise RemoteFetchFailed(f"{field}: download failed ({e})") from e

    def _check_status(self, source: RemoteSource, response: httpx.Response) -> None:
        if response.status_code in (404, 410):
            raise LoraNotFound(f"LoRA not found: {source.display} (HTTP {response.status_code})")
        if not response.is_success:
            raise RemoteFetchFailed(
                f"url {source.display}: the server answered HTTP {response.status_code}"
            )

    def _check_declared_size(self, source: RemoteSource, headers: httpx.Headers) -> None:
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.config.max_file_bytes:
            raise self._too_large(source, int(declared))

    def _download_fsspec(self, source: RemoteSource, out: BinaryIO, deadline: float) -> int:
        try:
            fs, path = fsspec.core.url_to_fs(source.url)
            size = fs.size(path)
            if size is not None and size > self.config.max_file_bytes:
                raise self._too_large(source, size)
            with fs.open(path, "rb") as remote:
                chunks = iter(lambda: remote.read(CHUNK_BYTES), b"")
                return self._copy(source, chunks, out, deadline)
        except FileNotFoundError as e:
            raise LoraNotFound(f"LoRA not found: {source.display}") from e
        except (ImportError, ValueError, OSError) as e:
            raise RemoteFetchFailed(f"url {source.display}: download failed ({e})") from e

    def _copy(self, source: RemoteSource, chunks, out: BinaryIO, deadline: float) -> int:
        # The deadline bounds the whole transfer; a single stalled read is bounded by the
        # client's own timeout (httpx), or by nothing for fsspec backends that have none.
        size = 0
        for chunk in chunks:
            size += len(chunk)
            if size > self.config.max_file_bytes:
                raise self._too_large(source, size, at_least=True)
            if time.monotonic() > deadline:
                raise self._timed_out(source)
            out.write(chunk)
        return size

    def _too_large(self, source: RemoteSource, size: int, at_least: bool = False) -> TooLarge:
        amount = f"more than {self.config.max_file_bytes}" if at_least else str(size)
        return TooLarge(
            f"url {source.display}: {amount} bytes is over the limit "
            f"(max_file_bytes={self.config.max_file_bytes})"
        )

    def _timed_out(self, source: RemoteSource) -> RemoteFetchFailed:
        return RemoteFetchFailed(
            f"url {source.display}: download timed out after {self.config.timeout_s:g} s "
            f"(timeout_s)"
        )
