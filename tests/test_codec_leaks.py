"""Each C entry point, called many times, leaves the process's memory flat;
its error paths too, each called with an input it must refuse, and
refusing it with its own exception."""

from __future__ import annotations

import hashlib
import os
import re

import pytest

from restore.codec import ChunkCodec
from restore.errors import ChunkHashMismatch, ChunkMalformed, MissingKey, WrongKey

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


def _refused(cls: type, what: str):
    return pytest.raises(cls, match=f"^{re.escape(what)} \\(from rs_chunk_decode\\)$")


def test_codec_create_destroy_does_not_leak():
    def cycle():
        with ChunkCodec(C, 4096, b"k" * 32) as c:
            assert len(c.key_check) == 32
        ChunkCodec(C)  # freed by ffi.gc

    assert _grows(cycle) < 2 << 20


@pytest.mark.parametrize("key", [None, b"k" * 32], ids=["plain", "encrypted"])
def test_encode_decode_do_not_leak(key):
    """Every round decodes the chunk to its bytes and has each refusal
    raised: a damaged copy (hash mismatch), bytes whose hash is right but
    which do not decode (malformed; encrypted: their GCM tag fails, so a
    wrong key), and for an encrypted chunk another key and no key."""
    raw = bytearray(C)
    raw[: C // 2] = os.urandom(C // 2)
    raw[C // 2 : C // 2 + 8192] = b"abcd" * 2048
    with ChunkCodec(C, 4096, key) as codec, ChunkCodec(C, 4096, b"x" * 32) as other, ChunkCodec(C) as keyless:
        e = codec.encode(raw)
        damaged = e.data[:-1] + bytes([e.data[-1] ^ 1])  # one bit: no longer the bytes the id names
        garbage = bytes(range(256)) * (len(e.data) // 256) + b"\xff" * (len(e.data) % 256)
        garbage_id = hashlib.sha256(garbage).hexdigest()  # passes the hash check, then cannot decode
        out = bytearray(C)

        def cycle():
            codec.encode(raw)
            out[:] = bytes(C)
            assert codec.decode(e.data, e.id, e.flags, e.zero_bitmap, out) is out and out == raw
            with _refused(ChunkHashMismatch, "SHA-256 of the stored bytes is not the chunk id"):
                codec.decode(damaged, e.id, e.flags, e.zero_bitmap, out)
            if key:
                with _refused(WrongKey, "decryption failed: wrong key or forged ciphertext"):
                    codec.decode(garbage, garbage_id, e.flags, e.zero_bitmap, out)
                with _refused(WrongKey, "decryption failed: wrong key or forged ciphertext"):
                    other.decode(e.data, e.id, e.flags, e.zero_bitmap, out)
                with _refused(MissingKey, "the chunk is encrypted and no key was given"):
                    keyless.decode(e.data, e.id, e.flags, e.zero_bitmap, out)
            else:
                with _refused(ChunkMalformed, "stored bytes do not decode to the chunk's pages"):
                    codec.decode(garbage, garbage_id, e.flags, e.zero_bitmap, out)

        assert _grows(cycle) < 2 << 20
