"""Prefetch install throughput against raw UFFDIO_COPY, into the same kind
of guest process, in one run. Every throughput is bytes over the median
round's wall-clock time (extra_info bytes / stats.median), so ratios set
wall clock against wall clock.

- raw-copy: the guest's whole memory (256 MiB, every page non-zero) filled
  with one UFFDIO_COPY per run of 2 MiB (and, for like-for-like runs, of
  512 KiB: one chunk) from a buffer already in memory, on one thread. The
  floor: no reading, no verification, no decode.
- prefetch: a session whose plan lists every page, L1 warm, no host cache;
  the guest waits, touching nothing, until the prefetch is done. Timed
  from session start to prefetch_done: L1 reads, SHA-256 verification, lz4
  decode and the installs, on the engine's threads. Its wall-clock
  throughput is the one to set against raw-copy's.
  extra_info l1_read_thread_ms, decode_thread_ms and install_thread_ms
  break each round down by phase in thread time: summed over the threads
  that ran it, which overlap, so they are no wall clock and go in no ratio
  with one (cpus: the CPUs they shared).

After every round the guest reads every page of its memory and each
page's checksum is checked against the image (outside the timing).

- install paths (test_bench_install_path): the same 256 MiB made guest
  memory by each way the kernel offers, anonymous and memfd-backed, in
  wall-clock GB/s; see the comment above it. Each round's guest memory is
  compared with the image byte for byte (outside the timing).
"""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest

from restore.protocol import accept_handshake
from restore.session import RestoreSession
from restore.guest import Guest, reads, wait
from restore.testing import expected_sums
from restore.uffd import Userfaultfd

P = 4096
SIZE = 256 << 20
CHUNK = 512 * 1024
ROUNDS = 5


@pytest.fixture(scope="module")
def world(warm_l1_snapshot):
    # No zero pages: every page is copied.
    made = warm_l1_snapshot("prefetch", SIZE, seed=5, chunk_size=CHUNK, zero=0.0, random=0.2)
    data = np.fromfile(made.image, dtype=np.uint8)  # resident: the raw copies' source
    every = np.arange(0, SIZE, P, dtype=np.uint64)
    return {"dir": made.dir, "snap": made.snap, "l1": made.l1, "data": data, "plan": every,
            "sums": expected_sums(data, every)}


class Round:
    """One guest that waits for the go-ahead, then reads every page."""

    def __init__(self, world, name):
        self.world = world
        path = world["dir"] / f"{name}.sock"
        if path.exists():
            path.unlink()
        self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.lsock.bind(str(path))
        self.lsock.listen(1)
        self.guest = Guest(str(path), memory_size=SIZE)
        self.guest.start(np.concatenate([wait(), reads(world["plan"])]))
        self.conn, _ = self.lsock.accept()
        self.hs = accept_handshake(self.conn, memory_size=SIZE, snapshot_page_size=P, chunk_size=CHUNK)
        self.session = None

    def finish(self):
        self.conn.sendall(b"g")
        res = self.guest.wait(60)
        if self.session is not None:
            self.session.wait(10)
            self.session.close()
        self.hs.close()
        self.conn.close()
        self.guest.close()
        self.lsock.close()
        wrong = int((res.sums[1:] != self.world["sums"]).sum())
        if len(res.sums) != len(self.world["sums"]) + 1 or wrong:
            raise RuntimeError(f"the guest read wrong bytes: {wrong} of {SIZE // P} pages")


@pytest.mark.parametrize("run_kib", [2048, 512])
def test_bench_raw_copy(benchmark, world, run_kib):
    state = {}
    run = run_kib << 10
    src = world["data"].ctypes.data

    def setup():
        state["round"] = Round(world, f"raw{run_kib}")

    def copy():
        r = state["round"]
        with Userfaultfd.from_fd(os.dup(r.hs.uffd)) as uffd:
            for reg in r.hs.regions:
                for off in range(0, reg.size, run):
                    uffd.copy(reg.base + off, src + reg.offset + off, min(run, reg.size - off))

    benchmark.pedantic(copy, setup=setup, teardown=lambda: state["round"].finish(), rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update(bytes=SIZE, label=f"raw UFFDIO_COPY, {run_kib} KiB runs")


def test_bench_prefetch_install(benchmark, world):
    state = {}
    phases = []

    def setup():
        state["round"] = Round(world, "prefetch")

    def prefetch():
        r = state["round"]
        r.session = RestoreSession(world["snap"], r.hs.uffd, r.hs.regions, r.hs.page_size, conn_fd=r.conn.fileno(),
                                   l1=world["l1"], persist_log=False, plan=world["plan"])
        assert r.session.wait_prefetch(600), "the prefetch did not end"

    def teardown():
        st = state["round"].session.stats()
        assert st.prefetch_pages == SIZE // P and st.faults == 0
        phases.append((st.l1_read_ns, st.decode_ns, st.prefetch_install_ns))
        state["round"].finish()

    benchmark.pedantic(prefetch, setup=setup, teardown=teardown, rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update(bytes=SIZE, label="prefetch, end to end (L1 read + SHA-256 + lz4 + install)",
                                cpus=os.cpu_count())
    for name, ns in zip(("l1_read_thread_ms", "decode_thread_ms", "install_thread_ms"),
                        np.median(np.array(phases), axis=0)):
        benchmark.extra_info[name] = float(ns) / 1e6


# -- install paths into a memfd ------------------------------------------------
#
# How fast can 256 MiB of bytes already in memory become guest memory, per
# install path? One process, its own mappings registered with its own
# userfaultfd (no faults are taken: only the installs are timed), 2 MiB runs:
#   anon-copy            UFFDIO_COPY into anonymous memory (upstream Firecracker)
#   shm-copy             UFFDIO_COPY into a memfd mapping (what the engine does
#                        for memfd-backed guests)
#   shm-pwrite-continue  pwrite the bytes into the memfd, then UFFDIO_CONTINUE
#   shm-memcpy-continue  memcpy through the handler's own shared mapping of the
#                        memfd, then UFFDIO_CONTINUE ("map, don't copy")
#   shm-continue-cached  UFFDIO_CONTINUE alone, the pages already in the memfd's
#                        page cache (the best case of mapping instead of copying)

INSTALL_PATHS = {
    "anon-copy": "UFFDIO_COPY, anonymous memory",
    "shm-copy": "UFFDIO_COPY into a memfd",
    "shm-pwrite-continue": "pwrite into the memfd, then UFFDIO_CONTINUE",
    "shm-memcpy-continue": "memcpy through a shared mapping, then UFFDIO_CONTINUE",
    "shm-continue-cached": "UFFDIO_CONTINUE alone, pages already in the page cache",
}


@pytest.mark.parametrize("path", list(INSTALL_PATHS))
def test_bench_install_path(benchmark, world, path):
    import ctypes
    import mmap

    from restore.uffd import Feature

    run = 2 << 20
    src = world["data"]
    state = {}

    def setup():
        shared = path != "anon-copy"
        if shared:
            fd = os.memfd_create("bench-guest", os.MFD_CLOEXEC)
            os.ftruncate(fd, SIZE)
            guest = mmap.mmap(fd, SIZE, mmap.MAP_SHARED)
            mine = mmap.mmap(fd, SIZE, mmap.MAP_SHARED)
        else:
            fd, mine = None, None
            guest = mmap.mmap(-1, SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        uffd = Userfaultfd(Feature.MINOR_SHMEM if shared else Feature(0))
        g = ctypes.addressof(ctypes.c_char.from_buffer(guest))
        uffd.register(g, SIZE, missing=True, minor=shared)
        if path == "shm-continue-cached":
            os.pwrite(fd, src, 0)
        state.update(fd=fd, guest=guest, mine=mine, uffd=uffd, g=g,
                     m=ctypes.addressof(ctypes.c_char.from_buffer(mine)) if mine is not None else 0)

    def install():
        s = state
        for off in range(0, SIZE, run):
            if path.endswith("copy"):
                s["uffd"].copy(s["g"] + off, src.ctypes.data + off, run)
                continue
            if path == "shm-pwrite-continue":
                os.pwrite(s["fd"], memoryview(src)[off:off + run], off)
            elif path == "shm-memcpy-continue":
                ctypes.memmove(s["m"] + off, src.ctypes.data + off, run)
            s["uffd"].continue_(s["g"] + off, run)

    def teardown():
        s = state
        # The array is gone at the end of the statement: the mapping can close.
        if not np.array_equal(np.frombuffer(s["guest"], dtype=np.uint8), src):
            raise RuntimeError(f"{path}: guest memory differs from the image")
        s["uffd"].close()
        s["guest"].close()
        if s["mine"] is not None:
            s["mine"].close()
        if s["fd"] is not None:
            os.close(s["fd"])

    benchmark.pedantic(install, setup=setup, teardown=teardown, rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update(bytes=SIZE, label=INSTALL_PATHS[path])
