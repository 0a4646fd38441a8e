"""`restore serve --supervise`: a supervisor process that outlives its
worker.

A VMM keeps its own copy of its userfaultfd. If the handler serving it
dies, nothing answers its page faults and the guest hangs at its next
first touch, forever. The supervisor owns the listening sockets (every one
of them: a server may listen on one socket per jail) and runs the real
server as a worker child (`restore serve` with the same options),
which reports every peer it takes on (pid from SO_PEERCRED) and every peer
it is done with. When the worker dies of anything but a clean exit, the
supervisor kills the VMMs the worker was serving and starts a new worker
on the same sockets, so new guests are served again at once on each.

Why kill rather than resume: the dead worker's state went with it: which
pages it had installed, and above all which ranges the guest's balloon
had removed. A new worker handed the same userfaultfd could not tell a
removed page (which must read as zeros) from one never touched (which
must read as the snapshot), so resuming could write snapshot bytes where
the guest expects zeros: silent corruption. Killing the VMM makes the
failure loud, and its manager restarts the function.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections import deque
from typing import Sequence

from .errors import RestoreError
from .listen import Listen, check_listens, close_listeners, open_listeners
from .vmm import kill_vmm

log = logging.getLogger("restore.supervisor")

RESTARTS = 5  # worker restarts allowed within RESTART_WINDOW seconds
RESTART_WINDOW = 60.0


def supervise(worker_args: list[str], listens: Sequence[Listen]) -> int:
    """Run `restore <worker_args>` as a worker on the sockets listens (see
    restore.listen.Listen: path, owner, mode; the worker checks the
    allowed uids) until SIGTERM or SIGINT; returns the exit status.
    worker_args: the serve command line without --supervise; the worker
    gets one --worker-listen-fd per socket, in the order of listens (the
    order its own command line gives them)."""
    listens = check_listens(listens)
    listeners = open_listeners(listens)
    paths = ", ".join(lst.path for lst in listens)
    fds = [sock.fileno() for sock in listeners]
    reports_r, reports_w = os.pipe()
    stopping = False
    worker = None

    def on_signal(signum, _frame):
        nonlocal stopping
        stopping = True
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    restarts: deque[float] = deque()
    status = 0
    try:
        while True:
            worker = subprocess.Popen(
                [sys.executable, "-m", "restore", *worker_args,
                 *(arg for fd in fds for arg in ("--worker-listen-fd", str(fd))),
                 "--worker-report-fd", str(reports_w)],
                pass_fds=(*fds, reports_w),
            )
            log.warning("supervisor: worker pid %d serving on %s", worker.pid, paths)
            peers = _follow(worker, reports_r)
            rc = worker.returncode
            if stopping:
                status = 0 if rc in (0, -signal.SIGTERM) else 1
                break
            if rc in (1, 2):  # the worker refused its settings: restarting would not help
                status = rc
                break
            how = f"killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
            killed = _kill_all(peers)
            log.error("supervisor: worker pid %d %s; killed the VMMs it was serving (%s), as their guests "
                      "would hang without a page-fault handler; starting a new worker", worker.pid, how,
                      ", ".join(map(str, killed)) or "none")
            now = time.monotonic()
            restarts.append(now)
            while restarts and now - restarts[0] > RESTART_WINDOW:
                restarts.popleft()
            if len(restarts) > RESTARTS:
                log.error("supervisor: %d worker deaths within %.0f s; giving up", len(restarts), RESTART_WINDOW)
                status = 1
                break
    finally:
        os.close(reports_r)
        os.close(reports_w)
        close_listeners(listeners, listens)
    return status



def _follow(worker: subprocess.Popen, reports: int) -> set[int]:
    """Read the worker's peer reports until it exits; the peers it was
    still serving."""
    peers: dict[int, int] = {}
    pending = b""
    while True:
        ready, _, _ = select.select([reports], [], [], 0.2)
        if ready:
            pending += os.read(reports, 65536)
            *lines, pending = pending.split(b"\n")
            for line in lines:
                event, _, pid = line.decode().partition(" ")
                n = peers.get(int(pid), 0) + (1 if event == "start" else -1)
                if n > 0:
                    peers[int(pid)] = n
                else:
                    peers.pop(int(pid), None)
        elif worker.poll() is not None:
            return set(peers)


def _kill_all(pids: set[int]) -> list[int]:
    killed = []
    for pid in sorted(pids):
        if pid <= 0 or pid == os.getpid():
            continue
        why = kill_vmm(pid)
        if why is None:
            killed.append(pid)
        elif why != "gone":
            log.error("supervisor: could not kill VMM pid %d (%s); its guest will hang", pid, why)
    return killed


class PeerReports:
    """The worker's side: one line per peer event on the supervisor's pipe."""

    def __init__(self, fd: int):
        self._fd = fd

    def __call__(self, event: str, pid: int) -> None:
        try:
            os.write(self._fd, f"{event} {pid}\n".encode())  # one write per line: atomic on a pipe
        except OSError as exc:
            raise RestoreError(f"cannot report to the supervisor: {exc.strerror}") from None
