"""The test guest (a child process playing Firecracker) against the bare handler.

Every test runs real processes: the guest maps its memory, registers it with
a userfaultfd and sends it over a Unix socket; a small receiver written here,
independently of the package, checks Firecracker's handshake and hands the
uffd to BareHandler, which serves faults from an image in memory.
"""

from __future__ import annotations

import errno
import json
import gc
import os
import re
import select
import socket
import struct
from pathlib import Path

import numpy as np
import pytest

import hugepages
from daemon import wait_for
from restore._native import ffi, lib
from restore.errors import check
from restore.sample import write_sample_image
from restore.guest import Guest, GuestError, reads, remove, wait, writes
from restore.testing import BareHandler, expected_sums, written_sum

MiB = 1 << 20
PAGE = 4096
HUGE = 2 * MiB
KEYS = {"base_host_virt_addr", "size", "offset", "page_size", "page_size_kib"}


@pytest.fixture(autouse=True)
def no_fd_leaks():
    # Objects of earlier tests (a client's socket) are collected first, so
    # their fds do not close during this test and count as its leak.
    gc.collect()
    before = sorted(os.listdir("/proc/self/fd"))
    yield
    assert sorted(os.listdir("/proc/self/fd")) == before


@pytest.fixture(scope="module")
def image(make_image) -> Path:
    """16 MiB: runs of zero, random and text-like pages."""
    return make_image(16 * MiB, seed=3)


class Receiver:
    """The handler's side of Firecracker's UFFD handshake, written from the protocol."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        os.chmod(path, 0o600)
        self.sock.listen(1)
        self.sock.settimeout(20)

    def accept(self) -> tuple[socket.socket, list[dict], int, int]:
        """(connection, regions JSON, uffd, peer pid)."""
        conn, _ = self.sock.accept()
        conn.settimeout(20)
        pid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        data, fds = b"", []
        for _ in range(5):  # the fd may come without the payload, or vice versa
            msg, got, _flags, _addr = socket.recv_fds(conn, 1 << 16, 1)
            data += msg
            fds += got
            if fds and data.endswith(b"]"):
                break
        assert len(fds) == 1, f"expected one fd, got {fds}"
        return conn, json.loads(data), fds[0], pid

    def close(self) -> None:
        self.sock.close()


def check_handshake(got: list[dict], regions: list[tuple[int, int]], page_size: int) -> list[tuple[int, int, int]]:
    """Firecracker's JSON exactly; returns (base, size, offset) per region."""
    assert isinstance(got, list) and len(got) == len(regions)
    out = []
    for obj, (size, offset) in zip(got, regions):
        assert set(obj) == KEYS
        assert all(type(v) is int for v in obj.values())
        assert obj["size"] == size and obj["offset"] == offset
        assert obj["page_size"] == obj["page_size_kib"] == page_size
        assert obj["base_host_virt_addr"] > 0 and obj["base_host_virt_addr"] % page_size == 0
        out.append((obj["base_host_virt_addr"], size, offset))
    spans = sorted((b, b + s) for b, s, _ in out)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "host ranges overlap"
    return out


def restore_with_bare(tmp_path, image, ops, regions=None, page_size=PAGE, hugetlb=False):
    """Run ops in a guest served by BareHandler; returns (GuestResult, faults served)."""
    regions = regions or [(os.path.getsize(image), 0)]
    receiver = Receiver(tmp_path / "uffd.sock")
    try:
        with Guest(receiver.path, regions=regions, page_size=page_size, hugetlb=hugetlb) as guest:
            guest.start(ops)
            conn, got, uffd, pid = receiver.accept()
            try:
                assert pid == guest.pid
                mapped = check_handshake(got, regions, page_size)
                handler = BareHandler(image).serve(uffd, mapped, page_size, peer_fd=conn.fileno())
                try:
                    result = guest.wait(20)
                    # The guest closed its socket: the loop ends by itself.
                    assert handler.join(5)
                finally:
                    handler.stop()
            finally:
                os.close(uffd)
                conn.close()
    finally:
        receiver.close()
    return result, handler.faults


def test_sequential_sweep_reads_the_image(tmp_path, image):
    offsets = np.arange(0, 16 * MiB, PAGE)
    want = expected_sums(image, offsets)
    assert (want == 0).sum() > len(offsets) // 4  # zero pages are served like any other

    result, faults = restore_with_bare(tmp_path, image, reads(offsets))

    np.testing.assert_array_equal(result.sums, want)
    assert faults == len(offsets)
    assert result.ns.min() > 0


def test_random_permutation_reads_the_image(tmp_path, image):
    offsets = np.random.default_rng(11).permutation(16 * MiB // PAGE).astype(np.uint64) * PAGE
    ops = np.concatenate([reads(offsets), reads(offsets[:100])])  # second touches do not fault

    result, faults = restore_with_bare(tmp_path, image, ops)

    np.testing.assert_array_equal(result.sums, expected_sums(image, ops["offset"]))
    assert faults == len(offsets)


@pytest.mark.parametrize(
    "regions",
    [[(4 * MiB, 0), (4 * MiB, 8 * MiB)], [(4 * MiB, 0), (4 * MiB, 4 * MiB)]],
    ids=["gap", "contiguous"],
)
def test_two_regions_map_file_offsets(tmp_path, image, regions):
    offsets = np.concatenate([np.arange(o, o + s, PAGE) for s, o in regions])
    offsets = np.random.default_rng(5).permutation(offsets).astype(np.uint64)

    result, faults = restore_with_bare(tmp_path, image, reads(offsets), regions=regions)

    np.testing.assert_array_equal(result.sums, expected_sums(image, offsets))
    assert faults == len(offsets)


def test_writes_are_read_back(tmp_path, image):
    a, b = 5 * PAGE, 77 * PAGE  # a is read first, b is first touched by the write
    ops = np.concatenate([reads([a]), writes([a, b]), reads([a, b, b + PAGE])])

    result, faults = restore_with_bare(tmp_path, image, ops)

    img = expected_sums(image, [a, b + PAGE])
    assert list(result.sums) == [img[0], written_sum(1), written_sum(2), written_sum(1), written_sum(2), img[1]]
    assert faults == 3


def test_removed_pages_fault_back_as_zeros(tmp_path, image):
    offsets = np.arange(0, 16 * MiB, PAGE)
    nonzero = offsets[expected_sums(image, offsets) != 0]
    p, q = int(nonzero[0]), int(nonzero[-8])  # q..q+3 never touched before their removal
    ops = np.concatenate(
        [reads([p, p + PAGE]), remove(p, 1), reads([p, p + PAGE]),  # only p was removed
         remove(q, 4), reads([q, q + 3 * PAGE, q + 4 * PAGE]),
         writes([p]), reads([p])]  # written after the removal: the write sticks
    )

    result, faults = restore_with_bare(tmp_path, image, ops)

    s = expected_sums(image, [p, p + PAGE, q + 4 * PAGE])
    assert s[0] != 0
    assert list(result.sums) == [s[0], s[1], 0, 0, s[1], 0, 0, 0, s[2], written_sum(9), written_sum(9)]
    # p, p+1, p again (zero), q, q+3, q+4; the write lands on the zero page.
    assert faults == 6


def test_missing_socket_is_a_clear_error(tmp_path):
    path = tmp_path / "nobody-listens.sock"
    with Guest(path, memory_size=MiB) as guest:
        with pytest.raises(GuestError, match=re.escape(f"connect {path}: No such file or directory")) as info:
            guest.run(reads([0]), timeout=20)
    assert info.value.errno == errno.ENOENT


def test_trace_outside_the_regions_is_refused(tmp_path):
    with Guest(tmp_path / "unused.sock", regions=[(MiB, 0), (MiB, 4 * MiB)]) as guest:
        with pytest.raises(GuestError, match=re.escape("op 1: offset 0x100000 is outside every region")):
            guest.run(reads([0, MiB]), timeout=20)


def test_guest_of_a_stopped_handler_is_killed(tmp_path, image):
    """The guest reads 20 pages, waits for the test's go-ahead, then reads
    a page nobody serves any more: it blocks there until killed."""
    ops = np.concatenate([reads(np.arange(20, dtype=np.uint64) * PAGE), wait(), reads([100 * PAGE])])
    receiver = Receiver(tmp_path / "uffd.sock")
    try:
        with Guest(receiver.path, memory_size=16 * MiB) as guest:
            guest.start(ops)
            conn, got, uffd, _ = receiver.accept()
            handler = BareHandler(image).serve(uffd, check_handshake(got, [(16 * MiB, 0)], PAGE), PAGE)
            wait_for(lambda: len(guest.done_so_far().ns) >= 20, "the guest's first reads were not served", 5, 0.001)
            handler.stop()
            assert handler.faults == 20  # one per page read; the guest is held at its wait() step
            conn.sendall(b"g")
            wait_for(lambda: len(guest.done_so_far().ns) >= 21, "the guest did not get the go-ahead", 5, 0.001)
            guest.kill()  # in its last read (op 21), of a page nobody serves: it cannot have finished
            with pytest.raises(GuestError, match=r"^guest killed by SIGKILL at op 21 \(read of offset 0x64000\)$"):
                guest.wait(5)
            os.close(uffd)
            conn.close()
    finally:
        receiver.close()


def test_poisoned_page_kills_the_guest_with_sigbus(tmp_path):
    """What the engine does with an unrecoverable page: the guest dies with SIGBUS."""
    receiver = Receiver(tmp_path / "uffd.sock")
    try:
        with Guest(receiver.path, memory_size=MiB) as guest:
            guest.start(reads([0x3000]))
            conn, got, uffd, _ = receiver.accept()
            (base, _, _), = check_handshake(got, [(MiB, 0)], PAGE)
            events = ffi.new("rs_uffd_event[8]")
            assert select.select([uffd], [], [], 20)[0]
            n = lib.rs_uffd_read_events(uffd, events, 8)
            assert n == 1 and events[0].event == lib.RS_UFFD_EVENT_PAGEFAULT
            assert events[0].address == base + 0x3000
            check(lib.rs_uffd_poison(uffd, base + 0x3000, PAGE, 0, ffi.NULL), "rs_uffd_poison")

            with pytest.raises(GuestError, match=re.escape("guest killed by SIGBUS at op 0 (read of offset 0x3000)")):
                guest.wait(20)
            os.close(uffd)
            conn.close()
    finally:
        receiver.close()


@pytest.fixture
def huge_pages():
    """16 more 2 MiB pages for the test (tests/hugepages.py)."""
    with hugepages.reserved(16):
        yield


def test_hugetlb_sweep_with_2mib_pages(tmp_path, huge_pages):
    path = tmp_path / "huge.img"
    write_sample_image(path, 8 * MiB, seed=9, zero=0.3)
    offsets = np.arange(0, 8 * MiB, HUGE)
    want = expected_sums(path, offsets, HUGE)
    ops = np.concatenate([reads(offsets[::-1]), remove(HUGE, 1), reads([HUGE]), writes([HUGE]), reads([HUGE])])

    result, faults = restore_with_bare(tmp_path, path, ops, page_size=HUGE, hugetlb=True)

    assert all(want != 0)
    assert list(result.sums) == [*want[::-1], 0, 0, written_sum(6, HUGE), written_sum(6, HUGE)]
    assert faults == 5  # 4 pages, then the removed one again, as a zero page
