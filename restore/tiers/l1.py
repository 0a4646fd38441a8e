"""L1: the local chunk cache, content-addressed files under one root directory.

On-disk layout (the C engine reads these files directly, csrc/l1.c;
keep the two in step)::

    ROOT/                     created (mode 0700) if missing
      .lock                   empty file; flock(LOCK_EX) on it is held while evicting
      ab/                     the id's first two hex digits; made 0700 on demand, never removed
        ab12…ef               name = chunk id = lowercase hex SHA-256 (64 chars) of the file's
                              bytes; content = exactly the chunk's stored bytes (lz4 block,
                              maybe AES-256-GCM; see csrc/chunk.h), no header, no trailer
        .tmp-ab12…ef-<pid>-<8 hex>
                              a write in progress (or left by a crashed writer)

Entries are never written in place: a writer fills a dot-prefixed temp file in the
entry's directory, then os.replace()s it onto the entry (atomic), so an open fd always
sees one whole version. A reader opens ROOT/<id[0:2]>/<id>, reads to EOF and checks
SHA-256 against the name: ENOENT is a miss, a mismatch is a miss and the file is
unlinked. Scans skip every dot file; temp files older than an hour are removed.

LRU clock: the file's mtime (atime is unreliable under relatime/noatime). A hit or a
repeated put sets it to now (futimens / os.utime). Eviction takes the flock, rescans
the true usage (other processes write too), and unlinks oldest-mtime entries until usage
is at most the target (default 90 % of the budget). Unlinking a file another process has
open is fine on POSIX. Since the order lives in mtimes, it survives restarts.

The budget is soft across processes: each process evicts when its own running estimate
(usage at its last scan plus its own writes since) exceeds the budget, so with k writers
usage can briefly exceed the budget by about (k - 1) x 10 % of it.

fsync policy: entries verify themselves by their name, and every reader verifies, so a
file torn by a crash is detected and dropped; by default nothing is fsynced. With
fsync=True the temp file is fsynced before the rename and its directory after it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import secrets
import stat
import threading
import time
from pathlib import Path

from ..errors import ChunkHashMismatch, InputError

DEFAULT_BUDGET = 8 << 30  # bytes
LOW_WATER_PERCENT = 90  # evict() without a target frees down to this share of the budget
STALE_TEMP_SECONDS = 3600  # temp files older than this belong to a crashed writer
_ID_RE = re.compile(r"[0-9a-f]{64}")
_TMP_PREFIX = ".tmp-"


def _check_id(chunk_id: object) -> str:
    """Return chunk_id if it is 64 lowercase hex characters, else raise InputError."""
    if isinstance(chunk_id, str) and _ID_RE.fullmatch(chunk_id):
        return chunk_id
    shown = repr(chunk_id)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    raise InputError(
        f"invalid chunk id {shown}: a chunk id is 64 lowercase hex characters (SHA-256)")


class L1Cache:
    """Chunk cache in local files under root, at most about budget_bytes of entries.

    Thread-safe; several processes may share one root. Sizes are in bytes.
    """

    def __init__(self, root: str | os.PathLike[str], budget_bytes: int = DEFAULT_BUDGET,
                 fsync: bool = False) -> None:
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes <= 0:
            raise InputError(
                f"L1 cache budget_bytes must be a positive number of bytes, got {budget_bytes!r}")
        self.root = Path(os.path.abspath(root))
        self.budget_bytes = budget_bytes
        self.fsync = fsync
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        self._lock = threading.Lock()  # guards the two counters below
        self._estimate: int | None = None  # bytes; None until the first scan
        self._written = 0  # bytes this instance has written, ever

    def path(self, chunk_id: str) -> Path:
        """Where the entry for chunk_id lives or would live: ROOT/<id[0:2]>/<id>."""
        _check_id(chunk_id)
        return self.root / chunk_id[:2] / chunk_id

    def contains(self, chunk_id: str) -> bool:
        """True if an entry file exists (its bytes are not verified here)."""
        try:
            return stat.S_ISREG(os.stat(self.path(chunk_id)).st_mode)
        except FileNotFoundError:
            return False

    def get(self, chunk_id: str) -> bytes | None:
        """The verified stored bytes of chunk_id, or None on a miss.

        A hit refreshes the entry's LRU time. A file whose SHA-256 is not its name is
        unlinked and reported as a miss.
        """
        p = self.path(chunk_id)
        try:
            with open(p, "rb") as f:
                data = f.read()
                if hashlib.sha256(data).hexdigest() == chunk_id:
                    try:
                        os.utime(f.fileno())  # LRU refresh, best effort: the bytes are good
                    except OSError:
                        pass
                    return data
                mine = os.fstat(f.fileno())
        except FileNotFoundError:
            return None
        try:  # unlink only the damaged inode we read, not a good copy put since
            now = os.stat(p)
            if (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
                os.unlink(p)
                self._shrink(mine.st_size)
        except FileNotFoundError:
            pass
        return None

    def put(self, chunk_id: str, data: bytes | memoryview, replace: bool = False, verified: bool = False) -> None:
        """Store data under chunk_id, atomically; evict if over budget afterwards.

        Raises ChunkHashMismatch if SHA-256 of data is not chunk_id (not checked
        again when verified is set: the caller, e.g. the engine, just did). If
        the entry is already present with the same size, only its LRU time is
        refreshed, unless replace is set (the caller knows the file on disk
        failed verification).
        """
        p = self.path(chunk_id)
        view = memoryview(data).cast("B")
        actual = chunk_id if verified else hashlib.sha256(view).hexdigest()
        if actual != chunk_id:
            raise ChunkHashMismatch(
                f"chunk {chunk_id}: SHA-256 of the {view.nbytes} bytes given is {actual},"
                " not the chunk id")
        try:
            if not replace and os.stat(p).st_size == view.nbytes:
                os.utime(p)
                return
        except FileNotFoundError:
            pass  # absent, or evicted between stat and utime: write it
        if self._estimate is None:
            self.usage()  # first write since start: learn what earlier runs left
        self._write(p, view)
        with self._lock:
            self._written += view.nbytes
            if self._estimate is not None:
                self._estimate += view.nbytes
            over = self._estimate is not None and self._estimate > self.budget_bytes
        if over:
            self.evict()

    def discard(self, chunk_id: str) -> bool:
        """Remove chunk_id's entry; True if this call removed it."""
        p = self.path(chunk_id)
        try:
            size = os.stat(p).st_size
            os.unlink(p)
        except FileNotFoundError:
            return False
        self._shrink(size)
        return True

    def usage(self) -> int:
        """True total size in bytes of the entries on disk (a scan); resets the estimate."""
        with self._lock:
            written = self._written
        total = sum(size for _, size, _ in self._scan())
        with self._lock:
            self._estimate = total + self._written - written
        return total

    def usage_estimate(self) -> int:
        """This process's running estimate of usage() in bytes: the last
        scan plus its own writes and evictions since (scans first if it has
        never scanned). Cheap; other processes' writes are not in it."""
        with self._lock:
            estimate = self._estimate
        return self.usage() if estimate is None else estimate

    def __len__(self) -> int:
        """Number of entries on disk (a scan)."""
        return len(self._scan())

    def evict(self, target_bytes: int | None = None) -> int:
        """Unlink least recently used entries until usage <= target_bytes; return bytes freed.

        The default target is LOW_WATER_PERCENT of the budget. Holds the flock on
        ROOT/.lock, so evictions in all processes sharing the root run one at a time.
        """
        if target_bytes is None:
            target_bytes = self.budget_bytes * LOW_WATER_PERCENT // 100
        elif target_bytes < 0:
            raise InputError(f"L1 cache eviction target must be >= 0 bytes, got {target_bytes!r}")
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with self._lock:
                written = self._written
            entries = sorted(self._scan())  # oldest mtime first
            remaining = sum(size for _, size, _ in entries)
            freed = 0
            for _, size, path in entries:
                if remaining <= target_bytes:
                    break
                try:
                    os.unlink(path)
                    freed += size
                except FileNotFoundError:
                    pass  # another process removed it; it is gone either way
                remaining -= size
            with self._lock:  # writes that raced the scan are counted, conservatively
                self._estimate = remaining + self._written - written
            return freed
        finally:
            os.close(fd)  # releases the flock

    def _shrink(self, nbytes: int) -> None:
        """Lower the usage estimate by nbytes removed by this instance."""
        with self._lock:
            if self._estimate is not None:
                self._estimate = max(0, self._estimate - nbytes)

    def _write(self, p: Path, view: memoryview) -> None:
        """Write view to a temp file beside p and rename it onto p."""
        tmp = p.parent / f"{_TMP_PREFIX}{p.name}-{os.getpid()}-{secrets.token_hex(4)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileNotFoundError:  # first entry in this subdirectory (or root removed)
            os.makedirs(p.parent, mode=0o700, exist_ok=True)
            if self.fsync:
                _fsync_dir(self.root)
            fd = os.open(tmp, flags, 0o600)
        try:
            with open(fd, "wb") as f:
                f.write(view)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, p)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        if self.fsync:
            _fsync_dir(p.parent)

    def _scan(self) -> list[tuple[int, int, str]]:
        """(mtime ns, size bytes, path) of every entry; removes stale temp files."""
        stale_before = time.time_ns() - STALE_TEMP_SECONDS * 1_000_000_000
        entries: list[tuple[int, int, str]] = []
        try:
            top = list(os.scandir(self.root))
        except FileNotFoundError:
            return entries
        for d in top:
            if len(d.name) != 2 or d.name.startswith(".") or not d.is_dir(follow_symlinks=False):
                continue
            try:
                with os.scandir(d.path) as it:
                    for e in it:
                        try:
                            if e.name.startswith(_TMP_PREFIX):
                                if e.stat(follow_symlinks=False).st_mtime_ns < stale_before:
                                    os.unlink(e.path)
                            elif _ID_RE.fullmatch(e.name) and e.name.startswith(d.name):
                                st = e.stat(follow_symlinks=False)
                                if stat.S_ISREG(st.st_mode):
                                    entries.append((st.st_mtime_ns, st.st_size, e.path))
                        except FileNotFoundError:
                            pass  # renamed or removed by another process meanwhile
            except FileNotFoundError:
                pass
        return entries


def _fsync_dir(path: Path) -> None:
    """fsync a directory, making the names created in it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
