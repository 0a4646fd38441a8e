"""A guest process that plays Firecracker, for `restore try`, tests and benchmarks.

Guest runs csrc/guest.c's rs_guest_run (in restore._testbed) in a CHILD
process: it maps its regions, sends the userfaultfd over a Unix socket
exactly as Firecracker's UFFD backend does (docs/firecracker.md), then
reads, writes and removes pages along a trace (reads, writes, remove, wait)
and reports a checksum and a time per step. A guest must never share a
process (or a GIL) with the handler serving it: a thread blocked on a fault
keeps holding whatever it holds.

`python -m restore.guest DIR` is the child's entry point (main()); the
parent and child talk through .npy and .json files in DIR.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from ._native import load_testbed
from .errors import InputError, RestoreError

ffi, lib = load_testbed()

# One trace step, matching rs_guest_op (csrc/guest.h): file offset in bytes,
# op (READ/WRITE/REMOVE) and pages (REMOVE length; 1 for READ and WRITE).
GUEST_OP_DTYPE = np.dtype([("offset", "<u8"), ("op", "<u4"), ("pages", "<u4")])
READ: int = lib.RS_GUEST_READ
WRITE: int = lib.RS_GUEST_WRITE
REMOVE: int = lib.RS_GUEST_REMOVE
WAIT: int = lib.RS_GUEST_WAIT
_OP_NAMES = {READ: "read", WRITE: "write", REMOVE: "remove", WAIT: "wait"}
BACKINGS = {"uffd": None, "resident": lib.RS_GUEST_RESIDENT, "mmap": lib.RS_GUEST_MMAP}
assert GUEST_OP_DTYPE.itemsize == ffi.sizeof("rs_guest_op")

# ns[i] of a step the guest has not finished (it never takes 2^64-1 ns).
_NOT_DONE = np.uint64(2**64 - 1)


class GuestError(RestoreError):
    """The guest failed: the C guest's one-line reason, or the signal that killed it.

    errno: the error code rs_guest_run returned, else None.
    signal: the number of the signal that killed the guest, else None.
    op: index of the trace step the guest died in (signals only), else None.
    """

    def __init__(self, message: str, *, errno: Optional[int] = None, signal: Optional[int] = None,
                 op: Optional[int] = None):
        super().__init__(message)
        self.errno = errno
        self.signal = signal
        self.op = op


class GuestTimeout(GuestError, TimeoutError):
    """The guest was still running when wait() gave up (it is left running)."""


@dataclass(frozen=True)
class GuestResult:
    """What a guest saw, one entry per trace step.

    sums: uint64 checksums (rs_mem_checksum of the page; 0 for REMOVE).
    ns: uint64 CLOCK_MONOTONIC nanoseconds of the first touch of the page
        (the fault round trip when it was missing), or of the madvise call.
    """

    sums: np.ndarray
    ns: np.ndarray
    total_ns: int = 0  # restore-to-done, as rs_guest_run / rs_guest_run_local define it


def _ops(offsets: Iterable[int], op: int, pages: int = 1) -> np.ndarray:
    offsets = np.asarray(list(offsets) if not isinstance(offsets, np.ndarray) else offsets, dtype=np.uint64)
    out = np.zeros(offsets.shape[0], dtype=GUEST_OP_DTYPE)
    out["offset"] = offsets
    out["op"] = op
    out["pages"] = pages
    return out


def reads(offsets: Iterable[int]) -> np.ndarray:
    """A trace reading the page at each file offset (bytes), in order."""
    return _ops(offsets, READ)


def writes(offsets: Iterable[int]) -> np.ndarray:
    """A trace writing the page at each file offset (bytes), in order.

    Step i of the whole trace fills its page with the byte 1 + i % 255
    (rs_guest_pattern); restore.testing.written_sum(i, page_size) is the
    checksum the guest then reports.
    """
    return _ops(offsets, WRITE)


def remove(offset: int, pages: int = 1) -> np.ndarray:
    """A one-step trace: madvise(MADV_DONTNEED) pages pages from file offset (bytes)."""
    return _ops([offset], REMOVE, pages)


def wait() -> np.ndarray:
    """A trace step that waits for the handler's go-ahead (one byte on the
    handshake socket), e.g. until a blocking prefetch is done."""
    out = np.zeros(1, dtype=GUEST_OP_DTYPE)
    out["op"] = WAIT
    out["pages"] = 1
    return out


class Guest:
    """A guest VMM in a child process, restoring through a handler at socket_path.

    regions: (size, offset) pairs in bytes, in the memory file; or
    memory_size: bytes, one region at offset 0. page_size: bytes (4096, or
    2 MiB with hugetlb=True). remove_events=False leaves
    UFFD_FEATURE_EVENT_REMOVE off, as a VMM without a balloon may: a dropped
    range then faults again without the handler being told. memfd=True backs
    the memory with a memfd (shared, registered MISSING|MINOR) and sends it
    after the uffd, as memfd-backed Firecracker builds do. user=(uid, gid)
    runs the child as that uid and gid, as a jailer runs a VMM (needs root;
    see _become).
    close_conn=True closes the connection right after sending the handshake
    and runs on, as Firecracker v1.10 and v1.11 do (no wait() steps then);
    by default it stays open until the trace is done, as in v1.12. A Guest runs one
    trace: start(ops) then wait(), or run(ops). Use it as a context manager: leaving kills the child if it
    still runs and removes its files.
    """

    def __init__(
        self,
        socket_path: Union[str, os.PathLike],
        regions: Optional[Sequence[tuple[int, int]]] = None,
        memory_size: Optional[int] = None,
        page_size: int = 4096,
        hugetlb: bool = False,
        backing: str = "uffd",
        image: Optional[Union[str, os.PathLike]] = None,
        remove_events: bool = True,
        memfd: bool = False,
        user: Optional[tuple[int, int]] = None,
        close_conn: bool = False,
    ):
        if (regions is None) == (memory_size is None):
            raise InputError("give a Guest either regions or memory_size")
        if backing not in BACKINGS:
            raise InputError(f"backing {backing!r} is not one of {', '.join(BACKINGS)}")
        if (backing == "uffd") != (image is None):
            raise InputError("a guest backed by the memory file (resident, mmap) needs image, and only it")
        self.backing = backing
        self.image = os.fspath(image) if image is not None else None
        self.socket_path = os.fspath(socket_path)
        self.regions = [(int(s), int(o)) for s, o in regions] if regions is not None else [(int(memory_size), 0)]
        self.page_size = int(page_size)
        self.hugetlb = bool(hugetlb)
        self.remove_events = bool(remove_events)
        self.memfd = bool(memfd)
        self.user = (int(user[0]), int(user[1])) if user is not None else None
        self.close_conn = bool(close_conn)
        self._proc: Optional[subprocess.Popen] = None
        self._dir: Optional[Path] = None
        self._ops: Optional[np.ndarray] = None

    @property
    def pid(self) -> Optional[int]:
        """The child's process id once started."""
        return self._proc.pid if self._proc else None

    def start(self, ops: np.ndarray) -> "Guest":
        """Launch the child on the trace ops (GUEST_OP_DTYPE); returns at once."""
        if self._proc is not None:
            raise InputError("this Guest has been started already: make a new one per trace")
        self._ops = np.ascontiguousarray(ops, dtype=GUEST_OP_DTYPE).reshape(-1)
        n = len(self._ops)
        self._dir = Path(tempfile.mkdtemp(prefix="restore-guest-"))
        np.save(self._dir / "ops.npy", self._ops)
        np.save(self._dir / "sums.npy", np.zeros(n, dtype=np.uint64))
        np.save(self._dir / "ns.npy", np.full(n, _NOT_DONE, dtype=np.uint64))
        (self._dir / "guest.json").write_text(
            json.dumps(
                {
                    "socket_path": self.socket_path,
                    "regions": self.regions,
                    "page_size": self.page_size,
                    "hugetlb": self.hugetlb,
                    "remove_events": self.remove_events,
                    "memfd": self.memfd,
                    "close_conn": self.close_conn,
                    "backing": self.backing,
                    "image": self.image,
                }
            )
        )
        # One OpenBLAS thread: numpy's import starts one per CPU otherwise,
        # and they spin for a while before they sleep, taking the CPUs the
        # guest and its handler are measured on.
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
        extra = {}
        if self.user is not None:
            for path in [self._dir, *self._dir.iterdir()]:
                os.chown(path, *self.user)
            extra["preexec_fn"] = lambda: _become(*self.user)
        with open(self._dir / "output", "wb") as out:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "restore.guest", str(self._dir)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                cwd=self._dir,
                env=env,
                **extra,
            )
        return self

    def steps_done(self) -> int:
        """How many steps of the trace have finished so far (the child may
        still run): e.g. to look at its memory while it waits at a wait()
        step. Steps finish in order."""
        if self._dir is None:
            raise InputError("the guest has not been started")
        undone = np.flatnonzero(np.load(self._dir / "ns.npy", mmap_mode="r") == _NOT_DONE)
        return int(undone[0]) if len(undone) else len(self._ops)

    def wait(self, timeout: Optional[float] = None) -> GuestResult:
        """Wait for the trace to finish (timeout in seconds) and return its results.

        Raises GuestTimeout (the child keeps running) or GuestError with the
        C guest's reason or the signal that killed it.
        """
        if self._proc is None or self._dir is None:
            raise InputError("the guest has not been started")
        try:
            rc = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise GuestTimeout(f"guest {self._proc.pid} did not finish within {timeout} s") from None
        if rc != 0:
            raise self._failure(rc)
        total = self._dir / "total_ns"
        return GuestResult(
            sums=np.load(self._dir / "sums.npy"),
            ns=np.load(self._dir / "ns.npy"),
            total_ns=int(total.read_text()) if total.exists() else 0,
        )

    def done_so_far(self) -> GuestResult:
        """The results of the steps finished so far (those whose ns is set),
        e.g. of a guest killed by SIGBUS at a poisoned page."""
        if self._dir is None:
            raise InputError("the guest has not been started")
        ns = np.load(self._dir / "ns.npy")
        done = ns != _NOT_DONE
        return GuestResult(sums=np.load(self._dir / "sums.npy")[done], ns=ns[done], total_ns=0)

    def run(self, ops: np.ndarray, timeout: Optional[float] = None) -> GuestResult:
        """start(ops) then wait(timeout)."""
        return self.start(ops).wait(timeout)

    def kill(self) -> None:
        """SIGKILL the child (a guest blocked on a fault dies too) and reap it."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def close(self) -> None:
        """Kill the child if it runs and remove its files."""
        self.kill()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> "Guest":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _failure(self, rc: int) -> GuestError:
        assert self._dir is not None and self._ops is not None
        if rc < 0:
            name = signal.Signals(-rc).name
            ns = np.load(self._dir / "ns.npy")
            undone = np.flatnonzero(ns == _NOT_DONE)
            if len(undone):
                i = int(undone[0])
                op = self._ops[i]
                where = f" at op {i} ({_OP_NAMES.get(int(op['op']), '?')} of offset {int(op['offset']):#x})"
            else:
                i, where = None, ""
            return GuestError(f"guest killed by {name}{where}", signal=-rc, op=i)
        error = self._dir / "error"
        if rc == 1 and error.exists():
            code, _, message = error.read_text().partition("\n")
            return GuestError(message, errno=int(code))
        lines = (self._dir / "output").read_text(errors="replace").strip().splitlines()
        return GuestError(f"guest exited with status {rc}: {lines[-1] if lines else 'no output'}")


_CAP_DAC_READ_SEARCH = 2
_CAP_SYS_PTRACE = 19


def _become(uid: int, gid: int) -> None:
    """In a Guest's child before exec (as root): become uid and gid, with no
    supplementary groups, keeping two capabilities across exec as ambient
    ones: CAP_SYS_PTRACE, because the guest creates its userfaultfd without
    UFFD_USER_MODE_ONLY, which an unprivileged uid may only do with it
    (vm.unprivileged_userfaultfd=0); and CAP_DAC_READ_SEARCH, to reach the
    Python interpreter and this package wherever they are. Neither lets it
    connect to a socket it has no write permission on."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def ok(rc: int, what: str) -> None:
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    ok(libc.prctl(8, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    caps = (1 << _CAP_DAC_READ_SEARCH) | (1 << _CAP_SYS_PTRACE)
    data = (Data * 2)(Data(caps, caps, caps), Data(0, 0, 0))
    ok(libc.capset(ctypes.byref(Header(0x20080522, 0)), data), "capset")  # _LINUX_CAPABILITY_VERSION_3
    for cap in (_CAP_DAC_READ_SEARCH, _CAP_SYS_PTRACE):
        ok(libc.prctl(47, 2, cap, 0, 0), "prctl(PR_CAP_AMBIENT_RAISE)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Child entry point: run the guest described in directory argv[0]."""
    import resource

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m restore.guest DIR (started by restore.guest.Guest)", file=sys.stderr)
        return 2
    d = Path(args[0])
    # A guest killed by a poisoned page should not leave a core file behind.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    cfg = json.loads((d / "guest.json").read_text())
    ops = np.load(d / "ops.npy")
    n = len(ops)
    # Results go straight into the shared files, so a parent can see how far
    # a guest got before a signal killed it.
    if n:
        sums = np.load(d / "sums.npy", mmap_mode="r+")
        ns = np.load(d / "ns.npy", mmap_mode="r+")
    else:
        sums = np.zeros(0, dtype=np.uint64)
        ns = np.zeros(0, dtype=np.uint64)
    regions = ffi.new("rs_guest_region[]", len(cfg["regions"]))
    for i, (size, offset) in enumerate(cfg["regions"]):
        regions[i].size = size
        regions[i].offset = offset
    err = ffi.new("char[]", 512)
    total = ffi.new("uint64_t *")
    c_ops = ffi.from_buffer("rs_guest_op[]", ops)
    c_sums = ffi.from_buffer("uint64_t[]", sums, require_writable=True)
    c_ns = ffi.from_buffer("uint64_t[]", ns, require_writable=True)
    if cfg.get("backing", "uffd") == "uffd":
        rc = lib.rs_guest_run(
            os.fsencode(cfg["socket_path"]), regions, len(cfg["regions"]), cfg["page_size"],
            (lib.RS_GUEST_HUGETLB if cfg["hugetlb"] else 0)
            | (0 if cfg.get("remove_events", True) else lib.RS_GUEST_NO_REMOVE_EVENTS)
            | (lib.RS_GUEST_MEMFD if cfg.get("memfd") else 0)
            | (lib.RS_GUEST_CLOSE_CONN if cfg.get("close_conn") else 0),
            c_ops, n, c_sums, c_ns, total, err, len(err),
        )
    else:
        rc = lib.rs_guest_run_local(
            os.fsencode(cfg["image"]), BACKINGS[cfg["backing"]], regions, len(cfg["regions"]),
            cfg["page_size"], c_ops, n, c_sums, c_ns, total, err, len(err),
        )
    (d / "total_ns").write_text(str(total[0]))
    if n:
        sums.flush()
        ns.flush()
    if rc < 0:
        (d / "error").write_text(f"{-rc}\n{ffi.string(err).decode(errors='replace')}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())