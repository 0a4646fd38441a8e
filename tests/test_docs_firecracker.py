"""The worked example of docs/firecracker.md, run as written: a real
Firecracker boots the guest, is snapshotted, and a second one loads the
snapshot through `restore serve` and answers as the first did."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
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


def test_said_waits_for_the_whole_line(tmp_path):
    """The example's `said` sees a line only once its newline is there: the
    guest's serial output reaches the file a byte at a time, so a line that
    is still being written must not count (its value would be cut short)."""
    helpers = _example().split("\n# 1.", 1)[0].split("\nsaid()", 1)[1]
    out = tmp_path / "vm.out"

    def said(text: str, prefix: str) -> bool:
        out.write_text(text)
        script = f"said(){helpers}\nsaid {shlex.quote(str(out))} {shlex.quote(prefix)}"
        return subprocess.run(["bash", "-euo", "pipefail", "-c", script]).returncode == 0

    assert not said("", "ready")
    assert not said("rea", "ready")
    assert said("ready\n", "ready")
    assert not said("ready\nanswer 42 ", "answer 42 ")
    assert not said("ready\nanswer 42 16947", "answer 42 ")
    assert said("ready\nanswer 42 1694707238\n", "answer 42 ")
    assert said("answer 42 1694707238\nanswer 43 ", "answer 42 ")
    assert not said("ready\nthe answer 42 1\n", "answer 42 ")


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
