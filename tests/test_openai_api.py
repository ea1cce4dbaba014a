"""The OpenAI images API, driven by the official `openai` client against the session's app: the
images are the native endpoint's bytes at the same seeds, LoRAs come in `model` or in
`extra_body`, and refusals are the client's exceptions with loraplex's message."""

from __future__ import annotations

import base64
import io

import openai
import pytest
from PIL import Image

PROMPT = "a lighthouse at dusk"
WIDTH, HEIGHT = 96, 64
# Small and quick on the tiny Flux; the same fields as a native body.
NATIVE = {"prompt": PROMPT, "width": WIDTH, "height": HEIGHT, "steps": 2}


@pytest.fixture(scope="module")
def client(service, ray_cluster):
    # The session's app has no API keys: any key is accepted.
    with openai.OpenAI(
        base_url=f"{ray_cluster}/v1", api_key="unused", max_retries=0, timeout=300
    ) as client:
        yield client


def native(service, **fields) -> bytes:
    response = service.post("/flux", json={**NATIVE, **fields})
    assert response.status_code == 200, response.text
    return response.content


def generate(client, model: str, seed: int, **extra) -> list[bytes]:
    result = client.images.generate(
        model=model,
        prompt=PROMPT,
        size=f"{WIDTH}x{HEIGHT}",
        extra_body={"seed": seed, "steps": 2, **extra},
    )
    return [base64.b64decode(image.b64_json) for image in result.data]


def test_n_images_are_the_native_images_at_seed_seed_plus_one(client, service):
    raw = client.images.with_raw_response.generate(
        model="flux",
        prompt=PROMPT,
        size=f"{WIDTH}x{HEIGHT}",
        n=2,
        response_format="b64_json",
        extra_body={"seed": 7, "steps": 2},
    )
    assert raw.headers["x-seed"] == "7,8"
    assert raw.headers["x-model"] == "flux"
    result = raw.parse()
    assert (result.size, result.output_format) == (f"{WIDTH}x{HEIGHT}", "png")
    assert [image.seed for image in result.data] == [7, 8]
    assert [image.revised_prompt for image in result.data] == [PROMPT, PROMPT]
    images = [base64.b64decode(image.b64_json) for image in result.data]
    for image, seed in zip(images, (7, 8), strict=True):
        with Image.open(io.BytesIO(image)) as decoded:
            assert (decoded.format, decoded.size) == ("PNG", (WIDTH, HEIGHT))
        assert image == native(service, seed=seed)
    assert images[0] != images[1]


def test_loras_in_model_or_extra_body_are_the_native_loras(client, service):
    [stacked] = generate(client, "flux:character-a@0.8+styles/ink.safetensors@0.5", seed=3)
    loras = [
        {"name": "character-a.safetensors", "strength": 0.8},
        {"name": "styles/ink.safetensors", "strength": 0.5},
    ]
    assert stacked == native(service, seed=3, loras=loras)
    assert stacked != native(service, seed=3)
    [by_id] = generate(client, "flux", seed=3, loras=[{"id": "b"}])
    assert by_id == native(service, seed=3, lora_id="b")


def test_models_lists_every_deployment(client, service):
    models = client.models.list().data
    served = service.get("/models").json()["models"]
    assert [model.id for model in models] == [model["name"] for model in served]
    assert {model.object for model in models} == {"model"}
    assert [f"/{model.endpoint}" for model in models] == [m["endpoints"][0] for m in served]


@pytest.mark.parametrize(
    ("model", "fields", "error", "message"),
    [
        ("flux", {"size": "12x12"}, openai.UnprocessableEntityError, "size: "),
        ("flux", {"n": 9}, openai.UnprocessableEntityError, "n: "),
        ("flux", {"response_format": "url"}, openai.UnprocessableEntityError, "response_format: "),
        ("dall-e-3", {}, openai.UnprocessableEntityError, "model: unknown deployment 'dall-e-3'"),
        ("wan", {}, openai.UnprocessableEntityError, "model: wan is a video model"),
        ("flux:character-a@3", {}, openai.UnprocessableEntityError, "model: character-a@3: "),
        ("flux:missing", {}, openai.NotFoundError, "LoRA not found: missing.safetensors"),
        ("flux-lora", {}, openai.BadRequestError, "lora_id or lora_name is required"),
    ],
)
def test_refusals_are_openai_exceptions_naming_the_field(client, model, fields, error, message):
    with pytest.raises(error) as raised:
        client.images.generate(model=model, prompt=PROMPT, extra_body={"steps": 2}, **fields)
    assert raised.value.body["message"].startswith(message), raised.value.body
    assert message in str(raised.value)
