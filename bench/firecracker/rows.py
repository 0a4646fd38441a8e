"""The comparison's Firecracker rows: a real Firecracker restores the guest
of guest.c from a Full snapshot, and the guest's answers are timed from
`PUT /snapshot/load` (the requests wait in its serial input already) to its
first answer and to the end of the invocation (its last answer).

Strategies, each with the cache state it names set up before every run:
  mmap-cold    Firecracker's File backend (the memory file mapped
               MAP_PRIVATE by Firecracker), the file evicted from the page
               cache first (POSIX_FADV_DONTNEED)
  mmap-warm    the same with the file read into the page cache first
  uffd-lazy    the Uffd backend on a `restore serve` process (--no-plan):
               demand faults only; L1 and host cache warm
  uffd-replay  the same server with the working-set plan recorded from one
               earlier restore of invocation A, replayed as a prefetch
Every answer is checked against the VM that made the snapshot.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from . import driver

STRATEGIES = ["mmap-cold", "mmap-warm", "uffd-lazy", "uffd-replay"]  # names from bench.compare.STRATEGIES
INVOCATION = 10  # requests per invocation


def _serve(work: Path, store: str, name: str, sock: Path, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "restore", "serve", "--snapshot", name, "--socket", str(sock),
                             "--store", store, "--cache", str(work / "cache"), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"restore serve on {sock} did not start")
        time.sleep(0.01)
    return proc


def firecracker_rows(work: Path, rounds: int, mem_mib: int = 256,
                     log: Callable[[str], None] = lambda _: None) -> dict[str, dict[str, list[float]]]:
    """Rows "<...>: first answer" and "<...>: invocation end" for another
    invocation than the recorded one and for the recorded one, in ms;
    {} without /dev/kvm."""
    from bench.minivm.driver import kvm_available
    from restore.snapshot import Snapshot
    from restore.tiers.durable import DurableStore
    from restore.tiers.host import HostCache
    from restore.tiers.l1 import L1Cache

    if not kvm_available():
        return {}
    work.mkdir(parents=True, exist_ok=True)
    b = driver.binaries()
    fc = b.firecracker
    guest = driver.build_guest(work / "build")
    inv_a = list(range(1, INVOCATION + 1))
    inv_b = list(range(1000, 1000 + INVOCATION))
    state, mem = work / "vm.state", work / "vm.mem"
    n = iter(range(10**6))
    with driver.VM(fc, work / "boot") as vm:
        vm.boot(guest, mem_mib)
        reference = {a.request: a.value for a in vm.ask(inv_a + inv_b)}
        vm.snapshot(state, mem)
    store = f"file://{work}/store"
    subprocess.run([sys.executable, "-m", "restore", "snapshot", "create", str(mem), "--name", "fc", "--store", store],
                   check=True, capture_output=True)
    with Snapshot.open(DurableStore(store), "fc") as snap:  # L1 and host cache warm, as the other rows
        snap.fill_l1(L1Cache(work / "cache"))
        HostCache(work / "cache" / "host").fill(snap)

    def run(backend: str, path: Path, requests: list[int]) -> tuple[float, float]:
        with driver.VM(fc, work / f"vm{next(n) % 4}") as vm:
            vm.send(str(r) for r in requests)
            t0 = time.monotonic()
            vm.load(state, backend, path)
            got = vm.answers(len(requests))
        if any(reference[a.request] != a.value for a in got):
            raise RuntimeError(f"a Firecracker restore ({backend}) answered wrongly")
        return (got[0].at - t0) * 1e3, (got[-1].at - t0) * 1e3

    def file(cold: bool, requests: list[int]) -> tuple[float, float]:
        fd = os.open(mem, os.O_RDONLY)
        try:
            if cold:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while os.read(fd, 1 << 20):
                    pass
        finally:
            os.close(fd)
        return run("File", mem, requests)

    recorder = _serve(work, store, "fc", work / "rec.sock", "--record-fault-around", "1")
    try:
        run("Uffd", work / "rec.sock", inv_a)  # its fault log becomes the plan
    finally:
        recorder.terminate()
        recorder.wait()
    subprocess.run([sys.executable, "-m", "restore", "plan", "build", "fc", "--sessions", "1", "--store", store],
                   check=True, capture_output=True)
    lazy = _serve(work, store, "fc", work / "lazy.sock", "--no-plan")
    replay = _serve(work, store, "fc", work / "replay.sock", "--record-fault-around", "1")
    version = driver.version(fc)
    out: dict[str, dict[str, list[float]]] = {}
    try:
        for label, requests in (("another invocation", inv_b), ("the recorded invocation", inv_a)):
            first = out[f"firecracker {version} ({mem_mib} MiB), {label}: first answer"] = {s: [] for s in STRATEGIES}
            end = out[f"firecracker {version} ({mem_mib} MiB), {label}: invocation end"] = {s: [] for s in STRATEGIES}
            for i in range(rounds):  # interleaved: one of each per round
                for s, go in (("mmap-cold", lambda: file(True, requests)), ("mmap-warm", lambda: file(False, requests)),
                              ("uffd-lazy", lambda: run("Uffd", work / "lazy.sock", requests)),
                              ("uffd-replay", lambda: run("Uffd", work / "replay.sock", requests))):
                    a, z = go()
                    first[s].append(a)
                    end[s].append(z)
                log(f"firecracker, {label}: round {i + 1} of {rounds}")
    finally:
        for proc in (lazy, replay):
            proc.terminate()
            proc.wait()
    return out
