"""A file:// store's chunk objects: restore's own file calls against obstore's.

    python -m bench.local_store [--size-mib 1024] [--rounds 7] [--json FILE]

DurableStore reads and writes the chunk objects of a file:// store with
plain file calls, in obstore's layout (restore/tiers/durable.py); this
measures that choice against obstore's local store doing the same, side by
side. The objects are those of a snapshot of a sample image (half zero
pages, 20 % random; made once, untimed). Each way moves every object on one
thread per core, each thread taking the next object as creation's encoders
and export's decoders do:

  get/direct    DurableStore.get
  get/obstore   obstore.get(...).bytes() on a LocalStore of the same directory
  put/direct    DurableStore.put_new, into a new directory
  put/obstore   obstore.put(..., mode="create"), into a new directory

Rounds interleave the ways. Cache state, alike for both ways: before a get
round every object is read, untimed, so all are in the page cache (the
share mincore then finds resident is kept with the round); before a put
round dirty pages are synced, and every put round writes a new directory,
removed only when the run ends (this disk discards deleted blocks, which
would weigh on the next round's writes). Prints medians with their ranges
of the time, MiB/s and this process's CPU ms per MiB, and keeps every round
as JSON (default bench/results/<UTC time>-local-store.json; `python -m
bench.report --docs docs/benchmarks.md` makes the table).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from statistics import median

import obstore
from obstore.store import LocalStore

from bench import results
from bench.create_speed import each_on_cores, warm
from restore.objects import chunk_key
from restore.sample import write_sample_image
from restore.snapshot import create_snapshot
from restore.tiers.durable import DurableStore

WAYS = ("get/direct", "get/obstore", "put/direct", "put/obstore")


class Run:
    def __init__(self, work: Path, size: int):
        self.work = work
        self.source = work / "source"
        image = work / "image.img"
        write_sample_image(image, size, seed=1, zero=0.5, random=0.2)
        manifest = create_snapshot(DurableStore(f"file://{self.source}"), image, "bench")
        image.unlink()
        self.keys = sorted({chunk_key(c.id) for c in manifest.chunks if c.id})
        self.data = {k: (self.source / k).read_bytes() for k in self.keys}  # what the puts write
        self.bytes = sum(len(v) for v in self.data.values())
        self.n = 0

    def round(self, way: str) -> dict:
        op, how = way.split("/")
        extra = {}
        if op == "get":
            extra["cached"] = warm([self.source / "chunks"])
            store = DurableStore(f"file://{self.source}")
            local = LocalStore(self.source)
            if how == "direct":
                def work(key: str) -> None:
                    if store.get(key) is None:
                        raise RuntimeError(f"{key} is missing from {self.source}")
            else:
                def work(key: str) -> None:
                    obstore.get(local, key).bytes()
        else:
            os.sync()
            self.n += 1
            dest = self.work / f"{how}-{self.n}"
            store = DurableStore(f"file://{dest}")
            local = LocalStore(dest)
            if how == "direct":
                def work(key: str) -> None:
                    store.put_new(key, self.data[key])
            else:
                def work(key: str) -> None:
                    obstore.put(local, key, self.data[key], mode="create")
        c0, t0 = time.process_time(), time.perf_counter()
        each_on_cores(len(self.keys), lambda i: work(self.keys[i]))
        s, cpu = time.perf_counter() - t0, time.process_time() - c0
        if op == "put":  # every object there, byte for byte
            for key in self.keys:
                if (dest / key).read_bytes() != self.data[key]:
                    raise RuntimeError(f"{way}: {key} does not hold what was put")
        mib = self.bytes / 2**20
        return {"s": s, "mib_s": mib / s, "cpu_ms_per_mib": cpu * 1e3 / mib, **extra}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="the sample image's size in MiB (default 1024)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", type=Path, default=None, help="where to keep the rounds")
    args = ap.parse_args(argv)
    started = results.now()
    raw: dict[str, list[dict]] = {w: [] for w in WAYS}
    work = Path(tempfile.mkdtemp(prefix="restore-local-store-"))
    try:
        run = Run(work, args.size_mib << 20)
        print(f"{len(run.keys)} chunk objects, {run.bytes / 2**20:.1f} MiB, {os.cpu_count()} threads")
        for r in range(args.rounds):
            for way in WAYS:
                raw[way].append(run.round(way))
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = results.bench_document("local_store", "bench.local_store", argv,
                                 {"size": args.size_mib << 20, "rounds": args.rounds, "objects": len(run.keys),
                                  "object_bytes": run.bytes}, started, raw)
    path = results.write(doc, args.json or results.default_path(kind="local-store"))
    print(f"\nmedian [min-max] of {args.rounds} interleaved rounds")
    for way, rounds in raw.items():
        s = [x["s"] * 1e3 for x in rounds]
        cpu = [x["cpu_ms_per_mib"] for x in rounds]
        print(f"{way:12s} {median(s):7.0f} ms [{min(s):.0f}-{max(s):.0f}]   "
              f"CPU {median(cpu):.2f} ms/MiB [{min(cpu):.2f}-{max(cpu):.2f}]")
    print(f"kept as {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
