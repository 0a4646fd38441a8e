"""The worked example of docs/firecracker.md, run as written: a real
Firecracker boots the guest, is snapshotted, and a second one loads the
snapshot through `restore serve` and answers as the first did."""

from __future__ import annotations

import os
import re
import subprocess
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
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = re.search(r"before the snapshot: answer 42 (\d+); restored: answer 42 (\d+)", proc.stdout)
    assert m and m.group(1) == m.group(2), proc.stdout
