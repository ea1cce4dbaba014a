"""Batching (max_batch_size > 1): requests alike but for prompt and seed share one pipeline call.

A second app, "batching" at /batching, serves the tiny Flux model with batches of up to 4; the
session's main app (max_batch_size 1) gives the unbatched reference images. The batch wait is
long, and every test sends exactly enough alike requests to fill a batch, so a batch is formed
by size, never by the clock, however loaded the machine is.
"""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import numpy as np
import pytest

from tests.http_helpers import error_of, pixels, renders_interrupted, reported

PREFIX = "/batching"
BATCH = 4
SMALL = {"width": 64, "height": 64, "steps": 2}
# One 1/255 step is what batching changes in practice (matmul blocking depends on the batch
# size); the contract allows two.
MAX_STEPS_FROM_UNBATCHED = 2


@pytest.fixture(scope="module")
def batching(ray_cluster, lora_root):
    """The batching app, beside the main one; removed at the end of the module."""
    from ray import serve

    from loadtest import service

    model = {
        "name": "flux",
        "family": "flux",
        "model_uri": "tiny://flux",
        "max_adapters_per_replica": 2,  # small, so a batch's adapters can be evicted while it forms
        "max_batch_size": BATCH,
        "batch_wait_timeout_ms": 5000,
        "price_per_gpu_hour": 2.49,
    }
    options = {"flux": {"max_ongoing_requests": 8, "ray_actor_options": {"num_cpus": 0.25}}}
    service.deploy({"lora_root": str(lora_root), "models": [model]}, options, "batching", PREFIX)
    with httpx.Client(base_url=ray_cluster + PREFIX, timeout=300) as client:
        yield client
    serve.delete("batching")


def body(seed: int, prompt: str = "a red fox in the snow", **extra) -> dict:
    return {"prompt": prompt, "seed": seed, **SMALL, **extra}


def post(client, request: dict) -> httpx.Response:
    return client.post("/flux-lora" if _has_lora(request) else "/flux", json=request)


def _has_lora(request: dict) -> bool:
    return any(k in request for k in ("lora_id", "lora_name", "loras"))


def concurrently(client, requests: list[dict]) -> list[httpx.Response]:
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(lambda request: post(client, request), requests))


def counters(client) -> tuple[int, int]:
    """The replica's batch counters, once it is listed (replicas report asynchronously: right
    after the app is deployed, its first report may still be on its way)."""
    deadline = time.monotonic() + 30
    while not (replicas := client.get("/models").json()["models"][0]["replicas"]):
        assert time.monotonic() < deadline, "the batching replica never reported"
        time.sleep(0.1)
    [replica] = replicas
    return replica["batches_run"], replica["requests_batched"]


def counters_become(client, expected: tuple[int, int]) -> tuple[int, int]:
    """The counters once the replica's report (sent after each batch) has arrived."""
    return reported(lambda: counters(client), expected, timeout_s=10)


def assert_close_to_unbatched(batched: httpx.Response, unbatched: httpx.Response) -> None:
    difference = np.abs(pixels(batched) - pixels(unbatched)).max()
    assert difference <= MAX_STEPS_FROM_UNBATCHED, difference


def assert_rendered_in_calls(batching, service, requests: list[dict], calls: int) -> list:
    """Sent together, the requests are rendered in `calls` batched pipeline calls, every one of
    them batched, each image within tolerance of the same request unbatched."""
    before = counters(batching)
    responses = concurrently(batching, requests)
    expected = (before[0] + calls, before[1] + len(requests))
    assert counters_become(batching, expected) == expected
    for request, response in zip(requests, responses, strict=True):
        assert_close_to_unbatched(response, post(service, request))
    return responses


def test_alike_requests_share_one_call_each_at_its_own_seed(batching, service):
    requests = [body(seed, lora_id="a") for seed in (1, 2, 3, 4)]
    responses = assert_rendered_in_calls(batching, service, requests, calls=1)
    for request, response in zip(requests, responses, strict=True):
        assert response.headers["X-Seed"] == str(request["seed"])
    # The seeds differ, so do the images: each has its own generator.
    images = [pixels(response) for response in responses]
    for i in range(BATCH):
        for j in range(i + 1, BATCH):
            assert np.abs(images[i] - images[j]).mean() > 1.0
    # Each request is billed its share of the call: the same share for each.
    shares = {response.headers["X-Inference-Ms"] for response in responses}
    assert len(shares) == 1 and float(shares.pop()) > 0
    costs = [float(response.headers["X-Cost-USD"]) for response in responses]
    assert len(set(costs)) == 1 and costs[0] > 0


def test_a_batch_of_one_gives_the_unbatched_bytes(batching, service):
    # Alone past the wait: the one-request call is the unbatched call, bit for bit.
    alone = post(batching, body(9, lora_id="b"))
    assert alone.content == post(service, body(9, lora_id="b")).content


def test_prompts_differ_within_a_batch(batching, service):
    prompts = ["a red fox", "a blue whale", "a green frog", "a yellow bird"]
    requests = [body(5, prompt) for prompt in prompts]
    assert_rendered_in_calls(batching, service, requests, calls=1)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"lora_id": "a"}, {"loras": [{"id": "a"}, {"id": "b"}]}),  # same first adapter
        ({"lora_id": "a"}, {"lora_id": "a", "lora_strength": 0.5}),
        ({"lora_id": "a"}, {"lora_id": "a", "width": 128}),
        ({"lora_id": "a"}, {"lora_id": "a", "steps": 3}),
        ({"lora_id": "a"}, {"lora_id": "a", "negative_prompt": "blurry"}),
        ({"lora_id": "a"}, {"lora_id": "b"}),  # Serve's own split, by multiplexed model id
    ],
)
def test_different_stacks_or_shapes_render_in_separate_calls(batching, service, first, second):
    requests = [body(1, **first), body(2, **first), body(3, **second), body(4, **second)]
    assert_rendered_in_calls(batching, service, requests, calls=2)


def test_a_bad_request_fails_alone_and_changes_nothing(batching, service):
    good = [body(seed, lora_id="a") for seed in (11, 12, 13, 14)]
    unloadable = body(15, loras=[{"id": "a"}, {"id": "nomatch"}])  # joins the others' batch
    invalid = body(16, lora_id="a", width=65)  # not a multiple of the model's size step
    first = concurrently(batching, good)
    before = counters(batching)
    responses = concurrently(batching, [*good[:2], unloadable, invalid, *good[2:]])
    message = error_of(responses[2], 422, "lora_incompatible")
    assert message.startswith("Failed to load LoRA: ") and "character-nomatch" in message
    assert "width" in error_of(responses[3], 422, "invalid_request")
    expected = (before[0] + 1, before[1] + BATCH)
    assert counters_become(batching, expected) == expected
    # The four good requests were served as before the bad ones came: the same bytes.
    served = [responses[0], responses[1], responses[4], responses[5]]
    assert [r.content for r in served] == [r.content for r in first]
    for request, response in zip(good, served, strict=True):
        assert_close_to_unbatched(response, post(service, request))


def test_adapters_evicted_while_a_batch_forms_are_back_for_its_call(batching, service):
    # Three stacks over two hot slots: one request's load evicts another's adapter before
    # their batch runs; each call must still render with its own adapters.
    requests = [
        body(1, lora_id="c"),
        body(2, lora_id="c"),
        body(3, lora_id="d"),
        body(4, lora_id="e"),
    ]
    responses = concurrently(batching, requests)
    for request, response in zip(requests, responses, strict=True):
        assert_close_to_unbatched(response, post(service, request))
    # The lone requests were rendered alone: their unbatched bytes exactly.
    assert responses[2].content == post(service, requests[2]).content
    assert responses[3].content == post(service, requests[3]).content


def test_a_batch_whose_clients_all_left_stops_and_the_next_is_intact(batching, service):
    # Four requests fill a batch that would render for minutes; every client gives up first.
    slow = [body(seed, lora_id="a", width=512, height=512, steps=150) for seed in (1, 2, 3, 4)]
    before, batches_before = renders_interrupted(batching), counters(batching)
    with concurrent.futures.ThreadPoolExecutor(BATCH) as pool:
        gone = list(pool.map(lambda r: _times_out(batching, r), slow))
    assert gone == [True] * BATCH
    assert reported(lambda: renders_interrupted(batching), before + 1) == before + 1
    # The stopped call rendered for no one: it is not counted as a batch run.
    assert counters(batching) == batches_before
    # The replica is free and renders the next batch as if nothing had happened.
    requests = [body(seed, lora_id="a") for seed in (21, 22, 23, 24)]
    assert_rendered_in_calls(batching, service, requests, calls=1)


def _times_out(client, request: dict) -> bool:
    try:
        client.post("/flux-lora", json=request, timeout=2.0)
    except httpx.ReadTimeout:
        return True
    return False


def test_models_shows_the_batch_setting(batching, service):
    [model] = batching.get("/models").json()["models"]
    assert model["replicas"][0]["max_batch_size"] == BATCH
    flux = [m for m in service.get("/models").json()["models"] if m["name"] == "flux"]
    assert flux[0]["replicas"][0]["max_batch_size"] == 1
    assert flux[0]["replicas"][0]["batches_run"] == 0


# In process: which groups stop, the grouping key, and every family's pipeline on a batch


def test_a_group_is_interrupted_only_once_all_its_requests_went():
    from deployments.batching import GroupRenders

    first, second, alone = job(prompt="a"), job(prompt="b"), job(prompt="c")
    renders = GroupRenders()
    pair, single = renders.start([[first, second], [alone]])
    renders.abandon(first)
    assert not pair.is_set()
    renders.abandon(first)  # a second cancellation of the same request changes nothing
    assert not pair.is_set()
    renders.abandon(second)
    assert pair.is_set() and not single.is_set()
    renders.finish([first, second, alone])
    renders.abandon(alone)  # after the batch: nothing left to stop
    assert not single.is_set()


def job(**fields):
    from deployments.schemas import AdapterUse, GenerationJob, LoraRef

    use = AdapterUse(ref=LoraRef("a", "1"), strength=1.0, clip_strength=1.0)
    values = {
        "prompt": "a fox",
        "negative_prompt": "",
        "width": 64,
        "height": 64,
        "steps": 2,
        "cfg": 3.5,
        "seed": 1,
        "adapters": [use],
    }
    return GenerationJob(**{**values, **fields})


def test_the_batch_key_ignores_prompt_and_seed_only():
    from deployments.batching import batch_key
    from deployments.schemas import AdapterUse, LoraRef

    key = batch_key(job())
    assert batch_key(job(prompt="a whale", seed=99)) == key
    other_use = AdapterUse(ref=LoraRef("a", "1"), strength=1.0, clip_strength=0.5)
    weighted = AdapterUse(
        ref=LoraRef("a", "1"), strength=1.0, clip_strength=1.0, block_weights={"x": 0.5}
    )
    for different in (
        job(adapters=[]),
        job(adapters=[other_use]),
        job(adapters=[weighted]),
        job(width=128),
        job(height=128),
        job(steps=3),
        job(cfg=4.0),
        job(length=5),
        job(negative_prompt="blurry"),
    ):
        assert batch_key(different) != key
    assert batch_key(job(image=b"png bytes")) is None  # edits are rendered alone


@pytest.mark.parametrize("family_name", ["flux", "qwen_image", "z_image", "sdxl", "wan"])
def test_every_family_renders_a_batch_within_a_step_of_its_unbatched_images(
    tiny_pipelines, family_name
):
    import torch

    from deployments.batching import batched_pipeline_kwargs
    from deployments.family import get_family

    family = get_family(family_name)
    pipe = tiny_pipelines(family_name)
    pipe.set_progress_bar_config(disable=True)
    size = max(64, family.size_multiple(pipe) * 4)
    length = 5 if family.output == "video" else None
    jobs = [
        job(prompt=prompt, seed=seed, width=size, height=size, adapters=[], length=length)
        for prompt, seed in (("a fox", 1), ("a cat on a mat", 2), ("a boat", 3))
    ]

    def render(batch):
        generators = [torch.Generator("cpu").manual_seed(j.seed) for j in batch]
        kwargs = batched_pipeline_kwargs([family.pipeline_kwargs(j) for j in batch])
        with torch.inference_mode():
            output = pipe(**kwargs, generator=generators, output_type="np")
        return output.frames if family.output == "video" else output.images

    alone = [render([j])[0] for j in jobs]
    together = render(jobs)
    for single, batched in zip(alone, together, strict=True):
        steps = np.abs(np.round(single * 255) - np.round(np.asarray(batched) * 255)).max()
        assert steps <= MAX_STEPS_FROM_UNBATCHED
    assert np.abs(alone[0] - alone[1]).mean() > 0.01  # distinct seeds and prompts


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_batch_size", 0), ("max_batch_size", 17), ("batch_wait_timeout_ms", -1)],
)
def test_batch_settings_are_bounded(field, value):
    from pydantic import ValidationError

    from deployments.config import ModelConfig

    assert ModelConfig(name="flux", family="flux").max_batch_size == 1  # off by default
    with pytest.raises(ValidationError, match=field):
        ModelConfig(name="flux", family="flux", **{field: value})
