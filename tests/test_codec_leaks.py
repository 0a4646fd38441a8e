"""Each C entry point, called many times, leaves the process's memory flat."""

from __future__ import annotations

import os

from restore.codec import ChunkCodec

C = 64 * 1024


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _grows(fn, rounds: int = 3000) -> int:
    for _ in range(rounds // 3):  # warm up allocator pools and caches
        fn()
    before = _rss()
    for _ in range(rounds):
        fn()
    return _rss() - before


def test_codec_create_destroy_does_not_leak():
    def cycle():
        with ChunkCodec(C, 4096, b"k" * 32) as c:
            c.key_check
        ChunkCodec(C)  # freed by ffi.gc

    assert _grows(cycle) < 2 << 20


def test_encode_decode_do_not_leak():
    raw = bytearray(C)
    raw[: C // 2] = os.urandom(C // 2)
    raw[C // 2 : C // 2 + 8192] = b"abcd" * 2048
    for key in (None, b"k" * 32):
        with ChunkCodec(C, 4096, key) as codec, ChunkCodec(C, 4096, b"x" * 32) as other:
            e = codec.encode(raw)
            out = bytearray(C)

            def cycle():
                codec.encode(raw)
                codec.decode(e.data, e.id, e.flags, e.zero_bitmap, out)
                try:  # error paths free what they allocated too
                    codec.decode(e.data[:-1] + b"\0", e.id, e.flags, e.zero_bitmap, out)
                except Exception:
                    pass
                if key:
                    try:
                        other.decode(e.data, e.id, e.flags, e.zero_bitmap, out)
                    except Exception:
                        pass

            assert _grows(cycle) < 2 << 20
