"""`restore serve --supervise`: when the worker serving guests dies, the
supervisor kills the VMMs it was serving (their guests would hang forever
on their next fault) and a new worker serves new guests on the same
socket."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from daemon import children, wait_for
from restore.sample import write_sample_image
from restore.snapshot import create_snapshot
from restore.guest import Guest, GuestError, reads, wait
from restore.testing import expected_sums
from restore.tiers.durable import DurableStore

SIZE = 8 << 20
P = 4096


@pytest.fixture
def made(tmp_path):
    img = tmp_path / "mem.img"
    write_sample_image(img, SIZE, seed=6)
    url = f"file://{tmp_path}/store"
    create_snapshot(DurableStore(url), img, "fn", chunk_size=256 * 1024)
    return img, url


def test_a_dead_worker_takes_its_vmms_with_it_and_a_new_one_serves(tmp_path, made):
    img, url = made
    sock = tmp_path / "s.sock"
    env = {**os.environ, "RESTORE_CACHE_DIR": str(tmp_path / "cache")}
    sup = subprocess.Popen([sys.executable, "-m", "restore", "serve", "--supervise", "--snapshot", "fn",
                            "--socket", str(sock), "--store", url],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for(lambda: sock.exists() and children(sup.pid), "the supervisor did not start its worker")
        worker = children(sup.pid)[0]
        offsets = np.arange(0, SIZE, 16 * P, dtype=np.uint64)
        with Guest(str(sock), memory_size=SIZE) as g:
            g.start(np.concatenate([reads(offsets[:4]), wait(), reads(offsets)]))  # served, then waits
            wait_for(lambda: g.done_so_far().sums.size >= 4, "the guest was not served")
            os.kill(worker, signal.SIGKILL)
            with pytest.raises(GuestError) as died:
                g.wait(30)
            assert died.value.signal == signal.SIGKILL  # killed by the supervisor, not left hanging
            vmm = g.pid
        wait_for(lambda: children(sup.pid) and children(sup.pid)[0] != worker, "no new worker")
        with Guest(str(sock), memory_size=SIZE) as g:  # the new worker serves on the same socket
            assert (g.run(reads(offsets), timeout=60).sums == expected_sums(img, offsets)).all()
    finally:
        sup.send_signal(signal.SIGTERM)
        out, err = sup.communicate(timeout=60)
    assert sup.returncode == 0, err
    assert f"worker pid {worker} killed by signal 9; killed the VMMs it was serving ({vmm})" in err, err
    assert not sock.exists()


def test_a_worker_that_refuses_its_settings_is_not_restarted(tmp_path, made):
    _, url = made
    proc = subprocess.run([sys.executable, "-m", "restore", "serve", "--supervise", "--snapshot", "nope",
                           "--socket", str(tmp_path / "s.sock"), "--store", url],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert f"error: no snapshot named 'nope' in {url}" in proc.stderr
    assert proc.stderr.count("serving on") <= 1 and not (tmp_path / "s.sock").exists()
