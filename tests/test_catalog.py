"""`GET /loras`'s catalog (serve/loras/catalog.py): each file version is inspected once, and
the index in the root's hidden folder spares another ingress replica, or a restart, from
reading every file again. Served end to end in test_lora_api.py."""

from __future__ import annotations

import json

import pytest
import torch

from deployments.loras.store import LoraStore
from deployments.loras.synthetic import write_lora
from serve.loras.catalog import INDEX_FILE, INDEX_FORMAT, Catalog


def lora(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "transformer.a.to_q.lora_A.weight": torch.randn(4, 16, generator=generator),
        "transformer.a.to_q.lora_B.weight": torch.randn(16, 4, generator=generator),
    }


@pytest.fixture
def root(tmp_path):
    folder = tmp_path / "loras"
    for index in range(3):
        write_lora(folder / f"character-{index}.safetensors", lora(index))
    return folder


class CountedStore(LoraStore):
    """A store that counts the files it reads whole."""

    reads = 0

    def read_bytes(self, ref):
        self.reads += 1
        return super().read_bytes(ref)


def test_a_second_catalog_lists_from_the_index_without_reading_files(root):
    first_store = CountedStore(str(root))
    first = Catalog(first_store).entries()
    assert first_store.reads == 3 and len(first) == 3
    assert (root / ".loraplex" / INDEX_FILE).exists()
    other_store = CountedStore(str(root))  # another ingress replica, or a restart
    assert Catalog(other_store).entries() == first
    assert other_store.reads == 0
    assert ".loraplex/catalog.json" not in {entry["name"] for entry in first}


def test_a_file_one_replica_inspected_is_not_read_again_by_another(root, caplog):
    first_store, other_store = CountedStore(str(root)), CountedStore(str(root))
    first, other = Catalog(first_store), Catalog(other_store)
    first.entries()
    other.entries()
    assert (first_store.reads, other_store.reads) == (3, 0)
    write_lora(root / "character-new.safetensors", lora(9))  # a training job publishes one
    assert len(first.entries()) == 4 and first_store.reads == 4
    assert other.entries() == first.entries()
    assert other_store.reads == 0  # from the index the first one wrote
    # Listing again with nothing new reads neither the files nor the index (which would warn).
    (root / ".loraplex" / INDEX_FILE).write_text("not json")
    assert len(other.entries()) == 4 and other_store.reads == 0
    assert "unreadable" not in caplog.text


def test_a_changed_file_is_inspected_again_and_a_deleted_one_leaves_the_index(root):
    Catalog(LoraStore(str(root))).entries()
    write_lora(root / "character-0.safetensors", {**lora(7), **lora(8)})
    (root / "character-2.safetensors").unlink()
    store = CountedStore(str(root))
    names = {entry["name"]: entry for entry in Catalog(store).entries()}
    assert store.reads == 1  # character-0's new version only
    assert set(names) == {"character-0.safetensors", "character-1.safetensors"}
    index = json.loads((root / ".loraplex" / INDEX_FILE).read_text())
    assert {entry["name"] for entry in index["entries"].values()} == set(names)


# Format 1 is an index from before entries carried `kind`: rebuilt, as any other format.
@pytest.mark.parametrize(
    "content",
    ["{not json", '{"format": 99, "entries": {}}', '{"format": 1, "entries": {}}', "[1, 2]"],
)
def test_an_unreadable_index_is_rebuilt(root, content):
    (root / ".loraplex").mkdir()
    (root / ".loraplex" / INDEX_FILE).write_text(content)
    store = CountedStore(str(root))
    assert len(Catalog(store).entries()) == 3 and store.reads == 3
    assert json.loads((root / ".loraplex" / INDEX_FILE).read_text())["format"] == INDEX_FORMAT


def test_a_root_that_cannot_take_the_index_still_lists(root, monkeypatch, caplog):
    store = LoraStore(str(root))

    def refuse(path, data):
        raise PermissionError("read-only root")

    monkeypatch.setattr(store, "write_staged", refuse)
    catalog = Catalog(store)
    assert len(catalog.entries()) == 3
    assert "index not written" in caplog.text
    assert not (root / ".loraplex").exists()
    caplog.clear()
    assert len(catalog.entries()) == 3
    assert "index not written" not in caplog.text  # not tried again while nothing changed
