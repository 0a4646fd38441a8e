"""RestoreSession: one guest, one engine, its fetchers, its fault log.

A session takes a guest's userfaultfd (already through the API handshake,
its regions registered MISSING) and serves every page fault from the
snapshot through the C engine (csrc/engine.h): zero pages without a fetch,
chunks from L1 read and decoded in C, the rest through fetcher threads.
When the guest goes away the session ends; its fault log (first touches,
in order) is saved beside the snapshot as
``snapshots/<name>/<version>/sessions/<session id>.npy``.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import io
import logging
import os
import secrets
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Optional, Protocol, Sequence

import numpy as np

from ._native import ffi, lib
from .errors import check
from .asyncfetch import HEDGE_AFTER, AsyncFetchers
from .faultlog import LOG_DTYPE, NO_CHUNK, SOURCES
from .fetcher import Fetchers
from .objects import session_key
from .settings import (
    DEFAULT_FAULT_AROUND,
    DEFAULT_FETCHERS,
    DEFAULT_POLL_US,
    DEFAULT_PREFETCH_INFLIGHT,
    MEMFD_INSTALL_NAMES,
    check_session_settings,
)
from .snapshot import Snapshot
from .tiers.host import HostCache

log = logging.getLogger("restore.session")

DEFAULT_L1_THREADS = 2
# Upper bounds (ns) of the buckets SessionStats.service_hist counts demand
# faults in; a last bucket takes the rest. From a fault-around install of
# a decoded chunk (a few us) to a slow durable fetch (seconds).
SERVICE_BUCKETS_NS = (2_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
                      2_500_000, 5_000_000, 10_000_000, 25_000_000, 50_000_000, 100_000_000,
                      250_000_000, 1_000_000_000)
MEMFD_INSTALLS = {"copy": lib.RS_MEMFD_COPY, "continue": lib.RS_MEMFD_CONTINUE}
assert tuple(MEMFD_INSTALLS) == MEMFD_INSTALL_NAMES
# Why a session ended (RS_END_*), as SessionStats.ended_by says it.
END_REASONS = {
    lib.RS_END_RUNNING: "running",
    lib.RS_END_STOPPED: "stopped",
    lib.RS_END_VMM_EXITED: "vmm exited",
    lib.RS_END_CONN_CLOSED: "connection closed",
    lib.RS_END_MEMORY_GONE: "memory gone",
    lib.RS_END_ERROR: "error",
    lib.RS_END_UNSERVABLE: "unservable page",
}
# Endings that mean the VMM went away by itself.
VMM_GONE = frozenset({"vmm exited", "connection closed", "memory gone"})


@functools.cache
def kernel_can_poison() -> bool:
    """Whether this kernel has UFFDIO_POISON (Linux >= 6.6), asked once per
    process: UFFDIO_API on a fresh userfaultfd reports the kernel's
    features. When no userfaultfd can be made here to ask, True: a poison
    that fails with EINVAL at run time is handled the same way."""
    from .uffd import Feature, UffdUnavailable, probe_features

    try:
        return bool(probe_features() & Feature.POISON)
    except UffdUnavailable:
        return True


@dataclass(frozen=True)
class Unservable:
    """The first page a session could neither serve nor poison, and what
    was done about it."""

    addr: int  # host address in the VMM
    chunk: Optional[int]  # its chunk; None: outside the guest's regions
    error: int  # errno: why it could not be poisoned (EOPNOTSUPP: no UFFDIO_POISON)
    killed: bool  # the engine killed the VMM through its pidfd
    kill_error: int  # errno of that kill when it failed (EBADF: no pidfd), else 0


class RegionLike(Protocol):
    base: int  # host virtual address
    size: int  # bytes
    offset: int  # offset in the memory file, bytes


@dataclass(frozen=True)
class SessionStats:
    """What a session did. Latencies are the engine's service time per
    first touch (event read to page installed), in ns."""

    faults: int
    minor_faults: int  # page in the memfd but not mapped: answered by UFFDIO_CONTINUE
    memfd_written: int  # pages written into the guest's memfd ("continue" installs)
    first_touches: dict[str, int]
    pages_installed: int
    bytes_installed: int
    chunks_l1: int
    chunks_fetched: int
    chunks_host: int  # chunks taken from the host cache as they were: no read, no decode
    host_fills: int  # chunks this session decoded into the host cache
    host_waits: int  # chunks another session or process was filling: waited for, then taken
    host_errors: int  # host cache failures (the chunk was served from memory instead)
    chunks_failed: int
    chunks_released: int  # decoded copies freed once every page of theirs was in
    chunks_reloaded: int  # released chunks loaded again for a late fault
    l1_misses: int
    l1_bad: int
    supply_rejected: int
    removes: int
    eexist: int
    deferred: int
    poisoned: int
    log_dropped: int
    parked_now: int  # faults waiting on chunks when the figures were read
    parked_remote_now: int  # of which on chunks with the network fetchers (L2, durable)
    guest_gone: bool
    error: int  # -errno of the first unexpected failure, 0 if none
    service_p50_ns: int
    service_p99_ns: int
    service_max_ns: int
    service_hist: tuple[int, ...]  # demand faults per SERVICE_BUCKETS_NS bucket, then the rest
    service_sum_ns: int  # of all demand faults' service times
    tiers: dict  # per network tier: requests, hits, bad, errors, p50/p99/max ms
    prefetch_chunks: int  # chunks the plan asked for
    prefetch_pages: int  # pages the prefetch installed
    faults_planned: int  # first touches of planned pages that still faulted
    faults_unplanned: int  # first touches of pages not in the plan
    prefetch_done: bool  # every planned chunk asked for and settled
    # Thread time per phase, ns (threads overlap: a breakdown, not a wall clock).
    l1_read_ns: int  # reading L1 files
    decode_ns: int  # verifying and decoding chunks
    install_ns: int  # install ioctls (demand and prefetch)
    prefetch_install_ns: int  # of which the prefetch's
    host_fill_ns: int  # writing decoded chunks into the host cache
    poll_ns: int  # service thread CPU time spent looking for the next fault without sleeping (poll_us)
    poll_hits: int  # events it found that way
    conn_closed: int = 0  # 1: the connection closed and the session went on (a pidfd tracked the VMM)
    vmm_killed: int = 0  # 1: the engine killed the VMM, a page it could neither serve nor poison
    ended_by: str = "running"  # END_REASONS


# SessionStats fields copied as they are from rs_engine_stats (same names).
_ENGINE_COUNTERS = tuple(
    name for name, _ in ffi.typeof("rs_engine_stats").fields
    if name in {f.name for f in dataclasses.fields(SessionStats)}
    and name not in ("first_touches", "guest_gone", "prefetch_done")
)
_NOT_COUNTERS = ("parked_now", "parked_remote_now", "error", "ended_by")


def new_session_id() -> str:
    """UTC start time to the microsecond, then a random tag: ids sort in
    start order (rebuilding a plan takes the newest sessions)."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ") + "-" + secrets.token_hex(3)


class RestoreSession:
    """Serve one guest from a snapshot.

    uffd: the guest's userfaultfd (O_NONBLOCK; API done; regions registered).
    regions: the guest's regions (base, size, offset), page_size: the
    guest's page size in bytes. conn_fd: the guest's connection, whose EOF
    ends the session (-1: none). The caller keeps owning uffd and conn_fd
    and closes them after close(). l1: the L1 cache read by the engine and
    written by the fetchers (None: no L1). l2: an L2Cluster the fetchers
    read before the durable store (None: no L2). fault_around: pages installed
    per fault at most. persist_log: save the fault log to the store on close.
    plan: file offsets to prefetch, in order (restore/workingset.py), with
    prefetch_inflight chunk requests at a time; None: demand paging only.
    memfd: the memfd holding the guest's memory when the guest sent one
    (regions mapped shared at their file offsets, registered MISSING|MINOR;
    see rs_engine_set_memfd), owned by the caller like uffd; -1: anonymous
    memory. memfd_install: how pages go into it, "copy" (UFFDIO_COPY, the
    default: measured faster here, see bench/test_bench_prefetch.py) or
    "continue" (write the bytes into the memfd, map them with
    UFFDIO_CONTINUE). on_fetch: told of every request to a network tier
    (see restore.fetcher.Fetchers), e.g. for metrics. host_cache: the
    host's cache of decoded chunks (restore.tiers.host.HostCache), read and
    filled by the engine; None: chunks are decoded for this session alone.
    When the version's host cache cannot be opened (its files belong to a
    crashed host and other sessions still hold them), the session runs
    without it and says so in the log. poll_us: after serving a fault, the
    service thread keeps looking for the next one this long (us) before it
    sleeps (0: never). prefetch_around: pages the prefetch installs around
    each planned page, the fault-around the plan's sessions were recorded
    with (1: they logged every page; None: fault_around).

    pidfd: a pidfd of the VMM (restore.protocol.peer_pidfd), owned by the
    caller like uffd; -1: none. With one, the VMM's exit ends the session
    and the connection's end does not (Firecracker v1.10 and v1.11 close it
    right after the handshake); a page that can be neither served nor
    poisoned kills the VMM through it. poison: whether the kernel has
    UFFDIO_POISON; None: asked of the kernel once per process
    (kernel_can_poison); False: behave as on a kernel without it (before
    Linux 6.6), e.g. to test that path: a page that cannot be served (a
    chunk no tier supplies, a fault outside the regions) kills the VMM
    instead of poisoning the page, since its fault could never be answered.

    fetch_loop: fetch from L2 and the durable tier in one asyncio loop
    (restore.asyncfetch: ``fetchers`` prefetch chunks in flight at most,
    demand chunks at once; L2 reads a fault waits on hedged after
    hedge_after seconds at least, None: never); False: a pool of
    ``fetchers`` threads (restore.fetcher).
    """

    def __init__(
        self,
        snapshot: Snapshot,
        uffd: int,
        regions: Sequence[RegionLike],
        page_size: int,
        *,
        conn_fd: int = -1,
        l1=None,
        l2=None,
        fault_around: int = DEFAULT_FAULT_AROUND,
        fetchers: int = DEFAULT_FETCHERS,
        l1_threads: int = DEFAULT_L1_THREADS,
        session_id: Optional[str] = None,
        persist_log: bool = True,
        plan: Optional[np.ndarray] = None,
        prefetch_inflight: int = DEFAULT_PREFETCH_INFLIGHT,
        memfd: int = -1,
        memfd_install: str = "copy",
        on_fetch: Optional[Callable[[str, float, str, int], None]] = None,
        host_cache: Optional[HostCache] = None,
        poll_us: int = DEFAULT_POLL_US,
        prefetch_around: Optional[int] = None,
        pidfd: int = -1,
        poison: Optional[bool] = None,
        fetch_loop: bool = True,
        hedge_after: Optional[float] = HEDGE_AFTER,
        start: bool = True,
    ):
        check_session_settings(fault_around=fault_around, fetchers=fetchers, poll_us=poll_us,
                               memfd_install=memfd_install, prefetch_around=prefetch_around,
                               prefetch_inflight=prefetch_inflight)
        local = l1 is not None or host_cache is not None
        m = snapshot.manifest
        self.snapshot = snapshot
        self.session_id = session_id or new_session_id()
        self.label = f"session {self.session_id} of {snapshot.label}"
        self.page_size = page_size
        self.persist_log = persist_log
        self._closed = False
        self._lock = threading.Lock()  # close() runs once
        # Held to read the engine's counters and to free the engine: a
        # counters() call waits only for that, not for close()'s joins.
        self._engine_lock = threading.Lock()
        self.log_key: Optional[str] = None
        self.poison = kernel_can_poison() if poison is None else bool(poison)

        tables = snapshot.page_tables(page_size)
        chunks = snapshot.chunk_table()
        cfg = ffi.new(
            "rs_engine_config *",
            {
                "memory_size": m.memory_size,
                "chunk_size": m.chunk_size,
                "page_size": page_size,
                "n_chunks": len(m.chunks),
                "fault_around": fault_around,
                "l1_threads": l1_threads if local else 0,
                "log_capacity": 0,
                "poll_us": poll_us,
                "prefetch_around": prefetch_around or 0,
                "no_poison": 0 if self.poison else 1,
            },
        )
        regs = ffi.new("rs_engine_region[]", [{"base": r.base, "size": r.size, "offset": r.offset} for r in regions])
        # The engine borrows the version's tables (shared by its sessions):
        # these views keep them alive as long as the engine.
        self._borrowed = (
            ffi.from_buffer("uint32_t[]", tables[0]) if tables else ffi.NULL,
            ffi.from_buffer("uint32_t[]", tables[1]) if tables else ffi.NULL,
            ffi.from_buffer("uint8_t[]", chunks.ids),
            ffi.from_buffer("uint32_t[]", chunks.lens),
            ffi.from_buffer("uint32_t[]", chunks.flags),
            ffi.from_buffer("uint8_t[]", chunks.zero),
        )
        out = ffi.new("rs_engine **")
        check(
            lib.rs_engine_create(
                out,
                cfg,
                snapshot.codec.handle(),
                regs,
                len(regions),
                *self._borrowed,
                os.fsencode(str(l1.root)) if l1 is not None else ffi.NULL,
            ),
            "rs_engine_create",
            self.label,
        )
        # The engine's one owner: freed by close(), or by the garbage
        # collector if a session is dropped unclosed; the destructor holds
        # what the engine borrows (the codec, the tables) until then.
        keep = (snapshot.codec, self._borrowed)
        self._engine = ffi.gc(out[0], lambda e, keep=keep: lib.rs_engine_destroy(e))
        self._fetchers = None
        try:
            if plan is not None and len(plan):
                pages = np.ascontiguousarray(np.asarray(plan, dtype=np.uint64) // page_size)
                check(
                    lib.rs_engine_set_plan(self._engine, ffi.from_buffer("uint64_t[]", pages), len(pages), prefetch_inflight),
                    "rs_engine_set_plan",
                    self.label,
                )
            if host_cache is not None:
                self._open_host_cache(host_cache)
            if memfd >= 0:
                check(lib.rs_engine_set_memfd(self._engine, memfd, MEMFD_INSTALLS[memfd_install]),
                      "rs_engine_set_memfd", self.label)
            if pidfd >= 0:
                check(lib.rs_engine_set_vmm(self._engine, pidfd), "rs_engine_set_vmm", self.label)
            if fetch_loop:
                self._fetchers = AsyncFetchers(self._engine, m, snapshot.store, l1, fetchers, self.label, l2=l2,
                                               on_fetch=on_fetch, hedge_after=hedge_after)
            else:
                self._fetchers = Fetchers(self._engine, m, snapshot.store, l1, fetchers, self.label, l2=l2,
                                         on_fetch=on_fetch)
        except BaseException:
            self._abandon()
            raise
        self._fds = (uffd, conn_fd)
        if start:
            self.start()

    def start(self) -> None:
        """Start serving faults. The constructor does, unless given
        start=False: then a caller that must know of the session before
        its first fault (a handler's gauges and counters) registers it,
        then starts it. If it cannot start, the session is closed (without
        stats) and the error raised."""
        try:
            check(lib.rs_engine_start(self._engine, *self._fds), "rs_engine_start", self.label)
            self._fetchers.start()
        except BaseException:
            self._abandon()
            raise

    def _abandon(self) -> None:
        """Nothing left running: the engine's threads stopped, whatever
        fetch threads had started joined, then the engine freed."""
        lib.rs_engine_stop(self._engine)
        if self._fetchers is not None:
            self._fetchers.join()
        with self._engine_lock:
            self._final_counters = self._read_counters()  # for counters() of a session that never started
            self._closed = True
            ffi.release(self._engine)
            self._engine = None

    def _open_host_cache(self, host_cache: HostCache) -> None:
        """Serve from and fill the host cache; a host cache that cannot be
        used costs speed, never the restore: log it and go on without."""
        for _ in range(3):  # a version evicted between mkdir and open is made again
            try:
                path, vid = host_cache.open_version(self.snapshot.manifest)
            except OSError as exc:
                log.warning("%s: host cache %s cannot be used (%s): serving without it", self.label,
                            host_cache.root, exc.strerror or exc)
                return
            rc = lib.rs_engine_set_host_cache(self._engine, os.fsencode(str(path)), vid)
            if rc != -errno.ENOENT:
                break
        if rc == -errno.EBUSY:
            log.warning("%s: host cache %s holds bytes of another boot or geometry and is in use by other "
                        "sessions: serving without it", self.label, path)
        elif rc < 0:
            log.warning("%s: host cache %s cannot be used (%s): serving without it", self.label, path,
                        os.strerror(-rc))

    # -- running ----------------------------------------------------------
    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the guest goes away; True if it has (False on timeout)."""
        ms = -1 if timeout is None else max(0, int(timeout * 1000))
        return bool(lib.rs_engine_wait(self._handle(), ms))

    def _handle(self):
        if self._closed:
            raise ValueError(f"{self.label} is closed")
        return self._engine

    @property
    def errors(self) -> list[str]:
        """One line per chunk the fetchers gave up on (its pages poisoned)."""
        return list(self._fetchers.errors)

    def unservable(self) -> Optional[Unservable]:
        """The first page the session could neither serve nor poison, or
        None; readable after close()."""
        if self._closed:
            return self._unservable
        st = ffi.new("rs_engine_stats *")
        lib.rs_engine_get_stats(self._handle(), st)
        if not st.kill_error:
            return None
        return Unservable(int(st.kill_addr), None if st.kill_chunk == NO_CHUNK else int(st.kill_chunk),
                          -int(st.kill_error), bool(st.vmm_killed), -int(st.kill_result))

    def chunk_error(self, chunk: int) -> Optional[str]:
        """Why the fetchers gave up on chunk, or None."""
        return self._fetchers.reasons.get(chunk)

    def conn_closed(self) -> bool:
        """True once the connection closed while the session went on
        (cheap: for polling)."""
        st = ffi.new("rs_engine_stats *")
        lib.rs_engine_get_stats(self._handle(), st)
        return bool(st.conn_closed)

    def prefetch_done(self) -> bool:
        """True once the plan's chunks have all been asked for and settled
        (cheap: for polling)."""
        st = ffi.new("rs_engine_stats *")
        lib.rs_engine_get_stats(self._handle(), st)
        return bool(st.prefetch_done)

    def wait_prefetch(self, timeout: Optional[float] = None) -> bool:
        """Block until prefetch_done(); False on timeout, without a plan, or
        when the guest went away or the engine stopped first."""
        ms = -1 if timeout is None else max(0, int(timeout * 1000))
        return bool(lib.rs_engine_wait_prefetch(self._handle(), ms))

    def counters(self) -> dict[str, int]:
        """The engine's counters now (cheap: for polling, e.g. by a metrics
        scrape): the counting fields of SessionStats that come from the
        engine (faults, pages_installed, chunks_l1, ..., each only grows),
        and "first_touches.<source>" per SOURCES. After close(), their
        final values."""
        with self._engine_lock:
            return dict(self._final_counters) if self._closed else self._read_counters()

    def parked(self) -> dict[str, int]:
        """Faults waiting right now (cheap: for polling): "faults" on any
        chunk, "on_network" on chunks handed to the network fetchers (L2,
        the durable store), i.e. waiting on a fetch in flight or queued.
        After close(), both 0."""
        with self._engine_lock:
            if self._closed:
                return {"faults": 0, "on_network": 0}
            st = ffi.new("rs_engine_stats *")
            lib.rs_engine_get_stats(self._engine, st)
            return {"faults": int(st.parked_now), "on_network": int(st.parked_remote_now)}

    def _read_counters(self) -> dict[str, int]:
        st = ffi.new("rs_engine_stats *")
        lib.rs_engine_get_stats(self._engine, st)
        out = {name: int(getattr(st, name)) for name in _ENGINE_COUNTERS if name not in _NOT_COUNTERS}
        out.update((f"first_touches.{name}", int(st.first_touches[i])) for i, name in enumerate(SOURCES))
        return out

    def fault_log(self) -> np.ndarray:
        """First touches so far, in arrival order (LOG_DTYPE); after
        close(), the whole log."""
        if self._closed:
            return self._records
        eng = self._handle()
        st = ffi.new("rs_engine_stats *")
        lib.rs_engine_get_stats(eng, st)
        cap = int(sum(st.first_touches)) + 64
        buf = np.zeros(cap, dtype=LOG_DTYPE)
        n = lib.rs_engine_log_read(eng, ffi.cast("rs_fault_record *", ffi.from_buffer(buf)), cap)
        recs = buf[:n]
        return recs[np.argsort(recs["t_ns"], kind="stable")]

    def stats(self, records: Optional[np.ndarray] = None) -> SessionStats:
        """The session's figures; records: its fault log if the caller has
        just read it (else it is read here)."""
        st = ffi.new("rs_engine_stats *")
        lib.rs_engine_get_stats(self._handle(), st)
        records = self.fault_log() if records is None else records
        # Prefetched pages are logged at install, with no service time.
        svc = records["service_ns"][records["source"] != SOURCES.index("prefetched")]
        p50, p99, mx = (int(np.percentile(svc, q)) for q in (50, 99, 100)) if len(svc) else (0, 0, 0)
        hist = np.bincount(np.searchsorted(SERVICE_BUCKETS_NS, svc), minlength=len(SERVICE_BUCKETS_NS) + 1)
        return SessionStats(
            **{name: getattr(st, name) for name in _ENGINE_COUNTERS},
            first_touches={name: int(st.first_touches[i]) for i, name in enumerate(SOURCES)},
            guest_gone=bool(st.guest_gone),
            prefetch_done=bool(st.prefetch_done),
            ended_by=END_REASONS.get(st.end_reason, str(st.end_reason)),
            service_p50_ns=p50,
            service_p99_ns=p99,
            service_max_ns=mx,
            service_hist=tuple(int(n) for n in hist),
            service_sum_ns=int(svc.sum(dtype=np.uint64)),
            tiers=self._fetchers.tier_summary(),
        )

    def prefetched_offsets(self) -> np.ndarray:
        """File offsets (uint64, ascending) of the pages the prefetch
        installed, fault-around runs included; readable after close()."""
        if self._closed:
            return self._prefetched
        st = ffi.new("rs_engine_stats *")
        lib.rs_engine_get_stats(self._handle(), st)
        pages = np.zeros(int(st.prefetch_pages), dtype=np.uint64)
        n = lib.rs_engine_prefetched(self._handle(), ffi.cast("uint64_t *", ffi.from_buffer(pages)), len(pages))
        return pages[:n] * np.uint64(self.page_size)

    # -- ending -------------------------------------------------------------
    def close(self) -> Optional[SessionStats]:
        """Stop the engine and the fetchers, save the fault log, free the
        engine. Returns the final stats (None if already closed)."""
        with self._lock:
            if self._closed:
                return None
            lib.rs_engine_stop(self._engine)
            self._fetchers.join()
            records = self.fault_log()
            final = self.stats(records)
            self._prefetched = self.prefetched_offsets()
            self._unservable = self.unservable()
            self._records = records
            with self._engine_lock:
                self._final_counters = self._read_counters()
                self._closed = True
                ffi.release(self._engine)
                self._engine = None
        if self.persist_log:
            self.log_key = self._save_log(records)
        return final

    def __enter__(self) -> "RestoreSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _save_log(self, records: np.ndarray) -> Optional[str]:
        m = self.snapshot.manifest
        key = session_key(m.name, m.version, self.session_id)
        buf = io.BytesIO()
        np.save(buf, records, allow_pickle=False)
        try:
            self.snapshot.store.put(key, buf.getvalue())
        except Exception as exc:  # the restore happened; losing its log is a warning
            log.warning("%s: could not save the fault log to %s: %s", self.label, key, exc)
            return None
        return key


def prefetch_usage(prefetched: np.ndarray, touched: np.ndarray) -> tuple[int, int]:
    """(useful, wasted): how many of the prefetched file offsets (from
    RestoreSession.prefetched_offsets) the guest touched / never touched,
    given the page-aligned file offsets it touched.

    The engine cannot count these itself: a touch of a page already present
    raises no userfaultfd event, and this kernel keeps no per-page accessed
    bit readable from here, so the caller brings what the guest touched (a
    test guest's trace, a benchmark's workload)."""
    useful = int(np.isin(prefetched, np.asarray(touched, dtype=np.uint64)).sum())
    return useful, len(prefetched) - useful
