"""Fault injection against real components: a fault-injecting TCP proxy
(tests/faults/proxy.py) in front of the S3 server and of every memcached
node, servers killed and restarted mid-restore, and damaged L1 files.

For every case a real guest process reads its memory through a Server,
and it must end with the snapshot's bytes on every page it read, or die on
a poisoned page (SIGBUS) while the session names the chunk and the cause:
never wrong bytes, never silent zeros, never a hang (every wait below has a
deadline, and so has every tier). The tally is printed after the run."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time

import numpy as np
import pytest
from conftest import TALLY
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
    """Every non-zero page, in a random order: every chunk is needed."""
    pages = np.fromfile(image, dtype=np.uint8).reshape(-1, P)
    nonzero = np.flatnonzero(pages.any(axis=1))
    return np.random.default_rng(3).permutation(nonzero).astype(np.uint64) * P


@pytest.fixture
def s3_proxy(s3_server):
    with FaultProxy(("127.0.0.1", s3_server.port), seed=1) as proxy:
        yield proxy
        TALLY["injected"].update({f"s3 {k}": n for k, n in proxy.injected.items()})


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


def _restore(snap, tmp_path, trace, image, during=None, **server_kw):
    """One restore of a fresh guest with a cold L1; checks every byte the
    guest read. during(): called in a thread once the guest runs (kills,
    restarts). Returns (the session summary, the GuestError the guest died
    of or None)."""
    server_kw.setdefault("l1", L1Cache(tmp_path / f"l1-{time.monotonic_ns()}"))
    settings, server_kw = ServerSettings.take({"persist_logs": False, **server_kw})
    with Server(snap, tmp_path / f"s{time.monotonic_ns()}.sock", settings, **server_kw) as server:
        with Guest(server.socket_path, memory_size=SIZE) as g:
            g.start(reads(trace))
            helper = threading.Thread(target=during, daemon=True) if during else None
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
                helper.join(HANG)
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


# -- the S3 server behind a faulty network ---------------------------------------

TRANSIENT = [
    ("delay", 1.0, {"seconds": 0.02}),
    ("stall", 0.2, {}),
    ("reset", 0.2, {"after": 2000}),
    ("truncate", 0.2, {"after": 2000}),
    ("http503", 0.4, {}),
    ("flip", 0.3, {"after": 600, "every": 50000}),
]


@pytest.mark.parametrize("kind,share,params", TRANSIENT, ids=[t[0] for t in TRANSIENT])
def test_s3_faults_that_pass_end_with_the_right_bytes(tmp_path, snap, s3_proxy, trace, image, kind, share, params):
    s3_proxy.set(kind, share, **params)
    summary, died = _restore(snap, tmp_path, trace, image, fetchers=4)
    assert s3_proxy.injected[kind] > 0  # the fault was really there
    if kind == "flip":
        # Caught by verification every time. A chunk is read again, but a
        # kept-alive connection that damages every reply damages the new
        # reads too: those chunks are poisoned, by name (checked above).
        assert summary.stats.supply_rejected > 0
        return
    assert died is None, summary.errors
    assert summary.stats.chunks_failed == 0


@pytest.mark.parametrize("kind", ["stall", "http503", "flip"])
def test_s3_faults_that_last_poison_and_name_the_chunk(tmp_path, snap, s3_proxy, trace, image, kind):
    s3_proxy.set(kind, 1.0, after=600, every=50000)
    t0 = time.monotonic()
    summary, died = _restore(snap, tmp_path, trace[:50], image, fetchers=2)
    assert died is not None and time.monotonic() - t0 < HANG
    why = {"stall": ("timed out", "error sending request"), "http503": ("503",), "flip": ("fail verification",)}[kind]
    line = summary.errors[0]
    assert "chunk " in line and "chunks/" in line and "giving up, its pages are poisoned" in line
    assert any(w in line.lower() for w in why), summary.errors


def test_s3_restarted_mid_restore(tmp_path, snap, s3_server, trace, image):
    def bounce():
        time.sleep(0.05)
        s3_server.stop()
        time.sleep(1.0)
        s3_server.start()

    summary, died = _restore(snap, tmp_path, trace, image, during=bounce, fetchers=4)
    TALLY["injected"]["s3 restart"] += 1
    assert died is None, summary.errors


# -- memcached (L2) behind a faulty network ----------------------------------------


@pytest.fixture
def l2_proxied(memcached_cluster):
    proxies = [FaultProxy(n.address, seed=i) for i, n in enumerate(memcached_cluster)]
    cluster = L2Cluster([("az1", [p.address for p in proxies])], timeout=0.5, connect_timeout=0.5, dead_timeout=1.0)
    yield cluster, proxies
    cluster.close()
    for p in proxies:
        TALLY["injected"].update({f"memcached {k}": n for k, n in p.injected.items()})
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
    tiers = summary.stats.tiers
    assert tiers["l2"]["hits"] + tiers["durable"]["hits"] == summary.stats.chunks_fetched
    if kind != "delay":
        assert tiers["durable"]["hits"] > 0  # what L2 could not give came from the store
    if kind == "flip":
        assert tiers["l2"]["bad"] > 0


def test_memcached_nodes_killed_and_restarted_mid_restore(tmp_path, snap, memcached_cluster, trace, image):
    cluster = L2Cluster([("az1", [n.address for n in memcached_cluster])], timeout=0.5, connect_timeout=0.5,
                        dead_timeout=0.5)
    for c in snap.manifest.chunks:
        if c.id:
            cluster.put(c.id, snap.store.get(chunk_key(c.id)), zones="all")

    def kill_two():
        time.sleep(0.02)
        memcached_cluster[0].kill()
        memcached_cluster[1].proc.send_signal(signal.SIGSTOP)  # a node that hangs rather than dies
        time.sleep(1.0)
        memcached_cluster[1].proc.send_signal(signal.SIGCONT)

    try:
        summary, died = _restore(snap, tmp_path, trace, image, l2=cluster, during=kill_two, fetchers=4)
    finally:
        cluster.close()
    TALLY["injected"]["memcached kill"] += 1
    TALLY["injected"]["memcached stop"] += 1
    assert died is None, summary.errors


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
        TALLY["injected"][f"l1 {damage}"] += 1
    summary, died = _restore(snap, tmp_path, trace, image, l1=l1, fetchers=4)
    assert died is None
    st = summary.stats
    assert st.l1_bad == len(files[::3]) and st.chunks_fetched == len(files[::3])


def test_l1_disk_full(tmp_path, snap, trace, image):
    """L1 on a 64 KiB tmpfs: writes fail, serving goes on from the store."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        summary, died = _restore(snap, tmp_path, trace, image, l1=L1Cache(mnt / "l1"), fetchers=4)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    TALLY["injected"]["l1 disk full"] += 1
    assert died is None
    assert summary.stats.chunks_fetched == sum(1 for c in snap.manifest.chunks if c.id)


def test_counters_do_not_wait_for_a_session_stuck_closing(tmp_path, snap, s3_proxy, trace):
    """A metrics scrape (Server.counters) while a session's close() waits for
    a fetch stuck on a stalled S3 answers at once, and counters only grow.
    The threaded fetchers are the path whose close waits for a stuck GET
    (the fetch loop cancels it, so its close may end before any scrape)."""
    s3_proxy.set("stall")
    with Server(snap, tmp_path / "s.sock", ServerSettings(fetchers=1, persist_logs=False, fetch_loop=False),
                l1=L1Cache(tmp_path / "l1")) as server:
        with Guest(server.socket_path, memory_size=SIZE) as g:
            g.start(reads(trace[:5]))
            deadline = time.monotonic() + 10
            while server.counters().get("faults", 0) < 1:
                assert time.monotonic() < deadline, "the guest never faulted"
                time.sleep(0.01)
            before = server.counters()
            g.kill()  # the session ends while its one fetcher is stuck in a GET
        slowest, seen_closing = 0.0, 0
        while server.active():
            t = time.monotonic()
            now = server.counters()
            slowest = max(slowest, time.monotonic() - t)
            seen_closing += 1
            assert all(now.get(k, 0) >= v for k, v in before.items() if k != "sessions_active"), (before, now)
            time.sleep(0.01)
        s3_proxy.clear()
    # The fetch loop cancels a stuck fetch when its engine stops, so the
    # close may be short; however long, no scrape waited for it.
    assert seen_closing >= 1 and slowest < 0.5, (seen_closing, slowest)
    assert server.counters()["sessions_ended"] == 1


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
        TALLY["injected"].update({f"memcached prefetch {k}": n for k, n in stalled.injected.items()})
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
        TALLY["injected"].update({f"memcached hedge {k}": n for k, n in stalled.injected.items()})
    assert died is None, summary.errors
    tiers = summary.stats.tiers
    assert tiers["l2"]["hedged"] > 0
    assert ("l2", "hedged") in seen
    assert tiers["durable"]["hits"] == 0  # the other zone's copies sufficed
    assert tiers["l2"]["hits"] == summary.stats.chunks_fetched
