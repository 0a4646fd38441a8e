"""The snapshot manifest: format, writing, and strict parsing.

A manifest is one JSON object, written last and atomically to
``snapshots/<name>/<version>/manifest.json``; its presence makes the
snapshot ACTIVE. Format 1.1::

    {
      "format": "restore-snapshot",
      "format_version": "1.1",            major.minor; a newer major is refused
      "name": "fn-hello", "version": "3",
      "memory_size": 268435456,           bytes of the memory file
      "chunk_size": 524288,               bytes per chunk (power of two)
      "page_size": 4096,                  bytes per page / slot
      "encryption": null | {"algorithm": "AES-256-GCM", "key_check": "<32 hex>"},
      "page_map": null | {"id": "<sha256 hex of maps/<id>>", "pages": 65536},
      "plan": null | "<sha256 hex of the working-set plan>",
      "created": {"at": "2026-11-27T05:44:03Z", "by": "restore 0.1.0",
                  "uploaded_bytes": 1234},
      "chunks": [{"id": "<sha256 hex>" | null, "stored_len": 4150,
                  "flags": 1, "zero": "<zero bitmap, hex>"}, ...],
      "mac": "<64 hex>"                   encrypted snapshots (1.1): HMAC-SHA256,
                                          under a key derived from the snapshot
                                          key, of the canonical JSON of every
                                          other field (sorted keys, no spaces)
    }

Chunks authenticate themselves (their id is the SHA-256 of their bytes;
encrypted ones also carry a GCM tag), and the manifest names them, so an
encrypted snapshot's manifest is authenticated too: a manifest forged or
altered in a shared store cannot send a guest to other chunks. A plain
snapshot has no secret to authenticate its manifest with.

Chunk entries follow csrc/chunk.h: ``id`` is the SHA-256 of the stored
bytes (null for an all-zero chunk, which has no object), ``flags`` are
RS_CHUNK_* bits, ``zero`` is the per-slot zero bitmap.

Layout. Without a page map, chunk i slot s holds file page i*P + s
(P = chunk_size / page_size), and there are ceil(memory_size / chunk_size)
chunks. A page map is a separate immutable object ``maps/<id>``: for each
page of the memory file, a little-endian uint32 pair (chunk, slot), with
chunk = 0xFFFFFFFF for a page that is all zero.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ._version import __version__
from .errors import ChunkSizeError, InvalidName, ManifestError, UnsupportedManifestVersion
from .objects import manifest_key, page_map_key

FORMAT = "restore-snapshot"
FORMAT_MAJOR = 1
FORMAT_MINOR = 1
ENCRYPTION_ALGORITHM = "AES-256-GCM"
MIN_CHUNK_SIZE = 4096
MAX_CHUNK_SIZE = 1 << 30  # every length fits a C int (lz4, OpenSSL)

PAGE_MAP_DTYPE = np.dtype([("chunk", "<u4"), ("slot", "<u4")])
ZERO_PAGE = 0xFFFFFFFF  # page map chunk value of an all-zero page
# A chunk entry's flags (csrc/chunk.h RS_CHUNK_*; restore.codec checks them).
FLAG_LZ4 = 1  # the plaintext is an lz4 block
FLAG_ENCRYPTED = 2  # the stored bytes are nonce || ciphertext || tag
KNOWN_FLAGS = FLAG_LZ4 | FLAG_ENCRYPTED

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")


def check_name(value: str, what: str = "snapshot name") -> str:
    """Return value if it is a valid name or version: 1-128 of
    [A-Za-z0-9._-], starting with a letter or digit; else raise InvalidName
    (what names the kind of value in the message)."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise InvalidName(
            f"{what} {value!r} is not valid: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def check_chunk_size(chunk_size: int, page_size: int = 4096) -> int:
    """Return chunk_size (bytes), or raise ChunkSizeError when it is not a
    power of two, >= 4 KiB, >= page_size and <= 1 GiB."""
    if not isinstance(chunk_size, int) or not _is_pow2(chunk_size) or chunk_size < MIN_CHUNK_SIZE:
        raise ChunkSizeError(f"chunk size {chunk_size} is not a power of two of at least 4096 bytes")
    if chunk_size > MAX_CHUNK_SIZE:
        raise ChunkSizeError(f"chunk size {chunk_size} is larger than the 1 GiB maximum")
    if chunk_size < page_size:
        raise ChunkSizeError(f"chunk size {chunk_size} is smaller than the {page_size}-byte page size")
    return chunk_size


def check_page_size(page_size: int) -> int:
    """Return page_size (bytes) if it is 4096 or 2 MiB; else raise ChunkSizeError."""
    if page_size not in (4096, 2 << 20):
        raise ChunkSizeError(f"page size {page_size} is not 4096 (4 KiB) or 2097152 (2 MiB)")
    return page_size


@dataclass(frozen=True)
class ChunkEntry:
    """One chunk of a snapshot: its object id (None: all zero, no object),
    stored length in bytes, RS_CHUNK_* flags and zero bitmap."""

    id: Optional[str]
    stored_len: int
    flags: int
    zero: bytes


@dataclass(frozen=True)
class PageMapRef:
    """Where the page map lives: object maps/<id>, one entry per page."""

    id: str
    pages: int

    @property
    def key(self) -> str:
        return page_map_key(self.id)


@dataclass
class Manifest:
    """A snapshot manifest (format 1.1, drawn in the module text).

    Sizes are bytes. chunks: one ChunkEntry per chunk, in chunk order.
    key_check: hex key check value of an encrypted snapshot (None: plain).
    page_map: where the page map object is (None: identity layout). plan:
    reserved (written as null). created_at: UTC, YYYY-MM-DDTHH:MM:SSZ.
    extra: keys of a newer minor version, kept and written back. mac: hex
    HMAC of signed_bytes() (encrypted snapshots). parse() reads one;
    snapshot.write_version builds and writes them.
    """

    name: str
    version: str
    memory_size: int  # bytes
    chunk_size: int  # bytes
    page_size: int  # bytes
    chunks: list[ChunkEntry]
    key_check: Optional[str] = None  # hex; None = not encrypted
    page_map: Optional[PageMapRef] = None
    plan: Optional[str] = None
    created_at: str = ""
    created_by: str = f"restore {__version__}"
    uploaded_bytes: int = 0  # bytes this creation added to the store
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys of a newer minor
    mac: Optional[str] = None  # hex HMAC over signed_bytes() (encrypted snapshots)

    # -- geometry ---------------------------------------------------------
    @property
    def encrypted(self) -> bool:
        """True for an encrypted (AES-256-GCM) snapshot."""
        return self.key_check is not None

    @property
    def pages(self) -> int:
        """Pages of page_size bytes in the memory file."""
        return self.memory_size // self.page_size

    @property
    def slots_per_chunk(self) -> int:
        """Slots (pages) per chunk."""
        return self.chunk_size // self.page_size

    @property
    def key(self) -> str:
        """The manifest's store key: snapshots/<name>/<version>/manifest.json."""
        return manifest_key(self.name, self.version)

    # -- figures for inspect ---------------------------------------------
    def zero_bitmaps(self) -> np.ndarray:
        """bool array [chunks, slots]: True where the slot is all zero."""
        raw = np.frombuffer(b"".join(c.zero for c in self.chunks), dtype=np.uint8)
        bits = np.unpackbits(raw.reshape(len(self.chunks), -1), axis=1, bitorder="little")
        return bits[:, : self.slots_per_chunk].astype(bool)

    def nonzero_pages(self) -> int:
        """Pages stored in chunks (excluding slots past the end of memory)."""
        return int((~self.zero_bitmaps()).sum())

    def stored_bytes(self) -> int:
        """Bytes of all chunk objects, counting a repeated id each time."""
        return sum(c.stored_len for c in self.chunks)

    def unique_stored_bytes(self) -> int:
        """Bytes of the distinct chunk objects this snapshot needs."""
        return sum({c.id: c.stored_len for c in self.chunks if c.id}.values())

    # -- serialisation ----------------------------------------------------
    def _doc(self) -> dict:
        doc = {
            "format": FORMAT,
            "format_version": f"{FORMAT_MAJOR}.{FORMAT_MINOR}",
            "name": self.name,
            "version": self.version,
            "memory_size": self.memory_size,
            "chunk_size": self.chunk_size,
            "page_size": self.page_size,
            "encryption": (
                {"algorithm": ENCRYPTION_ALGORITHM, "key_check": self.key_check} if self.encrypted else None
            ),
            "page_map": {"id": self.page_map.id, "pages": self.page_map.pages} if self.page_map else None,
            "plan": self.plan,
            "created": {"at": self.created_at, "by": self.created_by, "uploaded_bytes": self.uploaded_bytes},
            "chunks": [
                {"id": c.id, "stored_len": c.stored_len, "flags": c.flags, "zero": c.zero.hex()}
                for c in self.chunks
            ],
        }
        doc.update(self.extra)
        return doc

    def signed_bytes(self) -> bytes:
        """What the MAC covers: every field but the MAC, as canonical JSON."""
        return json.dumps(self._doc(), sort_keys=True, separators=(",", ":")).encode()

    def to_json(self) -> bytes:
        """The manifest as written to the store: UTF-8 JSON, indented, the
        chunk table last with one entry per line, and the MAC when there is
        one.

        json's indenting encoder is pure Python (some 120 ms for the 32768
        chunks of 16 GiB); the table goes through its C encoder in one call
        instead, and its entries, whose values are hex strings, integers and
        nulls, are split onto lines where one ends and the next begins."""
        doc = self._doc()
        chunks = doc.pop("chunks")
        if self.mac is not None:
            doc["mac"] = self.mac
        table = json.dumps(chunks, separators=(", ", ": "))
        table = "[\n  " + table[1:-1].replace("}, {", "},\n  {") + "\n ]"
        head = json.dumps(doc, indent=1)
        return f'{head[:-2]},\n "chunks": {table}\n}}\n'.encode()

    @classmethod
    def parse(cls, data: bytes, where: str) -> "Manifest":
        """Parse and check a manifest; where names it in errors.

        Raises ManifestError naming the manifest and the field for anything
        missing, mistyped or inconsistent, and UnsupportedManifestVersion
        (a ManifestError) for a format major version other than 1. Does not
        check the MAC (that needs the key: see snapshot.Snapshot)."""
        return _Parser(where).parse(data)


class _Parser:
    def __init__(self, where: str):
        self.where = where

    def fail(self, msg: str) -> ManifestError:
        return ManifestError(f"manifest {self.where}: {msg}")

    def field(self, doc: dict, key: str, kind: type | tuple, where: str = "") -> Any:
        if key not in doc:
            raise self.fail(f"missing field '{where}{key}'")
        v = doc[key]
        if isinstance(v, bool) or not isinstance(v, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.fail(f"field '{where}{key}' should be {names}, got {json.dumps(v)[:40]}")
        return v

    def parse(self, data: bytes) -> Manifest:
        if not data:
            raise self.fail("is empty")
        try:
            doc = json.loads(data)
        except UnicodeDecodeError:
            raise self.fail("is not UTF-8 text") from None
        except json.JSONDecodeError as exc:
            raise self.fail(f"is not valid JSON (truncated?): {exc.msg} at byte {exc.pos}") from None
        if not isinstance(doc, dict):
            raise self.fail("is not a JSON object")
        if doc.get("format") != FORMAT:
            raise self.fail(f"is not a restore snapshot manifest (format {doc.get('format')!r})")
        self.check_version(self.field(doc, "format_version", str))

        name = self.field(doc, "name", str)
        version = self.field(doc, "version", str)
        try:
            check_name(name)
            check_name(version, "snapshot version")
        except InvalidName as exc:
            raise self.fail(str(exc)) from None
        page_size = self.field(doc, "page_size", int)
        chunk_size = self.field(doc, "chunk_size", int)
        memory_size = self.field(doc, "memory_size", int)
        try:
            check_page_size(page_size)
            check_chunk_size(chunk_size, page_size)
        except ChunkSizeError as exc:
            raise self.fail(str(exc)) from None
        if memory_size <= 0 or memory_size % page_size:
            raise self.fail(f"memory_size {memory_size} is not a positive multiple of the page size")

        key_check = self.encryption(doc)
        page_map = self.page_map_ref(doc, memory_size // page_size)
        plan = doc.get("plan")
        if plan is not None and (not isinstance(plan, str) or not _HEX64.fullmatch(plan)):
            raise self.fail("field 'plan' should be null or 64 hex digits")
        created = self.field(doc, "created", dict)
        mac = doc.get("mac")
        if mac is not None and (not isinstance(mac, str) or not _HEX64.fullmatch(mac)):
            raise self.fail("field 'mac' should be 64 hex digits")
        m = Manifest(
            name=name,
            version=version,
            memory_size=memory_size,
            chunk_size=chunk_size,
            page_size=page_size,
            chunks=self.chunks(doc, chunk_size // page_size, key_check is not None),
            key_check=key_check,
            page_map=page_map,
            plan=plan,
            created_at=self.field(created, "at", str, "created."),
            created_by=self.field(created, "by", str, "created."),
            uploaded_bytes=self.field(created, "uploaded_bytes", int, "created."),
            extra={k: v for k, v in doc.items() if k not in _KNOWN_KEYS},
            mac=mac,
        )
        if page_map is None:
            self.check_identity(m)
        return m

    def check_version(self, text: str) -> None:
        m = re.fullmatch(r"(\d+)\.(\d+)", text)
        if not m:
            raise self.fail(f"format_version {text!r} is not MAJOR.MINOR")
        if int(m.group(1)) != FORMAT_MAJOR:
            raise UnsupportedManifestVersion(
                f"manifest {self.where}: format version {text} is not supported; "
                f"restore {__version__} reads format {FORMAT_MAJOR}.x"
            )

    def encryption(self, doc: dict) -> Optional[str]:
        enc = doc.get("encryption", "missing")
        if enc == "missing":
            raise self.fail("missing field 'encryption'")
        if enc is None:
            return None
        if not isinstance(enc, dict):
            raise self.fail("field 'encryption' should be null or an object")
        alg = self.field(enc, "algorithm", str, "encryption.")
        if alg != ENCRYPTION_ALGORITHM:
            raise self.fail(f"encryption algorithm {alg!r} is not supported (only {ENCRYPTION_ALGORITHM})")
        kc = self.field(enc, "key_check", str, "encryption.")
        if not _HEX32.fullmatch(kc):
            raise self.fail("field 'encryption.key_check' should be 32 hex digits")
        return kc

    def page_map_ref(self, doc: dict, pages: int) -> Optional[PageMapRef]:
        pm = doc.get("page_map")
        if pm is None:
            return None
        if not isinstance(pm, dict):
            raise self.fail("field 'page_map' should be null or an object")
        pid = self.field(pm, "id", str, "page_map.")
        if not _HEX64.fullmatch(pid):
            raise self.fail("field 'page_map.id' should be 64 hex digits")
        n = self.field(pm, "pages", int, "page_map.")
        if n != pages:
            raise self.fail(f"page map has {n} pages but the memory has {pages}")
        return PageMapRef(pid, n)

    def chunks(self, doc: dict, slots: int, encrypted: bool) -> list[ChunkEntry]:
        items = self.field(doc, "chunks", list)
        if not items:
            raise self.fail("has no chunks")
        bitmap_hex = 2 * max(1, slots // 8)
        out = []
        for i, c in enumerate(items):
            at = f"chunks[{i}]."
            if not isinstance(c, dict):
                raise self.fail(f"chunks[{i}] is not an object")
            cid = c.get("id")
            if cid is not None and (not isinstance(cid, str) or not _HEX64.fullmatch(cid)):
                raise self.fail(f"field '{at}id' should be null or 64 lowercase hex digits")
            stored_len = self.field(c, "stored_len", int, at)
            flags = self.field(c, "flags", int, at)
            zero = self.field(c, "zero", str, at)
            if len(zero) != bitmap_hex or not re.fullmatch(r"[0-9a-f]*", zero):
                raise self.fail(f"field '{at}zero' should be {bitmap_hex} hex digits")
            if (cid is None) != (stored_len == 0) or stored_len < 0:
                raise self.fail(f"{at[:-1]} has id {cid!r} but stored_len {stored_len}")
            if flags & ~KNOWN_FLAGS or flags < 0:
                raise self.fail(f"{at[:-1]} has unknown flags {flags:#x}")
            if cid is not None and bool(flags & FLAG_ENCRYPTED) != encrypted:
                state = "encrypted" if encrypted else "not encrypted"
                raise self.fail(f"{at[:-1]} flags {flags:#x} disagree with the snapshot, which is {state}")
            out.append(ChunkEntry(cid, stored_len, flags, bytes.fromhex(zero)))
        return out

    def check_identity(self, m: Manifest) -> None:
        expected = -(-m.memory_size // m.chunk_size)
        if len(m.chunks) != expected:
            raise self.fail(
                f"has {len(m.chunks)} chunks but {m.memory_size} bytes of memory "
                f"in {m.chunk_size}-byte chunks need {expected}"
            )
        tail = m.pages - (expected - 1) * m.slots_per_chunk  # slots used in the last chunk
        if not m.zero_bitmaps()[-1, tail:].all():
            raise self.fail(f"chunk {expected - 1} claims slots past the end of memory")


_KNOWN_KEYS = {
    "mac",
    "format",
    "format_version",
    "name",
    "version",
    "memory_size",
    "chunk_size",
    "page_size",
    "encryption",
    "page_map",
    "plan",
    "created",
    "chunks",
}


def parse_page_map(data: bytes, manifest: Manifest, where: str) -> np.ndarray:
    """Check a page map object against its manifest and return it as an array
    of PAGE_MAP_DTYPE, one entry per page (a read-only view of data).
    Raises ManifestError, naming where, for a wrong size, a chunk or slot
    out of range, or a page placed in a slot the chunk marks all zero. The
    SHA-256 against the map's id is the caller's check."""
    fail = lambda msg: ManifestError(f"page map {where}: {msg}")  # noqa: E731
    if len(data) != manifest.pages * PAGE_MAP_DTYPE.itemsize:
        raise fail(f"is {len(data)} bytes, expected {manifest.pages * PAGE_MAP_DTYPE.itemsize} for {manifest.pages} pages")
    pm = np.frombuffer(data, dtype=PAGE_MAP_DTYPE)
    live = pm["chunk"] != ZERO_PAGE
    if (pm["chunk"][live] >= len(manifest.chunks)).any():
        bad = int(np.flatnonzero(live & (pm["chunk"] >= len(manifest.chunks)))[0])
        raise fail(f"page {bad} names chunk {int(pm['chunk'][bad])}, but there are {len(manifest.chunks)}")
    if (pm["slot"][live] >= manifest.slots_per_chunk).any():
        bad = int(np.flatnonzero(live & (pm["slot"] >= manifest.slots_per_chunk))[0])
        raise fail(f"page {bad} names slot {int(pm['slot'][bad])}, but chunks have {manifest.slots_per_chunk}")
    zero = manifest.zero_bitmaps()
    in_zero_slot = live.copy()
    in_zero_slot[live] = zero[pm["chunk"][live], pm["slot"][live]]
    if in_zero_slot.any():
        bad = int(np.flatnonzero(in_zero_slot)[0])
        raise fail(f"page {bad} names chunk {int(pm['chunk'][bad])} slot {int(pm['slot'][bad])}, which is empty")
    return pm


def identity_page_map(manifest: Manifest) -> np.ndarray:
    """The page map of an identity layout, zero pages marked ZERO_PAGE."""
    pages = np.arange(manifest.pages, dtype=np.uint32)
    pm = np.empty(manifest.pages, dtype=PAGE_MAP_DTYPE)
    pm["chunk"] = pages // manifest.slots_per_chunk
    pm["slot"] = pages % manifest.slots_per_chunk
    zero = manifest.zero_bitmaps().reshape(-1)[: manifest.pages]
    pm["chunk"][zero] = ZERO_PAGE
    pm["slot"][zero] = 0
    return pm


def page_chunks(page_map: np.ndarray, offsets: np.ndarray, page_size: int) -> np.ndarray:
    """The chunk holding the page at each file offset (bytes, page-aligned),
    per page_map (PAGE_MAP_DTYPE, one entry per page_size page): uint32,
    ZERO_PAGE for an all-zero page, which no chunk holds."""
    pages = (np.asarray(offsets, dtype=np.uint64) // np.uint64(page_size)).astype(np.int64)
    return page_map["chunk"][pages]
