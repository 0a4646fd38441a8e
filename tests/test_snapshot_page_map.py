"""Readers honour a page map: a working-set-first layout built by hand
(pages packed out of offset order into chunks) reads back byte for byte,
and a damaged page map is refused."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

from restore.codec import ChunkCodec
from restore.errors import ManifestError
from restore.manifest import PAGE_MAP_DTYPE, ZERO_PAGE, Manifest, PageMapRef
from restore.objects import chunk_key
from restore.sample import write_sample_image
from restore.snapshot import Snapshot

P = 4096
CHUNK = 16 * P


def _build(store, image: bytes, key=None, seed=1):
    """Pack the image's non-zero pages in a shuffled 'first touch' order into
    chunks, upload them and a page map, and write the manifest."""
    pages = np.frombuffer(image, dtype=np.uint8).reshape(-1, P)
    nonzero = np.flatnonzero(pages.any(axis=1))
    order = np.random.default_rng(seed).permutation(nonzero)
    slots = CHUNK // P
    pm = np.zeros(len(pages), dtype=PAGE_MAP_DTYPE)
    pm["chunk"] = ZERO_PAGE
    pm["chunk"][order] = np.arange(len(order)) // slots
    pm["slot"][order] = np.arange(len(order)) % slots
    chunks = []
    with ChunkCodec(CHUNK, P, key) as codec:
        for c in range(-(-len(order) // slots)):
            raw = pages[order[c * slots : (c + 1) * slots]].tobytes()
            e = codec.encode(raw)
            if e.id:
                store.put(chunk_key(e.id), e.data)
            chunks.append(e.entry)
        blob = pm.tobytes()
        ref = PageMapRef(hashlib.sha256(blob).hexdigest(), len(pages))
        store.put(ref.key, blob)
        m = Manifest(
            name="ws", version="1", memory_size=len(image), chunk_size=CHUNK, page_size=P,
            chunks=chunks, key_check=codec.key_check, page_map=ref, created_at="2026-11-27T00:00:00Z",
        )
        if key:  # an encrypted snapshot's manifest is authenticated
            m.mac = codec.manifest_mac(m.signed_bytes())
    store.put(m.key, m.to_json())
    return m, pm, order


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_page_mapped_snapshot_reads_back(tmp_path, store, key, encrypted):
    img = tmp_path / "mem.img"
    write_sample_image(img, 64 * P + 3 * P, seed=11)
    image = img.read_bytes()
    k = key if encrypted else None
    m, pm, order = _build(store, image, k)
    # Parsing the written manifest keeps the page map reference.
    assert Manifest.parse(store.get(m.key), "x").page_map == m.page_map

    with Snapshot.open(store, "ws", key=k) as snap:
        assert (snap.page_map() == pm).all()
        out = bytearray(len(image))
        snap.read_into(out)
        assert out == image
        assert snap.verify() == []
        some = np.array([order[5], order[0], 3], dtype=np.uint64) * P
        assert snap.read_pages(some).tobytes() == b"".join(image[o : o + P] for o in map(int, some))
        # Chunk 0 holds the first touched page; its offset names that page.
        assert snap.chunk_offset(0) == int(order[: CHUNK // P].min()) * P
    with Snapshot.open(store, "ws", key=k) as snap:
        snap.export(tmp_path / "out.img")
    assert (tmp_path / "out.img").read_bytes() == image


def _rewrite_map(store, m: Manifest, pm: np.ndarray) -> None:
    blob = pm.tobytes()
    m.page_map = PageMapRef(hashlib.sha256(blob).hexdigest(), m.page_map.pages)
    store.put(m.page_map.key, blob)
    store.put(m.key, m.to_json())


def test_damaged_page_maps_are_refused(tmp_path, store):
    img = tmp_path / "mem.img"
    write_sample_image(img, 67 * P, seed=12)
    m, pm, order = _build(store, img.read_bytes())
    assert len(order) % 16  # the last chunk has empty slots
    where = f"page map {store.url}/{m.page_map.key}"

    # Bytes that do not match the id in the manifest.
    store.put(m.page_map.key, pm.tobytes()[:-8] + b"\0" * 8)
    with Snapshot.open(store, "ws") as snap:
        with pytest.raises(ManifestError, match=re.escape(f"{where}: SHA-256 of its bytes is not its id")):
            snap.page_map()

    # Missing entirely.
    store.delete(m.page_map.key)
    with Snapshot.open(store, "ws") as snap:
        with pytest.raises(ManifestError, match=re.escape(f"{where} is missing from the store")):
            snap.page_map()

    p0 = int(order[0])
    bad = pm.copy()
    bad["chunk"][p0] = 999
    _rewrite_map(store, m, bad)
    with Snapshot.open(store, "ws") as snap:
        with pytest.raises(ManifestError, match=re.escape(f"page {p0} names chunk 999, but there are {len(m.chunks)}")):
            snap.read_into(bytearray(m.memory_size))

    bad = pm.copy()
    bad["slot"][p0] = 16
    _rewrite_map(store, m, bad)
    with Snapshot.open(store, "ws") as snap:
        with pytest.raises(ManifestError, match=re.escape(f"page {p0} names slot 16, but chunks have 16")):
            snap.verify()

    # A page pointed at an empty slot of the last, partly filled chunk.
    last = len(m.chunks) - 1
    empty_slot = int(np.flatnonzero(np.unpackbits(np.frombuffer(m.chunks[last].zero, np.uint8), bitorder="little"))[0])
    bad = pm.copy()
    bad["chunk"][p0], bad["slot"][p0] = last, empty_slot
    _rewrite_map(store, m, bad)
    with Snapshot.open(store, "ws") as snap:
        with pytest.raises(ManifestError, match=re.escape(f"page {p0} names chunk {last} slot {empty_slot}, which is empty")):
            snap.page_map()

    bad_len = pm.tobytes()[:-8]
    m.page_map = PageMapRef(hashlib.sha256(bad_len).hexdigest(), m.page_map.pages)
    store.put(m.page_map.key, bad_len)
    store.put(m.key, m.to_json())
    with Snapshot.open(store, "ws") as snap:
        with pytest.raises(ManifestError, match=re.escape("is 528 bytes, expected 536 for 67 pages")):
            snap.page_map()
