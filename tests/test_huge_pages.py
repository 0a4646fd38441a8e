"""2 MiB hugetlbfs guests from snapshots whose chunks are smaller than a
huge page, or whose page map scattered a huge page's 4 KiB pages: real
guest processes with hugetlbfs memory, a real userfaultfd, sessions of the
engine. Each huge page is assembled from the chunks it spans and installed
whole.

A guest's checksum of a page is a sum of its words, blind to the order of
the 4 KiB pieces inside it; so besides the sums, the bytes of the huge pages
a guest touched are read out of its memory (/proc/PID/mem, while it waits
at its last step) and compared with the image byte for byte.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import time
from pathlib import Path

import numpy as np
import pytest

import hugepages
from restore.faultlog import SOURCES
from restore.layout import optimize_snapshot
from restore.objects import chunk_key
from restore.protocol import accept_handshake
from restore.session import RestoreSession
from restore.snapshot import Snapshot
from restore.guest import Guest, GuestError, reads, remove, wait
from restore.testing import expected_sums
from restore.tiers.host import HostCache
from restore.tiers.l1 import L1Cache

P = 4096
H = 2 << 20
SIZE = 16 << 20  # eight huge pages
CHUNK = 512 * 1024  # the default: four chunks per huge page
ZERO_HUGE = 2  # a huge page all of whose bytes are zero
ZERO_CHUNK = 5 * H + CHUNK  # a chunk of zeros (nothing stored) inside huge page 5


@pytest.fixture(scope="module")
def image(make_image) -> Path:
    """Runs of zero, random and text-like 4 KiB pages, one huge page all zero
    and one chunk of another all zero."""
    path = make_image(SIZE, seed=23, zero=0.3)
    data = bytearray(path.read_bytes())
    data[ZERO_HUGE * H:(ZERO_HUGE + 1) * H] = bytes(H)
    data[ZERO_CHUNK:ZERO_CHUNK + CHUNK] = bytes(CHUNK)
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(autouse=True)
def huge_pages():
    """16 more 2 MiB pages for each test (tests/hugepages.py)."""
    with hugepages.reserved(16):
        yield


def sums_of(image: Path, pages) -> np.ndarray:
    return expected_sums(image, [h * H for h in pages], page_size=H)


_n = itertools.count()


def run(tmp_path, snap, ops, *, look=(), gate=False, **session_kw):
    """One hugetlbfs guest running ops, served by a RestoreSession of snap.
    look: huge pages whose bytes are read from the guest's memory once its
    ops are done. gate: the guest waits until the session's prefetch is
    done. Returns (GuestResult or None, GuestError or None, SessionStats,
    fault log, prefetched offsets, {page: bytes})."""
    path = str(tmp_path / f"g{next(_n)}.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(1)
    lsock.settimeout(30)
    res = err = None
    seen = {}
    m = snap.manifest
    steps = np.concatenate([wait(), ops, wait()]) if gate else np.concatenate([ops, wait()])
    try:
        with Guest(path, memory_size=SIZE, page_size=H, hugetlb=True) as g:
            g.start(steps)
            try:
                conn, _ = lsock.accept()
            except socket.timeout:
                g.wait(1)  # raises the guest's own reason
                raise
            with conn, accept_handshake(conn, memory_size=m.memory_size, snapshot_page_size=m.page_size,
                                        chunk_size=m.chunk_size) as hs:
                assert hs.page_size == H
                session = RestoreSession(snap, hs.uffd, hs.regions, hs.page_size, persist_log=False,
                                         **session_kw)
                try:
                    deadline = time.monotonic() + 60
                    if gate:
                        assert session.wait_prefetch(60), "the prefetch did not finish"
                        conn.sendall(b"g")
                    # Until the guest waits at its last step (or died).
                    while g.steps_done() < len(steps) - 1 and g._proc.poll() is None:
                        assert time.monotonic() < deadline, "the guest did not finish its reads"
                        time.sleep(0.01)
                    if g._proc.poll() is None:
                        base = hs.regions[0].base
                        with open(f"/proc/{g.pid}/mem", "rb", buffering=0) as mem:
                            seen = {h: os.pread(mem.fileno(), H, base + h * H) for h in look}
                        conn.sendall(b"g")
                    try:
                        res = g.wait(60)
                    except GuestError as exc:
                        err = exc
                finally:
                    stats = session.close()
                return res, err, stats, session.fault_log(), session.prefetched_offsets(), seen
    finally:
        lsock.close()


def same_bytes(image: Path, seen: dict) -> list[int]:
    """The huge pages in seen whose bytes differ from the image's."""
    with open(image, "rb") as f:
        return [h for h, got in seen.items() if got != os.pread(f.fileno(), H, h * H)]


@pytest.fixture
def snap(open_snapshot, image):
    s = open_snapshot(image, "vm")  # default chunks: 512 KiB
    assert s.manifest.chunk_size == CHUNK
    return s


def test_lazy_restore_with_default_chunks(tmp_path, snap, image):
    l1 = L1Cache(tmp_path / "l1")
    order = [5, 0, 7, 3, ZERO_HUGE, 1, 6, 4]
    ops = np.concatenate([reads([h * H for h in order]), remove(3 * H), reads([3 * H])])
    data_chunks = sum(1 for c in snap.manifest.chunks if c.id)
    for run_no in range(2):  # cold (the store), then warm (L1)
        res, err, st, log, _, seen = run(tmp_path, snap, ops, look=[h for h in order if h != 3], l1=l1)
        assert err is None, err
        assert (res.sums[:len(order)] == sums_of(image, order)).all()
        assert res.sums[len(order) + 1] == 0  # removed: zeros from then on
        assert same_bytes(image, seen) == []
        assert st.error == 0 and st.poisoned == 0 and st.chunks_failed == 0
        # Whole huge pages, one fault and one install each (the removed one twice).
        assert st.pages_installed == st.faults == len(order) + 1
        assert st.bytes_installed == (len(order) + 1) * H
        assert st.first_touches["zero"] == 1  # ZERO_HUGE, with no fetch
        assert st.first_touches["durable" if run_no == 0 else "l1"] == len(order) - 1
        assert list(log["offset"][:len(order)]) == [h * H for h in order]
        # Each non-zero chunk loaded once, and freed once its huge page was in.
        assert st.chunks_fetched + st.chunks_l1 == data_chunks
        assert st.chunks_released == data_chunks and st.chunks_reloaded == 0


def test_a_replayed_plan_installs_whole_huge_pages_before_the_guest_runs(tmp_path, snap, image):
    planned = [6, 1, ZERO_HUGE, 4]
    plan = np.array([h * H for h in planned], dtype=np.uint64)
    touched = planned + [7, 3]
    res, err, st, log, prefetched, seen = run(tmp_path, snap, reads([h * H for h in touched]), look=touched,
                                              gate=True, plan=plan)
    assert err is None, err
    assert (res.sums[1:-1] == sums_of(image, touched)).all()
    assert same_bytes(image, seen) == []
    assert sorted(prefetched) == sorted(plan)  # no neighbour shares a chunk with them
    assert st.prefetch_pages == len(planned) and st.prefetch_done
    # Only the pages outside the plan fault.
    assert st.faults == 2 and st.faults_planned == 0 and st.faults_unplanned == 2
    assert st.first_touches["prefetched"] == len(planned)


def test_an_optimized_version_serves_huge_pages_from_scattered_slots(tmp_path, snap, image):
    # A working set of 4 KiB pages in a scrambled order across huge pages 1,
    # 4 and 6: the new version's page map scatters each huge page over hot
    # and cold chunks, in another order than the file's.
    rng = np.random.default_rng(8)
    hot = np.concatenate([np.arange(h * H // P, (h + 1) * H // P) for h in (1, 4, 6)])
    hot = rng.permutation(hot)[: len(hot) * 2 // 3].astype(np.uint64) * P
    opt = optimize_snapshot(snap, hot)
    every = list(range(SIZE // H))
    with Snapshot.open(snap.store, "vm", opt.manifest.version) as v2:
        pm = v2.page_map()
        assert len(np.unique(pm["chunk"][H // P:2 * H // P])) > 4  # huge page 1 spans more chunks
        order = [4, 0, 7, 1, 6, ZERO_HUGE, 5, 3]
        res, err, st, _, _, seen = run(tmp_path, v2, reads([h * H for h in order]), look=every)
        assert err is None, err
        assert (res.sums[:-1] == sums_of(image, order)).all()
        assert same_bytes(image, seen) == []
        assert st.poisoned == 0 and st.chunks_reloaded == 0 and st.error == 0
        assert st.chunks_released == st.chunks_fetched  # every chunk freed once its pages were in
        # Replaying a plan of 4 KiB offsets: the huge pages holding them.
        res, err, st, _, prefetched, seen = run(tmp_path, v2, reads([h * H for h in (1, 4, 6)]),
                                                look=[1, 4, 6], gate=True, plan=hot)
        assert err is None, err
        assert (res.sums[1:-1] == sums_of(image, [1, 4, 6])).all()
        assert same_bytes(image, seen) == []
        assert {1 * H, 4 * H, 6 * H} <= set(int(o) for o in prefetched)
        assert st.first_touches["prefetched"] == 3 and st.faults == 0


def test_a_chunk_that_cannot_be_had_poisons_its_huge_page(tmp_path, snap, image):
    # The second chunk of huge page 4 is gone from the store; its other
    # three chunks are fine.
    bad = (4 * H + CHUNK) // CHUNK
    assert snap.manifest.chunks[bad].id is not None
    snap.store.delete(chunk_key(snap.manifest.chunks[bad].id))
    res, err, st, log, _, _ = run(tmp_path, snap, reads([H, 4 * H]))
    assert res is None
    assert err is not None and re.search(r"SIGBUS at op 1 \(read of offset 0x800000\)", str(err)), err
    assert st.chunks_failed == 1 and st.poisoned == 1
    assert st.first_touches["failed"] == 1 and st.pages_installed == 1  # page 1 only
    assert list(log["offset"]) == [H, 4 * H]
    assert log["source"][1] == SOURCES.index("failed")


def test_the_host_cache_serves_huge_pages(tmp_path, snap, image):
    host = HostCache(tmp_path / "host")
    order = [7, ZERO_HUGE, 5, 0, 3, 6, 1, 4]
    ops = reads([h * H for h in order])
    data_chunks = sum(1 for c in snap.manifest.chunks if c.id)
    for run_no in range(2):  # fills the host cache, then is served from its mapping
        res, err, st, _, _, seen = run(tmp_path, snap, ops, look=order, host_cache=host)
        assert err is None, err
        assert (res.sums[:-1] == sums_of(image, order)).all()
        assert same_bytes(image, seen) == []
        assert st.host_errors == 0 and st.poisoned == 0
        if run_no == 0:
            assert st.host_fills == st.chunks_fetched == data_chunks and st.chunks_host == 0
        else:
            assert st.chunks_fetched == 0 and st.host_fills == 0 and st.decode_ns == 0
            assert st.chunks_host == data_chunks
            assert st.first_touches["host"] == len(order) - 1  # all but the zero page
