"""Demand faults as the guest sees them: the engine serving from a warm L1
against a bare C handler (one UFFDIO_COPY per fault from an image in
memory, no tiers, no bookkeeping), with the same guest process and trace,
in one run.

- roundtrip: a random trace over the image's non-zero pages, one fault per
  touch (fault-around 1 for the engine); the figure is the p50 of the
  guest's per-touch time (extra_info p50_ns), compared with the bare
  handler's in the summary. Placement "one-cpu" runs handler and guest on
  CPU 0 (the handler's cost per fault, like for like); "free" lets the
  scheduler place them, which on these VMs adds a cross-vCPU wake-up of
  ~40 us whenever handler and guest land on different CPUs.
- fault_around: a sequential sweep and a random trace for several
  fault-around sizes; the figure is the guest's total time touching its
  memory (extra_info touch_ms, median over rounds), which is what a
  restore costs the guest (the default, DEFAULT_FAULT_AROUND, is chosen
  from it).
"""

from __future__ import annotations

import numpy as np
import pytest

from bench.fault_poll import bare_once
from bench.fault_poll import placement as placement_of
from restore.handler import Server
from restore.sample import write_sample_image
from restore.snapshot import Snapshot, create_snapshot
from restore.testing import Guest, reads
from restore.tiers.durable import DurableStore
from restore.tiers.l1 import L1Cache

P = 4096
SIZE = 128 << 20
CHUNK = 512 * 1024
TOUCHES = 15000


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("fault")
    img = d / "mem.img"
    write_sample_image(img, SIZE, seed=4)
    store = DurableStore(f"file://{d}/store")
    create_snapshot(store, img, "bench", chunk_size=CHUNK)
    snap = Snapshot.open(store, "bench")
    l1 = L1Cache(d / "l1")
    snap.fill_l1(l1)  # warm L1
    data = img.read_bytes()
    pages = np.frombuffer(data, dtype=np.uint8).reshape(-1, P)
    nonzero = np.flatnonzero(pages.any(axis=1)).astype(np.uint64)
    rng = np.random.default_rng(1)
    trace = rng.permutation(nonzero)[:TOUCHES] * P
    yield {"dir": d, "data": data, "snap": snap, "l1": l1, "trace": trace}
    snap.close()


def _engine_once(world, path, fault_around, trace):
    with Server(world["snap"], path, l1=world["l1"], fault_around=fault_around, persist_logs=False) as server:
        with Guest(server.socket_path, memory_size=SIZE) as g:
            return g.run(reads(trace), timeout=60)


@pytest.mark.parametrize("placement", ["one-cpu", "free"])
@pytest.mark.parametrize("handler", ["bare", "engine"])
def test_bench_fault_roundtrip(benchmark, world, handler, placement):
    p50s = []
    path = world["dir"] / f"{handler}.sock"

    def once():
        with placement_of(placement):
            if handler == "bare":
                res, _ = bare_once(world["data"], world["trace"], path, placement)
            else:
                res = _engine_once(world, path, 1, world["trace"])
        p50s.append(float(np.median(res.ns)))

    benchmark.pedantic(once, rounds=5, iterations=1)
    benchmark.extra_info["p50_ns"] = float(np.median(p50s))
    benchmark.extra_info["role"] = ("floor" if handler == "bare" else "engine") + ":" + placement


@pytest.mark.parametrize("fault_around", [1, 4, 16, 32, 64, 128])
@pytest.mark.parametrize("order", ["sequential", "random"])
def test_bench_fault_around(benchmark, world, fault_around, order):
    if order == "sequential":
        trace = np.arange(0, SIZE, P, dtype=np.uint64)
    else:
        trace = np.random.default_rng(2).permutation(SIZE // P).astype(np.uint64)[: SIZE // P // 4] * P
    path = world["dir"] / f"fa{fault_around}{order}.sock"
    touch_ms = []
    benchmark.pedantic(
        lambda: touch_ms.append(_engine_once(world, path, fault_around, trace).ns.sum() / 1e6), rounds=3, iterations=1
    )
    benchmark.extra_info["touch_ms"] = float(np.median(touch_ms))
