"""`restore session`: the fault logs of past sessions."""

from __future__ import annotations

from typing import Optional

import click

from ..tiers.durable import DurableStore
from ..units import fmt_ns
from .common import open_store, plot_options, split_snapshot, store_options


@click.group()
def session() -> None:
    """Fault logs of past restore sessions."""


def _session_logs(store: DurableStore, spec: str):
    """(manifest, ids of its saved sessions, oldest first) of NAME[:VERSION]."""
    from ..objects import session_ids
    from ..snapshot import load_manifest

    name, version = split_snapshot(spec)
    m = load_manifest(store, name, version)
    return m, session_ids(store, m.name, m.version)


@session.command("ls")
@click.argument("spec", metavar="NAME[:VERSION]")
@store_options
def session_ls(spec, store_url, s3_endpoint, s3_region):
    """List the saved fault logs of a snapshot version."""
    store = open_store(store_url, s3_endpoint, s3_region)
    m, ids = _session_logs(store, spec)
    if not ids:
        click.echo(f"no sessions of {m.name}/{m.version}")
    for sid in ids:
        click.echo(sid)


def _load_session(store: DurableStore, name: str, version: str, ids: list[str], session_id: Optional[str],
                  newest: int = 1):
    """(session id, fault log) of session_id, or of the newest-th newest of ids."""
    from ..errors import SnapshotNotFound
    from ..faultlog import load_fault_log
    from ..objects import session_key

    if session_id is None:
        if not ids:
            raise SnapshotNotFound(f"no sessions of {name}/{version}")
        if len(ids) < newest:
            raise SnapshotNotFound(f"{name}/{version} has only {len(ids)} saved session; give two session ids")
        session_id = ids[-newest]
    key = session_key(name, version, session_id)
    data = store.get(key)
    if data is None:
        raise SnapshotNotFound(f"no session {session_id} of {name}/{version}")
    return session_id, load_fault_log(data, f"{store.url}/{key}")


def _session_rows(recs) -> list[tuple[str, str]]:
    """The summary lines of a fault log: (label, value)."""
    import numpy as np

    from ..faultlog import NO_CHUNK, SOURCES

    pre = SOURCES.index("prefetched")
    demand = recs[recs["source"] != pre]
    rows = [("first touches", str(len(recs))), ("demand faults", str(len(demand)))]
    if len(recs):
        span = (int(recs["t_ns"].max()) - int(recs["t_ns"].min())) / 1e6
        rows.append(("span", f"{span:.1f} ms"))
    counts = np.bincount(recs["source"], minlength=len(SOURCES))
    rows += [(f"  {SOURCES[i]}", str(int(n))) for i, n in enumerate(counts) if n]
    rows.append(("chunks touched", str(len(np.unique(recs["chunk"][recs["chunk"] != NO_CHUNK])))))
    if len(demand):
        svc = demand["service_ns"]
        rows.append(("service p50/p99", f"{fmt_ns(np.percentile(svc, 50))} / {fmt_ns(np.percentile(svc, 99))}"))
    return rows


@session.command("show")
@click.argument("spec", metavar="NAME[:VERSION]")
@click.argument("session_id", required=False)
@click.option("--head", type=click.IntRange(min=0), default=10, show_default=True, help="First touches to list.")
@store_options
def session_show(spec, session_id, head, store_url, s3_endpoint, s3_region):
    """Summarise a session's fault log (default: the newest session).

    Pages a prefetch installed are logged when installed, with source
    "prefetched"; every other record is a demand fault."""
    from ..faultlog import NO_CHUNK, SOURCES

    store = open_store(store_url, s3_endpoint, s3_region)
    m, ids = _session_logs(store, spec)
    name, version = m.name, m.version
    sid, recs = _load_session(store, name, version, ids, session_id)
    click.echo(f"{'session:':<19}{sid} of {name}/{version}")
    for label, value in _session_rows(recs):
        click.echo(f"{label + ':':<19}{value}")
    for r in recs[:head]:
        chunk = "-" if r["chunk"] == NO_CHUNK else str(int(r["chunk"]))
        click.echo(
            f"  t={int(r['t_ns']) / 1e3:>10.1f} us  offset {int(r['offset']):#012x}  chunk {chunk:>6}  "
            f"{SOURCES[int(r['source'])]:<10} {int(r['service_ns']) / 1e3:8.1f} us"
        )


@session.command("compare")
@click.argument("spec", metavar="NAME[:VERSION]")
@click.argument("first", required=False)
@click.argument("second", required=False)
@store_options
def session_compare(spec, first, second, store_url, s3_endpoint, s3_region):
    """Two sessions' fault logs side by side (default: the two newest)."""
    if (first is None) != (second is None):
        raise click.UsageError("give two session ids, or none for the two newest")
    store = open_store(store_url, s3_endpoint, s3_region)
    m, ids = _session_logs(store, spec)
    name, version = m.name, m.version
    a_id, a = _load_session(store, name, version, ids, first, newest=2)
    b_id, b = _load_session(store, name, version, ids, second, newest=1)
    a_rows, b_rows = dict(_session_rows(a)), dict(_session_rows(b))
    from ..faultlog import SOURCES

    order = ["first touches", "demand faults", "span", *(f"  {x}" for x in SOURCES), "chunks touched",
             "service p50/p99"]
    labels = [k for k in order if k in a_rows or k in b_rows]
    w = max(len(a_id), len(b_id)) + 2
    click.echo(f"{name}/{version}")
    click.echo(f"{'':<19}{a_id:>{w}}{b_id:>{w}}")
    for label in labels:
        click.echo(f"{label + ':':<19}{a_rows.get(label, '-'):>{w}}{b_rows.get(label, '-'):>{w}}")


@session.command("plot")
@click.argument("spec", metavar="NAME[:VERSION]")
@click.argument("session_id", required=False)
@plot_options
@store_options
def session_plot(spec, session_id, out, size, store_url, s3_endpoint, s3_region):
    """Draw a session's fault log as a PNG (default: the newest session).

    Top: every logged first touch by time and memory offset, coloured by
    source, demand faults outlined. Bottom: logged pages x page size over
    time. Pages a fault-around installed and the guest touched unseen are
    not in the log, so are not drawn."""
    from ..plot import plot_session

    store = open_store(store_url, s3_endpoint, s3_region)
    m, ids = _session_logs(store, spec)
    name, version = m.name, m.version
    sid, recs = _load_session(store, name, version, ids, session_id)
    plot_session(recs, out, title=f"{name}/{version} session {sid}",
                 page_size=m.page_size, width_px=size[0], height_px=size[1])
    click.echo(f"wrote {out}")
