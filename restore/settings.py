"""How sessions and servers serve: their settings, defaults and checks.

RestoreSession takes these as keyword arguments; a Server takes them as one
ServerSettings, next to what it serves (the snapshot), where (its sockets),
from what (its tiers) and whom it tells (its hooks). `restore serve` builds
a ServerSettings from its flags and config file. The defaults live here, in
a module that imports nothing heavy, so a command line, a config file or a
metrics exporter can name them without loading the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

from .errors import InputError

DEFAULT_FAULT_AROUND = 64  # pages; chosen with bench/test_bench_fault.py (fault_around)
DEFAULT_FETCHERS = 4
DEFAULT_PREFETCH_INFLIGHT = 8  # plan chunks requested at once
DEFAULT_POLL_US = 50  # us the service thread keeps looking after a fault; chosen with bench/fault_poll.py
DEFAULT_DRAIN_TIMEOUT = 10.0  # seconds running guests get after stop() before they are killed
DEFAULT_PLAN_SESSIONS = 5  # recent fault logs a rebuilt plan is merged from
MAX_POLL_US = 1_000_000
# How pages go into a guest's memfd when it sends one (see RestoreSession).
MEMFD_INSTALL_NAMES = ("copy", "continue")


def check_session_settings(*, fault_around: int, fetchers: int, poll_us: int, memfd_install: str,
                           prefetch_around: Optional[int] = None, prefetch_inflight: int = 1) -> None:
    """Raise InputError naming the first setting a session cannot run with."""
    if fault_around < 1:
        raise InputError(f"fault_around must be at least 1 page, got {fault_around}")
    if fetchers < 1:
        raise InputError(f"fetchers must be at least 1, got {fetchers}")
    if prefetch_around is not None and prefetch_around < 1:
        raise InputError(f"prefetch_around must be at least 1 page, got {prefetch_around}")
    if prefetch_inflight < 1:
        raise InputError(f"prefetch_inflight must be at least 1 chunk, got {prefetch_inflight}")
    if not 0 <= poll_us <= MAX_POLL_US:
        raise InputError(f"poll_us must be 0 to {MAX_POLL_US} us, got {poll_us}")
    if memfd_install not in MEMFD_INSTALL_NAMES:
        raise InputError(f"memfd_install must be one of {', '.join(MEMFD_INSTALL_NAMES)}, got {memfd_install!r}")


@dataclass(frozen=True)
class ServerSettings:
    """How a Server serves each guest (checked when made).

    Sessions: fault_around, memfd_install, fetchers, prefetch_inflight,
    poll_us, poison and fetch_loop are RestoreSession's.
    record_fault_around: the fault-around of sessions that run without a
    plan (None: fault_around); 1 makes every first touch a fault, so their
    logs name the working set exactly (a neighbour brought in by
    fault-around is touched unseen), at the price of a slower recording
    session: what a working-set-first layout wants. persist_logs: save each
    session's fault log in the store.

    Plans (restore.workingset.PlanPolicy): use_plan: replay the version's
    plan as a prefetch. rebuild_plan_after: every N recorded sessions,
    rebuild the plan from the last plan_sessions fault logs (None: never).
    audit_every: every Nth session that would replay the plan runs without
    it, recording every first touch, and the plan is scored against what
    that guest touched (None: no audits).

    Guests: drain_timeout: seconds running guests get after stop() before
    they are killed. kill_refused: kill the VMM of a refused guest (it
    would hang at its first fault); False only for tests whose peer is this
    process.
    """

    fault_around: int = DEFAULT_FAULT_AROUND
    record_fault_around: Optional[int] = None
    memfd_install: str = "copy"
    fetchers: int = DEFAULT_FETCHERS
    prefetch_inflight: int = DEFAULT_PREFETCH_INFLIGHT
    poll_us: int = DEFAULT_POLL_US
    poison: Optional[bool] = None
    fetch_loop: bool = True
    persist_logs: bool = True
    use_plan: bool = True
    rebuild_plan_after: Optional[int] = None
    plan_sessions: int = DEFAULT_PLAN_SESSIONS
    audit_every: Optional[int] = None
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    kill_refused: bool = True

    @classmethod
    def take(cls, kw: dict) -> tuple["ServerSettings", dict]:
        """The settings among keyword arguments kw (a wrapper's, e.g. a test
        or benchmark harness that passes settings and tiers alike), and the
        other arguments."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in kw.items() if k in names}), {k: v for k, v in kw.items() if k not in names}

    def __post_init__(self):
        check_session_settings(fault_around=self.fault_around, fetchers=self.fetchers, poll_us=self.poll_us,
                               memfd_install=self.memfd_install, prefetch_inflight=self.prefetch_inflight)
        for name, unit in (("record_fault_around", "page"), ("rebuild_plan_after", "session"),
                           ("audit_every", "session")):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"{name} must be at least 1 {unit}, got {value}")
        if self.plan_sessions < 1:
            raise InputError(f"plan_sessions must be at least 1 session, got {self.plan_sessions}")
        if not self.drain_timeout >= 0:
            raise InputError(f"drain_timeout must be 0 or more seconds, got {self.drain_timeout}")
