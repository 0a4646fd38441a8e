"""Demand-fault round trips with the service thread polling or sleeping.

    python -m bench.fault_poll [--rounds 7] [--poll-us 0,20,50,100,200] [--json out.json]

One guest process reads TOUCHES random non-zero pages of a 128 MiB image,
one fault per touch (fault-around 1), served by:
  bare/one-cpu   the bare C handler (one UFFDIO_COPY per fault, from memory)
                 with guest and handler on one CPU: the floor
  bare/free      the same, placed by the scheduler
  bare/split     the same, handler on one CPU and guest on the other: every
                 fault wakes a thread on the other CPU
  engine/free/N  restore's engine from a warm host cache, guest and handler
                 placed by the scheduler, with poll_us = N
  engine/split/N the same, handler and guest on different CPUs
Rounds are interleaved (one of each per round). Per configuration: the
median over rounds of the guest's per-touch p50, with the rounds' min-max,
and the service thread's polling CPU time per restore (engine). Raw
per-round figures go to --json.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from bench import results
from restore.handler import Server
from restore.settings import ServerSettings
from restore.protocol import accept_handshake
from restore.sample import write_sample_image
from restore.snapshot import Snapshot, create_snapshot
from restore.guest import Guest, reads
from restore.testing import BareHandler
from restore.tiers.durable import DurableStore
from restore.tiers.host import HostCache

P = 4096
SIZE = 128 << 20
CHUNK = 512 * 1024
TOUCHES = 15000


@contextmanager
def placement(where: str, role: str = "both"):
    """Threads and children started inside inherit this thread's CPU set:
    one-cpu puts everything on the first CPU; split puts the handler
    (role "handler") on the first and the guest (role "guest") on the
    second; free leaves them to the scheduler."""
    old = os.sched_getaffinity(0)
    cpus = sorted(old)
    if where == "one-cpu" or (where == "split" and role == "handler"):
        os.sched_setaffinity(0, {cpus[0]})
    elif where == "split":
        os.sched_setaffinity(0, {cpus[-1]})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def bare_once(data: bytes, trace, path: Path, where: str):
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(path))
    lsock.listen(1)
    with BareHandler(data) as bare, Guest(str(path), memory_size=SIZE) as g:
        with placement(where, "guest"):
            g.start(reads(trace))
        conn, _ = lsock.accept()
        hs = accept_handshake(conn, memory_size=SIZE, snapshot_page_size=P, chunk_size=CHUNK)
        with placement(where, "handler"):
            bare.serve(hs.uffd, [(r.base, r.size, r.offset) for r in hs.regions], hs.page_size)
        res = g.wait(60)
        bare.stop()
        hs.close()
        conn.close()
    lsock.close()
    path.unlink()
    return res, None


def engine_once(snap, host, trace, path: Path, poll_us: int, where: str):
    with placement(where, "handler"):  # the accept thread, and so the session's threads
        server = Server(snap, path, ServerSettings(fault_around=1, persist_logs=False, use_plan=False, poll_us=poll_us),
                        host_cache=host).start()
    try:
        with Guest(server.socket_path, memory_size=SIZE) as g:
            with placement(where, "guest"):
                g.start(reads(trace))
            res = g.wait(60)
    finally:
        server.stop()
    return res, server.summaries[-1].stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--poll-us", default="0,20,50,100,200")
    ap.add_argument("--json", default=None, help="write the raw per-round figures here")
    args = ap.parse_args(argv)
    started = results.now()
    polls = [int(x) for x in args.poll_us.split(",")]
    with tempfile.TemporaryDirectory(prefix="restore-fault-") as tmp:
        d = Path(tmp)
        img = d / "mem.img"
        write_sample_image(img, SIZE, seed=4)
        store = DurableStore(f"file://{d}/store")
        create_snapshot(store, img, "bench", chunk_size=CHUNK)
        data = img.read_bytes()
        pages = np.frombuffer(data, dtype=np.uint8).reshape(-1, P)
        nonzero = np.flatnonzero(pages.any(axis=1)).astype(np.uint64)
        trace = np.random.default_rng(1).permutation(nonzero)[:TOUCHES] * P
        host = HostCache(d / "host")
        with Snapshot.open(store, "bench") as snap:
            engine_once(snap, host, trace, d / "warm.sock", 0, "free")  # fill the host cache
            configs = ([("bare/one-cpu", None), ("bare/free", None), ("bare/split", None)]
                       + [(f"engine/free/{n}", n) for n in polls] + [(f"engine/split/{n}", n) for n in polls])
            raw = {name: [] for name, _ in configs}
            for r in range(args.rounds):
                for name, poll in configs:
                    where = name.split("/")[1]
                    with placement("one-cpu" if where == "one-cpu" else "free"):
                        if poll is None:
                            res, st = bare_once(data, trace, d / "bare.sock", where)
                        else:
                            res, st = engine_once(snap, host, trace, d / "e.sock", poll, where)
                    if not (res.sums == pages[(trace // P).astype(np.int64)].view("<u8").sum(axis=1,
                                                                                          dtype=np.uint64)).all():
                        raise RuntimeError(f"{name}: the guest read wrong bytes")
                    raw[name].append({"p50_ns": float(np.median(res.ns)), "total_ms": res.total_ns / 1e6,
                                      "poll_ms": st.poll_ns / 1e6 if st else 0.0,
                                      "poll_hits": st.poll_hits if st else 0,
                                      "chunks_host": st.chunks_host if st else 0})
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    floor = float(np.median([x["p50_ns"] for x in raw["bare/one-cpu"]]))
    print(f"\ndemand fault p50 as the guest sees it ({TOUCHES} random faults, fault-around 1, host cache warm); "
          f"median of {args.rounds} interleaved rounds [min-max]")
    print(f"{'configuration':<20}{'p50 us':>8}{'range':>16}{'/ bare one-cpu':>16}{'poll CPU ms':>13}"
          f"{'restore ms':>12}")
    for name, rows in raw.items():
        p = [x["p50_ns"] / 1e3 for x in rows]
        med = float(np.median(p))
        print(f"{name:<20}{med:8.2f}{f'{min(p):.2f}-{max(p):.2f}':>16}{med * 1e3 / floor:15.2f}x"
              f"{float(np.median([x['poll_ms'] for x in rows])):13.2f}"
              f"{float(np.median([x['total_ms'] for x in rows])):12.1f}")
    if args.json:
        doc = results.bench_document("fault_poll", "bench.fault_poll", argv, vars(args), started, raw)
        results.write(doc, Path(args.json))
        print(f"raw: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
