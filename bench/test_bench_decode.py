"""C chunk decode throughput (hash check, decrypt, lz4, slot spreading) for
one 512 KiB chunk of each kind, single thread. Bytes are decoded bytes.
After the timed rounds the output buffer, filled with a non-zero byte
before the first, must hold the input chunk byte for byte."""

from __future__ import annotations

import os

import pytest

from restore.codec import ChunkCodec
from restore.sample import write_sample_image

CHUNK = 512 * 1024


def _chunk(kind: str, tmp_path) -> bytes:
    if kind == "random":
        return os.urandom(CHUNK)
    if kind == "zero":
        return bytes(CHUNK)
    p = tmp_path / "c.img"
    if kind == "text":
        write_sample_image(p, CHUNK, seed=2, zero=0, random=0)
    else:  # "mixed": half zero pages, 20 % random
        write_sample_image(p, CHUNK, seed=2)
    return p.read_bytes()


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "aes"])
@pytest.mark.parametrize("kind", ["mixed", "text", "random", "zero"])
def test_bench_decode_512k(benchmark, tmp_path, kind, encrypted):
    codec = ChunkCodec(CHUNK, 4096, bytes(32) if encrypted else None)
    raw = _chunk(kind, tmp_path)
    e = codec.encode(raw)
    out = bytearray(b"\xa5" * CHUNK)  # so that zero slots must be written
    benchmark.extra_info.update(bytes=CHUNK, stored_bytes=len(e.data), label=f"decode one 512 KiB {kind} chunk")
    benchmark(codec.decode, e.data, e.id, e.flags, e.zero_bitmap, out)
    assert out == raw, "the chunk does not decode to its input"
