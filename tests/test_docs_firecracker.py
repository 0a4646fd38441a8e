"""The worked example of docs/firecracker.md, run as written: a real
Firecracker boots the guest, is snapshotted, and a second one loads the
snapshot through `restore serve` and answers as the first did."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from bench.minivm.driver import kvm_available

REPO = Path(__file__).resolve().parents[1]


def _example() -> str:
    text = (REPO / "docs" / "firecracker.md").read_text()
    section = text.split("## A worked example with Firecracker\n", 1)[1]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)


@pytest.mark.skipif(not kvm_available(), reason="/dev/kvm is not available")
def test_the_worked_example_runs_as_written():
    script = _example()
    assert "snapshot/load" in script and "restore" in script
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESTORE_")}
    # Output to a file, not a pipe, and the script in a process group of its
    # own: a step that fails leaves its background VMs and server running,
    # which would hold a pipe open; they are killed with the group.
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            rc = proc.wait(timeout=600)
        finally:
            with contextlib.suppress(ProcessLookupError):  # nothing left running
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.seek(0)
        text = out.read()
    assert rc == 0, text
    m = re.search(r"before the snapshot: answer 42 (\d+); restored: answer 42 (\d+)", text)
    assert m and m.group(1) == m.group(2), text
