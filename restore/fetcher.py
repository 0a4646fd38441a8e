"""Fetcher threads: the tiers behind the engine's L1.

Each fetcher is a Python thread that blocks inside C
(``rs_engine_next_request``, GIL released) until the engine wants a chunk
its L1 threads could not find. The engine asks once per chunk however many
faults (or prefetches) wait on it, so fetches are single-flight. For each
request the fetcher tries, in order:

1. L2 (memcached, the local zone): a hit is handed to the engine
   (``rs_engine_supply`` verifies it in C); a copy that fails verification
   is dropped from L2, counted, and the next tier is asked;
2. the durable store (retried with backoff and jitter within its deadline).

Verified bytes are then written to L1 and, after a durable read, to L2. A
chunk that no tier can give, or whose durable copy fails verification, is
given up with ``rs_engine_fail``: its pages are poisoned, never filled with
wrong bytes or silent zeros.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from ._native import ffi, lib
from .errors import RestoreError
from .fetchbase import DURABLE_ATTEMPTS, POLL_MS, FetchBase, Supply
from .manifest import Manifest
from .objects import chunk_key
from .tiers.durable import DurableStore
from .tiers.l1 import L1Cache
from .tiers.l2 import L2Cluster
from .threads import spawn

log = logging.getLogger("restore.fetcher")

class Fetchers(FetchBase):
    """A pool of fetcher threads serving one engine (arguments: FetchBase;
    threads: the pool's size)."""

    def __init__(
        self,
        engine,
        manifest: Manifest,
        store: DurableStore,
        l1: Optional[L1Cache],
        threads: int,
        label: str,
        l2: Optional[L2Cluster] = None,
        on_fetch: Optional[Callable[[str, float, str, int], None]] = None,
    ):
        super().__init__(engine, manifest, store, l1, label, l2, on_fetch)
        # One thread at first; the rest start with the first request that
        # reaches the network tiers: a session served from the host cache or
        # L1 never needs them. Threads are started without waiting for them
        # to run (threading.Thread.start waits, which costs the guest's first
        # fault up to a millisecond on a busy host); each sets its event when
        # it ends, for join().
        self._more = threads - 1  # to start with the first network request
        self._ended: list[threading.Event] = []

    def start(self) -> None:
        """Start the first thread (after the engine has started)."""
        self._start_one()

    def join(self, timeout: float = 30.0) -> None:
        """Wait for the threads; call after the engine has been stopped."""
        deadline = time.monotonic() + timeout
        with self._lock:
            ended = list(self._ended)
        for e in ended:
            e.wait(max(0.0, deadline - time.monotonic()))

    def _start_one(self) -> None:
        with self._lock:
            self._ended.append(spawn(self._run))

    def _grow(self) -> None:
        """Start the rest of the pool (once): the network tiers are in use."""
        with self._lock:
            more, self._more = self._more, 0
        for _ in range(more):
            self._start_one()

    def _run(self) -> None:
        chunk = ffi.new("uint32_t *")
        while True:
            rc = lib.rs_engine_next_request(self._engine, chunk, POLL_MS)
            if rc < 0:  # -ESHUTDOWN: the engine stopped
                return
            if rc == 1:
                if self._more:
                    self._grow()
                self._serve(chunk[0])

    def _serve(self, index: int) -> None:
        entry = self._manifest.chunks[index]
        key = chunk_key(entry.id)

        if self._l2 is not None:
            t = time.perf_counter()
            data = self._l2.get(entry.id)
            if data is not None:
                outcome, _ = self._supply(index, data, lib.RS_SRC_L2)
                self._note("l2", time.perf_counter() - t, outcome, nbytes=len(data))
                if outcome is not Supply.BAD:
                    if outcome is Supply.TAKEN:
                        self._write_l1(entry.id, data)
                    return
                log.warning("%s: chunk %d: the L2 copy fails verification; dropped, reading the store", self._label, index)
                self._l2.drop(entry.id)
            else:
                self._note("l2", time.perf_counter() - t)

        for attempt in range(1, DURABLE_ATTEMPTS + 1):
            t = time.perf_counter()
            try:
                data = self._store.get(key)  # retried within the store's deadline
            except RestoreError as exc:
                self._durable_read(index, key, attempt, t, exc=exc)
                return
            supplied = self._durable_read(index, key, attempt, t, data)
            if supplied is False:
                return
            if supplied:
                break
        self._write_l1(entry.id, data)
        if self._l2 is not None:
            self._l2.put(entry.id, data)  # fills the zone, or repairs a bad copy

    def _write_l1(self, chunk_id: str, data) -> None:
        self._write_l1_now(chunk_id, data)  # on this fetcher thread
