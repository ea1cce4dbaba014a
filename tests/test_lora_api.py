"""The LoRA management API over real HTTP: list, upload (plain and resumable), delete, merge.

Every file these tests create has a unique name and is deleted at the end, so the other tests
sharing the session's LoRA root see it as it was.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import time
import uuid

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from deployments.family import get_family
from deployments.loras.synthetic import lora_tensors, write_lora

SMALL = {"width": 128, "height": 128, "steps": 2}


def unique(stem: str) -> str:
    return f"api-{stem}-{uuid.uuid4().hex[:8]}.safetensors"


def family_lora(tiny_pipelines, family: str, seed: int) -> dict[str, torch.Tensor]:
    spec = get_family(family)
    denoiser = getattr(tiny_pipelines(family), spec.denoiser_component)
    return lora_tensors(denoiser, spec.denoiser_component, seed, targets=spec.lora_targets)


def file_bytes(tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> bytes:
    return save_safetensors({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def generate(client, path="/flux", **body):
    return client.post(path, json={"prompt": "a lighthouse at dusk", "seed": 3, **SMALL, **body})


def pixels(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), dtype=np.float64)


def listed(client, **params) -> dict[str, dict]:
    response = client.get("/loras", params=params)
    assert response.status_code == 200, response.text
    return {entry["name"]: entry for entry in response.json()["loras"]}


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def assert_absent(client, lora_root, name: str) -> None:
    """Not listed, not servable, no file, and nothing left in staging."""
    assert name not in listed(client)
    assert error_of(generate(client, lora_name=name), 404)["code"] == "lora_not_found"
    assert not (lora_root / name).exists()
    staging = lora_root / ".uploads"
    leftovers = [p for p in staging.rglob("*") if p.is_file()] if staging.exists() else []
    assert leftovers == []


@pytest.fixture(scope="module")
def flux_file(tiny_pipelines) -> bytes:
    return file_bytes(family_lora(tiny_pipelines, "flux", seed=41))


def test_put_list_serve_delete_round_trip(service, lora_root, flux_file):
    name = f"api-tests/{unique('roundtrip')}"
    put = service.put(f"/loras/{name}", content=flux_file)
    assert put.status_code == 201, put.text
    entry = put.json()
    assert entry["name"] == name
    assert entry["size_bytes"] == len(flux_file)
    assert entry["sha256"] == hashlib.sha256(flux_file).hexdigest()
    assert (entry["format"], entry["family"], entry["rank"]) == ("diffusers", "flux", 4)
    assert entry["targets"] == ["transformer"]
    assert listed(service)[name] == entry
    assert name in listed(service, family="flux")
    assert name not in listed(service, family="sdxl")

    base = generate(service)
    with_lora = generate(service, lora_name=name)
    assert np.abs(pixels(with_lora) - pixels(base)).mean() > 1.0

    again = service.put(f"/loras/{name}", content=flux_file)
    assert error_of(again, 409)["code"] == "conflict"
    assert service.put(f"/loras/{name}?overwrite=true", content=flux_file).status_code == 201

    deleted = service.delete(f"/loras/{name}")
    assert deleted.status_code == 200 and deleted.json() == {"deleted": name}
    assert_absent(service, lora_root, name)
    assert error_of(service.delete(f"/loras/{name}"), 404)["code"] == "lora_not_found"


def test_an_upload_is_checked_beside_a_generation_not_after_it(service, flux_file):
    name = unique("beside")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # About 3 s on the flux replica that checks the upload.
        long = pool.submit(generate, service, width=1024, height=1024, steps=96)
        time.sleep(0.5)
        started = time.monotonic()
        put = service.put(f"/loras/{name}", content=flux_file)
        put_s = time.monotonic() - started
        generation_s = float(long.result().headers["X-Inference-Ms"]) / 1000
    assert put.status_code == 201, put.text
    # Checked on the replica's tensor thread, the upload waited for the render (a debug run:
    # 2.53 s of a 2.97 s one); beside it, 0.03 s.
    assert put_s < generation_s / 4
    assert service.delete(f"/loras/{name}").status_code == 200


def test_listing_shows_every_file_with_its_facts_and_bad_files_with_an_error(service):
    files = listed(service)
    assert files["styles/ink.safetensors"]["family"] == "flux"
    assert files["character-sdxl-a.safetensors"]["family"] == "sdxl"
    assert files["character-corrupt.safetensors"]["error"].startswith("Failed to load LoRA")
    assert files["character-corrupt.safetensors"]["family"] is None
    assert not any(name.startswith(".") or "/." in name for name in files)
    assert error_of(service.get("/loras?family=nope"), 422)["code"] == "invalid_request"


def test_an_interrupted_resumable_upload_resumes_from_its_offset(service, lora_root, flux_file):
    name = unique("resumed")
    start = service.post(
        "/loras/uploads",
        json={
            "filename": name,
            "total_size": len(flux_file),
            "sha256": hashlib.sha256(flux_file).hexdigest(),
            "metadata": {"trigger_words": ["zxq style"]},
        },
    )
    assert start.status_code == 201, start.text
    upload_id = start.json()["upload_id"]
    assert start.json()["offset"] == 0
    half = len(flux_file) // 2
    first = service.put(f"/loras/uploads/{upload_id}?offset=0", content=flux_file[:half])
    assert first.json()["offset"] == half
    assert name not in listed(service)  # staged, not published

    # The first client is gone; a new one asks where to resume.
    with httpx.Client(base_url=service.base_url, timeout=300) as fresh:
        assert fresh.get(f"/loras/uploads/{upload_id}").json()["offset"] == half
        early = fresh.post(f"/loras/uploads/{upload_id}/complete")
        assert error_of(early, 409)["message"].endswith(f"resume from offset {half}")
        stale = fresh.put(f"/loras/uploads/{upload_id}?offset=0", content=flux_file[half:])
        assert f"expected {half}" in error_of(stale, 409)["message"]
        rest = fresh.put(f"/loras/uploads/{upload_id}?offset={half}", content=flux_file[half:])
        assert rest.json()["offset"] == len(flux_file)
        done = fresh.post(f"/loras/uploads/{upload_id}/complete")
    assert done.status_code == 201, done.text
    assert done.json()["family"] == "flux"
    assert done.json()["trigger_words"] == ["zxq style"]
    assert error_of(service.get(f"/loras/uploads/{upload_id}"), 404)["code"] == "not_found"

    published = load_safetensors((lora_root / name).read_bytes())
    original = load_safetensors(flux_file)
    assert published.keys() == original.keys()
    assert all(torch.equal(published[k], original[k]) for k in original)
    assert pixels(generate(service, lora_name=name)).shape == (128, 128, 3)
    assert service.delete(f"/loras/{name}").status_code == 200


def test_a_wrong_sha256_is_refused_and_nothing_is_published(service, lora_root, flux_file):
    name = unique("badsum")
    start = service.post(
        "/loras/uploads",
        json={"filename": name, "total_size": len(flux_file), "sha256": "0" * 64},
    )
    upload_id = start.json()["upload_id"]
    assert service.put(f"/loras/uploads/{upload_id}?offset=0", content=flux_file).status_code == 200
    refused = service.post(f"/loras/uploads/{upload_id}/complete")
    error = error_of(refused, 422)
    assert error["code"] == "invalid_request" and error["message"].startswith("sha256:")
    assert hashlib.sha256(flux_file).hexdigest() in error["message"]
    assert error_of(service.get(f"/loras/uploads/{upload_id}"), 404)["code"] == "not_found"
    assert_absent(service, lora_root, name)


def _bad_files(tiny_pipelines, flux_file):
    sdxl = file_bytes(family_lora(tiny_pipelines, "sdxl", seed=42))
    no_key = file_bytes(
        {
            "transformer.no_such_block.to_q.lora_A.weight": torch.ones(4, 8),
            "transformer.no_such_block.to_q.lora_B.weight": torch.ones(8, 4),
        }
    )
    return {
        "corrupt": (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", None, "safetensors"),
        "truncated": (flux_file[: len(flux_file) // 2], None, "safetensors"),
        "other family": (sdxl, "flux", "sdxl LoRA cannot be used with flux"),
        "no key matches": (no_key, None, "no served model accepts it"),
    }


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "other family", "no key matches"])
def test_a_bad_file_is_422_and_nothing_is_published(
    service, lora_root, tiny_pipelines, flux_file, kind
):
    data, family, reason = _bad_files(tiny_pipelines, flux_file)[kind]
    name = unique("bad")
    params = {"family": family} if family else {}
    error = error_of(service.put(f"/loras/{name}", params=params, content=data), 422)
    assert error["code"] == "lora_incompatible" and reason in error["message"], error
    assert_absent(service, lora_root, name)

    # The same file through the resumable path: refused at complete, upload discarded.
    start = {"filename": name, "total_size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    upload_id = service.post("/loras/uploads", json={**start, "family": family}).json()["upload_id"]
    service.put(f"/loras/uploads/{upload_id}?offset=0", content=data)
    error = error_of(service.post(f"/loras/uploads/{upload_id}/complete"), 422)
    assert error["code"] == "lora_incompatible"
    assert error_of(service.get(f"/loras/uploads/{upload_id}"), 404)["code"] == "not_found"
    assert_absent(service, lora_root, name)


@pytest.mark.parametrize(
    "name",
    [
        "%2E%2E/api-outside.safetensors",
        "sub/%2E%2E/%2E%2E/api-outside.safetensors",
        "%2Ftmp%2Fapi-outside.safetensors",
        ".uploads/api-hidden.safetensors",
        "api-not-safetensors.ckpt",
    ],
)
def test_names_that_leave_the_root_or_are_not_safetensors_are_refused(
    service, lora_root, flux_file, name
):
    error = error_of(service.put(f"/loras/{name}", content=flux_file), 422)
    assert error["code"] == "invalid_request" and error["message"].startswith("name:"), error
    assert not (lora_root.parent / "api-outside.safetensors").exists()
    assert not any("api-" in n and "outside" in n for n in listed(service))


def test_a_sub_folder_named_uploads_holds_ordinary_files(service, flux_file):
    name = unique("in-uploads-folder")
    assert service.put(f"/loras/uploads/{name}", content=flux_file).status_code == 201
    assert listed(service)[f"uploads/{name}"]["family"] == "flux"
    assert service.delete(f"/loras/uploads/{name}").json() == {"deleted": f"uploads/{name}"}
    assert f"uploads/{name}" not in listed(service)


@pytest.mark.parametrize(
    "filename", ["../api-outside.safetensors", "/tmp/api-outside.safetensors", "api-x.pt"]
)
def test_resumable_upload_and_merge_refuse_names_outside_the_root(service, filename):
    start = {"filename": filename, "total_size": 64, "sha256": "0" * 64}
    error = error_of(service.post("/loras/uploads", json=start), 422)
    assert error["code"] == "invalid_request" and error["message"].startswith("filename:")
    merge = {"inputs": [{"name": "character-a.safetensors"}], "output": filename}
    error = error_of(service.post("/loras/merge", json=merge), 422)
    assert error["message"].startswith("output:")


def test_merge_reproduces_the_stack(service, lora_root, tiny_pipelines):
    a, b, merged = unique("merge-a"), unique("merge-b"), unique("merged")
    with_alpha = family_lora(tiny_pipelines, "flux", seed=51)
    for key in [k for k in with_alpha if k.endswith(".lora_A.weight")]:
        # alpha 2 at rank 4: this input's scale is 0.5, which the merged file must fold in
        with_alpha[key.replace(".lora_A.weight", ".alpha")] = torch.tensor(2.0)
    write_lora(lora_root / a, with_alpha, {"trigger_words": "aa"})
    write_lora(lora_root / b, family_lora(tiny_pipelines, "flux", seed=52))
    response = service.post(
        "/loras/merge",
        json={"inputs": [{"name": a, "ratio": 0.7}, {"name": b, "ratio": 0.4}], "output": merged},
    )
    assert response.status_code == 201, response.text
    entry = response.json()
    assert listed(service)[a]["alpha"] == 2.0
    assert (entry["family"], entry["rank"], entry["alpha"]) == ("flux", 8, None)
    assert entry["trigger_words"] == ["aa"]

    stack = pixels(
        generate(service, loras=[{"name": a, "strength": 0.7}, {"name": b, "weight": 0.4}])
    )
    one_file = pixels(generate(service, lora_name=merged))
    base = pixels(generate(service))
    assert np.abs(stack - one_file).mean() < 0.5
    assert np.abs(stack - base).mean() > 1.0
    for name in (a, b, merged):
        assert service.delete(f"/loras/{name}").status_code == 200


def test_merge_refuses_mixed_families_and_missing_inputs(service):
    mixed = {
        "inputs": [{"name": "character-a.safetensors"}, {"name": "character-sdxl-a.safetensors"}],
        "output": unique("mixed"),
    }
    error = error_of(service.post("/loras/merge", json=mixed), 422)
    assert "character-a.safetensors is a flux LoRA" in error["message"]
    assert "character-sdxl-a.safetensors a sdxl LoRA" in error["message"]
    missing = {"inputs": [{"name": "api-nope.safetensors"}], "output": unique("missing")}
    assert error_of(service.post("/loras/merge", json=missing), 404)["code"] == "lora_not_found"
    assert not any(name.startswith(("api-mixed", "api-missing")) for name in listed(service))
