"""A guest that runs SQLite queries against a database inside its own memory.

    python -m bench.sqlguest --backing uffd --size BYTES --socket PATH \\
        --db-offset N --db-length N --requests FILE [--out FILE]
    python -m bench.sqlguest --backing resident|mmap --image FILE --size BYTES ...

The child process of bench/realistic.py's workload (never the handler's
process: a thread blocked on a missing page keeps whatever it holds). Its
memory is a memory image of `--size` bytes that holds an SQLite database of
`--db-length` bytes at file offset `--db-offset` (page aligned). It gets
that memory the way restore.guest.Guest does:

  resident  anonymous memory, the image read into it in full first; the
            clock starts after the read (the floor)
  mmap      the image mapped MAP_PRIVATE (Firecracker's File backend; the
            caller makes the page cache warm or cold)
  uffd      anonymous private memory registered MISSING with a new
            userfaultfd, sent with Firecracker's handshake (a JSON array of
            regions plus the uffd as one SCM_RIGHTS fd) to a handler on a
            Unix socket; the connection stays open until the guest is done

Then SQLite's own code opens the database in place: libsqlite3's
sqlite3_deserialize (through ctypes) with SQLITE_DESERIALIZE_READONLY and
neither FREEONCLOSE nor RESIZEABLE takes a pointer into the mapped memory,
and PRAGMA mmap_size lets the pager read pages straight from it (xFetch of
the memdb VFS: no copy at all). Every page of the database that SQLite does
not touch is never read, so the guest touches what its queries need: the
schema, the interior pages of the b-trees and the leaves they lead to.

The requests file is a JSON array of [sql, [params...]] pairs; the answer
of each is its list of rows (each a list of int, float, str or null). The
result, on stdout or in --out, is JSON: {"answers": [...], "total_ns": N,
...}, where total_ns is restore-to-done: from the start of mapping (and,
for uffd, the handshake) — for resident, from memory in place — to the end
of the last query. Loading libsqlite3 and reading the requests happen
before the clock starts, in every backing.
"""

from __future__ import annotations

import argparse
import array
import ctypes
import ctypes.util
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
BACKINGS = ("resident", "mmap", "uffd")
PAGE = 4096

# <sqlite3.h>
SQLITE_OK = 0
SQLITE_ROW = 100
SQLITE_DONE = 101
SQLITE_INTEGER, SQLITE_FLOAT, SQLITE_TEXT, SQLITE_BLOB, SQLITE_NULL = 1, 2, 3, 4, 5
SQLITE_OPEN_READWRITE = 0x2
SQLITE_OPEN_CREATE = 0x4
SQLITE_DESERIALIZE_READONLY = 4  # and not FREEONCLOSE (1) nor RESIZEABLE (2): the buffer stays ours
SQLITE_TRANSIENT = ctypes.c_void_p(-1)

# <sys/mman.h>
PROT_READ, PROT_WRITE = 0x1, 0x2
MAP_PRIVATE, MAP_ANONYMOUS, MAP_NORESERVE = 0x02, 0x20, 0x4000
MAP_FAILED = ctypes.c_void_p(-1).value


class GuestFailure(RuntimeError):
    """The guest could not map its memory, hand it over or run a query."""


# -- the child -------------------------------------------------------------------


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def _mmap(libc, size: int, flags: int, fd: int = -1) -> int:
    addr = libc.mmap(None, size, PROT_READ | PROT_WRITE, flags, fd, 0)
    if addr is None or addr == MAP_FAILED:
        e = ctypes.get_errno()
        raise GuestFailure(f"mmap of {size} bytes: {os.strerror(e)}")
    return addr


class SQLite:
    """The few libsqlite3 calls the guest needs, through ctypes. Every call
    releases the GIL (ctypes.CDLL does), not that anything else runs here."""

    def __init__(self, path: Optional[str] = None):
        path = path or ctypes.util.find_library("sqlite3")
        if not path:
            raise GuestFailure("libsqlite3 not found (ctypes.util.find_library('sqlite3'))")
        lib = self.lib = ctypes.CDLL(path)
        vp, i, i64, cp = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_char_p
        for name, res, args in [
            ("sqlite3_libversion", cp, []),
            ("sqlite3_open_v2", i, [cp, ctypes.POINTER(vp), i, cp]),
            ("sqlite3_close_v2", i, [vp]),
            ("sqlite3_errmsg", cp, [vp]),
            ("sqlite3_deserialize", i, [vp, cp, vp, i64, i64, ctypes.c_uint]),
            ("sqlite3_prepare_v2", i, [vp, cp, i, ctypes.POINTER(vp), ctypes.POINTER(cp)]),
            ("sqlite3_bind_int64", i, [vp, i, i64]),
            ("sqlite3_bind_double", i, [vp, i, ctypes.c_double]),
            ("sqlite3_bind_text", i, [vp, i, cp, i, vp]),
            ("sqlite3_bind_null", i, [vp, i]),
            ("sqlite3_step", i, [vp]),
            ("sqlite3_reset", i, [vp]),
            ("sqlite3_clear_bindings", i, [vp]),
            ("sqlite3_finalize", i, [vp]),
            ("sqlite3_column_count", i, [vp]),
            ("sqlite3_column_type", i, [vp, i]),
            ("sqlite3_column_int64", i64, [vp, i]),
            ("sqlite3_column_double", ctypes.c_double, [vp, i]),
            ("sqlite3_column_text", vp, [vp, i]),
            ("sqlite3_column_bytes", i, [vp, i]),
            ("sqlite3_db_status", i, [vp, i, ctypes.POINTER(i), ctypes.POINTER(i), i]),
        ]:
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        self.version = lib.sqlite3_libversion().decode()
        self.db = ctypes.c_void_p()
        self._stmts: dict[str, ctypes.c_void_p] = {}

    def _check(self, rc: int, what: str) -> None:
        if rc != SQLITE_OK:
            msg = self.lib.sqlite3_errmsg(self.db) if self.db else None
            raise GuestFailure(f"{what}: SQLite error {rc}: {msg.decode() if msg else '?'}")

    def open_in_place(self, addr: int, length: int) -> None:
        """Make the `length` bytes at address `addr` the main database,
        read only, owned by the caller: SQLite reads them where they are."""
        self._check(self.lib.sqlite3_open_v2(b":memory:", ctypes.byref(self.db),
                                             SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, None), "sqlite3_open_v2")
        self._check(self.lib.sqlite3_deserialize(self.db, b"main", addr, length, length,
                                                 SQLITE_DESERIALIZE_READONLY), "sqlite3_deserialize")

    def query(self, sql: str, params: Sequence = ()) -> list[list]:
        """Run one statement (prepared once, then reused) and return its rows."""
        lib = self.lib
        stmt = self._stmts.get(sql)
        if stmt is None:
            stmt = ctypes.c_void_p()
            self._check(lib.sqlite3_prepare_v2(self.db, sql.encode(), -1, ctypes.byref(stmt), None),
                        f"preparing {sql!r}")
            self._stmts[sql] = stmt
        for n, v in enumerate(params, 1):
            if v is None:
                rc = lib.sqlite3_bind_null(stmt, n)
            elif isinstance(v, bool) or isinstance(v, int):
                rc = lib.sqlite3_bind_int64(stmt, n, int(v))
            elif isinstance(v, float):
                rc = lib.sqlite3_bind_double(stmt, n, v)
            else:
                b = str(v).encode()
                rc = lib.sqlite3_bind_text(stmt, n, b, len(b), SQLITE_TRANSIENT)
            self._check(rc, f"binding parameter {n} of {sql!r}")
        rows = []
        ncol = lib.sqlite3_column_count(stmt)
        try:
            while True:
                rc = lib.sqlite3_step(stmt)
                if rc == SQLITE_DONE:
                    break
                if rc != SQLITE_ROW:
                    self._check(rc, f"running {sql!r}")
                row = []
                for c in range(ncol):
                    t = lib.sqlite3_column_type(stmt, c)
                    if t == SQLITE_INTEGER:
                        row.append(lib.sqlite3_column_int64(stmt, c))
                    elif t == SQLITE_FLOAT:
                        row.append(lib.sqlite3_column_double(stmt, c))
                    elif t == SQLITE_NULL:
                        row.append(None)
                    else:  # text (blobs are not in this schema; shown as text)
                        p = lib.sqlite3_column_text(stmt, c)
                        row.append(ctypes.string_at(p, lib.sqlite3_column_bytes(stmt, c)).decode("utf-8", "replace"))
                rows.append(row)
        finally:
            lib.sqlite3_reset(stmt)
            lib.sqlite3_clear_bindings(stmt)
        return rows

    def cache_used(self) -> int:
        """Bytes of heap SQLite's page cache holds (SQLITE_DBSTATUS_CACHE_USED):
        small when the pager reads pages in place (xFetch), not copies."""
        cur, hi = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.sqlite3_db_status(self.db, 1, ctypes.byref(cur), ctypes.byref(hi), 0), "sqlite3_db_status")
        return cur.value

    def close(self) -> None:
        for stmt in self._stmts.values():
            self.lib.sqlite3_finalize(stmt)
        self._stmts.clear()
        if self.db:
            self.lib.sqlite3_close_v2(self.db)
            self.db = ctypes.c_void_p()


def _handshake(socket_path: str, base: int, size: int, uffd_fd: int) -> socket.socket:
    """Firecracker's UFFD handshake: one message, the regions as JSON with the
    uffd as SCM_RIGHTS; the connection stays open (its end tells the handler
    the guest is gone)."""
    payload = json.dumps([{"base_host_virt_addr": base, "size": size, "offset": 0,
                           "page_size": PAGE, "page_size_kib": PAGE}]).encode()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(socket_path)
    n = s.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [uffd_fd]))])
    if n < len(payload):
        s.sendall(payload[n:])
    return s


def run(backing: str, size: int, db_offset: int, db_length: int, requests: list,
        image: Optional[str] = None, socket_path: Optional[str] = None) -> dict:
    """The guest itself: map, hand over, open the database in place, answer."""
    if backing not in BACKINGS:
        raise GuestFailure(f"backing {backing!r} is not one of {', '.join(BACKINGS)}")
    if size % PAGE or db_offset % PAGE or db_offset + db_length > size:
        raise GuestFailure(f"the database [{db_offset}, +{db_length}) must start on a page inside {size} bytes")
    libc = _libc()
    sql = SQLite()
    uffd = sock = None
    fd = -1
    if backing == "uffd":
        from restore.uffd import Feature, Userfaultfd  # a separate process: restore's bindings are fine here

        t0 = time.monotonic_ns()
        base = _mmap(libc, size, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE)
        uffd = Userfaultfd(Feature.EVENT_REMOVE)  # O_NONBLOCK|O_CLOEXEC, as Firecracker makes it
        uffd.register(base, size, missing=True)
        sock = _handshake(socket_path, base, size, uffd.fileno())
    elif backing == "mmap":
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
        t0 = time.monotonic_ns()
        base = _mmap(libc, size, MAP_PRIVATE, fd)
    else:
        base = _mmap(libc, size, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE)
        view = memoryview((ctypes.c_char * size).from_address(base)).cast("B")
        with open(image, "rb", buffering=0) as f:
            done = 0
            while done < size:
                n = f.readinto(view[done:])
                if not n:
                    raise GuestFailure(f"{image} is shorter than {size} bytes")
                done += n
        view.release()
        t0 = time.monotonic_ns()
    try:
        sql.open_in_place(base + db_offset, db_length)
        # Let the pager take pages straight from the buffer (memdb's xFetch)
        # instead of copying each into its page cache. (memdb does not
        # report the setting back: cache_used shows it took.)
        sql.query(f"PRAGMA mmap_size={db_length}")
        answers = [sql.query(q, p) for q, p in requests]
        total_ns = time.monotonic_ns() - t0
        cache_used = sql.cache_used()
        sql.close()
    finally:
        if sock is not None:
            sock.close()
        if uffd is not None:
            uffd.close()
        libc.munmap(base, size)
        if fd >= 0:
            os.close(fd)
    return {"answers": answers, "total_ns": total_ns, "sqlite": sql.version, "backing": backing,
            "page_cache_bytes": cache_used, "queries": len(requests)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backing", choices=BACKINGS, required=True)
    ap.add_argument("--size", type=int, required=True, help="bytes of guest memory (the image's size)")
    ap.add_argument("--image", help="the memory image (resident, mmap)")
    ap.add_argument("--socket", help="the handler's Unix socket (uffd)")
    ap.add_argument("--db-offset", type=int, required=True, help="bytes: where the database starts in memory")
    ap.add_argument("--db-length", type=int, required=True, help="bytes of database")
    ap.add_argument("--requests", required=True, help="JSON array of [sql, [params]]")
    ap.add_argument("--out", help="write the result here (default: stdout)")
    args = ap.parse_args(argv)
    if (args.backing == "uffd") != (args.socket is not None) or (args.backing != "uffd") != (args.image is not None):
        ap.error("uffd needs --socket (and no --image); resident and mmap need --image (and no --socket)")
    requests = json.loads(Path(args.requests).read_text())
    try:
        res = run(args.backing, args.size, args.db_offset, args.db_length, requests, args.image, args.socket)
    except (GuestFailure, OSError) as exc:
        print(f"sqlguest: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(res)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


# -- the parent's side ---------------------------------------------------------------


@dataclass(frozen=True)
class SQLGuestResult:
    answers: list  # one list of rows per request
    total_ns: int  # restore-to-done, as the guest measured it
    info: dict  # the rest of the guest's report (sqlite version, mmap_size, ...)

    @property
    def ms(self) -> float:
        return self.total_ns / 1e6


def run_guest(backing: str, size: int, db_offset: int, db_length: int, requests_file: str | os.PathLike,
              *, image: str | os.PathLike | None = None, socket_path: str | os.PathLike | None = None,
              timeout: float = 600) -> SQLGuestResult:
    """Run `python -m bench.sqlguest` in a child process and return what it
    answered. Raises GuestFailure with its stderr when it fails, or when it
    runs past timeout seconds (it is killed)."""
    cmd = [sys.executable, "-m", "bench.sqlguest", "--backing", backing, "--size", str(size),
           "--db-offset", str(db_offset), "--db-length", str(db_length), "--requests", os.fspath(requests_file)]
    if image is not None:
        cmd += ["--image", os.fspath(image)]
    if socket_path is not None:
        cmd += ["--socket", os.fspath(socket_path)]
    try:
        # One OpenBLAS thread, should numpy come in: more would spin on the
        # CPUs being measured (restore.guest.Guest does the same).
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
        proc = subprocess.run(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise GuestFailure(f"the {backing} SQLite guest did not finish within {timeout} s (killed)") from None
    if proc.returncode != 0:
        why = proc.stderr.decode(errors="replace").strip().splitlines()
        sig = f" (signal {-proc.returncode})" if proc.returncode < 0 else ""
        raise GuestFailure(f"the {backing} SQLite guest exited {proc.returncode}{sig}: "
                           f"{why[-1] if why else 'no output'}")
    res = json.loads(proc.stdout)
    answers = res.pop("answers")
    return SQLGuestResult(answers=answers, total_ns=int(res.pop("total_ns")), info=res)


if __name__ == "__main__":
    sys.exit(main())
