"""The fetch loop: L2 and durable fetches with many requests in flight.

Same contract as restore.fetcher.Fetchers (the engine's fetch queue in,
rs_engine_supply / rs_engine_fail out, L1 and L2 written after), but no
Python thread per request: one thread blocks in C on the engine's fetch
queue (``rs_engine_next_request_prio``, GIL released) and hands requests
to one asyncio loop thread, which keeps up to ``inflight`` chunks in
flight:

- demand requests (a fault waits) start at once, beyond ``inflight`` if
  prefetch requests hold every slot, and always before any prefetch
  request waiting in the loop; a prefetch request turned demand (the
  engine asks again at high priority) moves ahead too; a request for a
  chunk already in flight just waits for it (single flight);
- L2 reads go through restore/tiers/amc.py (keep-alive connections per
  node); a demand read that has not answered within the hedge threshold is
  hedged to another replica (the chunk's home node in the next zone, else
  the next node of the local zone) before the durable tier is asked: the
  first hit wins, the other request is cancelled; counted in ``hedged``.
  The threshold is ``hedge_after`` or the 95th percentile of the last
  L2 hits' latencies, whichever is longer: during a prefetch burst every
  read is slow, and hedging them all would double the load that makes
  them slow. Prefetch reads are not hedged (no fault waits on them);
- durable reads use obstore's async API (DurableStore.get_async); the
  store's own retries and deadline apply as for the threaded path;
- stored bytes (obstore's Bytes, memcached's buffer) go to
  rs_engine_supply through ffi.from_buffer, uncopied, on one of
  ``SUPPLY_THREADS`` threads: the engine verifies and decodes a chunk in
  the call (GIL released), about 0.6 ms for a 512 KiB chunk, which on the
  loop thread would hold up every other request's bytes (on the heap
  benchmark behind L2 it was 40 % of the loop thread's time).

Verification, retries of bad durable copies, giving up (pages poisoned)
and the L1/L2 writes are as in restore.fetcher.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

from ._native import ffi, lib
from .errors import RestoreError
from .fetchbase import DURABLE_ATTEMPTS, POLL_MS, FetchBase, Supply
from .manifest import Manifest
from .objects import chunk_key
from .tiers.amc import Zone
from .tiers.durable import DurableStore
from .tiers.l1 import L1Cache
from .tiers.l2 import L2Cluster
from .threads import spawn

log = logging.getLogger("restore.fetcher")

HEDGE_AFTER = 0.002  # seconds an L2 read may take before another replica is asked, at least
HEDGE_PERCENTILE = 95  # ... and at least this percentile of the last HEDGE_WINDOW L2 hits' latencies
HEDGE_WINDOW = 128
SUPPLY_THREADS = min(4, os.cpu_count() or 1)  # threads handing chunks to the engine (it verifies, decodes)


def _idle_priority() -> None:
    """Run the calling thread only on otherwise idle CPUs (SCHED_IDLE; on
    Linux a thread's policy is its own): L1 writes are for the next restore
    and must not take CPU from this one's fetches, decodes and installs."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError) as exc:  # not Linux, or not allowed: a normal thread
        log.debug("L1 writer keeps its priority: %r", exc)


class AsyncFetchers(FetchBase):
    """The fetch loop serving one engine (see the module text).

    Arguments as restore.fetcher.Fetchers; inflight: prefetch chunks
    fetched at once at most (demand chunks start at once); hedge_after: the
    least seconds before a slow demand L2 read is hedged (None or 0:
    never). on_fetch is also told of each hedge, with outcome "hedged" and
    the threshold as its seconds.
    """

    def __init__(
        self,
        engine,
        manifest: Manifest,
        store: DurableStore,
        l1: Optional[L1Cache],
        inflight: int,
        label: str,
        l2: Optional[L2Cluster] = None,
        on_fetch: Optional[Callable[[str, float, str, int], None]] = None,
        hedge_after: Optional[float] = HEDGE_AFTER,
    ):
        super().__init__(engine, manifest, store, l1, label, l2, on_fetch)
        self._inflight = max(1, inflight)
        self._hedge_after = hedge_after or None
        self._l2_latencies: deque[float] = deque(maxlen=HEDGE_WINDOW)  # loop thread only
        self._hedge_at = self._hedge_after  # the threshold now (loop thread only)
        self.hedged = {"l2": 0}
        # Loop state (loop thread only).
        self._demand: deque[int] = deque()
        self._prefetch: deque[int] = deque()
        self._waiting: dict[int, bool] = {}  # chunk -> demand, for those in the deques
        self._running: set[int] = set()
        self._tasks: set[asyncio.Task] = set()
        self._zones: list[Zone] = []
        self._io: Optional[ThreadPoolExecutor] = None  # L1 writes (disk)
        self._cpu = ThreadPoolExecutor(SUPPLY_THREADS, thread_name_prefix="restore-supply")
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        # Held by _post around call_soon_threadsafe and by the loop thread
        # around loop.close(): the former writes to the loop's self-pipe,
        # the latter closes it, and a write racing the close could land on
        # whatever file took the socket's number meanwhile.
        self._post_lock = threading.Lock()
        self._started = threading.Event()
        self._ended: list[threading.Event] = []  # one per thread started (start())

    def start(self) -> None:
        """Start the loop and the pump (after the engine has started)."""
        for fn in (self._loop_main, self._pump):
            self._ended.append(spawn(fn))

    # -- threads -------------------------------------------------------------

    def join(self, timeout: float = 30.0) -> None:
        """Wait for the threads; call after the engine has been stopped."""
        if self._loop is not None:  # a loop whose pump never started ends too
            self._post(self._finish)
        deadline = time.monotonic() + timeout
        for e in self._ended:
            e.wait(max(0.0, deadline - time.monotonic()))

    def _loop_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._stop = loop.create_future()
        if self._l2 is not None:
            kw = dict(connect_timeout=self._l2.connect_timeout, dead_timeout=self._l2.dead_timeout)
            self._zones = [Zone(name, nodes, **kw) for name, nodes in self._l2.zones]
        self._started.set()
        try:
            loop.run_until_complete(self._stop)
            for t in list(self._tasks):
                t.cancel()
            if self._tasks:
                loop.run_until_complete(asyncio.gather(*self._tasks, return_exceptions=True))
        finally:
            for z in self._zones:
                z.close()
            loop.run_until_complete(asyncio.sleep(0))  # let the transports close
            # The executors' threads post their results to the loop: they
            # end before it closes. The engine outlives their calls (join
            # waits for this).
            self._cpu.shutdown(wait=True)
            if self._io is not None:
                self._io.shutdown(wait=True)
            with self._post_lock:
                loop.close()

    def _pump(self) -> None:
        """Move requests from the engine's queue to the loop, in batches."""
        self._started.wait()
        chunk, high = ffi.new("uint32_t *"), ffi.new("int *")
        while True:
            rc = lib.rs_engine_next_request_prio(self._engine, chunk, high, POLL_MS)
            if rc < 0:  # -ESHUTDOWN: the engine stopped
                self._post(self._finish)
                return
            if rc == 1:
                batch = [(chunk[0], high[0])]
                while len(batch) < 256 and lib.rs_engine_next_request_prio(self._engine, chunk, high, 0) == 1:
                    batch.append((chunk[0], high[0]))
                if not self._post(self._take, batch):
                    return

    def _post(self, fn, *args) -> bool:
        """Run fn(*args) on the loop thread; False once the loop has closed
        (join() ends it too, and may end it first)."""
        loop = self._loop
        with self._post_lock:
            try:
                loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # "Event loop is closed"
                return False
        return True

    def _finish(self) -> None:
        if not self._stop.done():
            self._stop.set_result(None)

    # -- scheduling (loop thread) -------------------------------------------

    def _take(self, batch) -> None:
        for index, high in batch:
            if index in self._running:
                continue  # in flight: a fault waits for it as it is
            queued = self._waiting.get(index)
            if queued is None:
                self._waiting[index] = bool(high)
                (self._demand if high else self._prefetch).append(index)
            elif high and not queued:  # a prefetch now waited for: ahead of the others
                self._waiting[index] = True
                self._demand.append(index)
        self._dispatch()

    def _dispatch(self) -> None:
        # A demand request starts at once, even with every slot taken by
        # prefetch requests already on the network (a fault waits on it,
        # and faults are few: one per vCPU at a time); prefetch requests
        # fill the slots left.
        for q, limit in ((self._demand, None), (self._prefetch, self._inflight)):
            while q and (limit is None or len(self._running) < limit):
                index = q.popleft()
                if index not in self._waiting:
                    continue  # moved to the demand queue, or already started from it
                del self._waiting[index]
                self._running.add(index)
                task = self._loop.create_task(self._serve(index, limit is None))
                self._tasks.add(task)
                task.add_done_callback(lambda t, i=index: self._done(t, i))

    def _done(self, task: asyncio.Task, index: int) -> None:
        self._tasks.discard(task)
        self._running.discard(index)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("%s: chunk %d: fetch failed: %r", self._label, index, exc)
            self._give_up(index, chunk_key(self._manifest.chunks[index].id), f"fetch failed: {exc!r}")
        if not self._stop.done():
            self._dispatch()

    # -- figures ---------------------------------------------------------------

    def tier_summary(self) -> dict:
        out = super().tier_summary()
        with self._lock:
            out["l2"]["hedged"] = self.hedged["l2"]
        return out

    # -- one chunk ---------------------------------------------------------------

    async def _serve(self, index: int, demand: bool) -> None:
        entry = self._manifest.chunks[index]
        key = chunk_key(entry.id)

        if self._zones:
            t = time.perf_counter()
            data, node = await self._l2_get(entry.id, hedge=demand)
            if data is not None:
                self._l2_latency(time.perf_counter() - t)
                outcome, _ = await self._loop.run_in_executor(self._cpu, self._supply, index, data, lib.RS_SRC_L2)
                self._note("l2", time.perf_counter() - t, outcome, nbytes=len(data))
                if outcome is not Supply.BAD:
                    if outcome is Supply.TAKEN:
                        self._write_l1(entry.id, data)
                    return
                log.warning("%s: chunk %d: the L2 copy fails verification; dropped, reading the store", self._label, index)
                self._l2._count("bad")
                self._background(self._l2_call(node.delete(entry.id)))
            else:
                self._note("l2", time.perf_counter() - t, error=node is None)

        for attempt in range(1, DURABLE_ATTEMPTS + 1):
            t = time.perf_counter()
            try:
                data = await self._store.get_async(key)  # retried within the store's deadline
            except RestoreError as exc:
                self._durable_read(index, key, attempt, t, exc=exc)
                return
            supplied = await self._loop.run_in_executor(self._cpu, self._durable_read, index, key, attempt, t, data)
            if supplied is False:
                return
            if supplied:
                break
        self._write_l1(entry.id, data)
        if self._zones:
            home = self._zones[0].ranked(entry.id)[:1]
            if home:  # fills the zone, or repairs a bad copy
                self._background(self._l2_put(home[0], entry.id, data))

    # -- L2 ------------------------------------------------------------------------

    def _background(self, coro) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _l2_call(self, coro):
        try:
            return await asyncio.wait_for(coro, self._l2.timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            self._l2._count("errors")
            log.debug("L2: %r", exc)
            return None

    async def _l2_put(self, node, chunk_id: str, data) -> None:
        if await self._l2_call(node.set(chunk_id, data)):
            self._l2._count("writes")

    async def _l2_one(self, node, chunk_id: str):
        """(bytes or None, node); node None when the request failed."""
        try:
            value = await asyncio.wait_for(node.get(chunk_id), self._l2.timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            self._l2._count("errors")
            log.debug("L2 get %s from %s: %r", chunk_id, node.key, exc)
            return None, None
        self._l2._count("hits" if value is not None else "misses")
        return value, node

    def _replicas(self, chunk_id: str) -> list:
        """The chunk's home node in the local zone, then where a hedge goes:
        its home in each other zone, then the local zone's next node."""
        local = self._zones[0].ranked(chunk_id)
        out = local[:1]
        for z in self._zones[1:]:
            out += z.ranked(chunk_id)[:1]
        return out + local[1:2]

    def _l2_latency(self, seconds: float) -> None:
        """Note an L2 hit's latency; the hedge threshold follows them."""
        self._l2_latencies.append(seconds)
        if self._hedge_after and len(self._l2_latencies) % 16 == 0:
            recent = sorted(self._l2_latencies)
            self._hedge_at = max(self._hedge_after, recent[len(recent) * HEDGE_PERCENTILE // 100])

    async def _l2_get(self, chunk_id: str, hedge: bool = True):
        """(stored bytes, node) from the first replica that has them; (None,
        a node) on a miss, (None, None) when no replica answered. hedge:
        ask the next replica too when the first is slower than the hedge
        threshold (else only when it fails or misses)."""
        nodes = self._replicas(chunk_id)
        if not nodes:
            self._l2._count("errors")
            return None, None
        pending = {asyncio.ensure_future(self._l2_one(nodes[0], chunk_id))}
        rest = nodes[1:]
        answered = None
        try:
            while pending:
                timeout = self._hedge_at if rest and hedge else None
                done, pending = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if not done:  # slow: hedge to the next replica
                    with self._lock:
                        self.hedged["l2"] += 1
                    if self._on_fetch is not None:
                        self._on_fetch("l2", timeout, "hedged", 0)
                    pending.add(asyncio.ensure_future(self._l2_one(rest.pop(0), chunk_id)))
                    continue
                for d in done:
                    value, node = d.result()
                    if value is not None:
                        return value, node
                    answered = answered or node
                if not pending and rest and answered is None:  # the home node failed: another replica
                    pending.add(asyncio.ensure_future(self._l2_one(rest.pop(0), chunk_id)))
            return None, answered
        finally:
            for p in pending:
                p.cancel()

    # -- endings ---------------------------------------------------------------------

    def _write_l1(self, chunk_id: str, data) -> None:
        """Off the loop: L1 is a disk."""
        if self._l1 is None:
            return
        if self._io is None:
            self._io = ThreadPoolExecutor(1, thread_name_prefix="restore-l1w", initializer=_idle_priority)
        self._io.submit(self._write_l1_logged, chunk_id, data)

    def _write_l1_logged(self, chunk_id: str, data) -> None:
        try:
            self._write_l1_now(chunk_id, data)
        except Exception:  # noqa: BLE001 - nobody waits on the executor's future
            log.exception("%s: L1 write of %s", self._label, chunk_id)
