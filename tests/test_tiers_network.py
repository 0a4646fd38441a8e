"""The network tiers against real servers: three memcached processes as an
L2 cluster and moto's S3 server spoken to over HTTP. Guests always end with
the image's bytes or poisoned pages, never wrong ones."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time

import numpy as np
import pytest

from daemon import wait_for

from restore.errors import InputError
from restore.handler import Server
from restore.settings import ServerSettings
from restore.layout import optimize_snapshot
from restore.objects import chunk_key
from restore.snapshot import Snapshot, create_snapshot
from restore.guest import Guest, GuestError, reads, remove
from restore.testing import expected_sums
from restore.tiers.durable import DurableStore
from restore.tiers.l1 import L1Cache
from restore.tiers.l2 import L2Cluster, parse_zone
from restore.workingset import save_plan

P = 4096
CHUNK = 256 * 1024
SIZE = 8 << 20


@pytest.fixture(scope="module")
def image(make_image):
    return make_image(SIZE, seed=31)


@pytest.fixture
def s3_store(s3_server):
    return DurableStore("s3://snapshots/fleet", s3_server.options())


@pytest.fixture
def l2(memcached_cluster):
    cluster = L2Cluster([("az1", [n.address for n in memcached_cluster])], dead_timeout=1.0)
    yield cluster
    cluster.close()


def _nonzero_offsets(image, every=1):
    pages = np.fromfile(image, dtype=np.uint8).reshape(-1, P)
    return np.flatnonzero(pages.any(axis=1))[::every].astype(np.uint64) * P


def _serve_one(snap, tmp_path, offsets, image, **server_kw):
    settings, server_kw = ServerSettings.take(server_kw)
    server = Server(snap, tmp_path / f"g{time.monotonic_ns()}.sock", settings, **server_kw).start()
    try:
        with Guest(server.socket_path, memory_size=SIZE) as g:
            res = g.run(reads(offsets), timeout=120)
        assert (res.sums == expected_sums(image, offsets)).all()
        deadline = time.monotonic() + 10
        while not server.summaries:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return server.summaries[0]
    finally:
        server.stop()


def test_snapshot_in_s3_create_verify_and_restore(tmp_path, s3_store, image):
    m = create_snapshot(s3_store, image, "vm", chunk_size=CHUNK, uploads=8)
    with Snapshot.open(s3_store, "vm") as snap:
        assert snap.verify() == []
        summary = _serve_one(snap, tmp_path, _nonzero_offsets(image, 3), image, l1=L1Cache(tmp_path / "l1"))
    st = summary.stats
    assert st.chunks_fetched > 0 and st.tiers["durable"]["hits"] == st.chunks_fetched
    assert m.uploaded_bytes > 0 and summary.errors == []


def test_cli_create_and_serve_through_s3(tmp_path, s3_server, image, run_cli, monkeypatch):
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "RESTORE_S3_REGION": "us-east-1",
           "RESTORE_S3_ENDPOINT": s3_server.endpoint}
    url = "s3://snapshots/cli"
    run_cli("snapshot", "create", str(image), "--name", "fn", "--store", url, env=env, check=True)
    out = run_cli("snapshot", "verify", "fn", "--store", url, env=env, check=True).stdout
    assert out == f"fn/1: all {SIZE // (512 * 1024)} chunks verified\n"
    tried = run_cli("try", "fn", "--pages", "200", "--store", url, env=env, check=True).stdout
    assert "every page matches the snapshot" in tried
    assert re.search(r"durable:\s+[1-9]\d* hits of [1-9]\d* requests", tried), tried


def test_warm_l2_serves_a_cold_worker(tmp_path, s3_store, l2, image):
    create_snapshot(s3_store, image, "vm", chunk_size=CHUNK, warm_l2=l2)
    with Snapshot.open(s3_store, "vm") as snap:
        summary = _serve_one(snap, tmp_path, _nonzero_offsets(image, 2), image, l1=L1Cache(tmp_path / "l1"), l2=l2)
    tiers = summary.stats.tiers
    assert tiers["l2"]["hits"] == summary.stats.chunks_fetched > 0
    assert tiers["durable"]["requests"] == 0


def test_optimize_warms_l2_with_the_new_version(tmp_path, s3_store, l2, image):
    create_snapshot(s3_store, image, "vm", chunk_size=CHUNK)
    offsets = _nonzero_offsets(image, 2)
    with Snapshot.open(s3_store, "vm") as snap:
        save_plan(s3_store, snap.manifest, offsets[:64], [], 1.0)
        v2 = optimize_snapshot(snap, warm_l2=l2).manifest
    with Snapshot.open(s3_store, "vm", v2.version) as snap:
        summary = _serve_one(snap, tmp_path, offsets, image, l1=L1Cache(tmp_path / "l1"), l2=l2)
    tiers = summary.stats.tiers
    assert tiers["l2"]["hits"] == summary.stats.chunks_fetched > 0
    assert tiers["durable"]["requests"] == 0


def test_a_diff_with_warm_l2_puts_every_chunk_of_its_version_in_l2(tmp_path, s3_store, l2, image):
    """--base --warm-l2: the L2 gets the chunks the diff wrote and the
    base's chunks the version takes as they are (read from the store)."""
    v1 = create_snapshot(s3_store, image, "diffvm", chunk_size=CHUNK)  # no L2 warming
    diff = tmp_path / "diff.mem"
    with open(diff, "wb") as f:
        f.truncate(SIZE)
        f.seek(CHUNK + 3 * P)
        f.write(np.random.default_rng(5).bytes(P))
    v2 = create_snapshot(s3_store, diff, "diffvm", base=v1.version, warm_l2=l2)
    ids = {c.id for c in v2.chunks if c.id}
    assert len(ids) > 1 and v2.chunks[1].id != v1.chunks[1].id  # a new chunk, and some of the base's
    assert {c.id for c in v2.chunks} & {c.id for c in v1.chunks}
    for chunk_id in ids:
        assert l2.get(chunk_id) == s3_store.get(chunk_key(chunk_id)), chunk_id


FETCH_PATHS = pytest.mark.parametrize("fetch_loop", [True, False], ids=["fetch-loop", "fetch-threads"])


@FETCH_PATHS
def test_l2_miss_reads_the_store_and_fills_l2(tmp_path, s3_store, l2, image, fetch_loop):
    create_snapshot(s3_store, image, "vm", chunk_size=CHUNK)
    with Snapshot.open(s3_store, "vm") as snap:
        first = _serve_one(snap, tmp_path, _nonzero_offsets(image, 2), image, l2=l2, fetch_loop=fetch_loop)
        assert first.stats.tiers["l2"]["hits"] == 0
        assert first.stats.tiers["durable"]["hits"] == first.stats.chunks_fetched
        second = _serve_one(snap, tmp_path, _nonzero_offsets(image, 2), image, l2=l2, fetch_loop=fetch_loop)
    assert second.stats.tiers["l2"]["hits"] == second.stats.chunks_fetched
    assert second.stats.tiers["durable"]["requests"] == 0
    # The same chunks, so the same stored bytes: from the store, then from L2.
    assert first.stats.tiers["l2"]["bytes"] == 0 == second.stats.tiers["durable"]["bytes"]
    assert second.stats.tiers["l2"]["bytes"] == first.stats.tiers["durable"]["bytes"] > 0


def test_an_l2_node_killed_mid_restore(tmp_path, s3_store, l2, memcached_cluster, image):
    create_snapshot(s3_store, image, "vm", chunk_size=CHUNK, warm_l2=l2)
    offsets = _nonzero_offsets(image)
    with Snapshot.open(s3_store, "vm") as snap:
        server = Server(snap, tmp_path / "k.sock", ServerSettings(fault_around=1), l2=l2).start()
        try:
            g = Guest(server.socket_path, memory_size=SIZE).start(reads(offsets))
            while server.active() == 0:
                time.sleep(0.002)
            time.sleep(0.02)
            memcached_cluster[1].kill()
            res = g.wait(120)
            g.close()
            assert (res.sums == expected_sums(image, offsets)).all()
        finally:
            server.stop()
    st = server.summaries[0].stats
    assert st.first_touches["failed"] == 0
    assert st.tiers["l2"]["hits"] + st.tiers["durable"]["hits"] == st.chunks_fetched


@FETCH_PATHS
def test_a_corrupt_l2_value_is_dropped_and_repaired(tmp_path, s3_store, l2, memcached_cluster, image,
                                                    fetch_loop):
    from pymemcache.client.base import Client

    m = create_snapshot(s3_store, image, "vm", chunk_size=CHUNK, warm_l2=l2)
    idx = next(i for i, c in enumerate(m.chunks) if c.id)
    cid = m.chunks[idx].id
    good = s3_store.get(chunk_key(cid))
    # Overwrite the value on every node, behind the cluster's back.
    for node in memcached_cluster:
        Client(node.address).set(cid, good[:-1] + bytes([good[-1] ^ 1]))
    offs = [o for o in _nonzero_offsets(image) if o // CHUNK == idx][:3]
    with Snapshot.open(s3_store, "vm") as snap:
        summary = _serve_one(snap, tmp_path, offs, image, l2=l2, fetch_loop=fetch_loop)
    assert summary.stats.tiers["l2"]["bad"] == 1
    assert summary.stats.tiers["durable"]["hits"] == 1
    assert l2.counters.bad == 1
    assert l2.get(cid) == good  # repaired after the durable read


def test_s3_down_for_a_moment_is_retried(tmp_path, s3_server, s3_store, image):
    create_snapshot(s3_store, image, "vm", chunk_size=CHUNK)
    offsets = _nonzero_offsets(image, 4)
    with Snapshot.open(s3_store, "vm") as snap:
        server = Server(snap, tmp_path / "r.sock").start()
        try:
            s3_server.stop()
            g = Guest(server.socket_path, memory_size=SIZE).start(reads(offsets))
            # A fault waits on a fetch from the store, which is down: the
            # fetch is being retried now.
            wait_for(lambda: server.parked()["on_network"] > 0, "no fault ever waited on the store")
            s3_server.start()
            res = g.wait(60)
            g.close()
            assert (res.sums == expected_sums(image, offsets)).all()
        finally:
            server.stop()
    assert server.summaries[0].errors == []


def test_s3_gone_past_the_deadline_poisons_and_the_server_goes_on(tmp_path, s3_server, image):
    store = DurableStore("s3://snapshots/gone", s3_server.options(deadline=1.0))
    create_snapshot(store, image, "vm", chunk_size=CHUNK)
    pages = np.fromfile(image, dtype=np.uint8).reshape(-1, P)
    data_page = int(np.flatnonzero(pages.any(axis=1))[0]) * P
    zero_page = int(np.flatnonzero(~pages.any(axis=1))[0]) * P
    with Snapshot.open(store, "vm") as snap:
        server = Server(snap, tmp_path / "d.sock").start()
        try:
            s3_server.stop()
            with Guest(server.socket_path, memory_size=SIZE) as g:
                with pytest.raises(GuestError, match="SIGBUS"):
                    g.run(reads([data_page]), timeout=60)
            deadline = time.monotonic() + 10
            while not server.summaries:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            errors = server.summaries[0].errors
            assert len(errors) == 1 and f"chunk {data_page // CHUNK} " in errors[0]
            assert "giving up, its pages are poisoned" in errors[0] and "failed" in errors[0]
            # Another guest, on pages that need no fetch, is still served.
            with Guest(server.socket_path, memory_size=SIZE) as g:
                assert (g.run(reads([zero_page]), timeout=60).sums == 0).all()
        finally:
            s3_server.start()
            server.stop()


def test_an_unwritable_l1_warns_once_and_serving_goes_on(tmp_path, s3_store, image, caplog):
    create_snapshot(s3_store, image, "vm", chunk_size=CHUNK)
    l1 = L1Cache(tmp_path / "l1")
    for i in range(256):  # every entry directory is a file: no write can succeed
        (tmp_path / "l1" / f"{i:02x}").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="restore.fetcher"):
        with Snapshot.open(s3_store, "vm") as snap:
            summary = _serve_one(snap, tmp_path, _nonzero_offsets(image, 2), image, l1=l1)
    assert summary.stats.chunks_fetched > 1
    warnings = [r for r in caplog.records if "cannot write to L1" in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.parametrize(
    "spec,message",
    [
        ("az1", "L2 zone 'az1' is not NAME=HOST:PORT[,HOST:PORT...]"),
        ("=h:1", "L2 zone '=h:1' is not NAME=HOST:PORT[,HOST:PORT...]"),
        ("az1=host", "L2 zone az1: node 'host' is not HOST:PORT"),
        ("az1=host:99999", "L2 zone az1: node 'host:99999' is not HOST:PORT"),
        ("az1=h:1,:2", "L2 zone az1: node ':2' is not HOST:PORT"),
    ],
)
def test_bad_l2_specs(spec, message):
    with pytest.raises(InputError, match=re.escape(message)):
        parse_zone(spec)
    assert parse_zone("az2=10.0.0.1:11211,h:5") == ("az2", [("10.0.0.1", 11211), ("h", 5)])


class _HeldStore(DurableStore):
    """The S3 store with reads of some keys held on the network until
    released (a prefetch stuck behind a slow server). Records, for every
    other read, whether a held read was in flight when it began."""

    def __init__(self, url, options, held):
        super().__init__(url, options)
        self.held = set(held)
        self.release = threading.Event()
        self.holding = 0
        self.others: list[tuple[str, bool]] = []  # (key, a held read was in flight)

    async def get_async(self, key):
        if key not in self.held:
            self.others.append((key, self.holding > 0))
            return await super().get_async(key)
        self.holding += 1
        try:
            while not self.release.is_set():
                await asyncio.sleep(0.005)
        finally:
            self.holding -= 1
        return await super().get_async(key)


def test_a_demand_fetch_overtakes_prefetches_holding_every_slot(tmp_path, s3_server, image):
    """One request in flight at most (fetchers=1), held by a prefetch the
    server does not answer: a fault on another chunk is still fetched at
    once, not after the prefetch."""
    store = DurableStore("s3://snapshots/overtake", s3_server.options())
    create_snapshot(store, image, "vm", chunk_size=CHUNK)
    offsets = _nonzero_offsets(image)
    chunks = offsets // CHUNK
    data_chunks = np.unique(chunks)
    planned = offsets[chunks == data_chunks[0]]  # the plan: the first chunk with data, held
    wanted = offsets[chunks == data_chunks[-1]][:1]  # the guest's page: the last one's, not planned
    with Snapshot.open(store, "vm") as snap:
        m = snap.manifest
        save_plan(store, m, planned, [], 1.0)
        held = _HeldStore(store.url, s3_server.options(), {chunk_key(m.chunks[int(data_chunks[0])].id)})
        # First, faults that need no fetch, while the prefetch takes the
        # slot: a zero chunk's pages read, dropped and read again.
        zero = next(c for c, e in enumerate(m.chunks) if not e.id) * CHUNK
        pages = np.arange(zero, zero + CHUNK, P, dtype=np.uint64)
        idle = [np.concatenate([reads(pages), remove(zero, CHUNK // P)]) for _ in range(200)]
    ops = np.concatenate([*idle, reads(wanted)])
    key = chunk_key(m.chunks[int(data_chunks[-1])].id)
    # A loaded machine may start the guest's fetch before the prefetch's:
    # then the run proves nothing, and another is made.
    for attempt in range(3):
        held.release.clear()
        held.others.clear()
        with Snapshot.open(held, "vm") as snap:
            with Server(snap, tmp_path / f"o{attempt}.sock", ServerSettings(fetchers=1, fault_around=1),
                        l1=L1Cache(tmp_path / f"l1-{attempt}")) as server:
                try:
                    with Guest(server.socket_path, memory_size=SIZE) as g:
                        res = g.run(ops, timeout=60)  # not done while the prefetch holds: GuestTimeout
                finally:
                    held.release.set()
        assert (res.sums[-1:] == expected_sums(image, wanted)).all()
        assert server.summaries[-1].stats.prefetch_chunks == 1
        if (key, True) in held.others:  # fetched while the held prefetch was in flight
            break
    else:
        pytest.fail(f"the prefetch never held the slot before the guest's fault: {held.others}")
