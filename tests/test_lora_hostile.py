"""Hostile LoRA files against the real HTTP service, built as an attacker builds them: metadata
that loraplex reads set to junk, a regular expression that backtracks for ever, tensors no load
can use. Each is refused with a 422 naming the key, whichever way it arrives (upload, resumable
upload, or dropped into the root behind the API's back), and a refused request leaves the
service as it was: nothing published, nothing staged, `GET /loras` still 200, and the next
request gives the bytes it gave before.

Every file these tests create has a unique name and is removed at the end.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid

import pytest
import torch
from safetensors.torch import save as save_safetensors

from deployments.family import get_family
from deployments.loras.synthetic import lora_tensors

SMALL = {"width": 128, "height": 128, "steps": 2}
# Measured on the 2-core build machine: the 15 KB backtracking file stalled a generation from
# 0.08 s to 2.5 s before; refused from its text now, its upload takes under 0.1 s.
HOSTILE_UPLOAD_S = 1.0


def unique(stem: str) -> str:
    return f"hostile-{stem}-{uuid.uuid4().hex[:8]}.safetensors"


@pytest.fixture(scope="module")
def flux_lora(tiny_pipelines) -> dict[str, torch.Tensor]:
    spec = get_family("flux")
    transformer = tiny_pipelines("flux").transformer
    return lora_tensors(transformer, "transformer", 61, targets=spec.lora_targets)


def file_bytes(tensors: dict, metadata: dict | None = None) -> bytes:
    return save_safetensors({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def adapter_metadata(**fields) -> dict[str, str]:
    flat = {f"transformer.{key}": value for key, value in fields.items()}
    return {"lora_adapter_metadata": json.dumps(flat)}


def poisoned_copy(data: bytes) -> bytes:
    """The same file, header and all, with its last float32 weight made NaN: the top two bytes
    of a NaN, little-endian."""
    return data[:-2] + bytes([0xC0, 0x7F])


def generate(service, **body):
    body = {"prompt": "a lighthouse at dusk", "seed": 3, **SMALL, **body}
    return service.post("/flux", json=body)


def error_of(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    return error["message"]


def listed(service, **params) -> dict[str, dict]:
    response = service.get("/loras", params=params)
    assert response.status_code == 200, response.text
    return {entry["name"]: entry for entry in response.json()["loras"]}


def assert_unchanged(service, lora_root, name: str) -> None:
    """Nothing published under `name`, nothing staged, and the listing answers."""
    assert name not in listed(service)
    assert name not in listed(service, family="flux")
    assert not (lora_root / name).exists()
    staging = lora_root / ".uploads"
    leftovers = [p for p in staging.rglob("*") if p.is_file()] if staging.exists() else []
    assert leftovers == []


def resumable(service, name: str, data: bytes, metadata: dict | None = None):
    """Start, send and complete an upload; the `complete` response."""
    start = service.post(
        "/loras/uploads",
        json={
            "filename": name,
            "total_size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "metadata": metadata or {},
        },
    )
    assert start.status_code == 201, start.text
    upload_id = start.json()["upload_id"]
    assert service.put(f"/loras/uploads/{upload_id}?offset=0", content=data).status_code == 200
    return service.post(f"/loras/uploads/{upload_id}/complete"), upload_id


def image(response) -> bytes:
    assert response.status_code == 200, response.text
    return response.content


# --- 1. metadata ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "named"),
    [
        ({"loraplex.family": "bogus"}, "metadata.loraplex.family: unknown family 'bogus'"),
        ({"lora_alpha": "abc"}, "metadata.lora_alpha: Input should be a valid number"),
        ({"lora_alpha": "1e30"}, "metadata.lora_alpha: Input should be less than or equal"),
        (
            adapter_metadata(lora_alpha=1e30),
            "metadata.lora_adapter_metadata: transformer.lora_alpha: Input should be less",
        ),
    ],
)
def test_upload_metadata_loraplex_cannot_use_is_refused_at_start(
    service, lora_root, flux_lora, metadata, named
):
    name, data = unique("meta-start"), file_bytes(flux_lora)
    start = {
        "filename": name,
        "total_size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "metadata": metadata,
    }
    message = error_of(service.post("/loras/uploads", json=start), 422, "invalid_request")
    assert message.startswith(named), message
    assert_unchanged(service, lora_root, name)


def test_complete_validates_the_file_as_merged_with_its_metadata(service, lora_root, flux_lora):
    """Metadata sound by itself that the file's tensors contradict: only the merged bytes
    show it. Refused at complete; nothing published, the upload gone."""
    name = unique("meta-merged")
    done, upload_id = resumable(service, name, file_bytes(flux_lora), adapter_metadata(r=8))
    message = error_of(done, 422, "lora_incompatible")
    assert "transformer.r says rank 8" in message and "has rank 4" in message, message
    assert error_of(service.get(f"/loras/uploads/{upload_id}"), 404, "not_found")
    assert_unchanged(service, lora_root, name)


def test_an_upload_staged_with_bad_metadata_is_refused_at_complete_and_removed(
    service, lora_root, flux_lora
):
    """An upload staged before its metadata was checked (state survives restarts): `complete`
    refuses the merged file with a 422, not a 500, and removes what was staged."""
    name, data = unique("meta-staged"), file_bytes(flux_lora)
    start = {"filename": name, "total_size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    upload_id = service.post("/loras/uploads", json=start).json()["upload_id"]
    state_path = lora_root / ".uploads" / upload_id / "upload.json"
    state = json.loads(state_path.read_text())
    state["start"]["metadata"] = {"loraplex.family": "bogus"}
    state_path.write_text(json.dumps(state))
    service.put(f"/loras/uploads/{upload_id}?offset=0", content=data)
    message = error_of(
        service.post(f"/loras/uploads/{upload_id}/complete"), 422, "lora_incompatible"
    )
    assert "metadata loraplex.family: unknown family 'bogus'" in message, message
    assert_unchanged(service, lora_root, name)


def refused_both_ways(service, lora_root, name: str, data: bytes, named: str) -> None:
    """`data` refused naming `named`, by a plain PUT and by a resumable upload, and neither
    leaves anything behind."""
    message = error_of(service.put(f"/loras/{name}", content=data), 422, "lora_incompatible")
    assert named in message, message
    assert_unchanged(service, lora_root, name)
    done, _ = resumable(service, name, data)
    assert named in error_of(done, 422, "lora_incompatible")
    assert_unchanged(service, lora_root, name)


@pytest.mark.parametrize(
    ("metadata", "named"),
    [
        ({"loraplex.family": "bogus"}, "metadata loraplex.family: unknown family 'bogus'"),
        ({"lora_alpha": "abc"}, "metadata lora_alpha: Input should be a valid number"),
        (adapter_metadata(lora_alpha="1e30"), "lora_adapter_metadata: transformer.lora_alpha"),
    ],
)
def test_a_file_whose_own_header_is_bad_is_refused_on_upload(
    service, lora_root, flux_lora, metadata, named
):
    refused_both_ways(
        service, lora_root, unique("meta-header"), file_bytes(flux_lora, metadata), named
    )


def test_a_bad_file_in_the_root_is_listed_with_its_error_and_refused_at_use(
    service, lora_root, flux_lora
):
    name = unique("dropped-meta")
    (lora_root / name).write_bytes(file_bytes(flux_lora, {"loraplex.family": "bogus"}))
    try:
        entry = listed(service)[name]
        assert entry["family"] is None and "loraplex.family" in entry["error"], entry
        assert name not in listed(service, family="flux")
        merge = {
            "inputs": [{"name": name}, {"name": "styles/ink.safetensors"}],
            "output": unique("m"),
        }
        message = error_of(service.post("/loras/merge", json=merge), 422, "lora_incompatible")
        assert "loraplex.family" in message
        message = error_of(generate(service, lora_name=name), 422, "lora_incompatible")
        assert "metadata loraplex.family: unknown family 'bogus'" in message, message
    finally:
        (lora_root / name).unlink()
    assert name not in listed(service)


# --- 2. regular expressions from files -------------------------------------------------------


def hostile_pattern_file(flux_lora) -> bytes:
    """15 KB of metadata whose last pattern backtracks exponentially on a module name of `a`s."""
    evil = "(" * 20 + "a+" + ")+" * 20 + "$"
    patterns = {f"{'a' * 40}{i}": 2 for i in range(300)} | {evil: 3}
    data = file_bytes(flux_lora, adapter_metadata(lora_alpha=4, alpha_pattern=patterns))
    assert len(data) - len(file_bytes(flux_lora)) > 15_000
    return data


def test_a_regular_expression_from_a_file_is_refused_not_run(service, lora_root, flux_lora):
    name, data = unique("regex"), hostile_pattern_file(flux_lora)
    started = time.monotonic()
    message = error_of(service.put(f"/loras/{name}", content=data), 422, "lora_incompatible")
    assert time.monotonic() - started < HOSTILE_UPLOAD_S
    assert "metadata lora_adapter_metadata: transformer.alpha_pattern: " in message, message
    assert "is not a module name" in message
    assert_unchanged(service, lora_root, name)

    (lora_root / name).write_bytes(data)  # behind the API's back: refused at use, at once
    try:
        base = generate(service)
        started = time.monotonic()
        message = error_of(generate(service, lora_name=name), 422, "lora_incompatible")
        assert time.monotonic() - started < HOSTILE_UPLOAD_S
        assert "transformer.alpha_pattern" in message
        assert "alpha_pattern" in listed(service)[name]["error"]
        assert image(generate(service)) == image(base)
    finally:
        (lora_root / name).unlink()


def test_module_name_patterns_as_diffusers_writes_them_still_load(service, lora_root, flux_lora):
    name = unique("patterns")
    module = next(k for k in flux_lora if k.endswith(".lora_B.weight"))
    module = module.removeprefix("transformer.").removesuffix(".lora_B.weight")
    metadata = adapter_metadata(r=4, lora_alpha=4, alpha_pattern={module: 2, "to_k": 8})
    put = service.put(f"/loras/{name}", content=file_bytes(flux_lora, metadata))
    assert put.status_code == 201, put.text
    try:
        assert generate(service, lora_name=name).status_code == 200
    finally:
        assert service.delete(f"/loras/{name}").status_code == 200


# --- 3. tensors no load can use --------------------------------------------------------------


def bad_tensors(flux_lora) -> dict[str, tuple[dict, str]]:
    a_key = next(k for k in flux_lora if k.endswith(".lora_A.weight"))
    b_key = a_key.replace(".lora_A.", ".lora_B.")
    a, b = flux_lora[a_key], flux_lora[b_key]
    nan, inf = b.clone(), b.clone()
    nan[0, 0], inf[-1, -1] = float("nan"), float("inf")
    return {
        "int64": ({**flux_lora, a_key: a.to(torch.int64)}, f"{a_key} is int64"),
        "rank 0": ({**flux_lora, a_key: a[:0], b_key: b[:, :0]}, f"{a_key} has rank 0"),
        "ranks disagree": ({**flux_lora, a_key: a[:2]}, f"{a_key} has rank 2 and {b_key} rank 4"),
        "nan": ({**flux_lora, b_key: nan}, f"{b_key} holds NaN"),
        "inf": ({**flux_lora, b_key: inf}, f"{b_key} holds inf"),
    }


@pytest.mark.parametrize("kind", ["int64", "rank 0", "ranks disagree", "nan", "inf"])
def test_a_file_no_load_can_use_is_refused_on_upload(service, lora_root, flux_lora, kind):
    tensors, named = bad_tensors(flux_lora)[kind]
    refused_both_ways(service, lora_root, unique("tensors"), file_bytes(tensors), named)


@pytest.mark.parametrize("kind", ["int64", "ranks disagree", "nan"])
def test_a_file_dropped_into_the_root_is_refused_at_use_not_rendered_black(
    service, lora_root, flux_lora, kind
):
    tensors, named = bad_tensors(flux_lora)[kind]
    name = unique("dropped")
    (lora_root / name).write_bytes(file_bytes(tensors))
    try:
        base = generate(service)
        for strength in (1.0, 0.0):  # a NaN blackens the image at any strength
            response = generate(service, loras=[{"name": name, "strength": strength}])
            assert named in error_of(response, 422, "lora_incompatible")
        assert named in listed(service)[name]["error"]
        assert image(generate(service)) == image(base)
    finally:
        (lora_root / name).unlink()


def test_a_nan_copy_of_a_file_the_replica_knows_is_refused(service, lora_root, flux_lora):
    """A replica loads a file whose header it has seen straight from its bytes into the free
    slot an evicted adapter of that layout left, without a parse. A copy of a served file with
    one weight made NaN has that very header: refused all the same."""
    good, bad = unique("known"), unique("known-nan")
    data = file_bytes(flux_lora)
    (lora_root / good).write_bytes(data)
    (lora_root / bad).write_bytes(poisoned_copy(data))
    try:
        served = image(generate(service, lora_name=good))
        # Another adapter fills the replica's LRU (2), so the next cold file evicts `good`.
        assert generate(service, lora_name="character-b.safetensors").status_code == 200
        message = error_of(generate(service, lora_name=bad), 422, "lora_incompatible")
        assert "holds NaN" in message, message
        assert image(generate(service, lora_name=good)) == served
    finally:
        (lora_root / good).unlink()
        (lora_root / bad).unlink()
