"""Sparse memory files: holes are read as zero chunks without being read,
and give the very manifest the dense file gives; export leaves holes."""

from __future__ import annotations

import os

import numpy as np
import pytest

from restore.snapshot import Snapshot, create_snapshot, data_extents, hole_chunks
from restore.tiers.durable import DurableStore

P = 4096
C = 64 * 1024  # small chunks: many of them, with holes of several chunks


def _write(path, size: int, pieces: dict[int, bytes]) -> None:
    """A sparse file of size bytes holding pieces at their offsets, holes elsewhere."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in pieces.items():
            f.seek(offset)
            f.write(data)


def _dense_copy(src, dst) -> None:
    with open(src, "rb") as f, open(dst, "wb") as g:
        g.write(f.read())  # every byte written: no holes
    with open(dst, "rb") as g:
        assert data_extents(g.fileno(), os.path.getsize(dst)) == [(0, os.path.getsize(dst))]


LAYOUTS = {
    # data in a few places, holes of whole chunks between them
    "holes between": (40 * C, {3 * C: os.urandom(2 * C), 20 * C + 5 * P: os.urandom(3 * P)}),
    # a few bytes in the middle of a page inside a long hole
    "bytes mid-page": (16 * C, {7 * C + 3 * P + 1000: b"\x01" * 17}),
    # holes at the start and the end; a size that is not a multiple of the chunk size
    "holes at both ends, short last chunk": (10 * C + 3 * P, {4 * C + P: os.urandom(C)}),
    # no data at all
    "all hole": (8 * C, {}),
    # data up to the very end, in the short last chunk
    "data in the short last chunk": (5 * C + 2 * P, {5 * C + P: os.urandom(P)}),
}


@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_sparse_and_dense_files_give_the_same_manifest(tmp_path, layout):
    size, pieces = LAYOUTS[layout]
    sparse, dense = tmp_path / "sparse.img", tmp_path / "dense.img"
    _write(sparse, size, pieces)
    _dense_copy(sparse, dense)
    with open(sparse, "rb") as f:
        holes = hole_chunks(data_extents(f.fileno(), size), size, C)
    # The file system tells the holes apart: chunks without data are holes.
    touched = {o // C for o, d in pieces.items() for o in range(o, o + len(d), P)} | {
        (o + len(d) - 1) // C for o, d in pieces.items()}
    assert set(np.flatnonzero(~holes)) == touched
    store = DurableStore(f"file://{tmp_path}/store")
    a = create_snapshot(store, sparse, "sparse", chunk_size=C)
    b = create_snapshot(store, dense, "dense", chunk_size=C)
    assert a.chunks == b.chunks  # ids, lengths, flags and zero bitmaps
    assert a.memory_size == b.memory_size == size
    out = tmp_path / "out.img"
    with Snapshot.open(store, "sparse") as s:
        s.export(out)
    assert out.read_bytes() == dense.read_bytes()


def test_encrypted_sparse_snapshot_reads_back_the_bytes(tmp_path):
    size, pieces = LAYOUTS["holes between"]
    sparse = tmp_path / "sparse.img"
    _write(sparse, size, pieces)
    key = os.urandom(32)
    store = DurableStore(f"file://{tmp_path}/store")
    m = create_snapshot(store, sparse, "enc", chunk_size=C, key=key)
    with open(sparse, "rb") as f:
        holes = hole_chunks(data_extents(f.fileno(), size), size, C)
    assert [c.id is None for c in m.chunks] == list(holes)
    out = tmp_path / "out.img"
    with Snapshot.open(store, "enc", key=key) as s:
        s.export(out)
    assert out.read_bytes() == sparse.read_bytes()


def test_export_leaves_holes_where_zero_pages_are(tmp_path):
    size, pieces = LAYOUTS["holes between"]
    dense = tmp_path / "dense.img"
    _write(tmp_path / "sparse.img", size, pieces)
    _dense_copy(tmp_path / "sparse.img", dense)  # every byte written, the zeros too
    store = DurableStore(f"file://{tmp_path}/store")
    create_snapshot(store, dense, "vm", chunk_size=C)
    out = tmp_path / "out.img"
    with Snapshot.open(store, "vm") as s:
        s.export(out)
    assert out.read_bytes() == dense.read_bytes()
    with open(out, "rb") as f:
        extents = data_extents(f.fileno(), size)
    # Only pages with data hold blocks: the extents cover exactly the
    # pages the pieces touch.
    stored = sum(end - start for start, end in extents)
    pages = {o // P for off, d in pieces.items() for o in range(off, off + len(d))}
    assert stored == len(pages) * P
