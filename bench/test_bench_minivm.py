"""A real VM: time from restore start to a minivm invocation's answer.

minivm (bench/minivm) boots a KVM guest that builds ~100 MiB of state in
256 MiB of memory, snapshots it, and is restored through a handler Server:
- resident: the memory file read in full first (the floor: warm start),
- lazy, warm L1: restored lazily, chunks read and decoded from L1 in C,
- lazy, cold: restored lazily from the file store (L1 empty every round).
The figure is the guest's answer time (extra_info answer_ms, median over
rounds). kvm_fault: the same with fault-around 1, reporting the KVM-side
fault round trip as (lazy time - resident time) / faults.
"""

from __future__ import annotations

import itertools
import shutil
import time

import numpy as np
import pytest

from bench.minivm import driver
from restore.handler import Server
from restore.snapshot import Snapshot, create_snapshot
from restore.tiers.durable import DurableStore
from restore.tiers.l1 import L1Cache

pytestmark = pytest.mark.skipif(not driver.kvm_available(), reason="/dev/kvm is not available")

MEM_MIB = 256
REQUEST = [4242]
_n = itertools.count()


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    d = tmp_path_factory.mktemp("minivm-bench")
    b = driver.build(d / "build")
    image, state = d / "vm.img", d / "vm.state"
    driver.boot(b, image, state, MEM_MIB)
    store = DurableStore(f"file://{d}/store")
    create_snapshot(store, image, "vm")
    snap = Snapshot.open(store, "vm")
    warm = L1Cache(d / "warm-l1")
    snap.fill_l1(warm)
    yield {"build": b, "image": image, "state": state, "snap": snap, "dir": d, "warm": warm}
    snap.close()


def _lazy(vm, l1, fault_around=None):
    kw = {"fault_around": fault_around} if fault_around else {}
    server = Server(vm["snap"], vm["dir"] / f"s{next(_n)}.sock", l1=l1, persist_logs=False, **kw).start()
    try:
        answer = driver.restore(vm["build"], server.socket_path, vm["state"], REQUEST)[0]
        deadline = time.monotonic() + 10
        while not server.summaries and time.monotonic() < deadline:
            time.sleep(0.01)
        return answer, server.summaries[0].stats
    finally:
        server.stop()


@pytest.mark.parametrize("how", ["resident", "lazy-warm-l1", "lazy-cold"])
def test_bench_minivm_invocation(benchmark, vm, how):
    times = []

    def once():
        if how == "resident":
            a = driver.resident(vm["build"], vm["image"], vm["state"], REQUEST)[0]
        elif how == "lazy-warm-l1":
            a, _ = _lazy(vm, vm["warm"])
        else:
            cold = vm["dir"] / f"cold-{next(_n)}"
            a, _ = _lazy(vm, L1Cache(cold))
            shutil.rmtree(cold)
        times.append(a.ns / 1e6)

    benchmark.pedantic(once, rounds=5, iterations=1)
    benchmark.extra_info["answer_ms"] = float(np.median(times))
    benchmark.extra_info["answer_role"] = "floor" if how == "resident" else "lazy"


def test_bench_minivm_kvm_fault(benchmark, vm):
    per_fault = []

    def once():
        base = driver.resident(vm["build"], vm["image"], vm["state"], REQUEST)[0].ns
        a, st = _lazy(vm, vm["warm"], fault_around=1)
        per_fault.append((a.ns - base) / st.faults / 1e3)

    benchmark.pedantic(once, rounds=3, iterations=1)
    benchmark.extra_info["kvm_fault_us"] = float(np.median(per_fault))
