"""A diff memory file laid over a base version (`snapshot create --base`):
the pages dirtied since the base, the rest holes, as Firecracker's Diff
snapshot writes it. The new version is the memory the diff stands for, the
very version a dense file of that memory gives; a chunk with no dirty page
is the base's, unread; a chunk all dirty does not read the base."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from restore.errors import InputError, MemoryFileError, MissingKey, SnapshotNotFound
from restore.layout import optimize_snapshot
from restore.objects import chunk_key
from restore.snapshot import Snapshot, _check_holes_told, create_snapshot, data_extents, list_snapshots
from restore.tiers.durable import DurableStore

P = 4096
C = 64 * 1024
SIZE = 10 * C + 3 * P  # a short last chunk


@pytest.fixture(scope="module")
def base_image(make_image):
    return make_image(SIZE, seed=11, zero=0.3, random=0.3)


def _dirty(base: bytes) -> dict[int, bytes]:
    """Pages dirtied since the base, by offset."""
    rng = np.random.default_rng(12)
    pages = {
        2 * C + 5 * P: rng.bytes(P),  # one page in the middle of chunk 2
        7 * C - P: rng.bytes(P),  # the last page of chunk 6 and the first of 7
        7 * C: rng.bytes(P),
        10 * C + P: rng.bytes(P),  # in the short last chunk
        8 * C + 2 * P: bytes(P),  # a page dirtied back to zero
    }
    pages.update({4 * C + k * P: rng.bytes(P) for k in range(C // P)})  # chunk 4, every page
    assert all(base[o:o + P] != d for o, d in pages.items()), "a dirty page must differ from the base's"
    return pages


def _write_diff(path, pages: dict[int, bytes]) -> None:
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for offset, data in pages.items():
            f.seek(offset)
            f.write(data)


class _CountingStore(DurableStore):
    """A real file store that records the chunk objects read from it."""

    def __init__(self, url: str):
        super().__init__(url)
        self.got: list[str] = []

    def get(self, key):
        if key.startswith("chunks/"):
            self.got.append(key)
        return super().get(key)


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "aes"])
def test_a_diff_over_its_base_is_the_memory_it_stands_for(tmp_path, base_image, key, encrypted):
    k = key if encrypted else None
    base = base_image.read_bytes()
    dirty = _dirty(base)
    diff, dense = tmp_path / "diff.mem", tmp_path / "dense.mem"
    _write_diff(diff, dirty)
    with open(diff, "rb") as f:  # the file system keeps the clean pages as holes
        assert sum(e - s for s, e in data_extents(f.fileno(), SIZE)) == len(dirty) * P
    now = bytearray(base)
    for offset, data in dirty.items():
        now[offset:offset + P] = data
    dense.write_bytes(now)

    store = _CountingStore(f"file://{tmp_path / 'store'}")
    v1 = create_snapshot(store, base_image, "fn", chunk_size=C, key=k)
    store.got.clear()
    v2 = create_snapshot(store, diff, "fn", base="1", key=k)
    # The base is read for the chunks with dirty pages and clean ones, only.
    expected = {chunk_key(v1.chunks[i].id) for i in (2, 6, 7, 8, 10) if v1.chunks[i].id}
    assert set(store.got) == expected, sorted(store.got)
    assert len(store.got) == len(expected)  # each once
    for i in (0, 1, 3, 5, 9):  # no dirty page: the base's chunk as it is
        assert v2.chunks[i] == v1.chunks[i]
    with Snapshot.open(store, "fn", "2", key=k) as snap:
        out = bytearray(SIZE)
        snap.read_into(out)
    assert out == now
    # The very version a dense file of the same memory gives.
    v3 = create_snapshot(DurableStore(f"file://{tmp_path / 'dense-store'}"), dense, "fn", chunk_size=C, key=k)
    assert v2.chunks == v3.chunks and v2.memory_size == v3.memory_size


def test_the_chunk_size_comes_from_the_base(tmp_path, base_image, run_cli):
    store = f"file://{tmp_path / 'store'}"
    run_cli("snapshot", "create", str(base_image), "--name", "fn", "--chunk-size", "64K", "--store", store,
            check=True)
    _write_diff(tmp_path / "diff.mem", {3 * P: os.urandom(P)})
    out = run_cli("snapshot", "create", str(tmp_path / "diff.mem"), "--name", "fn", "--base", "1", "--store", store,
                  check=True)
    assert out.stdout.startswith("created fn/2")
    assert DurableStore(store).exists("snapshots/fn/2/manifest.json")
    with Snapshot.open(DurableStore(store), "fn", "2") as snap:
        assert snap.manifest.chunk_size == C
    bad = run_cli("snapshot", "create", str(tmp_path / "diff.mem"), "--name", "fn", "--base", "1", "--chunk-size",
                  "128K", "--store", store)
    assert bad.returncode != 0
    assert "chunk size 131072 differs from base fn/1's 65536" in bad.stderr


def test_a_base_that_does_not_fit_is_refused(tmp_path, base_image, key):
    store = DurableStore(f"file://{tmp_path / 'store'}")
    diff = tmp_path / "diff.mem"
    _write_diff(diff, {0: os.urandom(P)})
    with pytest.raises(SnapshotNotFound):
        create_snapshot(store, diff, "fn", base="1")
    create_snapshot(store, base_image, "fn", chunk_size=C)  # fn/1, plain
    with pytest.raises(InputError, match=re.escape("base fn/1 is not encrypted")):
        create_snapshot(store, diff, "fn", base="1", key=key)
    short = tmp_path / "short.mem"
    with open(short, "wb") as f:
        f.truncate(SIZE - C)
    with pytest.raises(InputError, match=re.escape(f"the memory file is {SIZE - C} bytes, base fn/1 holds {SIZE}")):
        create_snapshot(store, short, "fn", base="1")
    with Snapshot.open(store, "fn", "1") as snap:  # fn/2: laid out by a page map
        optimize_snapshot(snap, plan=np.arange(0, 20 * P, P, dtype=np.uint64))
    with pytest.raises(InputError, match=re.escape("base fn/2 is laid out by a page map")):
        create_snapshot(store, diff, "fn", base="2")
    create_snapshot(store, base_image, "sec", chunk_size=C, key=key)
    with pytest.raises(MissingKey):
        create_snapshot(store, diff, "sec", base="1")
    # Nothing refused left a version or a claim behind.
    assert [(r.name, r.version, r.state) for r in list_snapshots(store)] == [
        ("fn", "1", "ACTIVE"), ("fn", "2", "ACTIVE"), ("sec", "1", "ACTIVE")]


def test_a_diff_on_a_file_system_that_hides_its_holes_is_refused(tmp_path):
    diff = tmp_path / "diff.mem"
    _write_diff(diff, {2 * C: os.urandom(P)})
    with open(diff, "rb") as f:  # here the file system tells them apart: no complaint
        _check_holes_told(diff, data_extents(f.fileno(), SIZE), os.fstat(f.fileno()).st_blocks * 512)
    # One that reports the whole file as data (NFSv3, vfat: generic
    # SEEK_DATA) while a single page is allocated.
    with pytest.raises(MemoryFileError, match=re.escape(f"reports {SIZE} bytes of data in {P} bytes allocated")):
        _check_holes_told(diff, [(0, SIZE)], P)
