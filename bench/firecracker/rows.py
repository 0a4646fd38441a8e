"""The comparison's Firecracker rows: a real Firecracker restores the guest
of guest.c from a Full snapshot, and the guest's answers are timed from
`PUT /snapshot/load` (the requests wait in its serial input already) to its
first answer and to the end of the invocation (its last answer).

Strategies:
  mmap         Firecracker's File backend (the memory file mapped
               MAP_PRIVATE by Firecracker)
  uffd-lazy    the Uffd backend on a `restore serve` process (--no-plan):
               demand faults only
  uffd-replay  the same server with the working-set plan recorded from one
               earlier restore of invocation A, replayed as a prefetch
in each cache state (bench.pagecache), set before every run on the files
that strategy reads: the state file and the memory file (mmap); the state
file, the server's L1 and host cache and the file store (uffd). Every
answer is checked against the VM that made the snapshot.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from bench import pagecache
from bench.results import Row

from . import driver

STRATEGIES = ["mmap", "uffd-lazy", "uffd-replay"]  # names from bench.results.STRATEGIES
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


def firecracker_rows(work: Path, rounds: int, mem_mib: int = 256, caches: tuple[str, ...] = ("warm",),
                     log: Callable[[str], None] = lambda _: None) -> tuple[list[Row], str | None]:
    """Rows "first answer" and "invocation end" for another invocation than
    the recorded one and for the recorded one, per cache state, in ms; and
    Firecracker's version. ([], None) without /dev/kvm."""
    from bench.minivm.driver import kvm_available
    from restore.snapshot import Snapshot
    from restore.tiers.durable import DurableStore
    from restore.tiers.host import HostCache
    from restore.tiers.l1 import L1Cache

    if not kvm_available():
        return [], None
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
    with Snapshot.open(DurableStore(store), "fc") as snap:  # the server's L1 and host cache filled
        snap.fill_l1(L1Cache(work / "cache"))
        HostCache(work / "cache" / "host").fill(snap)
    reads = {"mmap": [state, mem], "uffd-lazy": [state, work / "cache", work / "store"]}
    reads["uffd-replay"] = reads["uffd-lazy"]

    def run(backend: str, path: Path, requests: list[int]) -> tuple[float, float]:
        with driver.VM(fc, work / f"vm{next(n) % 4}") as vm:
            vm.send(str(r) for r in requests)
            t0 = time.monotonic()
            vm.load(state, backend, path)
            got = vm.answers(len(requests))
        if any(reference[a.request] != a.value for a in got):
            raise RuntimeError(f"a Firecracker restore ({backend}) answered wrongly")
        return (got[0].at - t0) * 1e3, (got[-1].at - t0) * 1e3

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
    go = {"mmap": lambda r: run("File", mem, r), "uffd-lazy": lambda r: run("Uffd", work / "lazy.sock", r),
          "uffd-replay": lambda r: run("Uffd", work / "replay.sock", r)}
    out: list[Row] = []
    try:
        for key, label, requests in (("another", "another invocation", inv_b),
                                     ("recorded", "the recorded invocation", inv_a)):
            rows = {}
            for c in caches:
                for what, measure in (("first", "first answer"), ("end", "invocation end")):
                    rows[c, what] = Row(
                        f"firecracker/{key}/{what}/{c}",
                        f"Firecracker {version}, our guest of {mem_mib} MiB: {label}, to its {measure}",
                        "L1 and host cache local", c, "serve", f"PUT /snapshot/load to the guest's {measure}", "mmap")
            for c in caches:  # each cache state apart (bench.compare.synthetic_rows)
                for i in range(rounds):  # interleaved: one of each per round
                    for s in STRATEGIES:
                        resident = pagecache.set_state(c, reads[s])
                        first, end = go[s](requests)
                        rows[c, "first"].add(s, first, resident)
                        rows[c, "end"].add(s, end, resident)
                    log(f"firecracker, {label}, {c}: round {i + 1} of {rounds}")
            out.extend(rows.values())
    finally:
        for proc in (lazy, replay):
            proc.terminate()
            proc.wait()
    return out, version
