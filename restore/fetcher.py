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

import errno
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from ._native import ffi, lib
from .errors import RestoreError
from .manifest import Manifest
from .objects import chunk_key
from .tiers.durable import DurableStore
from .tiers.l1 import L1Cache
from .tiers.l2 import L2Cluster
from .threads import spawn

log = logging.getLogger("restore.fetcher")

POLL_MS = 200  # how often a blocked fetcher looks up to see if it should stop
DURABLE_ATTEMPTS = 3  # reads of a chunk whose durable bytes fail verification
LATENCY_SAMPLES = 65536  # latencies kept per tier (the most recent)


@dataclass
class TierStats:
    """Requests to one tier, with their latencies in seconds."""

    requests: int = 0
    hits: int = 0
    bad: int = 0  # copies that failed verification
    errors: int = 0
    bytes: int = 0  # stored bytes received, whatever became of them
    latencies: deque = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))

    def summary(self) -> dict:
        lat = np.array(self.latencies) if self.latencies else np.zeros(1)  # the most recent samples
        return {
            "requests": self.requests,
            "hits": self.hits,
            "bad": self.bad,
            "errors": self.errors,
            "bytes": self.bytes,
            "p50_ms": float(np.percentile(lat, 50) * 1e3),
            "p99_ms": float(np.percentile(lat, 99) * 1e3),
            "max_ms": float(lat.max() * 1e3),
        }


class FetchBase:
    """What both fetch paths share (Fetchers, a thread pool, and
    restore.asyncfetch.AsyncFetchers, an asyncio loop): per-tier figures,
    what a durable read's bytes mean, giving a chunk up, writing L1.

    engine: the cdata rs_engine *; it must outlive the fetchers (stop the
    engine, then join()). label names the session in log lines. on_fetch:
    called after every request to a tier with (tier "l2" or "durable",
    seconds, outcome "hit", "miss", "bad" (failed verification) or
    "error", stored bytes received), from the fetching thread.
    """

    def __init__(
        self,
        engine,
        manifest: Manifest,
        store: DurableStore,
        l1: Optional[L1Cache],
        label: str,
        l2: Optional[L2Cluster] = None,
        on_fetch: Optional[Callable[[str, float, str, int], None]] = None,
    ):
        self._engine = engine
        self._on_fetch = on_fetch
        self._manifest = manifest
        self._store = store
        self._l1 = l1
        self._l2 = l2
        self._label = label
        self._lock = threading.Lock()
        self._l1_warned = False
        self.tiers = {"l2": TierStats(), "durable": TierStats()}
        self.errors: list[str] = []  # one line per chunk given up
        self.reasons: dict[int, str] = {}  # chunk given up -> why

    def tier_summary(self) -> dict:
        with self._lock:
            return {name: t.summary() for name, t in self.tiers.items()}

    def _note(self, tier: str, seconds: float, hit: bool = False, bad: bool = False, error: bool = False,
              nbytes: int = 0) -> None:
        with self._lock:
            t = self.tiers[tier]
            t.requests += 1
            t.bytes += nbytes
            t.hits += hit
            t.bad += bad
            t.errors += error
            t.latencies.append(seconds)
        if self._on_fetch is not None:
            outcome = "error" if error else "bad" if bad else "hit" if hit else "miss"
            self._on_fetch(tier, seconds, outcome, nbytes)

    def _supply(self, index: int, data, source: int) -> int:
        """Hand stored bytes (any buffer: bytes, obstore's Bytes, ...) to the
        engine, uncopied; it verifies them."""
        return lib.rs_engine_supply(self._engine, index, ffi.from_buffer("uint8_t[]", data), len(data), source)

    def _durable_read(self, index: int, key: str, attempt: int, started: float, data=None,
                      exc: Optional[RestoreError] = None) -> Optional[bool]:
        """What durable read number attempt of chunk index brought (data, or
        the error exc) means: True: supplied (write the caches), False: done
        (supplied by another, or given up), None: read it again (its bytes
        failed verification, damaged on the way or at rest)."""
        if exc is not None:
            self._note("durable", time.perf_counter() - started, error=True)
            self._give_up(index, key, str(exc))
            return False
        if data is None:
            self._note("durable", time.perf_counter() - started)
            self._give_up(index, key, f"object {key} is missing from {self._store.url}")
            return False
        rc = self._supply(index, data, lib.RS_SRC_DURABLE)
        self._note("durable", time.perf_counter() - started, hit=rc == 0, bad=rc not in (0, -errno.EALREADY),
                   nbytes=len(data))
        if rc in (0, -errno.EALREADY):
            return rc == 0
        why = f"bytes from {self._store.url} fail verification ({errno.errorcode.get(-rc, rc)})"
        if attempt == DURABLE_ATTEMPTS:
            self._give_up(index, key, f"{why}, {DURABLE_ATTEMPTS} times")
            return False
        log.warning("%s: chunk %d: %s; reading it again", self._label, index, why)
        return None

    def _give_up(self, index: int, key: str, reason: str) -> None:
        message = f"{self._label}: chunk {index} ({key}): giving up, its pages are poisoned: {reason}"
        log.error(message)
        with self._lock:
            self.errors.append(message)
            self.reasons[index] = reason
        lib.rs_engine_fail(self._engine, index, -errno.EIO)

    def _write_l1_now(self, chunk_id: str, data) -> None:
        if self._l1 is None:
            return
        try:
            # The engine asks for chunks L1 lacks or holds a bad copy of, so
            # whatever is on disk under this id is replaced.
            self._l1.put(chunk_id, data, replace=True, verified=True)  # rs_engine_supply verified it
        except (OSError, RestoreError) as exc:  # a full disk must not fail the restore
            with self._lock:
                warned, self._l1_warned = self._l1_warned, True
            if not warned:
                log.warning("%s: cannot write to L1 %s (%s); serving goes on from the network", self._label,
                            self._l1.root, exc)


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
                rc = self._supply(index, data, lib.RS_SRC_L2)
                self._note("l2", time.perf_counter() - t, hit=rc == 0, bad=rc not in (0, -errno.EALREADY),
                           nbytes=len(data))
                if rc in (0, -errno.EALREADY):
                    if rc == 0:
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
