"""`restore serve` in a child process, its JSON log lines read as they come:
tests wait for what the server reports (events), never for time; the
process helpers of the tests that watch a supervisor and its workers; and
Inside, a tally of the threads inside a place."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable


class Daemon:
    """`restore serve ARGS` in a child process (cwd: tmp_path); pass
    `--log-format json` to read its events."""

    def __init__(self, tmp_path: Path, *args: str, env: dict | None = None):
        env = dict(os.environ if env is None else env, NO_COLOR="1")
        env.pop("RESTORE_STORE", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "restore", "serve", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
        self.lines: list[str] = []
        self.records: list[dict] = []
        self._next: dict[str, int] = {}
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self._q.put(line)
        self._q.put(None)

    def event(self, name: str, timeout: float = 30.0) -> dict:
        """The next JSON log record whose event is name (after the last one
        returned for name)."""
        deadline = time.monotonic() + timeout
        start = self._next.get(name, 0)
        while True:
            for i in range(start, len(self.records)):
                if self.records[i].get("event") == name:
                    self._next[name] = i + 1
                    return self.records[i]
            start = len(self.records)
            line = self._q.get(timeout=max(0.01, deadline - time.monotonic()))
            assert line is not None, f"serve exited {self.proc.wait()} before {name!r}:\n" + "".join(self.lines)
            self.lines.append(line)
            rec = json.loads(line)  # every line is one JSON object
            assert {"ts", "level", "logger", "msg"} <= rec.keys(), rec
            self.records.append(rec)

    def stop(self, timeout: float = 60.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        while (line := self._q.get(timeout=10)) is not None:
            self.lines.append(line)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def children(pid: int) -> list[int]:
    """The child processes of pid (of every thread of it)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except FileNotFoundError:  # a thread that ended since the listing
            pass
    return out


def wait_for(cond: Callable[[], object], what: str, timeout: float = 30.0, every: float = 0.02) -> None:
    """Until cond() is true, looked at every `every` seconds (for state the
    code reports but signals nobody of: a counter, a file, a process's
    state); fails with `what` after timeout seconds (a bound on a hang,
    never a measure of speed)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(every)


class Inside:
    """How many threads are inside a place right now, by key (a kind of
    thread, or one key for all): a test wraps the place in entered() and
    reads the tally, instead of walking other threads' frames, which
    Python 3.11 does not do safely while they run."""

    def __init__(self):
        self._lock = threading.Lock()
        self._now: Counter = Counter()

    def __call__(self, key: str = "") -> int:
        with self._lock:
            return self._now[key]

    @contextlib.contextmanager
    def entered(self, key: str = ""):
        with self._lock:
            self._now[key] += 1
        try:
            yield
        finally:
            with self._lock:
                self._now[key] -= 1


def wait_for_socket(proc: subprocess.Popen, sock: Path, timeout: float = 30.0) -> None:
    """Until the server proc has made its socket sock; fails with the
    process's output if it exits first, or after timeout seconds."""
    wait_for(lambda: sock.exists() or proc.poll() is not None, f"no socket {sock} after {timeout} s", timeout)
    if not sock.exists():
        assert proc.poll() is None, proc.communicate()
