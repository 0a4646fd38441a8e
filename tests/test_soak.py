"""Soak: many restores against one `restore serve` process, then a check
that its file descriptors, threads and resident memory came back to where
they were, and that every guest got the right bytes.

The snapshot is a minivm KVM guest's memory, so both kinds of guest share
one server: test guest processes read pages of it (and check them), and
minivm VMs restore from it and answer requests (checked against a VM that
never left memory). Two equal halves, each of sequential restores then a
burst of 8 concurrent guests; the server's fds, threads and RSS after the
second half must not exceed those after the first. By default 20
sequential restores in all; RESTORE_SOAK=1 (`make soak`) runs 200.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bench.minivm import driver
from daemon import wait_for_socket
from restore.snapshot import create_snapshot
from restore.guest import Guest, reads
from restore.testing import expected_sums
from restore.tiers.durable import DurableStore

P = 4096
MEM_MIB = 64
SEQUENTIAL = 200 if os.environ.get("RESTORE_SOAK") == "1" else 20
CONCURRENT = 8
REQUESTS = [3, 99, 4242]


def _proc_figures(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": int(fields["Threads"]),
            "rss_kib": int(fields["VmRSS"].split()[0])}


@pytest.mark.skipif(not driver.kvm_available(), reason="/dev/kvm is not available")
def test_soak(tmp_path, capsys):
    b = driver.build(tmp_path / "minivm")
    image, state = tmp_path / "vm.img", tmp_path / "vm.state"
    reference = {a.request: a.value for a in driver.boot(b, image, state, MEM_MIB, requests=REQUESTS)}
    store_url = f"file://{tmp_path}/store"
    create_snapshot(DurableStore(store_url), image, "vm")
    sock = tmp_path / "serve.sock"
    env = {**os.environ, "RESTORE_CACHE_DIR": str(tmp_path / "cache")}
    server = subprocess.Popen(
        [sys.executable, "-m", "restore", "serve", "--snapshot", "vm", "--socket", str(sock), "--store", store_url,
         "--rebuild-plan-after", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        wait_for_socket(server, sock)
        size = MEM_MIB << 20
        nonzero = np.flatnonzero(np.fromfile(image, dtype=np.uint8).reshape(-1, P).any(axis=1))
        rng = np.random.default_rng(11)
        checked = 0

        def process_guest():
            offs = rng.choice(nonzero, 300, replace=False).astype(np.uint64) * P
            return Guest(str(sock), memory_size=size).start(reads(offs)), offs

        def check(g, offs):
            nonlocal checked
            sums = g.wait(120).sums
            g.close()
            assert (sums == expected_sums(image, offs)).all()
            checked += len(offs) * P

        def concurrent_burst():
            vms = [driver.start_restore(b, sock, state, REQUESTS) for _ in range(2)]
            guests = [process_guest() for _ in range(CONCURRENT - len(vms))]
            for g, offs in guests:
                check(g, offs)
            for vm in vms:
                assert {a.request: a.value for a in driver.wait_restore(vm)} == reference

        def phase(n: int) -> None:
            for i in range(n):
                if i % 4 == 3:
                    answers = driver.restore(b, sock, state, REQUESTS, memfd=i % 8 == 7)
                    assert {a.request: a.value for a in answers} == reference
                else:
                    check(*process_guest())
            concurrent_burst()

        def settled() -> dict:
            time.sleep(1.0)  # sessions close and their threads end shortly after the guests
            return _proc_figures(server.pid)

        # Two equal phases: the first grows whatever the workload needs (L1,
        # plan, allocator arenas, caches); a leak shows as growth in the second.
        for _ in range(6):
            check(*process_guest())
        phase(SEQUENTIAL // 2)
        before = settled()
        phase(SEQUENTIAL // 2)

        deadline = time.monotonic() + 30
        while True:
            after = settled()
            if (after["fds"] <= before["fds"] and after["threads"] <= before["threads"]) or time.monotonic() > deadline:
                break
    finally:
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=60)
    assert server.returncode == 0, err
    with capsys.disabled():
        print(f"\nsoak: {SEQUENTIAL} sequential restores and 2 bursts of {CONCURRENT} concurrent guests, "
              f"{checked} bytes checked; server after the first half -> after the second: fds {before['fds']} -> "
              f"{after['fds']}, threads {before['threads']} -> {after['threads']}, "
              f"RSS {before['rss_kib']} -> {after['rss_kib']} KiB")
    assert after["fds"] <= before["fds"], (before, after)
    assert after["threads"] <= before["threads"], (before, after)
    # Resident memory: no growth from the first half to the second beyond
    # allocator slack of 16 MiB.
    assert after["rss_kib"] <= before["rss_kib"] + 16 * 1024, (before, after)
    assert f"stopped after {SEQUENTIAL + 2 * CONCURRENT + 6} sessions, 0 refused" in err
