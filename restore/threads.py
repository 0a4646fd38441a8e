"""Threads started without waiting for them to run.

threading.Thread.start() blocks until the new thread has run far enough to
say so; on a busy two-CPU host that is a good part of a millisecond, and a
restore pays it on its guest's first fault (the server starts a thread per
guest, the session its fetchers). spawn() starts one and returns at once;
the Event it returns is set when the thread's function has returned.
"""

from __future__ import annotations

import _thread
import threading
from typing import Callable


def spawn(fn: Callable[..., object], *args: object) -> threading.Event:
    """Run fn(*args) on a new daemon thread; the Event is set when it ends
    (however it ends: an exception is reported as threading's are)."""
    ended = threading.Event()

    def run() -> None:
        try:
            fn(*args)
        except BaseException as exc:  # noqa: BLE001 - reported like an uncaught exception of a Thread
            threading.excepthook(threading.ExceptHookArgs((type(exc), exc, exc.__traceback__, None)))
        finally:
            ended.set()

    _thread.start_new_thread(run, ())
    return ended
