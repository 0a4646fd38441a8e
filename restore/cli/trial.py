"""`restore try`: restore a snapshot into a guest process and report what it saw."""

from __future__ import annotations

import os
import sys

import click

from ..keys import load_key
from ..units import fmt_ns, human_bytes
from .common import (
    CACHE_HELP,
    host_cache_options,
    key_options,
    l2_option,
    open_host_cache,
    open_l1,
    open_l2,
    open_store,
    split_snapshot,
    store_options,
)


def _wait_for_socket(path: str, timeout: float = 10.0) -> None:
    """Wait for a server to create its socket at path (one started in the
    background a moment ago); a clear error if none does."""
    import stat
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                return
            raise click.BadParameter(f"{path} is not a socket", param_hint="'--socket'")
        except FileNotFoundError:
            if time.monotonic() >= deadline:
                raise click.BadParameter(f"no server is listening at {path} (waited {timeout:.0f} s)",
                                         param_hint="'--socket'") from None
            time.sleep(0.05)


@click.command("try")
@click.argument("spec", metavar="NAME[:VERSION]")
@click.option("--pages", type=click.IntRange(min=1), default=4096, show_default=True, help="Pages the guest touches.")
@click.option("--run", "run_pages", type=click.IntRange(min=1), default=4, show_default=True, help="Pages per run of adjacent touches.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--cache", "cache_dir", default=None, help=CACHE_HELP)
@click.option("--no-cache", is_flag=True, help="Do not use an L1 cache.")
@host_cache_options
@click.option("--fault-around", type=click.IntRange(min=1), default=None, help="Pages installed per fault at most.")
@click.option("--no-plan", is_flag=True, help="Do not prefetch the snapshot's working-set plan.")
@click.option("--socket", "socket_path", default=None, type=click.Path(dir_okay=False, path_type=str),
              help="Restore through the `restore serve` listening here instead of a private handler "
                   "(the session's figures are then that server's: its log and metrics).")
@l2_option
@key_options
@store_options
def try_(spec, pages, run_pages, seed, cache_dir, no_cache, host_cache_dir, host_cache_budget, no_host_cache,
         fault_around, no_plan, socket_path, l2_specs, key_file, key_env, store_url, s3_endpoint, s3_region):
    """Restore a snapshot into a test guest and show how the session went.

    Starts a handler for the snapshot on a private socket (or uses the
    server at --socket), runs a guest process (restore.guest.Guest) that
    maps the snapshot's memory and reads a working set of pages (runs of
    adjacent pages, in random order), checks every page it read against the
    snapshot, and prints the session's stats."""
    import tempfile

    import numpy as np

    from ..handler import Server
    from ..session import prefetch_usage
    from ..settings import DEFAULT_FAULT_AROUND, ServerSettings
    from ..snapshot import Snapshot
    from ..guest import Guest, reads

    name, version = split_snapshot(spec)
    store = open_store(store_url, s3_endpoint, s3_region)
    l1 = open_l1(cache_dir, no_cache)
    with Snapshot.open(store, name, version, load_key(key_file, key_env), l1) as snap:
        m = snap.manifest
        rng = np.random.default_rng(seed)
        n_pages = m.memory_size // m.page_size
        starts = rng.choice(max(1, n_pages - run_pages), size=max(1, pages // run_pages), replace=False)
        trace = (starts[:, None] + np.arange(run_pages)).reshape(-1)[:pages].astype(np.uint64) * m.page_size

        def run_guest(path: str):
            with Guest(path, memory_size=m.memory_size, page_size=m.page_size, hugetlb=m.page_size > 4096) as guest:
                return guest.run(reads(trace), timeout=600)

        if socket_path is not None:
            _wait_for_socket(socket_path)
            result = run_guest(socket_path)
        else:
            with tempfile.TemporaryDirectory(prefix="restore-try-") as tmp:
                settings = ServerSettings(fault_around=fault_around or DEFAULT_FAULT_AROUND, use_plan=not no_plan)
                server = Server(
                    snap, f"{tmp}/uffd.sock", settings, l1=l1, l2=open_l2(l2_specs),
                    host_cache=open_host_cache(host_cache_dir, host_cache_budget, no_host_cache, cache_dir),
                ).start()
                try:
                    result = run_guest(server.socket_path)
                finally:
                    server.stop()
        expected = snap.read_pages(trace).view("<u8").sum(axis=1, dtype=np.uint64)
    bad = int((result.sums != expected).sum())
    click.echo(f"{snap.label}: guest read {len(trace)} pages in {fmt_ns(result.ns.sum())} "
               f"(per touch p50 {fmt_ns(np.median(result.ns))}, p99 {fmt_ns(np.percentile(result.ns, 99))}); "
               + ("every page matches the snapshot" if bad == 0 else f"{bad} PAGES DIFFER FROM THE SNAPSHOT"))
    if socket_path is not None:
        click.echo(f"{'served by:':<19}{socket_path} (its log and metrics have the session's figures)")
        sys.exit(1 if bad else 0)
    summary = server.summaries[0]
    st = summary.stats
    click.echo(f"{'faults:':<19}{st.faults}; first touches by source: "
               + ", ".join(f"{k} {v}" for k, v in st.first_touches.items() if v))
    click.echo(f"{'pages installed:':<19}{st.pages_installed} ({human_bytes(st.bytes_installed)})")
    if st.prefetch_chunks:
        useful, wasted = prefetch_usage(summary.prefetched, trace)
        click.echo(f"{'prefetch:':<19}{st.prefetch_pages} pages from {st.prefetch_chunks} planned chunks, "
                   f"{useful} of them read by the guest, {wasted} not")
        click.echo(f"{'demand faults:':<19}{st.faults_planned} on planned pages whose chunk was not in yet, "
                   f"{st.faults_unplanned} on pages not in the plan")
    click.echo(f"{'chunks:':<19}{st.chunks_host} from the host cache, {st.chunks_l1} from L1, "
               f"{st.chunks_fetched} fetched, {st.chunks_failed} failed"
               + (f"; {st.host_fills} decoded into the host cache" if st.host_fills else ""))
    for tier, t in st.tiers.items():
        if t["requests"]:
            click.echo(f"{tier + ':':<19}{t['hits']} hits of {t['requests']} requests, p50 {t['p50_ms']:.2f} ms, "
                       f"p99 {t['p99_ms']:.2f} ms" + (f", {t['bad']} bad copies" if t["bad"] else ""))
    click.echo(f"{'service time:':<19}p50 {fmt_ns(st.service_p50_ns)}, p99 {fmt_ns(st.service_p99_ns)}, "
               f"max {fmt_ns(st.service_max_ns)}")
    click.echo(f"{'fault log:':<19}{summary.log_key}")
    if bad:
        sys.exit(1)
