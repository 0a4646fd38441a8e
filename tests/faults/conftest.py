"""The fault-injection suite's tally, printed after the run: faults injected
by kind, restores completed, bytes verified, wrong bytes delivered and
hangs (the last two must be 0)."""

from __future__ import annotations

import collections

TALLY: dict = {"injected": collections.Counter(), "restores": 0, "poisoned": 0, "bytes_verified": 0,
               "wrong_bytes": 0, "hangs": 0}


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not TALLY["restores"] and not TALLY["hangs"]:
        return
    terminalreporter.section("fault injection")
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(TALLY["injected"].items())) or "none"
    terminalreporter.write_line(f"faults injected (connections or events): {kinds}")
    terminalreporter.write_line(
        f"restores: {TALLY['restores']} ({TALLY['poisoned']} ended with poisoned pages and a named error); "
        f"bytes verified: {TALLY['bytes_verified']}; wrong bytes delivered: {TALLY['wrong_bytes']}; "
        f"hangs: {TALLY['hangs']}"
    )
