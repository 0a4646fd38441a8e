"""Soak: many restores against one `restore serve` process (a real child
process), every guest's bytes checked, and then a check that the server
came back to where it stood after a warm-up: the same file descriptors and
threads, and resident memory within a bound a leak would pass.

Two soaks. Process guests (restore.guest.Guest, reading 300 random
non-zero pages of a 64 MiB sample image and checking them) always run. With
/dev/kvm, a second soak serves a minivm KVM guest's memory to both kinds of
guest: process guests, and minivm VMs that restore from it and answer
requests (checked against a VM that never left memory), a memfd-backed one
now and then.

Each soak: the server's figures at the start; a warm-up (six sequential
restores and one burst of 8 concurrent guests, which grows what the
workload needs: L1, host cache, plans, allocator arenas, thread pools);
the figures again; SEQUENTIAL sequential restores with a burst after each
half; the figures at the end, which must be the warm-up's. By default 20
sequential restores (CI); RESTORE_SOAK=1 (`make soak`) runs 200. The
figures (start -> after the warm-up -> end) print in pytest's terminal
summary, "soak" section.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest

from bench.minivm import driver
from daemon import Daemon, wait_for
from restore.guest import Guest, reads
from restore.snapshot import DEFAULT_CHUNK_SIZE, create_snapshot
from restore.testing import expected_sums
from restore.tiers.durable import DurableStore

P = 4096
MEM_MIB = 64
SEQUENTIAL = 200 if os.environ.get("RESTORE_SOAK") == "1" else 20
CONCURRENT = 8
WARMUP = 6  # sequential restores before the warm-up's burst
REQUESTS = [3, 99, 4242]
# After the warm-up the server's anonymous resident memory (RssAnon: its
# heap and thread stacks, where a leaked buffer lives; page-cache and
# mapped-file pages come and go with the kernel's cache) may move by
# allocator slack: freed memory glibc keeps in its arenas, a plan rebuilt
# every 5 sessions. 8 MiB is that slack with room. A leak of one chunk
# buffer (512 KiB) per restore is 18 MiB over the default soak's 36
# restores after the warm-up, 108 MiB over `make soak`'s 216, so it fails
# this bound (the test checks that it would).
RSS_SLACK_KIB = 8 << 10


def _figures(pid: int) -> dict:
    """fds; threads: the server's own (Python's and the engine's); tokio:
    the threads of obstore's tokio runtime, whose blocking pool lets a
    thread go after 10 s idle, so that their number follows the clock: they
    are shown, not compared; RSS in KiB, anonymous and all."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    names = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            names.append(Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip())
        except (FileNotFoundError, ProcessLookupError):  # a thread that ended since the listing
            pass
    tokio = sum(name.startswith("tokio-") for name in names)
    return {"fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": len(names) - tokio, "tokio": tokio,
            "rss_anon_kib": int(fields["RssAnon"].split()[0]), "rss_kib": int(fields["VmRSS"].split()[0])}


def _pidfds(pid: int) -> int:
    """pidfds the server holds: one per guest it is serving, closed as the
    guest's thread ends (after the session_end record)."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[pidfd]"
        except FileNotFoundError:
            pass
    return n


class Soak:
    """A `restore serve` of snapshot "vm" of image, and the restores run
    against it: each checks its guest's bytes and waits for the server's
    session_end record."""

    def __init__(self, tmp_path: Path, image: Path, vms: Optional[tuple] = None):
        self.image, self.vms = image, vms  # vms: (minivm build, state file, reference answers)
        store_url = f"file://{tmp_path}/store"
        create_snapshot(DurableStore(store_url), image, "vm")
        self.sock = tmp_path / "serve.sock"
        env = {**os.environ, "RESTORE_CACHE_DIR": str(tmp_path / "cache")}
        self.d = Daemon(tmp_path, "--snapshot", "vm", "--socket", str(self.sock), "--store", store_url,
                        "--rebuild-plan-after", "5", "--log-format", "json", "--verbose", env=env)
        self.d.event("serving")
        self.size = image.stat().st_size
        self.nonzero = np.flatnonzero(np.fromfile(image, dtype=np.uint8).reshape(-1, P).any(axis=1))
        self.rng = np.random.default_rng(11)
        self.restores = self.bytes_checked = self.vm_restores = 0

    def _ended(self, n: int) -> None:
        for _ in range(n):
            assert self.d.event("session_end", timeout=120)["errors"] == 0
        self.restores += n

    def _process_guest(self):
        offs = self.rng.choice(self.nonzero, 300, replace=False).astype(np.uint64) * P
        return Guest(str(self.sock), memory_size=self.size).start(reads(offs)), offs

    def _check(self, g, offs) -> None:
        with g:
            sums = g.wait(120).sums
        assert (sums == expected_sums(self.image, offs)).all()
        self.bytes_checked += len(offs) * P

    def sequential(self, n: int) -> None:
        for i in range(n):
            if self.vms and i % 4 == 3:
                b, state, reference = self.vms
                answers = driver.restore(b, self.sock, state, REQUESTS, memfd=i % 8 == 7)
                assert {a.request: a.value for a in answers} == reference
                self.vm_restores += 1
            else:
                self._check(*self._process_guest())
            self._ended(1)

    def burst(self) -> None:
        vms = [driver.start_restore(self.vms[0], self.sock, self.vms[1], REQUESTS) for _ in range(2)] \
            if self.vms else []
        guests = [self._process_guest() for _ in range(CONCURRENT - len(vms))]
        for g, offs in guests:
            self._check(g, offs)
        for vm in vms:
            assert {a.request: a.value for a in driver.wait_restore(vm)} == self.vms[2]
        self.vm_restores += len(vms)
        self._ended(CONCURRENT)

    def settled(self, until: Callable[[dict], bool] = lambda f: True, what: str = "") -> dict:
        """The server's figures once every session has ended (the records
        are read) and every guest's thread has let go of its pidfd; until:
        also wait for the figures to meet it (30 s bound a hang: a leak
        fails there, with the figures)."""
        pid = self.d.proc.pid
        wait_for(lambda: _pidfds(pid) == 0, "the server still holds a guest's pidfd")
        last = {}

        def met() -> bool:
            last.update(_figures(pid))
            return until(last)

        try:
            wait_for(met, what)
        except AssertionError:
            raise AssertionError(f"{what}: {last}") from None
        return dict(last)

    def stop(self) -> None:
        assert self.d.stop() == 0, "".join(self.d.lines)
        stopped = [rec for rec in map(json.loads, self.d.lines) if rec.get("event") == "stopped"]
        assert stopped and stopped[-1]["sessions"] == self.restores and stopped[-1]["refused"] == 0, stopped


def run_soak(soak: Soak, label: str, report: list) -> None:
    start = soak.settled()
    soak.sequential(WARMUP)
    soak.burst()
    warm = soak.settled()
    warm_restores = soak.restores
    soak.sequential(SEQUENTIAL // 2)
    soak.burst()
    soak.sequential(SEQUENTIAL - SEQUENTIAL // 2)
    soak.burst()
    after_warmup = soak.restores - warm_restores
    assert after_warmup * DEFAULT_CHUNK_SIZE // 1024 > 2 * RSS_SLACK_KIB  # a leaked chunk per restore would fail
    # Threads and fds end a moment after their session's record: wait for
    # them to come down to the warm-up's level (a hang bound, not a timer),
    # then they must be exactly that.
    end = soak.settled(lambda f: f["fds"] <= warm["fds"] and f["threads"] <= warm["threads"],
                       f"the server's fds and threads did not come back to the warm-up's {warm}")
    soak.stop()
    report.append(
        f"{label}: {soak.restores} restores ({warm_restores} warm-up, {after_warmup} after it; "
        f"{soak.vm_restores} of them minivm VMs), {soak.bytes_checked >> 20} MiB of guest reads checked; "
        f"server start -> after warm-up -> end: fds {start['fds']} -> {warm['fds']} -> {end['fds']}, "
        f"threads {start['threads']} -> {warm['threads']} -> {end['threads']} "
        f"(and tokio's {start['tokio']} -> {warm['tokio']} -> {end['tokio']}), "
        f"RssAnon {start['rss_anon_kib']} -> {warm['rss_anon_kib']} -> {end['rss_anon_kib']} KiB "
        f"(bound +{RSS_SLACK_KIB} KiB), VmRSS {start['rss_kib']} -> {warm['rss_kib']} -> {end['rss_kib']} KiB")
    assert end["fds"] == warm["fds"], (warm, end)
    assert end["threads"] == warm["threads"], (warm, end)
    assert end["rss_anon_kib"] <= warm["rss_anon_kib"] + RSS_SLACK_KIB, (warm, end)


def test_soak_process_guests(tmp_path, make_image, soak_report):
    image = make_image(MEM_MIB << 20, seed=11)
    soak = Soak(tmp_path, image)
    try:
        run_soak(soak, "soak, process guests", soak_report)
    finally:
        soak.d.kill()


@pytest.mark.skipif(not driver.kvm_available(), reason="/dev/kvm is not available")
def test_soak_process_guests_and_vms(tmp_path, soak_report):
    b = driver.build(tmp_path / "minivm")
    image, state = tmp_path / "vm.img", tmp_path / "vm.state"
    reference = {a.request: a.value for a in driver.boot(b, image, state, MEM_MIB, requests=REQUESTS)}
    soak = Soak(tmp_path, image, vms=(b, state, reference))
    try:
        run_soak(soak, "soak, process guests and minivm VMs", soak_report)
    finally:
        soak.d.kill()
