"""restore.uffd against the kernel's real userfaultfd: no mocks.

The GIL rule (see restore/uffd.py) shapes these tests: a thread that touches a
registered page that is missing sleeps in the kernel until the fault is
served, and if it is a Python thread holding the GIL, nothing else in this
process can serve it. So registered memory is touched only from C
(restore._testbed's rs_mem_checksum / rs_mem_fill, during which cffi releases the GIL)
in a helper thread, madvise goes through ctypes (which releases the GIL too),
and Python reads a page back only once it is installed. Every wait has a
timeout, and closing the userfaultfd (fixture teardown) wakes any thread
still faulting, so a bug fails a test instead of hanging the run. SIGBUS
(poisoned pages) is only provoked in child processes.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import mmap
import os
import pickle
import re
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from restore._native import ffi, load_testbed
from restore.errors import RestoreError
from restore.uffd import (
    PAGE_SIZE,
    Event,
    EventKind,
    Feature,
    FeatureUnavailable,
    GuestGone,
    Ioctl,
    MappingChanging,
    PageExists,
    UffdError,
    UffdUnavailable,
    Userfaultfd,
    probe_features,
)

_, mem = load_testbed()  # rs_mem_checksum, rs_mem_fill

PAGE = PAGE_SIZE
PAGES = 8
TIMEOUT = 10.0  # seconds; generous, only a bug makes a wait this long

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int


def addr_of(buf) -> int:
    """The address of a buffer's first byte (the buffer must stay alive)."""
    c = ffi.from_buffer(buf)
    try:
        return int(ffi.cast("uintptr_t", c))
    finally:
        ffi.release(c)


def checksum(data) -> int:
    """What rs_mem_checksum returns for these bytes."""
    return int(np.frombuffer(data, "<u8").sum(dtype=np.uint64))


def madvise_dontneed(addr: int, length: int) -> int:
    """madvise(MADV_DONTNEED) through ctypes (GIL released); 0 or errno."""
    return 0 if _libc.madvise(addr, length, mmap.MADV_DONTNEED) == 0 else ctypes.get_errno()


class Toucher:
    """Run fn(*args) (a C call, or a ctypes one) in a daemon thread."""

    def __init__(self, fn, *args):
        self.result = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self.thread.start()

    def _run(self, fn, args) -> None:
        try:
            self.result = fn(*args)
        except BaseException as exc:  # reported by join()
            self.error = exc

    @property
    def native_id(self) -> int:
        return self.thread.native_id

    def blocked_for(self, seconds: float = 0.2) -> bool:
        """Still running after waiting this long (a thread asleep in a fault)."""
        self.thread.join(seconds)
        return self.thread.is_alive()

    def join(self):
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), f"thread still blocked after {TIMEOUT} s"
        if self.error is not None:
            raise self.error
        return self.result


def wait_events(uffd: Userfaultfd) -> list[Event]:
    """Wait (with a timeout) until events are pending, and read them."""
    ready, _, _ = select.select([uffd], [], [], TIMEOUT)
    assert ready, f"no userfaultfd event within {TIMEOUT} s"
    return uffd.read_events()


class Region:
    """PAGES pages of private anonymous memory (what Firecracker guests use)."""

    def __init__(self):
        self.map = mmap.mmap(-1, PAGES * PAGE, flags=mmap.MAP_PRIVATE)
        self.addr = addr_of(self.map)
        self.size = PAGES * PAGE

    def page(self, i: int) -> int:
        return self.addr + i * PAGE


@pytest.fixture
def region():
    r = Region()
    yield r
    r.map.close()


@pytest.fixture
def make_uffd(region):
    """Create Userfaultfds; all are closed before the region is unmapped
    (closing wakes threads still faulting on it)."""
    made: list[Userfaultfd] = []

    def make(features: Feature = Feature(0), **kw) -> Userfaultfd:
        u = Userfaultfd(features, **kw)
        made.append(u)
        return u

    yield make
    for u in made:
        u.close()


@pytest.fixture
def source():
    """PAGES pages of random bytes to copy from."""
    buf = bytearray(os.urandom(PAGES * PAGE))
    return buf, addr_of(buf)


def run_child(code: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=60,
        **kw,
    )


# --- features and the API handshake --------------------------------------------------


def test_probe_features_offers_what_this_machine_has():
    offered = probe_features()
    assert isinstance(offered, Feature)
    for f in (Feature.EVENT_REMOVE, Feature.POISON, Feature.MINOR_SHMEM, Feature.THREAD_ID, Feature.MOVE):
        assert f in offered


def test_handshake_enables_what_was_asked(make_uffd):
    asked = Feature.EVENT_REMOVE | Feature.THREAD_ID | Feature.POISON
    u = make_uffd(asked)
    assert u.features == asked
    assert u.available & asked == asked
    assert u.available == probe_features()
    assert u.ioctls & (Ioctl.API | Ioctl.REGISTER | Ioctl.UNREGISTER) == Ioctl.API | Ioctl.REGISTER | Ioctl.UNREGISTER
    assert make_uffd().features == Feature(0)
    assert u.fileno() >= 0 and not u.closed
    flags = int(open(f"/proc/self/fdinfo/{u.fileno()}").read().split("flags:")[1].split()[0], 8)
    assert flags & os.O_NONBLOCK and flags & os.O_CLOEXEC


def test_blocking_fd_has_no_o_nonblock(make_uffd):
    u = make_uffd(nonblock=False)
    flags = int(open(f"/proc/self/fdinfo/{u.fileno()}").read().split("flags:")[1].split()[0], 8)
    assert not flags & os.O_NONBLOCK


def test_feature_the_kernel_lacks_is_named():
    beyond = Feature(1 << 17)  # the first bit past every feature of this kernel
    assert not beyond & probe_features()
    with pytest.raises(
        FeatureUnavailable,
        match=re.escape("UFFDIO_API: this kernel does not offer features 0x20000: Invalid argument (from rs_uffd_api)"),
    ) as info:
        Userfaultfd(Feature.EVENT_REMOVE | beyond)
    assert info.value.errno == errno.EINVAL
    assert info.value.missing == beyond
    assert isinstance(info.value, UffdUnavailable)

    with pytest.raises(FeatureUnavailable, match=re.escape("does not offer features 0x4000000000020000: ")) as info:
        Userfaultfd(Feature.POISON | Feature((1 << 17) | (1 << 62)))
    assert info.value.missing == Feature((1 << 17) | (1 << 62))


@pytest.mark.parametrize(
    "features, message",
    [
        (-1, "features must be a 64-bit mask, got -0x1"),
        (1 << 64, "features must be a 64-bit mask, got 0x10000000000000000"),
    ],
)
def test_feature_mask_out_of_range(features, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Userfaultfd(features)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to an unprivileged user")
def test_unprivileged_process_is_refused_clearly():
    # vm.unprivileged_userfaultfd=0 (the default): an unprivileged process may
    # only create user-mode-only fds, and may not ask for EVENT_FORK.
    with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
        if f.read().strip() != "0":
            pytest.skip("vm.unprivileged_userfaultfd is not 0")
    proc = run_child(
        """
        import os
        from restore.uffd import Feature, UffdUnavailable, Userfaultfd
        os.setgroups([]); os.setgid(65534); os.setuid(65534)
        for kw in ({}, {"user_mode_only": True}):
            for features in (Feature(0), Feature.EVENT_FORK):
                try:
                    with Userfaultfd(features, **kw) as u:
                        print("ok", kw, int(u.features))
                except UffdUnavailable as e:
                    print(type(e).__name__, e.errno, e)
        """
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    create = (
        f"UffdUnavailable {errno.EPERM} cannot create a userfaultfd: Operation not permitted "
        "(an unprivileged process needs user_mode_only=True, vm.unprivileged_userfaultfd=1 "
        "or access to /dev/userfaultfd) (from rs_uffd_create)"
    )
    assert lines == [
        create,
        create,
        "ok {'user_mode_only': True} 0",
        f"UffdUnavailable {errno.EPERM} UFFDIO_API requesting EVENT_FORK: Operation not permitted "
        "(EVENT_FORK needs CAP_SYS_PTRACE) (from rs_uffd_api)",
    ]


# --- register and install ------------------------------------------------------------


def test_register_reports_install_ioctls(make_uffd, region):
    u = make_uffd()
    ioctls = u.register(region.addr, region.size)
    assert isinstance(ioctls, int)
    assert Ioctl.COPY in ioctls and Ioctl.ZEROPAGE in ioctls and Ioctl.WAKE in ioctls
    assert Ioctl.CONTINUE not in ioctls  # no MINOR mode on private anonymous memory


def test_register_minor_on_private_anonymous_memory_is_refused(make_uffd, region):
    u = make_uffd(Feature.MINOR_SHMEM)
    with pytest.raises(
        UffdError,
        match=re.escape(f"UFFDIO_REGISTER [{region.addr:#x}, +0x8000): Invalid argument (from rs_uffd_register)"),
    ) as info:
        u.register(region.addr, region.size, missing=False, minor=True)
    assert info.value.errno == errno.EINVAL and info.value.done == 0


def test_copy_fills_a_page_and_a_second_copy_raises_page_exists(make_uffd, region, source):
    src, src_addr = source
    u = make_uffd()
    u.register(region.addr, region.size)
    assert u.copy(region.page(2), src_addr, PAGE) == PAGE
    assert region.map[2 * PAGE : 3 * PAGE] == src[:PAGE]  # installed: reading it does not fault

    message = f"UFFDIO_COPY [{region.page(2):#x}, +0x1000): File exists (from rs_uffd_copy)"
    with pytest.raises(PageExists, match=re.escape(message)) as info:
        u.copy(region.page(2), src_addr + PAGE, PAGE)
    e = info.value
    assert (e.errno, e.done, e.strerror) == (errno.EEXIST, 0, "File exists")
    assert isinstance(e, UffdError) and isinstance(e, OSError) and isinstance(e, RestoreError)
    assert region.map[2 * PAGE : 3 * PAGE] == src[:PAGE]  # unchanged


def test_zeropage_maps_zeros(make_uffd, region):
    u = make_uffd()
    u.register(region.addr, region.size)
    assert u.zeropage(region.page(1), 2 * PAGE) == 2 * PAGE
    assert region.map[PAGE : 3 * PAGE] == bytes(2 * PAGE)
    with pytest.raises(PageExists, match=re.escape(f"UFFDIO_ZEROPAGE [{region.page(2):#x}, +0x1000): File exists")):
        u.zeropage(region.page(2), PAGE)


def test_partial_copy_reports_eagain_with_the_pages_done(make_uffd, region, source):
    # The kernel answers any partial install with EAGAIN and the bytes done;
    # EEXIST comes only when the first page of the range is present.
    src, src_addr = source
    u = make_uffd()
    u.register(region.addr, region.size)
    u.copy(region.page(3), src_addr + 3 * PAGE, PAGE)

    message = (
        f"UFFDIO_COPY [{region.addr:#x}, +0x5000): Resource temporarily unavailable "
        "after 0x3000 bytes (from rs_uffd_copy)"
    )
    with pytest.raises(MappingChanging, match=re.escape(message)) as info:
        u.copy(region.addr, src_addr, 5 * PAGE)
    assert info.value.errno == errno.EAGAIN
    assert info.value.done == 3 * PAGE
    assert region.map[: 4 * PAGE] == src[: 4 * PAGE]

    # Retrying from done names the real reason.
    done = info.value.done
    with pytest.raises(PageExists) as info:
        u.copy(region.addr + done, src_addr + done, 2 * PAGE)
    assert info.value.done == 0
    assert u.copy(region.page(4), src_addr + 4 * PAGE, PAGE) == PAGE
    assert region.map[: 5 * PAGE] == src[: 5 * PAGE]


def test_poison_then_poison_or_zeropage_again_raises_but_copy_replaces_it(make_uffd, region, source):
    src, src_addr = source
    u = make_uffd(Feature.POISON)
    ioctls = u.register(region.addr, region.size)
    assert Ioctl.POISON in ioctls
    assert u.poison(region.page(0), 2 * PAGE) == 2 * PAGE
    with pytest.raises(PageExists, match=re.escape(f"UFFDIO_POISON [{region.addr:#x}, +0x1000): File exists")):
        u.poison(region.page(0), PAGE)
    with pytest.raises(PageExists, match=re.escape(f"UFFDIO_ZEROPAGE [{region.addr:#x}, +0x1000): File exists")):
        u.zeropage(region.page(0), PAGE)
    # Kernel behaviour worth knowing: UFFDIO_COPY treats the poison marker as
    # an empty page and replaces it, so a late copy "heals" a poisoned page.
    assert u.copy(region.page(1), src_addr, PAGE) == PAGE
    assert region.map[PAGE : 2 * PAGE] == src[:PAGE]


def test_poisoned_page_raises_sigbus_in_a_child_process():
    proc = run_child(
        """
        import mmap, sys
        from restore._native import ffi
        from restore.uffd import Feature, Userfaultfd
        m = mmap.mmap(-1, 2 * 4096, flags=mmap.MAP_PRIVATE)
        addr = int(ffi.cast("uintptr_t", ffi.from_buffer(m)))
        u = Userfaultfd(Feature.POISON)
        u.register(addr, 2 * 4096)
        u.poison(addr + 4096, 4096)
        print("poisoned", flush=True)
        m[4096]  # SIGBUS, at once: no event, no wait
        print("survived", flush=True)
        """
    )
    assert proc.stdout == "poisoned\n"
    assert proc.returncode == -signal.SIGBUS, proc.stderr


# --- fault round trips -----------------------------------------------------------------


def test_read_fault_round_trip(make_uffd, region, source):
    src, src_addr = source
    u = make_uffd(Feature.THREAD_ID)
    u.register(region.addr, region.size)
    assert u.read_events() == []

    t = Toucher(mem.rs_mem_checksum, region.page(5), PAGE)
    (event,) = wait_events(u)
    assert event.kind is EventKind.PAGEFAULT
    assert event.address == region.page(5)
    assert not event.is_write and not event.is_minor and not event.is_wp
    assert event.ptid == t.native_id

    assert u.copy(region.page(5), src_addr, PAGE, wake=True) == PAGE
    assert t.join() == checksum(src[:PAGE])
    assert u.read_events() == []


def test_dontwake_copy_then_explicit_wake(make_uffd, region, source):
    src, src_addr = source
    u = make_uffd()
    u.register(region.addr, region.size)
    t = Toucher(mem.rs_mem_checksum, region.page(6), 2 * PAGE)
    (event,) = wait_events(u)
    assert event.address == region.page(6)

    assert u.copy(region.page(6), src_addr, 2 * PAGE, wake=False) == 2 * PAGE
    assert t.blocked_for(0.3), "copy with wake=False woke the faulting thread"
    u.wake(region.page(6), PAGE)
    assert t.join() == checksum(src[: 2 * PAGE])  # page 7 is present: no second fault
    assert u.read_events() == []


def test_write_fault_is_write(make_uffd, region):
    u = make_uffd()
    u.register(region.addr, region.size)
    t = Toucher(mem.rs_mem_fill, region.page(1) + 100, 200, 0xAB)
    (event,) = wait_events(u)
    assert event.kind is EventKind.PAGEFAULT
    assert event.address == region.page(1)  # rounded down: no EXACT_ADDRESS
    assert event.is_write
    assert u.zeropage(region.page(1), PAGE) == PAGE
    t.join()
    assert region.map[PAGE : 2 * PAGE] == bytes(100) + b"\xab" * 200 + bytes(PAGE - 300)


def test_exact_address_reports_the_faulting_byte(make_uffd, region):
    u = make_uffd(Feature.EXACT_ADDRESS)
    u.register(region.addr, region.size)
    t = Toucher(mem.rs_mem_fill, region.page(3) + 0x123, 1, 1)
    (event,) = wait_events(u)
    assert event.address == region.page(3) + 0x123 and event.is_write
    u.zeropage(region.page(3), PAGE)
    t.join()


def test_remove_event_from_madvise(make_uffd, region, source):
    src, src_addr = source
    u = make_uffd(Feature.EVENT_REMOVE)
    u.register(region.addr, region.size)
    u.copy(region.addr, src_addr, 2 * PAGE)

    t = Toucher(madvise_dontneed, region.addr, 2 * PAGE)
    ready, _, _ = select.select([u], [], [], TIMEOUT)
    assert ready
    # Until the event is read, madvise sleeps and installs fail with EAGAIN.
    assert t.blocked_for(0.2), "madvise returned before its REMOVE event was read"
    with pytest.raises(
        MappingChanging,
        match=re.escape(
            f"UFFDIO_COPY [{region.page(5):#x}, +0x1000): Resource temporarily unavailable (from rs_uffd_copy)"
        ),
    ) as info:
        u.copy(region.page(5), src_addr, PAGE)
    assert info.value.done == 0

    assert u.read_events() == [Event(EventKind.REMOVE, region.addr, region.addr + 2 * PAGE)]
    assert t.join() == 0  # madvise succeeded
    assert u.copy(region.page(5), src_addr, PAGE) == PAGE

    # The removed pages are missing again: a touch faults, and is served zeros.
    t = Toucher(mem.rs_mem_checksum, region.addr, PAGE)
    (event,) = wait_events(u)
    assert event.kind is EventKind.PAGEFAULT and event.address == region.addr
    u.zeropage(region.addr, PAGE)
    assert t.join() == 0


def test_no_remove_event_without_the_feature(make_uffd, region, source):
    _, src_addr = source
    u = make_uffd()
    u.register(region.addr, region.size)
    u.copy(region.addr, src_addr, PAGE)
    assert Toucher(madvise_dontneed, region.addr, PAGE).join() == 0
    assert u.read_events() == []


def test_unregister_stops_faults(make_uffd, region):
    u = make_uffd()
    u.register(region.addr, region.size)
    u.unregister(region.addr, region.size)
    assert Toucher(mem.rs_mem_checksum, region.addr, region.size).join() == 0
    assert u.read_events() == []


def test_minor_fault_and_continue_on_shmem(make_uffd):
    fd = os.memfd_create("uffd-test")
    try:
        os.ftruncate(fd, 4 * PAGE)
        cache = mmap.mmap(fd, 4 * PAGE)  # shared: fills the page cache
        guest = mmap.mmap(fd, 4 * PAGE)  # shared: registered MINOR
    finally:
        os.close(fd)
    try:
        guest_addr = addr_of(guest)
        u = make_uffd(Feature.MINOR_SHMEM)
        assert Ioctl.CONTINUE in u.register(guest_addr, 4 * PAGE, missing=False, minor=True)
        data = os.urandom(2 * PAGE)
        cache[: 2 * PAGE] = data

        assert u.continue_(guest_addr, PAGE) == PAGE  # no fault needed
        t = Toucher(mem.rs_mem_checksum, guest_addr, 2 * PAGE)
        (event,) = wait_events(u)
        assert event.kind is EventKind.PAGEFAULT and event.address == guest_addr + PAGE
        assert event.is_minor and not event.is_write
        assert u.continue_(guest_addr + PAGE, PAGE) == PAGE
        assert t.join() == checksum(data)
        with pytest.raises(PageExists, match=re.escape(f"UFFDIO_CONTINUE [{guest_addr:#x}, +0x1000): File exists")):
            u.continue_(guest_addr, PAGE)
        u.close()
    finally:
        guest.close()
        cache.close()


# --- a guest in another process: the supported mode ------------------------------------------

GUEST = """
import mmap, socket, sys
from restore._native import ffi, lib
from restore.uffd import Userfaultfd
sock = socket.socket(fileno=int(sys.argv[1]))
m = mmap.mmap(-1, 4 * 4096, flags=mmap.MAP_PRIVATE)
addr = int(ffi.cast("uintptr_t", ffi.from_buffer(m)))
u = Userfaultfd()
u.register(addr, 4 * 4096)
fd = u.detach()
socket.send_fds(sock, [addr.to_bytes(8, "little")], [fd])
sock.recv(1)
sock.sendall(bytes(m[4096:8192]))  # faults in the guest's own main thread
sock.recv(1)
"""


def test_guest_process_faults_served_then_guest_gone(source):
    src, src_addr = source
    parent, child = socket.socketpair()
    parent.settimeout(TIMEOUT)
    proc = subprocess.Popen([sys.executable, "-c", GUEST, str(child.fileno())], pass_fds=[child.fileno()])
    child.close()
    try:
        msg, fds, _, _ = socket.recv_fds(parent, 8, 1)
        assert len(fds) == 1
        addr = int.from_bytes(msg, "little")
        with Userfaultfd.from_fd(fds[0]) as u:
            assert u.fileno() == fds[0]
            parent.sendall(b"g")
            (event,) = wait_events(u)
            assert event.kind is EventKind.PAGEFAULT and event.address == addr + 4096
            assert u.copy(addr + 4096, src_addr, PAGE) == PAGE
            got = b""
            while len(got) < PAGE:
                got += parent.recv(PAGE - len(got))
            assert got == src[:PAGE]

            parent.sendall(b"q")
            assert proc.wait(TIMEOUT) == 0
            message = f"UFFDIO_COPY [{addr:#x}, +0x1000): No such process (from rs_uffd_copy)"
            with pytest.raises(GuestGone, match=re.escape(message)) as info:
                u.copy(addr, src_addr, PAGE)
            assert info.value.errno == errno.ESRCH and info.value.done == 0
    finally:
        parent.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait(TIMEOUT)


# --- ownership, argument checks, leaks --------------------------------------------------------


def test_closed_fd_operations_raise(make_uffd, region):
    u = make_uffd()
    u.close()
    u.close()  # idempotent
    assert u.closed
    for call in (
        u.fileno,
        u.detach,
        u.read_events,
        lambda: u.register(region.addr, PAGE),
        lambda: u.unregister(region.addr, PAGE),
        lambda: u.copy(region.addr, region.addr, PAGE),
        lambda: u.zeropage(region.addr, PAGE),
        lambda: u.continue_(region.addr, PAGE),
        lambda: u.poison(region.addr, PAGE),
        lambda: u.wake(region.addr, PAGE),
    ):
        with pytest.raises(ValueError, match=re.escape("userfaultfd is closed")):
            call()
    with Userfaultfd() as v:
        pass
    assert v.closed


def test_detach_hands_over_the_fd(region):
    u = Userfaultfd(Feature.EVENT_REMOVE)
    fd = u.detach()
    assert u.closed
    u.close()  # must not close the detached fd
    os.fstat(fd)
    v = Userfaultfd.from_fd(fd, Feature.EVENT_REMOVE)
    assert v.features == Feature.EVENT_REMOVE
    assert Ioctl.COPY in v.register(region.addr, region.size)
    v.close()
    with pytest.raises(OSError):
        os.fstat(fd)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda u: u.copy(0x10001, 0x20000, PAGE), f"dst 0x10001 is not aligned to the {PAGE}-byte page size"),
        (lambda u: u.copy(0x10000, 0x20000, 0), "length must be positive, got 0"),
        (lambda u: u.copy(0x10000, -1, PAGE), "src must be an address in [0, 2**64), got -0x1"),
        (lambda u: u.zeropage(0x10000, -PAGE), f"length must be positive, got {-PAGE}"),
        (lambda u: u.poison(0x10000, 0x1800), f"length 0x1800 is not a multiple of the {PAGE}-byte page size"),
        (
            lambda u: u.continue_(0x10000, PAGE + 1),
            f"length {PAGE + 1:#x} is not a multiple of the {PAGE}-byte page size",
        ),
        (lambda u: u.register(0x10800, PAGE), f"addr 0x10800 is not aligned to the {PAGE}-byte page size"),
        (lambda u: u.register(0x10000, PAGE, missing=False), "register needs at least one of missing, minor, wp"),
        (lambda u: u.unregister(-PAGE, PAGE), f"addr must be an address in [0, 2**64), got {-PAGE:#x}"),
        (
            lambda u: u.wake((1 << 64) - PAGE, 2 * PAGE),
            f"range [{(1 << 64) - PAGE:#x}, +{2 * PAGE:#x}) runs past the end of the address space",
        ),
        (lambda u: u.read_events(0), "max_events must be at least 1, got 0"),
    ],
)
def test_bad_arguments_are_refused_before_the_kernel(make_uffd, call, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        call(make_uffd())


def test_non_integer_arguments_raise_type_error(make_uffd):
    with pytest.raises(TypeError):
        make_uffd().copy(0x10000, 0x20000, 4096.0)


def test_errors_pickle_round_trip():
    e = pickle.loads(pickle.dumps(PageExists(errno.EEXIST, "UFFDIO_COPY [0x1000, +0x1000): File exists", 0)))
    assert type(e) is PageExists and e.errno == errno.EEXIST and str(e).startswith("UFFDIO_COPY")
    f = pickle.loads(pickle.dumps(FeatureUnavailable(errno.EINVAL, "m", Feature.MOVE)))
    assert f.missing == Feature.MOVE


def test_no_fd_leaks(region, source):
    _, src_addr = source

    def open_fds() -> list[str]:
        return sorted(os.listdir("/proc/self/fd"))

    gc.collect()
    before = open_fds()
    for _ in range(200):
        with Userfaultfd(Feature.EVENT_REMOVE) as u:
            u.register(region.addr, region.size)
            u.copy(region.addr, src_addr, PAGE)
            with pytest.raises(PageExists):
                u.copy(region.addr, src_addr, PAGE)
            assert u.read_events() == []
            u.unregister(region.addr, region.size)
        region.map.madvise(mmap.MADV_DONTNEED)  # not registered any more: no event
        with pytest.raises(FeatureUnavailable):
            Userfaultfd(Feature(1 << 17))
        Userfaultfd()  # dropped: closed by its finalizer
        os.close(Userfaultfd().detach())
        probe_features()
    gc.collect()
    assert open_fds() == before
