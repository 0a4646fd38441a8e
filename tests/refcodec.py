"""A reference implementation of the chunk format in pure Python.

Written from the format drawn in csrc/chunk.h, with lz4, hashlib, hmac and
cryptography, so the tests can prove that the C codec and an independent
implementation agree byte for byte in both directions.
"""

from __future__ import annotations

import hashlib
import hmac

import lz4.block
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

LZ4 = 1
ENCRYPTED = 2
AAD = b"restore/chunk/v1"


def _derive(master: bytes, label: bytes) -> bytes:
    return hmac.new(master, label, hashlib.sha256).digest()


def key_check(master: bytes) -> str:
    return _derive(master, b"restore/v1/key-check")[:16].hex()


def encode(raw: bytes, chunk_size: int, page_size: int, key: bytes | None = None):
    """(id hex or None, stored bytes, flags, zero bitmap bytes)."""
    slots = chunk_size // page_size
    zero = bytearray(max(1, slots // 8))
    kept = []
    zpage = bytes(page_size)
    for s in range(slots):
        page = raw[s * page_size : (s + 1) * page_size]
        if len(page) < page_size or page == zpage:
            zero[s // 8] |= 1 << (s % 8)
        else:
            kept.append(page)
    if not kept:
        return None, b"", 0, bytes(zero)
    r = b"".join(kept)
    comp = lz4.block.compress(r, mode="default", store_size=False)
    flags = 0
    if len(comp) < len(r):
        plain, flags = comp, LZ4
    else:
        plain = r
    if key is not None:
        k_enc = _derive(key, b"restore/v1/chunk-encryption")
        k_nonce = _derive(key, b"restore/v1/chunk-nonce")
        nonce = hmac.new(k_nonce, plain, hashlib.sha256).digest()[:12]
        stored = nonce + AESGCM(k_enc).encrypt(nonce, plain, AAD)
        flags |= ENCRYPTED
    else:
        stored = plain
    return hashlib.sha256(stored).hexdigest(), stored, flags, bytes(zero)


def decode(stored: bytes, chunk_id, flags: int, zero: bytes, chunk_size: int, page_size: int, key=None) -> bytes:
    slots = chunk_size // page_size
    nonzero = [s for s in range(slots) if not (zero[s // 8] >> (s % 8)) & 1]
    if not stored:
        assert not nonzero
        return bytes(chunk_size)
    assert hashlib.sha256(stored).hexdigest() == chunk_id
    plain = stored
    if flags & ENCRYPTED:
        k_enc = _derive(key, b"restore/v1/chunk-encryption")
        plain = AESGCM(k_enc).decrypt(stored[:12], stored[12:], AAD)
        k_nonce = _derive(key, b"restore/v1/chunk-nonce")
        assert stored[:12] == hmac.new(k_nonce, plain, hashlib.sha256).digest()[:12], "nonce not derived per format"
    r = lz4.block.decompress(plain, uncompressed_size=len(nonzero) * page_size) if flags & LZ4 else plain
    out = bytearray(chunk_size)
    for k, s in enumerate(nonzero):
        out[s * page_size : (s + 1) * page_size] = r[k * page_size : (k + 1) * page_size]
    return bytes(out)
