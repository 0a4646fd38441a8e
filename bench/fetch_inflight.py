"""Fetching chunks with N requests in flight: Python threads vs one asyncio loop.

    python -m bench.fetch_inflight [--objects 64] [--inflight 1,4,16,32] [--rounds 5]
                                   [--s3-server auto|s3rver|moto] [--json FILE]

Against memcached (0.5 ms RTT) and an S3 server (20 ms RTT) behind
bench/netdelay (needs root). For each tier and N: the threaded path (N
threads, pymemcache HashClient / DurableStore.get, as restore/fetcher.py)
and the async path (one loop, restore/tiers/amc.py / obstore get_async,
as restore/asyncfetch.py), each fetching every object once, interleaved
round by round. Prints, and keeps as JSON (default bench/results/<UTC
time>-fetch-inflight.json; `python -m bench.report --docs` makes the
table), throughput in MiB/s and this process's CPU time per MiB (the
servers and the delay line run in other processes): medians of the rounds
with their range.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import obstore

from bench import netdelay, results
from restore.tiers.amc import Zone
from restore.tiers.durable import DurableStore
from restore.tiers.l2 import L2Cluster

CHUNK = 512 * 1024
PATHS = ("threads", "asyncio")


def _measure(fn, n_bytes: int) -> dict:
    c0, t0 = time.process_time(), time.perf_counter()
    misses = fn()
    c1, t1 = time.process_time(), time.perf_counter()
    mib = n_bytes / (1 << 20)
    return {"mib_s": mib / (t1 - t0), "cpu_ms_per_mib": (c1 - c0) * 1e3 / mib, "misses": misses}


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give whole numbers, e.g. 1,4,16,32") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers of at least 1")
    return levels


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objects", type=int, default=64)
    ap.add_argument("--inflight", type=_levels, default=[1, 4, 16, 32], metavar="N,N,...")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--s3-server", choices=netdelay.S3_SERVERS, default="auto")
    ap.add_argument("--json", default=None, help="where to keep the rounds (default: bench/results/<UTC time>-"
                                                  "fetch-inflight.json)")
    a = ap.parse_args(argv)
    started = results.now()
    keys = [f"k{i:04d}{'0' * 59}"[:64] for i in range(a.objects)]
    blobs = [os.urandom(CHUNK) for _ in keys]
    total = CHUNK * len(keys)
    raw: dict[str, list[dict]] = {}
    with netdelay.tiers(s3_server=a.s3_server) as t:
        print(f"delay: {t.method} ({t.why}); S3 server: {t.s3_server}", flush=True)
        store = DurableStore(f"s3://{t.bucket}/fi", t.s3_options())
        l2 = L2Cluster([("az1", [t.l2_address])])
        for k, b in zip(keys, blobs):
            store.put(f"chunks/{k}", b)
            l2.put(k, b)
        raw_store = store._store  # the obstore store (read-only use here)
        loop = asyncio.new_event_loop()
        zone = Zone("az1", [t.l2_address], connect_timeout=1.0, dead_timeout=5.0)

        def threaded(get, n):
            def run():
                with ThreadPoolExecutor(n) as ex:
                    got = list(ex.map(get, keys))
                # L2Cluster reads a miss or an error (its pool holds 16 per node) as None
                assert all(g is None or len(g) == CHUNK for g in got)
                return sum(g is None for g in got)
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
                return 0
            return run

        async def l2_get(k):
            return await zone.ranked(k)[0].get(k)

        async def s3_get(k):
            return await (await obstore.get_async(raw_store, f"chunks/{k}")).bytes_async()

        tiers = [("l2", l2.get, l2_get), ("durable", lambda k: store.get(f"chunks/{k}"), s3_get)]
        for tier, tget, aget in tiers:  # connections made before the first round
            threaded(tget, max(a.inflight))()
            looped(aget, max(a.inflight))()
        for r in range(a.rounds):
            for tier, tget, aget in tiers:
                for n in a.inflight:
                    for path, fn in zip(PATHS, (threaded(tget, n), looped(aget, n))):
                        raw.setdefault(f"{tier}/{path}/{n}", []).append(_measure(fn, total))
            print(f"round {r + 1} of {a.rounds}", flush=True)
        zone.close()
        loop.close()
        l2.close()
    doc = results.bench_document("fetch_inflight", "bench.fetch_inflight", argv,
                                 {**vars(a), "object_bytes": CHUNK, "s3_server": t.s3_server, "delay": t.why},
                                 started, raw)
    from bench.report import fetch_inflight_section

    print(fetch_inflight_section(doc))
    path = results.write(doc, Path(a.json) if a.json else results.default_path(kind="fetch-inflight"))
    print(f"raw: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
