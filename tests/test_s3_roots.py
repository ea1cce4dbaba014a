"""Roots on S3, through s3fs, against an S3 API served on 127.0.0.1 (moto's server).

What another process writes (a training job publishing a LoRA, the other ingress replica taking
an upload, a job updating its status) must be seen at once, even by a process that listed the
folder before; and replicas read the LoRA root through the node cache
(deployments/loras/root_cache.py).
"""

from __future__ import annotations

import logging
import os
import socket

import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

BUCKET = "loraplex-test"


@pytest.fixture(scope="module")
def writer():
    """An S3 API on a free 127.0.0.1 port, a bucket on it, and an s3fs client of its own
    standing for another process that writes to the roots."""
    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per S3 call
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        client = s3fs.S3FileSystem(skip_instance_cache=True)
        client.mkdir(BUCKET)
        yield client
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


def test_lora_files_written_elsewhere_are_seen_at_once(writer):
    from deployments.loras.store import LoraStore

    writer.pipe(f"{BUCKET}/loras/a.safetensors", b"first")
    store = LoraStore(f"s3://{BUCKET}/loras")
    assert [ref.name for ref, _ in store.list_files()] == ["a.safetensors"]  # a listing, kept
    before = store.resolve("a.safetensors")

    writer.pipe(f"{BUCKET}/loras/a.safetensors", b"second, longer")
    writer.pipe(f"{BUCKET}/loras/character-new.safetensors", b"trained")
    after = store.resolve("a.safetensors")
    assert after.key != before.key  # a new version: replicas load it afresh
    assert store.read_bytes(after) == b"second, longer"
    assert store.read_bytes(store.resolve("character-new.safetensors")) == b"trained"

    writer.rm(f"{BUCKET}/loras/character-new.safetensors")
    assert not store.exists("character-new.safetensors")


def test_an_s3_lora_root_is_read_through_the_node_cache(writer, tmp_path):
    from deployments.config import LoraRootCacheConfig
    from deployments.loras.root_cache import RootCache
    from deployments.loras.store import LoraStore

    writer.pipe(f"{BUCKET}/cached/style.safetensors", b"v1" * 1000)
    store = LoraStore(f"s3://{BUCKET}/cached")
    cache = RootCache(store, LoraRootCacheConfig(cache_dir=str(tmp_path / "node")))  # auto
    first = store.resolve("style.safetensors")
    assert cache.read_bytes(first) == b"v1" * 1000
    assert cache.read_bytes(first) == b"v1" * 1000
    writer.pipe(f"{BUCKET}/cached/style.safetensors", b"v2" * 1000)
    second = store.resolve("style.safetensors")
    assert cache.read_bytes(second) == b"v2" * 1000
    stats = cache.stats()
    assert (stats["downloads"], stats["hits"], stats["cached_files"]) == (2, 1, 2)


def test_a_training_status_written_elsewhere_is_read_fresh(writer):
    from cluster.train.config import RunStatus
    from cluster.train.progress import list_checkpoints, read_status

    run = f"s3://{BUCKET}/train/run-1"
    writer.pipe(f"{BUCKET}/train/run-1/checkpoints/checkpoint_0001/x", b"x")
    writer.pipe(f"{BUCKET}/train/run-1/status.json", RunStatus(state="RUNNING").model_dump_json())
    assert read_status(run).state == "RUNNING"
    assert list_checkpoints(run) == ["checkpoint_0001"]  # listings of the run's folders

    done = RunStatus(state="SUCCEEDED", step=100, total_steps=100, output_lora="x.safetensors")
    writer.pipe(f"{BUCKET}/train/run-1/status.json", done.model_dump_json())
    writer.pipe(f"{BUCKET}/train/run-1/checkpoints/checkpoint_0002/x", b"x")
    assert read_status(run) == done
    assert list_checkpoints(run) == ["checkpoint_0001", "checkpoint_0002"]


def test_the_lora_catalog_keeps_its_index_in_the_bucket(writer):
    from deployments.loras.store import LoraStore
    from serve.loras.catalog import Catalog

    class CountedStore(LoraStore):
        reads = 0

        def read_bytes(self, ref):
            self.reads += 1
            return super().read_bytes(ref)

    root = f"s3://{BUCKET}/catalog-loras"
    writer.pipe(f"{BUCKET}/catalog-loras/broken.safetensors", b"not a safetensors file")
    first = Catalog(LoraStore(root)).entries()
    assert [entry["name"] for entry in first] == ["broken.safetensors"]
    assert first[0]["error"]  # listed with its error, as any bad file
    assert writer.exists(f"{BUCKET}/catalog-loras/.loraplex/catalog.json")
    again = CountedStore(root)  # another ingress replica
    assert Catalog(again).entries() == first and again.reads == 0
