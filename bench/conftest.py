"""Benchmark fixtures and the summary printed after a run.

Each benchmark stores the bytes one round processes in
benchmark.extra_info["bytes"]; the summary turns medians into GB/s
(10^9 bytes per second of memory file) so figures compare across runs,
then prints the tables of bench.microtables, made from the same figures
the --benchmark-json document holds.

A benchmark whose test fails after its rounds (a check of what the guest
read, or of the bytes produced) is marked as an error, so that its figures
stay out of the JSON document and the summary.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest

from bench.microtables import tables
from restore.sample import write_sample_image
from restore.snapshot import Snapshot, create_snapshot
from restore.tiers.durable import DurableStore
from restore.tiers.l1 import L1Cache

GIB = 1 << 30


@pytest.fixture(scope="session")
def mixed_gib(tmp_path_factory):
    """A 1 GiB sample image: half zero pages, 20 % random, 30 % text-like."""
    p = tmp_path_factory.mktemp("bench") / "mixed-1g.img"
    write_sample_image(p, GIB, seed=1, zero=0.5, random=0.2)
    return p


@pytest.fixture(scope="module")
def warm_l1_snapshot(tmp_path_factory):
    """make(name, size, seed, chunk_size, **mix): in a new directory `name`N,
    a sample image mem.img (write_sample_image with that seed and mix),
    snapshotted as "bench" into a file:// store there, opened, and every
    chunk of it put into an L1 there (l1/). Returns a namespace with dir,
    image, snap and l1; the snapshots are closed when the module ends."""
    with contextlib.ExitStack() as opened:

        def make(name: str, size: int, seed: int, chunk_size: int, **mix) -> SimpleNamespace:
            d = tmp_path_factory.mktemp(name)
            img = d / "mem.img"
            write_sample_image(img, size, seed=seed, **mix)
            store = DurableStore(f"file://{d}/store")
            create_snapshot(store, img, "bench", chunk_size=chunk_size)
            snap = opened.enter_context(Snapshot.open(store, "bench"))
            l1 = L1Cache(d / "l1")
            snap.fill_l1(l1)  # warm L1
            return SimpleNamespace(dir=d, image=img, snap=snap, l1=l1)

        yield make


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    fixture = getattr(item, "funcargs", {}).get("benchmark")
    if report.when == "call" and report.failed and fixture is not None:
        fixture.has_error = True


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    benches = [b for b in getattr(session, "benchmarks", None) or [] if not b.has_error]
    rows = [(b.name, b.extra_info["bytes"], b.stats.median) for b in benches if "bytes" in b.extra_info]
    if rows:
        terminalreporter.section("throughput (median, wall clock)")
        for name, nbytes, median in sorted(rows):
            terminalreporter.write_line(f"{name:<60} {nbytes / median / 1e9:7.2f} GB/s  ({median * 1e3:9.2f} ms)")
    rendered = tables({"benchmarks": [b.as_dict(include_data=False) for b in benches]})
    for name, text in rendered.items():
        terminalreporter.section(f"bench.microtables: {name}")
        for line in text.splitlines():
            terminalreporter.write_line(line)
