"""Fetcher threads: the tiers behind the engine's L1.

Each fetcher is a Python thread that blocks inside C
(``rs_engine_next_request``, GIL released) until the engine wants a chunk
its L1 threads could not find, fetches the stored bytes from the next tier
(the durable store in this release), hands them to the engine
(``rs_engine_supply`` verifies and decodes them in C and serves the parked
faults), and then writes them to L1 for the next restore. A chunk that
cannot be had after retries, or whose bytes fail verification, is given up
with ``rs_engine_fail``: its pages are poisoned, never filled with wrong
bytes or silent zeros.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from typing import Optional

from ._native import ffi, lib
from .errors import RestoreError
from .manifest import Manifest
from .snapshot import chunk_key
from .tiers.durable import DurableStore
from .tiers.l1 import L1Cache

log = logging.getLogger("restore.fetcher")

POLL_MS = 200  # how often a blocked fetcher looks up to see if it should stop
ATTEMPTS = 3  # tries per chunk against the durable store
BACKOFF_S = 0.05  # first retry delay, doubled each time


class Fetchers:
    """A pool of fetcher threads serving one engine.

    engine: the cdata rs_engine *; it must outlive the pool (stop the
    engine, then join()). label names the session in log lines.
    """

    def __init__(
        self,
        engine,
        manifest: Manifest,
        store: DurableStore,
        l1: Optional[L1Cache],
        threads: int,
        label: str,
    ):
        self._engine = engine
        self._manifest = manifest
        self._store = store
        self._l1 = l1
        self._label = label
        self.errors: list[str] = []  # one line per chunk given up
        self._threads = [
            threading.Thread(target=self._run, name=f"restore-fetch-{i}", daemon=True) for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def join(self, timeout: float = 10.0) -> None:
        """Wait for the threads; call after the engine has been stopped."""
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        chunk = ffi.new("uint32_t *")
        while True:
            rc = lib.rs_engine_next_request(self._engine, chunk, POLL_MS)
            if rc < 0:  # -ESHUTDOWN: the engine stopped
                return
            if rc == 1:
                self._serve(chunk[0])

    def _serve(self, index: int) -> None:
        entry = self._manifest.chunks[index]
        key = chunk_key(entry.id)
        where = f"{self._label}: chunk {index} ({key})"
        delay = BACKOFF_S
        reason = "no attempt made"
        for attempt in range(1, ATTEMPTS + 1):
            try:
                data = self._store.get(key)
            except RestoreError as exc:
                reason = str(exc)
            else:
                if data is None:
                    reason = f"object {key} is missing from {self._store.url}"
                    break  # a missing object does not come back by retrying
                rc = lib.rs_engine_supply(self._engine, index, data, len(data))
                if rc == 0:
                    self._write_l1(entry.id, data)
                    return
                if rc == -errno.EALREADY:
                    return
                reason = f"bytes from {self._store.url} fail verification ({errno.errorcode.get(-rc, rc)})"
                break  # the store holds a bad copy: asking again gets the same
            if attempt < ATTEMPTS:
                time.sleep(delay)
                delay *= 2
        message = f"{where}: giving up, its pages are poisoned: {reason}"
        log.error(message)
        self.errors.append(message)
        lib.rs_engine_fail(self._engine, index, -errno.EIO)

    def _write_l1(self, chunk_id: str, data: bytes) -> None:
        if self._l1 is None:
            return
        try:
            # The engine asks fetchers only for chunks L1 lacks or holds a bad
            # copy of, so whatever is on disk under this id is replaced.
            self._l1.put(chunk_id, data, replace=True)
        except (OSError, RestoreError) as exc:  # a full disk must not fail the restore
            log.warning("%s: could not write chunk %s to L1: %s", self._label, chunk_id, exc)
