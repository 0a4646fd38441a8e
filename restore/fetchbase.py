"""What both fetch paths share: per-tier figures, what stored bytes handed
to the engine became, giving a chunk up, writing L1.

The fetch paths are restore.asyncfetch.AsyncFetchers (an asyncio loop, the
default) and restore.fetcher.Fetchers (a pool of threads). Both take a
request from the engine (a chunk its local tiers lack), read it from L2 or
the durable store, and hand the stored bytes to the engine, which verifies
and decodes them (rs_engine_supply); a chunk no tier can give is given up
(rs_engine_fail: its pages are poisoned, never filled with wrong bytes).
"""

from __future__ import annotations

import enum
import errno
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from ._native import ffi, lib
from .errors import RestoreError, error_for
from .manifest import Manifest

log = logging.getLogger("restore.fetcher")

POLL_MS = 200  # how often a blocked fetcher looks up to see if it should stop
DURABLE_ATTEMPTS = 3  # reads of a chunk whose durable bytes fail verification
LATENCY_SAMPLES = 65536  # latencies kept per tier (the most recent)


class Supply(enum.Enum):
    """What became of stored bytes handed to the engine."""

    TAKEN = "taken"  # verified; the engine installs them (write the caches)
    ALREADY = "already"  # another tier's copy of the chunk came first
    BAD = "bad"  # they failed verification (damaged on the way or at rest)


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
    engine, then join()). store: the snapshot's
    restore.tiers.durable.DurableStore; l1: its restore.tiers.l1.L1Cache
    (None: no L1); l2: a restore.tiers.l2.L2Cluster (None: no L2). They are
    handed in and only called: this module knows no tier's code. label names the session in log lines. on_fetch:
    called after every request to a tier with (tier "l2" or "durable",
    seconds, outcome "hit", "miss", "bad" (failed verification) or
    "error", stored bytes received), from the fetching thread.
    """

    def __init__(
        self,
        engine,
        manifest: Manifest,
        store,
        l1,
        label: str,
        l2=None,
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

    def _note(self, tier: str, seconds: float, supplied: Optional[Supply] = None, error: bool = False,
              nbytes: int = 0) -> None:
        """Count a request to tier that took seconds: supplied, what became
        of the bytes it brought (None: none came; error: it failed)."""
        hit, bad = supplied is Supply.TAKEN, supplied is Supply.BAD
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

    def _supply(self, index: int, data, source: int) -> tuple[Supply, Optional[Exception]]:
        """Hand stored bytes (any buffer: bytes, obstore's Bytes, ...) to the
        engine, uncopied; it verifies them. Returns what became of them,
        and for BAD the error saying why."""
        rc = lib.rs_engine_supply(self._engine, index, ffi.from_buffer("uint8_t[]", data), len(data), source)
        if rc == 0:
            return Supply.TAKEN, None
        if rc == -errno.EALREADY:
            return Supply.ALREADY, None
        return Supply.BAD, error_for(rc, "rs_engine_supply")

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
        outcome, error = self._supply(index, data, lib.RS_SRC_DURABLE)
        self._note("durable", time.perf_counter() - started, outcome, nbytes=len(data))
        if outcome is not Supply.BAD:
            return outcome is Supply.TAKEN
        why = f"bytes from {self._store.url} fail verification: {error}"
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
