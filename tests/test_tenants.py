"""Tenants: a tenant key's LoRAs, datasets and jobs live under `tenants/<tenant>/` of each root,
and one tenant cannot read, use, overwrite or delete another's (404, as if absent); shared
items (outside tenants/) it reads but does not change (403). First without Serve, then over
real HTTP against a keyed app beside the session's."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from PIL import Image

from deployments.errors import Conflict, Forbidden, InvalidRequest, LoraNotFound, NotFound
from deployments.loras.store import LoraStore
from serve import tenants
from serve.config import AppConfig
from serve.datasets import Datasets
from serve.resolve import resolve_job
from tests.keyed_app import as_key, keyed_app
from tests.lora_files import write_lora

TENANT_SCOPES = ["generate", "loras:read", "loras:write", "train"]
ACME, BOB, ROOT = as_key("acme-key"), as_key("bob-key"), as_key("root-key")
SMALL = {"width": 64, "height": 64, "steps": 2, "seed": 3}


def png(shade: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), (shade, 40, 90)).save(out, format="PNG")
    return out.getvalue()


def dataset_body(caption: str, count: int = 1) -> dict:
    content = base64.b64encode(png(len(caption))).decode()
    images = [
        {"filename": f"i{i}.png", "content": content, "caption": caption} for i in range(count)
    ]
    return {"images": images}


# Without Serve


def test_names_map_into_the_tenants_folder():
    assert tenants.owned("acme", "styles/ink.safetensors") == "tenants/acme/styles/ink.safetensors"
    assert tenants.owned(None, "tenants/acme/x") == "tenants/acme/x"
    with pytest.raises(InvalidRequest, match="output: 'tenants/bob/x'"):
        tenants.owned("acme", "tenants/bob/x", "output")
    assert tenants.readable("acme", "x") == ["tenants/acme/x", "x"]
    assert tenants.readable("acme", "tenants/bob/x") == []
    assert tenants.shown("acme", "tenants/acme/x") == "x"
    assert tenants.shown("acme", "tenants/bob/x") is None
    assert tenants.shown("acme", "x") == "x"


def test_a_listing_shows_own_then_shared_files():
    entries = [{"name": n} for n in ("a", "tenants/acme/a", "tenants/acme/b", "tenants/bob/c", "z")]
    assert tenants.entries_seen(entries, "acme") == [
        {"name": "a", "shared": False},
        {"name": "b", "shared": False},
        {"name": "z", "shared": True},
    ]
    assert tenants.entries_seen(entries, None) == entries


def test_generation_resolves_own_then_shared_never_anothers(tmp_path):
    tensors = {"transformer.x.lora_A.weight": torch.ones(4, 64)}
    for name in ("ink", "tenants/acme/ink", "tenants/bob/fox", "fox"):
        write_lora(tmp_path / f"{name}.safetensors", tensors)
    config = AppConfig.model_validate(
        {"lora_root": str(tmp_path), "models": [{"name": "flux", "family": "flux"}]}
    )
    store = LoraStore(config.lora_root)

    def names(tenant, **body):
        job = resolve_job(
            {"prompt": "p", **body}, config.models[0], lora_required=False, store=store,
            config=config, tenant=tenant,
        )  # fmt: skip
        return [adapter.name for adapter in job.adapters]

    assert names("acme", lora_name="ink.safetensors") == ["tenants/acme/ink.safetensors"]
    assert names("acme", loras=[{"name": "fox.safetensors"}]) == ["fox.safetensors"]  # shared
    assert names(None, lora_name="tenants/bob/fox.safetensors") == ["tenants/bob/fox.safetensors"]
    bobs = "tenants/bob/fox.safetensors"
    for body in ({"lora_name": bobs}, {"loras": [{"name": bobs}]}):
        with pytest.raises(LoraNotFound):
            names("acme", **body)


def test_datasets_of_tenants_and_symlinks_out_of_the_root(tmp_path):
    root, outside = tmp_path / "datasets", tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png(1))
    (outside / "secret.txt").write_text("not yours")
    datasets = Datasets(str(root))
    datasets.write("cats", {"a": (png(2), "shared cat")})
    datasets.write("cats", {"b": (png(3), "acme cat")}, tenant="acme")
    assert (root / "tenants/acme/cats/b.png").exists()
    assert datasets.describe("cats", "acme")["images"][0]["caption"] == "acme cat"
    assert datasets.describe("cats", "bob")["images"][0]["caption"] == "shared cat"
    with pytest.raises(NotFound):
        datasets.describe("tenants/acme/cats", "bob")
    with pytest.raises(Forbidden):
        datasets.owned("cats", "bob")
    with pytest.raises(NotFound):
        datasets.owned("dogs", "bob")

    # GET follows no symlink out of the root: not a dataset's folder, nor a file in one.
    (root / "escape").symlink_to(outside)
    with pytest.raises(NotFound):
        datasets.describe("escape")
    (root / "cats" / "leak.png").symlink_to(outside / "secret.png")
    (root / "cats" / "a.txt").unlink()
    (root / "cats" / "a.txt").symlink_to(outside / "secret.txt")
    described = datasets.describe("cats")["images"]
    assert [(i["filename"], i["caption"]) for i in described] == [("a.png", "")]
    with pytest.raises(InvalidRequest, match="name: escape/x leads out"):
        datasets.write("escape/x", {"c": (png(4), "")})


def test_a_dataset_holding_others_is_not_replaced(tmp_path):
    datasets = Datasets(str(tmp_path))
    datasets.write("people/zxq", {"a": (png(2), "zxq")})
    with pytest.raises(Conflict, match="name: dataset people holds other datasets"):
        datasets.write("people", {"b": (png(3), "replaces them?")})
    assert datasets.describe("people/zxq")["images"][0]["caption"] == "zxq"
    datasets.write("x", {"c": (png(4), "")}, tenant="acme")
    for name in ("tenants", "tenants/acme"):  # nor a tenant's datasets, nor every tenant's
        with pytest.raises(Conflict):
            datasets.write(name, {"b": (png(3), "")})
    assert datasets.describe("x", "acme")["images"][0]["filename"] == "c.png"


# Over HTTP


@pytest.fixture(scope="module")
def app(service, ray_cluster, lora_root, tmp_path_factory):
    keys = [
        "root-key",
        {"key": "acme-key", "scopes": TENANT_SCOPES, "tenant": "acme"},
        {"key": "bob-key", "scopes": TENANT_SCOPES, "tenant": "bob"},
    ]
    folder = tmp_path_factory.mktemp("tenanted")
    with keyed_app(ray_cluster, lora_root, folder, "tenanted", keys) as client:
        client.folder = folder
        yield client
    # The session's LoRA root is shared with every other test: leave it as it was.
    for path in sorted((lora_root / "tenants").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    (lora_root / "tenants").rmdir()


def names_seen(app, headers) -> dict[str, bool | None]:
    response = app.get("/loras", headers=headers)
    assert response.status_code == 200, response.text
    return {entry["name"]: entry.get("shared") for entry in response.json()["loras"]}


def status_of(response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["code"]


@pytest.mark.slow
def test_one_tenant_cannot_read_use_overwrite_or_delete_anothers_lora(app, lora_root):
    shared_ink = (lora_root / "styles/ink.safetensors").read_bytes()
    bobs = (lora_root / "character-b.safetensors").read_bytes()
    # Bob's own styles/ink: under tenants/bob, hiding the shared one from Bob only.
    put = app.put("/loras/styles/ink.safetensors", content=bobs, headers=BOB)
    assert put.status_code == 201, put.text
    assert put.json()["name"] == "styles/ink.safetensors"
    assert (lora_root / "tenants/bob/styles/ink.safetensors").read_bytes() == bobs
    assert (lora_root / "styles/ink.safetensors").read_bytes() == shared_ink

    # Read: each tenant lists its own and the shared files; a key without a tenant, all.
    acme, bob = names_seen(app, ACME), names_seen(app, BOB)
    assert acme["styles/ink.safetensors"] is True and bob["styles/ink.safetensors"] is False
    assert acme["character-a.safetensors"] is True
    assert not [name for name in {**acme, **bob} if name.startswith("tenants/")]
    assert "tenants/bob/styles/ink.safetensors" in names_seen(app, ROOT)

    # Use: the same name is each tenant's own file; Bob's by its full path is no name of Acme's.
    ink = {"prompt": "a fox", **SMALL, "lora_name": "styles/ink.safetensors"}
    as_bob = app.post("/flux-lora", json=ink, headers=BOB)
    as_acme = app.post("/flux-lora", json=ink, headers=ACME)
    assert as_bob.status_code == as_acme.status_code == 200, (as_bob.text, as_acme.text)
    assert as_bob.content != as_acme.content
    for name in ("tenants/bob/styles/ink.safetensors", "../tenants/bob/styles/ink.safetensors"):
        refused = app.post("/flux-lora", json={**ink, "lora_name": name}, headers=ACME)
        assert status_of(refused) == (404, "lora_not_found"), refused.text
    merge = {"inputs": [{"name": "tenants/bob/styles/ink.safetensors"}], "output": "m.safetensors"}
    assert status_of(app.post("/loras/merge", json=merge, headers=ACME))[0] == 404

    # Overwrite: Acme's PUT of the name writes Acme's own file; Bob's full path is refused.
    put = app.put("/loras/styles/ink.safetensors", content=shared_ink, headers=ACME)
    assert put.status_code == 201, put.text
    over = app.put(
        "/loras/tenants/bob/styles/ink.safetensors?overwrite=true", content=shared_ink, headers=ACME
    )
    assert status_of(over) == (422, "invalid_request")
    assert (lora_root / "tenants/bob/styles/ink.safetensors").read_bytes() == bobs

    # Delete: Acme removes its own only; then Bob's is still not Acme's to find; shared is 403.
    assert app.delete("/loras/styles/ink.safetensors", headers=ACME).status_code == 200
    assert app.delete("/loras/styles/ink.safetensors", headers=ACME).status_code == 403  # shared
    assert status_of(app.delete("/loras/tenants/bob/styles/ink.safetensors", headers=ACME)) == (
        404,
        "lora_not_found",
    )
    assert (lora_root / "tenants/bob/styles/ink.safetensors").read_bytes() == bobs
    assert (lora_root / "styles/ink.safetensors").read_bytes() == shared_ink


@pytest.mark.slow
def test_one_tenant_cannot_reach_anothers_upload(app):
    start = {"filename": "big.safetensors", "total_size": 64, "sha256": "0" * 64}
    started = app.post("/loras/uploads", json=start, headers=BOB)
    assert started.status_code == 201, started.text
    upload = f"/loras/uploads/{started.json()['upload_id']}"
    assert app.get(upload, headers=ACME).status_code == 404
    assert app.put(f"{upload}?offset=0", content=b"x", headers=ACME).status_code == 404
    assert app.post(f"{upload}/complete", headers=ACME).status_code == 404
    assert app.delete(upload, headers=ACME).status_code == 404
    assert app.get(upload, headers=BOB).json()["offset"] == 0
    assert app.delete(upload, headers=ROOT).status_code == 200


@pytest.mark.slow
def test_one_tenant_cannot_read_overwrite_or_delete_anothers_dataset(app):
    datasets = app.folder / "datasets"
    assert app.put("/datasets/cats", json=dataset_body("bob's"), headers=BOB).status_code == 201
    assert app.put("/datasets/shared", json=dataset_body("all"), headers=ROOT).status_code == 201
    assert status_of(app.get("/datasets/cats", headers=ACME)) == (404, "not_found")
    assert app.get("/datasets/tenants/bob/cats", headers=ACME).status_code == 404
    assert app.delete("/datasets/cats", headers=ACME).status_code == 404
    assert app.delete("/datasets/tenants/bob/cats", headers=ACME).status_code == 404
    assert app.put("/datasets/cats", json=dataset_body("acme's"), headers=ACME).status_code == 201
    assert app.get("/datasets/cats", headers=BOB).json()["images"][0]["caption"] == "bob's"
    assert app.get("/datasets/cats", headers=ACME).json()["images"][0]["caption"] == "acme's"
    assert (datasets / "tenants/bob/cats/i0.txt").read_text() == "bob's"
    assert app.get("/datasets/shared", headers=ACME).status_code == 200
    assert status_of(app.delete("/datasets/shared", headers=ACME)) == (403, "forbidden")
    assert app.delete("/datasets/cats", headers=ACME).status_code == 200
    assert (datasets / "tenants/bob/cats/i0.png").exists()
    # A key without a tenant replaces neither a tenant's folder nor every tenant's.
    for name in ("tenants", "tenants/bob"):
        refused = app.put(f"/datasets/{name}", json=dataset_body("x"), headers=ROOT)
        assert status_of(refused) == (409, "conflict"), refused.text


@pytest.mark.slow
def test_one_tenant_cannot_see_or_stop_anothers_job(app):
    assert app.put("/datasets/dogs", json=dataset_body("zxq", 2), headers=BOB).status_code == 201
    body = {
        "base_model": "flux",
        "dataset": "dogs",
        "output_name": "dog-style",
        "config": {"rank": 4, "resolution": 64, "max_train_steps": 100_000, "num_workers": 1},
    }
    submitted = app.post("/train", json=body, headers=BOB)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["job_id"]
    try:
        for path in ("", "/logs", "/loss.png", "/samples/s0.png"):
            assert status_of(app.get(f"/train/{job_id}{path}", headers=ACME)) == (404, "not_found")
        assert app.delete(f"/train/{job_id}", headers=ACME).status_code == 404
        assert job_id not in [
            job["job_id"] for job in app.get("/train", headers=ACME).json()["jobs"]
        ]
        assert job_id in [job["job_id"] for job in app.get("/train", headers=BOB).json()["jobs"]]
        status = app.get(f"/train/{job_id}", headers=BOB).json()
        assert (status["lora_name"], status["tenant"]) == ("dog-style.safetensors", "bob")
        # It reads Bob's dataset and publishes into Bob's folder of the LoRA root.
        job = json.loads((app.folder / "train" / job_id / "job.json").read_text())
        assert job["dataset"] == "tenants/bob/dogs"
        assert job["lora_root"].endswith("/tenants/bob")
        # Acme cannot train on Bob's dataset either.
        refused = app.post("/train", json={**body, "output_name": "mine"}, headers=ACME)
        assert refused.status_code == 422 and "dataset: no such dataset: dogs" in refused.text
    finally:
        assert app.delete(f"/train/{job_id}", headers=BOB).status_code == 200
