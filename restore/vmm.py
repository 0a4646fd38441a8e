"""The VMM at the other end of a connection, when it must go.

A VMM whose memory is registered with a userfaultfd nobody serves hangs at
its next first touch, so a refused guest, a session that ends while its VMM
runs, and the VMMs of a crashed worker are killed. kill_vmm is the one way
this package kills one.
"""

from __future__ import annotations

import os
import signal
from typing import Optional


def kill_vmm(pid: int, pidfd: int = -1) -> Optional[str]:
    """SIGKILL a VMM: through its pidfd when there is one (it names that
    very process: no pid-reuse race), else by pid. None when killed;
    "gone" when it had exited already; else why it could not be."""
    try:
        if pidfd >= 0:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        elif pid > 0 and pid != os.getpid():
            os.kill(pid, signal.SIGKILL)
        else:
            return "no process to kill: the peer is this process"
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        return "no permission: run the handler as root or with CAP_KILL"
    return None
