"""The C codec against the Python reference implementation (tests/refcodec.py):
both directions, every image shape, with and without encryption."""

from __future__ import annotations

import os

import pytest
import refcodec

from restore.codec import FLAG_ENCRYPTED, FLAG_LZ4, ChunkCodec

C = 64 * 1024
P = 4096


def _shapes() -> dict[str, bytes]:
    rnd = os.urandom(C)
    text = (b"request handler session snapshot 12345, " * 2000)[:C]
    mixed = bytearray(C)
    for s in range(C // P):
        src = (None, rnd, text)[s % 3]
        if src is not None:
            mixed[s * P : (s + 1) * P] = src[s * P : (s + 1) * P]
    return {
        "all_zero": bytes(C),
        "all_random": rnd,
        "all_text": text,
        "mixed": bytes(mixed),
        "short_last": bytes(mixed[: 5 * P]),  # a last chunk shorter than C
        "one_page": rnd[:P],
    }


SHAPES = _shapes()
KEYS = {"plain": None, "encrypted": bytes(range(32))}


@pytest.mark.parametrize("keyname", KEYS)
@pytest.mark.parametrize("shape", SHAPES)
def test_c_encode_matches_reference(shape, keyname):
    raw, key = SHAPES[shape], KEYS[keyname]
    with ChunkCodec(C, P, key) as codec:
        enc = codec.encode(raw)
        ref_id, ref_stored, ref_flags, ref_zero = refcodec.encode(raw, C, P, key)
        assert enc.zero_bitmap == ref_zero
        assert enc.flags == ref_flags
        if not enc.flags & FLAG_LZ4:
            # Without lz4 every byte is fixed by the format (nonce included).
            # lz4 itself may choose other matches in another build, so lz4
            # payloads are compared by what they decode to.
            assert enc.data == ref_stored
            assert enc.id == ref_id
        # Either way each side decodes the other's output to the raw chunk.
        padded = bytes(raw) + bytes(C - len(raw))
        assert refcodec.decode(enc.data, enc.id, enc.flags, enc.zero_bitmap, C, P, key) == padded
        assert bytes(codec.decode(ref_stored, ref_id, ref_flags, ref_zero)) == padded


@pytest.mark.parametrize("keyname", KEYS)
def test_flags_and_sizes_per_shape(keyname):
    key = KEYS[keyname]
    enc_flag = FLAG_ENCRYPTED if key else 0
    overhead = 28 if key else 0
    with ChunkCodec(C, P, key) as codec:
        z = codec.encode(SHAPES["all_zero"])
        assert (z.id, z.data, z.flags, z.zero_bitmap) == (None, b"", 0, b"\xff" * 2)
        r = codec.encode(SHAPES["all_random"])
        assert r.flags == enc_flag and len(r.data) == C + overhead  # stored raw: lz4 would grow it
        t = codec.encode(SHAPES["all_text"])
        assert t.flags == FLAG_LZ4 | enc_flag and len(t.data) < C // 4
        s = codec.encode(SHAPES["short_last"])
        assert s.zero_bitmap == bytes([0b11101001, 0xFF])  # slots 0,3 zero; 5.. past the end


def test_equal_chunks_encrypt_to_equal_objects():
    """The nonce is derived from the plaintext, so dedup survives encryption,
    while different keys give different objects."""
    raw = SHAPES["mixed"]
    with ChunkCodec(C, P, bytes(32)) as a, ChunkCodec(C, P, bytes(32)) as b, ChunkCodec(C, P, b"\1" * 32) as c:
        assert a.encode(raw).id == b.encode(raw).id
        assert a.encode(raw).id != c.encode(raw).id
        assert a.key_check == b.key_check == refcodec.key_check(bytes(32))
        assert a.key_check != c.key_check


@pytest.mark.parametrize("chunk,page", [(4096, 4096), (8192, 4096), (512 * 1024, 4096), (4 << 20, 2 << 20)])
def test_geometries_round_trip(chunk, page):
    raw = bytearray(chunk)
    raw[page : 2 * page] = os.urandom(page) if chunk >= 2 * page else b""
    raw[:16] = b"first page bytes"
    for key in KEYS.values():
        with ChunkCodec(chunk, page, key) as codec:
            e = codec.encode(raw)
            assert bytes(codec.decode(e.data, e.id, e.flags, e.zero_bitmap)) == bytes(raw)


def test_decode_into_caller_buffer_overwrites_everything():
    with ChunkCodec(C, P) as codec:
        e = codec.encode(SHAPES["mixed"])
        out = bytearray(b"\xaa" * C)
        assert codec.decode(e.data, e.id, e.flags, e.zero_bitmap, out) is out
        assert bytes(out) == SHAPES["mixed"]
