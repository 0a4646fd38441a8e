"""Lazy restore end to end: a handler Server in this process, real guest
processes (restore.guest.Guest) faulting on their memory, chunks from a
real file store and a real L1 directory. Every page a guest reads must
equal the snapshot's image."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from daemon import wait_for

from restore.errors import RestoreError
from restore.faultlog import LOG_DTYPE, SOURCES, load_fault_log
from restore.fetchbase import DURABLE_ATTEMPTS
from restore.handler import Server
from restore.listen import Listen
from restore.settings import ServerSettings
from restore.objects import chunk_key
from restore.sample import write_sample_image
from restore.snapshot import Snapshot, create_snapshot
from restore.guest import Guest, GuestError, reads, remove, writes
from restore.testing import expected_sums
from restore.tiers.durable import DurableStore
from restore.tiers.l1 import L1Cache

P = 4096
CHUNK = 256 * 1024
SIZE = 16 << 20


@pytest.fixture(scope="module")
def image(make_image):
    return make_image(SIZE, seed=21)


@pytest.fixture
def snap(open_snapshot, image):
    return open_snapshot(image, "vm", chunk_size=CHUNK)


@pytest.fixture
def l1(tmp_path):
    return L1Cache(tmp_path / "l1")


@pytest.fixture
def serve(tmp_path, snap, l1):
    """Start a Server for snap; yields a factory so tests choose options."""
    servers = []

    def make(snapshot=None, sockets=None, **kw):
        kw = {"l1": l1, **make.defaults, **kw}
        settings, kw = ServerSettings.take(kw)
        s = Server(snapshot or snap, sockets or tmp_path / f"s{len(servers)}.sock", settings, **kw).start()
        servers.append(s)
        return s

    make.defaults = {}  # Server and ServerSettings keywords for every server of the test
    yield make
    for s in servers:
        s.stop()


@pytest.fixture(params=["anon", "memfd-copy", "memfd-continue"])
def mem(request, serve):
    """How the guest's memory is backed and filled: anonymous memory
    (upstream Firecracker), or a memfd sent after the uffd (memfd-backed
    builds) filled with UFFDIO_COPY or by writing it and UFFDIO_CONTINUE.
    Gives the Guest's keywords and sets the servers' memfd_install."""
    if request.param == "anon":
        return {}
    serve.defaults["memfd_install"] = request.param.split("-")[1]
    return {"memfd": True}


def _wait_sessions(server, n, timeout=10.0):
    deadline = time.monotonic() + timeout
    while len(server.summaries) < n:
        assert time.monotonic() < deadline, f"only {len(server.summaries)} of {n} sessions ended"
        time.sleep(0.02)
    return server.summaries


def _image_pages(image):
    return np.fromfile(image, dtype=np.uint8).reshape(-1, P)


@contextlib.contextmanager
def _waiting_guest(snap, path, then=None):
    """A guest at a wait step, connected to a socket at path and past the
    handshake for snap, with no session yet: yields (the Guest, the
    connection, the handshake), for a test to start a RestoreSession of its
    own; the caller closes the handshake and the connection. then: trace
    steps the guest runs before it waits."""
    from restore.guest import wait
    from restore.protocol import accept_handshake

    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(1)
    with lsock, Guest(path, memory_size=SIZE) as g:
        g.start(wait() if then is None else np.concatenate([then, wait()]))
        conn, _ = lsock.accept()
        m = snap.manifest
        hs = accept_handshake(conn, memory_size=m.memory_size, snapshot_page_size=m.page_size,
                              chunk_size=m.chunk_size)
        yield g, conn, hs


def test_full_sweep_cold_then_warm_l1(serve, image, l1, mem):
    server = serve()
    offsets = np.arange(SIZE // P, dtype=np.uint64) * P
    with Guest(server.socket_path, memory_size=SIZE, **mem) as g:
        res = g.run(reads(offsets), timeout=60)
    assert (res.sums == expected_sums(image, offsets)).all()
    first = _wait_sessions(server, 1)[0]
    assert first.stats.chunks_fetched > 0 and first.stats.chunks_l1 == 0
    assert first.stats.first_touches["failed"] == 0 and first.errors == []
    assert len(l1) == first.stats.chunks_fetched  # fetchers wrote L1

    # The next guest finds every chunk in L1: decoded in C, no fetch.
    with Guest(server.socket_path, memory_size=SIZE, **mem) as g:
        res = g.run(reads(offsets), timeout=60)
    assert (res.sums == expected_sums(image, offsets)).all()
    second = _wait_sessions(server, 2)[1]
    assert second.stats.chunks_l1 == first.stats.chunks_fetched
    assert second.stats.chunks_fetched == 0 and second.stats.l1_misses == 0
    # Every page came in, so no decoded copy outlived its last page.
    for st in (first.stats, second.stats):
        assert st.chunks_released == st.chunks_l1 + st.chunks_fetched and st.chunks_reloaded == 0


@pytest.mark.parametrize("fault_around", [1, 16])
def test_random_trace_reads_the_image(serve, image, fault_around, mem):
    server = serve(fault_around=fault_around)
    rng = np.random.default_rng(fault_around)
    offsets = rng.permutation(SIZE // P)[:1500].astype(np.uint64) * P
    with Guest(server.socket_path, memory_size=SIZE, **mem) as g:
        res = g.run(reads(offsets), timeout=60)
    assert (res.sums == expected_sums(image, offsets)).all()
    st = _wait_sessions(server, 1)[0].stats
    if fault_around == 1:
        assert st.faults == len(offsets) and st.pages_installed == len(offsets)
    else:
        assert st.pages_installed > st.faults


def test_zero_pages_need_no_fetch(serve, image, mem):
    pages = _image_pages(image)
    zero = np.flatnonzero(~pages.any(axis=1))[:200].astype(np.uint64) * P
    server = serve(fault_around=1)
    with Guest(server.socket_path, memory_size=SIZE, **mem) as g:
        res = g.run(reads(zero), timeout=30)
    assert (res.sums == 0).all()
    st = _wait_sessions(server, 1)[0].stats
    assert st.first_touches["zero"] == len(zero)
    assert st.chunks_fetched == st.chunks_l1 == 0


def test_fault_log_follows_first_touch_order(serve, image, snap):
    server = serve(fault_around=1)
    rng = np.random.default_rng(5)
    offsets = rng.permutation(SIZE // P)[:800].astype(np.uint64) * P
    trace = np.concatenate([offsets, offsets[:100]])  # re-touches are not first touches
    with Guest(server.socket_path, memory_size=SIZE) as g:
        g.run(reads(trace), timeout=60)
    summary = _wait_sessions(server, 1)[0]
    data = snap.store.get(summary.log_key)
    recs = load_fault_log(data, summary.log_key)
    assert recs.dtype == LOG_DTYPE
    assert (recs["offset"] == offsets).all()
    assert (np.diff(recs["t_ns"].astype(np.int64)) >= 0).all()
    pages = _image_pages(image)[offsets // P]
    is_zero = ~pages.any(axis=1)
    assert (recs["source"][is_zero] == SOURCES.index("zero")).all()
    assert set(recs["source"][~is_zero]) <= {SOURCES.index("durable"), SOURCES.index("l1")}
    assert (recs["chunk"][~is_zero] == offsets[~is_zero] // CHUNK).all()


def test_remove_then_retouch_reads_zeros(serve, image, mem):
    server = serve()
    pages = _image_pages(image)
    nonzero = np.flatnonzero(pages.any(axis=1))
    a = int(nonzero[10]) * P
    ops = np.concatenate([reads([a, a + P]), writes([a]), remove(a, 2), reads([a, a + P]), reads([a + 8 * P])])
    with Guest(server.socket_path, memory_size=SIZE, **mem) as g:
        res = g.run(ops, timeout=30)
    exp = expected_sums(image, [a, a + P, a + 8 * P])
    assert res.sums[0] == exp[0] and res.sums[1] == exp[1]
    assert res.sums[4] == 0 and res.sums[5] == 0  # removed: zeros, never snapshot bytes
    assert res.sums[6] == exp[2]
    assert _wait_sessions(server, 1)[0].stats.removes == 1


def test_dropped_range_without_remove_events_is_loaded_again(serve, image):
    """A VMM that leaves UFFD_FEATURE_EVENT_REMOVE off: after MADV_DONTNEED the
    pages fault again and the handler, not told, serves the snapshot's bytes,
    loading again a chunk whose decoded copy it had freed."""
    server = serve()
    per_chunk = _image_pages(image).any(axis=1).reshape(-1, CHUNK // P)
    c = int(np.flatnonzero(per_chunk.all(axis=1))[0])  # a chunk without zero pages
    first_chunk = (c * CHUNK // P + np.arange(CHUNK // P, dtype=np.uint64)) * P
    # Between reading the chunk and dropping it, the guest reads other
    # chunks: by then the thread that brought the chunk in has let go of it.
    others = (np.arange(SIZE // P, dtype=np.uint64)[(c + 1) * CHUNK // P :: 7]) * P
    ops = np.concatenate([reads(first_chunk), reads(others), remove(c * CHUNK, CHUNK // P), reads(first_chunk[:3])])
    with Guest(server.socket_path, memory_size=SIZE, remove_events=False) as g:
        res = g.run(ops, timeout=30)
    exp = expected_sums(image, first_chunk)
    assert (res.sums[: len(first_chunk)] == exp).all()
    assert (res.sums[-3:] == exp[:3]).all()
    st = _wait_sessions(server, 1)[0].stats
    assert st.removes == 0 and st.chunks_reloaded == 1 and st.chunks_released >= 1
    assert st.first_touches["failed"] == 0 and st.error == 0


def test_an_unknown_memfd_install_is_refused(snap):
    from restore.errors import InputError
    from restore.session import RestoreSession

    with pytest.raises(InputError, match="^memfd_install must be one of copy, continue, got 'mmap'$"):
        RestoreSession(snap, -1, [], P, memfd_install="mmap")
    with pytest.raises(InputError, match="^memfd_install must be one of copy, continue, got 'mmap'$"):
        Server(snap, "/nonexistent/s.sock", ServerSettings(memfd_install="mmap"))


@pytest.mark.parametrize("install", ["copy", "continue"])
def test_memfd_pages_dropped_without_remove_events_keep_their_bytes(serve, image, install):
    """Shared memory dropped with MADV_DONTNEED keeps its bytes in the memfd:
    with no REMOVE event the next touch is a minor fault, answered by mapping
    the page again (UFFDIO_CONTINUE), so the guest reads what it wrote."""
    server = serve(memfd_install=install)
    nonzero = np.flatnonzero(_image_pages(image).any(axis=1))
    a, b = int(nonzero[3]) * P, int(nonzero[40]) * P
    ops = np.concatenate([reads([a, b]), writes([a]), remove(a, 1), remove(b, 1), reads([a, b])])
    with Guest(server.socket_path, memory_size=SIZE, memfd=True, remove_events=False) as g:
        res = g.run(ops, timeout=30)
    assert res.sums[5] == res.sums[2]  # a: the guest's write, not the snapshot's bytes
    assert res.sums[6] == expected_sums(image, [b])[0]
    st = _wait_sessions(server, 1)[0].stats
    assert st.removes == 0 and st.minor_faults == 2 and st.error == 0 and st.chunks_reloaded == 0


def test_two_regions_with_a_gap(serve, image, mem):
    server = serve()
    regions = [(4 << 20, 0), (8 << 20, 8 << 20)]  # file [0,4M) and [8M,16M)
    offsets = np.concatenate([np.arange(0, 4 << 20, 3 * P), np.arange(8 << 20, 16 << 20, 5 * P)]).astype(np.uint64)
    with Guest(server.socket_path, regions=regions, **mem) as g:
        res = g.run(reads(offsets), timeout=60)
    assert (res.sums == expected_sums(image, offsets)).all()


def test_three_concurrent_guests(serve, image, mem):
    server = serve()
    rng = np.random.default_rng(3)
    traces = [rng.permutation(SIZE // P)[:1200].astype(np.uint64) * P for _ in range(3)]
    guests = [Guest(server.socket_path, memory_size=SIZE, **mem).start(reads(t)) for t in traces]
    try:
        for g, t in zip(guests, traces):
            assert (g.wait(60).sums == expected_sums(image, t)).all()
    finally:
        for g in guests:
            g.close()
    assert len(_wait_sessions(server, 3)) == 3


def test_two_servers_for_two_snapshots_in_one_process(tmp_path, serve, image):
    other_img = tmp_path / "other.img"
    write_sample_image(other_img, 8 << 20, seed=99)
    store = DurableStore(f"file://{tmp_path}/store2")
    create_snapshot(store, other_img, "other", chunk_size=CHUNK)
    with Snapshot.open(store, "other") as other:
        s1 = serve()
        s2 = serve(other, l1=L1Cache(tmp_path / "l1b"))
        o1 = np.arange(0, SIZE, 7 * P, dtype=np.uint64)
        o2 = np.arange(0, 8 << 20, 5 * P, dtype=np.uint64)
        g1 = Guest(s1.socket_path, memory_size=SIZE).start(reads(o1))
        g2 = Guest(s2.socket_path, memory_size=8 << 20).start(reads(o2))
        try:
            assert (g1.wait(60).sums == expected_sums(image, o1)).all()
            assert (g2.wait(60).sums == expected_sums(other_img, o2)).all()
        finally:
            g1.close()
            g2.close()
        _wait_sessions(s1, 1)
        _wait_sessions(s2, 1)
        s2.stop()


def test_killed_guest_leaves_the_server_healthy(serve, image, snap):
    # Make fetches slow enough that the guest is mid-restore when killed.
    server = serve(fault_around=1)
    offsets = np.arange(0, SIZE, P, dtype=np.uint64)
    g = Guest(server.socket_path, memory_size=SIZE).start(reads(offsets))
    # Mid-restore: some pages read, most not (looked at often: the guest goes on).
    wait_for(lambda: g.steps_done() >= 16, "the guest never read 16 pages", every=0.005)
    assert server.active() == 1 and g.steps_done() < len(offsets)
    g.kill()
    g.close()
    _wait_sessions(server, 1)
    assert server.active() == 0
    with Guest(server.socket_path, memory_size=SIZE) as g2:
        res = g2.run(reads(offsets[::9]), timeout=60)
    assert (res.sums == expected_sums(image, offsets[::9])).all()


def _chunk_of(snap, image, nth):
    """Index of the nth chunk that holds data."""
    return [i for i, c in enumerate(snap.manifest.chunks) if c.id][nth]


def test_missing_chunk_is_poisoned_not_zeroed(serve, snap, image):
    idx = _chunk_of(snap, image, 3)
    snap.store.delete(chunk_key(snap.manifest.chunks[idx].id))
    pages = _image_pages(image)
    in_chunk = [p for p in range(idx * CHUNK // P, (idx + 1) * CHUNK // P) if pages[p].any()]
    server = serve()
    with Guest(server.socket_path, memory_size=SIZE) as g:
        with pytest.raises(GuestError, match="SIGBUS"):
            g.run(reads([0, in_chunk[0] * P]), timeout=30)
    summary = _wait_sessions(server, 1)[0]
    assert summary.stats.chunks_failed == 1 and summary.stats.poisoned >= 1
    assert any(f"chunk {idx}" in e and "is missing from" in e for e in summary.errors)
    # The server goes on serving other chunks.
    ok = [int(np.flatnonzero(pages[: idx * CHUNK // P].any(axis=1))[0]) * P]
    with Guest(server.socket_path, memory_size=SIZE) as g:
        assert (g.run(reads(ok), timeout=30).sums == expected_sums(image, ok)).all()


def test_corrupt_store_chunk_is_poisoned(serve, snap, image):
    idx = _chunk_of(snap, image, 1)
    key = chunk_key(snap.manifest.chunks[idx].id)
    data = bytearray(snap.store.get(key))
    data[len(data) // 2] ^= 0x40
    snap.store.put(key, bytes(data))
    pages = _image_pages(image)
    p = next(p for p in range(idx * CHUNK // P, (idx + 1) * CHUNK // P) if pages[p].any())
    server = serve()
    with Guest(server.socket_path, memory_size=SIZE) as g:
        with pytest.raises(GuestError, match="SIGBUS"):
            g.run(reads([p * P]), timeout=30)
    summary = _wait_sessions(server, 1)[0]
    # Read again in case the damage was on the way, then given up on.
    assert summary.stats.supply_rejected == DURABLE_ATTEMPTS and summary.stats.chunks_failed == 1
    assert any(f"chunk {idx}" in e and "fail verification: SHA-256 of the stored bytes is not the chunk id "
               f"(from rs_engine_supply), {DURABLE_ATTEMPTS} times" in e
               for e in summary.errors), summary.errors


def test_corrupt_l1_copy_falls_back_to_the_store(serve, snap, image, l1):
    idx = _chunk_of(snap, image, 2)
    cid = snap.manifest.chunks[idx].id
    good = snap.store.get(chunk_key(cid))
    l1.put(cid, good)
    bad = bytearray(good)
    bad[0] ^= 1
    l1.path(cid).write_bytes(bytes(bad))  # damaged on disk behind the cache's back
    pages = _image_pages(image)
    offs = [p * P for p in range(idx * CHUNK // P, (idx + 1) * CHUNK // P) if pages[p].any()][:5]
    server = serve()
    with Guest(server.socket_path, memory_size=SIZE) as g:
        assert (g.run(reads(offs), timeout=30).sums == expected_sums(image, offs)).all()
    st = _wait_sessions(server, 1)[0].stats
    assert st.l1_bad == 1 and st.chunks_fetched == 1
    assert l1.get(cid) == good  # the fetcher rewrote the good copy


def test_huge_pages(tmp_path, image):
    """2 MiB hugetlbfs guest pages, from a snapshot with 2 MiB chunks."""
    nr = "/proc/sys/vm/nr_hugepages"
    old = int(open(nr).read())
    need = SIZE // (2 << 20) + 2
    with open(nr, "w") as f:
        f.write(str(old + need))
    try:
        assert int(open(nr).read()) >= old + need, "could not reserve huge pages"
        store = DurableStore(f"file://{tmp_path}/hstore")
        create_snapshot(store, image, "huge", chunk_size=2 << 20)
        with Snapshot.open(store, "huge") as s:
            server = Server(s, tmp_path / "h.sock", l1=L1Cache(tmp_path / "hl1")).start()
            try:
                H = 2 << 20
                offsets = np.array([3 * H, 0, 7 * H, H, 5 * H], dtype=np.uint64)
                with Guest(server.socket_path, memory_size=SIZE, page_size=H, hugetlb=True) as g:
                    res = g.run(reads(offsets), timeout=60)
                assert (res.sums == expected_sums(image, offsets, page_size=H)).all()
                st = _wait_sessions(server, 1)[0].stats
                assert st.pages_installed == len(offsets) and st.bytes_installed == len(offsets) * H
            finally:
                server.stop()
    finally:
        with open(nr, "w") as f:
            f.write(str(old))


def _refusal(server: Server) -> str:
    """The one refusal the server has recorded, waited for: a refused VMM
    sees the hang-up, or dies of the kill, just before the record is made."""
    wait_for(lambda: server.refused, "no guest was refused", 10)
    assert len(server.refused) == 1, list(server.refused)
    return server.refused[0]


def _open_fds() -> set[str]:
    """This process's open fds (without the one listing them)."""
    fds = set()
    for f in os.listdir("/proc/self/fd"):
        try:
            os.readlink(f"/proc/self/fd/{f}")
            fds.add(f)
        except FileNotFoundError:  # the listing's own directory fd
            pass
    return fds


@pytest.mark.parametrize(
    "payload,fds,message",
    [
        (b"not json", 1, "handshake payload is not JSON"),
        (b'{"a": 1}', 1, "handshake payload is not a JSON array of regions"),
        (b'[{"size": 4096, "offset": 0, "page_size": 4096}]', 1, "region 0 is missing 'base_host_virt_addr'"),
        (b'[{"base_host_virt_addr": 4096, "size": 4096, "offset": 0, "page_size": 4096}]', 0, "handshake carried no userfaultfd"),
        (b'[{"base_host_virt_addr": 4096, "size": 4096, "offset": 0, "page_size": 4096}]', 2, "the handshake's second fd is not a memfd"),
        (b'[{"base_host_virt_addr": 4096, "size": 4096, "offset": 0, "page_size": 4096}]', 3, "handshake carried 3 fds; expected 1"),
        (b'[{"base_host_virt_addr": 4096, "size": 33554432, "offset": 0, "page_size": 4096}]', 1, "ends past the 16 MiB snapshot"),
        (b'[{"base_host_virt_addr": 4096, "size": 8192, "offset": 0, "page_size": 4096},'
         b' {"base_host_virt_addr": 65536, "size": 8192, "offset": 4096, "page_size": 4096}]', 1, "region 1 overlaps region 0 in the memory file"),
        (b'[{"base_host_virt_addr": 4097, "size": 4096, "offset": 0, "page_size": 4096}]', 1, "is not aligned"),
        (b'[{"base_host_virt_addr": 4096, "size": 4096, "offset": 0, "page_size": 8192}]', 1, "page size 8192 is not supported"),
        (b'[{"base_host_virt_addr": 2097152, "size": 2097152, "offset": 0, "page_size": 2097152},'
         b' {"base_host_virt_addr": 8388608, "size": 4096, "offset": 2097152, "page_size": 4096}]', 1,
         "regions use different page sizes"),
    ],
)
def test_bad_handshakes_are_refused_and_the_server_goes_on(serve, image, payload, fds, message):
    from restore._native import lib

    server = serve()
    before = _open_fds()
    ufds = [lib.rs_uffd_create(1, 0) for _ in range(fds)]
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(server.socket_path)
    socket.send_fds(c, [payload], ufds) if ufds else c.sendall(payload)
    for fd in ufds:
        os.close(fd)
    line = _refusal(server)
    assert message in line
    assert line.startswith(f"refused guest pid {os.getpid()}: ")
    assert c.recv(1) == b""  # the server hung up
    c.close()
    assert _open_fds() <= before | {str(f) for f in ufds}
    with Guest(server.socket_path, memory_size=SIZE) as g:
        assert (g.run(reads([0, P]), timeout=30).sums == expected_sums(image, [0, P])).all()


def test_a_refused_vmm_is_killed_rather_than_left_hanging(serve, tmp_path):
    """A separate process that sends a bad handshake (regions past the
    snapshot) and would then wait forever is killed, and the log says why."""
    import subprocess
    import sys

    server = serve()
    code = (
        "import socket, sys, time\n"
        "from restore._native import lib\n"
        "c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); c.connect(sys.argv[1])\n"
        "msg = b'[{\"base_host_virt_addr\": 4096, \"size\": 1073741824, \"offset\": 0, \"page_size\": 4096}]'\n"
        "socket.send_fds(c, [msg], [lib.rs_uffd_create(1, 0)])\n"
        "time.sleep(60)\n"
    )
    vmm = subprocess.Popen([sys.executable, "-c", code, server.socket_path])
    try:
        assert vmm.wait(30) == -signal.SIGKILL
    finally:
        vmm.kill()
    assert _refusal(server) == (
        f"refused guest pid {vmm.pid}: region 0 [0x1000, +1 GiB) at file offset 0x0 ends past the 16 MiB snapshot; "
        "killed it, as it cannot run without its page-fault handler"
    )


def test_peer_closing_mid_handshake(serve, image):
    server = serve()
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(server.socket_path)
    c.sendall(b'[{"base_host_virt_addr": 4096,')
    c.close()
    assert "peer closed the connection during the handshake" in _refusal(server)


def test_socket_is_private_and_stale_sockets_are_replaced(tmp_path, snap):
    path = tmp_path / "x.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on
    with Server(snap, path):
        assert os.stat(path).st_mode & 0o777 == 0o600
        from restore.errors import InputError

        with pytest.raises(InputError, match="another server is listening there"):
            Server(snap, path)
    assert not path.exists()


class _StalledStore(DurableStore):
    """A real file store whose chunk reads wait until released, as a
    stalled network would: keeps a guest blocked mid-restore."""

    def __init__(self, url: str):
        super().__init__(url)
        self.release = threading.Event()

    def get(self, key):
        if key.startswith("chunks/"):
            self.release.wait(30)
        return super().get(key)

    async def get_async(self, key):  # the fetch loop's read
        if key.startswith("chunks/"):
            await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 30)
        return await super().get_async(key)


def test_stop_kills_a_guest_still_running_after_the_drain_timeout(tmp_path, snap, image):
    """A guest still blocked when the server stops is killed after the
    drain timeout rather than left hanging without its handler."""
    stalled = _StalledStore(snap.store.url)
    with Snapshot.open(stalled, "vm") as s:
        server = Server(s, tmp_path / "k.sock", ServerSettings(drain_timeout=0.2), l1=None).start()
        p = int(np.flatnonzero(_image_pages(image).any(axis=1))[0]) * P
        g = Guest(server.socket_path, memory_size=SIZE).start(reads([p]))
        deadline = time.monotonic() + 10
        while server.active() == 0:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        with pytest.raises(GuestError, match="SIGKILL"):
            g.wait(10)
        stalled.release.set()
        stopper.join(15)
        assert not stopper.is_alive()
        g.close()
        assert server.active() == 0 and len(server.summaries) == 1


def test_page_mapped_snapshot_is_served_through_its_map(tmp_path):
    """Pages packed out of offset order (a working-set-first layout) are
    found through the page map, never by offset arithmetic."""
    from test_snapshot_page_map import _build

    img = tmp_path / "pm.img"
    write_sample_image(img, 2 << 20, seed=17)
    image_bytes = img.read_bytes()
    store = DurableStore(f"file://{tmp_path}/pmstore")
    _build(store, image_bytes, seed=4)
    with Snapshot.open(store, "ws") as s:
        assert s.manifest.page_map is not None
        server = Server(s, tmp_path / "pm.sock", l1=L1Cache(tmp_path / "pml1")).start()
        try:
            offsets = np.random.default_rng(1).permutation(len(image_bytes) // P).astype(np.uint64) * P
            with Guest(server.socket_path, memory_size=len(image_bytes)) as g:
                res = g.run(reads(offsets), timeout=60)
            assert (res.sums == expected_sums(img, offsets)).all()
        finally:
            server.stop()


def test_a_peer_with_another_uid_is_refused_and_not_killed(snap, image):
    """Only the allowed uids (default: the server's own) may connect. Even
    with the socket opened up to everyone, a process of another user is
    hung up on before anything is read from it, and is not killed."""
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="restore-open-")
    os.chmod(d, 0o755)
    server = Server(snap, os.path.join(d, "s.sock")).start()
    os.chmod(server.socket_path, 0o666)  # as a careless deployment might
    client = (
        "import os, socket, sys, time\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect(sys.argv[1])\n"
        "s.sendall(b'[]')\n"
        "try:\n    gone = s.recv(1) == b''\n"
        "except ConnectionResetError:  # closed with our bytes unread\n    gone = True\n"
        "print(gone, flush=True); time.sleep(1)\n"
    )
    proc = subprocess.run([sys.executable, "-c", client, server.socket_path], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0 and proc.stdout == "True\n", proc.stderr  # hung up on, alive to the end
    assert _refusal(server).endswith(f"peer uid 65534 is not allowed on {server.socket_path} (allowed: {os.getuid()})")
    try:
        # The server's own uid is still served.
        with Guest(server.socket_path, memory_size=SIZE) as g:
            assert (g.run(reads([0]), timeout=30).sums == expected_sums(image, [0])).all()
    finally:
        server.stop()
        shutil.rmtree(d, ignore_errors=True)


def test_allowed_uids_exclude_even_our_own(serve, image, tmp_path):
    """A VMM refused for its uid that sent its userfaultfd would hang at its
    first fault (Firecracker touches guest memory during the snapshot load):
    its handshake is read, nothing is served, and it is killed."""
    server = serve(sockets=Listen(tmp_path / "uid.sock", allowed_uids=[12345]))
    with Guest(server.socket_path, memory_size=SIZE) as g:
        g.start(reads([0]))
        with pytest.raises(GuestError, match="SIGKILL"):
            g.wait(30)
        assert _refusal(server) == (
            f"refused guest pid {g.pid}: peer uid {os.getuid()} is not allowed on {server.socket_path} (allowed: 12345); killed it, as it "
            "sent a userfaultfd, and a VMM whose memory nobody serves hangs at its first page fault")
    from restore.errors import InputError

    with pytest.raises(InputError, match="its allowed uids are empty"):
        Server(server.snapshot, Listen("/nonexistent/x.sock", allowed_uids=[]))


def test_a_vmm_of_another_uid_that_sends_its_uffd_is_killed(snap):
    """A process of another user that sends a userfaultfd is a VMM that
    would hang: killed through its pidfd, the log says why."""
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="restore-open-")
    os.chmod(d, 0o755)
    server = Server(snap, os.path.join(d, "s.sock")).start()
    os.chmod(server.socket_path, 0o666)
    client = (
        "import os, socket, sys, time\n"
        "from restore._native import lib\n"
        "uffd = lib.rs_uffd_create(1, 0)\n"  # made before giving up root, as a jailer's VMM has its own
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect(sys.argv[1])\n"
        "msg = b'[{\"base_host_virt_addr\": 4096, \"size\": 4096, \"offset\": 0, \"page_size\": 4096}]'\n"
        "socket.send_fds(s, [msg], [uffd])\n"
        "time.sleep(60)\n"
    )
    vmm = subprocess.Popen([sys.executable, "-c", client, server.socket_path])
    try:
        assert vmm.wait(30) == -signal.SIGKILL
        assert _refusal(server) == (
            f"refused guest pid {vmm.pid}: peer uid 65534 is not allowed on {server.socket_path} "
            f"(allowed: {os.getuid()}); killed it, as "
            "it sent a userfaultfd, and a VMM whose memory nobody serves hangs at its first page fault")
    finally:
        vmm.kill()
        server.stop()
        shutil.rmtree(d, ignore_errors=True)


def test_a_vmm_that_closes_its_connection_is_served_until_it_exits(tmp_path, snap, image, caplog):
    """Firecracker v1.10 and v1.11 close the socket right after the
    handshake. The VMM is tracked by its pidfd: the session serves on after
    the connection's end, every byte right, and ends when the VMM exits."""
    stalled = _StalledStore(snap.store.url)
    pages = _image_pages(image)
    offs = (np.flatnonzero(pages.any(axis=1))[::37] * P).astype(np.uint64)
    with Snapshot.open(stalled, "vm") as s:
        server = Server(s, tmp_path / "c.sock", l1=None).start()
        try:
            with caplog.at_level(logging.INFO, logger="restore.handler"):
                with Guest(server.socket_path, memory_size=SIZE, close_conn=True) as g:
                    g.start(reads(offs))
                    # Its first fault waits on the stalled store while the
                    # connection is already closed: the session goes on.
                    deadline = time.monotonic() + 10
                    while server.counters().get("conn_closed", 0) == 0:
                        assert time.monotonic() < deadline, "the session did not see the connection close"
                        time.sleep(0.01)
                    assert server.active() == 1 and not server.summaries
                    stalled.release.set()
                    res = g.wait(60)
                assert (res.sums == expected_sums(image, offs)).all()
                st = _wait_sessions(server, 1)[0].stats
        finally:
            server.stop()
    assert st.conn_closed == 1 and st.ended_by == "vmm exited"
    assert st.pages_installed >= len(offs)
    assert "connection closed after the handshake; serving until the VMM exits" in caplog.text
    assert _scrape(server, "restore_sessions_conn_closed_total") == 1


def _scrape(server: Server, name: str) -> float:
    """The value of one sample of the server's Prometheus metrics."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from restore.metrics import ServerMetrics

    metrics = ServerMetrics()
    metrics.attach(server)
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise KeyError(name)


def test_a_peer_in_this_process_still_ends_its_session_by_closing(serve):
    """Without a pidfd to track (the peer is this very process), the
    connection's end ends the session, as before."""
    import mmap

    from restore._native import ffi
    from restore.uffd import Userfaultfd

    server = serve()
    m = mmap.mmap(-1, 16 * P)
    addr = int(ffi.cast("uintptr_t", ffi.from_buffer(m)))
    with Userfaultfd() as u:
        u.register(addr, len(m))
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(server.socket_path)
        msg = f'[{{"base_host_virt_addr": {addr}, "size": {len(m)}, "offset": 0, "page_size": 4096}}]'.encode()
        socket.send_fds(c, [msg], [u.fileno()])
        deadline = time.monotonic() + 10
        while server.active() == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        c.close()
        st = _wait_sessions(server, 1)[0].stats
    m.close()
    assert st.ended_by == "connection closed" and st.conn_closed == 0


@pytest.mark.parametrize("poison", [True, False])
def test_an_unfetchable_chunk_without_uffdio_poison_kills_the_vmm(serve, snap, image, caplog, poison):
    """On a kernel without UFFDIO_POISON (masked here with poison=False) a
    page that cannot be served is never left hanging: the VMM is killed
    through its pidfd and the log names the cause. With it, the page is
    poisoned and the guest gets SIGBUS."""
    idx = _chunk_of(snap, image, 3)
    key = chunk_key(snap.manifest.chunks[idx].id)
    snap.store.delete(key)
    pages = _image_pages(image)
    p = next(p for p in range(idx * CHUNK // P, (idx + 1) * CHUNK // P) if pages[p].any())
    server = serve(poison=poison)
    with Guest(server.socket_path, memory_size=SIZE) as g:
        with pytest.raises(GuestError, match="SIGBUS" if poison else "SIGKILL"):
            g.run(reads([0, p * P]), timeout=30)
        pid = g.pid
    st = _wait_sessions(server, 1)[0].stats
    cause = re.compile(rf"killed guest pid {pid}: page at 0x[0-9a-f]+ could not be served \(chunk {idx}: object "
                       rf"{re.escape(key)} is missing from \S+\) and this kernel has no UFFDIO_POISON")
    if poison:
        assert st.poisoned >= 1 and st.vmm_killed == 0 and not cause.search(caplog.text)
    else:
        assert st.poisoned == 0 and st.vmm_killed == 1 and st.ended_by == "vmm exited"
        assert cause.search(caplog.text), caplog.text
    assert _scrape(server, "restore_vmm_unservable_kills_total") == (0 if poison else 1)


@pytest.mark.parametrize("poison", [True, False])
def test_a_fault_outside_the_regions_without_uffdio_poison_kills_the_vmm(serve, caplog, poison):
    """A VMM that registered more memory than its handshake described and
    touches it: poisoned (SIGBUS) where the kernel can, else killed."""
    server = serve(poison=poison)
    code = (
        "import mmap, socket, sys\n"
        "from restore._native import ffi, load_testbed\n"
        "from restore.uffd import Userfaultfd\n"
        "_, mem = load_testbed()\n"
        "m = mmap.mmap(-1, 32 * 4096)\n"
        "addr = int(ffi.cast('uintptr_t', ffi.from_buffer(m)))\n"
        "u = Userfaultfd(); u.register(addr, len(m))\n"
        "c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); c.connect(sys.argv[1])\n"
        "msg = f'[{{\"base_host_virt_addr\": {addr}, \"size\": 65536, \"offset\": 0, \"page_size\": 4096}}]'\n"
        "socket.send_fds(c, [msg.encode()], [u.fileno()])\n"
        "print(mem.rs_mem_checksum(addr, 4096), flush=True)\n"  # inside: served
        "mem.rs_mem_checksum(addr + 65536, 4096)\n"  # registered, not described
        "print('survived', flush=True)\n"
    )
    vmm = subprocess.Popen([sys.executable, "-c", code, server.socket_path], stdout=subprocess.PIPE, text=True)
    try:
        out, _ = vmm.communicate(timeout=30)
    finally:
        vmm.kill()
    assert vmm.returncode == (-signal.SIGBUS if poison else -signal.SIGKILL)
    # The described page was served; the other one never returned.
    assert len(out.splitlines()) == 1 and out.split()[0].isdigit(), out
    st = _wait_sessions(server, 1)[0].stats
    cause = re.compile(rf"killed guest pid {vmm.pid}: page at 0x[0-9a-f]+ could not be served \(outside the "
                       rf"regions its handshake described\) and this kernel has no UFFDIO_POISON")
    assert bool(cause.search(caplog.text)) == (not poison), caplog.text
    assert st.vmm_killed == (0 if poison else 1)


def test_a_session_that_ends_in_error_kills_its_running_vmm(serve, image, caplog, monkeypatch):
    """A session that ends while its VMM runs (here: the server's wait
    breaks) leaves the VMM without its handler: it is killed through its
    pidfd, and the log says why."""
    from restore.session import RestoreSession

    def broken(self, timeout=None):
        raise RuntimeError("the wait broke")

    monkeypatch.setattr(RestoreSession, "wait", broken)
    server = serve()
    with Guest(server.socket_path, memory_size=SIZE) as g:
        g.start(reads(np.arange(0, SIZE, P, dtype=np.uint64)))
        with pytest.raises(GuestError, match="SIGKILL"):
            g.wait(30)
        pid = g.pid
    assert re.search(rf"killed guest pid {pid}: session \S+ of vm/1 ended \(stopped\) while its VMM was running",
                     caplog.text), caplog.text


@pytest.mark.parametrize("fetch_loop", [True, False], ids=["fetch-loop", "fetch-threads"])
def test_a_session_whose_setup_fails_leaves_nothing_running(snap, tmp_path, monkeypatch, fetch_loop):
    """A step of the session's setup that raises once the engine and its
    fetch threads run (here: starting the fetchers, injected) stops the
    engine, joins every thread started and frees the engine: the process
    has as many threads as before."""
    import restore.session as session_module

    base = session_module.AsyncFetchers if fetch_loop else session_module.Fetchers

    class Failing(base):
        def start(self):
            super().start()  # its threads run
            raise RuntimeError("injected: the fetchers failed to start")

    monkeypatch.setattr(session_module, "AsyncFetchers" if fetch_loop else "Fetchers", Failing)
    with _waiting_guest(snap, str(tmp_path / "f.sock")) as (g, conn, hs):
        before = len(os.listdir("/proc/self/task"))
        with pytest.raises(RuntimeError, match="injected"):
            session_module.RestoreSession(snap, hs.uffd, hs.regions, hs.page_size, conn_fd=conn.fileno(),
                                          l1=L1Cache(tmp_path / "l1"), fetch_loop=fetch_loop)
        # Every thread it started has returned by the time the error is
        # raised (an OS thread lingers a moment after its function returns).
        deadline = time.monotonic() + 30
        while len(os.listdir("/proc/self/task")) > before:
            assert time.monotonic() < deadline, f"threads left running: {os.listdir('/proc/self/task')}"
            time.sleep(0.01)
        hs.close()
        conn.close()  # the guest's wait ends with the connection
        g.wait(30)


def test_a_session_made_unstarted_leaves_faults_to_start(snap, image, tmp_path):
    """start=False: the session can be read (as a handler registers it
    before its first fault) but takes nothing from the userfaultfd until
    start(); then it serves the fault that waited."""
    import select

    from restore.session import RestoreSession

    offsets = np.array([3, 200, 1000], dtype=np.uint64) * P
    with _waiting_guest(snap, str(tmp_path / "u.sock"), then=reads(offsets)) as (g, conn, hs):
        session = RestoreSession(snap, hs.uffd, hs.regions, hs.page_size, conn_fd=conn.fileno(),
                                 l1=L1Cache(tmp_path / "l1"), persist_log=False, start=False)
        with session:
            uffd = select.poll()
            uffd.register(hs.uffd, select.POLLIN)
            assert uffd.poll(30_000), "the guest's first read raised no fault"
            assert session.parked() == {"faults": 0, "on_network": 0}
            assert session.counters()["faults"] == 0
            assert uffd.poll(0), "the fault was taken from the userfaultfd before start()"
            session.start()
            conn.sendall(b"g")
            res = g.wait(30)
            assert session.stats().faults >= 1
        assert (res.sums[: len(offsets)] == expected_sums(image, offsets)).all()
        hs.close()
        conn.close()


@pytest.mark.parametrize("when", ["made", "started"])
@pytest.mark.parametrize("error", [RestoreError, RuntimeError], ids=["restore-error", "internal-error"])
def test_a_session_that_cannot_start_is_refused_and_leaves_nothing(serve, monkeypatch, when, error):
    """A session that fails as it is made or as it starts (its fetch loop
    here; the handler counts a session between the two) is refused, its
    guest killed (it would hang at its first fault), and it leaves no
    running session and no open fd behind, whatever the error."""
    from restore.asyncfetch import AsyncFetchers

    def fail(self, *args, **kwargs):
        raise error("injected failure")

    monkeypatch.setattr(AsyncFetchers, "__init__" if when == "made" else "start", fail)
    server = serve()
    before = _open_fds()
    with Guest(server.socket_path, memory_size=SIZE) as g:
        g.start(reads([0]))
        with pytest.raises(GuestError):
            g.wait(30)
    assert "injected failure" in _refusal(server)
    counts = server.counters()
    assert counts["sessions_active"] == 0 and counts["sessions_refused"] == 1 and not server.summaries
    assert _open_fds() <= before


@pytest.mark.parametrize("planned", [True, False], ids=["plan", "no-plan"])
def test_waiting_for_the_prefetch(snap, image, tmp_path, planned):
    """wait_prefetch returns once prefetch_done() holds; a session without
    a plan has nothing to wait for and says so at once."""
    from restore.session import RestoreSession

    plan = np.flatnonzero(_image_pages(image).any(axis=1))[:200].astype(np.uint64) * P if planned else None
    with _waiting_guest(snap, str(tmp_path / "w.sock")) as (g, conn, hs):
        with RestoreSession(snap, hs.uffd, hs.regions, hs.page_size, conn_fd=conn.fileno(),
                            l1=L1Cache(tmp_path / "l1"), persist_log=False, plan=plan, prefetch_around=1) as session:
            assert session.wait_prefetch(60 if planned else 0) == planned
            assert session.prefetch_done() == planned
            if planned:
                assert session.stats().prefetch_pages == len(plan)
            conn.sendall(b"g")
            g.wait(30)
        hs.close()
        conn.close()
