"""Snapshot creation throughput: a 1 GiB half-zero image on every core.

Each round creates a new snapshot in a fresh store, so nothing is
deduplicated against earlier rounds. Before a file:// round the previous
round's store is removed and dirty pages are flushed (untimed), so kernel
writeback of earlier rounds does not compete for the two cores.
`encode only` runs the same C encoder over the image without a store, to
show how much of the time is the codec.
"""

from __future__ import annotations

import itertools
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from restore.codec import ChunkCodec
from restore.snapshot import create_snapshot
from restore.tiers.durable import DurableStore

CHUNK = 512 * 1024
_n = itertools.count()


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "aes"])
@pytest.mark.parametrize("kind", ["file", "memory"])
def test_bench_create_1gib(benchmark, tmp_path, mixed_gib, kind, encrypted):
    key = bytes(32) if encrypted else None
    size = mixed_gib.stat().st_size

    def setup():
        if kind == "memory":
            return (DurableStore("memory://"),), {}
        for old in tmp_path.glob("store*"):
            shutil.rmtree(old)
        os.sync()
        return (DurableStore(f"file://{tmp_path}/store{next(_n)}"),), {}

    benchmark.extra_info["bytes"] = size
    benchmark.pedantic(
        lambda store: create_snapshot(store, mixed_gib, "bench", key=key), setup=setup, rounds=5, iterations=1
    )


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "aes"])
def test_bench_encode_only_1gib(benchmark, mixed_gib, encrypted):
    """The C encoder alone over the whole image, one thread per core."""
    key = bytes(32) if encrypted else None
    data = mixed_gib.read_bytes()
    view = memoryview(data)
    codec = ChunkCodec(CHUNK, 4096, key)
    workers = os.cpu_count() or 1

    def encode_all():
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda i: codec.encode(view[i : i + CHUNK]), range(0, len(data), CHUNK)))

    benchmark.extra_info["bytes"] = len(data)
    benchmark.pedantic(encode_all, rounds=3, iterations=1)
