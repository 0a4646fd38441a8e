"""SnapStart end to end on a real KVM guest: minivm boots a VM whose guest
builds state in memory, snapshots it, and restores it lazily through a
handler Server; every answer must equal the answer of a VM that never left
memory."""

from __future__ import annotations

import time

import pytest

from bench.minivm import driver
from restore.handler import Server
from restore.settings import ServerSettings
from restore.snapshot import Snapshot, create_snapshot
from restore.tiers.durable import DurableStore
from restore.tiers.host import HostCache
from restore.tiers.l1 import L1Cache

pytestmark = pytest.mark.skipif(not driver.kvm_available(), reason="/dev/kvm is not available")

MEM_MIB = 48
REQUESTS = [1, 2, 77, 123456, 0xDEADBEE]
BALLOON = 0x80000001


@pytest.fixture(scope="module", params=[1, 2], ids=["one-region", "two-regions"])
def vm(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"minivm{request.param}")
    b = driver.build(d / "build")
    image, state = d / "vm.img", d / "vm.state"
    reference = driver.boot(b, image, state, MEM_MIB, regions=request.param, requests=REQUESTS + [BALLOON, 7])
    store = DurableStore(f"file://{d}/store")
    create_snapshot(store, image, "vm")
    with Snapshot.open(store, "vm") as snap:
        yield {"build": b, "state": state, "image": image, "snap": snap, "dir": d,
               "reference": {a.request: a.value for a in reference}}


def _server(vm, name, **kw):
    kw.setdefault("l1", L1Cache(vm["dir"] / f"l1-{name}"))
    settings, kw = ServerSettings.take(kw)
    return Server(vm["snap"], vm["dir"] / f"{name}.sock", settings, **kw).start()


def _wait_sessions(server, n, timeout=10.0):
    deadline = time.monotonic() + timeout
    while len(server.summaries) < n:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return server.summaries


MEMORY = pytest.mark.parametrize("memfd", [None, "copy", "continue"], ids=["anon", "memfd-copy", "memfd-continue"])


@MEMORY
@pytest.mark.parametrize("fault_around", [1, 16, 64])
def test_restored_vm_answers_like_one_that_never_left_memory(vm, fault_around, memfd):
    """memfd: the VMM backs guest memory with a memfd and sends it too, so a
    real vCPU faults on shared memory, filled by copy or by continue."""
    assert set(vm["reference"].values()) != {0}  # the reference did real work
    server = _server(vm, f"fa{fault_around}{memfd}", fault_around=fault_around, memfd_install=memfd or "copy")
    try:
        got = driver.restore(vm["build"], server.socket_path, vm["state"], REQUESTS, memfd=bool(memfd))
        assert {a.request: a.value for a in got} == {r: vm["reference"][r] for r in REQUESTS}
        st = _wait_sessions(server, 1)[0].stats
        assert st.faults > 0 and st.first_touches["failed"] == 0
        if fault_around == 1:
            assert st.pages_installed == st.faults
    finally:
        server.stop()


@MEMORY
def test_balloon_remove_reads_zeros_never_snapshot_bytes(vm, memfd):
    server = _server(vm, f"balloon{memfd}", memfd_install=memfd or "copy")
    try:
        got = driver.restore(vm["build"], server.socket_path, vm["state"], [BALLOON, 7], memfd=bool(memfd))
        assert [a.value for a in got] == [0, vm["reference"][7]]
        assert vm["reference"][BALLOON] == 0  # the same in a VM that never left memory
        st = _wait_sessions(server, 1)[0].stats
        assert st.removes >= 1 and st.first_touches["removed"] > 0
    finally:
        server.stop()


@MEMORY
def test_vm_from_a_cold_then_a_warm_host_cache(vm, memfd, tmp_path):
    """The first restore decodes into the host cache, the second takes every
    chunk from it (nothing decoded): both answer like the reference."""
    host = HostCache(tmp_path / "host")
    server = _server(vm, f"host{memfd}", memfd_install=memfd or "copy", host_cache=host, use_plan=False)
    try:
        for i in range(2):
            got = driver.restore(vm["build"], server.socket_path, vm["state"], REQUESTS, memfd=bool(memfd))
            assert {a.request: a.value for a in got} == {r: vm["reference"][r] for r in REQUESTS}
            # The first session has ended (its VMM gone, its fills done)
            # before the second starts: else the second may find the host
            # cache half filled, and end first.
            _wait_sessions(server, i + 1)
        cold, warm = (s.stats for s in _wait_sessions(server, 2))
        assert cold.host_fills == cold.chunks_l1 + cold.chunks_fetched > 0 and cold.chunks_host == 0
        assert warm.chunks_host == cold.host_fills and warm.chunks_l1 + warm.chunks_fetched == 0
        assert warm.first_touches["host"] > 0 and warm.first_touches["failed"] == 0
    finally:
        server.stop()


def test_two_vms_restored_at_once_from_one_snapshot(vm):
    server = _server(vm, "pair")
    try:
        a = driver.start_restore(vm["build"], server.socket_path, vm["state"], REQUESTS[:3])
        b = driver.start_restore(vm["build"], server.socket_path, vm["state"], REQUESTS[2:], memfd=True)
        got_a, got_b = driver.wait_restore(a), driver.wait_restore(b)
        assert {x.request: x.value for x in got_a + got_b} == {r: vm["reference"][r] for r in REQUESTS}
        assert len(_wait_sessions(server, 2)) == 2
    finally:
        server.stop()


def test_resident_baseline_answers_the_same(vm):
    got = driver.resident(vm["build"], vm["image"], vm["state"], REQUESTS)
    assert {a.request: a.value for a in got} == {r: vm["reference"][r] for r in REQUESTS}
