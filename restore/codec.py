"""The chunk codec: Python's handle on the C encoder and decoder.

The stored form of a chunk is drawn in csrc/chunk.h. Both directions run in
C with the GIL released, so a thread pool encodes or decodes on every core.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import Optional

from ._native import ffi, lib
from .errors import check
from .manifest import FLAG_ENCRYPTED, FLAG_LZ4, ChunkEntry

if (FLAG_LZ4, FLAG_ENCRYPTED) != (lib.RS_CHUNK_LZ4, lib.RS_CHUNK_ENCRYPTED):
    raise ImportError("restore.manifest's chunk flags do not match RS_CHUNK_* of csrc/chunk.h")
KEY_BYTES: int = lib.RS_KEY_BYTES
ID_BYTES: int = lib.RS_ID_BYTES


@dataclass(frozen=True)
class EncodedChunk:
    """One chunk in stored form.

    id: lowercase hex SHA-256 of data, or None for an all-zero chunk (no object).
    data: the stored bytes (empty for an all-zero chunk).
    flags: FLAG_* bits.
    zero_bitmap: one bit per slot, set = all-zero slot (see csrc/chunk.h).
    """

    id: Optional[str]
    data: bytes
    flags: int
    zero_bitmap: bytes

    @property
    def entry(self) -> ChunkEntry:
        """The chunk's entry in a manifest's chunk table."""
        return ChunkEntry(self.id, len(self.data), self.flags, self.zero_bitmap)


class ChunkCodec:
    """Encoder/decoder for one snapshot geometry and key.

    chunk_size, page_size: bytes (powers of two, 4 KiB <= page <= chunk).
    key: 32-byte master key for an encrypted snapshot, or None.
    The codec may be shared by threads; each thread gets its own scratch
    buffers. Close it (or use it as a context manager) to wipe the derived
    keys at once rather than at garbage collection. The C codec keeps only
    keys derived from key, never key itself.

    Raises ValueError for a key that is not 32 bytes, and InternalError
    (from rs_codec_create, EINVAL) for sizes outside those rules: check
    user input first with manifest.check_chunk_size / check_page_size.
    """

    def __init__(self, chunk_size: int, page_size: int = 4096, key: Optional[bytes] = None):
        if key is not None and len(key) != KEY_BYTES:
            raise ValueError(f"key must be {KEY_BYTES} bytes, got {len(key)}")
        out = ffi.new("rs_codec **")
        check(
            lib.rs_codec_create(out, chunk_size, page_size, key if key else ffi.NULL, len(key or b"")),
            "rs_codec_create",
            f"chunk size {chunk_size}, page size {page_size}",
        )
        self._codec = ffi.gc(out[0], lib.rs_codec_destroy)
        self.chunk_size = chunk_size
        self.page_size = page_size
        self.encrypted = key is not None
        self.bitmap_bytes: int = lib.rs_codec_bitmap_bytes(self._codec)
        self.stored_bound: int = lib.rs_codec_stored_bound(self._codec)
        self._local = threading.local()

    def close(self) -> None:
        """Free the C codec (and wipe its keys). Idempotent."""
        codec, self._codec = self._codec, None
        if codec is not None:
            ffi.release(codec)

    def __enter__(self) -> "ChunkCodec":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def handle(self):
        """The rs_codec * for C that decodes with this codec (the engine).
        Valid while this codec is open: whoever hands it to C keeps the
        codec alive for as long as C may use it."""
        if self._codec is None:
            raise ValueError("chunk codec is closed")
        return self._codec

    @property
    def key_check(self) -> Optional[str]:
        """Hex key check value kept in the manifest (None without a key)."""
        if not self.encrypted:
            return None
        out = ffi.new("uint8_t[16]")
        check(lib.rs_codec_key_check(self.handle(), out), "rs_codec_key_check")
        return bytes(out).hex()

    def manifest_mac(self, data: bytes) -> str:
        """Hex HMAC-SHA256 of data under the manifest key derived from the
        snapshot key (csrc/chunk.h rs_codec_manifest_mac)."""
        out = ffi.new("uint8_t[32]")
        check(lib.rs_codec_manifest_mac(self.handle(), data, len(data), out), "rs_codec_manifest_mac")
        return bytes(out).hex()

    def _scratch(self):
        s = getattr(self._local, "scratch", None)
        if s is None:
            s = (
                ffi.new("uint8_t[]", self.stored_bound),
                ffi.new("size_t *"),
                ffi.new("uint8_t[]", self.bitmap_bytes),
                ffi.new("uint8_t[]", ID_BYTES),
                ffi.new("uint32_t *"),
            )
            self._local.scratch = s
        return s

    def encode(self, raw) -> EncodedChunk:
        """Encode raw (a buffer of whole pages, at most chunk_size bytes; a
        short last chunk's missing slots count as zero) into its stored
        form (csrc/chunk.h): zero bitmap, lz4 when it saves bytes, AES-GCM
        with a key. Returns a new EncodedChunk; raw is only read. Raises
        InternalError for a length that is not whole pages or too long."""
        out, out_len, bitmap, id_, flags = self._scratch()
        src = ffi.from_buffer(raw)
        check(
            lib.rs_chunk_encode(self.handle(), src, len(src), out, len(out), out_len, bitmap, id_, flags),
            "rs_chunk_encode",
            f"{len(src)}-byte chunk",
        )
        n = out_len[0]
        return EncodedChunk(
            id=bytes(id_).hex() if n else None,
            data=ffi.buffer(out, n)[:],
            flags=flags[0],
            zero_bitmap=ffi.buffer(bitmap, self.bitmap_bytes)[:],
        )

    def decode(
        self,
        stored: bytes,
        chunk_id: Optional[str],
        flags: int,
        zero_bitmap: bytes,
        out=None,
        context: str = "",
    ):
        """Verify and decode stored bytes into out (chunk_size bytes).

        Allocates a bytearray when out is None and returns it. Raises
        ChunkHashMismatch, ChunkMalformed, MissingKey or WrongKey, each
        message starting with context (e.g. "chunk 3 at offset 0x180000").
        """
        if out is None:
            out = bytearray(self.chunk_size)
        dst = ffi.from_buffer(out, require_writable=True)
        if len(dst) != self.chunk_size:
            raise ValueError(f"decode buffer is {len(dst)} bytes, chunk size is {self.chunk_size}")
        if len(zero_bitmap) != self.bitmap_bytes:
            raise ValueError(f"zero bitmap is {len(zero_bitmap)} bytes, expected {self.bitmap_bytes}")
        idb = bytes.fromhex(chunk_id) if chunk_id else bytes(ID_BYTES)
        src = ffi.from_buffer(stored) if len(stored) else ffi.NULL
        check(
            lib.rs_chunk_decode(self.handle(), src, len(stored), idb, flags, zero_bitmap, dst),
            "rs_chunk_decode",
            context,
        )
        return out


def chunk_id_of(data: bytes) -> str:
    """The id a chunk object must have: hex SHA-256 of its stored bytes."""
    return hashlib.sha256(data).hexdigest()
