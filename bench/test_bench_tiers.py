"""The network tiers behind L1: memcached (L2) and an S3 server (durable),
each on its own host behind a round-trip delay (bench/netdelay.py: 0.5 ms
to L2, 20 ms to the store, by netem or, without it, a userspace delay line).

- chunk_fetch: one 512 KiB chunk object from L1 (L1Cache.get), L2
  (L2Cluster.get) and the store (DurableStore.get); the figure is the
  median (extra_info fetch_tier).
- cold_l1_restore: a guest reads a random working set of non-zero pages
  (default fault-around) from a Server with an empty L1, the chunks coming
  from a warm L2 or from the store alone; the figure is the guest's time to
  finish the trace (sum of its per-touch times, extra_info restore_ms,
  median over rounds), with the fetcher threads used. Every round's
  checksums are checked against the image.

moto's server (werkzeug) closes every connection after one response, so
each S3 request also pays a TCP handshake: about 2 RTTs plus moto's few ms,
where a real S3 client on a kept-alive connection pays one RTT.
"""

from __future__ import annotations

import contextlib
import shutil
import time

import numpy as np
import pytest
from pymemcache.client.base import Client

from bench import netdelay
from restore.handler import Server
from restore.settings import ServerSettings
from restore.objects import chunk_key
from restore.sample import write_sample_image
from restore.session import DEFAULT_FETCHERS
from restore.snapshot import Snapshot, create_snapshot
from restore.guest import Guest, reads
from restore.testing import expected_sums
from restore.tiers.durable import DurableStore
from restore.tiers.l1 import L1Cache
from restore.tiers.l2 import L2Cluster

P = 4096
SIZE = 64 << 20
CHUNK = 512 * 1024
TOUCHES = 2000
L2_RTT_MS, S3_RTT_MS = 0.5, 20.0


def _probe_ms(fn, n: int) -> float:
    fn()  # connect first
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t)
    return float(np.median(lat) * 1e3)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiers")
    img = d / "mem.img"
    write_sample_image(img, SIZE, seed=5)
    with contextlib.ExitStack() as stack:
        try:
            t = stack.enter_context(netdelay.tiers(l2_rtt_ms=L2_RTT_MS, s3_rtt_ms=S3_RTT_MS))
        except netdelay.NoNamespaces as exc:  # not root: the feature is missing here
            pytest.skip(str(exc))
        store = DurableStore(
            f"s3://{t.bucket}/tiers",
            t.s3_options(),
        )
        l2 = L2Cluster([("az1", [t.l2_address])])
        stack.callback(l2.close)
        create_snapshot(store, img, "bench", chunk_size=CHUNK, warm_l2=l2)
        snap = stack.enter_context(Snapshot.open(store, "bench"))
        # The largest stored chunk: a full 512 KiB object, or near it.
        chunk = max((c for c in snap.manifest.chunks if c.id), key=lambda c: c.stored_len)
        data = store.get(chunk_key(chunk.id))
        l1 = L1Cache(d / "l1-fetch")
        l1.put(chunk.id, data)
        pages = np.fromfile(img, dtype=np.uint8).reshape(-1, P)
        nonzero = np.flatnonzero(pages.any(axis=1)).astype(np.uint64)
        trace = np.random.default_rng(3).permutation(nonzero)[:TOUCHES] * P
        mc = stack.enter_context(contextlib.closing(Client(t.l2_address)))
        probes = {  # what a no-op costs through the delay: its fidelity
            "l2_noop_ms": _probe_ms(mc.version, 100),
            "s3_head_ms": _probe_ms(lambda: store.exists("no-such-object"), 10),
        }
        yield {
            "t": t, "store": store, "l2": l2, "l1": l1, "snap": snap, "chunk": chunk, "data": data,
            "trace": trace, "sums": expected_sums(img, trace), "probes": probes,
        }


@pytest.mark.parametrize("tier", ["l1", "l2", "durable"])
def test_bench_chunk_fetch(benchmark, world, tier):
    cid = world["chunk"].id
    get = {
        "l1": lambda: world["l1"].get(cid),
        "l2": lambda: world["l2"].get(cid),
        "durable": lambda: world["store"].get(chunk_key(cid)),
    }[tier]
    assert get() == world["data"]  # right bytes, and a warm connection
    benchmark.pedantic(get, rounds={"l1": 200, "l2": 100, "durable": 30}[tier], iterations=1)
    t = world["t"]
    benchmark.extra_info.update(
        fetch_tier=tier, method=t.method, stored_bytes=len(world["data"]),
        l2_rtt_ms=t.l2_rtt_ms, s3_rtt_ms=t.s3_rtt_ms, **world["probes"],
    )


@pytest.mark.parametrize(
    "source,fetchers", [("l2", DEFAULT_FETCHERS), ("durable", DEFAULT_FETCHERS), ("durable", 16)]
)
def test_bench_cold_l1_restore(benchmark, world, tmp_path, source, fetchers):
    restore_ms, stats = [], []

    def once():
        l1_dir = tmp_path / f"l1-{len(restore_ms)}"
        server = Server(world["snap"], tmp_path / "g.sock", ServerSettings(fetchers=fetchers, persist_logs=False),
                        l1=L1Cache(l1_dir), l2=world["l2"] if source == "l2" else None).start()
        try:
            with Guest(server.socket_path, memory_size=SIZE) as g:
                res = g.run(reads(world["trace"]), timeout=120)
        finally:
            server.stop()
        shutil.rmtree(l1_dir)
        assert (res.sums == world["sums"]).all(), "the guest read wrong bytes"
        summary = server.summaries[0]
        st = summary.stats
        assert summary.errors == [] and st.chunks_failed == 0
        assert st.chunks_l1 == 0 and st.tiers[source]["hits"] == st.chunks_fetched > 0
        restore_ms.append(res.ns.sum() / 1e6)
        stats.append(st)

    benchmark.pedantic(once, rounds=5 if source == "l2" else 3, iterations=1)
    benchmark.extra_info.update(
        restore_ms=float(np.median(restore_ms)), source=source, fetchers=fetchers, method=world["t"].method,
        chunks_fetched=stats[-1].chunks_fetched, touches=TOUCHES,
        fetch_p50_ms=float(np.median([st.tiers[source]["p50_ms"] for st in stats])),
    )
