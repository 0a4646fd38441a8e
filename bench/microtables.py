"""Markdown tables of the microbenchmarks, from pytest-benchmark's JSON.

    .venv/bin/python -m pytest bench --benchmark-json micro.json
    .venv/bin/python -m bench.microtables micro.json [SECTION ...]

tables(doc) turns the document `--benchmark-json` writes into markdown
tables, one string per section (a section's tables separated by a blank
line), in this order:

  fault          test_bench_fault.py: the fault round trip per handler and
                 placement, p50 and p99 on decoded and on fresh chunks,
                 against the bare handler with the same placement; the
                 fault-around sweep
  prefetch       test_bench_prefetch.py: wall-clock throughput of raw
                 UFFDIO_COPY and of the prefetch, and their ratios; the
                 prefetch's thread time per phase
  install-paths  test_bench_prefetch.py: the install paths
  minivm         test_bench_minivm.py: time to answer, KVM-side fault
  tiers          test_bench_tiers.py: one chunk from each tier, cold-L1
                 restores
  create-decode  test_bench_create.py and test_bench_decode.py

Every figure comes from the document: a benchmark's median round
(stats.median, seconds) or what it stored in extra_info. Throughputs are
extra_info["bytes"] over the median round, in GB/s (10^9 bytes per
second): wall clock, as is every figure a ratio is taken of. Thread times
are labelled as such and enter no ratio. A benchmark missing from the
document gives no row, a ratio whose baseline is missing shows "–", and a
section without rows is left out. Figures have 3 significant digits.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Optional

DASH = "–"
SECTIONS = ("fault", "prefetch", "install-paths", "minivm", "tiers", "create-decode")

Bench = dict
Index = dict[str, list[Bench]]
FAULT_NS = ("p50_ns_decoded", "p99_ns_decoded", "p50_ns_fresh", "p99_ns_fresh")  # test_bench_fault's extra_info


def fmt(x: Optional[float]) -> str:
    """x with 3 significant digits and no exponent (1234 -> "1230",
    4 -> "4.00", 0.01234 -> "0.0123"); "–" for None."""
    if x is None or not math.isfinite(x):
        return DASH
    if x == 0:
        return "0"
    r = round(x, 2 - math.floor(math.log10(abs(x))))
    decimals = max(0, 2 - math.floor(math.log10(abs(r))))  # after rounding: 9.996 -> "10.0"
    return f"{r:.{decimals}f}"


def ratio(x: Optional[float], base: Optional[float]) -> str:
    """x / base as "1.23×"; "–" when either is missing."""
    return f"{fmt(x / base)}×" if x is not None and base else DASH


def unit(x: Optional[float], name: str) -> str:
    """x with 3 significant digits and its unit ("–" for None)."""
    return DASH if x is None else f"{fmt(x)} {name}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table: | a | b | over |---|---|."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def index(doc: dict) -> Index:
    """The document's benchmarks by test function (name without its [id]),
    in document order."""
    out: Index = {}
    for b in doc.get("benchmarks") or []:
        out.setdefault(b["name"].split("[")[0], []).append(b)
    return out


def param(b: Bench, name: str):
    return (b.get("params") or {}).get(name)


def extra(b: Optional[Bench], key: str):
    return None if b is None else (b.get("extra_info") or {}).get(key)


def median_s(b: Optional[Bench]) -> Optional[float]:
    """The median round, seconds."""
    return None if b is None else (b.get("stats") or {}).get("median")


def gbps(b: Optional[Bench]) -> Optional[float]:
    """extra_info bytes over the median round (wall clock), GB/s."""
    nbytes, s = extra(b, "bytes"), median_s(b)
    return nbytes / s / 1e9 if nbytes is not None and s else None


def label(b: Bench) -> str:
    return extra(b, "label") or b["name"]


def scaled(x: Optional[float], by: float) -> Optional[float]:
    return None if x is None else x / by


def find(ix: Index, test: str, **params) -> Optional[Bench]:
    """The first benchmark of test whose params include params."""
    return next((b for b in ix.get(test, []) if all(param(b, k) == v for k, v in params.items())), None)


def fault(ix: Index) -> list[str]:
    out = []
    trips = ix.get("test_bench_fault_roundtrip", [])
    if trips:
        rows = []
        for where in dict.fromkeys(param(b, "placement") for b in trips):
            here = [b for b in trips if param(b, "placement") == where]
            bare = find(ix, "test_bench_fault_roundtrip", handler="bare", placement=where)
            for b in sorted(here, key=lambda b: param(b, "handler") != "bare"):  # the floor first
                us = [scaled(extra(b, k), 1e3) for k in FAULT_NS]
                counts = [extra(b, "touches_decoded"), extra(b, "touches_fresh")]
                rows.append([
                    str(param(b, "handler")), extra(b, "serves_from") or DASH, str(where),
                    *(unit(v, "µs") for v in us),
                    " / ".join(DASH if n is None else str(n) for n in counts),
                    ratio(extra(b, "p50_ns_decoded"), extra(bare, "p50_ns_decoded")),
                    ratio(extra(b, "p50_ns_fresh"), extra(bare, "p50_ns_fresh")),
                ])
        out.append(table(["handler", "serves from", "placement", "p50 decoded", "p99 decoded", "p50 fresh",
                          "p99 fresh", "touches decoded / fresh", "p50 decoded / bare", "p50 fresh / bare"], rows))
    sweep = ix.get("test_bench_fault_around", [])
    if sweep:
        orders = list(dict.fromkeys(param(b, "order") for b in sweep))
        header = ["fault-around (pages)"]
        for order in orders:
            header += [f"{order}: guest touch time", f"{order}: / fault-around 1"]
        rows = []
        for fa in sorted(set(param(b, "fault_around") for b in sweep)):
            row = [str(fa)]
            for order in orders:
                b = find(ix, "test_bench_fault_around", fault_around=fa, order=order)
                one = find(ix, "test_bench_fault_around", fault_around=1, order=order)
                row += [unit(extra(b, "touch_ms"), "ms"), ratio(extra(b, "touch_ms"), extra(one, "touch_ms"))]
            rows.append(row)
        out.append(table(header, rows))
    return out


def prefetch(ix: Index) -> list[str]:
    out = []
    raws = ix.get("test_bench_raw_copy", [])
    pre = find(ix, "test_bench_prefetch_install")
    runs = raws + ([pre] if pre else [])
    if runs:
        rows = [[label(b), unit(gbps(b), "GB/s"), *(ratio(gbps(b), gbps(r)) for r in raws)] for b in runs]
        out.append(table(["wall clock", "throughput", *(f"/ {label(r)}" for r in raws)], rows))
    if pre and extra(pre, "decode_thread_ms") is not None:
        rows = [[f"{what}, thread time (summed over threads)", unit(extra(pre, key), "ms")]
                for what, key in (("L1 read", "l1_read_thread_ms"), ("verify + decode", "decode_thread_ms"),
                                  ("install ioctls", "install_thread_ms"))]
        cpus = extra(pre, "cpus")
        rows.append([f"wall clock{f' on {cpus} CPUs' if cpus else ''}", unit(scaled(median_s(pre), 1e-3), "ms")])
        out.append(table(["prefetch, one round (median)", "time"], rows))
    return out


def install_paths(ix: Index) -> list[str]:
    paths = ix.get("test_bench_install_path", [])
    if not paths:
        return []
    base = find(ix, "test_bench_install_path", path="anon-copy")
    rows = [[label(b), unit(gbps(b), "GB/s"), ratio(gbps(b), gbps(base))] for b in paths]
    return [table(["install path (wall clock)", "throughput", f"/ {label(base) if base else 'anon-copy'}"], rows)]


def minivm(ix: Index) -> list[str]:
    out = []
    runs = ix.get("test_bench_minivm_invocation", [])
    if runs:
        base = find(ix, "test_bench_minivm_invocation", how="resident")
        rows = [[label(b), unit(extra(b, "answer_ms"), "ms"), ratio(extra(b, "answer_ms"), extra(base, "answer_ms"))]
                for b in runs]
        out.append(table(["how", "time to answer", "/ resident"], rows))
    kvm = find(ix, "test_bench_minivm_kvm_fault")
    if kvm:
        out.append(table(["KVM-side fault round trip: (lazy − resident) / faults", "per fault"],
                         [[label(kvm), unit(extra(kvm, "kvm_fault_us"), "µs")]]))
    return out


def tiers(ix: Index) -> list[str]:
    out = []
    fetches = ix.get("test_bench_chunk_fetch", [])
    if fetches:
        rows = []
        for b in fetches:
            tier = extra(b, "fetch_tier") or param(b, "tier")
            rtt = {"l2": extra(b, "l2_rtt_ms"), "durable": extra(b, "s3_rtt_ms")}.get(tier)
            rows.append([str(tier), unit(scaled(extra(b, "stored_bytes"), 1024), "KiB"),
                         unit(scaled(median_s(b), 1e-3), "ms"), unit(rtt, "ms"), extra(b, "method") or DASH])
        out.append(table(["tier", "one chunk object", "median fetch", "RTT set", "delay by"], rows))
        first = fetches[0]
        probes = [[what, unit(extra(first, key), "ms")]
                  for what, key in (("memcached no-op", "l2_noop_ms"), ("S3 HEAD", "s3_head_ms"))
                  if extra(first, key) is not None]
        if probes:
            out.append(table(["probe through the delay", "median"], probes))
    restores = ix.get("test_bench_cold_l1_restore", [])
    if restores:
        base = next((b for b in restores if extra(b, "source") == "l2"), None)
        rows = [[str(extra(b, "source")), str(extra(b, "fetchers")), unit(extra(b, "restore_ms"), "ms"),
                 ratio(extra(b, "restore_ms"), extra(base, "restore_ms")), str(extra(b, "chunks_fetched")),
                 unit(extra(b, "fetch_p50_ms"), "ms"), str(extra(b, "touches"))] for b in restores]
        out.append(table(["cold-L1 restore from", "fetchers", "guest touch time", "/ from L2", "chunks fetched",
                          "fetch p50", "touches"], rows))
    return out


def create_decode(ix: Index) -> list[str]:
    rows: dict[tuple, dict] = {}  # (test, params but encrypted) -> {"label", False/True: Bench}
    for test in ("test_bench_create_1gib", "test_bench_encode_only_1gib", "test_bench_decode_512k"):
        for b in ix.get(test, []):
            key = (test, tuple(sorted((k, str(v)) for k, v in (b.get("params") or {}).items() if k != "encrypted")))
            row = rows.setdefault(key, {"label": label(b)})
            row[bool(param(b, "encrypted"))] = b
    if not rows:
        return []
    return [table(["figure", "plain", "AES"],
                  [[r["label"], unit(gbps(r.get(False)), "GB/s"), unit(gbps(r.get(True)), "GB/s")]
                   for r in rows.values()])]


_RENDER = {"fault": fault, "prefetch": prefetch, "install-paths": install_paths, "minivm": minivm,
           "tiers": tiers, "create-decode": create_decode}


def tables(doc: dict) -> dict[str, str]:
    """Markdown tables of a pytest-benchmark JSON document, by section
    (SECTIONS order); sections without a row are left out."""
    ix = index(doc)
    out = {}
    for name in SECTIONS:
        parts = _RENDER[name](ix)
        if parts:
            out[name] = "\n\n".join(parts)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", help="what pytest --benchmark-json wrote")
    ap.add_argument("sections", nargs="*", help=f"sections to print: {', '.join(SECTIONS)} (default: all)")
    args = ap.parse_args(argv)
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        ap.error(f"no section {', '.join(sorted(unknown))}; sections are {', '.join(SECTIONS)}")
    with open(args.json) as f:
        rendered = tables(json.load(f))
    for name, text in rendered.items():
        if not args.sections or name in args.sections:
            print(f"## {name}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
