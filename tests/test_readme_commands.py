"""Every command in README.md runs as written.

The README's ```sh blocks are run in order as one bash script (so `. .venv/bin/activate`
and `cmd &` ... `kill %1` carry across lines, as they would in a user's shell), from
the repository root, with HOME in a temporary directory so the default store
and cache are fresh: what a new user sees after cloning. Its ```python block
runs afterwards, in the same directory. The one command left out is
`make test`, which is what runs this test.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOT_RUN = {"make test"}  # running the suite from inside the suite


def blocks(lang: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def commands() -> list[str]:
    """The README's shell lines, comments and NOT_RUN dropped, continuation
    lines (starting with '#' after a command) ignored."""
    out = []
    for block in blocks("sh"):
        for line in block.splitlines():
            command = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
            if command and command not in NOT_RUN:
                out.append(command)
    return out


def test_the_readme_has_the_commands_we_expect():
    cmds = commands()
    assert cmds[0] == "make demo" and "make test" not in cmds
    assert any(c.startswith("restore serve --config ") for c in cmds)
    assert len(blocks("python")) == 1


def test_every_readme_command_runs(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RESTORE_", "XDG_", "VIRTUAL_ENV"))}
    env.update(HOME=str(tmp_path / "home"), NO_COLOR="1")
    (tmp_path / "home").mkdir()
    script = "set -euo pipefail\nset -x\n" + "\n".join(commands()) + "\n"
    proc = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # a server left behind by a failed line
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, out[-6000:]
    # What the commands were for: the pictures, the metrics, a served guest.
    for png in ("demo-data/session.png", "demo-data/plan.png"):
        assert (ROOT / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert re.search(r'^restore_first_touches_total\{source="prefetched"\} [1-9]', out, re.M), out[-4000:]
    assert "every page matches the snapshot" in out and "PAGES DIFFER" not in out
    assert "stopped after 1 sessions, 0 refused" in out

    python = subprocess.run([sys.executable, "-c", blocks("python")[0]], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert python.returncode == 0, python.stderr
    assert re.fullmatch(r"1 session, [1-9]\d* faults\n", python.stdout), python.stdout
