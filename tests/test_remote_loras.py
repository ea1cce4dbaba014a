"""LoRAs by URL: the allowlist, the node-local disk cache, and URL sources served end to end.

Files come from a real HTTP server on 127.0.0.1 (tests/file_server.py). The `service` fixture
enables URL sources for http://127.0.0.1 only, that address and any port allowed explicitly;
that a default config refuses them is tested on the config and check directly, and the address
checks in test_outbound_urls.py.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil

import fsspec
import numpy as np
import pytest
from pydantic import ValidationError

from deployments.config import RemoteLoraConfig
from deployments.errors import InvalidRequest, LoraNotFound, RemoteFetchFailed, TooLarge
from deployments.loras.remote import RemoteLoraCache, check_url
from deployments.schemas import LoraSpec
from serve.config import AppConfig
from tests.file_server import FileServer

FILE_BYTES = 10_000


def remote_config(tmp_path, **overrides) -> RemoteLoraConfig:
    values = {
        "enabled": True,
        "allowed_hosts": ["127.0.0.1"],
        "allowed_schemes": ["http"],
        # The test server listens on loopback at a port of its own: both allowed by name.
        "allowed_networks": ["127.0.0.1/32"],
        "allowed_ports": "any",
        "cache_dir": str(tmp_path / "cache"),
        "timeout_s": 10,
        **overrides,
    }
    return RemoteLoraConfig(**values)


def cache_entries(config: RemoteLoraConfig) -> list[str]:
    """Every file in the cache folder but the lock files."""
    if not os.path.isdir(config.cache_dir):
        return []
    return sorted(name for name in os.listdir(config.cache_dir) if not name.endswith(".lock"))


def counts(cache, *names: str) -> tuple[int, ...]:
    stats = cache.stats()
    return tuple(stats[name] for name in names)


@pytest.fixture
def files(tmp_path):
    """A folder of distinct FILE_BYTES files a.bin ... e.bin."""
    folder = tmp_path / "served"
    folder.mkdir()
    for index, name in enumerate("abcde"):
        (folder / f"{name}.bin").write_bytes(bytes([index]) * FILE_BYTES)
    return folder


@pytest.fixture
def server(files):
    with FileServer(files) as running:
        yield running


# --- the allowlist ---------------------------------------------------------------------------


def test_default_config_refuses_every_url():
    config = AppConfig.model_validate({"models": [{"name": "flux", "family": "flux"}]})
    assert config.remote_loras.enabled is False
    with pytest.raises(InvalidRequest, match=r"^loras.0.url: URL sources are disabled"):
        check_url("https://example.com/a.safetensors", config.remote_loras, "loras.0.url")


def test_config_needs_hosts_when_enabled_and_never_allows_local_files():
    with pytest.raises(ValidationError, match="allowed_hosts: required"):
        RemoteLoraConfig(enabled=True)
    with pytest.raises(ValidationError, match="'file' is not allowed"):
        RemoteLoraConfig(enabled=True, allowed_hosts=["h"], allowed_schemes=["https", "file"])
    with pytest.raises(ValidationError, match="not a plain host name"):
        RemoteLoraConfig(enabled=True, allowed_hosts=["*.example.com"])


def test_check_url_names_the_field_and_normalises(tmp_path):
    config = remote_config(tmp_path, allowed_hosts=["example.com"], allowed_schemes=["https"])
    field = "loras.2.url"
    refused = {
        "http://example.com/a.safetensors": "scheme 'http' is not allowed",
        "https://evil.com/a.safetensors": "host 'evil.com' is not allowed",
        "https://example.com.evil.com/a": "host 'example.com.evil.com' is not allowed",
        "https://user:pw@example.com/a.safetensors": "credentials in the URL",
        "https://example.com/": "names no file",
        "https://example.com/a b.safetensors": "not a valid URL",
        "example.com/a.safetensors": "scheme '(none)' is not allowed",
    }
    for url, problem in refused.items():
        with pytest.raises(InvalidRequest, match=f"^{field}: ") as raised:
            check_url(url, config, field)
        assert problem in raised.value.message, url
    source = check_url("HTTPS://Example.COM:443/x/a.safetensors?sig=s3cret#part", config, field)
    assert source.url == "https://example.com/x/a.safetensors?sig=s3cret"
    assert source.ref.name == "https://example.com/x/a.safetensors"  # no signature in names
    assert source.ref.key.startswith("https://example.com/x/a.safetensors@")
    other = check_url("https://example.com/x/a.safetensors?sig=other", config, field)
    assert other.digest != source.digest  # the cache key is the whole URL


def test_a_lora_spec_takes_exactly_one_source():
    assert LoraSpec(url="https://example.com/a.safetensors").url
    with pytest.raises(ValidationError, match="exactly one of id, name or url"):
        LoraSpec(url="https://example.com/a.safetensors", name="a.safetensors")
    with pytest.raises(ValidationError, match="exactly one of id, name or url"):
        LoraSpec()


# --- the disk cache --------------------------------------------------------------------------


def test_concurrent_fetches_of_one_url_download_once(tmp_path, files):
    config = remote_config(tmp_path)
    # Two caches on one folder stand for two replica processes of one node.
    caches = [RemoteLoraCache(config), RemoteLoraCache(config)]
    with FileServer(files, delay_s=0.5) as server:
        url = server.url("a.bin")
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: caches[i % 2].fetch(url), range(8)))
        assert server.gets_of("a.bin") == 1
    assert all(result == (files / "a.bin").read_bytes() for result in results)
    assert sum(cache.stats()["downloads"] for cache in caches) == 1
    assert sum(cache.stats()["hits"] for cache in caches) == 7
    assert caches[0].stats()["cached_bytes"] == FILE_BYTES


def test_budget_is_kept_by_evicting_the_least_recently_used(tmp_path, server):
    config = remote_config(tmp_path, cache_budget_bytes=int(FILE_BYTES * 2.5))
    cache = RemoteLoraCache(config)
    cache.fetch(server.url("a.bin"))
    cache.fetch(server.url("b.bin"))
    assert cache.stats()["cached_bytes"] == 2 * FILE_BYTES
    cache.fetch(server.url("a.bin"))  # a is now more recently used than b
    cache.fetch(server.url("c.bin"))  # over budget: b goes
    assert cache.stats()["evictions"] == 1
    assert cache.stats()["cached_bytes"] == 2 * FILE_BYTES
    cache.fetch(server.url("a.bin"))
    cache.fetch(server.url("c.bin"))
    assert (server.gets_of("a.bin"), server.gets_of("c.bin")) == (1, 1)
    assert cache.fetch(server.url("b.bin")) == bytes([1]) * FILE_BYTES  # evicted: fetched again
    assert server.gets_of("b.bin") == 2
    assert counts(cache, "downloads", "hits", "evictions") == (4, 3, 2)
    assert cache.stats()["bytes_downloaded"] == 4 * FILE_BYTES


def test_an_oversized_file_is_refused_and_leaves_nothing(tmp_path, server):
    config = remote_config(tmp_path, max_file_bytes=FILE_BYTES - 1)
    cache = RemoteLoraCache(config)
    with pytest.raises(TooLarge, match=f"max_file_bytes={FILE_BYTES - 1}"):
        cache.fetch(server.url("a.bin"))  # refused on its Content-Length
    with pytest.raises(TooLarge, match="more than .* bytes is over the limit"):
        cache.fetch(server.url("nolength/a.bin"))  # refused as the bytes arrive
    assert cache_entries(config) == []
    assert cache.stats()["downloads"] == 0


def test_a_file_bigger_than_the_whole_cache_is_refused(tmp_path, server):
    config = remote_config(tmp_path, cache_budget_bytes=FILE_BYTES - 1)
    cache = RemoteLoraCache(config)
    with pytest.raises(TooLarge, match="cache_budget_bytes"):
        cache.fetch(server.url("a.bin"))
    assert cache_entries(config) == []


def test_redirects_are_followed_only_to_allowed_hosts(tmp_path, server):
    cache = RemoteLoraCache(remote_config(tmp_path))
    allowed = server.url("redirect?to=" + server.url("b.bin"))
    assert cache.fetch(allowed) == bytes([1]) * FILE_BYTES
    port = server.base_url.rsplit(":", 1)[1]
    elsewhere = server.url(f"redirect?to=http://localhost:{port}/c.bin")
    with pytest.raises(InvalidRequest, match="refused redirect: host 'localhost' is not allowed"):
        cache.fetch(elsewhere)
    assert server.gets_of("c.bin") == 0
    assert len(cache_entries(cache.config)) == 1


def test_missing_file_and_timeout_are_clear_errors(tmp_path, files):
    cache = RemoteLoraCache(remote_config(tmp_path, timeout_s=0.3))
    with FileServer(files, delay_s=1.0) as slow:
        with pytest.raises(LoraNotFound, match="missing.bin .HTTP 404"):
            cache.fetch(slow.url("missing.bin"))
        with pytest.raises(RemoteFetchFailed, match=r"timed out after 0.3 s \(timeout_s\)"):
            cache.fetch(slow.url("a.bin"))
    assert cache_entries(cache.config) == []


def test_an_fsspec_source_when_its_scheme_is_allowed(tmp_path):
    payload = os.urandom(FILE_BYTES)
    with fsspec.open("memory://lora-bucket/x/style.safetensors", "wb") as f:
        f.write(payload)
    config = remote_config(tmp_path, allowed_schemes=["memory"], allowed_hosts=["lora-bucket"])
    cache = RemoteLoraCache(config)
    url = "memory://lora-bucket/x/style.safetensors"
    assert cache.fetch(url) == payload
    assert cache.fetch(url) == payload
    assert counts(cache, "downloads", "hits") == (1, 1)
    with pytest.raises(LoraNotFound):
        cache.fetch("memory://lora-bucket/x/none.safetensors")
    with pytest.raises(InvalidRequest, match="host 'other' is not allowed"):
        cache.fetch("memory://other/x/style.safetensors")


# --- served end to end -----------------------------------------------------------------------

SMALL = {"prompt": "a red fox in the snow", "seed": 7, "width": 128, "height": 128, "steps": 2}


@pytest.fixture(scope="module")
def lora_server(lora_root, tmp_path_factory):
    """The test LoRA root over HTTP, slow enough that concurrent requests overlap."""
    folder = tmp_path_factory.mktemp("served-loras")
    for name in ("character-a", "character-b"):
        shutil.copy(lora_root / f"{name}.safetensors", folder / f"{name}.safetensors")
    (folder / "not-a-lora.safetensors").write_bytes(b"\x00" * 64)
    with FileServer(folder, delay_s=0.3) as server:
        yield server


def post(client, path="/flux", **body):
    return client.post(path, json={**SMALL, **body})


def image(response) -> np.ndarray:
    from io import BytesIO

    from PIL import Image

    assert response.status_code == 200, response.text
    return np.asarray(Image.open(BytesIO(response.content)).convert("RGB"), dtype=np.int16)


def test_a_url_lora_is_the_same_adapter_as_the_same_file_by_name(service, lora_server):
    url = lora_server.url("character-a.safetensors")
    base = post(service)
    by_url = post(service, "/flux-lora", loras=[{"url": url}])
    again = post(service, "/flux-lora", loras=[{"url": url}])
    by_name = post(service, "/flux-lora", lora_id="a")
    assert np.abs(image(by_url) - image(base)).mean() > 1.0
    assert by_url.content == by_name.content == again.content
    assert by_url.headers["X-LoRA-Cache"] == "miss"
    assert again.headers["X-LoRA-Cache"] == "hit"
    assert lora_server.gets_of("character-a.safetensors") == 1


def test_concurrent_requests_for_one_url_download_it_once(service, lora_server):
    url = lora_server.url("character-b.safetensors")
    # Flux and SDXL replicas are separate processes sharing the node's cache; the Flux LoRA
    # does not fit SDXL, which refuses it only after the shared download.
    bodies = [("/flux-lora", 2), ("/sdxl-lora", 3)] * 3
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(
            pool.map(lambda b: post(service, b[0], seed=b[1], loras=[{"url": url}]), bodies)
        )
    flux = [r for r, b in zip(responses, bodies, strict=True) if b[0] == "/flux-lora"]
    sdxl = [r for r, b in zip(responses, bodies, strict=True) if b[0] == "/sdxl-lora"]
    assert all(r.status_code == 200 for r in flux), [r.text for r in flux]
    assert len({r.content for r in flux}) == 1
    assert all(r.json()["error"]["code"] == "lora_incompatible" for r in sdxl)
    assert lora_server.gets_of("character-b.safetensors") == 1
    models = service.get("/models").json()["models"]
    [flux_replica] = next(m for m in models if m["name"] == "flux")["replicas"]
    assert flux_replica["remote_lora_cache"]["cached_files"] >= 1


def test_refused_urls_are_422_and_change_nothing(service, lora_server):
    before = post(service, "/flux-lora", lora_id="a")
    port = lora_server.base_url.rsplit(":", 1)[1]
    refused = {
        f"http://localhost:{port}/character-a.safetensors": "host 'localhost' is not allowed",
        "ftp://127.0.0.1/character-a.safetensors": "scheme 'ftp' is not allowed (allowed: http)",
        "file:///etc/passwd": "scheme 'file' is not allowed (allowed: http)",
    }
    for url, problem in refused.items():
        response = post(service, "/flux-lora", loras=[{"id": "b"}, {"url": url}])
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_request"
        assert error["message"] == f"loras.1.url: {problem}"
    assert post(service, "/flux-lora", lora_id="a").content == before.content


def test_bad_remote_files_are_clear_errors(service, lora_server):
    missing = post(service, "/flux-lora", loras=[{"url": lora_server.url("none.safetensors")}])
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "lora_not_found"
    corrupt = post(
        service, "/flux-lora", loras=[{"url": lora_server.url("not-a-lora.safetensors")}]
    )
    assert corrupt.status_code == 422
    assert corrupt.json()["error"]["code"] == "lora_incompatible"
    assert "not-a-lora.safetensors" in corrupt.json()["error"]["message"]


@pytest.fixture(scope="module")
def app_without_urls(service, lora_root, ray_cluster):
    """A second app on the default config (URL sources off): just its ingress, under /no-urls.
    The ingress refuses a URL before any model is called, so it gets no model deployments."""
    import httpx
    from ray import serve

    from serve.config import AppConfig
    from serve.ingress import Ingress

    config = AppConfig.model_validate(
        {"lora_root": str(lora_root), "models": [{"name": "flux", "family": "flux"}]}
    )
    ingress = Ingress.options(ray_actor_options={"num_cpus": 0})
    serve.run(
        ingress.bind(config.model_dump(mode="json"), {}), name="no-urls", route_prefix="/no-urls"
    )
    with httpx.Client(base_url=f"{ray_cluster}/no-urls", timeout=300) as client:
        yield client
    serve.delete("no-urls")


def test_a_default_config_refuses_urls_over_http(app_without_urls, lora_server):
    url = lora_server.url("character-a.safetensors")
    response = post(app_without_urls, "/flux-lora", loras=[{"id": "b"}, {"url": url}])
    assert response.status_code == 422, response.text
    assert response.json()["error"] == {
        "code": "invalid_request",
        "message": "loras.1.url: URL sources are disabled on this server",
    }
    assert lora_server.gets_of("character-a.safetensors") <= 1  # only the earlier test's GET
