"""The test guest: a child process playing Firecracker.

Every test runs real processes: the guest maps its memory, registers it with
a userfaultfd and sends it over a Unix socket; a small receiver written here,
independently of the package, checks Firecracker's handshake.
"""

from __future__ import annotations

import errno
import json
import os
import re
import select
import socket
import struct
from pathlib import Path

import pytest

from restore._native import ffi, lib
from restore.errors import check
from restore.testing import (
    Guest,
    GuestError,
    reads,
)

MiB = 1 << 20
PAGE = 4096
KEYS = {"base_host_virt_addr", "size", "offset", "page_size", "page_size_kib"}


@pytest.fixture(autouse=True)
def no_fd_leaks():
    before = sorted(os.listdir("/proc/self/fd"))
    yield
    assert sorted(os.listdir("/proc/self/fd")) == before


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
