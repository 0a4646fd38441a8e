"""The strategy comparison: every restore strategy and its baselines, on
several workloads, in one process run, interleaved, with medians and ratios
to `resident`, and a plot.

    python -m bench.compare [--rounds 5] [--size-mib 512] [--out compare.png]

Strategies (time = restore-to-done as the guest measures it: from the start
of its mapping and handshake, or for `resident` from memory in place, to
the end of its invocation):
  resident     memory already in place (the file read in full first): the floor
  mmap-cold    the memory file mapped MAP_PRIVATE after evicting it from the
               page cache (Firecracker's file backend, cold)
  mmap-warm    the same with the page cache hot
  uffd-lazy    restore's engine, demand faults only (no plan)
  uffd-reap    the plan fetched and installed in full, then the guest starts
               (REAP's blocking prefetch)
  uffd-replay  restore's engine replaying the plan asynchronously while the
               guest runs
  uffd-replay-ws  the same on the working-set-first version of the snapshot
               (`restore snapshot optimize`: the plan's pages packed first)
  uffd-replay-ws-memfd  the same with guest memory in a memfd sent with the
               handshake (shared memory, MISSING|MINOR), filled by UFFDIO_COPY
  uffd-replay-ws-memfd-cont  the same, filled by writing the memfd and
               mapping with UFFDIO_CONTINUE (--memfd-install continue)
  uffd-replay-l1  uffd-replay without a host cache: every chunk verified
               and decoded from the (warm) compressed L1 for this restore
  uffd-replay-hc-empty  uffd-replay with a new, empty host cache (L1 warm):
               the first restore of a version on a host, decoding into it
Cache state: every uffd strategy but the last two runs with the host cache
warm (every chunk of the version decoded into it before the rounds:
restore.tiers.host.HostCache.fill) and L1 warm; mmap-warm reads the memory
file with its pages in the page cache, mmap-cold after evicting them.
Tier conditions: warm L1 (every chunk in the local cache); and, with
--slow-tiers, cold L1 with L2 warm, and cold L1 and L2 with only the
durable tier (S3), both behind bench/netdelay's delays (0.5 ms / 20 ms RTT),
for the uffd strategies (resident stays the floor). Each workload is
recorded once (an uffd-lazy run of invocation A whose fault log becomes the
plan) and measured on a different invocation B that shares most of A's
working set. minivm (a KVM guest) is one more workload: resident, uffd-lazy
and uffd-replay, time from restore start to its answer. sqlite
(bench/realistic.py; --no-realistic skips it) is another: SQLite answering a
mix of queries against a database in the guest's memory, in place; resident,
mmap-cold, mmap-warm, uffd-lazy and uffd-replay. firecracker
(bench/firecracker/rows.py; KVM needed, --no-firecracker skips it) restores a
real Firecracker's Full snapshot: its File backend page cache cold and warm
(the mmap-cold and mmap-warm columns) against the Uffd backend on a `restore
serve` process, lazy and replaying, timed from PUT /snapshot/load to the
guest's first answer and to the end of its invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from restore.handler import Server
from restore.protocol import accept_handshake
from restore.sample import write_sample_image
from restore.session import DEFAULT_FAULT_AROUND, DEFAULT_POLL_US, RestoreSession, prefetch_usage
from restore.snapshot import Snapshot, create_snapshot
from restore.testing import Guest, expected_sums, reads, wait
from restore.tiers.durable import DurableStore
from restore.tiers.host import HostCache
from restore.tiers.l1 import L1Cache
from restore.layout import optimize_snapshot
from restore.workingset import load_plan, rebuild_plan

P = 4096
STRATEGIES = ["resident", "mmap-cold", "mmap-warm", "uffd-lazy", "uffd-reap", "uffd-replay", "uffd-replay-ws",
              "uffd-replay-ws-memfd", "uffd-replay-ws-memfd-cont", "uffd-replay-l1", "uffd-replay-hc-empty"]
UFFD = ["uffd-lazy", "uffd-reap", "uffd-replay", "uffd-replay-ws", "uffd-replay-ws-memfd", "uffd-replay-ws-memfd-cont",
        "uffd-replay-l1", "uffd-replay-hc-empty"]


@dataclass(frozen=True)
class Workload:
    name: str
    recorded: np.ndarray  # file offsets, invocation A (feeds the plan)
    measured: np.ndarray  # file offsets, invocation B (timed)


def _runs(rng, n_pages, share, run, overlap):
    """Two invocations touching `share` of memory in runs of `run` pages;
    B keeps `overlap` of A's runs and replaces the rest."""
    n_runs = int(n_pages * share / run)
    starts = rng.choice(n_pages // run, size=int(n_runs * (2 - overlap)) + 1, replace=False) * run
    a, extra = starts[:n_runs], starts[n_runs:]
    keep = rng.permutation(a)[: int(n_runs * overlap)]
    b = np.concatenate([keep, extra[: n_runs - len(keep)]])
    rng.shuffle(b)

    def offs(s):
        return ((s[:, None] + np.arange(run)).reshape(-1).astype(np.uint64)) * P

    return offs(a), offs(b)


def workloads(size: int, seed: int = 7) -> list[Workload]:
    rng = np.random.default_rng(seed)
    n = size // P
    out = []
    for name, share, run, overlap in [
        ("heap-5%: runs of 3 pages, 80% shared", 0.05, 3, 0.8),
        ("scatter-10%: single pages, 70% shared", 0.10, 1, 0.7),
        ("scan-15%: runs of 256 pages, 90% shared", 0.15, 256, 0.9),
    ]:
        a, b = _runs(rng, n, share, run, overlap)
        out.append(Workload(name, a, b))
    return out


class Bench:
    def __init__(self, work: Path, size: int, store: DurableStore | None = None, warm_l1: bool = True,
                 image: Path | None = None, **server_kw):
        self.work = work
        self.size = size
        self.image = image or work / "mem.img"
        if image is None:
            write_sample_image(self.image, size, seed=3, zero=0.4, random=0.1)
            os.sync()  # clean pages, so mmap-cold can drop them from the page cache
        self.store = store or DurableStore(f"file://{work}/store")
        create_snapshot(self.store, self.image, "bench", warm_l2=server_kw.get("l2"))
        self.snap = Snapshot.open(self.store, "bench")
        self.warm_l1 = warm_l1
        self.server_kw = server_kw
        self._l1 = L1Cache(work / "l1")
        if warm_l1:
            self.snap.fill_l1(self._l1)
        # Warm host cache for warm-L1 runs (filled before the rounds); cold
        # runs get a new, empty one per restore, like their L1.
        self._host = HostCache(work / "host")
        if warm_l1:
            self._host.fill(self.snap)
        self._n = 0
        self.detail: list[dict] = []  # per served restore: _detail()
        self.snap_ws: Snapshot | None = None  # the working-set-first version, after record()

    @property
    def l1(self) -> L1Cache:
        """The warm L1, or a new empty one for every restore (cold L1)."""
        if self.warm_l1:
            return self._l1
        self._n += 1
        return L1Cache(self.work / f"cold-l1-{self._n}")

    @property
    def host(self) -> HostCache:
        """The warm host cache, or a new empty one for every restore (cold L1)."""
        if self.warm_l1:
            return self._host
        return self.empty_host()

    def empty_host(self) -> HostCache:
        self._n += 1
        return HostCache(self.work / f"cold-host-{self._n}")

    def sock(self) -> str:
        self._n += 1
        return str(self.work / f"s{self._n}.sock")

    def check(self, res, offsets) -> None:
        touched = res.sums[-len(offsets):]
        if not (touched == expected_sums(self.image, offsets)).all():
            raise RuntimeError("a restore returned wrong bytes")

    def local(self, backing: str, offsets) -> float:
        if backing == "mmap-cold":
            fd = os.open(self.image, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        kind = "resident" if backing == "resident" else "mmap"
        with Guest("", memory_size=self.size, backing=kind, image=self.image) as g:
            res = g.run(reads(offsets), timeout=600)
        self.check(res, offsets)
        return res.total_ns / 1e6

    def served(self, offsets, use_plan: bool, snap: Snapshot | None = None, memfd: str | None = None,
               host: str = "warm") -> float:
        """host: "warm" (self.host), "none" or "empty" (a new host cache)."""
        hc = {"warm": lambda: self.host, "none": lambda: None, "empty": self.empty_host}[host]()
        # The plan was recorded page by page (record()): a replaying server
        # says so, so that its prefetch installs page by page too. (Not a
        # lazy one: there record_fault_around is its own fault-around.)
        plan_kw = {"record_fault_around": 1} if use_plan else {}
        with Server(snap or self.snap, self.sock(), l1=self.l1, use_plan=use_plan, persist_logs=False,
                    memfd_install=memfd or "copy", host_cache=hc, **plan_kw, **self.server_kw) as server:
            with Guest(server.socket_path, memory_size=self.size, memfd=memfd is not None) as g:
                res = g.run(reads(offsets), timeout=600)
        if host == "empty":
            # A host fills a version once: its dirty pages must not pile up
            # over the rounds and throttle the next runs' writes.
            shutil.rmtree(hc.root)
        self.check(res, offsets)
        self.detail.append(_detail(server.summaries[-1], offsets))
        return res.total_ns / 1e6

    def reap(self, offsets) -> float:
        """Blocking prefetch: the guest waits until the whole plan is in."""
        plan = load_plan(self.store, self.snap.manifest)
        path = self.sock()
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(path)
        lsock.listen(1)
        m = self.snap.manifest
        with Guest(path, memory_size=self.size) as g:
            g.start(np.concatenate([wait(), reads(offsets)]))
            conn, _ = lsock.accept()
            hs = accept_handshake(conn, memory_size=m.memory_size, snapshot_page_size=m.page_size,
                                  chunk_size=m.chunk_size)
            session = RestoreSession(self.snap, hs.uffd, hs.regions, hs.page_size, conn_fd=conn.fileno(),
                                     l1=self.l1, persist_log=False, plan=plan, l2=self.server_kw.get("l2"),
                                     host_cache=self.host, prefetch_around=1,
                                     fetchers=self.server_kw.get("fetchers", 4),
                                     prefetch_inflight=self.server_kw.get("prefetch_inflight", 8),
                                     fault_around=self.server_kw.get("fault_around", DEFAULT_FAULT_AROUND),
                                     poll_us=self.server_kw.get("poll_us", DEFAULT_POLL_US))
            while not session.prefetch_done():
                time.sleep(0.0002)
            conn.sendall(b"g")
            res = g.wait(600)
            session.wait(10)
            session.close()
            hs.close()
            conn.close()
        lsock.close()
        self.check(res, offsets)
        return res.total_ns / 1e6

    def record(self, w: Workload) -> int:
        """Record invocation A, make its fault log the plan, and write the
        working-set-first version for that plan."""
        # Fault-around 1 while recording: every page the guest touches faults,
        # so the plan names the working set exactly (with fault-around, the
        # neighbours a fault brings in are touched without being seen).
        with Server(self.snap, self.sock(), l1=self.l1, use_plan=False, fault_around=1) as server:
            with Guest(server.socket_path, memory_size=self.size) as g:
                self.check(g.run(reads(w.recorded), timeout=600), w.recorded)
        pages = rebuild_plan(self.store, self.snap.manifest, sessions=1).pages
        if self.snap_ws is not None:
            self.snap_ws.close()
        opt = optimize_snapshot(self.snap, warm_l2=self.server_kw.get("l2"))
        self.snap_ws = Snapshot.open(self.store, "bench", opt.manifest.version)
        if self.warm_l1:
            self.snap_ws.fill_l1(self._l1)
            self._host.fill(self.snap_ws)
        return pages

    def close(self) -> None:
        self.snap.close()
        if self.snap_ws is not None:
            self.snap_ws.close()

    def run(self, strategy: str, offsets) -> float:
        if strategy in ("resident", "mmap-cold", "mmap-warm"):
            return self.local(strategy, offsets)
        if strategy == "uffd-lazy":
            return self.served(offsets, use_plan=False)
        if strategy == "uffd-replay":
            return self.served(offsets, use_plan=True)
        if strategy == "uffd-replay-ws":
            return self.served(offsets, use_plan=True, snap=self.snap_ws)
        if strategy == "uffd-replay-ws-memfd":
            return self.served(offsets, use_plan=True, snap=self.snap_ws, memfd="copy")
        if strategy == "uffd-replay-ws-memfd-cont":
            return self.served(offsets, use_plan=True, snap=self.snap_ws, memfd="continue")
        if strategy == "uffd-replay-l1":
            return self.served(offsets, use_plan=True, host="none")
        if strategy == "uffd-replay-hc-empty":
            return self.served(offsets, use_plan=True, host="empty")
        return self.reap(offsets)


def _detail(summary, offsets) -> dict:
    """Where a served restore's work went: faults, chunks, thread time per
    phase, and the prefetch's useful and wasted pages for this trace (-1
    when the trace is not known: real code chose the pages)."""
    st = summary.stats
    useful, wasted = prefetch_usage(summary.prefetched, np.unique(offsets)) if offsets is not None else (-1, -1)
    return {"l2_bytes": st.tiers["l2"]["bytes"], "durable_bytes": st.tiers["durable"]["bytes"], "faults": st.faults,
            "chunks": st.chunks_l1 + st.chunks_fetched, "chunks_host": st.chunks_host, "l1_read_ms": st.l1_read_ns / 1e6,
            "decode_ms": st.decode_ns / 1e6, "fill_ms": st.host_fill_ns / 1e6, "install_ms": st.install_ns / 1e6,
            "poll_ms": st.poll_ns / 1e6,
            "prefetched": st.prefetch_pages, "useful": useful, "wasted": wasted, "late": st.faults_planned,
            "unplanned": st.faults_unplanned}


def minivm_rows(work: Path, rounds: int) -> dict[str, dict[str, list[float]]]:
    """minivm: restore start to answer, per strategy (KVM needed), for a
    request other than the recorded one, and for the recorded one again."""
    from bench.minivm import driver

    if not driver.kvm_available():
        return {}
    b = driver.build(work / "minivm")
    image, state = work / "vm.img", work / "vm.state"
    driver.boot(b, image, state, 256)
    store = DurableStore(f"file://{work}/vmstore")
    create_snapshot(store, image, "vm")
    snap = Snapshot.open(store, "vm")
    l1 = L1Cache(work / "vml1")
    snap.fill_l1(l1)
    host = HostCache(work / "vmhost")
    host.fill(snap)
    n = iter(range(10**6))

    def serve(use_plan, request, persist=False, s=snap, memfd=None, hc=host, **kw):
        if use_plan:
            kw.setdefault("record_fault_around", 1)  # the plan is recorded page by page
        with Server(s, work / f"vm{next(n)}.sock", l1=l1, use_plan=use_plan, persist_logs=persist,
                    memfd_install=memfd or "copy", host_cache=hc, **kw) as server:
            return driver.restore(b, server.socket_path, state, [request], memfd=memfd is not None)[0].ns / 1e6

    serve(False, 11, persist=True, fault_around=1)  # record invocation A, every touched page
    rebuild_plan(store, snap.manifest, sessions=1)
    ws = Snapshot.open(store, "vm", optimize_snapshot(snap).manifest.version)
    ws.fill_l1(l1)
    host.fill(ws)
    out = {}
    for label, request in [("another request", 4242), ("the recorded request", 11)]:
        rows = out[f"minivm (KVM guest, 256 MiB): {label}"] = {
            "resident": [], "uffd-lazy": [], "uffd-replay": [], "uffd-replay-ws": [], "uffd-replay-ws-memfd": [],
            "uffd-replay-ws-memfd-cont": [], "uffd-replay-l1": []}
        for _ in range(rounds):
            rows["resident"].append(driver.resident(b, image, state, [request])[0].ns / 1e6)
            rows["uffd-lazy"].append(serve(False, request))
            rows["uffd-replay"].append(serve(True, request))
            rows["uffd-replay-ws"].append(serve(True, request, s=ws))
            rows["uffd-replay-ws-memfd"].append(serve(True, request, s=ws, memfd="copy"))
            rows["uffd-replay-ws-memfd-cont"].append(serve(True, request, s=ws, memfd="continue"))
            rows["uffd-replay-l1"].append(serve(True, request, hc=None))
    snap.close()
    ws.close()
    return out


def slow_tier_rows(work: Path, image: Path, size: int, w: Workload, rounds: int, inflight: int,
                   details: dict) -> dict:
    """The uffd strategies with a cold L1 behind L2 and behind the durable
    tier alone (bench/netdelay: namespaces plus delay); what the served
    restores did goes into details."""
    from bench import netdelay
    from restore.tiers.durable import S3Options
    from restore.tiers.l2 import L2Cluster

    out = {}
    with netdelay.tiers() as t:
        opts = S3Options(endpoint=t.s3_endpoint, region="us-east-1", access_key_id="test", secret_access_key="test")
        l2 = L2Cluster([("az1", [t.l2_address])])
        for cond, kw in [("cold L1, L2 warm", {"l2": l2}), ("cold L1 and L2, durable", {})]:
            d = work / cond.replace(" ", "_").replace(",", "")
            d.mkdir()
            store = DurableStore(f"s3://{t.bucket}/{d.name}", opts)
            b = Bench(d, size, store=store, warm_l1=False, image=image, fetchers=inflight,
                      prefetch_inflight=inflight, **kw)
            b.record(w)
            # The measured invocation, and (durable only) the recorded one
            # again: the plan exactly right, what the layout alone changes.
            runs = [("", w.measured)] + ([(", recorded invocation", w.recorded)] if "l2" not in kw else [])
            for label, offsets in runs:
                rows = {s: [] for s in UFFD}
                name = f"{w.name.split(':')[0]}, {cond}{label} ({t.method} delay)"
                details[name] = {s: [] for s in UFFD if s != "uffd-reap"}
                for _ in range(rounds):
                    for s in rows:
                        rows[s].append(b.run(s, offsets))
                        if s in details[name]:
                            details[name][s].append(b.detail[-1])
                rows["resident"] = [b.run("resident", offsets) for _ in range(rounds)]
                out[name] = rows
            b.close()
        l2.close()
    return out


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is not at least 1")
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=_positive, default=5)
    ap.add_argument("--size-mib", type=_positive, default=512)
    ap.add_argument("--out", default="compare.png", help="PNG plot to write")
    ap.add_argument("--fault-around", type=_positive, default=DEFAULT_FAULT_AROUND,
                    help="pages installed per demand fault at most (synthetic and SQLite workloads)")
    ap.add_argument("--poll-us", type=int, default=DEFAULT_POLL_US,
                    help="the service thread's polling after a fault, us (synthetic and SQLite workloads)")
    ap.add_argument("--strategies", default=None, metavar="A,B,...",
                    help="run only these strategies (resident and mmap-warm are always wise to keep)")
    ap.add_argument("--json", default=None, help="write every round's figures (and the breakdowns) here as JSON")
    ap.add_argument("--no-minivm", action="store_true")
    ap.add_argument("--no-realistic", action="store_true", help="skip the SQLite workload (bench/realistic.py)")
    ap.add_argument("--realistic-size-mib", type=_positive, default=256,
                    help="memory of the SQLite workload's guest")
    ap.add_argument("--no-firecracker", action="store_true", help="skip the real Firecracker rows")
    ap.add_argument("--firecracker-mem-mib", type=_positive, default=256, help="memory of the Firecracker guest")
    ap.add_argument("--only", choices=["synthetic", "realistic", "minivm", "firecracker"],
                    help="run only these workloads (synthetic: heap/scatter/scan and --slow-tiers)")
    ap.add_argument("--slow-tiers", action="store_true",
                    help="also run the first workload with a cold L1 behind delayed L2 / S3 (needs root)")
    ap.add_argument("--slow-size-mib", type=_positive, default=64, help="memory of the slow-tier runs")
    ap.add_argument("--inflight", type=_positive, default=32, help="fetchers and prefetch requests in flight (slow tiers)")
    args = ap.parse_args(argv)

    results: dict[str, dict[str, list[float]]] = {}
    details: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory(prefix="restore-compare-") as tmp:
        kw = {"fault_around": args.fault_around, "poll_us": args.poll_us}
        chosen = [s for s in STRATEGIES if not args.strategies or s in args.strategies.split(",")]
        bench = Bench(Path(tmp), args.size_mib << 20, **kw) if args.only in (None, "synthetic") else None
        for w in workloads(bench.size) if bench else []:
            pages = bench.record(w)
            print(f"{w.name}: plan of {pages} pages from the recorded invocation", file=sys.stderr)
            rows = {s: [] for s in chosen}
            details[w.name] = {s: [] for s in UFFD if s != "uffd-reap"}
            for _ in range(args.rounds):  # interleaved: one of each per round
                for s in chosen:
                    rows[s].append(bench.run(s, w.measured))
                    if s in details[w.name]:
                        details[w.name][s].append(bench.detail[-1])
            results[w.name] = rows
        if bench:
            bench.close()
        if args.slow_tiers and args.only in (None, "synthetic"):
            slow = Path(tmp) / "slow"
            slow.mkdir()
            img = slow / "mem.img"
            write_sample_image(img, args.slow_size_mib << 20, seed=3, zero=0.4, random=0.1)
            w = workloads(args.slow_size_mib << 20)[0]
            results.update(slow_tier_rows(slow, img, args.slow_size_mib << 20, w, max(1, args.rounds // 2),
                                          args.inflight, details))
        if not args.no_realistic and args.only in (None, "realistic"):
            from bench.realistic import realistic_rows

            sql = {}
            results.update(realistic_rows(Path(tmp) / "sqlite", args.rounds, args.realistic_size_mib,
                                          log=lambda line: print(line, file=sys.stderr),
                                          strategies=chosen, host_cache=HostCache(Path(tmp) / "sqlite-host"),
                                          on_served=lambda s, summary: sql.setdefault(s, []).append(
                                              _detail(summary, None)),
                                          **kw))
            details["sqlite"] = sql
        if not args.no_minivm and args.only in (None, "minivm"):
            results.update(minivm_rows(Path(tmp), args.rounds))
        if not args.no_firecracker and args.only in (None, "firecracker"):
            from bench.firecracker.rows import firecracker_rows

            results.update(firecracker_rows(Path(tmp) / "firecracker", args.rounds, args.firecracker_mem_mib,
                                            log=lambda line: print(line, file=sys.stderr)))

    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "details": details}, indent=1))
    report(results, details, args.rounds)
    _plot(results, args.out)
    print(f"\nplot: {args.out}")
    return 0


def _baseline(rows: dict) -> str:
    """What a row's ratios are to: mmap-warm (Firecracker's File backend with
    a hot page cache) where the row has it, else resident."""
    return "mmap-warm" if rows.get("mmap-warm") else "resident"


def report(results: dict, details: dict, rounds: int) -> None:
    """The comparison table (median ms and ratio to the row's baseline), the
    spread table (min-max ms over rounds) and where the time goes."""
    print(f"\nrestore-to-done, median of {rounds} interleaved rounds (slow tiers {max(1, rounds // 2)}); ratio to "
          "mmap-warm where the row has it, else to resident (marked r)")
    width = max([44] + [len(n) + 1 for n in results])
    cols = [s for s in STRATEGIES if any(rows.get(s) for rows in results.values())]
    print(f"{'workload':<{width}}" + "".join(f"{s:>26}" for s in cols))
    for name, rows in results.items():
        base_name = _baseline(rows)
        base = float(np.median(rows[base_name]))
        mark = "r" if base_name == "resident" else "x"
        cells = []
        for s in cols:
            if rows.get(s):
                med = float(np.median(rows[s]))
                cells.append(f"{med:9.2f} ms {med / base:6.2f}{mark}")
            else:
                cells.append("-")
        print(f"{name:<{width}}" + "".join(f"{c:>26}" for c in cells))
    print("\nspread: min-max ms over the rounds")
    print(f"{'workload':<{width}}" + "".join(f"{s:>26}" for s in cols))
    for name, rows in results.items():
        print(f"{name:<{width}}" + "".join(
            f"{f'{min(rows[s]):.2f}-{max(rows[s]):.2f}':>26}" if rows.get(s) else f"{'-':>26}" for s in cols))
    if details:
        print("\nwhere the time goes (medians; thread time per phase, summed over the engine's threads; "
              "bytes fetched from the network tiers)")
        print(f"{'workload':<{width}}{'strategy':>26}{'faults':>7}{'host':>6}{'chunks':>7}{'L1 read':>9}{'decode':>9}"
              f"{'fill':>9}{'install':>9}{'poll':>8}{'from L2':>10}{'durable':>10}{'prefetched':>11}{'useful':>7}{'wasted':>7}"
              f"{'late':>5}{'unplanned':>10}")
        for name, by in details.items():
            for strat, ds in by.items():
                if not ds:
                    continue
                med = {k: float(np.median([d[k] for d in ds])) for k in ds[0]}
                print(f"{name.split(':')[0]:<{width}}{strat:>26}{med['faults']:7.0f}{med['chunks_host']:6.0f}"
                      f"{med['chunks']:7.0f}{med['l1_read_ms']:7.1f}ms{med['decode_ms']:7.1f}ms{med['fill_ms']:7.1f}ms"
                      f"{med['install_ms']:7.1f}ms{med['poll_ms']:6.1f}ms"
                      f"{med['l2_bytes'] / 2**20:7.1f}MiB{med['durable_bytes'] / 2**20:7.1f}MiB"
                      f"{med['prefetched']:11.0f}{med['useful']:7.0f}{med['wasted']:7.0f}{med['late']:5.0f}"
                      f"{med['unplanned']:10.0f}")


def _plot(results, out) -> None:
    """Bars of restore-to-done / the row's baseline (medians) per workload and strategy."""
    import textwrap

    from restore.plot import plot_grouped_bars

    groups = {}
    for name, rows in results.items():
        label = name.split(":")[0] + (":" + name.split(":")[1] if name.startswith(("minivm", "firecracker")) else "")
        base = float(np.median(rows[_baseline(rows)]))
        groups[textwrap.fill(label.replace(" (relay delay)", ""), 18)] = {
            s: float(np.median(rows[s])) / base for s in STRATEGIES if rows.get(s)}
    plot_grouped_bars(groups, out, series=STRATEGIES, title="restore strategies (lower is better)",
                      ylabel="restore-to-done / baseline (mmap-warm, else resident)", baseline=1.0, log=True,
                      width_px=max(1200, 176 * len(results)), height_px=700)


if __name__ == "__main__":
    sys.exit(main())
