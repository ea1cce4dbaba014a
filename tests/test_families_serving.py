"""Every family end to end over HTTP on real Serve: media types, sizes, LoRAs, errors."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

EDIT_INPUT_SIZE = (320, 192)


def input_image_b64(size=EDIT_INPUT_SIZE, seed: int = 0) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# family -> (endpoint stem, media type, small request, production default size)
FAMILIES = {
    "flux": ("flux", "image/png", {"width": 256, "height": 256}, (1024, 1024)),
    "qwen_image": ("qwen-image-2512", "image/png", {"width": 256, "height": 256}, (1328, 1328)),
    "qwen_image_edit": (
        "qwen-image-edit",
        "image/png",
        {"image": input_image_b64()},
        EDIT_INPUT_SIZE,
    ),
    "z_image": ("z-image", "image/jpeg", {"width": 256, "height": 256}, (1024, 1024)),
    "wan": ("wan2.6", "image/webp", {"width": 256, "height": 128, "length": 5}, (832, 480)),
    "sdxl": ("sdxl", "image/png", {"width": 256, "height": 256}, (1024, 1024)),
}
FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}


def post(service, family: str, lora: bool = True, **body):
    stem, _, small, _ = FAMILIES[family]
    path = f"/{stem}-lora" if lora else f"/{stem}"
    return service.post(path, json={"prompt": "a red fox", "seed": 3, "steps": 2, **small, **body})


def decoded(response) -> Image.Image:
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(response.content))
    image.load()  # Pillow reads an animated WebP frame's duration when it decodes the frame
    return image


def frames(image: Image.Image) -> np.ndarray:
    out = []
    for index in range(getattr(image, "n_frames", 1)):
        image.seek(index)
        out.append(np.asarray(image.convert("RGB"), dtype=np.int16))
    return np.stack(out)


@pytest.mark.parametrize("family", FAMILIES)
def test_production_defaults_give_the_media_type_and_size(service, family):
    _, media_type, small, default_size = FAMILIES[family]
    body = {"prompt": "a red fox", "steps": 2}
    if "image" in small:
        body["image"] = small["image"]
    response = service.post(f"/{FAMILIES[family][0]}", json=body)
    image = decoded(response)
    assert response.headers["content-type"] == media_type
    assert image.format == FORMATS[media_type]
    assert image.size == default_size
    if family == "wan":
        assert image.n_frames == 33
        assert abs(image.info["duration"] - 1000 / 16) <= 1


@pytest.mark.parametrize("family", FAMILIES)
def test_requested_size_and_frames(service, family):
    body = {"width": 128, "height": 64} if family != "wan" else {"length": 9, "fps": 8}
    image = decoded(post(service, family, lora=False, **body))
    if family == "wan":
        assert image.n_frames == 9 and abs(image.info["duration"] - 125) <= 1
        assert image.size == (256, 128)
    else:
        assert image.size == (128, 64)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_changes_output_strength_zero_is_base_and_seed_repeats(service, family):
    base = post(service, family, lora=False)
    with_lora = post(service, family, lora_id=f"{family}-a")
    zero = post(service, family, lora_id=f"{family}-a", lora_strength=0)
    again = post(service, family, lora_id=f"{family}-a")
    assert np.abs(frames(decoded(base)) - frames(decoded(with_lora))).mean() > 1.0
    assert zero.content == base.content
    assert again.content == with_lora.content


@pytest.mark.parametrize("family", FAMILIES)
def test_error_table_holds_on_every_lora_endpoint(service, family):
    before = post(service, family, lora_id=f"{family}-b").content
    missing = post(service, family)
    assert (missing.status_code, missing.json()["error"]["code"]) == (400, "lora_required")
    unknown = post(service, family, lora_id="nope")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["message"] == "LoRA not found: character-nope.safetensors"
    corrupt = post(service, family, lora_id="corrupt")
    assert corrupt.status_code == 422
    assert corrupt.json()["error"]["message"].startswith("Failed to load LoRA: ")
    out_of_range = post(service, family, lora_id=f"{family}-b", steps=1000)
    assert out_of_range.status_code == 422 and "steps" in out_of_range.json()["error"]["message"]
    assert post(service, family, lora_id=f"{family}-b").content == before


CROSS = [
    ("flux", "sdxl"),
    ("sdxl", "flux"),
    ("wan", "qwen_image"),
    ("qwen_image", "wan"),
    ("z_image", "flux"),
    ("flux", "z_image"),
    ("qwen_image_edit", "sdxl"),
]


@pytest.mark.parametrize(("lora_family", "endpoint_family"), CROSS)
def test_a_lora_for_another_family_is_422_naming_both(service, lora_family, endpoint_family):
    before = post(service, endpoint_family, lora_id=f"{endpoint_family}-a").content
    response = post(service, endpoint_family, lora_id=f"{lora_family}-a")
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert message.startswith("Failed to load LoRA: ")
    assert lora_family in message and endpoint_family in message
    assert post(service, endpoint_family, lora_id=f"{endpoint_family}-a").content == before


def test_wan_length_must_be_4k_plus_1(service):
    response = post(service, "wan", lora=False, length=32)
    assert response.status_code == 422
    assert "length" in response.json()["error"]["message"]
    assert "4k+1" in response.json()["error"]["message"]


@pytest.mark.parametrize("image", [None, "not base64!", base64.b64encode(b"not an image").decode()])
def test_edit_needs_a_decodable_image(service, image):
    body = {"prompt": "make it blue", "steps": 2}
    if image is not None:
        body["image"] = image
    response = service.post("/qwen-image-edit", json=body)
    assert response.status_code == 422
    assert response.json()["error"]["message"].startswith("image")


def test_edit_accepts_a_data_uri_and_follows_the_input(service):
    uri = "data:image/png;base64," + input_image_b64()
    first = post(service, "qwen_image_edit", lora=False, image=uri)
    other = post(service, "qwen_image_edit", lora=False, image=input_image_b64(seed=1))
    assert decoded(first).size == EDIT_INPUT_SIZE
    assert first.content != other.content


def test_models_lists_every_deployment(service):
    models = {m["family"]: m for m in service.get("/models").json()["models"]}
    assert set(models) == set(FAMILIES)
    for family, model in models.items():
        assert model["model_uri"] == f"tiny://{family}"
        assert f"/{FAMILIES[family][0]}-lora" in model["endpoints"]
        assert len(model["replicas"]) == 1
        assert "hot_adapters" in model["replicas"][0]
