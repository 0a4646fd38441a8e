"""userfaultfd from Python: a thin handle on the C wrappers in csrc/uffd.h.

For VMM authors and tests. A `Userfaultfd` owns one userfaultfd file
descriptor: it registers ranges, installs pages (copy, zero page, continue,
poison), wakes faulting threads and reads fault events. Every call is one C
call (cffi releases the GIL around it); nothing here loops over pages.

Addresses and lengths are ints, in bytes. Take an address from a buffer with
``int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))``. Ranges must be page
aligned (`PAGE_SIZE`, 4 KiB here; hugetlbfs ranges need their huge page size,
which the kernel checks).

The GIL rule (no fault is resolved through Python or the GIL): a thread that
touches registered memory whose page is missing sleeps in the kernel until
the fault is served, and a Python thread sleeping there may hold the GIL. Serve faults from another process, or
touch such memory only from C (as the tests do with ``rs_mem_checksum`` and
``rs_mem_fill`` from ``restore._testbed``).
"""

from __future__ import annotations

import enum
import errno
import mmap
import operator
import os
import weakref
from dataclasses import dataclass

from ._native import ffi, lib
from .errors import (
    GuestGone,
    InputError,
    InternalError,
    MappingChanging,
    PageExists,
    UffdError,
    UffdUnavailable,
    error_for,
)

__all__ = [
    "PAGE_SIZE",
    "Event",
    "EventKind",
    "Feature",
    "FeatureUnavailable",
    "GuestGone",
    "Ioctl",
    "MappingChanging",
    "PageExists",
    "UffdError",
    "UffdUnavailable",
    "Userfaultfd",
    "probe_features",
]

PAGE_SIZE: int = mmap.PAGESIZE
"""The base page size in bytes: ranges passed to a Userfaultfd are aligned to it."""

_MAX_EVENTS = 64  # rs_uffd_read_events reads at most this many per call
_U64 = 1 << 64


class Feature(enum.IntFlag):
    """UFFDIO_API feature bits (mirror of RS_UFFD_FEATURE_* in csrc/uffd.h).

    Bits this package does not name (newer kernel features) are kept as
    numbers, so a mask from the kernel survives a round trip unchanged.
    """

    PAGEFAULT_FLAG_WP = lib.RS_UFFD_FEATURE_PAGEFAULT_FLAG_WP
    EVENT_FORK = lib.RS_UFFD_FEATURE_EVENT_FORK
    EVENT_REMAP = lib.RS_UFFD_FEATURE_EVENT_REMAP
    EVENT_REMOVE = lib.RS_UFFD_FEATURE_EVENT_REMOVE
    MISSING_HUGETLBFS = lib.RS_UFFD_FEATURE_MISSING_HUGETLBFS
    MISSING_SHMEM = lib.RS_UFFD_FEATURE_MISSING_SHMEM
    EVENT_UNMAP = lib.RS_UFFD_FEATURE_EVENT_UNMAP
    SIGBUS = lib.RS_UFFD_FEATURE_SIGBUS
    THREAD_ID = lib.RS_UFFD_FEATURE_THREAD_ID
    MINOR_HUGETLBFS = lib.RS_UFFD_FEATURE_MINOR_HUGETLBFS
    MINOR_SHMEM = lib.RS_UFFD_FEATURE_MINOR_SHMEM
    EXACT_ADDRESS = lib.RS_UFFD_FEATURE_EXACT_ADDRESS
    POISON = lib.RS_UFFD_FEATURE_POISON
    MOVE = lib.RS_UFFD_FEATURE_MOVE


class Ioctl(enum.IntFlag):
    """Bits of the ioctl masks the kernel reports (1 << _UFFDIO_* number,
    from <linux/userfaultfd.h>): `Userfaultfd.ioctls` and `register()`."""

    REGISTER = 1 << 0x00
    UNREGISTER = 1 << 0x01
    WAKE = 1 << 0x02
    COPY = 1 << 0x03
    ZEROPAGE = 1 << 0x04
    MOVE = 1 << 0x05
    WRITEPROTECT = 1 << 0x06
    CONTINUE = 1 << 0x07
    POISON = 1 << 0x08
    API = 1 << 0x3F


# What UFFDIO_API reports for every fd: the ioctls valid on the fd itself.
_API_IOCTLS = Ioctl.API | Ioctl.REGISTER | Ioctl.UNREGISTER


class EventKind(enum.IntEnum):
    """The kind of an event read from a userfaultfd (RS_UFFD_EVENT_*)."""

    PAGEFAULT = lib.RS_UFFD_EVENT_PAGEFAULT
    FORK = lib.RS_UFFD_EVENT_FORK
    REMAP = lib.RS_UFFD_EVENT_REMAP
    REMOVE = lib.RS_UFFD_EVENT_REMOVE
    UNMAP = lib.RS_UFFD_EVENT_UNMAP


@dataclass(frozen=True, slots=True)
class Event:
    """One event read from a userfaultfd.

    kind: what happened.
    address: PAGEFAULT: the faulting address (rounded down to the page unless
        the fd has EXACT_ADDRESS); REMOVE/UNMAP: start of the range;
        REMAP: the old address; FORK: 0.
    end: REMOVE/UNMAP: end of the range (exclusive); REMAP: the new address;
        FORK: the child's new userfaultfd, already open in this process and
        owned by the caller (close it); PAGEFAULT: 0.
    flags: PAGEFAULT: RS_UFFD_PAGEFAULT_* bits (see is_write, is_wp,
        is_minor); otherwise 0.
    ptid: the faulting thread's id with the THREAD_ID feature, else 0.
    """

    kind: EventKind
    address: int
    end: int = 0
    flags: int = 0
    ptid: int = 0

    @property
    def is_write(self) -> bool:
        """A page fault caused by a write."""
        return self.kind is EventKind.PAGEFAULT and bool(self.flags & lib.RS_UFFD_PAGEFAULT_WRITE)

    @property
    def is_wp(self) -> bool:
        """A write to a write-protected page (WP mode)."""
        return self.kind is EventKind.PAGEFAULT and bool(self.flags & lib.RS_UFFD_PAGEFAULT_WP)

    @property
    def is_minor(self) -> bool:
        """A minor fault: the page is in the page cache but not mapped (MINOR mode)."""
        return self.kind is EventKind.PAGEFAULT and bool(self.flags & lib.RS_UFFD_PAGEFAULT_MINOR)


# --- errors -------------------------------------------------------------------


class FeatureUnavailable(UffdUnavailable):
    """The kernel does not offer a requested feature; missing: those features."""

    def __init__(self, code: int, message: str, missing: Feature):
        super().__init__(code, message)
        self.missing = missing

    def __reduce__(self):
        return (type(self), (self.errno, self.message, self.missing))


def _range_error(rc: int, op: str, start: int, length: int, fn: str, done: int = 0) -> UffdError:
    return error_for(rc, fn, f"{op} [{start:#x}, +{length:#x})", done=done, base=UffdError)


def _describe(features: int) -> str:
    """Feature bits as NAME|NAME|0x..., for messages."""
    parts = [f.name for f in Feature if f & features]
    rest = int(features) & ~sum(int(f) for f in Feature)
    if rest:
        parts.append(f"{rest:#x}")
    return "|".join(parts) or "no features"


# --- argument checks (before C: say what is wrong, not just EINVAL) ------------


def _check_u64(name: str, value: int) -> int:
    value = operator.index(value)
    if not 0 <= value < _U64:
        raise InputError(f"{name} must be an address in [0, 2**64), got {value:#x}")
    return value


def _check_range(name: str, start: int, length: int) -> tuple[int, int]:
    start = _check_u64(name, start)
    length = operator.index(length)
    if length <= 0:
        raise InputError(f"length must be positive, got {length}")
    if start % PAGE_SIZE:
        raise InputError(f"{name} {start:#x} is not aligned to the {PAGE_SIZE}-byte page size")
    if length % PAGE_SIZE:
        raise InputError(f"length {length:#x} is not a multiple of the {PAGE_SIZE}-byte page size")
    if start + length > _U64:
        raise InputError(f"range [{start:#x}, +{length:#x}) runs past the end of the address space")
    return start, length


def probe_features() -> Feature:
    """The features this kernel offers (asked on a throwaway fd).

    Raises UffdUnavailable when no userfaultfd can be created.
    """
    out = ffi.new("uint64_t *")
    rc = lib.rs_uffd_probe(out)
    if rc < 0:
        raise error_for(rc, "rs_uffd_probe", "cannot probe userfaultfd features", base=UffdUnavailable)
    return Feature(out[0])


def _offered(user_mode_only: bool) -> Feature | None:
    """Features offered to an fd created like ours, or None if that fails."""
    fd = lib.rs_uffd_create(1, int(user_mode_only))
    if fd < 0:
        return None
    try:
        out = ffi.new("uint64_t *")
        return Feature(out[0]) if lib.rs_uffd_api(fd, 0, out, ffi.NULL) == 0 else None
    finally:
        os.close(fd)


class Userfaultfd:
    """One userfaultfd, created and handshaken (UFFDIO_API).

    features: the features to enable (a Feature mask). The fd is O_CLOEXEC,
    and O_NONBLOCK when nonblock (then read_events never waits: poll or
    select on fileno() first). user_mode_only: report only faults from user
    mode (what an unprivileged process may create when the sysctl
    vm.unprivileged_userfaultfd is 0).

    Attributes: features (the features enabled on this fd: those requested),
    available (every feature the kernel offers), ioctls (Ioctl mask of the
    ioctls valid on the fd itself).

    Raises UffdUnavailable when no fd can be created or the handshake is
    refused, FeatureUnavailable (a subclass) naming the features the kernel
    lacks. The object owns the fd: close() (or the with statement, or garbage
    collection) closes it; detach() hands it over. Methods may be called from
    several threads, but not concurrently with close().
    """

    def __init__(self, features: Feature = Feature(0), *, nonblock: bool = True, user_mode_only: bool = False):
        requested = operator.index(features)
        if not 0 <= requested < _U64:
            raise InputError(f"features must be a 64-bit mask, got {requested:#x}")
        requested = Feature(requested)
        fd = lib.rs_uffd_create(int(nonblock), int(user_mode_only))
        if fd < 0:
            hint = ""
            if -fd in (errno.EPERM, errno.EACCES) and not user_mode_only:
                hint = (
                    " (an unprivileged process needs user_mode_only=True, "
                    "vm.unprivileged_userfaultfd=1 or access to /dev/userfaultfd)"
                )
            raise UffdUnavailable(
                -fd, f"cannot create a userfaultfd: {os.strerror(-fd)}{hint} (from rs_uffd_create)"
            )
        available = ffi.new("uint64_t *")
        ioctls = ffi.new("uint64_t *")
        rc = lib.rs_uffd_api(fd, requested, available, ioctls)
        if rc < 0:
            os.close(fd)
            raise self._api_error(-rc, requested, user_mode_only)
        self._fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)
        # The kernel answers with every feature it offers; the fd has those asked for.
        self.features: Feature = requested
        self.available: Feature = Feature(available[0])
        self.ioctls: Ioctl = Ioctl(ioctls[0])

    @staticmethod
    def _api_error(code: int, requested: Feature, user_mode_only: bool) -> UffdUnavailable:
        if code == errno.EINVAL:
            offered = _offered(user_mode_only)
            missing = Feature(int(requested) & ~int(offered)) if offered is not None else Feature(0)
            if missing:
                return FeatureUnavailable(
                    code,
                    f"UFFDIO_API: this kernel does not offer features {_describe(missing)}: "
                    f"{os.strerror(code)} (from rs_uffd_api)",
                    missing,
                )
        hint = ""
        if code == errno.EPERM and requested & Feature.EVENT_FORK:
            hint = " (EVENT_FORK needs CAP_SYS_PTRACE)"
        return UffdUnavailable(
            code, f"UFFDIO_API requesting {_describe(requested)}: {os.strerror(code)}{hint} (from rs_uffd_api)"
        )

    @classmethod
    def from_fd(cls, fd: int, features: Feature = Feature(0)) -> "Userfaultfd":
        """Take ownership of a userfaultfd whose handshake is already done,
        e.g. one received from a VMM over a Unix socket.

        features: what the sender enabled, if known (kept as `features`;
        the fd cannot be asked). `available` is left empty.
        """
        fd = operator.index(fd)
        if fd < 0:
            raise InputError(f"fd must be a file descriptor, got {fd}")
        self = cls.__new__(cls)
        self._fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)
        self.features = Feature(features)
        self.available = Feature(0)
        self.ioctls = _API_IOCTLS
        return self

    # --- ownership -----------------------------------------------------------

    def fileno(self) -> int:
        """The fd, for poll/select. Raises ValueError once closed or detached."""
        if self._fd < 0:
            raise ValueError("userfaultfd is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        """True once close() or detach() was called."""
        return self._fd < 0

    def close(self) -> None:
        """Close the fd. Idempotent. Threads still faulting on ranges
        registered only with this fd are woken and see ordinary memory."""
        self._fd = -1
        self._finalizer()

    def detach(self) -> int:
        """Give up ownership of the fd and return it (e.g. to send it over a
        Unix socket); the caller must close it. This object is closed after."""
        fd = self.fileno()
        self._finalizer.detach()
        self._fd = -1
        return fd

    def __enter__(self) -> "Userfaultfd":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"fd={self._fd}"
        return f"<Userfaultfd {state} features={_describe(self.features)}>"

    # --- ranges ----------------------------------------------------------------

    def register(self, addr: int, length: int, *, missing: bool = True, minor: bool = False, wp: bool = False) -> Ioctl:
        """Register [addr, addr+length) (bytes, page aligned) for faults of the
        chosen kinds: missing pages, minor faults (shmem/hugetlbfs: page in the
        page cache but not mapped), writes to write-protected pages.

        Returns the Ioctl mask of the ioctls allowed on the range (an int).
        """
        addr, length = _check_range("addr", addr, length)
        modes = (
            (lib.RS_UFFD_REGISTER_MISSING if missing else 0)
            | (lib.RS_UFFD_REGISTER_MINOR if minor else 0)
            | (lib.RS_UFFD_REGISTER_WP if wp else 0)
        )
        if not modes:
            raise InputError("register needs at least one of missing, minor, wp")
        ioctls = ffi.new("uint64_t *")
        rc = lib.rs_uffd_register(self.fileno(), addr, length, modes, ioctls)
        if rc < 0:
            raise _range_error(rc, "UFFDIO_REGISTER", addr, length, "rs_uffd_register")
        return Ioctl(ioctls[0])

    def unregister(self, addr: int, length: int) -> None:
        """Unregister [addr, addr+length) (bytes, page aligned); threads
        faulting there are woken."""
        addr, length = _check_range("addr", addr, length)
        rc = lib.rs_uffd_unregister(self.fileno(), addr, length)
        if rc < 0:
            raise _range_error(rc, "UFFDIO_UNREGISTER", addr, length, "rs_uffd_unregister")

    # --- installing pages --------------------------------------------------------
    # Each returns the bytes handled (== length). On failure the exception's
    # done says how many bytes were handled first (see MappingChanging).

    def copy(self, dst: int, src: int, length: int, *, wake: bool = True) -> int:
        """UFFDIO_COPY: fill the missing pages [dst, dst+length) with length
        bytes read from address src (any alignment, readable memory of this
        process). wake=False leaves faulting threads asleep (wake() later).
        Returns the bytes copied."""
        dst, length = _check_range("dst", dst, length)
        src = _check_u64("src", src)
        done = ffi.new("uint64_t *")
        rc = lib.rs_uffd_copy(self.fileno(), dst, src, length, 0 if wake else lib.RS_UFFD_DONTWAKE, done)
        if rc < 0:
            raise _range_error(rc, "UFFDIO_COPY", dst, length, "rs_uffd_copy", done[0])
        return done[0]

    def _fill(self, fn, name: str, dst: int, length: int, wake: bool) -> int:
        """One of the range ioctls that take (dst, len, mode, *done)."""
        dst, length = _check_range("dst", dst, length)
        done = ffi.new("uint64_t *")
        rc = fn(self.fileno(), dst, length, 0 if wake else lib.RS_UFFD_DONTWAKE, done)
        if rc < 0:
            raise _range_error(rc, name, dst, length, f"rs_uffd_{name[len('UFFDIO_'):].lower()}", done[0])
        return done[0]

    def zeropage(self, dst: int, length: int, *, wake: bool = True) -> int:
        """UFFDIO_ZEROPAGE: map zero pages at the missing pages [dst,
        dst+length). Returns the bytes handled."""
        return self._fill(lib.rs_uffd_zeropage, "UFFDIO_ZEROPAGE", dst, length, wake)

    def continue_(self, dst: int, length: int, *, wake: bool = True) -> int:
        """UFFDIO_CONTINUE (MINOR mode): map the page cache's pages at [dst,
        dst+length). Returns the bytes mapped."""
        return self._fill(lib.rs_uffd_continue, "UFFDIO_CONTINUE", dst, length, wake)

    def poison(self, dst: int, length: int, *, wake: bool = True) -> int:
        """UFFDIO_POISON: mark the missing pages [dst, dst+length) poisoned:
        any later access gets SIGBUS (a woken faulting thread too). Returns
        the bytes handled. Note: a later copy() over a poisoned page replaces
        the poison (the kernel treats the marker as an empty page)."""
        return self._fill(lib.rs_uffd_poison, "UFFDIO_POISON", dst, length, wake)

    def wake(self, start: int, length: int) -> None:
        """UFFDIO_WAKE: wake the threads faulting in [start, start+length)."""
        start, length = _check_range("start", start, length)
        rc = lib.rs_uffd_wake(self.fileno(), start, length)
        if rc < 0:
            raise _range_error(rc, "UFFDIO_WAKE", start, length, "rs_uffd_wake")

    # --- events -------------------------------------------------------------------

    def read_events(self, max_events: int = _MAX_EVENTS) -> list[Event]:
        """Read up to max_events pending events (at most 64 per call).

        On a non-blocking fd, returns [] when none is pending; on a blocking
        fd, waits for at least one. Reading a REMOVE/UNMAP/REMAP event lets
        the thread that caused it go on.
        """
        max_events = operator.index(max_events)
        if max_events < 1:
            raise InputError(f"max_events must be at least 1, got {max_events}")
        n = min(max_events, _MAX_EVENTS)
        out = ffi.new("rs_uffd_event[]", n)
        rc = lib.rs_uffd_read_events(self.fileno(), out, n)
        if rc < 0:
            raise error_for(rc, "rs_uffd_read_events", "reading userfaultfd events", base=UffdError)
        events = []
        for e in out[0:rc]:
            try:
                kind = EventKind(e.event)
            except ValueError:
                raise InternalError(f"userfaultfd event of unknown type {e.event:#x}") from None
            events.append(Event(kind, e.address, e.end, e.flags, e.ptid))
        return events
