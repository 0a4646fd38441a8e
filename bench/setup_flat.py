"""Setup and memory against guest size: what a restore costs before its
first page, and what a running guest costs the server, as guest memory grows
while the work stays the same.

    python -m bench.setup_flat [--sizes 256M,1G,4G,16G] [--rounds 5] [--json out.json]

Per guest size, a sparse memory file whose first 64 MiB hold sample data
and the rest is zero is snapshotted; one `restore serve` process per size
(its host cache warm: each serves the same 2 000 pages first, untimed)
then serves, interleaved over the rounds:
  first fault   a guest that maps its memory, hands it over and reads one
                page: its restore-to-done is handshake -> first fault served
  memory        a guest that reads 2 000 pages and then waits (its session
                running): the server's resident memory then, less with no
                guest; its own (RssAnon) and page-cache pages it maps
                (RssFile: the host cache's, shared by every session)
Figures: medians over rounds with their min-max; raw rounds in --json.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import results
from restore.sample import write_sample_image
from restore.snapshot import create_snapshot
from restore.guest import Guest, reads, wait
from restore.testing import expected_sums
from restore.tiers.durable import DurableStore

P = 4096
DATA = 64 << 20
TOUCHED = 2000


def _size(text: str) -> int:
    units = {"M": 20, "G": 30}
    return int(text[:-1]) << units[text[-1].upper()]


def _rss(pid: int, field: str = "RssAnon") -> int:
    """Bytes of a process's resident memory: RssAnon is its own (heap,
    stacks, tables); RssFile counts page-cache pages it maps, e.g. the host
    cache's, which belong to the page cache and every session shares."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for {pid}")


class Serve:
    """`restore serve` for one snapshot, in a child process."""

    def __init__(self, work: Path, store: str, name: str):
        self.sock = work / f"{name}.sock"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "restore", "serve", "--snapshot", name, "--socket", str(self.sock),
             "--store", store, "--cache", str(work / "cache"), "--no-plan"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not self.sock.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"restore serve for {name} did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="256M,1G,4G,16G")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    started = results.now()
    sizes = [s.strip() for s in args.sizes.split(",")]
    raw: dict[str, dict[str, list]] = {s: {"first_fault_ms": [], "rss_above_idle": [], "idle_rss": [],
                                           "file_rss_above_idle": []} for s in sizes}
    with tempfile.TemporaryDirectory(prefix="restore-setup-") as tmp:
        work = Path(tmp)
        data = work / "data.img"
        write_sample_image(data, DATA, seed=8)
        store = f"file://{work}/store"
        servers = {}
        rng = np.random.default_rng(3)
        nonzero = np.flatnonzero(np.fromfile(data, dtype=np.uint8).reshape(-1, P).any(axis=1))
        touched = rng.choice(nonzero, TOUCHED, replace=False).astype(np.uint64) * P
        try:
            for s in sizes:
                img = work / f"mem-{s}.img"  # sparse past the data
                with open(img, "wb") as f:
                    f.write(data.read_bytes())
                    f.truncate(_size(s))
                t0 = time.monotonic()
                create_snapshot(DurableStore(store), img, f"g{s.lower()}")
                print(f"{s}: snapshot created in {time.monotonic() - t0:.1f} s", file=sys.stderr)
                servers[s] = Serve(work, store, f"g{s.lower()}")
                with Guest(str(servers[s].sock), memory_size=_size(s)) as g:  # warm the host cache
                    res = g.run(reads(touched), timeout=600)
                if not (res.sums == expected_sums(data, touched)).all():
                    raise RuntimeError(f"{s}: wrong bytes")
            for r in range(args.rounds):
                for s in sizes:
                    srv = servers[s]
                    with Guest(str(srv.sock), memory_size=_size(s)) as g:
                        res = g.run(reads(touched[:1]), timeout=600)
                    raw[s]["first_fault_ms"].append(res.total_ns / 1e6)
                    time.sleep(0.5)  # the session's end is logged and its memory freed
                    idle, idle_file = _rss(srv.proc.pid), _rss(srv.proc.pid, "RssFile")
                    g = Guest(str(srv.sock), memory_size=_size(s))
                    try:
                        g.start(np.concatenate([reads(touched), wait()]))
                        deadline = time.monotonic() + 120
                        while len(g.done_so_far().ns) < TOUCHED:
                            if time.monotonic() > deadline:
                                raise RuntimeError(f"{s}: the guest did not read its pages")
                            time.sleep(0.01)
                        running, running_file = _rss(srv.proc.pid), _rss(srv.proc.pid, "RssFile")
                    finally:
                        g.close()
                    time.sleep(0.5)  # the next guest finds no teardown under way
                    raw[s]["idle_rss"].append(idle)
                    raw[s]["rss_above_idle"].append(running - idle)
                    raw[s]["file_rss_above_idle"].append(running_file - idle_file)
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        finally:
            for srv in servers.values():
                srv.stop()

    def cell(xs, scale, fmt):
        xs = [x / scale for x in xs]
        return f"{fmt.format(float(np.median(xs)))} [{fmt.format(min(xs))}-{fmt.format(max(xs))}]"

    base = float(np.median(raw[sizes[0]]["first_fault_ms"]))
    print(f"\nthe same {TOUCHED} pages from guests of growing memory (data in the first 64 MiB); "
          f"median [min-max] of {args.rounds} interleaved rounds")
    print(f"{'guest memory':<14}{'handshake -> first fault ms':>32}{f'/ {sizes[0]}':>10}"
          f"{'anon RSS above idle MB':>28}{'file RSS above idle MB':>28}{'idle anon RSS MB':>20}")
    for s in sizes:
        ff = float(np.median(raw[s]["first_fault_ms"]))
        print(f"{s:<14}{cell(raw[s]['first_fault_ms'], 1, '{:.2f}'):>32}{ff / base:9.2f}x"
              f"{cell(raw[s]['rss_above_idle'], 1e6, '{:.1f}'):>28}"
              f"{cell(raw[s]['file_rss_above_idle'], 1e6, '{:.1f}'):>28}{cell(raw[s]['idle_rss'], 1e6, '{:.0f}'):>20}")
    if args.json:
        doc = results.bench_document("setup_flat", "bench.setup_flat", argv, vars(args), started, raw)
        results.write(doc, Path(args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
