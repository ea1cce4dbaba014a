"""Store writes and resumable-upload state, without Serve: local and fsspec `memory://` roots."""

from __future__ import annotations

import hashlib
import uuid

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from deployments.errors import Conflict, InvalidRequest, LoraNotFound, NotFound, TooLarge
from deployments.loras.files import parse_lora_file
from deployments.loras.store import LoraStore
from serve.loras.uploads import Uploads, UploadStart, state_json, with_metadata

DATA = save_safetensors({"x.lora_A.weight": torch.arange(12.0).reshape(3, 4)})


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    if request.param == "local":
        return LoraStore(str(tmp_path / "loras"))
    return LoraStore(f"memory://loras-{uuid.uuid4().hex}")


def start_for(data: bytes, filename: str = "up/one.safetensors") -> UploadStart:
    return UploadStart(
        filename=filename, total_size=len(data), sha256=hashlib.sha256(data).hexdigest()
    )


def test_write_list_delete_and_staging_is_never_listed(store):
    store.write("a.safetensors", b"aaa")
    store.write("sub/b.safetensors", b"bb")
    store.write_staged(store.staging_path("x", "c.safetensors"), b"c")
    assert [(ref.name, size) for ref, size in store.list_files()] == [
        ("a.safetensors", 3),
        ("sub/b.safetensors", 2),
    ]
    with pytest.raises(LoraNotFound, match="hidden"):
        store.resolve(".uploads/x/c.safetensors")
    store.delete("a.safetensors")
    assert not store.exists("a.safetensors")
    with pytest.raises(LoraNotFound):
        store.delete("a.safetensors")


def test_chunks_resume_from_the_stored_offset_and_assemble_checked(store):
    uploads = Uploads(store, max_lora_bytes=10**6, expiry_s=3600)
    upload_id = uploads.start(start_for(DATA)).upload_id
    uploads.append(upload_id, 0, DATA[:10])
    # Another process (a second ingress replica) sees the same state.
    again = Uploads(LoraStore(store.root_uri), max_lora_bytes=10**6, expiry_s=3600)
    assert again.state(upload_id).offset == 10
    with pytest.raises(Conflict, match="expected 10"):
        again.append(upload_id, 5, DATA[5:])
    with pytest.raises(Conflict, match="received 10 of"):
        again.assemble(upload_id)
    with pytest.raises(InvalidRequest, match="past total_size"):
        again.append(upload_id, 10, DATA[10:] + b"extra")
    again.append(upload_id, 10, DATA[10:])
    state, data = again.assemble(upload_id)
    assert data == DATA and state.start.filename == "up/one.safetensors"
    again.remove(upload_id)
    with pytest.raises(NotFound):
        again.state(upload_id)


def test_a_wrong_sha256_discards_the_upload(store):
    uploads = Uploads(store, max_lora_bytes=10**6, expiry_s=3600)
    start = start_for(DATA).model_copy(update={"sha256": "f" * 64})
    upload_id = uploads.start(start).upload_id
    uploads.append(upload_id, 0, DATA)
    with pytest.raises(InvalidRequest, match="sha256"):
        uploads.assemble(upload_id)
    with pytest.raises(NotFound):
        uploads.state(upload_id)


def test_limits_ids_and_expiry(store):
    uploads = Uploads(store, max_lora_bytes=100, expiry_s=60)
    with pytest.raises(TooLarge, match="total_size"):
        uploads.start(start_for(b"x" * 101))
    for bad_id in ("../etc", "0" * 31, "A" * 32):
        with pytest.raises(NotFound):
            uploads.state(bad_id)
    state = uploads.start(start_for(b"x" * 50))
    old = state.model_copy(update={"created_s": state.created_s - 120})
    store.write_staged(store.staging_path(state.upload_id, "upload.json"), state_json(old))
    uploads.remove_expired()
    with pytest.raises(NotFound):
        uploads.state(state.upload_id)


@pytest.mark.parametrize(
    "filename", ["../x.safetensors", "/x.safetensors", "x.bin", ".h/x.safetensors"]
)
def test_upload_filenames_stay_under_the_root(filename):
    with pytest.raises(InvalidRequest, match="^filename: "):
        start_for(DATA, filename)


def test_metadata_is_merged_into_the_header_and_tensors_are_untouched():
    data = save_safetensors({"x.lora_A.weight": torch.ones(2, 3)}, metadata={"keep": "1"})
    start = start_for(data).model_copy(update={"metadata": {"trigger_words": ["ab", "cd"]}})
    merged = with_metadata(data, start.file_metadata(), "x.safetensors")
    tensors, metadata = parse_lora_file(merged, "x.safetensors")
    assert metadata == {"keep": "1", "trigger_words": '["ab", "cd"]'}
    assert torch.equal(tensors["x.lora_A.weight"], load_safetensors(data)["x.lora_A.weight"])
    assert with_metadata(data, {}, "x.safetensors") == data
