"""The fault-injection suite's tally, printed after the run.

Only what took effect is counted: a proxy fault counts the replies it
actually changed (held, delayed, cut, answered 503, damaged), a server
killed or stopped mid-restore counts once the test has seen it land (a
request in flight cut or left unanswered while a fault was parked on it)
and the session observe it, a VMM-side fault once the server survived it.
Restores are the guests restored under injection, each checked byte for
byte against the image: wrong bytes and hangs must be 0."""

from __future__ import annotations

import collections

import numpy as np

TALLY: dict = {
    "landed": collections.Counter(),  # "tier kind" -> replies or connections a proxy fault changed
    "mid_restore": collections.Counter(),  # fault kind -> times it landed mid-restore, timed by an event
    "vmm": collections.Counter(),  # VMM-side fault kind -> times the server survived it
    "restores": 0, "poisoned": 0, "bytes_verified": 0, "wrong_bytes": 0, "hangs": 0,
}


def every_chunk_trace(image, seed: int) -> np.ndarray:
    """Every non-zero page of image, in a random order (by seed), as file
    offsets: a guest reading them needs every chunk."""
    pages = np.fromfile(image, dtype=np.uint8).reshape(-1, 4096)
    nonzero = np.flatnonzero(pages.any(axis=1))
    return np.random.default_rng(seed).permutation(nonzero).astype(np.uint64) * 4096


def _kinds(counter) -> str:
    return ", ".join(f"{k} {n}" for k, n in sorted(counter.items())) or "none"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not TALLY["restores"] and not TALLY["hangs"] and not TALLY["vmm"]:
        return
    w = terminalreporter.write_line
    terminalreporter.section("fault injection")
    w(f"restores under injection: {TALLY['restores']} ({TALLY['poisoned']} ended with poisoned pages and a "
      f"named error); bytes verified: {TALLY['bytes_verified']}; wrong bytes delivered: {TALLY['wrong_bytes']}; "
      f"hangs: {TALLY['hangs']}")
    w(f"faults landed mid-restore (timed by events): {_kinds(TALLY['mid_restore'])}")
    w(f"VMM-side faults survived: {sum(TALLY['vmm'].values())} ({_kinds(TALLY['vmm'])})")
    w(f"proxy faults that took effect (replies changed): {_kinds(TALLY['landed'])}")
