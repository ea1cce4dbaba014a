"""Hostile request bodies: each is refused with loraplex's JSON error naming the field, at the
status a client expects, and leaves the service as it was.

Found against the running service, each once a plain-text 500: a 5,000-digit seed, JSON nested
100,000 deep, an edit image whose PNG header declares 30000x30000, a PNG whose CRCs are right
but whose pixel data is corrupt, and edit inputs that made outputs outside 64-2048 pixels.
The HTTP tests share the session's service; the pure helpers are tested on their own.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import struct
import time
import zlib
from types import SimpleNamespace

import pytest
from PIL import Image

from deployments.errors import InvalidRequest, TooLarge
from deployments.job_sizes import output_size
from deployments.media import (
    MAX_DATASET_IMAGE_PIXELS,
    MAX_IMAGE_PIXELS,
    decode_input_image,
    load_image,
)
from serve.config import AppConfig
from serve.datasets import image_as_png
from serve.json_bounds import MAX_JSON_DEPTH, MAX_JSON_ITEMS, check_json_bounds
from serve.routes.bodies import parse_json

DEEP = 100_000
SMALL_FLUX = {"prompt": "a red fox", "seed": 3, "steps": 2, "width": 64, "height": 64}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, idat: bytes | None = None) -> bytes:
    """A PNG whose header says `width` x `height` (RGB), every chunk's CRC right; its pixel
    data is one row of zeros unless `idat` is given."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * (1 + 3 * width)) if idat is None else idat
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def corrupt_idat_png() -> bytes:
    """Right signature, header and CRCs; pixel data that is no zlib stream."""
    return png_declaring(64, 64, idat=b"not a zlib stream" * 8)


def image_bytes(size: tuple[int, int], fmt: str = "PNG") -> bytes:
    """A smooth gradient: compresses well, so large sizes fit the tests' body limit."""
    width, height = size
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# The pure helpers


def test_a_huge_integer_is_refused_naming_its_field_before_parsing():
    body = b'{"prompt": "x", "seed": ' + b"7" * 5000 + b"}"
    with pytest.raises(InvalidRequest, match=r"^seed: an integer of 5000 digits is out of range"):
        parse_json(body)
    with pytest.raises(InvalidRequest, match=r"^loras\.1\.strength: an integer of 40 digits"):
        check_json_bounds(b'{"loras": [{"id": "a"}, {"strength": -' + b"1" * 40 + b"}]}")
    # A seed's largest value, and long fractions (floats have no such limit), still parse.
    assert parse_json(b'{"seed": 9223372036854775807}') == {"seed": 2**63 - 1}
    assert parse_json(b'{"cfg": 1.' + b"5" * 5000 + b"}")["cfg"] == pytest.approx(14 / 9)


def test_deep_nesting_is_refused_without_a_recursion_error():
    with pytest.raises(InvalidRequest, match=rf"^body: nested deeper than {MAX_JSON_DEPTH}"):
        parse_json(b"[" * DEEP + b"]" * DEEP)
    with pytest.raises(InvalidRequest, match=rf"^prompt: nested deeper than {MAX_JSON_DEPTH}"):
        parse_json(b'{"seed": 1, "prompt": ' + b"[" * DEEP + b"]" * DEEP + b"}")
    # The deepest valid body (block weights, 5 deep) and brackets inside strings are fine.
    deepest = {"prompt": "[[[[{{{{", "loras": [{"name": "a", "block_weights": {"b": [0.5]}}]}
    assert parse_json(json.dumps(deepest).encode()) == deepest


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"cfg": NaN}', r"^cfg: NaN is not a JSON number"),
        (b'{"loras": [{"strength": Infinity}]}', r"^loras\.0\.strength: Infinity is not"),
        (b'{"prompt": "a \\ud800 fox"}', r"^prompt: a lone UTF-16 surrogate"),
        (b'{"\\udc00": 1}', r"^\?: a lone UTF-16 surrogate"),
        ('{"prompt": "x"}'.encode("utf-16"), r"^body: not UTF-8"),
        (b'{"prompt": "x",', r"^body: not valid JSON"),
    ],
)
def test_what_python_parses_but_no_field_can_use_is_refused(body, message):
    with pytest.raises(InvalidRequest, match=message):
        parse_json(body)


def test_a_body_of_very_many_tiny_items_is_refused_fast():
    """4 MB of `[],` took seconds to check and parse; refused at the first item past the
    bound, naming the top-level field it is in."""
    many = b"[" + b"[]," * 1_300_000 + b"[]]"
    started = time.monotonic()
    with pytest.raises(TooLarge, match=rf"^body: more than {MAX_JSON_ITEMS} JSON items"):
        parse_json(many)
    assert time.monotonic() - started < 1.0
    with pytest.raises(TooLarge, match=r"^images: more than 50000 JSON items"):
        check_json_bounds(b'{"images": [' + b"{}," * 60_000 + b"{}]}")
    # The largest valid body, a JSON dataset of 10,000 images (40,000 items), passes.
    image = {"filename": "a.png", "content": "AAAA", "caption": "a fox"}
    check_json_bounds(json.dumps({"images": [image] * 10_000}).encode())


def test_escaped_quotes_and_surrogate_pairs_are_read_as_json_does():
    body = rb'{"prompt": "say \"[[\" \\", "negative_prompt": "\ud83d\ude00", "seed": 12}'
    assert parse_json(body) == json.loads(body)


def test_an_image_declaring_too_many_pixels_is_refused_from_its_header():
    # PIL's own limit, set explicitly: the largest any decode allows (dataset images).
    assert Image.MAX_IMAGE_PIXELS == MAX_DATASET_IMAGE_PIXELS
    with pytest.raises(TooLarge, match=r"^image: the image is over the limit of 16777216"):
        load_image(png_declaring(30000, 30000), "image")
    # Under PIL's limit, over an edit input's: ours refuses from the header.
    with pytest.raises(TooLarge, match=r"^image: 5000x5000 is 25000000 pixels, over the limit"):
        load_image(png_declaring(5000, 5000), "image")
    with pytest.raises(TooLarge, match=r"over the limit of 67108864"):
        load_image(png_declaring(9000, 9000), "images.0", MAX_DATASET_IMAGE_PIXELS)


def test_corrupt_pixel_data_fails_the_decode_not_a_replica():
    with pytest.raises(InvalidRequest, match=r"^image: unreadable image \(broken data stream"):
        decode_input_image(b64(corrupt_idat_png()))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"  # PIL would run Ghostscript
    with pytest.raises(InvalidRequest, match=r"^image: unreadable image \(not a PNG, JPEG"):
        decode_input_image(b64(eps))


def test_edit_inputs_longer_than_the_output_box_keeps_are_refused():
    with pytest.raises(InvalidRequest, match=r"^image: 4096x64 is longer than 32:1"):
        decode_input_image(b64(image_bytes((4096, 64))))
    assert decode_input_image(b64(image_bytes((4096, 128))))


def test_dataset_images_get_the_same_limits_naming_the_item():
    with pytest.raises(TooLarge, match=r"^images\.0: bomb\.png: the image is over the limit"):
        image_as_png(png_declaring(30000, 30000), "bomb.png", "images.0")
    with pytest.raises(InvalidRequest, match=r"^images\.2: bad\.png: unreadable image"):
        image_as_png(corrupt_idat_png(), "bad.png", "images.2")
    converted = image_as_png(image_bytes((80, 48), "JPEG"), "ok.jpg", "images.0")
    assert Image.open(io.BytesIO(converted)).format == "PNG"


@pytest.mark.parametrize(
    ("image", "width", "height", "multiple", "expected"),
    [
        ((320, 192), None, None, 16, (320, 192)),  # inside the box: its own size
        ((330, 200), None, None, 16, (320, 192)),  # rounded down to the step
        ((16, 16), None, None, 16, (64, 64)),  # grown to the smallest side
        ((4096, 128), None, None, 16, (2048, 64)),  # shrunk into the box, 32:1 kept
        ((3000, 2000), None, None, 16, (2048, 1360)),
        ((100, 3000), None, None, 32, (64, 2048)),  # z_image's step
        ((192, 64), None, None, 16, (192, 64)),
        ((320, 192), 640, None, 16, (640, 384)),  # the missing side follows the image
        ((320, 192), None, 96, 16, (160, 96)),
        ((4000, 100), 2048, None, 16, (2048, 64)),  # never outside the box
        ((320, 192), 128, 512, 16, (128, 512)),  # both given: the request's
    ],
)
def test_an_edit_output_is_the_input_scaled_into_the_box(image, width, height, multiple, expected):
    assert output_size(image, width, height, multiple) == expected


def test_an_unexpected_exception_is_a_json_500_logged_with_its_traceback(caplog):
    """Outside a Serve replica the ingress cannot find its services: a failure no route
    foresaw, which the last-resort handler must answer as JSON."""
    from fastapi.testclient import TestClient

    from serve.ingress import app

    logger = logging.getLogger("ray.serve")  # Ray's: it does not propagate to the root
    logger.addHandler(caplog.handler)
    try:
        response = TestClient(app, raise_server_exceptions=False).get("/healthz")
    finally:
        logger.removeHandler(caplog.handler)
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal"
    [record] = [r for r in caplog.records if "failed unexpectedly" in r.getMessage()]
    assert record.exc_info is not None  # logged with its traceback


def test_a_parameter_fastapi_cannot_convert_is_a_422_in_loraplex_shape(monkeypatch):
    from fastapi.testclient import TestClient

    from serve.ingress import app
    from serve.routes import services

    config = AppConfig.model_validate({"models": [{"name": "flux", "family": "flux"}]})
    replica = SimpleNamespace(
        servable_object=SimpleNamespace(services=SimpleNamespace(config=config))
    )
    monkeypatch.setattr(services.serve, "get_replica_context", lambda: replica)
    response = TestClient(app).put("/loras/uploads/u1?offset=abc", content=b"x")
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["message"].startswith("offset: ")


# Over HTTP, against the session's service


@pytest.fixture(scope="module")
def baseline(service) -> bytes:
    """A small flux render before any attack: every attack must leave it unchanged."""
    response = service.post("/flux", json=SMALL_FLUX)
    assert response.status_code == 200, response.text
    return response.content


def refused(service, baseline, response, status: int, code: str, field: str) -> str:
    """The JSON error's message, checked for status, code and field; and the service still
    renders what it rendered before."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"].startswith(f"{field}: "), error["message"]
    assert service.post("/flux", json=SMALL_FLUX).content == baseline
    return error["message"]


def post_raw(service, path: str, body: bytes):
    return service.post(path, content=body, headers={"content-type": "application/json"})


def test_http_a_5000_digit_seed(service, baseline):
    body = b'{"prompt": "a red fox", "seed": ' + b"9" * 5000 + b"}"
    message = refused(
        service, baseline, post_raw(service, "/flux", body), 422, "invalid_request", "seed"
    )
    assert "5000 digits" in message


def test_http_json_nested_100000_deep(service, baseline):
    nested = b'{"prompt": ' + b"[" * DEEP + b"]" * DEEP + b"}"
    response = post_raw(service, "/flux", nested)
    refused(service, baseline, response, 422, "invalid_request", "prompt")
    response = post_raw(service, "/loras/merge", b"[" * DEEP + b"]" * DEEP)
    refused(service, baseline, response, 422, "invalid_request", "body")


def test_http_nan_and_lone_surrogates(service, baseline):
    response = post_raw(service, "/flux", b'{"prompt": "a fox", "cfg": NaN}')
    refused(service, baseline, response, 422, "invalid_request", "cfg")
    response = post_raw(service, "/flux", b'{"prompt": "a \\ud800 fox"}')
    refused(service, baseline, response, 422, "invalid_request", "prompt")


def test_http_an_edit_image_declaring_30000x30000(service, baseline):
    body = {"prompt": "blue", "steps": 2, "image": b64(png_declaring(30000, 30000))}
    response = service.post("/qwen-image-edit", json=body)
    message = refused(service, baseline, response, 413, "too_large", "image")
    assert str(MAX_IMAGE_PIXELS) in message


def test_http_a_dataset_image_declaring_30000x30000(service, baseline):
    images = [{"filename": "bomb.png", "content": b64(png_declaring(30000, 30000))}]
    response = service.put("/datasets/hostile/bomb", json={"images": images})
    refused(service, baseline, response, 413, "too_large", "images.0")
    assert service.get("/datasets/hostile/bomb").status_code == 404  # nothing written


def test_http_a_png_with_right_crcs_and_corrupt_pixels(service, baseline):
    body = {"prompt": "blue", "steps": 2, "image": b64(corrupt_idat_png())}
    response = service.post("/qwen-image-edit", json=body)
    message = refused(service, baseline, response, 422, "invalid_request", "image")
    assert "unreadable image" in message
    files = {"bad.png": ("bad.png", corrupt_idat_png(), "image/png")}
    response = service.put("/datasets/hostile/corrupt", files=files)
    refused(service, baseline, response, 422, "invalid_request", "bad.png")


@pytest.mark.parametrize(
    ("input_size", "output"),
    [((16, 16), (64, 64)), ((4096, 128), (2048, 64)), ((1000, 3000), (672, 2048))],
)
def test_http_edit_outputs_keep_to_the_size_limits(service, baseline, input_size, output):
    body = {"prompt": "blue", "steps": 1, "seed": 1, "image": b64(image_bytes(input_size))}
    response = service.post("/qwen-image-edit", json=body)
    assert response.status_code == 200, response.text
    assert Image.open(io.BytesIO(response.content)).size == output


def test_http_an_edit_input_longer_than_32_to_1(service, baseline):
    body = {"prompt": "blue", "steps": 1, "image": b64(image_bytes((4096, 64)))}
    response = service.post("/qwen-image-edit", json=body)
    refused(service, baseline, response, 422, "invalid_request", "image")


def test_http_a_query_parameter_of_the_wrong_type(service, baseline):
    response = service.put("/loras/uploads/u1", params={"offset": "abc"}, content=b"x")
    refused(service, baseline, response, 422, "invalid_request", "offset")


def test_http_a_body_of_a_million_tiny_items(service, baseline):
    response = post_raw(service, "/flux", b"[" + b"[]," * 1_000_000 + b"[]]")
    refused(service, baseline, response, 413, "too_large", "body")


def _ingress_rss_mb() -> int:
    import psutil
    from ray.util.state import list_actors

    alive = [("state", "=", "ALIVE"), ("class_name", "=", "ServeReplica:loraplex:Ingress")]
    # Ray's state API can answer with nothing on a loaded machine: ask again.
    deadline = time.monotonic() + 20
    while not (found := list_actors(filters=alive)) and time.monotonic() < deadline:
        time.sleep(0.5)
    [ingress] = found
    return psutil.Process(ingress.pid).memory_info().rss >> 20


@pytest.mark.parametrize("path", ["/flux", "/loras/streamed.safetensors", "/datasets/streamed"])
def test_http_a_300_mb_chunked_body_is_refused_as_it_arrives(service, baseline, path):
    """No Content-Length: the limit (4 MB here) applies as the chunks arrive; the ingress
    holds at most the limit of it (it read 300 MB whole before, 700 MB more resident)."""
    before_mb = _ingress_rss_mb()

    def chunks():
        for _ in range(300):
            yield b"x" * 1024 * 1024

    method = "POST" if path == "/flux" else "PUT"
    response = service.request(method, path, content=chunks())
    message = refused(service, baseline, response, 413, "too_large", "body")
    assert "over the limit of 4194304 bytes" in message
    # Far below the body: what grows is buffers of Serve's proxy and the allocator's pools.
    assert _ingress_rss_mb() - before_mb < 150
