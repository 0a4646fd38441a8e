"""The page-fault handler server: Firecracker's UFFD protocol over a Unix socket.

``Server`` listens on a Unix stream socket (mode 0600), or on several
(``Listen``: one per jail, each with its own owner, mode and allowed uids;
a connection is checked against the socket it came on). Each connection is
one guest: the handshake (restore/protocol.py) brings the guest's regions
and its userfaultfd; a RestoreSession then serves the guest's faults from
the snapshot until the guest goes away; the session's fault log is saved
and the server goes on. The VMM is tracked by a pidfd of the peer
(SO_PEERPIDFD, else pidfd_open of its SO_PEERCRED pid): its exit ends the
session, and a connection closed after the handshake (Firecracker v1.10
and v1.11 close it; v1.12 keeps it open) does not. Without a pidfd (a peer
in this process, or no pidfds here) the connection's end ends the session.
A guest whose handshake is refused is told nothing (the protocol has no
reply): the reason is logged, its connection closed, and its VMM killed
(through its pidfd, else by pid; kill_refused), since a VMM whose memory
nobody serves would hang at its first fault. So is a VMM whose session
ends in error while it runs. Other guests are not affected.

Several servers (for different snapshots) may run in one process: a
server holds all of its state.

Stopping (``stop``, or SIGTERM in ``restore serve``): no new guests are
accepted; running guests get ``drain_timeout`` seconds to finish; a guest
still running then is killed (its VMM, through its pidfd), since
a guest left without its fault handler would hang forever.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import selectors
import socket
import stat
import threading
import time
import weakref
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from .errors import InputError, RestoreError
from .protocol import HandshakeError, accept_handshake, peer_credentials, peer_pidfd, peer_sent_uffd
from .session import (
    DEFAULT_FAULT_AROUND,
    DEFAULT_FETCHERS,
    DEFAULT_POLL_US,
    DEFAULT_PREFETCH_INFLIGHT,
    SERVICE_BUCKETS_NS,
    VMM_GONE,
    RestoreSession,
    SessionStats,
    check_memfd_install,
    prefetch_usage,
)
from .snapshot import Snapshot
from .threads import spawn
from .tiers.host import HostCache
from .tiers.l1 import L1Cache
from .tiers.l2 import L2Cluster
from .vmm import kill_vmm
from .workingset import PlanKeeper, rebuild_plan

log = logging.getLogger("restore.handler")
PLAN_READ_TIMEOUT = 30.0  # seconds a rebuilt plan's read may hold up the end of the session that rebuilt it
# The server's start-up lines ("serving ... on ..."), one per socket: the
# logger `restore serve` shows at INFO even without --verbose.
start_log = logging.getLogger("restore.serve")

HANDSHAKE_TIMEOUT = 5.0  # seconds a connected peer has to send its handshake
WAIT_SLICE = 0.2  # seconds between looks at the stop flag
SUMMARIES_KEPT = 256  # Server.summaries and Server.refused: the most recent


MAX_ID = 0xFFFFFFFE  # the largest uid or gid (0xFFFFFFFF is -1: "unchanged")
MODE_BITS = 0o770  # socket modes may give owner and group access, never others


@dataclass(frozen=True)
class Listen:
    """One listening socket of a Server: its path, the (uid, gid) it is
    given to (None: this process's; gid -1: unchanged), its mode, and the
    uids whose VMMs are served on it (SO_PEERCRED; None: this process's
    own). A server with one Listen per jail serves many jails, each VMM
    only on its own jail's socket."""

    path: str
    owner: Optional[tuple[int, int]] = None
    mode: int = 0o600
    allowed_uids: Optional[frozenset[int]] = None

    def __post_init__(self):
        object.__setattr__(self, "path", os.fspath(self.path))
        if not self.path or "\0" in self.path:
            raise InputError(f"socket path {self.path!r} is empty or has a NUL character")
        if self.owner is not None:
            uid, gid = self.owner
            if not 0 <= uid <= MAX_ID or not (gid == -1 or 0 <= gid <= MAX_ID):
                raise InputError(f"socket {self.path}: owner {uid}:{gid} is not a uid and gid in 0..{MAX_ID}")
            object.__setattr__(self, "owner", (int(uid), int(gid)))
        if not isinstance(self.mode, int) or isinstance(self.mode, bool) or self.mode & ~MODE_BITS or self.mode < 0:
            raise InputError(f"socket {self.path}: mode {self.mode:#o} gives access to others than its owner and "
                             f"group (allowed bits: {MODE_BITS:04o})" if isinstance(self.mode, int)
                             else f"socket {self.path}: mode {self.mode!r} is not a number")
        if self.allowed_uids is not None:
            uids = frozenset(self.allowed_uids)
            if not uids:
                raise InputError(f"socket {self.path}: its allowed uids are empty: no VMM could ever be served")
            bad = [u for u in uids if not 0 <= u <= MAX_ID]
            if bad:
                raise InputError(f"socket {self.path}: allowed uid {bad[0]} is not in 0..{MAX_ID}")
            object.__setattr__(self, "allowed_uids", uids)

    @property
    def allowed(self) -> frozenset[int]:
        """The uids served on this socket."""
        return self.allowed_uids if self.allowed_uids is not None else frozenset({os.getuid()})

    def describe(self) -> str:
        """"owner U:G, mode 0600, allows U, ...", as the start-up log says."""
        if self.owner is None:
            owner = f"{os.getuid()}:{os.getgid()}"
        else:
            owner = f"{self.owner[0]}" + (f":{self.owner[1]}" if self.owner[1] != -1 else "")
        return f"owner {owner}, mode {self.mode:04o}, allows {', '.join(map(str, sorted(self.allowed)))}"


def check_listens(listens: Iterable[Listen]) -> list[Listen]:
    """listens as a list, refusing none and a path given twice."""
    out = list(listens)
    if not out:
        raise InputError("no socket to listen on")
    seen: dict[str, str] = {}
    for lst in out:
        key = os.path.normpath(os.path.abspath(lst.path))
        if key in seen:
            raise InputError(f"socket path {lst.path} is given twice")
        seen[key] = lst.path
    return out


def listen_socket(path: str, owner: Optional[tuple[int, int]] = None, mode: int = 0o600) -> socket.socket:
    """Bind and listen on a Unix socket at path, with mode (default 0600;
    see Listen) (replacing a stale socket a dead server left; refusing a
    path in use or not a socket). owner: (uid, gid) to give the socket to
    before it listens, so VMMs running as that uid can connect (gid -1:
    unchanged); None: this process's."""
    if mode & ~MODE_BITS or mode < 0:
        raise InputError(f"socket path {path}: mode {mode:#o} gives access to others than its owner and group")
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise InputError(f"socket path {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # a stale socket left by a server that died
        else:
            raise InputError(f"socket path {path}: another server is listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)  # the socket is created 0600, then given its mode
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise InputError(f"socket path {path} cannot be bound: {exc.strerror}") from None
    finally:
        os.umask(old)
    try:
        if owner is not None:
            os.chown(path, *owner)
        os.chmod(path, mode)
    except OSError as exc:
        sock.close()
        os.unlink(path)
        whom = f" to uid {owner[0]}" if owner is not None else ""
        raise InputError(f"socket path {path} cannot be given mode {mode:04o}{whom}: {exc.strerror}") from None
    sock.listen(64)
    return sock


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
    """Serve guests of one snapshot on a Unix socket.

    snapshot: the opened snapshot (its codec and store are shared by the
    sessions). l1: the L1 cache (None: no L1). l2: the memcached L2 (None:
    no L2). record_fault_around: the fault-around of sessions that run
    without a plan (None: fault_around); 1 makes every first touch a fault,
    so their logs name the working set exactly (a neighbour brought in by
    fault-around is touched unseen), at the price of a slower recording
    session: what a working-set-first layout wants. memfd_install: how
    pages go into a guest's memfd when it sends one ("copy" or "continue",
    see RestoreSession). allowed_uids: the uids whose VMMs may connect
    (SO_PEERCRED; default: this process's own); others are hung up on
    before anything is read from them. on_session_end: called with a
    SessionSummary when a session ends (for tests and the CLI). on_peer:
    called with ("start", pid) when a peer connects and ("end", pid) when
    the server is done with it (a supervisor tracks the VMMs it must kill
    if this process dies). on_fetch: told of every request its sessions
    make to a network tier (see restore.fetcher.Fetchers). socket_owner:
    (uid, gid) the socket is given to, so that VMMs running as uid (a
    jailer's --uid) can connect to it (see listen_socket). listener: an
    already listening socket (a supervisor's) to accept on instead of
    binding socket_path; it is left bound when the server stops.

    Several sockets: socket_path may be a list of Listen, one per socket
    (e.g. one per jail, each with its own owner, mode and allowed uids);
    each connection is checked against the allowed uids of the socket it
    came on. allowed_uids and socket_owner then must be None, and listener
    (when given) is a list of listening sockets, one per Listen in order.
    socket_path (the attribute) is the first socket's path.

    audit_every: every Nth session that would replay a plan runs without
    it instead, recording every first touch (fault-around 1), and the plan
    is scored against what that guest touched: its pages the guest used
    (useful) and never touched (wasted). A replaying session cannot tell:
    a touch of a page the prefetch installed raises no userfaultfd event.
    Audits cost the audited guest its prefetch; None: no audits.

    host_cache: the host's cache of decoded chunks (restore.tiers.host),
    shared with every other server on the host; past its budget, versions
    no session uses are evicted when a session ends. None: each session
    decodes what it needs for itself. poll_us: see RestoreSession.

    poison: whether the kernel has UFFDIO_POISON (None: asked once per
    process); False makes the sessions behave as on a kernel without it
    (before Linux 6.6), where a page that cannot be served kills its VMM
    with the cause logged. See RestoreSession. fetch_loop: see
    RestoreSession (False: the network tiers are read by a pool of threads).
    """

    def __init__(
        self,
        snapshot: Snapshot,
        socket_path: str | os.PathLike | Sequence[Listen],
        *,
        l1: Optional[L1Cache] = None,
        l2: Optional[L2Cluster] = None,
        fault_around: int = DEFAULT_FAULT_AROUND,
        record_fault_around: Optional[int] = None,
        memfd_install: str = "copy",
        allowed_uids: Optional[Iterable[int]] = None,
        fetchers: int = DEFAULT_FETCHERS,
        drain_timeout: float = 10.0,
        persist_logs: bool = True,
        kill_refused: bool = True,
        use_plan: bool = True,
        rebuild_plan_after: Optional[int] = None,
        plan_sessions: int = 5,
        prefetch_inflight: int = DEFAULT_PREFETCH_INFLIGHT,
        on_session_end: Optional[Callable[[SessionSummary], None]] = None,
        on_peer: Optional[Callable[[str, int], None]] = None,
        on_fetch: Optional[Callable[[str, float, str, int], None]] = None,
        audit_every: Optional[int] = None,
        socket_owner: Optional[tuple[int, int]] = None,
        listener: Optional[socket.socket | Sequence[socket.socket]] = None,
        host_cache: Optional[HostCache] = None,
        poll_us: int = DEFAULT_POLL_US,
        poison: Optional[bool] = None,
        fetch_loop: bool = True,
    ):
        self.snapshot = snapshot
        self.poison = poison
        self.fetch_loop = fetch_loop
        self.host_cache = host_cache
        self.poll_us = poll_us
        if isinstance(socket_path, (str, os.PathLike)):
            if allowed_uids is not None and not frozenset(allowed_uids):
                raise InputError("allowed_uids is empty: no VMM could ever be served")
            listens = [Listen(os.fspath(socket_path), socket_owner,
                              allowed_uids=frozenset(allowed_uids) if allowed_uids is not None else None)]
        else:
            if allowed_uids is not None or socket_owner is not None:
                raise InputError("allowed_uids and socket_owner are per socket: give them in each Listen")
            listens = check_listens(socket_path)
        self.listens: list[Listen] = listens
        self.socket_path = listens[0].path
        self.l1 = l1
        self.l2 = l2
        self.fault_around = fault_around
        self.record_fault_around = record_fault_around
        self.memfd_install = check_memfd_install(memfd_install)
        self.allowed_uids = listens[0].allowed  # the first socket's
        self.fetchers = fetchers
        self.drain_timeout = drain_timeout
        self.persist_logs = persist_logs
        self.kill_refused = kill_refused
        self.use_plan = use_plan
        self.rebuild_plan_after = rebuild_plan_after
        self.plan_sessions = plan_sessions
        self.prefetch_inflight = prefetch_inflight
        if audit_every is not None and audit_every < 1:
            raise InputError(f"audit_every must be at least 1 session, got {audit_every}")
        self.audit_every = audit_every
        self._since_plan = 0  # sessions recorded since the plan was rebuilt
        self._with_plan = 0  # sessions that found a plan (audits counted)
        # The plan, read in the background from now on (not on a first fault's way).
        self._plan = PlanKeeper(snapshot.store, snapshot.manifest) if use_plan else None
        self.on_session_end = on_session_end
        self.on_fetch = on_fetch
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
        self.on_peer = on_peer
        self._owns_listener = listener is None
        if listener is None:
            self._listeners: list[socket.socket] = []
            try:
                for lst in listens:
                    self._listeners.append(listen_socket(lst.path, lst.owner, lst.mode))
            except BaseException:
                for sock, lst in zip(self._listeners, listens):
                    sock.close()
                    _unlink(lst.path)
                raise
        else:
            self._listeners = [listener] if isinstance(listener, socket.socket) else list(listener)
            if len(self._listeners) != len(listens):
                raise InputError(f"{len(self._listeners)} listening sockets given for {len(listens)} socket paths")
        # Made here, not in serve_forever: a server's fds all exist once it
        # is constructed.
        self._selector = selectors.DefaultSelector()
        for sock, lst in zip(self._listeners, listens):
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

    def _allowed_on(self, conn: socket.socket) -> tuple[frozenset[int], str]:
        """The uids allowed on the socket conn came on, and its path."""
        lst = self._came_on.pop(conn, None) or self.listens[0]
        return lst.allowed, lst.path

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
            self._serve_guest(conn, pidfd)
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

    def _serve_guest(self, conn: socket.socket, pidfd: int = -1) -> None:
        m = self.snapshot.manifest
        try:
            peer = peer_credentials(conn)
        except RestoreError as exc:
            self._refuse(conn, 0, str(exc), pidfd=pidfd)
            return
        pid = peer.pid
        allowed, on = self._allowed_on(conn)
        if peer.uid not in allowed:
            # Not one of our VMMs: nothing of the snapshot is served. Its
            # handshake is still read (bounded) to learn whether it sent a
            # userfaultfd: a VMM that did blocks at its first fault (during
            # Firecracker's PUT /snapshot/load, before the VM resumes) and
            # would hang for ever, so it is killed. Any other peer is only
            # hung up on.
            vmm = peer_sent_uffd(conn, timeout=HANDSHAKE_TIMEOUT)
            self._refuse(conn, pid, f"peer uid {peer.uid} is not allowed on {on} (allowed: "
                         f"{', '.join(map(str, sorted(allowed)))})", kill=vmm, pidfd=pidfd,
                         because="it sent a userfaultfd, and a VMM whose memory nobody serves hangs at its "
                                 "first page fault")
            return
        try:
            hs = accept_handshake(
                conn,
                memory_size=m.memory_size,
                snapshot_page_size=m.page_size,
                chunk_size=m.chunk_size,
                timeout=HANDSHAKE_TIMEOUT,
            )
        except HandshakeError as exc:
            self._refuse(conn, pid, str(exc), pidfd=pidfd)
            return
        plan = None
        if self._plan is not None:
            try:
                plan = self._plan.current()
            except RestoreError as exc:  # a bad plan costs speed, never correctness
                log.error("%s: not using its plan: %s", self.snapshot.label, exc)
        audited = None  # the plan an audit session scores
        if plan is not None and self.audit_every:
            with self._lock:
                self._with_plan += 1
                if self._with_plan % self.audit_every == 0:
                    audited, plan = plan, None
        fault_around = self.fault_around
        if audited is not None:
            fault_around = 1
        elif plan is None and self.record_fault_around:
            fault_around = self.record_fault_around
        try:
            session = RestoreSession(
                self.snapshot,
                hs.uffd,
                hs.regions,
                hs.page_size,
                conn_fd=conn.fileno(),
                l1=self.l1,
                l2=self.l2,
                fault_around=fault_around,
                fetchers=self.fetchers,
                persist_log=self.persist_logs,
                plan=plan,
                prefetch_inflight=self.prefetch_inflight,
                memfd=hs.memfd,
                memfd_install=self.memfd_install,
                on_fetch=self.on_fetch,
                host_cache=self.host_cache,
                poll_us=self.poll_us,
                # The plan came from sessions recorded with this fault-around.
                prefetch_around=self.record_fault_around,
                pidfd=pidfd,
                poison=self.poison,
                fetch_loop=self.fetch_loop,
            )
        except RestoreError as exc:
            hs.close()
            self._refuse(conn, pid, str(exc), pidfd=pidfd)
            return
        key = id(session)
        with self._lock:
            self._active[key] = (session, pid)
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
        self._maybe_rebuild_plan(session.log_key is not None)
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

    def _maybe_rebuild_plan(self, recorded: bool) -> None:
        """Every rebuild_plan_after recorded sessions, rebuild the plan from
        the last plan_sessions fault logs (sessions keep recording while a
        plan is in use, so the plan follows the function as it changes)."""
        if not recorded or not self.rebuild_plan_after:
            return
        with self._lock:
            self._since_plan += 1
            if self._since_plan < self.rebuild_plan_after:
                return
            self._since_plan = 0
        try:
            info = rebuild_plan(self.snapshot.store, self.snapshot.manifest, self.plan_sessions)
            log.info("%s: rebuilt its plan from %d sessions: %d pages", self.snapshot.label, len(info.built_from), info.pages)
            if self._plan is not None:  # read now (the session is over), for the next session
                self._plan.refresh()
                self._plan.wait(PLAN_READ_TIMEOUT)
        except RestoreError as exc:
            log.error("%s: could not rebuild its plan: %s", self.snapshot.label, exc)

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
        if kill and self.kill_refused and (pidfd >= 0 or (pid > 0 and pid != os.getpid())):
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
            self.drain_timeout,
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
        self._drain_deadline = time.monotonic() + self.drain_timeout
        self._stopping.set()
        if self._accept_thread is not None:
            self._accept_thread.join()  # it sees the stop flag within WAIT_SLICE
        self._selector.close()
        for sock, lst in zip(self._listeners, self.listens):
            sock.close()
            if self._owns_listener:
                _unlink(lst.path)
        if wait:
            with self._lock:
                threads = list(self._threads)
            for ended in threads:
                ended.wait()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
