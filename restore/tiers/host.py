"""The host cache: decoded chunks of each snapshot version on local disk,
shared by every session of every process on the host.

A chunk enters it once, after its stored bytes were verified and decoded
(by the C engine, whichever tier the bytes came from); from then on every
session installs its pages straight from a shared mapping of the version's
data file, i.e. from the page cache, with no read, verify or decode on the
fault path. The files and their fill protocol are csrc/hostcache.h's; this
module owns the directories, the byte budget and eviction::

    ROOT/                       created mode 0700
      .lock                     flock(LOCK_EX) while evicting
      v1/<version id, 64 hex>/  one snapshot version's decoded chunks, 0700
        data                    n_chunks * chunk_size bytes, sparse (zero
                                slots are holes), 0600
        state                   header and a byte per chunk, 0600
        info.json               which snapshot it was made for (for people)
      .evict-<hex>/             a version being removed

The version id is the SHA-256 of what decides the decoded bytes: the
geometry and every chunk's id, flags and zero bitmap (version_id). Two
versions with the same chunks share one directory; a new version gets a
new one, so bytes a session maps never change.

Trust: bytes are verified (SHA-256 of the stored bytes against the
manifest, AES-GCM for encrypted snapshots) before they are decoded into
the host cache; afterwards they are protected only by ownership and modes
(the directories 0700 and files 0600, owned by the server's user). For an
encrypted snapshot this means its plaintext pages are on local disk,
readable by that user and root: turn the host cache off for such
snapshots where that is not acceptable. After an unclean stop: a fill cut
short (kill -9) holds no PRESENT mark and is punched out and redone by the
next filler; after a host crash (another boot id) a version is emptied and
filled again, since page-cache bytes may not have reached the disk.

Budget: the sum of the versions' allocated bytes (holes are free). Past it,
evict() removes least recently used versions that no session uses (a user
holds flock(LOCK_SH) on the state file; eviction takes LOCK_EX without
waiting and skips versions in use), down to LOW_WATER_PERCENT of the budget.
A version in use is never removed or changed: eviction waits for its
sessions to end.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import shutil
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Optional

from ..errors import HostCacheError, InputError, check

if TYPE_CHECKING:
    from ..manifest import Manifest
    from ..snapshot import Snapshot

DEFAULT_BUDGET = 16 << 30  # bytes
LOW_WATER_PERCENT = 90  # evict() frees down to this share of the budget
LAYOUT = "v1"  # directory of this format's versions (csrc/hostcache.h format 1)
_EVICT_PREFIX = ".evict-"


def version_id(manifest: "Manifest") -> bytes:
    """32 bytes naming a version's decoded chunks: SHA-256 over the chunk
    and page size, the memory size and each chunk's id, flags and zero
    bitmap. The page map is not in it: the host cache is indexed by chunk."""
    h = hashlib.sha256(b"restore/host-cache/v1\0")
    h.update(struct.pack("<QQQQ", manifest.chunk_size, manifest.page_size, manifest.memory_size,
                         len(manifest.chunks)))
    for c in manifest.chunks:
        h.update(bytes.fromhex(c.id) if c.id else bytes(32))
        h.update(struct.pack("<I", c.flags))
        h.update(c.zero)
    return h.digest()


@dataclass(frozen=True)
class HostVersion:
    """One version's directory in the host cache (HostCache.versions)."""

    path: Path
    bytes: int  # allocated on disk (holes are free)
    last_used: int  # ns, the directory's mtime (set when a session opens it)
    in_use: bool  # some session holds it now
    snapshot: str  # "name/version" it was made for ("?" when unknown)


class HostCache:
    """The host cache under root, at most about budget_bytes on disk.

    Thread-safe; any number of processes may share one root. Sessions get a
    version's directory from open_version() and hand it to the engine,
    which maps and fills the files."""

    def __init__(self, root: str | os.PathLike[str], budget_bytes: int = DEFAULT_BUDGET) -> None:
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes <= 0:
            raise InputError(f"host cache budget_bytes must be a positive number of bytes, got {budget_bytes!r}")
        self.root = Path(os.path.abspath(root))
        self.budget_bytes = budget_bytes
        self._lock = threading.Lock()
        self._ids: dict[int, tuple["Manifest", bytes]] = {}  # id(manifest) -> (manifest, version id)
        try:
            for d in (self.root, self.root / LAYOUT):
                os.makedirs(d, mode=0o700, exist_ok=True)
                os.chmod(d, 0o700)  # decoded guest memory: the server's user only
        except OSError as exc:
            raise InputError(f"host cache directory {self.root} cannot be created: {exc.strerror}") from None

    def open_version(self, manifest: "Manifest") -> tuple[Path, bytes]:
        """(directory, version id) of manifest's version, made if missing and
        marked as just used (its LRU time)."""
        with self._lock:  # a version id is a pass over the chunk table: once per manifest
            known = self._ids.get(id(manifest))
            if known is None or known[0] is not manifest:
                known = self._ids[id(manifest)] = (manifest, version_id(manifest))
        vid = known[1]
        path = self.root / LAYOUT / vid.hex()
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        else:
            info = {"snapshot": f"{manifest.name}/{manifest.version}", "chunk_size": manifest.chunk_size,
                    "chunks": len(manifest.chunks), "memory_size": manifest.memory_size}
            tmp = path / f".info-{secrets.token_hex(4)}"
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), "w") as f:
                f.write(json.dumps(info) + "\n")
            os.replace(tmp, path / "info.json")
        os.utime(path)
        return path, vid

    def fill(self, snapshot: "Snapshot", chunks: Optional[Iterable[int]] = None,
             progress: Callable[[int], None] = lambda n: None) -> int:
        """Decode snapshot's chunks (all, or the given indices) into the host
        cache ahead of any restore, e.g. on deploy; chunks already there are
        skipped, and a chunk another process is filling is waited for.
        Each is read (L1, then the store), verified and decoded by the
        snapshot's codec. Returns the chunks this call wrote; progress is
        called with the chunk size after each chunk."""
        from .._native import ffi, lib

        m = snapshot.manifest
        path, vid = self.open_version(m)

        where = f"host cache {path}"
        out = ffi.new("rs_hostcache **")
        check(lib.rs_hostcache_open(out, os.fsencode(str(path)), len(m.chunks), m.chunk_size, vid),
              "rs_hostcache_open", where, HostCacheError)
        h = out[0]
        written = 0
        buf = bytearray(m.chunk_size)
        waited = ffi.new("int *")
        try:
            for i in range(len(m.chunks)) if chunks is None else chunks:
                entry = m.chunks[i]
                if entry.id is None:  # all zero: nothing to hold
                    progress(m.chunk_size)
                    continue
                rc = check(lib.rs_hostcache_claim(h, i, waited), "rs_hostcache_claim", where, HostCacheError)
                if rc == 0:
                    try:
                        snapshot.read_chunk(i, buf)
                    except BaseException:
                        lib.rs_hostcache_abandon(h, i)
                        raise
                    check(lib.rs_hostcache_fill(h, i, ffi.from_buffer(buf), entry.zero, m.page_size),
                          "rs_hostcache_fill", where, HostCacheError)
                    written += 1
                progress(m.chunk_size)
        finally:
            lib.rs_hostcache_close(h)
        return written

    def versions(self) -> list[HostVersion]:
        """Every version in the cache, least recently used first."""
        out = []
        for path, size, last in self._scan():
            with _unused(path) as unused:
                in_use = not unused
            out.append(HostVersion(path, size, last, in_use, _snapshot_of(path)))
        return out

    def usage(self) -> int:
        """Bytes allocated on disk by every version (a scan)."""
        return sum(size for _, size, _ in self._scan())

    def _scan(self) -> list[tuple[Path, int, int]]:
        """(directory, allocated bytes, last used ns) of every version, least
        recently used first."""
        out = []
        try:
            entries = list(os.scandir(self.root / LAYOUT))
        except FileNotFoundError:
            return out
        for d in entries:
            if d.name.startswith(".") or not d.is_dir(follow_symlinks=False):
                continue
            try:
                last = d.stat(follow_symlinks=False).st_mtime_ns
                size = sum(_allocated(Path(d.path) / f) for f in ("data", "state"))
            except FileNotFoundError:
                continue  # evicted meanwhile
            out.append((Path(d.path), size, last))
        return sorted(out, key=lambda v: v[2])

    def evict(self, target_bytes: int | None = None) -> int:
        """Remove least recently used versions no session uses until usage is
        at most target_bytes (default: LOW_WATER_PERCENT of the budget) or
        only versions in use are left; returns the bytes freed. Versions in
        use stay, whatever the budget: they are removed by a later call,
        once their sessions have ended."""
        if target_bytes is None:
            target_bytes = self.budget_bytes * LOW_WATER_PERCENT // 100
        elif target_bytes < 0:
            raise InputError(f"host cache eviction target must be >= 0 bytes, got {target_bytes!r}")
        lock = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        freed = 0
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._remove_leftovers()
            versions = self._scan()
            remaining = sum(size for _, size, _ in versions)
            for path, size, _ in versions:
                if remaining <= target_bytes:
                    break
                if self._remove_unused(path):
                    freed += size
                    remaining -= size
        finally:
            os.close(lock)
        return freed

    def evict_if_over(self) -> int:
        """evict() when usage is past the budget; 0 otherwise."""
        with self._lock:
            return self.evict() if self.usage() > self.budget_bytes else 0

    def _remove_unused(self, path: Path) -> bool:
        """Remove a version's directory if no session holds it."""
        with _unused(path) as unused:
            if not unused:
                return False
            # Renamed while held: an opener that races us finds its file
            # gone from the path and opens a new version directory.
            dead = self.root / f"{_EVICT_PREFIX}{secrets.token_hex(8)}"
            os.rename(path, dead)
        shutil.rmtree(dead, ignore_errors=True)
        return True

    def _remove_leftovers(self) -> None:
        for d in os.scandir(self.root):
            if d.name.startswith(_EVICT_PREFIX):
                shutil.rmtree(d.path, ignore_errors=True)


def _allocated(path: Path) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


@contextmanager
def _unused(path: Path) -> Iterator[bool]:
    """True, holding LOCK_EX on the version's state file for the block, when
    no session uses the version (one that no session ever opened has no
    state file: nothing can hold it); False when a session holds it."""
    try:
        fd = os.open(path / "state", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _snapshot_of(path: Path) -> str:
    try:
        return str(json.loads((path / "info.json").read_text())["snapshot"])
    except (OSError, ValueError, KeyError, TypeError):
        return "?"


__all__ = ["DEFAULT_BUDGET", "HostCache", "HostVersion", "version_id"]
