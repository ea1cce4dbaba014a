"""Flux end to end: real Ray, real Serve, real HTTP, real LoRA files, tiny model."""

from __future__ import annotations

import concurrent.futures
import io
import shutil
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.http_helpers import error_of, flux_replica, pixels, renders_interrupted, reported

SMALL = {"width": 256, "height": 256, "steps": 4}


def generate(client, path="/flux-lora", **body):
    return client.post(path, json={"prompt": "a red fox in the snow", "seed": 7, **SMALL, **body})


def test_lora_changes_the_image_and_strength_zero_is_the_base(service):
    base = generate(service, "/flux")
    with_lora = generate(service, lora_id="a")
    zero = generate(service, lora_id="a", lora_strength=0.0)
    again = generate(service, lora_id="a")
    assert base.headers["content-type"] == "image/png"
    assert np.abs(pixels(base) - pixels(with_lora)).mean() > 2.0
    assert zero.content == base.content
    assert again.content == with_lora.content


def test_production_default_size_and_headers(service):
    response = service.post("/flux-lora", json={"prompt": "portrait", "lora_id": "a", "steps": 2})
    image = Image.open(io.BytesIO(response.content))
    assert response.status_code == 200 and image.size == (1024, 1024)
    seed = int(response.headers["X-Seed"])
    assert response.headers["X-Model"] == "flux"
    assert float(response.headers["X-Inference-Ms"]) > 0
    assert float(response.headers["X-GPU-Seconds"]) > 0
    assert float(response.headers["X-Cost-USD"]) > 0
    assert response.headers["X-Request-Id"]
    replay = service.post(
        "/flux-lora", json={"prompt": "portrait", "lora_id": "a", "steps": 2, "seed": seed}
    )
    assert replay.content == response.content


def test_two_adapters_apply_both_each_at_its_strength(service):
    only_a = generate(service, lora_id="a")
    only_b = generate(service, lora_name="character-b.safetensors")
    both = generate(service, loras=[{"id": "a"}, {"id": "b"}])
    a_off = generate(service, loras=[{"id": "a", "strength": 0}, {"id": "b"}])
    b_off = generate(service, loras=[{"id": "a"}, {"id": "b", "weight": 0}])
    assert a_off.content == only_b.content
    assert b_off.content == only_a.content
    assert np.abs(pixels(both) - pixels(only_a)).mean() > 1.0
    assert np.abs(pixels(both) - pixels(only_b)).mean() > 1.0


def test_cache_misses_then_hits_and_evicts_least_recently_used(service):
    def cache_of(lora_id):
        return generate(service, lora_id=lora_id).headers["X-LoRA-Cache"]

    assert cache_of("c") == "miss"
    assert cache_of("c") == "hit"
    assert cache_of("d") == "miss"
    assert cache_of("c") == "hit"  # c is now the most recently used
    assert cache_of("e") == "miss"  # evicts d
    [flux] = [m for m in service.get("/models").json()["models"] if m["name"] == "flux"]
    [replica] = flux["replicas"]
    assert sorted(replica["hot_adapters"]) == ["character-c.safetensors", "character-e.safetensors"]
    assert cache_of("c") == "hit"
    assert cache_of("d") == "miss"  # evicts e
    # That miss refilled the layers of the adapter it evicted (the files share their shapes):
    # no new layers built, and no free slot left over.
    after = flux_replica(service, loads_at_least=replica["adapter_loads"] + 1)
    assert after["adapter_loads"] == replica["adapter_loads"] + 1
    assert after["adapter_fresh_loads"] == replica["adapter_fresh_loads"]
    assert after["free_adapter_slots"] == 0


def test_evicted_adapter_reloads_to_the_same_image(service):
    def root_cache() -> dict:
        [flux] = [m for m in service.get("/models").json()["models"] if m["name"] == "flux"]
        return flux["replicas"][0]["lora_root_cache"]

    first = generate(service, lora_id="f")
    for other in ("g", "h"):
        generate(service, lora_id=other)
    before = root_cache()
    reloaded = generate(service, lora_id="f")
    assert reloaded.headers["X-LoRA-Cache"] == "miss"
    assert reloaded.content == first.content
    # The reload read the node's copy of the file, not the LoRA root.
    assert reported(lambda: root_cache()["hits"], before["hits"] + 1, 10) == before["hits"] + 1
    assert root_cache()["downloads"] == before["downloads"]


def test_requests_for_one_cold_adapter_share_one_file_read(service, lora_root):
    # A file no request has used: cold on the replica.
    shutil.copy(lora_root / "character-k.safetensors", lora_root / "character-burst.safetensors")
    assert generate(service, lora_id="a").status_code == 200  # hot before the slow request
    before = flux_replica(service)
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        # A long generation (about 3 s) holds the replica's lock while the burst arrives, so
        # every request of the burst finds the adapter cold and waits for its load.
        slow = pool.submit(generate, service, lora_id="a", width=1024, height=1024, steps=96)
        time.sleep(0.5)
        burst = [pool.submit(generate, service, lora_id="burst") for _ in range(4)]
        responses = [request.result() for request in burst]
        assert slow.result().status_code == 200
    assert all(response.status_code == 200 for response in responses)
    assert len({response.content for response in responses}) == 1
    assert sorted(r.headers["X-LoRA-Cache"] for r in responses) == ["hit", "hit", "hit", "miss"]
    shared = before["adapter_file_reads_shared"] + 3
    assert (
        reported(lambda: flux_replica(service)["adapter_file_reads_shared"], shared, 10) == shared
    )
    after = flux_replica(service)
    assert after["adapter_file_reads"] == before["adapter_file_reads"] + 1

    def root_reads(replica: dict) -> int:
        return replica["lora_root_cache"]["downloads"] + replica["lora_root_cache"]["hits"]

    assert root_reads(after) == root_reads(before) + 1  # the file was read once, not 4 times


def test_concurrent_requests_with_different_adapters_match_sequential(service):
    # Five adapters over two hot slots: loads and evictions happen while others generate.
    bodies = [
        {"lora_id": "a"},
        {"lora_id": "b", "lora_strength": 0.5},
        {"loras": [{"id": "a", "strength": 0.3}, {"id": "b"}]},
        {},
        {"lora_id": "f", "seed": 11},
        {"lora_id": "g", "seed": 12},
        {"loras": [{"id": "h"}, {"id": "a", "strength": 0.7}]},
        {"lora_name": "styles/ink.safetensors"},
    ]
    sequential = [generate(service, **body).content for body in bodies]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        concurrent_results = list(pool.map(lambda body: generate(service, **body).content, bodies))
    assert concurrent_results == sequential


def test_missing_lora_is_400(service):
    message = error_of(generate(service), 400, "lora_required")
    assert message == "lora_id or lora_name is required"


@pytest.mark.parametrize(
    "body",
    [
        {"lora_id": "nope"},
        {"lora_name": "../outside.safetensors"},
        {"lora_name": "/etc/passwd"},
        {"lora_name": "character-a.txt"},
        {"loras": [{"name": "styles/../../outside.safetensors"}]},
    ],
)
def test_unknown_or_out_of_root_names_are_404(service, body):
    message = error_of(generate(service, **body), 404, "lora_not_found")
    assert message.startswith("LoRA not found: ")


@pytest.mark.parametrize("lora_id", ["corrupt", "nomatch", "sdxl", "wide"])
def test_unloadable_lora_is_422_and_leaves_the_service_as_it_was(service, lora_id):
    before = generate(service, lora_id="a").content
    message = error_of(generate(service, lora_id=lora_id), 422, "lora_incompatible")
    assert message.startswith("Failed to load LoRA: ")
    assert generate(service, lora_id="a").content == before
    hot = [
        r["hot_adapters"] for m in service.get("/models").json()["models"] for r in m["replicas"]
    ]
    assert all(f"character-{lora_id}.safetensors" not in names for names in hot)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"lora_id": "a", "lora_strength": 2.5}, "lora_strength"),
        ({"lora_id": "a", "width": 100000}, "width"),
        ({"lora_id": "a", "steps": 0}, "steps"),
        ({"lora_id": "a", "unknown_field": 1}, "unknown_field"),
        ({"lora_id": "a", "width": 250}, "width"),  # not a multiple of the model's step
        ({"loras": [{"id": "a"}, {"id": "b"}, {"id": "c"}]}, "loras"),  # more than 2 hot slots
    ],
)
def test_out_of_range_fields_are_422_naming_the_field(service, body, field):
    before = generate(service, lora_id="a").content
    message = error_of(generate(service, **body), 422, "invalid_request")
    assert field in message
    assert generate(service, lora_id="a").content == before


def test_unknown_endpoint_is_404(service):
    assert error_of(service.post("/nope", json={"prompt": "p"}), 404, "not_found")


def test_health_models_and_docs(service):
    assert service.get("/healthz").json() == {"status": "ok"}
    [flux] = [m for m in service.get("/models").json()["models"] if m["name"] == "flux"]
    assert flux["family"] == "flux" and flux["model_uri"] == "tiny://flux"
    assert flux["endpoints"] == ["/flux", "/flux-lora"]
    assert service.get("/docs").status_code == 200
    paths = service.get("/openapi.json").json()["paths"]
    assert {"/flux", "/flux-lora"} <= set(paths)  # one path per endpoint, each with its body


def test_a_request_abandoned_by_its_client_leaves_the_next_one_intact(service):
    expected = generate(service, lora_id="b").content
    slow = {"prompt": "slow", "lora_id": "a", "seed": 1, "width": 512, "height": 512, "steps": 150}
    before = renders_interrupted(service)
    with pytest.raises(httpx.ReadTimeout):
        service.post("/flux-lora", json=slow, timeout=1.0)
    assert generate(service, lora_id="b").content == expected
    assert generate(service, "/flux").status_code == 200
    # The abandoned render stopped early, not after its 150 steps.
    assert reported(lambda: renders_interrupted(service), before + 1) == before + 1


def test_a_body_over_the_limit_is_413(service):
    response = service.post("/flux", content=b"{" + b" " * (5 * 1024 * 1024) + b"}")
    assert error_of(response, 413, "too_large").startswith("body:")


def test_a_body_that_is_not_json_is_422(service):
    response = service.post("/flux", content=b"{not json")
    assert error_of(response, 422, "invalid_request").startswith("body:")


def test_every_layer_change_runs_on_the_tensor_thread_evictions_included(service):
    """Serve runs an evicted adapter's `__del__` in its own executor; its release must still
    run on the replica's one tensor thread (the replica counts calls made anywhere else)."""
    before = flux_replica(service)
    for lora_id in ("a", "b", "c", "d"):  # two adapters per replica: evictions on the way
        assert generate(service, lora_id=lora_id).status_code == 200
    replica = flux_replica(service, loads_at_least=before["adapter_loads"] + 1)
    assert replica["adapter_evictions"] >= before["adapter_evictions"] + 2
    assert replica["tensor_calls_off_thread"] == 0
