"""The files in deploy/: the systemd unit passes systemd's own check, the
example configs are valid `restore serve` settings, and the unit's way of
running (--supervise with --config) serves guests and stops on SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from daemon import children, wait_for_socket
from restore.guest import Guest, reads
from restore.testing import expected_sums

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
RESTORE = Path(sys.executable).parent / "restore"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_unit_passes_systemd_analyze_verify(tmp_path):
    text = (DEPLOY / "restore-serve@.service").read_text()
    assert "ExecStart=/opt/restore/.venv/bin/restore serve --supervise --config /etc/restore/%i.toml" in text
    # An instance of the unit, running this checkout's restore.
    unit = tmp_path / "restore-serve@fn.service"
    unit.write_text(text.replace("/opt/restore/.venv/bin/restore", str(RESTORE)))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr


@pytest.mark.parametrize("name", ["serve.toml", "demo.toml"])
def test_the_example_configs_are_valid(name):
    r = subprocess.run([str(RESTORE), "serve", "--supervise", "--config", str(DEPLOY / name), "--help"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_supervise_from_a_config_file(tmp_path, cli_snapshot):
    img, store = cli_snapshot(8 << 20, seed=4)
    sock = tmp_path / "fn.sock"
    config = tmp_path / "fn.toml"
    config.write_text(f'snapshot = "fn"\nsocket = "{sock}"\nstore = "{store}"\nsupervise = true\n'
                      f'cache = "{tmp_path}/cache"\n')
    proc = subprocess.Popen([str(RESTORE), "serve", "--config", str(config)], stderr=subprocess.PIPE, text=True)
    try:
        wait_for_socket(proc, sock)
        offsets = np.arange(0, 8 << 20, 4096 * 5, dtype=np.uint64)
        with Guest(str(sock), memory_size=8 << 20) as g:
            res = g.run(reads(offsets), timeout=60)
        assert (res.sums == expected_sums(img, offsets)).all()
        # One supervisor, one worker: the worker read supervise = true from
        # the same file and did not start a supervisor of its own.
        workers = children(proc.pid)
        assert len(workers) == 1
        assert children(workers[0]) == []
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "stopped after 1 sessions, 0 refused" in err
    assert not os.path.exists(sock)


def test_the_commented_listen_example_is_valid(tmp_path):
    """deploy/serve.toml's commented [[listen]] tables, uncommented, are
    valid settings: two sockets, each with its owner, mode and allow-list."""
    import click

    from restore import config
    from restore.cli import serve

    lines = (DEPLOY / "serve.toml").read_text().splitlines()
    start = lines.index("# [[listen]]")
    text = "\n".join(lines[:start] + [x[2:] if x.startswith("# ") else "" for x in lines[start:]]) + "\n"
    (tmp_path / "serve.toml").write_text(text)
    listens = config.load(str(tmp_path / "serve.toml"), serve, click.Context(serve))["listens"]
    assert [(x.owner, x.mode, x.allowed_uids) for x in listens] == [
        ((10001, 10001), 0o600, frozenset({10001})), ((10002, 10002), 0o600, frozenset({10002}))]
    r = subprocess.run([str(RESTORE), "serve", "--config", str(tmp_path / "serve.toml"), "--help"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
