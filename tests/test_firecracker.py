"""A real Firecracker (1.12.1, from the pinned wheel `make firecracker`
fetches) restores its microVM through `restore serve`: boot our freestanding
guest, pause, Full snapshot, `restore snapshot create`, then
`PUT /snapshot/load` with the Uffd backend on a running `restore serve`.
Every answer of the restored guest must equal the answer of the VM that made
the snapshot (its memory never left), and so must its hash over all of its
state. Skipped only where /dev/kvm is absent."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import hugepages
from bench.firecracker import driver
from bench.minivm.driver import kvm_available
from daemon import Daemon
from restore.handler import Server
from restore.settings import ServerSettings
from restore.objects import chunk_key
from restore.snapshot import Snapshot, data_extents
from restore.tiers.durable import DurableStore

pytestmark = pytest.mark.skipif(not kvm_available(), reason="/dev/kvm is not available")

MEM_MIB = 64
REQUESTS = [42, 7, 99, 123456, 0xDEADBEE]
JAIL_UID = 123


@pytest.fixture(scope="module")
def fc(tmp_path_factory):
    b = driver.binaries()  # fetched by make test; a failure to fetch is an error, not a skip
    assert driver.version(b.firecracker) == "1.12.1"
    return {"bin": b, "guest": driver.build_guest(tmp_path_factory.mktemp("fcguest"))}


def _snapshot(fc, d: Path, name: str, *, huge_pages=None, chunk_size=None) -> dict:
    """Boot the guest, ask the reference answers, take a Full snapshot and
    turn its memory file into a restore snapshot (the CLI, as a user does)."""
    state, mem = d / f"{name}.state", d / f"{name}.mem"
    with driver.VM(fc["bin"].firecracker, d / f"{name}-boot") as vm:
        vm.boot(fc["guest"], MEM_MIB, huge_pages=huge_pages)
        reference = {a.request: a.value for a in vm.ask(REQUESTS)}
        total = vm.state_sum()
        vm.snapshot(state, mem)
    assert len(set(reference.values())) == len(REQUESTS) and 0xDEADBEEF not in reference.values()
    store = f"file://{d}/store"
    cmd = [sys.executable, "-m", "restore", "snapshot", "create", str(mem), "--name", name, "--store", store]
    if chunk_size:
        cmd += ["--chunk-size", chunk_size]
    subprocess.run(cmd, check=True, capture_output=True)
    return {"state": state, "mem": mem, "store": store, "name": name, "reference": reference, "sum": total}


@pytest.fixture(scope="module")
def made(fc, tmp_path_factory):
    return _snapshot(fc, tmp_path_factory.mktemp("fcsnap"), "fn")


def _check(vm: driver.VM, made: dict) -> None:
    got = vm.ask(REQUESTS)
    assert {a.request: a.value for a in got} == made["reference"]
    assert vm.state_sum() == made["sum"]


def _serve(tmp_path: Path, made: dict, sock: Path, *extra: str) -> Daemon:
    d = Daemon(tmp_path, "--snapshot", made["name"], "--socket", str(sock), "--store", made["store"],
               "--cache", str(tmp_path / "cache"), "--log-format", "json", "-v", *extra)
    d.event("serving")
    return d


def test_a_firecracker_snapshot_restored_through_restore_serve_then_replayed(tmp_path, fc, made):
    sock = tmp_path / "fn.sock"
    d = _serve(tmp_path, made, sock)
    try:
        with driver.VM(fc["bin"].firecracker, tmp_path / "vm1") as vm:
            vm.load(made["state"], "Uffd", sock)
            start = d.event("session_start")
            assert start["pid"] == vm.pid and not start["plan"]
            _check(vm, made)
        first = d.event("session_end")
        assert first["faults"] > 0 and first["errors"] == 0 and first["log_key"]

        subprocess.run([sys.executable, "-m", "restore", "plan", "build", made["name"], "--sessions", "1",
                        "--store", made["store"]], check=True, capture_output=True)
        with driver.VM(fc["bin"].firecracker, tmp_path / "vm2") as vm:
            vm.load(made["state"], "Uffd", sock)
            assert d.event("session_start")["plan"]
            _check(vm, made)
        second = d.event("session_end")
        assert second["prefetch_pages"] > 0 and second["errors"] == 0
        # The first session decoded its chunks into the host cache; the
        # second takes every chunk from there.
        assert second["chunks"]["host"] > 0 and second["chunks"]["fetched"] == 0
        assert d.stop() == 0
    finally:
        d.kill()


def test_a_diff_snapshot_laid_over_its_base_restores_the_vm(tmp_path, fc):
    """Firecracker's Diff snapshot holds the pages dirtied since the last
    snapshot, the rest holes; made into a version over that snapshot's
    (--base), its memory is the Full snapshot's taken at the same moment,
    and the VM restored from the Diff's state through `restore serve`
    answers as the one that made it."""
    d = tmp_path
    store = f"file://{d}/store"
    create = [sys.executable, "-m", "restore", "snapshot", "create", "--name", "fn", "--store", store]
    with driver.VM(fc["bin"].firecracker, d / "boot") as vm:
        vm.boot(fc["guest"], MEM_MIB, track_dirty_pages=True)
        vm.snapshot(d / "1.state", d / "1.mem")  # the base
        vm.resume()
        reference = {a.request: a.value for a in vm.ask(REQUESTS)}  # the guest runs on: pages get dirty
        total = vm.state_sum()
        vm.snapshot(d / "2.state", d / "2.mem", kind="Diff")
        vm.snapshot(d / "full.state", d / "full.mem")  # the same moment, whole
    size = (d / "1.mem").stat().st_size
    with open(d / "2.mem", "rb") as f:
        dirty = sum(e - s for s, e in data_extents(f.fileno(), size))
    assert 0 < dirty < size // 8, f"the Diff memory file holds {dirty} of {size} bytes"
    assert (d / "1.mem").read_bytes() != (d / "full.mem").read_bytes()  # the diff matters
    subprocess.run([*create, str(d / "1.mem")], check=True, capture_output=True)
    subprocess.run([*create, str(d / "2.mem"), "--base", "1"], check=True, capture_output=True)
    with Snapshot.open(DurableStore(store), "fn", "2") as snap:
        snap.export(d / "2-whole.mem")
    assert (d / "2-whole.mem").read_bytes() == (d / "full.mem").read_bytes()

    sock = d / "fn.sock"
    srv = _serve(d, {"name": "fn", "store": store}, sock)  # fn's newest version: 2
    try:
        with driver.VM(fc["bin"].firecracker, d / "vm") as vm:
            vm.load(d / "2.state", "Uffd", sock)
            assert srv.event("session_start")["pid"] == vm.pid
            _check(vm, {"reference": reference, "sum": total})
        assert srv.event("session_end")["errors"] == 0
        assert srv.stop() == 0
    finally:
        srv.kill()


def test_two_vms_on_one_server_at_once(tmp_path, fc, made):
    sock = tmp_path / "fn.sock"
    d = _serve(tmp_path, made, sock)
    try:
        with driver.VM(fc["bin"].firecracker, tmp_path / "a") as a, \
                driver.VM(fc["bin"].firecracker, tmp_path / "b") as b:
            a.load(made["state"], "Uffd", sock)
            b.load(made["state"], "Uffd", sock)
            pids = {d.event("session_start")["pid"], d.event("session_start")["pid"]}
            assert pids == {a.pid, b.pid}
            # Both sessions are live: requests go to both before either answers.
            a.send(REQUESTS)
            b.send(REQUESTS)
            for vm in (a, b):
                assert {x.request: x.value for x in vm.answers(len(REQUESTS))} == made["reference"]
            for vm in (a, b):
                assert vm.state_sum() == made["sum"]
        ends = [d.event("session_end"), d.event("session_end")]
        assert {e["pid"] for e in ends} == {a.pid, b.pid} and all(e["errors"] == 0 for e in ends)
        assert d.stop() == 0
    finally:
        d.kill()


@pytest.fixture
def huge_pages():
    """2 MiB pages for a booting VM and two restored ones (tests/hugepages.py)."""
    with hugepages.reserved(3 * MEM_MIB // 2):
        yield


@pytest.mark.parametrize("chunk_size", [None, "2M"], ids=["default-512K-chunks", "2M-chunks"])
def test_huge_page_vm(tmp_path, fc, huge_pages, chunk_size):
    """huge_pages "2M": Firecracker backs guest memory with hugetlbfs and
    sends 2 MiB page sizes; each 2 MiB fault is served whole, assembled from
    the chunks that cover it when they are smaller."""
    made = _snapshot(fc, tmp_path, "huge", huge_pages="2M", chunk_size=chunk_size)
    sock = tmp_path / "huge.sock"
    d = _serve(tmp_path, made, sock)
    try:
        with driver.VM(fc["bin"].firecracker, tmp_path / "vm") as vm:
            vm.load(made["state"], "Uffd", sock)
            assert d.event("session_start")["pid"] == vm.pid
            _check(vm, made)
        end = d.event("session_end")
        assert end["faults"] > 0 and end["errors"] == 0
        assert d.stop() == 0
    finally:
        d.kill()


@pytest.fixture
def jail_base(fc):
    """Where the jailer makes its chroots (a path the jails' uids can reach)."""
    if fc["bin"].jailer is None:
        pytest.fail("no jailer next to the Firecracker under test (set RESTORE_JAILER)")
    base = Path(tempfile.mkdtemp(prefix="restore-jails-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_the_jailer_with_its_own_uid_and_chroot(tmp_path, fc, made, jail_base):
    """Firecracker jailed as uid JAIL_UID in a chroot; the server runs
    outside, its socket inside the jail, given to that uid and allowing it."""
    jail = driver.Jail(fc["bin"].jailer, JAIL_UID, JAIL_UID, jail_base)
    with driver.VM(fc["bin"].firecracker, None, vm_id="fn1", jail=jail) as vm:
        sock = vm.host_path("/run/fn.sock")
        sock.parent.mkdir(exist_ok=True)
        d = _serve(tmp_path, made, sock, "--socket-owner", f"{JAIL_UID}:{JAIL_UID}", "--allow-uid", str(JAIL_UID))
        try:
            state = vm.place(made["state"], "fn.state")
            vm.load(state, "Uffd", "/run/fn.sock")
            assert d.event("session_start")["pid"] == vm.pid
            assert Path(f"/proc/{vm.pid}/status").read_text().count(f"\t{JAIL_UID}\t") >= 1  # really that uid
            _check(vm, made)
            vm.kill()
            assert d.event("session_end")["errors"] == 0
            assert d.stop() == 0
        finally:
            d.kill()


def test_one_server_many_jails(tmp_path, fc, made, jail_base):
    """Two Firecrackers, each jailed with its own uid and chroot; one
    `restore serve` listens on a socket inside each jail, given to that
    jail's uid and allowing only it."""
    uids = (JAIL_UID, JAIL_UID + 1)
    vms = [driver.VM(fc["bin"].firecracker, None, vm_id=f"fn{u}", jail=driver.Jail(fc["bin"].jailer, u, u, jail_base))
           for u in uids]
    try:
        listen = []
        for vm, u in zip(vms, uids):
            sock = vm.host_path("/run/fn.sock")
            sock.parent.mkdir(exist_ok=True)
            listen += ["--listen", f"{sock},owner={u}:{u},allow={u}"]
        d = Daemon(tmp_path, "--snapshot", made["name"], *listen, "--store", made["store"],
                   "--cache", str(tmp_path / "cache"), "--log-format", "json", "-v")
        try:
            assert {d.event("serving")["socket"], d.event("serving")["socket"]} == {
                str(vm.host_path("/run/fn.sock")) for vm in vms}
            for vm in vms:
                vm.load(vm.place(made["state"], "fn.state"), "Uffd", "/run/fn.sock")
            assert {d.event("session_start")["pid"], d.event("session_start")["pid"]} == {vm.pid for vm in vms}
            for vm in vms:
                _check(vm, made)
                vm.kill()
            assert [d.event("session_end")["errors"], d.event("session_end")["errors"]] == [0, 0]
            assert d.stop() == 0
        finally:
            d.kill()
    finally:
        for vm in vms:
            vm.close()


def test_a_vmm_of_a_uid_not_allowed_is_killed_not_left_hanging(tmp_path, fc, made, jail_base):
    """The socket lets the jailed uid connect, but the server does not allow
    it: Firecracker sends its userfaultfd during PUT /snapshot/load and
    would block in its first page fault for ever; it is killed instead, and
    its API call fails rather than hanging."""
    jail = driver.Jail(fc["bin"].jailer, JAIL_UID, JAIL_UID, jail_base)
    with driver.VM(fc["bin"].firecracker, None, vm_id="fn1", jail=jail) as vm:
        sock = vm.host_path("/run/fn.sock")
        sock.parent.mkdir(exist_ok=True)
        d = _serve(tmp_path, made, sock, "--socket-owner", f"{JAIL_UID}:{JAIL_UID}", "--allow-uid", str(os.getuid()))
        try:
            with pytest.raises(driver.FirecrackerError, match="snapshot/load"):
                vm.load(vm.place(made["state"], "fn.state"), "Uffd", "/run/fn.sock")
            assert vm.wait(60) == -signal.SIGKILL
            refused = d.event("refused")
            assert refused["pid"] == vm.pid
            assert refused["reason"] == f"peer uid {JAIL_UID} is not allowed on {sock} (allowed: {os.getuid()})"
            assert "killed it" in refused["msg"]
            assert d.stop() == 0
        finally:
            d.kill()


@pytest.mark.parametrize("poison", [True, False], ids=["poison", "kernel-without-poison"])
def test_a_page_no_tier_can_supply_ends_the_vmm_never_hangs_it(tmp_path, fc, made, poison, caplog):
    """The chunk holding the guest's code is missing from the store: the
    page is poisoned and the VM ends when the guest touches it, or, as on a
    host before Linux 6.6 (poison=False), the VMM is killed with the cause
    named."""
    store = DurableStore(made["store"])
    lost = tmp_path / "lost"
    with Snapshot.open(store, made["name"]) as snap:
        chunk = snap.manifest.chunks[(1 << 20) // snap.manifest.chunk_size]  # the guest is loaded at 1 MiB
        key = chunk_key(chunk.id)
        lost.write_bytes(store.get(key))
        store.delete(key)
        try:
            ended = []
            with Server(snap, tmp_path / "fn.sock", ServerSettings(poison=poison),
                        on_session_end=ended.append) as server:
                with driver.VM(fc["bin"].firecracker, tmp_path / "vm") as vm:
                    # The guest touches the page as soon as it resumes, which
                    # may end the VMM before it answers the load: what counts
                    # is how it ended, checked below.
                    with contextlib.suppress(driver.FirecrackerError):
                        vm.load(made["state"], "Uffd", server.socket_path)
                    code = vm.wait(60)
            assert ended and ended[0].peer_pid == vm.pid
            if poison:
                # The guest's access to the poisoned page ends the VM by
                # itself (what it meets depends on the hypervisor: SIGBUS
                # in the vCPU thread, or here a guest shutdown); nobody
                # had to kill it and nothing hangs.
                assert ended[0].stats.poisoned > 0 and ended[0].stats.vmm_killed == 0
                assert code != -signal.SIGKILL
            else:
                assert code == -signal.SIGKILL
                assert ended[0].stats.vmm_killed == 1
                killed = [r.getMessage() for r in caplog.records if r.name == "restore.handler"]
                assert any(m.startswith(f"killed guest pid {vm.pid}: page at 0x") and "could not be served (chunk "
                           in m and m.endswith("and this kernel has no UFFDIO_POISON") for m in killed), killed
        finally:
            store.put(key, lost.read_bytes())
