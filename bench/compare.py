"""The strategy comparison: every restore strategy and its baselines, on
several workloads, side by side in one run: interleaved rounds, every
sample and the conditions kept as JSON, and the tables and a plot.

    python -m bench.compare [--rounds 5] [--size-mib 512] [--json FILE] [--out compare.png]

Time is restore-to-done as the guest measures it: from the start of its
mapping and handshake (for `resident`, from memory in place) to the end of
its invocation. The strategies, cache states and runners are defined in
bench/results.py (STRATEGIES, CACHE_STATES, RUNNERS) and printed with the
tables. Rows:

  heap, scatter, scan   synthetic traces of a process guest over a sample
                        image, warm and cold, served by an in-process Server
  sqlite                SQLite answering queries against a database in the
                        guest's memory (bench/realistic.py), warm and cold
  minivm                a KVM guest answering one request, warm
  firecracker           a real Firecracker loading a Full snapshot
                        (bench/firecracker/rows.py): its File backend
                        against a `restore serve` process, warm and cold
  slow tiers            (--slow-tiers) heap with an empty L1 and host cache
                        behind a delayed L2 or the durable tier alone
                        (bench/netdelay.py)

Each workload is recorded once (invocation A, fault-around 1: its fault log
becomes the plan and the working-set-first version) and measured on
invocation B, which shares most of A's working set. Every run's bytes or
answers are checked against the image or the VM that made the snapshot.
Rounds interleave every row and strategy; each run writes its JSON document
(bench/results.py) and bench/report.py renders it.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from bench import pagecache
from bench.results import SLOW_ONLY, STRATEGIES, UFFD, Row
from restore.handler import Server
from restore.settings import ServerSettings
from restore.protocol import accept_handshake
from restore.sample import write_sample_image
from restore.session import DEFAULT_FAULT_AROUND, DEFAULT_POLL_US, RestoreSession, prefetch_usage
from restore.snapshot import Snapshot, create_snapshot
from restore.guest import Guest, reads, wait
from restore.testing import expected_sums
from restore.tiers.durable import DurableStore
from restore.tiers.host import HostCache
from restore.tiers.l1 import L1Cache
from restore.layout import optimize_snapshot
from restore.workingset import load_plan, rebuild_plan

P = 4096
WHAT = "restore start to the end of the invocation (as the guest measures it)"


@dataclass(frozen=True)
class Workload:
    name: str
    key: str  # short name: row ids
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
    for key, name, share, run, overlap in [
        ("heap", "heap: 5 % in runs of 3 pages, 80 % shared", 0.05, 3, 0.8),
        ("scatter", "scatter: 10 % in single pages, 70 % shared", 0.10, 1, 0.7),
        ("scan", "scan: 15 % in runs of 256 pages, 90 % shared", 0.15, 256, 0.9),
    ]:
        a, b = _runs(rng, n, share, run, overlap)
        out.append(Workload(name, key, a, b))
    return out


class Bench:
    """One image, its snapshot and caches, and a run of any strategy under
    a cache state. keep_local=False: every restore gets a new, empty L1 and
    host cache (the "empty" state; the chunks come from the store)."""

    def __init__(self, work: Path, size: int, store: DurableStore | None = None, keep_local: bool = True,
                 image: Path | None = None, **server_kw):
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.size = size
        self.image = image or work / "mem.img"
        if image is None:
            write_sample_image(self.image, size, seed=3, zero=0.4, random=0.1)
        self.store = store or DurableStore(f"file://{work}/store")
        create_snapshot(self.store, self.image, "bench", warm_l2=server_kw.get("l2"))
        self.snap = Snapshot.open(self.store, "bench")
        self.keep_local = keep_local
        self.server_kw = server_kw
        self._l1 = L1Cache(work / "l1")
        self._host = HostCache(work / "host")
        if keep_local:
            self.snap.fill_l1(self._l1)
            self._host.fill(self.snap)
        self._n = 0
        self.snap_ws: Snapshot | None = None  # the working-set-first version, after record()

    @property
    def l1(self) -> L1Cache:
        """The kept L1, or a new empty one for every restore (keep_local=False)."""
        if self.keep_local:
            return self._l1
        self._n += 1
        return L1Cache(self.work / f"cold-l1-{self._n}")

    @property
    def host(self) -> HostCache:
        """The kept host cache, or a new empty one for every restore."""
        return self._host if self.keep_local else self.empty_host()

    def empty_host(self) -> HostCache:
        self._n += 1
        return HostCache(self.work / f"cold-host-{self._n}")

    def sock(self) -> str:
        self._n += 1
        return str(self.work / f"s{self._n}.sock")

    def files(self, strategy: str) -> list[Path]:
        """The local files a strategy reads (the cache state is set on them)."""
        if strategy in ("resident", "mmap"):
            return [self.image]
        local = [self._l1.root] if self.keep_local else []
        if self.store.url.startswith("file://"):
            local.append(Path(self.store.url[len("file://"):]))
        if strategy not in ("uffd-replay-l1", "uffd-replay-hc-empty") and self.keep_local:
            local.append(self._host.root)
        return local

    def check(self, res, offsets) -> None:
        touched = res.sums[-len(offsets):]
        if not (touched == expected_sums(self.image, offsets)).all():
            raise RuntimeError("a restore returned wrong bytes")

    def local(self, backing: str, offsets) -> float:
        with Guest("", memory_size=self.size, backing=backing, image=self.image) as g:
            res = g.run(reads(offsets), timeout=600)
        self.check(res, offsets)
        return res.total_ns / 1e6

    def served(self, offsets, use_plan: bool, snap: Snapshot | None = None, memfd: str | None = None,
               host: str = "kept", fetch_loop: bool = True) -> tuple[float, dict]:
        """host: "kept" (self.host), "none" or "empty" (a new host cache)."""
        hc = {"kept": lambda: self.host, "none": lambda: None, "empty": self.empty_host}[host]()
        cpu = time.process_time()
        # The plan was recorded page by page (record()): a replaying server
        # says so, so that its prefetch installs page by page too. (Not a
        # lazy one: there record_fault_around is its own fault-around.)
        plan_kw = {"record_fault_around": 1} if use_plan else {}
        settings, tiers = ServerSettings.take({"use_plan": use_plan, "persist_logs": False,
                                               "memfd_install": memfd or "copy", "fetch_loop": fetch_loop,
                                               **plan_kw, **self.server_kw})
        with Server(snap or self.snap, self.sock(), settings, l1=self.l1, host_cache=hc, **tiers) as server:
            with Guest(server.socket_path, memory_size=self.size, memfd=memfd is not None) as g:
                res = g.run(reads(offsets), timeout=600)
        cpu = time.process_time() - cpu
        if hc is not None and (host == "empty" or not self.keep_local):
            # A host fills a version once: its dirty pages must not pile up
            # over the rounds and throttle the next runs' writes.
            shutil.rmtree(hc.root)
        self.check(res, offsets)
        summary = server.summaries[-1]
        return res.total_ns / 1e6, {**_detail(summary.stats, summary.prefetched, offsets), "cpu_ms": cpu * 1e3}

    def reap(self, offsets, snap: Snapshot) -> tuple[float, dict]:
        """REAP's blocking prefetch: the guest waits until exactly the
        recorded pages are installed, from snap's layout."""
        plan = load_plan(self.store, snap.manifest)
        path = self.sock()
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(path)
        lsock.listen(1)
        m = snap.manifest
        host = self.host
        with Guest(path, memory_size=self.size) as g:
            g.start(np.concatenate([wait(), reads(offsets)]))
            conn, _ = lsock.accept()
            hs = accept_handshake(conn, memory_size=m.memory_size, snapshot_page_size=m.page_size,
                                  chunk_size=m.chunk_size)
            session = RestoreSession(snap, hs.uffd, hs.regions, hs.page_size, conn_fd=conn.fileno(),
                                     l1=self.l1, persist_log=False, plan=plan, l2=self.server_kw.get("l2"),
                                     host_cache=host, prefetch_around=1,
                                     fetchers=self.server_kw.get("fetchers", 4),
                                     prefetch_inflight=self.server_kw.get("prefetch_inflight", 8),
                                     fault_around=self.server_kw.get("fault_around", DEFAULT_FAULT_AROUND),
                                     poll_us=self.server_kw.get("poll_us", DEFAULT_POLL_US))
            if not session.wait_prefetch(600):
                raise RuntimeError("REAP's prefetch did not end")
            conn.sendall(b"g")
            res = g.wait(600)
            session.wait(10)
            stats = session.close()
            hs.close()
            conn.close()
        lsock.close()
        if not self.keep_local:
            shutil.rmtree(host.root)
        self.check(res, offsets)
        return res.total_ns / 1e6, _detail(stats, session.prefetched_offsets(), offsets)

    def record(self, w: Workload) -> int:
        """Record invocation A, make its fault log the plan, and write the
        working-set-first version for that plan."""
        # Fault-around 1 while recording: every page the guest touches faults,
        # so the plan names the working set exactly (with fault-around, the
        # neighbours a fault brings in are touched without being seen).
        with Server(self.snap, self.sock(), ServerSettings(use_plan=False, fault_around=1), l1=self.l1) as server:
            with Guest(server.socket_path, memory_size=self.size) as g:
                self.check(g.run(reads(w.recorded), timeout=600), w.recorded)
        pages = rebuild_plan(self.store, self.snap.manifest, sessions=1).pages
        if self.snap_ws is not None:
            self.snap_ws.close()
        opt = optimize_snapshot(self.snap, warm_l2=self.server_kw.get("l2"))
        self.snap_ws = Snapshot.open(self.store, "bench", opt.manifest.version)
        if self.keep_local:
            self.snap_ws.fill_l1(self._l1)
            self._host.fill(self.snap_ws)
        return pages

    def close(self) -> None:
        self.snap.close()
        if self.snap_ws is not None:
            self.snap_ws.close()

    def run(self, strategy: str, offsets, cache: str) -> tuple[float, int, Optional[dict]]:
        """(ms, bytes of the strategy's files in the page cache when it
        started, what the engine did or None)."""
        files = self.files(strategy)
        resident = pagecache.set_state(cache, files) if cache in pagecache.STATES else pagecache.resident_bytes(files)
        if strategy in ("resident", "mmap"):
            return self.local(strategy, offsets), resident, None
        if strategy in ("uffd-reap", "uffd-reap-offset"):
            ms, detail = self.reap(offsets, self.snap_ws if strategy == "uffd-reap" else self.snap)
            return ms, resident, detail
        ws = self.snap_ws
        kw = {
            "uffd-lazy": {"use_plan": False},
            "uffd-replay": {},
            "uffd-replay-ws": {"snap": ws},
            "uffd-replay-ws-memfd": {"snap": ws, "memfd": "copy"},
            "uffd-replay-ws-memfd-cont": {"snap": ws, "memfd": "continue"},
            "uffd-replay-l1": {"host": "none"},
            "uffd-replay-hc-empty": {"host": "empty"},
            "uffd-lazy-threads": {"use_plan": False, "fetch_loop": False},
            "uffd-replay-threads": {"fetch_loop": False},
        }[strategy]
        ms, detail = self.served(offsets, **{"use_plan": True, **kw})
        return ms, resident, detail


def _detail(stats, prefetched: np.ndarray, offsets) -> dict:
    """Where a served restore's work went: faults, chunks, thread time per
    phase, and the prefetch's useful and wasted pages for this trace (-1
    when the trace is not known: real code chose the pages)."""
    useful, wasted = prefetch_usage(prefetched, np.unique(offsets)) if offsets is not None else (-1, -1)
    return {"l2_bytes": stats.tiers["l2"]["bytes"], "durable_bytes": stats.tiers["durable"]["bytes"],
            "faults": stats.faults, "chunks": stats.chunks_l1 + stats.chunks_fetched, "chunks_host": stats.chunks_host,
            "l1_read_ms": stats.l1_read_ns / 1e6, "decode_ms": stats.decode_ns / 1e6,
            "fill_ms": stats.host_fill_ns / 1e6, "install_ms": stats.install_ns / 1e6, "poll_ms": stats.poll_ns / 1e6,
            "prefetched": stats.prefetch_pages, "useful": useful, "wasted": wasted, "late": stats.faults_planned,
            "unplanned": stats.faults_unplanned}


def synthetic_rows(work: Path, size: int, rounds: int, chosen: list[str], caches: list[str],
                   log: Callable[[str], None], **server_kw) -> list[Row]:
    """heap, scatter and scan on one image, one row per workload and cache
    state. Each cache state's rows run apart, warm first: on this kind of
    VM a cold run's page-cache churn slows the runs after it, whatever
    they read (docs/benchmarks.md); within a row, the strategies are
    interleaved round by round."""
    bench = Bench(work, size, **server_kw)
    out = []
    try:
        for c in caches:
            for w in workloads(size):
                pages = bench.record(w)
                log(f"{w.key}, {c}: plan of {pages} pages from the recorded invocation")
                row = Row(f"{w.key}/{c}", w.name, "L1 and host cache local", c, "in-process", WHAT, "mmap")
                for i in range(rounds):
                    for s in chosen:
                        row.add(s, *bench.run(s, w.measured, c))
                    log(f"{w.key}, {c}: round {i + 1} of {rounds}")
                out.append(row)
    finally:
        bench.close()
    return out


def minivm_rows(work: Path, rounds: int, log: Callable[[str], None]) -> list[Row]:
    """minivm: restore start to answer, per strategy (KVM needed), for a
    request other than the recorded one, and for the recorded one again;
    cache warm (every file the strategy reads preloaded before each run)."""
    from bench.minivm import driver

    if not driver.kvm_available():
        return []
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
        settings = ServerSettings(use_plan=use_plan, persist_logs=persist, memfd_install=memfd or "copy", **kw)
        with Server(s, work / f"vm{next(n)}.sock", settings, l1=l1, host_cache=hc) as server:
            answer = driver.restore(b, server.socket_path, state, [request], memfd=memfd is not None)[0]
        summary = server.summaries[-1]
        return answer, _detail(summary.stats, summary.prefetched, None)

    serve(False, 11, persist=True, fault_around=1)  # record invocation A, every touched page
    rebuild_plan(store, snap.manifest, sessions=1)
    ws = Snapshot.open(store, "vm", optimize_snapshot(snap).manifest.version)
    ws.fill_l1(l1)
    host.fill(ws)
    resident_files = [image, state]
    served_files = [state, l1.root, host.root, work / "vmstore"]
    out = []
    try:
        for label, request in [("another request", 4242), ("the recorded request", 11)]:
            want = driver.resident(b, image, state, [request])[0].value
            row = Row(f"minivm/{'recorded' if request == 11 else 'another'}/warm",
                      f"minivm: a KVM guest of 256 MiB answering {label}", "L1 and host cache local", "warm",
                      "in-process", "restore start to the guest's answer", "resident")
            runs = {
                "resident": lambda: (driver.resident(b, image, state, [request])[0], None),
                "uffd-lazy": lambda: serve(False, request),
                "uffd-replay": lambda: serve(True, request),
                "uffd-replay-ws": lambda: serve(True, request, s=ws),
                "uffd-replay-ws-memfd": lambda: serve(True, request, s=ws, memfd="copy"),
                "uffd-replay-ws-memfd-cont": lambda: serve(True, request, s=ws, memfd="continue"),
                "uffd-replay-l1": lambda: serve(True, request, hc=None),
            }
            for i in range(rounds):
                for strategy, go in runs.items():
                    files = resident_files if strategy == "resident" else served_files
                    if strategy == "uffd-replay-l1":
                        files = [f for f in files if f != host.root]
                    resident = pagecache.set_state("warm", files)
                    answer, detail = go()
                    if answer.value != want:
                        raise RuntimeError(f"minivm ({strategy}) answered {answer.value}, the resident VM {want}")
                    row.add(strategy, answer.ns / 1e6, resident, detail)
                log(f"minivm, {label}: round {i + 1} of {rounds}")
            out.append(row)
    finally:
        snap.close()
        ws.close()
    return out


def slow_tier_rows(work: Path, size: int, rounds: int, inflight: int, chosen: list[str],
                   log: Callable[[str], None]) -> tuple[list[Row], str]:
    """The heap workload with every chunk coming from the network tiers (a
    new, empty L1 and host cache per restore) behind a delayed L2 and
    behind the durable tier alone (bench/netdelay: namespaces plus delay);
    and the delay method."""
    from bench import netdelay
    from restore.tiers.l2 import L2Cluster

    work.mkdir(parents=True, exist_ok=True)
    image = work / "mem.img"
    write_sample_image(image, size, seed=3, zero=0.4, random=0.1)
    w = workloads(size)[0]
    out = []
    with netdelay.tiers() as t:
        opts = t.s3_options()
        l2 = L2Cluster([("az1", [t.l2_address])])
        conds = [("l2", f"L2 warm ({t.l2_rtt_ms:g} ms RTT), durable behind it", {"l2": l2}),
                 ("durable", f"L2 empty, the durable tier alone ({t.s3_rtt_ms:g} ms RTT)", {})]
        try:
            for key, cond, kw in conds:
                d = work / key
                store = DurableStore(f"s3://{t.bucket}/{d.name}", opts)
                b = Bench(d, size, store=store, keep_local=False, image=image, fetchers=inflight,
                          prefetch_inflight=inflight, **kw)
                b.record(w)
                # The measured invocation, and (durable only) the recorded one
                # again: the plan exactly right, what the layout alone changes.
                runs = [("another", "", w.measured)]
                if key == "durable":
                    runs.append(("recorded", ", the recorded invocation", w.recorded))
                rows = [(Row(f"slow/{key}/{inv}", f"heap on {size >> 20} MiB{label}",
                             f"{cond}; delay: {t.method}; S3 server: {t.s3_server}",
                             "empty", "in-process", WHAT, "resident"), offsets) for inv, label, offsets in runs]
                strategies = ["resident"] + [s for s in chosen if s in UFFD]
                for i in range(rounds):
                    for row, offsets in rows:
                        for s in strategies:
                            row.add(s, *b.run(s, offsets, "warm" if s == "resident" else "empty"))
                    log(f"slow tiers, {key}: round {i + 1} of {rounds}")
                out.extend(r for r, _ in rows)
                b.close()
        finally:
            l2.close()
    return out, t.why


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is not at least 1")
    return n


def _choice_list(allowed: list[str]):
    def parse(text: str) -> list[str]:
        got = [x for x in text.split(",") if x]
        bad = [x for x in got if x not in allowed]
        if bad or not got:
            raise argparse.ArgumentTypeError(f"{', '.join(bad) or text!r}: choose from {', '.join(allowed)}")
        return got

    return parse


def main(argv=None) -> int:
    from bench import report, results

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=_positive, default=5, help="interleaved rounds (at least 5 for a verdict)")
    ap.add_argument("--slow-rounds", type=_positive, default=3, help="interleaved rounds of the slow-tier rows")
    ap.add_argument("--size-mib", type=_positive, default=512)
    ap.add_argument("--out", default="compare.png", help="PNG plot to write")
    ap.add_argument("--json", default=None,
                    help="where to write the run's JSON document (default: bench/results/<UTC time>-compare.json)")
    ap.add_argument("--cache", type=_choice_list(list(pagecache.STATES)), default=list(pagecache.STATES),
                    metavar="warm,cold", help="cache states of the synthetic, SQLite and Firecracker rows")
    ap.add_argument("--fault-around", type=_positive, default=DEFAULT_FAULT_AROUND,
                    help="pages installed per demand fault at most (synthetic and SQLite workloads)")
    ap.add_argument("--poll-us", type=int, default=DEFAULT_POLL_US,
                    help="the service thread's polling after a fault, us (synthetic and SQLite workloads)")
    ap.add_argument("--strategies", type=_choice_list(list(STRATEGIES)), default=list(STRATEGIES), metavar="A,B,...",
                    help="run only these strategies (keep the rows' baselines: mmap, resident)")
    ap.add_argument("--no-minivm", action="store_true")
    ap.add_argument("--no-realistic", action="store_true", help="skip the SQLite workload (bench/realistic.py)")
    ap.add_argument("--realistic-size-mib", type=_positive, default=256,
                    help="memory of the SQLite workload's guest")
    ap.add_argument("--no-firecracker", action="store_true", help="skip the real Firecracker rows")
    ap.add_argument("--firecracker-mem-mib", type=_positive, default=256, help="memory of the Firecracker guest")
    ap.add_argument("--only", choices=["synthetic", "slow", "realistic", "minivm", "firecracker"],
                    help="run only these workloads (synthetic: heap/scatter/scan and --slow-tiers; slow: the "
                         "slow-tier rows alone)")
    ap.add_argument("--slow-tiers", action="store_true",
                    help="also run heap with an empty L1 behind delayed L2 / S3 (needs root)")
    ap.add_argument("--slow-size-mib", type=_positive, default=64, help="memory of the slow-tier runs")
    ap.add_argument("--inflight", type=_positive, default=32, help="fetchers and prefetch requests in flight (slow tiers)")
    args = ap.parse_args(argv)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    started, t0 = results.now(), time.monotonic()
    chosen = [s for s in STRATEGIES if s in args.strategies]
    local = [s for s in chosen if s not in SLOW_ONLY]
    rows: list[Row] = []
    fc_version = None
    notes = {}
    # /var/tmp: on disk (where /tmp may be a tmpfs, whose pages "cold" cannot drop).
    with tempfile.TemporaryDirectory(prefix="restore-compare-", dir="/var/tmp") as tmp:
        kw = {"fault_around": args.fault_around, "poll_us": args.poll_us}
        if args.only in (None, "synthetic"):
            rows += synthetic_rows(Path(tmp) / "synthetic", args.size_mib << 20, args.rounds, local, args.cache,
                                   log, **kw)
        if (args.slow_tiers and args.only in (None, "synthetic")) or args.only == "slow":
            slow, notes["delay"] = slow_tier_rows(Path(tmp) / "slow", args.slow_size_mib << 20, args.slow_rounds,
                                                  args.inflight, chosen, log)
            rows += slow
        if not args.no_realistic and args.only in (None, "realistic"):
            from bench.realistic import realistic_rows

            rows += realistic_rows(Path(tmp) / "sqlite", args.rounds, args.realistic_size_mib, log=log,
                                   strategies=local, caches=args.cache, detail=_detail, **kw)
        if not args.no_minivm and args.only in (None, "minivm"):
            rows += minivm_rows(Path(tmp), args.rounds, log)
        if not args.no_firecracker and args.only in (None, "firecracker"):
            from bench.firecracker.rows import firecracker_rows

            fc_rows, fc_version = firecracker_rows(Path(tmp) / "firecracker", args.rounds, args.firecracker_mem_mib,
                                                   caches=args.cache, log=log)
            rows += fc_rows

    doc = results.document(rows, command=["restore bench", *(sys.argv[1:] if argv is None else argv)],
                           args=vars(args), started=started, elapsed_s=time.monotonic() - t0,
                           firecracker=fc_version)
    doc["notes"] = notes
    path = results.write(doc, Path(args.json) if args.json else results.default_path())
    print(report.render(doc))
    _plot(doc, args.out)
    print(f"\nresults: {path}\nplot: {args.out}")
    return 0


def _plot(doc: dict, out: str) -> None:
    """Bars of restore-to-done / the row's baseline (medians) per row and strategy."""
    import textwrap

    from restore.plot import plot_grouped_bars

    groups = {}
    for row in doc["rows"]:
        base = row["samples"].get(row["baseline"])
        if not base:
            continue
        label = f"{row['id']}"
        groups[textwrap.fill(label, 18)] = {s: float(np.median(v)) / float(np.median(base))
                                            for s, v in row["samples"].items() if v}
    plot_grouped_bars(groups, out, series=list(STRATEGIES), title="restore strategies (lower is better)",
                      ylabel="restore-to-done / the row's baseline (mmap, else resident)", baseline=1.0, log=True,
                      width_px=max(1200, 120 * len(groups)), height_px=700)


if __name__ == "__main__":
    sys.exit(main())
