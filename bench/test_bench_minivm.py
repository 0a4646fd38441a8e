"""A real VM: time from restore start to a minivm invocation's answer.

minivm (bench/minivm) boots a KVM guest that builds ~100 MiB of state in
256 MiB of memory and snapshots it. Each round restores it one way:
- resident: the memory file read in full first, no handler (the floor:
  warm start);
- lazy-warm-l1: restored lazily through an in-process Server
  (restore.handler.Server in the benchmark's own process, not a
  `restore serve` process), demand paging only (no plan), default
  fault-around, chunks read from a warm L1 and decoded in C, no host cache;
- lazy-cold: the same with an empty L1 every round, chunks from the file
  store.
The figure is the guest's answer time (extra_info answer_ms, median over
rounds; extra_info label names what ran). kvm_fault: resident and lazy with
a warm L1 (in-process Server, fault-around 1), reporting the KVM-side
fault round trip as (lazy time - resident time) / faults (kvm_fault_us).

Every answer is checked against the one the guest gave before it was
snapshotted, with its memory never having left (minivm boot).
"""

from __future__ import annotations

import itertools
import shutil
import time

import numpy as np
import pytest

from bench.minivm import driver
from restore.handler import Server
from restore.settings import ServerSettings
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
    reference = driver.boot(b, image, state, MEM_MIB, requests=REQUEST)[0]
    store = DurableStore(f"file://{d}/store")
    create_snapshot(store, image, "vm")
    snap = Snapshot.open(store, "vm")
    warm = L1Cache(d / "warm-l1")
    snap.fill_l1(warm)
    yield {"build": b, "image": image, "state": state, "snap": snap, "dir": d, "warm": warm,
           "reference": reference}
    snap.close()


HOW = {
    "resident": "resident (memory file read in full first, no handler)",
    "lazy-warm-l1": "lazy, in-process Server, warm L1",
    "lazy-cold": "lazy, in-process Server, cold L1 (file store)",
}


def _checked(vm, answers):
    """The one answer, if it is the reference's."""
    ref = vm["reference"]
    if [(a.request, a.value) for a in answers] != [(ref.request, ref.value)]:
        raise RuntimeError(f"minivm answered {[(a.request, a.value) for a in answers]}, "
                           f"expected {[(ref.request, ref.value)]}")
    return answers[0]


def _resident(vm):
    return _checked(vm, driver.resident(vm["build"], vm["image"], vm["state"], REQUEST))


def _lazy(vm, l1, fault_around=None):
    kw = {"fault_around": fault_around} if fault_around else {}
    settings = ServerSettings(persist_logs=False, use_plan=False, **kw)
    server = Server(vm["snap"], vm["dir"] / f"s{next(_n)}.sock", settings, l1=l1).start()
    try:
        answer = _checked(vm, driver.restore(vm["build"], server.socket_path, vm["state"], REQUEST))
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
            a = _resident(vm)
        elif how == "lazy-warm-l1":
            a, _ = _lazy(vm, vm["warm"])
        else:
            cold = vm["dir"] / f"cold-{next(_n)}"
            a, _ = _lazy(vm, L1Cache(cold))
            shutil.rmtree(cold)
        times.append(a.ns / 1e6)

    benchmark.pedantic(once, rounds=5, iterations=1)
    benchmark.extra_info.update(answer_ms=float(np.median(times)), label=HOW[how], answer=vm["reference"].value)


def test_bench_minivm_kvm_fault(benchmark, vm):
    per_fault = []

    def once():
        base = _resident(vm).ns
        a, st = _lazy(vm, vm["warm"], fault_around=1)
        per_fault.append((a.ns - base) / st.faults / 1e3)

    benchmark.pedantic(once, rounds=3, iterations=1)
    benchmark.extra_info.update(kvm_fault_us=float(np.median(per_fault)),
                                label="resident, then lazy through an in-process Server, warm L1, fault-around 1")
