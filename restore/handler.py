"""The page-fault handler server: Firecracker's UFFD protocol over a Unix socket.

``Server`` listens on a Unix stream socket (mode 0600), or on several
(restore.listen.Listen: one per jail, each with its own owner, mode and
allowed uids; a connection is checked against the socket it came on), and
serves as its ServerSettings (restore.settings) say. Each connection is one
guest: the handshake (restore/protocol.py) checks the peer's uid and brings
the guest's regions and its userfaultfd, or raises a HandshakeError that
says whether to kill the VMM; the plan comes from a PlanPolicy
(restore/workingset.py); a RestoreSession then serves the guest's faults
from the snapshot until the guest goes away; the session's fault log is
saved and the server goes on. The VMM is tracked by a pidfd of the peer
(SO_PEERPIDFD, else pidfd_open of its SO_PEERCRED pid): its exit ends the
session, and a connection closed after the handshake (Firecracker v1.10 and
v1.11 close it; v1.12 keeps it open) does not. Without a pidfd (a peer in
this process, or no pidfds here) the connection's end ends the session. A
guest whose handshake is refused is told nothing (the protocol has no
reply): the reason is logged, its connection closed, and its VMM killed
(through its pidfd, else by pid; ServerSettings.kill_refused), since a VMM
whose memory nobody serves would hang at its first fault. So is a VMM whose
session ends in error while it runs. Other guests are not affected.

Several servers (for different snapshots) may run in one process: a server
holds all of its state.

Stopping (``stop``, or SIGTERM in ``restore serve``): no new guests are
accepted; running guests get ServerSettings.drain_timeout seconds to finish;
a guest still running then is killed (its VMM, through its pidfd), since a
guest left without its fault handler would hang forever.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import selectors
import socket
import threading
import time
import weakref
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from .errors import InputError, RestoreError
from .protocol import Handshake, HandshakeError, accept_handshake, peer_credentials, peer_pidfd
from .listen import Listen, check_listens, close_listeners, open_listeners
from .session import SERVICE_BUCKETS_NS, VMM_GONE, RestoreSession, SessionStats, prefetch_usage
from .settings import ServerSettings
from .snapshot import Snapshot
from .threads import spawn
from .tiers.host import HostCache
from .tiers.l1 import L1Cache
from .tiers.l2 import L2Cluster
from .vmm import kill_vmm
from .workingset import PlanPolicy

log = logging.getLogger("restore.handler")
# The server's start-up lines ("serving ... on ..."), one per socket: the
# logger `restore serve` shows at INFO even without --verbose.
start_log = logging.getLogger("restore.serve")

HANDSHAKE_TIMEOUT = 5.0  # seconds a connected peer has to send its handshake
WAIT_SLICE = 0.2  # seconds between looks at the stop flag
SUMMARIES_KEPT = 256  # Server.summaries and Server.refused: the most recent


@dataclass(frozen=True)
class SessionSummary:
    """What the server reports when a session ends."""

    session_id: str
    peer_pid: int
    stats: SessionStats
    log_key: Optional[str]
    errors: list[str]
    prefetched_pages: np.ndarray  # guest page indices the prefetch installed (uint32, ascending)
    page_size: int
    audit: Optional[tuple[int, int]] = None  # an audit session: (useful, wasted) pages of the plan

    @property
    def prefetched(self) -> np.ndarray:
        """File offsets the prefetch installed (RestoreSession.prefetched_offsets)."""
        return self.prefetched_pages.astype(np.uint64) * np.uint64(self.page_size)


class Server:
    """Serve guests of one snapshot on one or more Unix sockets.

    snapshot: the opened snapshot (its codec and store are shared by the
    sessions). sockets: a path (served to this process's uid, mode 0600),
    a restore.listen.Listen, or a list of them (e.g. one per jail, each
    with its own owner, mode and allowed uids); each connection is checked
    against the allowed uids of the socket it came on, and others are hung
    up on before anything is read from them. socket_path (the attribute) is
    the first socket's path. settings: how guests are served
    (restore.settings.ServerSettings).

    Tiers: l1: the L1 cache (None: no L1). l2: the memcached L2 (None: no
    L2). host_cache: the host's cache of decoded chunks
    (restore.tiers.host), shared with every other server on the host; past
    its budget, versions no session uses are evicted when a session ends.
    None: each session decodes what it needs for itself.

    Hooks: on_session_end: called with a SessionSummary when a session
    ends (for tests and the CLI). on_peer: called with ("start", pid) when
    a peer connects and ("end", pid) when the server is done with it (a
    supervisor tracks the VMMs it must kill if this process dies).
    on_fetch: told of every request its sessions make to a network tier
    (see restore.fetchbase.FetchBase). listener: already listening sockets (a
    supervisor's), one per socket in order, to accept on instead of
    binding; they are left bound when the server stops.
    """

    def __init__(
        self,
        snapshot: Snapshot,
        sockets: str | os.PathLike | Listen | Sequence[Listen],
        settings: ServerSettings = ServerSettings(),
        *,
        l1: Optional[L1Cache] = None,
        l2: Optional[L2Cluster] = None,
        host_cache: Optional[HostCache] = None,
        on_session_end: Optional[Callable[[SessionSummary], None]] = None,
        on_peer: Optional[Callable[[str, int], None]] = None,
        on_fetch: Optional[Callable[[str, float, str, int], None]] = None,
        listener: Optional[socket.socket | Sequence[socket.socket]] = None,
    ):
        if not isinstance(settings, ServerSettings):
            raise InputError(f"settings must be a ServerSettings, got {type(settings).__name__}")
        self.snapshot = snapshot
        self.settings = settings
        if isinstance(sockets, (str, os.PathLike)):
            sockets = [Listen(os.fspath(sockets))]
        elif isinstance(sockets, Listen):
            sockets = [sockets]
        self.listens: list[Listen] = check_listens(sockets)
        self.socket_path = self.listens[0].path
        self.l1 = l1
        self.l2 = l2
        self.host_cache = host_cache
        # Which plan each session replays, and when it is rebuilt.
        self._plans = PlanPolicy(snapshot.store, snapshot.manifest, fault_around=settings.fault_around,
                                 record_fault_around=settings.record_fault_around, use_plan=settings.use_plan,
                                 rebuild_after=settings.rebuild_plan_after, sessions=settings.plan_sessions,
                                 audit_every=settings.audit_every)
        self.on_session_end = on_session_end
        self.on_fetch = on_fetch
        self.on_peer = on_peer
        self.summaries: deque[SessionSummary] = deque(maxlen=SUMMARIES_KEPT)
        self.refused: deque[str] = deque(maxlen=SUMMARIES_KEPT)  # one line per refused guest
        # Totals of the sessions that ended (counters()); guarded by _lock.
        self._ended: Counter[str] = Counter()
        self._service_hist = np.zeros(len(SERVICE_BUCKETS_NS) + 1, dtype=np.int64)
        self._service_sum_ns = 0
        self._stopping = threading.Event()
        self._drain_deadline = float("inf")
        self._lock = threading.Lock()
        self._active: dict[int, tuple[RestoreSession, int]] = {}  # id -> (session, peer pid)
        self._threads: list[threading.Event] = []  # one per guest thread, set when it ends
        self._owns_listener = listener is None
        if listener is None:
            self._listeners = open_listeners(self.listens)
        else:
            self._listeners = [listener] if isinstance(listener, socket.socket) else list(listener)
            if len(self._listeners) != len(self.listens):
                raise InputError(f"{len(self._listeners)} listening sockets given for {len(self.listens)} sockets")
        # Made here, not in serve_forever: a server's fds all exist once it
        # is constructed.
        self._selector = selectors.DefaultSelector()
        for sock, lst in zip(self._listeners, self.listens):
            sock.setblocking(False)  # accepted when select() says so; a vanished peer is no hang
            self._selector.register(sock, selectors.EVENT_READ, lst)
        # The socket each connection came on, until its guest is checked.
        self._came_on: "weakref.WeakKeyDictionary[socket.socket, Listen]" = weakref.WeakKeyDictionary()
        self._accept_thread: Optional[threading.Thread] = None

    # -- socket -------------------------------------------------------------
    # -- running ------------------------------------------------------------
    def start(self) -> "Server":
        """Accept guests on a background thread; returns self."""
        self._accept_thread = threading.Thread(target=self.serve_forever, name="restore-accept", daemon=True)
        self._accept_thread.start()
        return self

    def serve_forever(self) -> None:
        """Accept guests on every socket until stop(); each gets its own thread."""
        for lst in self.listens:
            start_log.info("serving %s on %s (%s)", self.snapshot.label, lst.path, lst.describe(),
                           extra={"event": "serving", "snapshot": self.snapshot.label, "socket": lst.path,
                                  "owner": list(lst.owner) if lst.owner is not None else None,
                                  "mode": f"{lst.mode:04o}", "allowed_uids": sorted(lst.allowed)})
        while not self._stopping.is_set():
            try:
                ready = self._selector.select(WAIT_SLICE)  # wakes to see stop()
            except (OSError, ValueError):
                if self._stopping.is_set():
                    break
                raise
            for key, _ in ready:
                if self._stopping.is_set():
                    break
                try:
                    conn, _ = key.fileobj.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    continue  # the peer went away before we took it
                except OSError:
                    if self._stopping.is_set():
                        break
                    raise
                conn.setblocking(True)
                self._came_on[conn] = key.data
                # Not threading.Thread: its start() waits for the thread to
                # run, and this guest's first fault waits for all of that.
                with self._lock:
                    self._threads = [x for x in self._threads if not x.is_set()] + [spawn(self._guest, conn)]

    def active(self) -> int:
        """Guests being served now."""
        with self._lock:
            return len(self._active)

    def counters(self) -> dict[str, int]:
        """Totals over every session this server has served, the running
        ones included (RestoreSession.counters, summed), plus
        "sessions_ended", "sessions_refused", "sessions_active", "audits",
        "prefetch_useful_pages" and "prefetch_wasted_pages" (from audits).
        Counters only grow: an ending session's figures move from the
        running sum to the ended totals in one step."""
        with self._lock:
            total = Counter(self._ended)
            for session, _ in self._active.values():
                total.update(session.counters())
            total["sessions_active"] = len(self._active)
        return dict(total)

    def parked(self) -> dict[str, int]:
        """Faults its running sessions have waiting right now, summed
        (RestoreSession.parked: "faults", "on_network"). A gauge, not a
        counter: for a test or an operator to see that faults wait on a
        fetch at this moment."""
        with self._lock:
            total = Counter({"faults": 0, "on_network": 0})
            for session, _ in self._active.values():
                total.update(session.parked())
        return dict(total)

    def service_histogram(self) -> tuple[tuple[int, ...], list[int], int]:
        """Demand-fault service times of the ended sessions: (bucket upper
        bounds in ns, counts per bucket with one more for the rest, sum ns)."""
        with self._lock:
            return SERVICE_BUCKETS_NS, self._service_hist.tolist(), self._service_sum_ns

    def _guest(self, conn: socket.socket) -> None:
        pid = self._peer_pid(conn)
        pidfd = peer_pidfd(conn, pid)  # -1: none (a peer in this process, or no pidfds)
        if self.on_peer:
            self.on_peer("start", pid)
        try:
            self._serve_guest(conn, pid, pidfd)
        except Exception as exc:  # a bug must not leave the guest hanging
            log.exception("internal error serving a guest")
            self._refuse(conn, pid, f"internal error: {exc!r}", pidfd=pidfd)
        finally:
            if pidfd >= 0:
                os.close(pidfd)
            if self.on_peer:
                self.on_peer("end", pid)

    @staticmethod
    def _peer_pid(conn: socket.socket) -> int:
        try:
            return peer_credentials(conn).pid
        except (OSError, RestoreError):
            return 0

    def _serve_guest(self, conn: socket.socket, pid: int, pidfd: int = -1) -> None:
        m = self.snapshot.manifest
        lst = self._came_on.pop(conn, None) or self.listens[0]
        try:
            hs = accept_handshake(
                conn,
                memory_size=m.memory_size,
                snapshot_page_size=m.page_size,
                chunk_size=m.chunk_size,
                allowed_uids=lst.allowed,
                socket_name=lst.path,
                timeout=HANDSHAKE_TIMEOUT,
            )
        except HandshakeError as exc:
            self._refuse(conn, pid, str(exc), kill=exc.kill, because=exc.because, pidfd=pidfd)
            return
        chosen = self._plans.choose()
        plan, audited = chosen.plan, chosen.audited  # audited: the plan an audit session scores
        cfg = self.settings
        try:
            session = RestoreSession(
                self.snapshot,
                hs.uffd,
                hs.regions,
                hs.page_size,
                conn_fd=conn.fileno(),
                l1=self.l1,
                l2=self.l2,
                fault_around=chosen.fault_around,
                fetchers=cfg.fetchers,
                persist_log=cfg.persist_logs,
                plan=plan,
                prefetch_inflight=cfg.prefetch_inflight,
                memfd=hs.memfd,
                memfd_install=cfg.memfd_install,
                on_fetch=self.on_fetch,
                host_cache=self.host_cache,
                poll_us=cfg.poll_us,
                # The plan came from sessions recorded with this fault-around.
                prefetch_around=cfg.record_fault_around,
                pidfd=pidfd,
                poison=cfg.poison,
                fetch_loop=cfg.fetch_loop,
                start=False,
            )
        except BaseException as exc:
            self._not_started(conn, pid, pidfd, hs, exc)
            return
        # Counted before its first fault: parked() and counters() see every
        # fault and fetch of the session.
        key = id(session)
        with self._lock:
            self._active[key] = (session, pid)
        try:
            session.start()
        except BaseException as exc:
            with self._lock:
                self._active.pop(key, None)
            self._not_started(conn, pid, pidfd, hs, exc)
            return
        log.info("guest pid %d: %s started (%d regions%s)", pid, session.label, len(hs.regions),
                 ", auditing the plan" if audited is not None else "",
                 extra={"event": "session_start", "session": session.session_id, "pid": pid,
                        "snapshot": self.snapshot.label, "plan": plan is not None, "audit": audited is not None})
        noted_conn = False  # the connection's end after the handshake was logged
        killed = False  # by _kill, at the drain timeout
        try:
            while not session.wait(WAIT_SLICE):
                if not noted_conn and pidfd >= 0 and session.conn_closed():
                    noted_conn = self._note_conn_closed(pid, session)
                if self._stopping.is_set() and self._drain_expired():
                    self._kill(pid, session, pidfd)
                    killed = True
                    break
        finally:
            stats = session.close()
            hs.close()
            conn.close()
            if stats.conn_closed and not noted_conn:
                self._note_conn_closed(pid, session)
            if not killed:
                self._kill_after_error(pid, pidfd, session, stats)
            audit = None
            if audited is not None:
                audit = prefetch_usage(audited, session.fault_log()["offset"])
            with self._lock:
                self._active.pop(key, None)
                self._ended.update(session.counters())
                self._ended["sessions_ended"] += 1
                self._service_hist += stats.service_hist
                self._service_sum_ns += stats.service_sum_ns
                if audit is not None:
                    self._ended.update(audits=1, prefetch_useful_pages=audit[0], prefetch_wasted_pages=audit[1])
        if audit is not None:
            log.info("%s: audit of the plan: %d of its pages used, %d never touched", session.label, *audit,
                     extra={"event": "plan_audit", "session": session.session_id, "useful": audit[0],
                            "wasted": audit[1]})
        # Kept as page indices: a server holds its last SUMMARIES_KEPT
        # summaries, each in proportion to what its prefetch did (not to
        # the guest's memory).
        pages = (session.prefetched_offsets() // np.uint64(session.page_size)).astype(np.uint32)
        summary = SessionSummary(session.session_id, pid, stats, session.log_key, session.errors,
                                 pages, session.page_size, audit)
        self._plans.session_ended(recorded=session.log_key is not None)
        self._evict_host_cache()
        self.summaries.append(summary)
        log.info(
            "guest pid %d: %s ended: %d faults, %d pages installed, p50 %.1f us, log %s",
            pid,
            session.label,
            stats.faults,
            stats.pages_installed,
            stats.service_p50_ns / 1e3,
            summary.log_key,
            extra={"event": "session_end", "session": session.session_id, "pid": pid,
                   "snapshot": self.snapshot.label, "faults": stats.faults,
                   "pages_installed": stats.pages_installed, "first_touches": stats.first_touches,
                   "prefetch_pages": stats.prefetch_pages, "service_p50_ns": stats.service_p50_ns,
                   "chunks": {"host": stats.chunks_host, "l1": stats.chunks_l1, "fetched": stats.chunks_fetched,
                              "host_fills": stats.host_fills, "host_waits": stats.host_waits},
                   "service_p99_ns": stats.service_p99_ns, "errors": len(summary.errors),
                   "log_key": summary.log_key},
        )
        if self.on_session_end:
            self.on_session_end(summary)

    def _evict_host_cache(self) -> None:
        """Versions no session uses are evicted past the host cache's budget
        when a session ends (a version in use never is)."""
        if self.host_cache is None:
            return
        try:
            freed = self.host_cache.evict_if_over()
        except OSError as exc:
            log.error("host cache %s: eviction failed: %s", self.host_cache.root, exc)
            return
        if freed:
            log.info("host cache %s: evicted %d MiB of unused versions", self.host_cache.root, freed >> 20,
                     extra={"event": "host_cache_evicted", "bytes": freed})

    def _not_started(self, conn: socket.socket, pid: int, pidfd: int, hs: Handshake, exc: BaseException) -> None:
        """A session that could not be made or started (it has stopped
        whatever it had started): close the handshake's fds and refuse the
        guest; an error other than a RestoreError is raised, for _guest to
        refuse as an internal error."""
        hs.close()
        if not isinstance(exc, RestoreError):
            raise exc
        self._refuse(conn, pid, str(exc), pidfd=pidfd)

    def _refuse(self, conn: socket.socket, pid: int, reason: str, kill: bool = True, pidfd: int = -1,
                because: str = "it cannot run without its page-fault handler") -> None:
        """Refuse a guest: log why, hang up, and kill its VMM (kill_refused;
        through pidfd when there is one, else by pid): a VMM whose memory is
        registered with a userfaultfd nobody serves would hang at its first
        fault. because: why it is killed, for the log. The connection is
        closed before the refusal is recorded, so whoever sees the record
        finds it closed."""
        try:
            conn.close()
        except OSError:
            pass
        line = f"refused guest pid {pid}: {reason}"
        if kill and self.settings.kill_refused and (pidfd >= 0 or (pid > 0 and pid != os.getpid())):
            failed = kill_vmm(pid, pidfd)
            if failed is None:
                line += f"; killed it, as {because}"
            elif failed != "gone":
                line += f"; COULD NOT KILL IT ({failed}), its guest will hang at its first fault"
        log.error(line, extra={"event": "refused", "pid": pid, "reason": reason})
        with self._lock:
            self.refused.append(line)
            self._ended["sessions_refused"] += 1

    # -- stopping -------------------------------------------------------------
    def _drain_expired(self) -> bool:
        return time.monotonic() >= self._drain_deadline

    def _kill(self, pid: int, session: RestoreSession, pidfd: int = -1) -> None:
        log.error(
            "%s: guest pid %d still running %.0f s after stop; killing it so it does not hang without its handler",
            session.label,
            pid,
            self.settings.drain_timeout,
        )
        failed = kill_vmm(pid, pidfd)
        if failed not in (None, "gone"):
            log.error("%s: could not kill guest pid %d (%s); it will hang at its next first touch",
                      session.label, pid, failed)

    @staticmethod
    def _vmm_alive(pidfd: int) -> bool:
        """Whether the process of pidfd still runs (a pidfd turns readable
        when it exits)."""
        p = select.poll()
        p.register(pidfd, select.POLLIN)
        return not p.poll(0)

    def _note_conn_closed(self, pid: int, session: RestoreSession) -> bool:
        log.info("guest pid %d: %s: connection closed after the handshake; serving until the VMM exits", pid,
                 session.label, extra={"event": "conn_closed", "session": session.session_id, "pid": pid})
        return True

    def _kill_after_error(self, pid: int, pidfd: int, session: RestoreSession, stats: SessionStats) -> None:
        """A session that ended while its VMM lives leaves the VMM without its
        page-fault handler: it would hang at its next first touch. Kill it,
        and log why: a page the engine could neither serve nor poison (the
        engine killed the VMM itself when it had a pidfd), or a session that
        ended in error (when the pidfd says the VMM runs on)."""
        bad = session.unservable()
        if bad is not None:
            if bad.chunk is None:
                where = "outside the regions its handshake described"
            else:
                where = f"chunk {bad.chunk}: {session.chunk_error(bad.chunk) or os.strerror(errno.EIO)}"
            if bad.error == errno.EOPNOTSUPP:
                why = "this kernel has no UFFDIO_POISON"
            else:
                why = f"UFFDIO_POISON failed ({os.strerror(bad.error)})"
            failed = None if bad.killed else kill_vmm(pid, pidfd)
            verb = "killed" if failed in (None, "gone") else f"COULD NOT KILL ({failed})"
            log.error("%s guest pid %d: page at %#x could not be served (%s) and %s", verb, pid, bad.addr, where,
                      why, extra={"event": "vmm_killed", "session": session.session_id, "pid": pid,
                                  "cause": "unservable page", "addr": bad.addr, "chunk": bad.chunk})
            return
        if pidfd < 0 or stats.ended_by in VMM_GONE or not self._vmm_alive(pidfd):
            return
        cause = stats.ended_by
        if stats.error:
            cause += f": {os.strerror(-stats.error)}"
        failed = kill_vmm(pid, pidfd)
        if failed == "gone":
            return
        verb = "killed" if failed is None else f"COULD NOT KILL ({failed})"
        log.error("%s guest pid %d: %s ended (%s) while its VMM was running, and the VMM cannot run without its "
                  "page-fault handler", verb, pid, session.label, cause,
                  extra={"event": "vmm_killed", "session": session.session_id, "pid": pid, "cause": cause})

    def stop(self, wait: bool = True) -> None:
        """Stop accepting; let running guests finish within drain_timeout,
        then kill them; wait for every session to end (when wait)."""
        self._drain_deadline = time.monotonic() + self.settings.drain_timeout
        self._stopping.set()
        if self._accept_thread is not None:
            self._accept_thread.join()  # it sees the stop flag within WAIT_SLICE
        self._selector.close()
        close_listeners(self._listeners, self.listens, unlink=self._owns_listener)
        if wait:
            with self._lock:
                threads = list(self._threads)
            for ended in threads:
                ended.wait()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

