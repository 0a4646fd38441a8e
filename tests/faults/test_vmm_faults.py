"""VMM-side faults: the guest process killed mid-restore, a VMM that exits
while another process keeps its socket open, and the worker of `restore
serve --supervise` killed mid-restore under a real Firecracker. Each fault
is timed by an event (the guest's own progress, the worker's metrics);
every wait has a deadline that bounds a hang and measures nothing. The
tally counts each fault the server survived."""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import threading
import urllib.request

import numpy as np
import pytest
from conftest import TALLY, every_chunk_trace
from daemon import Daemon, children, wait_for
import test_firecracker
from test_firecracker import MEM_MIB, REQUESTS, _check

from bench.firecracker import driver
from bench.minivm.driver import kvm_available

from restore.guest import Guest, reads, wait
from restore.handler import Server
from restore.session import RestoreSession
from restore.settings import ServerSettings
from restore.testing import expected_sums
from restore.tiers.l1 import L1Cache

P = 4096
CHUNK = 256 * 1024
SIZE = 8 << 20
HANG = 60  # seconds: a bound on a hang, never a measure of speed
AT = [3, 40, 400]  # pages the guest has read when it is killed


@pytest.fixture(scope="module")
def image(make_image):
    return make_image(SIZE, seed=9)


@pytest.fixture(scope="module")
def trace(image):
    return every_chunk_trace(image, seed=4)


def _threads() -> set[str]:
    """This process's threads, by id (other tests' threads may end
    meanwhile: what counts is that none of the session's stays)."""
    return set(os.listdir("/proc/self/task"))


def _fds() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(f"{fd} {os.readlink(f'/proc/self/fd/{fd}')}")
        except FileNotFoundError:  # the listing's own fd, closed since
            pass
    return out


def _sessions_alive() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, RestoreSession))


def _served(server, image, trace) -> None:
    """A whole restore of a fresh guest, every byte checked."""
    with Guest(server.socket_path, memory_size=SIZE) as g:
        got = g.run(reads(trace), timeout=HANG).sums
    wrong = int((got != expected_sums(image, trace)).sum())
    TALLY["restores"] += 1
    TALLY["bytes_verified"] += (len(got) - wrong) * P
    TALLY["wrong_bytes"] += wrong * P
    assert wrong == 0


def _paused_guest(server, image, trace, at: int) -> Guest:
    """A guest that has read `at` pages and then waits for a go-ahead the
    server never sends: its session runs, most of its memory still to come
    (the event: its own progress, steps_done)."""
    g = Guest(server.socket_path, memory_size=SIZE)
    g.start(np.concatenate([reads(trace[:at]), wait(), reads(trace[at:])]))
    wait_for(lambda: g.steps_done() == at, f"the guest never read its first {at} pages", HANG)
    assert server.active() == 1
    got = g.done_so_far().sums
    wrong = int((got != expected_sums(image, trace[:at])).sum())
    TALLY["restores"] += 1
    TALLY["bytes_verified"] += (len(got) - wrong) * P
    TALLY["wrong_bytes"] += wrong * P
    assert wrong == 0
    return g


@pytest.fixture
def server(tmp_path, open_snapshot, image):
    """A server of the image's snapshot (file store, cold L1), with an event
    per ended session."""
    snap = open_snapshot(image, "vm", chunk_size=CHUNK)
    ended = threading.Semaphore(0)
    with Server(snap, tmp_path / "s.sock", ServerSettings(persist_logs=False, fetchers=4),
                l1=L1Cache(tmp_path / "l1"), on_session_end=lambda s: ended.release()) as s:
        s.ended = ended
        yield s


@pytest.mark.parametrize("at", AT)
def test_guest_killed_mid_restore_leaves_nothing_behind(server, image, trace, at):
    """The guest is SIGKILLed after reading `at` pages, its session running:
    the session ends at once by the VMM's pidfd, and the server process is
    left with the threads and fds it had before the guest came (and no
    RestoreSession alive: the engine, which holds the decoded chunks, is
    freed by close and nothing keeps the session), then serves the next."""
    _served(server, image, trace[:64])  # first: what the process keeps for good (pools, runtimes) exists
    assert server.ended.acquire(timeout=HANG)
    wait_for(lambda: not server.active(), "the first session is still counted active", HANG)
    threads, fds, alive = _threads(), _fds(), _sessions_alive()
    g = _paused_guest(server, image, trace, at)
    try:
        assert _threads() - threads  # the session's threads run (what must go away)
        g.kill()
    finally:
        g.close()
    assert server.ended.acquire(timeout=HANG), "the session of the killed guest did not end"
    summary = server.summaries[-1]
    assert summary.stats.ended_by == "vmm exited" and summary.stats.pages_installed >= at, summary.stats
    wait_for(lambda: _threads() <= threads, f"threads left behind: {sorted(_threads() - threads)}", HANG)
    wait_for(lambda: _fds() <= fds, f"fds left behind: {sorted(_fds() - fds)}", HANG)
    assert _sessions_alive() == alive
    _served(server, image, trace)  # the server goes on
    TALLY["vmm"]["guest killed mid-restore"] += 1
    TALLY["mid_restore"]["guest killed"] += 1


def _pidfd_getfd(pid: int, fd: int) -> int:
    """A copy of process pid's fd in this process (pidfd_getfd(2); root)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        got = libc.syscall(438, pidfd, fd, 0)  # SYS_pidfd_getfd
        if got < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        return got
    finally:
        os.close(pidfd)


@pytest.mark.parametrize("at", AT)
def test_vmm_gone_with_its_socket_kept_open_elsewhere(server, image, trace, at):
    """The VMM exits while another process (this one) holds a copy of its
    end of the connection, so the server never sees the connection close:
    the session still ends, by the VMM's pidfd, and the server goes on."""
    g = _paused_guest(server, image, trace, at)
    held = []
    try:
        for fd in os.listdir(f"/proc/{g.pid}/fd"):
            if os.readlink(f"/proc/{g.pid}/fd/{fd}").startswith("socket:"):
                held.append(_pidfd_getfd(g.pid, int(fd)))
        assert held, "the guest holds no socket"
        g.kill()
        assert server.ended.acquire(timeout=HANG), "the session of the exited VMM did not end"
        summary = server.summaries[-1]
        assert summary.stats.ended_by == "vmm exited" and not summary.stats.conn_closed, summary.stats
        _served(server, image, trace)  # the server goes on, the old connection still open
    finally:
        g.close()
        for fd in held:
            os.close(fd)
    TALLY["vmm"]["VMM gone, its socket kept open"] += 1
    TALLY["mid_restore"]["VMM gone, its socket kept open"] += 1


# test_firecracker's fixtures, by their names: the Firecracker binaries and
# freestanding guest (fc) and the snapshot of its booted VM (made).
fc = test_firecracker.fc
made = test_firecracker.made


def _metrics(url: str) -> dict[str, float]:
    """A scrape of a worker's Prometheus metrics: sample -> value."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return {name: float(value) for name, _, value in
            (line.rpartition(" ") for line in text.splitlines() if line and not line.startswith("#"))}


@pytest.mark.skipif(not kvm_available(), reason="/dev/kvm is not available")
def test_serve_worker_killed_mid_restore_under_firecracker(tmp_path, fc, made):
    """The worker of `restore serve --supervise` is SIGKILLed while a real
    Firecracker's restore runs: once the VM has answered and the worker's
    metrics show its session running with part of the VM's memory
    installed (the event), three times over. Each time the supervisor
    kills the VMM (it is never left hanging: it dies of SIGKILL) and starts
    a new worker, which serves the next VM; the last is checked whole."""
    sock = tmp_path / "fn.sock"
    d = Daemon(tmp_path, "--supervise", "--snapshot", made["name"], "--socket", str(sock), "--store", made["store"],
               "--cache", str(tmp_path / "cache"), "--log-format", "json", "-v", "--metrics", "127.0.0.1:0")
    pages = (MEM_MIB << 20) // P
    killed = []
    try:
        url = d.event("metrics")["metrics_url"]
        d.event("serving")
        for i in range(3):
            (worker,) = children(d.proc.pid)
            with driver.VM(fc["bin"].firecracker, tmp_path / f"vm{i}") as vm:
                vm.load(made["state"], "Uffd", sock)
                assert vm.ask(REQUESTS[:1])[0].value == made["reference"][REQUESTS[0]]  # served
                m = _metrics(url)
                assert m["restore_active_sessions"] == 1, m  # its session runs...
                assert 0 < m["restore_pages_installed_total"] < pages, m  # ...with memory still to come
                os.kill(worker, signal.SIGKILL)
                assert vm.wait(HANG) == -signal.SIGKILL  # killed by the supervisor, not left hanging
                killed.append((worker, vm.pid))
            url = d.event("metrics")["metrics_url"]  # a new worker's
            d.event("serving")
            assert children(d.proc.pid) != [worker]
            TALLY["mid_restore"]["serve worker killed under Firecracker"] += 1
            TALLY["vmm"]["serve worker killed under Firecracker"] += 1
        with driver.VM(fc["bin"].firecracker, tmp_path / "vm-last") as vm:
            vm.load(made["state"], "Uffd", sock)
            _check(vm, made)
    finally:
        rc = d.stop()
    assert rc == 0, "".join(d.lines)
    said = [r["msg"] for r in d.records if r.get("logger") == "restore.supervisor"]
    for worker, vmm in killed:
        assert any(f"worker pid {worker} killed by signal 9; killed the VMMs it was serving ({vmm})" in m
                   for m in said), said
