"""Fault injection against real components: a fault-injecting TCP proxy
(tests/faults/proxy.py) in front of the S3 server and of every memcached
node, servers killed and restarted mid-restore, and damaged L1 files.

For every case a real guest process reads its memory through a Server,
and it must end with the snapshot's bytes on every page it read, or die on
a poisoned page (SIGBUS) while the session names the chunk and the cause:
never wrong bytes, never silent zeros, never a hang (every wait below has a
deadline, and so has every tier). Servers are killed, stopped and
restarted when an event says requests are in flight (the proxy's
on_request, before it forwards request number N, with the session's count
of faults parked on network fetches read at that moment), never after a
sleep; each such test asserts that the fault landed (a live request cut or
left unanswered), that the session saw it, and how the restore ended. The
tally is printed after the run."""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections import Counter

import numpy as np
import pytest
from conftest import TALLY, every_chunk_trace
from daemon import Inside, wait_for
from proxy import FaultProxy

from restore.handler import Server
from restore.settings import ServerSettings
from restore.objects import chunk_key
from restore.protocol import accept_handshake
from restore.session import RestoreSession
from restore.snapshot import Snapshot, create_snapshot
from restore.guest import Guest, GuestError, GuestTimeout, reads, wait
from restore.testing import expected_sums
from restore.tiers.durable import DurableStore
from restore.tiers.l1 import L1Cache
from restore.tiers.amc import Zone
from restore.tiers.l2 import L2Cluster

P = 4096
CHUNK = 256 * 1024
SIZE = 8 << 20
HANG = 60  # seconds: a restore not done by then counts as a hang


@pytest.fixture(scope="module")
def image(make_image):
    return make_image(SIZE, seed=8)


@pytest.fixture(scope="module")
def trace(image):
    return every_chunk_trace(image, seed=3)


@pytest.fixture
def s3_proxy(s3_server):
    with FaultProxy(("127.0.0.1", s3_server.port), seed=1) as proxy:
        yield proxy
        TALLY["landed"].update({f"s3 {k}": n for k, n in proxy.landed.items()})


@pytest.fixture
def snap(s3_server, s3_proxy, image, request):
    """The snapshot in S3, opened through the proxy (short timeouts: a
    stalled request fails within seconds and is retried within the deadline)."""
    store = DurableStore(f"s3://snapshots/{request.node.name[:40]}", s3_server.options())
    create_snapshot(store, image, "vm", chunk_size=CHUNK)
    opts = s3_server.options(deadline=6.0, connect_timeout=1.0, timeout=1.5)
    opts = type(opts)(**{**opts.__dict__, "endpoint": s3_proxy.endpoint})
    via_proxy = DurableStore(store.url, opts)
    with Snapshot.open(via_proxy, "vm") as s:
        yield s


class _Helper(threading.Thread):
    """A thread that keeps what it raised, for the test's thread to raise."""

    def __init__(self, fn, *args):
        super().__init__(daemon=True)
        self.fn, self.args, self.exc = fn, args, None

    def run(self) -> None:
        try:
            self.fn(*self.args)
        except BaseException as exc:  # raised again by finish()
            self.exc = exc

    def finish(self) -> None:
        self.join(HANG)
        assert not self.is_alive(), "the fault helper did not finish"
        if self.exc is not None:
            raise self.exc


def _restore(snap, tmp_path, trace, image, during=None, armed=None, **server_kw):
    """One restore of a fresh guest with a cold L1; checks every byte the
    guest read. armed(server): called once the server exists, before the
    guest connects (to aim faults at its sessions). during(server): run in
    a thread once the guest runs (restarts after the events it waits for);
    what it raises is raised here. Returns (the session summary, the
    GuestError the guest died of or None)."""
    server_kw.setdefault("l1", L1Cache(tmp_path / f"l1-{time.monotonic_ns()}"))
    settings, server_kw = ServerSettings.take({"persist_logs": False, **server_kw})
    with Server(snap, tmp_path / f"s{time.monotonic_ns()}.sock", settings, **server_kw) as server:
        if armed:
            armed(server)
        with Guest(server.socket_path, memory_size=SIZE) as g:
            g.start(reads(trace))
            helper = _Helper(during, server) if during else None
            if helper:
                helper.start()
            died = None
            try:
                got = g.wait(HANG).sums
            except GuestTimeout:
                TALLY["hangs"] += 1
                raise
            except GuestError as exc:
                died = exc
                got = g.done_so_far().sums
            if helper:
                helper.finish()
        deadline = time.monotonic() + 10
        while not server.summaries:
            assert time.monotonic() < deadline, "the session did not end"
            time.sleep(0.01)
    summary = server.summaries[0]
    wrong = int((got != expected_sums(image, trace[: len(got)])).sum())
    TALLY["restores"] += 1
    TALLY["bytes_verified"] += (len(got) - wrong) * P
    TALLY["wrong_bytes"] += wrong * P
    assert wrong == 0, f"{wrong} pages with wrong bytes"
    if died is not None:
        # Died on a poisoned page: the session says which chunk, and why.
        assert died.signal == signal.SIGBUS, died
        assert summary.stats.poisoned >= 1 and summary.errors, summary
        TALLY["poisoned"] += 1
    return summary, died


class _Aim:
    """A fault fired by a proxy's on_request event: when the proxy is about
    to forward the `at`-th request for a chunk (its first bytes hold
    `chunk_request`: an S3 GET of chunks/..., a memcached get) since
    arming, fire() runs in the relaying thread, so it lands while that
    request is in flight; the faults the server had parked on network
    fetches at that moment are kept (parked)."""

    def __init__(self, proxy: FaultProxy, at: int, fire, chunk_request: bytes):
        self.proxy, self.at, self.fire, self.match = proxy, at, fire, chunk_request
        self.server = None
        self.parked = None
        self.seen = 0
        self.fired = threading.Event()

    def arm(self, server) -> None:
        self.server = server
        self.proxy.on_request = self._on

    def _on(self, n: int, head: bytes) -> None:
        if self.match not in head[:200] or self.fired.is_set():
            return
        self.seen += 1
        if self.seen == self.at:
            self.parked = self.server.parked()
            self.fire()
            self.fired.set()

    def wait(self) -> None:
        assert self.fired.wait(HANG), f"chunk request {self.at} never came: the fault never fired"


# -- the S3 server behind a faulty network ---------------------------------------

TRANSIENT = [
    ("delay", 1.0, {"seconds": 0.02}),
    ("stall", 0.2, {}),
    ("reset", 0.2, {"after": 2000}),
    ("truncate", 0.2, {"after": 2000}),
    ("http503", 0.4, {}),
    # Two damaged replies in all: no chunk can fail its DURABLE_ATTEMPTS
    # reads, so a flip that passes must end with every byte right.
    ("flip", 1.0, {"after": 600, "every": 50000, "limit": 2}),
]


@pytest.mark.parametrize("kind,share,params", TRANSIENT, ids=[t[0] for t in TRANSIENT])
def test_s3_faults_that_pass_end_with_the_right_bytes(tmp_path, snap, s3_proxy, trace, image, kind, share, params):
    s3_proxy.set(kind, share, **params)
    summary, died = _restore(snap, tmp_path, trace, image, fetchers=4)
    assert s3_proxy.landed[kind] > 0  # the fault really changed replies
    assert died is None, summary.errors
    assert summary.stats.chunks_failed == 0
    if kind == "flip":
        # Caught by verification every time, and read again.
        assert summary.stats.supply_rejected == s3_proxy.landed["flip"] == 2


@pytest.mark.parametrize("kind", ["stall", "http503", "flip"])
def test_s3_faults_that_last_poison_and_name_the_chunk(tmp_path, snap, s3_proxy, trace, image, kind):
    s3_proxy.set(kind, 1.0, after=600, every=50000)
    summary, died = _restore(snap, tmp_path, trace[:50], image, fetchers=2)
    assert died is not None and s3_proxy.landed[kind] > 0
    why = {"stall": ("timed out", "error sending request"), "http503": ("503",), "flip": ("fail verification",)}[kind]
    line = summary.errors[0]
    assert "chunk " in line and "chunks/" in line and "giving up, its pages are poisoned" in line
    assert any(w in line.lower() for w in why), summary.errors


AT = [1, 4, 9, 14]  # the chunk request in flight when the fault fires, counted from the guest's start
L2_AT = [1, 2, 3, 5]  # the same for the memcached node home to the most chunks (a third or more)


@pytest.mark.parametrize("at", AT)
def test_s3_restarted_mid_restore(tmp_path, snap, s3_server, s3_proxy, trace, image, at):
    """S3 dies as the proxy forwards request number `at` (a fault parked on
    it): the server stops and its live connections are reset, as a
    process's death resets them. It comes back once a request has found it
    down, and the restore goes on from it."""
    back = {}

    def die():
        s3_server.stop()
        s3_proxy.cut_all()

    aim = _Aim(s3_proxy, at, die, b"/chunks/")

    def restart(server):
        aim.wait()
        s3_proxy.wait_for(lambda p: p.refused >= 1, "no request found S3 down")
        back["relayed"] = s3_proxy.relayed
        s3_server.start()
        s3_proxy.wait_for(lambda p: p.relayed > back["relayed"], "no request reached the restarted S3")

    summary, died = _restore(snap, tmp_path, trace, image, armed=aim.arm, during=restart, fetchers=4)
    assert aim.parked["on_network"] >= 1, aim.parked  # a fault waited on the fetch S3 died under
    assert s3_proxy.cut >= 1  # the request in flight was cut (by the reset, or by S3's stop before it)
    assert s3_proxy.relayed > back["relayed"]  # and the restarted S3 served again
    if died is None:
        assert summary.stats.chunks_failed == 0
        assert summary.stats.tiers["durable"]["hits"] == summary.stats.chunks_fetched
    else:  # the cut request's deadline passed: its chunk is poisoned, by name
        assert any("giving up, its pages are poisoned" in e for e in summary.errors), summary.errors
    TALLY["mid_restore"]["s3 killed and restarted"] += 1


# -- memcached (L2) behind a faulty network ----------------------------------------


@pytest.fixture
def l2_proxied(memcached_cluster):
    proxies = [FaultProxy(n.address, seed=i) for i, n in enumerate(memcached_cluster)]
    cluster = L2Cluster([("az1", [p.address for p in proxies])], timeout=0.5, connect_timeout=0.5, dead_timeout=1.0)
    yield cluster, proxies
    cluster.close()
    for p in proxies:
        TALLY["landed"].update({f"memcached {k}": n for k, n in p.landed.items()})
        p.close()


@pytest.mark.parametrize("kind,params", [("delay", {"seconds": 0.01}), ("stall", {}), ("reset", {"after": 3000}),
                                         ("truncate", {"after": 3000}), ("flip", {"after": 400, "every": 40000})],
                         ids=["delay", "stall", "reset", "truncate", "flip"])
def test_l2_faults_fall_back_to_the_store(tmp_path, snap, s3_server, l2_proxied, trace, image, kind, params):
    cluster, proxies = l2_proxied
    # Warm L2 with every chunk, straight (not through the faults).
    for c in snap.manifest.chunks:
        if c.id:
            cluster.put(c.id, snap.store.get(chunk_key(c.id)), zones="all")
    for p in proxies:
        p.set(kind, 1.0, **params)
    summary, died = _restore(snap, tmp_path, trace, image, l2=cluster, fetchers=4)
    assert died is None, summary.errors
    assert sum(p.landed[kind] for p in proxies) > 0
    tiers = summary.stats.tiers
    assert tiers["l2"]["hits"] + tiers["durable"]["hits"] == summary.stats.chunks_fetched
    if kind != "delay":
        assert tiers["durable"]["hits"] > 0  # what L2 could not give came from the store
    if kind == "flip":
        assert tiers["l2"]["bad"] > 0


@pytest.mark.parametrize("at", L2_AT)
@pytest.mark.parametrize("how", ["kill", "stop"])
def test_memcached_node_killed_or_stopped_mid_restore(tmp_path, snap, memcached_cluster, l2_proxied, trace, image,
                                                      how, at):
    """A memcached node dies (SIGKILL) or hangs (SIGSTOP) as its proxy
    forwards request number `at`, a fault parked on it: the request is cut
    (kill) or left unanswered until the client gives up (stop); the session
    counts the L2 error and takes the chunk from the store. The node comes
    back (a new process on its port, or SIGCONT) once the session has seen
    the error, and the next restore's requests reach it."""
    cluster, proxies = l2_proxied
    for c in snap.manifest.chunks:
        if c.id:
            cluster.put(c.id, snap.store.get(chunk_key(c.id)), zones="all")
    # The node that is home to the most chunks (at least a third: the guest
    # reads every chunk once, so it is asked at least that often). Homes
    # follow the nodes' addresses, the proxies' ports, which change from
    # test to test: a fixed node may be home to fewer than `at` chunks.
    zone = Zone("az1", [p.address for p in proxies], connect_timeout=1.0, dead_timeout=1.0)
    homes = Counter(zone.ranked(cid)[0].key for cid in {c.id for c in snap.manifest.chunks if c.id})
    homed = [homes["%s:%d" % p.address] for p in proxies]
    i = homed.index(max(homed))
    assert homed[i] >= max(L2_AT)
    node = memcached_cluster[i]
    proxy = proxies[i]

    def fire():
        if how == "kill":
            node.kill()
        else:
            node.proc.send_signal(signal.SIGSTOP)

    aim = _Aim(proxy, at, fire, b"get ")
    base = cluster.counters.errors

    def bring_back(server):
        aim.wait()
        if how == "kill":
            proxy.wait_for(lambda p: p.cut >= 1, "the request in flight was not cut")
        else:
            proxy.wait_for(lambda p: p.gave_up >= 1, "no client gave up on the stopped node")
        wait_for(lambda: cluster.counters.errors > base, "the session never counted an L2 error", HANG)
        if how == "kill":
            node.restart()
        else:
            node.proc.send_signal(signal.SIGCONT)

    try:
        summary, died = _restore(snap, tmp_path, trace, image, l2=cluster, armed=aim.arm, during=bring_back,
                                 fetchers=4)
    finally:
        if how == "stop":
            node.proc.send_signal(signal.SIGCONT)
    assert aim.parked["on_network"] >= 1, aim.parked  # a fault waited on the request the node died under
    assert died is None, summary.errors
    tiers = summary.stats.tiers
    assert tiers["durable"]["hits"] >= 1  # what the node could not give came from the store
    assert tiers["l2"]["hits"] + tiers["durable"]["hits"] == summary.stats.chunks_fetched
    # Back and used again: the next restore's requests reach the node.
    relayed, errors = proxy.relayed, cluster.counters.errors
    proxy.on_request = None
    again, died = _restore(snap, tmp_path, trace, image, l2=cluster, fetchers=4)
    assert died is None and proxy.relayed > relayed
    assert cluster.counters.errors == errors
    TALLY["mid_restore"][f"memcached {'killed and restarted' if how == 'kill' else 'stopped and continued'}"] += 1


# -- damaged or full L1 -------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_damaged_l1_files_are_not_trusted(tmp_path, snap, trace, image, damage):
    l1 = L1Cache(tmp_path / "l1")
    snap.fill_l1(l1)
    files = sorted(p for p in (tmp_path / "l1").rglob("*") if p.is_file() and len(p.name) == 64)
    assert files
    for f in files[::3]:
        data = bytearray(f.read_bytes())
        if damage == "truncate":
            data = data[: len(data) // 2]
        elif damage == "flip":
            data[len(data) // 3] ^= 0x01
        else:
            data = bytearray()
        f.write_bytes(bytes(data))
    summary, died = _restore(snap, tmp_path, trace, image, l1=l1, fetchers=4)
    assert died is None
    st = summary.stats
    assert st.l1_bad == len(files[::3]) and st.chunks_fetched == len(files[::3])
    TALLY["landed"][f"l1 {damage}"] += st.l1_bad


def test_l1_disk_full(tmp_path, snap, trace, image, caplog):
    """L1 on a 64 KiB tmpfs: a chunk write fails with ENOSPC, said once in
    the log, and serving goes on from the store with every byte right."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        with caplog.at_level(logging.WARNING, logger="restore.fetcher"):
            summary, died = _restore(snap, tmp_path, trace, image, l1=L1Cache(mnt / "l1"), fetchers=4)
        full = os.statvfs(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert died is None, summary.errors
    nospace = [r for r in caplog.records if "cannot write to L1" in r.getMessage()]
    assert len(nospace) == 1, [r.getMessage() for r in caplog.records]  # said once, not per chunk
    exc = nospace[0].args[-1]
    assert isinstance(exc, OSError) and exc.errno == errno.ENOSPC, exc
    assert full.f_bavail * full.f_frsize < CHUNK  # the filesystem really was full
    assert summary.stats.chunks_fetched == sum(1 for c in snap.manifest.chunks if c.id)
    TALLY["landed"]["l1 disk full"] += 1


def test_counters_do_not_wait_for_a_session_stuck_closing(tmp_path, s3_server, s3_proxy, image, trace, request,
                                                          monkeypatch):
    """A metrics scrape (Server.counters) while a session's close() waits for
    a fetch stuck on a stalled S3 answers, and counters only grow. The
    threaded fetchers are the path whose close waits for a stuck GET (the
    fetch loop cancels it). Timed by events: the stall is held (and the S3
    timeouts are longer than the test's hang guard) until scrapes have
    answered while a thread is inside RestoreSession.close; a scrape that
    waited for close could only answer after the stall is released. Who is
    inside close() is tallied by a wrapper around it, not by walking other
    threads' frames, which Python 3.11 does not do safely while they run."""
    store = DurableStore(f"s3://snapshots/{request.node.name[:40]}", s3_server.options())
    create_snapshot(store, image, "vm", chunk_size=CHUNK)
    opts = s3_server.options(deadline=2 * HANG, connect_timeout=1.0, timeout=2 * HANG)
    opts = type(opts)(**{**opts.__dict__, "endpoint": s3_proxy.endpoint})
    inside = Inside()
    close = RestoreSession.close

    def tallied_close(self, *args, **kwargs):
        with inside.entered():
            return close(self, *args, **kwargs)

    monkeypatch.setattr(RestoreSession, "close", tallied_close)

    def closing() -> bool:
        return inside() > 0

    with Snapshot.open(DurableStore(store.url, opts), "vm") as snap:
        with Server(snap, tmp_path / "s.sock", ServerSettings(fetchers=1, persist_logs=False, fetch_loop=False),
                    l1=L1Cache(tmp_path / "l1")) as server:
            # The stall begins with the first chunk GET (the plan's lookup passes).
            _Aim(s3_proxy, 1, lambda: s3_proxy.set("stall"), b"/chunks/").arm(server)
            try:
                with Guest(server.socket_path, memory_size=SIZE) as g:
                    g.start(reads(trace[:5]))
                    wait_for(lambda: server.parked()["on_network"] >= 1 and s3_proxy.landed["stall"] >= 1,
                             f"no fault waited on a stalled GET: {server.parked()}, {s3_proxy.landed}, "
                             f"{server.counters()}", HANG)
                    before = server.counters()
                    g.kill()  # the session ends while its one fetcher is stuck in a GET
                wait_for(closing, "the session's close never began", HANG)
                answered = 0
                while answered < 5:
                    now = server.counters()
                    assert closing(), "a scrape answered only once close() had ended"
                    assert server.active() == 1
                    assert all(now.get(k, 0) >= v for k, v in before.items() if k != "sessions_active"), (before, now)
                    answered += 1
            finally:
                s3_proxy.clear()
            wait_for(lambda: not server.active(), "the session did not end once S3 answered", HANG)
    assert server.counters()["sessions_ended"] == 1
    TALLY["landed"]["s3 stall while a session closes"] += 1


def test_prefetch_reads_are_not_hedged(tmp_path, snap, memcached_cluster, trace, image):
    """Hedging is for reads a fault waits on: with the local zone's node
    stalled, the prefetch's reads wait for it until the L2 timeout and then
    ask the other zone, never hedged. The guest is let run once the
    prefetch is done, so no fault ever waits."""
    with FaultProxy(memcached_cluster[0].address, seed=6) as stalled:
        cluster = L2Cluster([("az1", [stalled.address]), ("az2", [memcached_cluster[1].address])],
                            timeout=0.5, connect_timeout=0.5, dead_timeout=1.0)
        path = str(tmp_path / "p.sock")
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            for c in snap.manifest.chunks:
                if c.id:
                    cluster.put(c.id, snap.store.get(chunk_key(c.id)), zones="all")
            stalled.set("stall")
            lsock.bind(path)
            lsock.listen(1)
            m = snap.manifest
            with Guest(path, memory_size=SIZE) as g:
                g.start(np.concatenate([wait(), reads(trace)]))
                conn, _ = lsock.accept()
                hs = accept_handshake(conn, memory_size=m.memory_size, snapshot_page_size=m.page_size,
                                      chunk_size=m.chunk_size)
                session = RestoreSession(snap, hs.uffd, hs.regions, hs.page_size, conn_fd=conn.fileno(),
                                         l1=L1Cache(tmp_path / "l1"), l2=cluster, plan=trace, fetchers=4,
                                         persist_log=False)
                try:
                    assert session.wait_prefetch(HANG), "the prefetch did not end"
                    conn.sendall(b"g")
                    res = g.wait(HANG)
                    session.wait(HANG)
                finally:
                    stats = session.close()
                    hs.close()
                    conn.close()
        finally:
            lsock.close()
            cluster.close()
        TALLY["landed"].update({f"memcached prefetch {k}": n for k, n in stalled.landed.items()})
    assert (res.sums[1:] == expected_sums(image, trace)).all()  # after the wait
    tiers = stats.tiers
    assert stats.prefetch_chunks > 0 and stats.faults_planned + stats.faults_unplanned == 0
    assert cluster.counters.errors > 0  # the stalled node was asked, and timed out
    assert tiers["l2"]["hedged"] == 0
    assert tiers["l2"]["hits"] == stats.chunks_fetched  # the other zone, after the timeout


def test_l2_stalled_node_is_hedged_to_another_zone(tmp_path, snap, memcached_cluster, trace, image):
    """A local-zone node that stalls: each read is hedged after the threshold
    to the chunk's copy in the other zone, which answers; the durable tier
    is not needed and every byte is right."""
    with FaultProxy(memcached_cluster[0].address, seed=5) as stalled:
        cluster = L2Cluster([("az1", [stalled.address]), ("az2", [memcached_cluster[1].address])],
                            timeout=0.5, connect_timeout=0.5, dead_timeout=1.0)
        try:
            for c in snap.manifest.chunks:
                if c.id:
                    cluster.put(c.id, snap.store.get(chunk_key(c.id)), zones="all")
            stalled.set("stall")
            seen = []
            summary, died = _restore(snap, tmp_path, trace, image, l2=cluster, fetchers=4,
                                     on_fetch=lambda tier, s, outcome, n: seen.append((tier, outcome)))
        finally:
            cluster.close()
        TALLY["landed"].update({f"memcached hedge {k}": n for k, n in stalled.landed.items()})
    assert died is None, summary.errors
    tiers = summary.stats.tiers
    assert tiers["l2"]["hedged"] > 0
    assert ("l2", "hedged") in seen
    assert tiers["durable"]["hits"] == 0  # the other zone's copies sufficed
    assert tiers["l2"]["hits"] == summary.stats.chunks_fetched
