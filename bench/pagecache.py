"""The page-cache state of the files a benchmark run reads, set and checked.

    set_state("cold", [image, l1.root, host.root])  # -> bytes resident after
    set_state("warm", [...])

"cold" writes back dirty pages (``sync``) and drops every page of the
files from the page cache (``POSIX_FADV_DONTNEED``), so that what a run
reads comes from the disk; "warm" does the same and then reads every file
in full, so that it comes from the page cache, and from the same page cache
whatever ran before: how a file's pages came in (read(), or faults on a
mapping, whose readahead makes other folios) changes what mapping them
later costs. Either way the files' resident bytes are then
counted with ``mincore``, for the results to show what the state was
rather than what was asked for. Directories stand for every regular file
under them. A page mapped by a running process cannot be dropped; the
count shows it.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path
from typing import Iterable

import numpy as np

STATES = ("warm", "cold")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The regular files named, or under the directories named; missing
    paths give none."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and not f.is_symlink()))
    return out


def evict(paths: Iterable[str | os.PathLike]) -> None:
    _evict(files(paths))


def _evict(fs: list[Path]) -> None:
    os.sync()  # DONTNEED drops clean pages only
    for f in fs:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def preload(paths: Iterable[str | os.PathLike]) -> None:
    _preload(files(paths))


def _preload(fs: list[Path]) -> None:
    buf = bytearray(1 << 20)
    for f in fs:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def resident_bytes(paths: Iterable[str | os.PathLike]) -> int:
    """Bytes of the files' pages in the page cache now (mincore)."""
    return _resident(files(paths))


def _resident(fs: list[Path]) -> int:
    return sum(int(np.count_nonzero(resident_pages(f))) * _PAGE for f in fs)


def resident_pages(path: str | os.PathLike) -> np.ndarray:
    """One bool per page of the file: in the page cache now (mincore)."""
    size = os.stat(path).st_size
    if not size:
        return np.zeros(0, dtype=bool)
    with open(path, "rb") as fh:
        m = mmap.mmap(fh.fileno(), size, prot=mmap.PROT_READ)
    try:
        view = np.frombuffer(m, dtype=np.uint8)
        vec = np.zeros((size + _PAGE - 1) // _PAGE, dtype=np.uint8)
        rc = _libc.mincore(view.ctypes.data, size, vec.ctypes.data)
        del view
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mincore on {path}: {os.strerror(err)}")
        return (vec & 1).astype(bool)
    finally:
        m.close()


def set_state(state: str, paths: Iterable[str | os.PathLike]) -> int:
    """Make the files cold or warm; their resident bytes afterwards."""
    if state not in STATES:
        raise ValueError(f"cache state {state!r} is not one of {', '.join(STATES)}")
    fs = files(paths)  # one walk of the directories for the three passes
    _evict(fs)
    if state == "warm":  # the same page cache, whatever ran before (see the module's docstring)
        _preload(fs)
    return _resident(fs)
