"""Create a snapshot from a memory file, then rebuild the file from the
store through the C decoder: byte for byte, for every shape of image."""

from __future__ import annotations

import os

import pytest

from restore.errors import ChunkMissing
from restore.manifest import Manifest
from restore.objects import chunk_key
from restore.sample import write_sample_image
from restore.snapshot import Snapshot, create_snapshot, describe, list_snapshots
from restore.tiers.durable import DurableStore
from restore.tiers.l1 import L1Cache

CHUNK = 64 * 1024


def _image(path, shape: str) -> bytes:
    size = 40 * CHUNK
    if shape == "all_zero":
        data = bytes(size)
    elif shape == "all_random":
        data = os.urandom(size)
    elif shape == "mixed":
        write_sample_image(path, size, seed=3)
        return path.read_bytes()
    elif shape == "not_chunk_multiple":
        write_sample_image(path, size + 5 * 4096, seed=4)
        return path.read_bytes()
    else:
        raise AssertionError(shape)
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
@pytest.mark.parametrize("shape", ["all_zero", "all_random", "mixed", "not_chunk_multiple"])
def test_round_trip(tmp_path, store, key, shape, encrypted):
    img = tmp_path / "mem.img"
    data = _image(img, shape)
    k = key if encrypted else None
    seen = []
    m = create_snapshot(store, img, "vm", chunk_size=CHUNK, key=k, workers=2, progress=seen.append)
    assert sum(seen) == len(data)
    assert m.version == "1" and m.memory_size == len(data) and m.encrypted == encrypted
    assert len(m.chunks) == -(-len(data) // CHUNK)

    # The manifest in the store parses back to the same thing.
    again = Manifest.parse(store.get(m.key), "x")
    assert again.to_json() == m.to_json()

    out = bytearray(len(data))
    with Snapshot.open(store, "vm", key=k) as snap:
        snap.read_into(out)
        assert snap.verify() == []
    assert out == data

    if shape == "all_zero":
        assert all(c.id is None for c in m.chunks)
        assert list(store.list("chunks/")) == []


def test_export_writes_the_file_and_fills_l1(tmp_path, store, mixed_image):
    create_snapshot(store, mixed_image, "vm", chunk_size=CHUNK)
    l1 = L1Cache(tmp_path / "l1")
    out = tmp_path / "out.img"
    with Snapshot.open(store, "vm", l1=l1) as snap:
        snap.export(out)
        ids = {c.id for c in snap.manifest.chunks if c.id}
    assert out.read_bytes() == mixed_image.read_bytes()
    assert all(l1.contains(i) for i in ids)
    assert not (tmp_path / "out.img.restore-tmp").exists()

    # A second export is served from L1 even with the store's chunks gone.
    for i in ids:
        store.delete(chunk_key(i))
    out.unlink()
    with Snapshot.open(store, "vm", l1=l1) as snap:
        snap.export(out)
    assert out.read_bytes() == mixed_image.read_bytes()


def test_export_of_a_snapshot_with_a_lost_chunk_fails_and_leaves_nothing(tmp_path, store, mixed_image):
    """A chunk gone from the store ends the export with its name; the
    file is not written, and its temporary is gone."""
    m = create_snapshot(store, mixed_image, "vm", chunk_size=CHUNK)
    lost = [c.id for c in m.chunks if c.id][len(m.chunks) // 4]
    store.delete(chunk_key(lost))
    out = tmp_path / "out.img"
    with Snapshot.open(store, "vm") as snap:
        with pytest.raises(ChunkMissing, match=lost):
            snap.export(out, workers=2)
    assert not out.exists() and not (tmp_path / "out.img.restore-tmp").exists()


def test_zero_pages_are_never_stored(tmp_path, store):
    img = tmp_path / "mem.img"
    data = bytearray(4 * CHUNK)
    data[5 * 4096 : 6 * 4096] = os.urandom(4096)  # one page in chunk 0
    img.write_bytes(data)
    m = create_snapshot(store, img, "vm", chunk_size=CHUNK)
    assert [c.id is None for c in m.chunks] == [False, True, True, True]
    assert m.chunks[0].zero == bytes([0b11011111, 0xFF])
    assert 4096 <= m.chunks[0].stored_len <= 4096 + 32  # one page, stored raw (random)
    d = describe(store, m)
    assert d["zero_pages"] == 4 * 16 - 1 and d["objects"] == 1 and d["zero_chunks"] == 3


def test_dedup_within_and_across_snapshots(tmp_path, store):
    img = tmp_path / "mem.img"
    block = os.urandom(CHUNK)
    img.write_bytes(block * 3 + bytes(CHUNK) + os.urandom(CHUNK))
    m1 = create_snapshot(store, img, "vm", chunk_size=CHUNK)
    assert len({c.id for c in m1.chunks if c.id}) == 2
    assert len(list(store.list("chunks/"))) == 2
    d1 = describe(store, m1)
    assert d1["dedup_within_bytes"] == 2 * m1.chunks[0].stored_len
    assert m1.uploaded_bytes == d1["stored_bytes"] and d1["dedup_across_bytes"] == 0

    # Another snapshot (another name) of the same memory uploads nothing new.
    m2 = create_snapshot(store, img, "other", chunk_size=CHUNK)
    assert m2.uploaded_bytes == 0
    assert describe(store, m2)["dedup_across_bytes"] == d1["stored_bytes"]
    assert len(list(store.list("chunks/"))) == 2


def test_versions_are_numbered_and_listed(tmp_path, store, mixed_image):
    for _ in range(3):
        create_snapshot(store, mixed_image, "vm", chunk_size=CHUNK)
    create_snapshot(store, mixed_image, "vm", "blue", chunk_size=CHUNK)
    create_snapshot(store, mixed_image, "a-first", chunk_size=CHUNK)
    refs = [(r.name, r.version, r.state) for r in list_snapshots(store)]
    assert refs == [
        ("a-first", "1", "ACTIVE"),
        ("vm", "1", "ACTIVE"),
        ("vm", "2", "ACTIVE"),
        ("vm", "3", "ACTIVE"),
        ("vm", "blue", "ACTIVE"),
    ]
    # The newest ACTIVE version opens by default: numeric order, named last.
    with Snapshot.open(store, "vm") as snap:
        assert snap.manifest.version == "blue"
    assert not list(store.list("snapshots/vm/1/pending"))


def test_memory_store_and_many_workers(tmp_path, mixed_image):
    store = DurableStore("memory://")
    m = create_snapshot(store, mixed_image, "vm", chunk_size=4096, workers=3, uploads=1)
    with Snapshot.open(store, "vm") as snap:
        out = bytearray(m.memory_size)
        snap.read_into(out, workers=3)
    assert out == mixed_image.read_bytes()


def test_fill_l1_copies_every_object_once(tmp_path, store, mixed_image):
    m = create_snapshot(store, mixed_image, "vm", chunk_size=CHUNK)
    l1 = L1Cache(tmp_path / "l1")
    with Snapshot.open(store, "vm") as snap:
        assert snap.fill_l1(l1) == len({c.id for c in m.chunks if c.id})
        assert snap.fill_l1(l1) == 0  # already there
    assert all(l1.get(c.id) == store.get(chunk_key(c.id)) for c in m.chunks if c.id)
