"""Snapshots: create from a memory file, list, open, inspect, verify, export.

A snapshot version moves through two states. While its chunks upload it is
PENDING: ``snapshots/<name>/<version>/pending.json`` claims the version and
no manifest exists. Writing the manifest (last, atomically, create-only)
makes it ACTIVE; then the pending marker is removed. A failed creation
removes its marker, so nothing partially written ever looks ACTIVE; chunk
objects it uploaded stay (they are content-addressed and may be shared).
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import hmac
import json
import os
import queue
import socket
import stat
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Iterator, Optional

import numpy as np

from .codec import ChunkCodec, chunk_id_of
from .errors import (
    ChunkError,
    ChunkMissing,
    DecryptionError,
    InputError,
    InternalError,
    ManifestError,
    MemoryFileError,
    MissingKey,
    SnapshotExists,
    SnapshotNotFound,
    SnapshotPending,
    WrongKey,
)
from .manifest import (
    PAGE_MAP_DTYPE,
    ZERO_PAGE,
    ChunkEntry,
    Manifest,
    PageMapRef,
    check_chunk_size,
    check_name,
    check_page_size,
    identity_page_map,
    parse_page_map,
)
from .objects import chunk_key, manifest_key, pending_key, snapshots_prefix
from .tiers.durable import DurableStore
from .tiers.l1 import L1Cache

DEFAULT_CHUNK_SIZE = 512 * 1024
DEFAULT_UPLOADS = 16  # objects in flight to the store
PROGRESS_STEP = 8 << 20  # bytes an encoder encodes between two progress reports

Progress = Callable[[int], None]  # called with bytes of memory just covered


def load_page_map(store: DurableStore, manifest: Manifest) -> np.ndarray:
    """The manifest's page map (PAGE_MAP_DTYPE per page, checked against
    its id), or the identity layout's when it has none.

    Returns a new array the caller owns. Raises ManifestError when the map
    object is missing, its SHA-256 is not its id, or it does not fit the
    manifest; StoreError when the store fails."""
    ref = manifest.page_map
    if ref is None:
        return identity_page_map(manifest)
    where = f"{store.url}/{ref.key}"
    data = store.get(ref.key)
    if data is None:
        raise ManifestError(f"page map {where} is missing from the store")
    if chunk_id_of(data) != ref.id:
        raise ManifestError(f"page map {where}: SHA-256 of its bytes is not its id")
    return parse_page_map(data, manifest, where)


def _no_progress(_: int) -> None:
    pass


# ---------------------------------------------------------------- listing


@dataclass(frozen=True)
class SnapshotRef:
    """One snapshot version found in a store (list_snapshots): its state
    and when its manifest (ACTIVE) or claim (PENDING) was last modified."""

    name: str
    version: str
    state: str  # "ACTIVE" or "PENDING"
    updated: datetime


def _version_order(v: str) -> tuple:
    return (0, int(v), "") if v.isdigit() else (1, 0, v)


def list_snapshots(store: DurableStore, name: Optional[str] = None) -> list[SnapshotRef]:
    """Every snapshot version in the store (of one name if given), sorted by
    name and version (numeric versions in numeric order). A version with
    both a manifest and a claim is listed once, as ACTIVE. Raises
    StoreError when the store fails."""
    found: dict[tuple[str, str], SnapshotRef] = {}
    prefix = snapshots_prefix(name)
    for info in store.list(prefix):
        parts = info.key.split("/")
        if len(parts) != 4 or parts[3] not in ("manifest.json", "pending.json"):
            continue
        ident = (parts[1], parts[2])
        state = "ACTIVE" if parts[3] == "manifest.json" else "PENDING"
        if state == "ACTIVE" or ident not in found:
            found[ident] = SnapshotRef(parts[1], parts[2], state, info.last_modified)
    return sorted(found.values(), key=lambda r: (r.name, _version_order(r.version)))


def _resolve_version(store: DurableStore, name: str, version: Optional[str]) -> str:
    check_name(name)
    if version is not None:
        return check_name(version, "snapshot version")
    active = [r for r in list_snapshots(store, name) if r.state == "ACTIVE"]
    if not active:
        raise SnapshotNotFound(f"no snapshot named '{name}' in {store.url}")
    return active[-1].version


def load_manifest(store: DurableStore, name: str, version: Optional[str] = None) -> Manifest:
    """The manifest of name/version (the newest ACTIVE version by default).

    Raises InvalidName for a bad name or version, SnapshotNotFound when
    there is no such snapshot, SnapshotPending when the version is still
    being created (or its creation died), ManifestError (or its subclass
    UnsupportedManifestVersion) when the manifest cannot be used, and
    StoreError when the store fails. Does not check an encrypted
    manifest's MAC: that needs the key (Snapshot does it)."""
    version = _resolve_version(store, name, version)
    key = manifest_key(name, version)
    data = store.get(key)
    if data is None:
        if store.exists(pending_key(name, version)):
            raise SnapshotPending(f"snapshot {name}/{version} is PENDING: its creation has not finished")
        raise SnapshotNotFound(f"no snapshot {name}/{version} in {store.url}")
    m = Manifest.parse(data, f"{store.url}/{key}")
    if (m.name, m.version) != (name, version):
        raise ManifestError(f"manifest {store.url}/{key}: names snapshot {m.name}/{m.version}")
    return m


def pending_info(store: DurableStore, name: str, version: str) -> Optional[dict]:
    """What a PENDING version's claim says (pid, host, started), or None when
    the version is not PENDING. A claim that is not JSON yields {}."""
    data = store.get(pending_key(check_name(name), check_name(version, "snapshot version")))
    if data is None:
        return None
    try:
        info = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return {k: info[k] for k in ("pid", "host", "started") if k in info} if isinstance(info, dict) else {}


def remove_snapshot(store: DurableStore, name: str, version: str) -> None:
    """Delete a version's manifest and pending marker (not its chunks, which
    other snapshots may share). Raises SnapshotNotFound when neither
    exists, InvalidName for a bad name or version."""
    check_name(name)
    check_name(version, "snapshot version")
    keys = [manifest_key(name, version), pending_key(name, version)]
    if not any(store.exists(k) for k in keys):
        raise SnapshotNotFound(f"no snapshot {name}/{version} in {store.url}")
    for k in keys:
        store.delete(k)


# ---------------------------------------------------------------- creation


def _open_memory_file(path: str | os.PathLike, page_size: int) -> tuple[int, int]:
    """(fd, size in bytes) of a readable memory file whose size is a
    positive multiple of page_size."""
    shown = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MemoryFileError(f"memory file '{shown}': no such file") from None
    except OSError as exc:
        raise MemoryFileError(f"memory file '{shown}' cannot be read: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise MemoryFileError(f"memory file '{shown}' is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise MemoryFileError(f"memory file '{shown}' is not a regular file")
        if st.st_size == 0:
            raise MemoryFileError(f"memory file '{shown}' is empty")
        if st.st_size % page_size:
            raise MemoryFileError(
                f"memory file '{shown}' is {st.st_size} bytes, not a multiple of the {page_size}-byte page size"
            )
    except OSError as exc:
        os.close(fd)
        raise MemoryFileError(f"memory file '{shown}' cannot be read: {exc.strerror}") from None
    except MemoryFileError:
        os.close(fd)
        raise
    return fd, st.st_size


def memory_file_size(path: str | os.PathLike, page_size: int = 4096) -> int:
    """Size in bytes of a memory file that create_snapshot would accept;
    raises MemoryFileError naming the problem otherwise."""
    fd, size = _open_memory_file(path, page_size)
    os.close(fd)
    return size


def _claim_version(store: DurableStore, name: str, version: Optional[str]) -> str:
    """Write the pending marker of a new version and return the version."""
    existing = list_snapshots(store, name)
    if version is None:
        numeric = [int(r.version) for r in existing if r.version.isdigit()]
        version = str(max(numeric, default=0) + 1)
    check_name(version, "snapshot version")
    for r in existing:
        if r.version == version:
            raise SnapshotExists(_exists_message(name, version, r.state))
    marker = json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
    ).encode()
    if not store.put(pending_key(name, version), marker, create_only=True):
        raise SnapshotExists(_exists_message(name, version, "PENDING"))
    return version


def _exists_message(name: str, version: str, state: str) -> str:
    if state == "ACTIVE":
        return f"snapshot {name}/{version} already exists; versions are immutable (choose another --version)"
    return (
        f"snapshot {name}/{version} is PENDING: another creation claimed it; if that creation died, "
        f"remove it with `restore snapshot rm {name} --version {version}`"
    )


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def create_snapshot(
    store: DurableStore,
    memory_file: str | os.PathLike,
    name: str,
    version: Optional[str] = None,
    *,
    base: Optional[str] = None,
    chunk_size: Optional[int] = None,
    page_size: int = 4096,
    key: Optional[bytes] = None,
    workers: Optional[int] = None,
    uploads: int = DEFAULT_UPLOADS,
    progress: Progress = _no_progress,
    warm_l2=None,
) -> Manifest:
    """Cut memory_file into chunks, store the new ones, write the manifest.

    version: None picks the next integer version. base: a version of the
    same snapshot that memory_file is a diff against, as Firecracker's Diff
    snapshot writes it: only the pages dirtied since then, the rest holes.
    Without base a hole reads as zero; with it a hole is the base's memory,
    so a chunk wholly in holes takes the base's chunk as it is, and a chunk
    with dirty pages is the base's with them written over (the base must
    have the identity layout, the same size and, with a key, the same key).
    key: 32 bytes to encrypt with AES-256-GCM. workers: encoding threads
    (default: one per core). uploads: objects in flight to the store.
    progress(n) is called as n more bytes of memory are done. warm_l2: an
    L2Cluster that gets every chunk of the snapshot in every zone
    (SnapStart's "optimize" step), the base's too. chunk_size (default: 512 KiB, or the
    base's), page_size: bytes. Returns the written manifest.

    Raises InvalidName, ChunkSizeError or InputError for bad arguments or a
    base that does not fit, SnapshotNotFound for a missing base, MissingKey
    or WrongKey for its key, MemoryFileError when the memory file is
    missing, unreadable, empty, not a multiple of page_size, or shrinks
    while it is read, SnapshotExists when the version exists or is claimed,
    ChunkError when a base chunk cannot be read, and StoreError when the
    store fails. On any failure the version's claim is removed; chunk
    objects already uploaded stay (they are content-addressed and may be
    shared).
    """
    check_name(name)
    check_page_size(page_size)
    if version is not None:
        check_name(version, "snapshot version")
    if workers is not None and workers < 1:
        raise InputError(f"workers must be at least 1, got {workers}")
    if uploads < 1:
        raise InputError(f"uploads must be at least 1, got {uploads}")
    if base is None:
        chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
        check_chunk_size(chunk_size, page_size)
    fd, size = _open_memory_file(memory_file, page_size)
    try:
        extents = data_extents(fd, size, shown=memory_file if base is not None else None)
        if base is not None:
            _check_holes_told(memory_file, extents, os.fstat(fd).st_blocks * 512)
            with Snapshot.open(store, name, base, key) as snap:
                _check_base(snap, size, chunk_size, page_size, key)
                read = _diff_reader(fd, memory_file, extents, snap)
                holes = hole_chunks(extents, size, snap.manifest.chunk_size)
                known = [e if hole else None for e, hole in zip(snap.manifest.chunks, holes)]
                return write_version(store, snap.codec, name, version, read, size, size, workers=workers,
                                     uploads=uploads, progress=progress, warm_l2=warm_l2, known=known)
        with ChunkCodec(chunk_size, page_size, key) as codec:
            known = _zero_entries(codec, hole_chunks(extents, size, chunk_size), size)
            return write_version(store, codec, name, version, _file_reader(fd, memory_file), size, size,
                                 workers=workers, uploads=uploads, progress=progress, warm_l2=warm_l2,
                                 known=known)
    finally:
        os.close(fd)


def _check_holes_told(shown: str | os.PathLike, extents: list[tuple[int, int]], allocated: int) -> None:
    """MemoryFileError when the file system reports more data (extents)
    than the file has blocks allocated (bytes): it reports holes as data,
    and a diff's holes would then read as zeros, not as the base."""
    data = sum(e - s for s, e in extents)
    if data > allocated:
        raise MemoryFileError(f"memory file '{os.fspath(shown)}': its file system reports {data} bytes of data "
                              f"in {allocated} bytes allocated, so it does not tell holes from data and a diff "
                              "cannot be read from it (copy it to ext4, xfs, btrfs or tmpfs)")


def _check_base(snap: "Snapshot", size: int, chunk_size: Optional[int], page_size: int,
                key: Optional[bytes]) -> None:
    """A diff of size bytes can be laid over snap: InputError naming what
    differs otherwise."""
    m = snap.manifest
    if m.page_map is not None:
        raise InputError(f"base {snap.label} is laid out by a page map (snapshot optimize made it): give the "
                         "version it was made from, which holds the same memory")
    if size != m.memory_size:
        raise InputError(f"the memory file is {size} bytes, base {snap.label} holds {m.memory_size}: "
                         "a diff covers the whole memory")
    if chunk_size is not None and chunk_size != m.chunk_size:
        raise InputError(f"chunk size {chunk_size} differs from base {snap.label}'s {m.chunk_size}: "
                         "leave it out to take the base's")
    if page_size != m.page_size:
        raise InputError(f"page size {page_size} differs from base {snap.label}'s {m.page_size}")
    if key is not None and not m.encrypted:
        raise InputError(f"base {snap.label} is not encrypted: a version laid over it cannot be")


def _zero_entries(codec: ChunkCodec, holes: np.ndarray, size: int) -> list[Optional[ChunkEntry]]:
    """Per chunk of a size-byte file, the entry of an all-zero chunk of its
    length where holes marks it (one encode per length), else None."""
    C = codec.chunk_size
    by_length: dict[int, ChunkEntry] = {}
    known: list[Optional[ChunkEntry]] = []
    for i, hole in enumerate(holes):
        length = min(C, size - i * C)
        if hole and length not in by_length:
            e = codec.encode(bytes(length))
            if e.id is not None:  # the format stores no object for an all-zero chunk
                raise InternalError(f"an all-zero {length}-byte chunk encoded to object {e.id}")
            by_length[length] = e.entry
        known.append(by_length[length] if hole else None)
    return known


def write_version(
    store: DurableStore,
    codec: ChunkCodec,
    name: str,
    version: Optional[str],
    read: Callable[[int, memoryview], None],
    stored_size: int,
    memory_size: int,
    *,
    page_map: Optional[np.ndarray] = None,
    workers: Optional[int] = None,
    uploads: int = DEFAULT_UPLOADS,
    progress: Progress = _no_progress,
    warm_l2=None,
    known: Optional[list[Optional[ChunkEntry]]] = None,
) -> Manifest:
    """Claim a version, store the chunks of the stored_size bytes that
    read(offset, view) gives, then the page map (None: identity layout;
    else PAGE_MAP_DTYPE per page of memory_size) and last the manifest. The
    claim is dropped whatever happens: nothing partial is ever ACTIVE.

    read fills view (a buffer of at most one chunk) with the bytes at
    offset; sizes in bytes. known: per chunk, its entry when it is known
    without reading it (a hole of a sparse file: the all-zero entry; of a
    diff: the base's), else None; a known chunk is neither read nor
    encoded. The codec is borrowed, not closed. Raises SnapshotExists when
    the version is taken, and whatever read or the store raise."""
    version = _claim_version(store, name, version)
    try:
        chunks, uploaded = _store_chunks(
            store, codec, read, stored_size, workers or os.cpu_count() or 1, uploads, progress, warm_l2, known
        )
        ref = None
        if page_map is not None:
            blob = np.ascontiguousarray(page_map, dtype=PAGE_MAP_DTYPE).tobytes()
            ref = PageMapRef(hashlib.sha256(blob).hexdigest(), len(page_map))
            store.put_new(ref.key, blob)
        manifest = Manifest(
            name=name,
            version=version,
            memory_size=memory_size,
            chunk_size=codec.chunk_size,
            page_size=codec.page_size,
            chunks=chunks,
            key_check=codec.key_check,
            page_map=ref,
            created_at=_now(),
            uploaded_bytes=uploaded,
        )
        if codec.encrypted:
            manifest.mac = codec.manifest_mac(manifest.signed_bytes())
        if not store.put(manifest.key, manifest.to_json(), create_only=True):
            raise SnapshotExists(_exists_message(name, version, "ACTIVE"))
    finally:
        store.delete(pending_key(name, version))
    return manifest


def _file_reader(fd: int, shown: str | os.PathLike) -> Callable[[int, memoryview], None]:
    """Fill a buffer with the memory file's bytes at an offset."""

    def read(offset: int, view: memoryview) -> None:
        if os.preadv(fd, [view], offset) != len(view):
            raise MemoryFileError(f"memory file '{os.fspath(shown)}' shrank while it was being read")

    return read


def _diff_reader(fd: int, shown: str | os.PathLike, extents: list[tuple[int, int]],
                 base: "Snapshot") -> Callable[[int, memoryview], None]:
    """Fill a buffer with the memory a diff file stands for at an offset:
    base's bytes (decoded from its chunk, which the buffer's chunk is:
    identity layout), with the file's data extents written over them. A
    buffer wholly inside extents does not read the base."""
    starts = [s for s, _ in extents]
    C = base.manifest.chunk_size
    local = threading.local()
    read_file = _file_reader(fd, shown)

    def read(offset: int, view: memoryview) -> None:
        end = offset + len(view)
        pieces = []
        for s, e in extents[max(0, bisect.bisect_right(starts, offset) - 1):]:
            if s >= end:
                break
            if e > offset:
                pieces.append((max(s, offset), min(e, end)))
        if sum(e - s for s, e in pieces) < len(view):
            buf = getattr(local, "buf", None)
            if buf is None:
                buf = local.buf = bytearray(C)
            base.read_chunk(offset // C, buf)
            view[:] = memoryview(buf)[: len(view)]
        for s, e in pieces:
            read_file(s, view[s - offset : e - offset])

    return read


def data_extents(fd: int, size: int, *, shown: Optional[str | os.PathLike] = None) -> list[tuple[int, int]]:
    """The [start, end) byte ranges of the first size bytes of file fd that
    hold data (SEEK_DATA / SEEK_HOLE); everything else is a hole, which
    reads as zeros. A file system that cannot tell reports one extent, the
    whole file; with shown (the file's name), it raises MemoryFileError
    instead (a diff, whose holes are not zeros, cannot be read there)."""
    extents = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data past offset
                break
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                if shown is not None:
                    raise MemoryFileError(f"memory file '{os.fspath(shown)}': its file system does not tell "
                                          "holes from data (SEEK_DATA), so a diff cannot be read from it") from None
                return [(0, size)]
            raise
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        extents.append((start, end))
        offset = end
    return extents


def hole_chunks(extents: list[tuple[int, int]], size: int, chunk_size: int) -> np.ndarray:
    """A bool per chunk of a size-byte file: True when no byte of the chunk
    is in extents (data_extents), so the chunk is all zero unread."""
    holes = np.ones(-(-size // chunk_size), dtype=bool)
    for start, end in extents:
        holes[start // chunk_size:(end - 1) // chunk_size + 1] = False
    return holes


def _store_chunks(
    store: DurableStore,
    codec: ChunkCodec,
    read: Callable[[int, memoryview], None],
    size: int,
    workers: int,
    uploads: int,
    progress: Progress,
    warm_l2=None,
    known: Optional[list[Optional[ChunkEntry]]] = None,
) -> tuple[list[ChunkEntry], int]:
    """Encode the size bytes read(offset, view) gives, chunk by chunk, and
    store each new object once; returns the chunk entries and the bytes
    uploaded.

    Each of `workers` threads takes the next chunk, reads it, encodes it and
    passes the object on with no thread in between: into a local store
    (file://, memory://: a put is a copy) it puts the object itself; for a
    network store, or an L2 to warm, `uploads` threads send it, and an
    encoder waits while 2 x uploads objects are queued or in flight. So
    memory stays at (workers + 2 x uploads) chunks whatever the size.
    progress runs on the calling thread, told as each encoder has encoded
    PROGRESS_STEP bytes more and when it ends. A chunk known names (write_version)
    takes that entry, unread; with warm_l2 its object is read from the
    store and sent to the L2 too, so the L2 gets every chunk of the
    version. The first failure stops every thread and is raised; what was
    stored stays (objects are content-addressed)."""
    C = codec.chunk_size
    n = -(-size // C)
    entries: list[Optional[ChunkEntry]] = list(known) if known is not None else [None] * n
    todo: deque[int] = deque(i for i in range(n) if entries[i] is None)
    if len(todo) < n:
        progress(size - sum(min(C, size - i * C) for i in todo))

    lock = threading.Lock()
    seen: set[str] = set()
    uploaded = 0
    submitted = 0  # objects handed to the senders (encoders count them)
    news: "queue.SimpleQueue[tuple[str, object]]" = queue.SimpleQueue()  # to the calling thread
    stop = threading.Event()
    room = threading.Semaphore(2 * uploads)
    sender = ThreadPoolExecutor(uploads, "restore-upload") if store.remote or warm_l2 is not None else None

    def put(chunk_id: str, data: bytes) -> None:
        nonlocal uploaded
        if store.put_new(chunk_key(chunk_id), data):
            with lock:
                uploaded += len(data)
        if warm_l2 is not None:
            warm_l2.put(chunk_id, data, zones="all")

    def warm(chunk_id: str) -> None:
        data = store.get(chunk_key(chunk_id))
        if data is None:
            raise ChunkMissing(f"object {chunk_key(chunk_id)} is missing from {store.url}: it cannot warm the L2")
        warm_l2.put(chunk_id, data, zones="all")

    def on_sent(fut: Future) -> None:
        room.release()
        news.put(("sent", None if fut.cancelled() else fut.exception()))

    def encode_some() -> None:
        nonlocal submitted
        buf = bytearray(C)
        done = 0  # bytes encoded and not yet told to the calling thread
        while not stop.is_set():
            with lock:
                if not todo:
                    break
                i = todo.popleft()
            try:
                view = memoryview(buf)[: min(C, size - i * C)]
                read(i * C, view)
                e = codec.encode(view)
                entries[i] = e.entry
                with lock:
                    new = e.id is not None and e.id not in seen
                    if new:
                        seen.add(e.id)
                if new and sender is None:
                    put(e.id, e.data)
                elif new:
                    room.acquire()
                    with lock:
                        submitted += 1
                    sender.submit(put, e.id, e.data).add_done_callback(on_sent)
                done += len(view)
                if done >= PROGRESS_STEP:  # a wake-up of the calling thread per step, not per chunk
                    news.put(("encoded", done))
                    done = 0
            except BaseException as exc:
                stop.set()  # the other encoders take no more chunks
                news.put(("failed", exc))
                return
        if done:
            news.put(("encoded", done))
        news.put(("ended", None))

    # The calling thread's counts: encoders ended, objects sent.
    total, ended, sent = min(workers, len(todo)), 0, 0
    with ThreadPoolExecutor(workers, "restore-encode") as encoders:
        try:
            for _ in range(total):
                encoders.submit(encode_some)
            if warm_l2 is not None:  # the chunks taken as they are: their objects are in the store
                for chunk_id in {e.id for e in known or () if e is not None and e.id is not None}:
                    room.acquire()
                    with lock:
                        submitted += 1
                    sender.submit(warm, chunk_id).add_done_callback(on_sent)
            while True:
                with lock:
                    if ended == total and sent == submitted:
                        break
                kind, what = news.get()
                if kind == "encoded":
                    progress(what)  # type: ignore[arg-type]
                elif kind == "ended":
                    ended += 1
                elif kind == "sent":
                    sent += 1
                    if what is not None:
                        raise what  # type: ignore[misc]
                else:
                    raise what  # type: ignore[misc]
        finally:
            stop.set()
            if sender is not None:
                sender.shutdown(wait=True, cancel_futures=True)
    return entries, uploaded  # type: ignore[return-value]


# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class BadChunk:
    """A chunk that Snapshot.verify could not fetch or decode: its index,
    the file offset of its first page, its object id (None for an all-zero
    chunk) and the reason, one line."""

    index: int
    offset: int  # bytes: file offset of the chunk's first page
    chunk_id: Optional[str]
    reason: str


@dataclass(frozen=True)
class ChunkTable:
    """A manifest's chunk table as the engine takes it: ids (32 bytes per
    chunk, zeros for an all-zero chunk), stored lengths (bytes), RS_CHUNK_*
    flags, and the zero bitmaps back to back."""

    ids: bytes
    lens: np.ndarray
    flags: np.ndarray
    zero: bytes


def chunk_pages(buf, m: Manifest) -> np.ndarray:
    """A decoded chunk (chunk_size bytes) as [slots, page_size] bytes."""
    return np.frombuffer(buf, dtype=np.uint8).reshape(m.slots_per_chunk, m.page_size)


def by_chunk(where: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(chunk, the indices into where of its pages, ascending) for each
    chunk that where (PAGE_MAP_DTYPE entries, no ZERO_PAGE) names, in chunk
    order."""
    order = np.argsort(where["chunk"], kind="stable")
    chunks, starts = np.unique(where["chunk"][order], return_index=True)
    return zip(chunks.tolist(), np.split(order, starts[1:]))


class Snapshot:
    """An ACTIVE snapshot opened for reading.

    store: where its chunks are. manifest: its parsed manifest. key: the
    32-byte key of an encrypted snapshot (ignored for a plain one). l1: an
    optional local cache; chunks are read from it first and verified chunks
    fetched from the store are written to it.

    Opening an encrypted snapshot checks the key and the manifest's MAC
    before any chunk is read: raises MissingKey without a key, WrongKey
    when the key check value differs, ManifestError when the MAC is missing
    or wrong. The Snapshot owns a ChunkCodec (holding derived keys in C):
    close() it, or use it as a context manager. The store and l1 are
    borrowed.
    """

    def __init__(
        self,
        store: DurableStore,
        manifest: Manifest,
        key: Optional[bytes] = None,
        l1: Optional[L1Cache] = None,
    ):
        self.store = store
        self.manifest = manifest
        self.l1 = l1
        m = manifest
        if m.encrypted:
            if key is None:
                raise MissingKey(
                    f"snapshot {m.name}/{m.version} is encrypted: give its key (--key-file or --key-env)"
                )
        else:
            key = None
        self.codec = ChunkCodec(m.chunk_size, m.page_size, key)
        if m.encrypted and self.codec.key_check != m.key_check:
            self.codec.close()
            raise WrongKey(f"the key given is not the key of snapshot {m.name}/{m.version} (key check differs)")
        if m.encrypted:
            where = f"{store.url}/{m.key}"
            if m.mac is None:
                self.codec.close()
                raise ManifestError(f"manifest {where} is not authenticated (it has no mac): an encrypted "
                                    "snapshot's manifest must be; re-create the snapshot")
            if not hmac.compare_digest(self.codec.manifest_mac(m.signed_bytes()), m.mac):
                self.codec.close()
                raise ManifestError(f"manifest {where} fails authentication: it was altered or forged "
                                    "after it was written with this snapshot's key")
        self._page_map: Optional[np.ndarray] = None
        self._chunk_table: Optional[ChunkTable] = None
        self._table_lock = threading.Lock()
        self._page_tables: dict[int, Optional[tuple[np.ndarray, np.ndarray]]] = {}

    @classmethod
    def open(
        cls,
        store: DurableStore,
        name: str,
        version: Optional[str] = None,
        key: Optional[bytes] = None,
        l1: Optional[L1Cache] = None,
    ) -> "Snapshot":
        """Load name/version's manifest (the newest ACTIVE version by
        default) and open it; raises what load_manifest and Snapshot()
        raise."""
        return cls(store, load_manifest(store, name, version), key, l1)

    def close(self) -> None:
        """Free the codec and wipe its derived keys (idempotent)."""
        self.codec.close()

    def __enter__(self) -> "Snapshot":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def label(self) -> str:
        """NAME/VERSION, for messages."""
        return f"{self.manifest.name}/{self.manifest.version}"

    def page_map(self) -> np.ndarray:
        """page → (chunk, slot) for every page (PAGE_MAP_DTYPE); chunk is
        ZERO_PAGE for an all-zero page. Identity unless the manifest has a map."""
        if self._page_map is None:
            self._page_map = load_page_map(self.store, self.manifest)
        return self._page_map

    def chunk_table(self) -> "ChunkTable":
        """The manifest's chunk table in the engine's form (csrc/engine.h
        rs_engine_create), built once and shared by every session."""
        with self._table_lock:
            if self._chunk_table is None:
                m = self.manifest
                self._chunk_table = ChunkTable(
                    ids=b"".join(bytes.fromhex(c.id) if c.id else bytes(32) for c in m.chunks),
                    lens=np.array([c.stored_len for c in m.chunks], dtype=np.uint32),
                    flags=np.array([c.flags for c in m.chunks], dtype=np.uint32),
                    zero=b"".join(c.zero for c in m.chunks),
                )
            return self._chunk_table

    def page_tables(self, page_size: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """The engine's tables for a guest with page_size-byte pages: per
        page of the snapshot's own page size, (chunk or ZERO_PAGE, byte
        offset in the decoded chunk), from the page map; None for the
        identity layout, which the engine computes from the zero bitmaps
        (nothing per page to build or hold). A larger guest page (2 MiB) is
        assembled by the engine from the chunks holding its small pages, so
        the tables do not depend on it. Built once and shared by every
        session. Raises InputError when page_size cannot be served from
        this snapshot."""
        m = self.manifest
        if page_size < m.page_size or page_size % m.page_size or m.memory_size % page_size:
            raise InputError(
                f"guest page size {page_size} does not fit snapshot {self.label} "
                f"(page size {m.page_size}, memory {m.memory_size} bytes): it must be a multiple of "
                f"the page size that divides the memory size"
            )
        if m.page_map is None:
            return None
        with self._table_lock:
            if m.page_size not in self._page_tables:
                pm = self.page_map()
                self._page_tables[m.page_size] = (
                    pm["chunk"].copy(),
                    (pm["slot"].astype(np.uint64) * m.page_size).astype(np.uint32),
                )
            return self._page_tables[m.page_size]

    def chunk_offset(self, index: int) -> int:
        """File offset (bytes) of the first page held by chunk index."""
        if self.manifest.page_map is None:
            return index * self.manifest.chunk_size
        pages = np.flatnonzero(self.page_map()["chunk"] == index)
        return int(pages.min()) * self.manifest.page_size if len(pages) else 0

    def context(self, index: int) -> str:
        """Names chunk index in error messages: snapshot, chunk, offset."""
        return f"snapshot {self.label} chunk {index} at offset {self.chunk_offset(index):#x}"

    def fetch(self, index: int, use_l1: bool = True) -> bytes:
        """Stored bytes of chunk index: from L1 when present (verified
        there), else the store (not verified here: read_chunk does that).
        b"" for an all-zero chunk. Raises ChunkMissing when the store lacks
        the object, StoreError when it fails."""
        entry = self.manifest.chunks[index]
        if entry.id is None:
            return b""
        if use_l1 and self.l1 is not None:
            data = self.l1.get(entry.id)
            if data is not None:
                return data
        data = self.store.get(chunk_key(entry.id))
        if data is None:
            raise ChunkMissing(f"{self.context(index)}: object {chunk_key(entry.id)} is missing from {self.store.url}")
        return data

    def read_chunk(self, index: int, out=None, use_l1: bool = True):
        """Decoded slots of chunk index (chunk_size bytes), verified in C.
        Bytes fetched from the store are written to L1 once verified.

        out: a writable buffer of chunk_size bytes to decode into (None: a
        new bytearray); returned. Raises ChunkMissing, ChunkHashMismatch,
        ChunkMalformed or WrongKey (forged or wrongly keyed ciphertext),
        each naming the chunk, and StoreError."""
        entry = self.manifest.chunks[index]
        data = self.fetch(index, use_l1)
        out = self.codec.decode(data, entry.id, entry.flags, entry.zero, out, self.context(index))
        if use_l1 and self.l1 is not None and entry.id is not None and not self.l1.contains(entry.id):
            self.l1.put(entry.id, data)
        return out

    def fill_l1(self, l1: L1Cache) -> int:
        """Copy every chunk object of the snapshot from the store into l1
        (pre-warming a worker); returns how many objects were copied. Bytes
        are verified on the way in."""
        ids = {c.id for c in self.manifest.chunks if c.id and not l1.contains(c.id)}
        for cid in ids:
            data = self.store.get(chunk_key(cid))
            if data is None:
                raise ChunkMissing(f"snapshot {self.label}: object {chunk_key(cid)} is missing from {self.store.url}")
            l1.put(cid, data)
        return len(ids)

    def read_pages(self, offsets) -> np.ndarray:
        """The bytes of the pages at the given file offsets (page aligned),
        as a uint8 array [len(offsets), page_size]; each chunk involved is
        fetched and decoded once."""
        m = self.manifest
        offs = np.asarray(offsets, dtype=np.uint64).reshape(-1)
        if (offs % m.page_size).any() or (offs >= m.memory_size).any():
            raise InputError(f"page offsets must be multiples of {m.page_size} below {m.memory_size}")
        pm = self.page_map()[(offs // m.page_size).astype(np.int64)]
        out = np.zeros((len(offs), m.page_size), dtype=np.uint8)
        buf = bytearray(m.chunk_size)
        slots = np.frombuffer(buf, dtype=np.uint8).reshape(m.slots_per_chunk, m.page_size)
        for c in np.unique(pm["chunk"][pm["chunk"] != ZERO_PAGE]):
            rows = np.flatnonzero(pm["chunk"] == c)
            self.read_chunk(int(c), buf)
            out[rows] = slots[pm["slot"][rows]]
        return out

    def verify(self, workers: Optional[int] = None, progress: Progress = _no_progress) -> list[BadChunk]:
        """Fetch every chunk from the store (not L1) and decode it; return
        the chunks that are missing or bad, in index order."""
        self.page_map()  # a bad page map fails verification as a whole
        m = self.manifest
        bad: list[BadChunk] = []

        def check(i: int) -> Optional[BadChunk]:
            try:
                self.read_chunk(i, use_l1=False)
            except (ChunkError, DecryptionError) as exc:  # a forged chunk fails GCM
                return BadChunk(i, self.chunk_offset(i), m.chunks[i].id, str(exc))
            return None

        with ThreadPoolExecutor(workers or min(8, 2 * (os.cpu_count() or 1)), "restore-verify") as pool:
            for i, result in enumerate(pool.map(check, range(len(m.chunks)))):
                if result:
                    bad.append(result)
                progress(m.chunk_size if m.page_map else min(m.chunk_size, m.memory_size - i * m.chunk_size))
        return bad

    def decode_pages(self, where: np.ndarray, put: Callable[[np.ndarray, np.ndarray], None],
                     workers: Optional[int] = None, done: Callable[[int], None] = lambda n: None) -> None:
        """Decode each chunk that holds a page where names (PAGE_MAP_DTYPE
        entries of this version, no ZERO_PAGE) once, on `workers` threads
        with a chunk buffer each, and call put(rows, data) on that thread:
        the indices into where of the chunk's pages (ascending) and their
        bytes ([len(rows), page_size], valid during the call). done(n) runs
        on the calling thread as each chunk is through, n its pages. The
        first failure cancels the chunks not started and is raised."""
        m = self.manifest
        local = threading.local()

        def place(job: tuple[int, np.ndarray]) -> int:
            c, rows = job
            buf = getattr(local, "buf", None)
            if buf is None:
                buf = local.buf = bytearray(m.chunk_size)
            self.read_chunk(c, buf)
            put(rows, chunk_pages(buf, m)[where["slot"][rows]])
            return len(rows)

        with ThreadPoolExecutor(workers or os.cpu_count() or 1, "restore-decode") as pool:
            try:
                for n in pool.map(place, by_chunk(where)):
                    done(n)
            except BaseException:
                pool.shutdown(cancel_futures=True)  # the chunks not started yet
                raise

    def _each_page(self, put: Callable[[np.ndarray, np.ndarray], None], workers: Optional[int],
                   progress: Progress) -> None:
        """decode_pages for every non-zero page, put(pages, data) given file
        page indices (ascending); progress counts every page, zero ones at
        the end."""
        P = self.manifest.page_size
        pm = self.page_map()
        live = np.flatnonzero(pm["chunk"] != ZERO_PAGE)
        self.decode_pages(pm[live], lambda rows, data: put(live[rows], data), workers, lambda n: progress(n * P))
        if len(live) < len(pm):
            progress((len(pm) - len(live)) * P)

    def read_into(self, out, workers: Optional[int] = None, progress: Progress = _no_progress) -> None:
        """Reconstruct the whole memory file into out, a writable buffer of
        memory_size bytes that starts zeroed (zero pages are not written)."""
        m = self.manifest
        mem = memoryview(out)
        if mem.nbytes != m.memory_size:
            raise ValueError(f"output buffer is {mem.nbytes} bytes, the snapshot holds {m.memory_size}")
        pages = np.frombuffer(mem.cast("B"), dtype=np.uint8).reshape(m.pages, m.page_size)
        self._each_page(pages.__setitem__, workers, progress)

    def export(self, path: str | os.PathLike, workers: Optional[int] = None, progress: Progress = _no_progress) -> None:
        """Write the memory file back out to path: a new sparse file, whose
        zero pages are holes. Each chunk's pages are written as they are
        decoded, so memory stays a chunk per worker whatever the size."""
        P = self.manifest.page_size
        tmp = f"{os.fspath(path)}.restore-tmp"

        def put(dest: np.ndarray, data: np.ndarray) -> None:
            cuts = [0, *(np.flatnonzero(np.diff(dest) != 1) + 1).tolist(), len(dest)]
            for a, b in zip(cuts, cuts[1:]):  # runs of consecutive pages
                view, at = memoryview(data[a:b]).cast("B"), int(dest[a]) * P
                while view:
                    n = os.pwrite(fd, view, at)
                    view, at = view[n:], at + n

        with open(tmp, "wb") as f:
            fd = f.fileno()
            try:
                f.truncate(self.manifest.memory_size)
                self._each_page(put, workers, progress)
                os.fsync(fd)
            except BaseException:
                os.unlink(tmp)
                raise
        os.replace(tmp, path)


# ---------------------------------------------------------------- inspect


def describe(store: DurableStore, manifest: Manifest) -> dict:
    """The figures `restore snapshot inspect` shows, as a dict."""
    m = manifest
    zero_pages = m.pages - m.nonzero_pages()
    nonzero_bytes = m.memory_size - zero_pages * m.page_size
    stored = m.stored_bytes()
    unique = m.unique_stored_bytes()
    return {
        "name": m.name,
        "version": m.version,
        "state": "ACTIVE",
        "created": m.created_at,
        "created_by": m.created_by,
        "memory_size": m.memory_size,
        "page_size": m.page_size,
        "chunk_size": m.chunk_size,
        "chunks": len(m.chunks),
        "zero_chunks": sum(1 for c in m.chunks if c.id is None),
        "objects": len({c.id for c in m.chunks if c.id}),
        "zero_pages": zero_pages,
        "zero_pages_pct": 100.0 * zero_pages / m.pages,
        "stored_bytes": unique,
        "compression_ratio": (nonzero_bytes / stored) if stored else None,
        "dedup_within_bytes": stored - unique,
        "dedup_across_bytes": max(0, unique - m.uploaded_bytes),
        "uploaded_bytes": m.uploaded_bytes,
        "encrypted": m.encrypted,
        "layout": "page map" if m.page_map else "identity",
        "plan": m.plan,
    }
