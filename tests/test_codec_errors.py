"""The C decoder refuses damaged, forged and wrongly keyed chunks with typed
errors whose messages name the chunk."""

from __future__ import annotations

import os
import re

import pytest

from restore.codec import FLAG_ENCRYPTED, FLAG_LZ4, ChunkCodec
from restore.errors import ChunkHashMismatch, ChunkMalformed, InternalError, MissingKey, WrongKey

C = 64 * 1024
CTX = "snapshot s/1 chunk 2 at offset 0x20000"


def _raw() -> bytes:
    raw = bytearray(C)
    raw[0:4096] = os.urandom(4096)
    raw[8192:12288] = b"text " * 819 + b"t"
    return bytes(raw)


def test_flipped_bit_is_a_hash_mismatch():
    with ChunkCodec(C) as codec:
        e = codec.encode(_raw())
        bad = bytearray(e.data)
        bad[len(bad) // 2] ^= 1
        with pytest.raises(
            ChunkHashMismatch,
            match=re.escape(f"{CTX}: SHA-256 of the stored bytes is not the chunk id (from rs_chunk_decode)"),
        ):
            codec.decode(bytes(bad), e.id, e.flags, e.zero_bitmap, context=CTX)


def test_truncated_chunk_is_a_hash_mismatch():
    with ChunkCodec(C) as codec:
        e = codec.encode(_raw())
        with pytest.raises(ChunkHashMismatch):
            codec.decode(e.data[:-1], e.id, e.flags, e.zero_bitmap)


def test_forged_bytes_with_matching_id_are_malformed():
    """A forger who also rewrites the id gets past the hash, not past decode."""
    import hashlib

    with ChunkCodec(C) as codec:
        e = codec.encode(_raw())
        forged = b"\x00garbage" * 100
        with pytest.raises(ChunkMalformed, match=re.escape("stored bytes do not decode to the chunk's pages")):
            codec.decode(forged, hashlib.sha256(forged).hexdigest(), e.flags, e.zero_bitmap)


def test_bitmap_that_lies_about_zero_pages_is_malformed():
    with ChunkCodec(C) as codec:
        e = codec.encode(_raw())
        with pytest.raises(ChunkMalformed):
            codec.decode(e.data, e.id, e.flags, b"\xff\xff")  # claims no page is stored
        with pytest.raises(ChunkMalformed):
            codec.decode(e.data, e.id, e.flags, b"\x00\x00")  # claims every page is stored


def test_unknown_flag_bits_are_malformed():
    with ChunkCodec(C) as codec:
        e = codec.encode(_raw())
        with pytest.raises(ChunkMalformed):
            codec.decode(e.data, e.id, e.flags | 0x80, e.zero_bitmap)


def test_wrong_key():
    with ChunkCodec(C, key=b"a" * 32) as right, ChunkCodec(C, key=b"b" * 32) as wrong:
        e = right.encode(_raw())
        with pytest.raises(WrongKey, match=re.escape(f"{CTX}: decryption failed: wrong key or forged ciphertext")):
            wrong.decode(e.data, e.id, e.flags, e.zero_bitmap, context=CTX)


def test_missing_key():
    with ChunkCodec(C, key=b"a" * 32) as keyed, ChunkCodec(C) as plain:
        e = keyed.encode(_raw())
        assert e.flags & FLAG_ENCRYPTED
        with pytest.raises(MissingKey, match=re.escape("the chunk is encrypted and no key was given")):
            plain.decode(e.data, e.id, e.flags, e.zero_bitmap)


def test_plaintext_chunk_in_encrypted_snapshot_is_refused():
    """A forged manifest cannot downgrade an encrypted snapshot to plaintext."""
    with ChunkCodec(C, key=b"a" * 32) as keyed, ChunkCodec(C) as plain:
        e = plain.encode(_raw())
        assert e.flags == FLAG_LZ4
        with pytest.raises(ChunkMalformed):
            keyed.decode(e.data, e.id, e.flags, e.zero_bitmap)


def test_bad_geometry_is_refused():
    with pytest.raises(InternalError, match=re.escape("chunk size 3000, page size 4096: rs_codec_create failed")):
        ChunkCodec(3000)
    with pytest.raises(ValueError, match="key must be 32 bytes, got 5"):
        ChunkCodec(C, key=b"short")


def test_closed_codec_is_refused():
    codec = ChunkCodec(C)
    codec.close()
    codec.close()
    with pytest.raises(ValueError, match="chunk codec is closed"):
        codec.encode(bytes(C))


def test_encode_refuses_partial_pages_and_oversize():
    with ChunkCodec(C) as codec:
        with pytest.raises(InternalError, match="rs_chunk_encode failed: Invalid argument"):
            codec.encode(bytes(100))
        with pytest.raises(InternalError):
            codec.encode(bytes(2 * C))
