"""`restore plan`: working-set plans."""

from __future__ import annotations

import click

from ..tiers.durable import DurableStore
from ..units import human_bytes
from .common import open_store, plot_options, split_snapshot, store_options


@click.group()
def plan() -> None:
    """Working-set plans: what a restore prefetches, in what order."""


@plan.command("build")
@click.argument("spec", metavar="NAME[:VERSION]")
@click.option("--sessions", type=click.IntRange(min=1), default=5, show_default=True, help="Recent fault logs to merge.")
@click.option("--min-share", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True,
              help="Keep pages touched in at least this share of the sessions.")
@store_options
def plan_build(spec, sessions, min_share, store_url, s3_endpoint, s3_region):
    """Build the plan from recent sessions' fault logs and make it current."""
    from ..snapshot import load_manifest
    from ..workingset import rebuild_plan

    store = open_store(store_url, s3_endpoint, s3_region)
    name, version = split_snapshot(spec)
    m = load_manifest(store, name, version)
    info = rebuild_plan(store, m, sessions, min_share)
    click.echo(f"plan {info.plan_id[:16]} for {m.name}/{m.version}: {info.pages} pages "
               f"({human_bytes(info.pages * m.page_size)}) from {len(info.built_from)} sessions")


@plan.command("show")
@click.argument("spec", metavar="NAME[:VERSION]")
@click.option("--head", type=click.IntRange(min=0), default=10, show_default=True, help="First pages to list.")
@store_options
def plan_show(spec, head, store_url, s3_endpoint, s3_region):
    """Show a snapshot version's current plan."""
    import numpy as np

    from ..manifest import ZERO_PAGE, page_chunks
    from ..snapshot import load_page_map

    store = open_store(store_url, s3_endpoint, s3_region)
    m, info, pages = _current_plan(store, spec)
    chunks = page_chunks(load_page_map(store, m), pages, m.page_size)
    click.echo(f"{'plan:':<19}{info.plan_id} ({info.created})")
    click.echo(f"{'pages:':<19}{info.pages} ({human_bytes(info.pages * m.page_size)}, "
               f"{100 * info.pages * m.page_size / m.memory_size:.1f} % of memory)")
    click.echo(f"{'chunks:':<19}{len(np.unique(chunks[chunks != ZERO_PAGE]))} of {len(m.chunks)}"
               + (f" (and {int((chunks == ZERO_PAGE).sum())} all-zero pages)" if (chunks == ZERO_PAGE).any() else ""))
    click.echo(f"{'built from:':<19}{len(info.built_from)} sessions, pages kept if in >= {info.min_share:.0%} of them")
    for off, c in zip(pages[:head], chunks[:head]):
        click.echo(f"  offset {int(off):#012x}  chunk {'-' if c == ZERO_PAGE else int(c)}")


def _current_plan(store: DurableStore, spec: str):
    """(manifest, PlanInfo, uint64 file offsets) of the current plan of the
    snapshot version NAME[:VERSION]; SnapshotNotFound if it has none."""
    from ..errors import SnapshotNotFound
    from ..snapshot import load_manifest
    from ..workingset import load_plan, plan_info

    name, version = split_snapshot(spec)
    m = load_manifest(store, name, version)
    info = plan_info(store, m)
    if info is None:
        raise SnapshotNotFound(f"snapshot {m.name}/{m.version} has no plan (see `restore plan build`)")
    return m, info, load_plan(store, m)


@plan.command("plot")
@click.argument("spec", metavar="NAME[:VERSION]")
@plot_options
@store_options
def plan_plot(spec, out, size, store_url, s3_endpoint, s3_region):
    """Draw a snapshot version's current plan over its memory map as a PNG.

    Top: every planned page at its memory offset and rank in the plan.
    Bottom: the snapshot's chunks in stored order. Both are coloured by the
    order in which the plan first needs each chunk (its fetch order)."""
    from ..plot import plot_plan
    from ..snapshot import load_page_map

    store = open_store(store_url, s3_endpoint, s3_region)
    m, info, pages = _current_plan(store, spec)
    plot_plan(pages, out, title=f"{m.name}/{m.version} plan {info.plan_id[:16]}", memory_size=m.memory_size,
              chunk_size=m.chunk_size, page_size=m.page_size, page_map=load_page_map(store, m),
              chunk_count=len(m.chunks), width_px=size[0], height_px=size[1])
    click.echo(f"wrote {out}")
