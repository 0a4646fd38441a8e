"""The test guest's handler-less baselines (resident, mmap of the memory
file) and its wait step, used by the strategy comparison."""

from __future__ import annotations

import re
import socket

import numpy as np
import pytest

from daemon import wait_for

from restore.errors import InputError
from restore.guest import Guest, GuestError, reads, wait
from restore.testing import BareHandler, expected_sums

SIZE = 2 << 20


@pytest.fixture
def image(make_image):
    return make_image(SIZE, seed=9)


@pytest.mark.parametrize("backing", ["resident", "mmap"])
def test_file_backed_guests_read_the_image(image, backing):
    offs = np.arange(0, SIZE, 4096 * 5, dtype=np.uint64)
    with Guest("", memory_size=SIZE, backing=backing, image=image) as g:
        res = g.run(reads(offs), timeout=60)
    assert (res.sums == expected_sums(image, offs)).all()
    assert res.total_ns >= res.ns.sum() > 0


def test_backing_arguments_are_checked(image):
    with pytest.raises(InputError, match=re.escape("backing 'tmpfs' is not one of uffd, resident, mmap")):
        Guest("", memory_size=SIZE, backing="tmpfs", image=image)
    with pytest.raises(InputError, match="needs image, and only it"):
        Guest("", memory_size=SIZE, backing="mmap")
    with Guest("", memory_size=SIZE, backing="mmap", image=image) as g:
        with pytest.raises(GuestError, match="nobody to wait for without a handler"):
            g.run(wait(), timeout=60)



SYS_RECVFROM = 45  # x86-64: glibc's recv() is recvfrom


def _syscall(pid: int) -> int:
    """The system call pid's main thread is blocked in (-1: none, running)."""
    with open(f"/proc/{pid}/syscall") as f:
        return int(f.read().split()[0])

def test_wait_step_holds_the_guest_until_the_handler_says_go(tmp_path, image):
    path = str(tmp_path / "w.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(1)
    data = image.read_bytes()
    offs = np.array([0, 4096 * 7], dtype=np.uint64)
    with BareHandler(data) as bare, Guest(path, memory_size=SIZE) as g:
        g.start(np.concatenate([wait(), reads(offs)]))
        conn, _ = lsock.accept()
        from restore.protocol import accept_handshake

        hs = accept_handshake(conn, memory_size=SIZE, snapshot_page_size=4096, chunk_size=512 * 1024)
        bare.serve(hs.uffd, [(r.base, r.size, r.offset) for r in hs.regions], 4096)
        # Held: blocked receiving the go-ahead, with no page touched.
        wait_for(lambda: _syscall(g.pid) == SYS_RECVFROM, "the guest never blocked on the go-ahead")
        assert bare.faults == 0 and g.steps_done() == 0
        conn.sendall(b"g")
        res = g.wait(60)
        bare.stop()
        hs.close()
        conn.close()
    lsock.close()
    assert bare.faults > 0 and (res.sums[1:] == expected_sums(image, offs)).all()
