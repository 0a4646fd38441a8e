"""Snapshot creation throughput: a 1 GiB half-zero image on every core.

Each round creates a new snapshot in a fresh store, so nothing is
deduplicated against earlier rounds. Before a file:// round the previous
round's store is removed and dirty pages are flushed (untimed), so kernel
writeback of earlier rounds does not compete for the two cores.
`encode only` runs the same C encoder over the image without a store, to
show how much of the time is the codec.

After the timed rounds each benchmark checks its output once: the last
round's snapshot read back in full (Snapshot.read_into) must equal the
image byte for byte, or the last round's chunk entries must be what
encoding each chunk again gives, and its stored bytes decode to it.
"""

from __future__ import annotations

import itertools
import os
import shutil

import pytest

from bench.create_speed import check_encoded, encode_all
from restore.codec import ChunkCodec
from restore.snapshot import Snapshot, create_snapshot, data_extents
from restore.tiers.durable import DurableStore

CHUNK = 512 * 1024
_n = itertools.count()


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "aes"])
@pytest.mark.parametrize("kind", ["file", "memory"])
def test_bench_create_1gib(benchmark, tmp_path, mixed_gib, kind, encrypted):
    key = bytes(32) if encrypted else None
    size = mixed_gib.stat().st_size
    stores = []

    def setup():
        stores.clear()  # a memory:// store holds its chunks: keep only the last round's
        if kind == "memory":
            stores.append(DurableStore("memory://"))
        else:
            for old in tmp_path.glob("store*"):
                shutil.rmtree(old)
            os.sync()
            stores.append(DurableStore(f"file://{tmp_path}/store{next(_n)}"))
        return (stores[-1],), {}

    benchmark.extra_info.update(bytes=size, label=f"create from a 1 GiB half-zero image, {kind}://")
    benchmark.pedantic(
        lambda store: create_snapshot(store, mixed_gib, "bench", key=key), setup=setup, rounds=5, iterations=1
    )
    out = bytearray(size)
    with Snapshot.open(stores[-1], "bench", key=key) as snap:
        snap.read_into(out)
    assert out == mixed_gib.read_bytes(), "the snapshot does not read back as the image"


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "aes"])
def test_bench_encode_only_1gib(benchmark, mixed_gib, encrypted):
    """The C encoder alone over the whole image, one thread per core."""
    key = bytes(32) if encrypted else None
    data = mixed_gib.read_bytes()
    codec = ChunkCodec(CHUNK, 4096, key)
    benchmark.extra_info.update(bytes=len(data), label="encode only (the C encoder, one thread per core)")
    entries = benchmark.pedantic(encode_all, args=(codec, data), rounds=3, iterations=1)  # the last round's
    check_encoded(codec, data, entries)


SPARSE_SIZE = 16 << 30  # a guest with most of its memory free
SPARSE_DATA = 64 << 20  # at its start: half random, half text-like


@pytest.fixture(scope="module")
def sparse_16gib(tmp_path_factory):
    """16 GiB memory file whose first 64 MiB hold data, the rest a hole."""
    path = tmp_path_factory.mktemp("sparse") / "mem.img"
    with open(path, "wb") as f:
        f.truncate(SPARSE_SIZE)
        f.write(os.urandom(SPARSE_DATA // 2))
        f.write(b"text-like " * (SPARSE_DATA // 2 // 10) + bytes(SPARSE_DATA // 2 % 10))
    return path


def test_bench_create_sparse_16gib(benchmark, tmp_path, sparse_16gib):
    """Holes are not read: the cost is the 64 MiB of data."""
    stores = []

    def setup():
        stores.clear()
        stores.append(DurableStore("memory://"))
        return (stores[-1],), {}

    benchmark.extra_info.update(bytes=SPARSE_SIZE,
                                label="create from a 16 GiB sparse file with 64 MiB of data, memory://")
    benchmark.pedantic(lambda store: create_snapshot(store, sparse_16gib, "bench"), setup=setup, rounds=5,
                       iterations=1)
    out = tmp_path / "out.img"
    with Snapshot.open(stores[-1], "bench") as snap:
        snap.export(out)
    with open(out, "rb") as f, open(sparse_16gib, "rb") as g:
        assert f.read(SPARSE_DATA) == g.read(SPARSE_DATA), "the data does not read back"
        assert data_extents(f.fileno(), SPARSE_SIZE) == [(0, SPARSE_DATA)], "the export is not sparse"
