"""Demand faults as the guest sees them: the same guest process and trace
served by three handlers, in one run.

- bare: the bare C handler (restore.testing.BareHandler): one UFFDIO_COPY
  per fault from the image in memory; no chunks, no tiers, no
  bookkeeping. The floor.
- engine-l1: restore's engine (an in-process restore.handler.Server), L1
  warm (every chunk object on local disk), no host cache. The first fault
  on a chunk reads its object from L1, verifies it (SHA-256) and decodes
  it (lz4) on the fault path; later faults on it install from that
  decoded copy.
- engine-host: the engine with a warm host cache (every chunk of the trace
  decoded into it by an untimed restore first) and no L1. The first fault
  on a chunk maps it from the host cache: no read, no verify, no decode.

roundtrip: a random trace over the image's non-zero pages (each page
once), fault-around 1, so every touch is one fault. The touches split by
the state of the touched page's chunk (chunk = offset // CHUNK):
- fresh: the first touch of its chunk in the trace; the chunk is not yet
  decoded in this restore (engine-l1 reads, verifies and decodes it;
  engine-host maps it from the host cache);
- decoded: every later touch; the chunk is already decoded and held by
  the session.
About 1.7 % of the touches are fresh, so the p50 over all touches is the
decoded p50. The bare handler has no chunks: its touches are split at the
same trace positions, which gives like-for-like floors. Figures, per
class: the p50 and p99 of the guest's per-touch time (ns) in each round,
median over rounds (extra_info p50_ns_decoded, p99_ns_decoded,
p50_ns_fresh, p99_ns_fresh, with touches_decoded and touches_fresh);
p50_ns and p99_ns count every touch. Each engine round's stats must show
each chunk of the trace decoded once from L1 (engine-l1) or taken once
from the host cache (engine-host), and none released and loaded again,
or the split would be wrong and the benchmark fails.

Placement "one-cpu" runs handler and guest on CPU 0 (the handler's cost
per fault, like for like); "free" lets the scheduler place them, which on
these VMs adds a cross-vCPU wake-up of ~40 us whenever handler and guest
land on different CPUs.

fault_around (engine-l1 only): a sequential sweep and a random trace for
several fault-around sizes; the figure is the guest's total time touching
its memory (extra_info touch_ms, median over rounds), which is what a
restore costs the guest (the default, DEFAULT_FAULT_AROUND, is chosen
from it).

Every round checks what the guest read: each touch's checksum against the
image (expected_sums), for every handler.
"""

from __future__ import annotations

import numpy as np
import pytest

from bench.fault_poll import bare_once
from bench.fault_poll import placement as placement_of
from restore.handler import Server
from restore.settings import ServerSettings
from restore.guest import Guest, reads
from restore.testing import expected_sums
from restore.tiers.host import HostCache

P = 4096
SIZE = 128 << 20
CHUNK = 512 * 1024
TOUCHES = 15000

SERVES_FROM = {
    "bare": "bare C handler, image in memory",
    "engine-l1": "engine, L1 warm, no host cache",
    "engine-host": "engine, host cache warm, no L1",
}


@pytest.fixture(scope="module")
def world(warm_l1_snapshot):
    made = warm_l1_snapshot("fault", SIZE, seed=4, chunk_size=CHUNK)
    d, snap, l1 = made.dir, made.snap, made.l1
    data = made.image.read_bytes()
    pages = np.frombuffer(data, dtype=np.uint8).reshape(-1, P)
    nonzero = np.flatnonzero(pages.any(axis=1)).astype(np.uint64)
    rng = np.random.default_rng(1)
    trace = rng.permutation(nonzero)[:TOUCHES] * P
    _, first = np.unique(trace // CHUNK, return_index=True)
    fresh = np.zeros(len(trace), dtype=bool)
    fresh[first] = True
    w = {"dir": d, "data": data, "snap": snap, "l1": l1, "host": HostCache(d / "host"), "trace": trace,
         "sums": expected_sums(data, trace), "fresh": fresh}
    # Warm the host cache: one untimed restore of the trace decodes each of
    # its chunks into it.
    _, st = _engine_once(w, d / "fill.sock", 1, trace, "engine-host", w["sums"])
    assert st.host_fills == fresh.sum(), st
    return w


def _check(res, sums) -> None:
    if len(res.sums) != len(sums) or not (res.sums == sums).all():
        raise RuntimeError(f"the guest read wrong bytes: {int((res.sums != sums).sum())} of {len(sums)} touches")


def _engine_once(world, path, fault_around, trace, handler, sums):
    kw = {"l1": world["l1"]} if handler == "engine-l1" else {"host_cache": world["host"]}
    with Server(world["snap"], path, ServerSettings(fault_around=fault_around, persist_logs=False, use_plan=False),
                **kw) as server:
        with Guest(server.socket_path, memory_size=SIZE) as g:
            res = g.run(reads(trace), timeout=60)
    _check(res, sums)
    return res, server.summaries[-1].stats


def _split(ns, fresh) -> dict:
    """p50 and p99 (ns) of every touch, the decoded and the fresh ones."""
    out = {}
    for cls, sel in (("", slice(None)), ("_decoded", ~fresh), ("_fresh", fresh)):
        out[f"p50_ns{cls}"], out[f"p99_ns{cls}"] = (float(x) for x in np.percentile(ns[sel], [50, 99]))
    return out


@pytest.mark.parametrize("placement", ["one-cpu", "free"])
@pytest.mark.parametrize("handler", ["bare", "engine-l1", "engine-host"])
def test_bench_fault_roundtrip(benchmark, world, handler, placement):
    rounds = []
    path = world["dir"] / f"{handler}.sock"
    fresh = world["fresh"]

    def once():
        with placement_of(placement):
            if handler == "bare":
                res, _ = bare_once(world["data"], world["trace"], path, placement)
                _check(res, world["sums"])
            else:
                res, st = _engine_once(world, path, 1, world["trace"], handler, world["sums"])
        if handler == "engine-l1":
            assert (st.chunks_l1, st.chunks_host, st.chunks_reloaded) == (fresh.sum(), 0, 0), st
        elif handler == "engine-host":
            assert (st.chunks_host, st.chunks_l1, st.host_fills, st.chunks_reloaded) == (fresh.sum(), 0, 0, 0), st
        rounds.append(_split(res.ns, fresh))

    benchmark.pedantic(once, rounds=5, iterations=1)
    benchmark.extra_info.update({k: float(np.median([r[k] for r in rounds])) for k in rounds[0]})
    benchmark.extra_info.update(touches_decoded=int((~fresh).sum()), touches_fresh=int(fresh.sum()),
                                serves_from=SERVES_FROM[handler])


@pytest.mark.parametrize("fault_around", [1, 4, 16, 32, 64, 128])
@pytest.mark.parametrize("order", ["sequential", "random"])
def test_bench_fault_around(benchmark, world, fault_around, order):
    if order == "sequential":
        trace = np.arange(0, SIZE, P, dtype=np.uint64)
    else:
        trace = np.random.default_rng(2).permutation(SIZE // P).astype(np.uint64)[: SIZE // P // 4] * P
    sums = expected_sums(world["data"], trace)
    path = world["dir"] / f"fa{fault_around}{order}.sock"
    touch_ms = []

    def once():
        res, _ = _engine_once(world, path, fault_around, trace, "engine-l1", sums)
        touch_ms.append(res.ns.sum() / 1e6)

    benchmark.pedantic(once, rounds=3, iterations=1)
    benchmark.extra_info.update(touch_ms=float(np.median(touch_ms)), touches=len(trace),
                                serves_from=SERVES_FROM["engine-l1"])
