"""Fetching chunks with N requests in flight: Python threads vs one asyncio loop.

    python -m bench.fetch_inflight [--objects 96] [--inflight 1,4,16,32]

Against memcached (0.5 ms RTT) and moto's S3 server (20 ms RTT) behind
bench/netdelay (needs root). For each tier and N: the threaded path (N
threads, pymemcache HashClient / DurableStore.get, as restore/fetcher.py)
and the async path (one loop, restore/tiers/amc.py / obstore get_async,
as restore/asyncfetch.py). Prints throughput (MiB/s) and this process's
CPU time per MiB (the servers run in other processes).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor

import obstore

from bench import netdelay
from restore.tiers.amc import Zone
from restore.tiers.durable import DurableStore
from restore.tiers.l2 import L2Cluster

CHUNK = 512 * 1024


def _measure(fn, n_bytes: int) -> tuple[float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    c1, t1 = time.process_time(), time.perf_counter()
    mib = n_bytes / (1 << 20)
    return mib / (t1 - t0), (c1 - c0) * 1e3 / mib


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objects", type=int, default=96)
    ap.add_argument("--inflight", default="1,4,16,32")
    a = ap.parse_args(argv)
    levels = [int(x) for x in a.inflight.split(",")]
    keys = [f"k{i:04d}{'0' * 59}"[:64] for i in range(a.objects)]
    blobs = [os.urandom(CHUNK) for _ in keys]
    total = CHUNK * len(keys)
    with netdelay.tiers() as t:
        print(f"delay: {t.method} ({t.why})")
        opts = t.s3_options()
        store = DurableStore(f"s3://{t.bucket}/fi", opts)
        l2 = L2Cluster([("az1", [t.l2_address])])
        for k, b in zip(keys, blobs):
            store.put(f"chunks/{k}", b)
            l2.put(k, b)
        raw = store._store  # the obstore store (read-only use here)

        misses: list = []

        def threaded(get, n):
            def run():
                with ThreadPoolExecutor(n) as ex:
                    for out in ex.map(get, keys):
                        if out is None:  # L2Cluster: a miss or an error (its pool holds 16 per node)
                            misses.append(1)
                        else:
                            assert len(out) == CHUNK
            return run

        def looped(aget, n):
            def run():
                async def go():
                    sem = asyncio.Semaphore(n)

                    async def one(k):
                        async with sem:
                            out = await aget(k)
                            assert len(out) == CHUNK

                    await asyncio.gather(*(one(k) for k in keys))
                loop.run_until_complete(go())
            return run

        loop = asyncio.new_event_loop()
        zone = Zone("az1", [t.l2_address], connect_timeout=1.0, dead_timeout=5.0)

        async def l2_get(k):
            return await zone.ranked(k)[0].get(k)

        async def s3_get(k):
            return await (await obstore.get_async(raw, f"chunks/{k}")).bytes_async()

        print(f"{'tier':8} {'path':9} {'N':>3} {'MiB/s':>8} {'CPU ms/MiB':>11}")
        for tier, tget, aget in [("l2", l2.get, l2_get), ("durable", lambda k: store.get(f"chunks/{k}"), s3_get)]:
            for n in levels:
                for path, fn in [("threads", threaded(tget, n)), ("asyncio", looped(aget, n))]:
                    fn()  # warm: connections made
                    misses.clear()
                    tput, cpu = _measure(fn, total)
                    note = f"  ({len(misses)} misses)" if misses else ""
                    print(f"{tier:8} {path:9} {n:3d} {tput:8.1f} {cpu:11.2f}{note}", flush=True)
        zone.close()
        loop.close()
        l2.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
