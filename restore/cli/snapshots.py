"""`restore snapshot`: create, optimize, list, inspect, verify, export and remove."""

from __future__ import annotations

import json
import sys

import click

from ..keys import load_key
from ..units import human_bytes
from .common import (
    CACHE_HELP,
    SIZE,
    VERSION_HELP,
    key_options,
    l2_option,
    open_l1,
    open_l2,
    open_store,
    progress_bar,
    split_snapshot,
    store_options,
    version_of,
)


@click.group()
def snapshot() -> None:
    """Create, list, inspect, verify and export snapshots."""


@snapshot.command("create")
@click.argument("memfile", type=click.Path(dir_okay=True, path_type=str))
@click.option("--name", required=True, help="Snapshot name.")
@click.option("--version", "version", default=None, help="Version (default: next integer).")
@click.option("--base", "base", default=None, metavar="VERSION",
              help="MEMFILE is a diff against this version (a Firecracker Diff snapshot: the pages dirtied "
                   "since, the rest holes); its holes are the base's memory, not zeros.")
@click.option("--chunk-size", type=SIZE, default=None,
              help="Chunk size, a power of two >= 4K (default: 512K, or the base's).")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Encoding threads (default: one per core).")
@click.option("--warm-l2", is_flag=True, help="Also push every chunk into the --l2 clusters (all zones).")
@l2_option
@key_options
@store_options
def snapshot_create(memfile, name, version, base, chunk_size, workers, warm_l2, l2_specs, key_file, key_env,
                    store_url, s3_endpoint, s3_region):
    """Cut MEMFILE into chunks and store them as a new snapshot version.

    A hole in MEMFILE (a sparse file) is read as zero pages, unread; with
    --base it is the base version's memory instead."""
    from ..snapshot import create_snapshot, describe, memory_file_size

    key = load_key(key_file, key_env)
    store = open_store(store_url, s3_endpoint, s3_region)
    size = memory_file_size(memfile)  # fail before drawing a bar
    l2 = open_l2(l2_specs)
    if warm_l2 and l2 is None:
        raise click.UsageError("--warm-l2 needs --l2 ZONE=HOST:PORT")
    with progress_bar("snapshot", size) as advance:
        m = create_snapshot(
            store, memfile, name, version, base=base, chunk_size=chunk_size, key=key, workers=workers,
            progress=advance, warm_l2=l2 if warm_l2 else None,
        )
    d = describe(store, m)
    click.echo(
        f"created {m.name}/{m.version} in {store.url}: {human_bytes(m.memory_size)} of memory, "
        f"{d['chunks']} chunks, {human_bytes(d['stored_bytes'])} stored, {human_bytes(m.uploaded_bytes)} uploaded"
    )


@snapshot.command("optimize")
@click.argument("spec", metavar="NAME[:VERSION]")
@click.option("--plan", "plan_ref", default=None, metavar="P",
              help="The plan to lay out: a .npy file of file offsets, or a plan id in the store "
                   "(default: the snapshot's current plan).")
@click.option("--version", "version", default=None, help="The new version (default: next integer).")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Encoding threads (default: one per core).")
@click.option("--warm-l2", is_flag=True, help="Also push every chunk of the new version into the --l2 clusters.")
@l2_option
@key_options
@store_options
def snapshot_optimize(spec, plan_ref, version, workers, warm_l2, l2_specs, key_file, key_env, store_url, s3_endpoint,
                      s3_region):
    """Write a working-set-first version of a snapshot.

    The plan's pages go first, in first-touch order, packed into "hot"
    chunks; every other non-zero page follows in offset order in "cold"
    chunks. The memory is the same; chunks already stored are not uploaded
    again; the new version carries the plan. The source version is not
    changed."""
    from ..layout import optimize_snapshot
    from ..snapshot import Snapshot, describe

    store = open_store(store_url, s3_endpoint, s3_region)
    name, src_version = split_snapshot(spec)
    plan = None if plan_ref is None else _read_plan(store, plan_ref)
    l2 = open_l2(l2_specs)
    if warm_l2 and l2 is None:
        raise click.UsageError("--warm-l2 needs --l2 ZONE=HOST:PORT")
    with Snapshot.open(store, name, src_version, load_key(key_file, key_env)) as snap:
        with progress_bar("optimize", snap.manifest.memory_size) as advance:
            opt = optimize_snapshot(snap, plan, version, workers=workers, progress=advance,
                                    warm_l2=l2 if warm_l2 else None)
        src = snap.label
    m = opt.manifest
    d = describe(store, m)
    click.echo(
        f"created {m.name}/{m.version} from {src}, working set first: {opt.hot_chunks} hot chunks, "
        f"{d['chunks'] - opt.hot_chunks} cold chunks; {human_bytes(m.uploaded_bytes)} uploaded"
    )
    click.echo(f"plan {opt.plan.plan_id[:16]} ({opt.plan.pages} pages) carried over: its pages lie in "
               f"{opt.hot_chunks} chunks now, {opt.source_chunks} in {src}")


def _read_plan(store, ref: str):
    """A plan given on the command line: a .npy file, or a plan id."""
    import os

    import numpy as np

    from ..errors import InputError
    from ..faultlog import parse_npy
    from ..objects import plan_key

    if os.path.exists(ref):
        try:
            data = open(ref, "rb").read()
        except OSError as exc:
            raise InputError(f"plan file {ref} cannot be read: {exc.strerror}") from None
        plan = parse_npy(data, f"plan file {ref}")
    else:
        if len(ref) != 64 or any(ch not in "0123456789abcdef" for ch in ref):
            raise InputError(f"plan {ref!r} is neither a file nor a plan id (64 hex digits; see `restore plan show`)")
        data = store.get(plan_key(ref))
        if data is None:
            raise InputError(f"no plan {ref} in {store.url}")
        plan = parse_npy(data, f"plan {ref}")
    if plan.ndim != 1 or plan.dtype.kind not in "iu" or (plan.dtype.kind == "i" and len(plan) and plan.min() < 0):
        raise InputError(f"plan {ref} must be a 1-D array of file offsets (non-negative integers), not {plan.dtype} {plan.shape}")
    return plan.astype(np.uint64)


@snapshot.command("ls")
@click.argument("name", required=False)
@store_options
def snapshot_ls(name, store_url, s3_endpoint, s3_region):
    """List snapshot versions and their state."""
    from ..snapshot import list_snapshots

    store = open_store(store_url, s3_endpoint, s3_region)
    refs = list_snapshots(store, name)
    if not refs:
        click.echo(f"no snapshots in {store.url}")
        return
    width = max(len(f"{r.name}/{r.version}") for r in refs)
    for r in refs:
        click.echo(f"{r.name + '/' + r.version:<{width}}  {r.state:<7}  {r.updated:%Y-%m-%d %H:%M:%S}")


@snapshot.command("inspect")
@click.argument("spec", metavar="NAME[:VERSION]")
@click.option("--version", "version", default=None, help=VERSION_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@store_options
def snapshot_inspect(spec, version, as_json, store_url, s3_endpoint, s3_region):
    """Show a snapshot's size, zero pages, compression and dedup figures."""
    from ..errors import SnapshotPending
    from ..snapshot import describe, load_manifest, pending_info

    name, version = version_of(spec, version)
    store = open_store(store_url, s3_endpoint, s3_region)
    try:
        d = describe(store, load_manifest(store, name, version))
    except SnapshotPending:
        claim = pending_info(store, name, version) or {}
        if as_json:
            click.echo(json.dumps({"name": name, "version": version, "state": "PENDING", **claim}, indent=2))
            return
        click.echo(f"{'snapshot:':<19}{name}/{version}")
        click.echo(f"{'state:':<19}PENDING (chunks uploading, or the creation died)")
        started = claim.get("started", "unknown")
        click.echo(f"{'started:':<19}{started} by pid {claim.get('pid', '?')} on {claim.get('host', '?')}")
        return
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    ratio = f"{d['compression_ratio']:.2f}x" if d["compression_ratio"] else "n/a (all zero)"
    rows = [
        ("snapshot", f"{d['name']}/{d['version']}"),
        ("state", d["state"]),
        ("created", f"{d['created']} by {d['created_by']}"),
        ("memory size", f"{human_bytes(d['memory_size'])} ({d['memory_size']} bytes)"),
        ("page size", human_bytes(d["page_size"])),
        ("chunk size", human_bytes(d["chunk_size"])),
        ("chunks", f"{d['chunks']} ({d['zero_chunks']} all zero, {d['objects']} distinct objects)"),
        ("zero pages", f"{d['zero_pages']} ({d['zero_pages_pct']:.1f} %)"),
        ("stored bytes", human_bytes(d["stored_bytes"])),
        ("compression ratio", ratio),
        ("dedup savings", f"{human_bytes(d['dedup_within_bytes'])} within, {human_bytes(d['dedup_across_bytes'])} shared with other snapshots"),
        ("uploaded", human_bytes(d["uploaded_bytes"])),
        ("encrypted", "yes (AES-256-GCM)" if d["encrypted"] else "no"),
        ("layout", d["layout"]),
    ]
    for k, v in rows:
        click.echo(f"{k + ':':<19}{v}")


@snapshot.command("verify")
@click.argument("spec", metavar="NAME[:VERSION]")
@click.option("--version", "version", default=None, help=VERSION_HELP)
@key_options
@store_options
def snapshot_verify(spec, version, key_file, key_env, store_url, s3_endpoint, s3_region):
    """Fetch and decode every chunk; name each bad one and exit 1 if any."""
    from ..snapshot import Snapshot

    name, version = version_of(spec, version)
    store = open_store(store_url, s3_endpoint, s3_region)
    with Snapshot.open(store, name, version, load_key(key_file, key_env)) as snap:
        total = len(snap.manifest.chunks) * snap.manifest.chunk_size
        with progress_bar("verify", total) as advance:
            bad = snap.verify(progress=advance)
        for b in bad:
            click.echo(f"BAD chunk {b.index} at offset {b.offset:#x}: {b.reason}", err=True)
        n = len(snap.manifest.chunks)
        if bad:
            click.echo(f"{snap.label}: {len(bad)} of {n} chunks bad", err=True)
            sys.exit(1)
        click.echo(f"{snap.label}: all {n} chunks verified")


@snapshot.command("export")
@click.argument("spec", metavar="NAME[:VERSION]")
@click.argument("out", type=click.Path(dir_okay=False, path_type=str))
@click.option("--version", "version", default=None, help=VERSION_HELP)
@click.option("--cache", "--cache-dir", "cache_dir", default=None, help=CACHE_HELP)
@click.option("--no-cache", is_flag=True, help="Read only from the store.")
@key_options
@store_options
def snapshot_export(spec, out, version, cache_dir, no_cache, key_file, key_env, store_url, s3_endpoint, s3_region):
    """Write the snapshot's memory file back out to OUT."""
    from ..snapshot import Snapshot

    name, version = version_of(spec, version)
    store = open_store(store_url, s3_endpoint, s3_region)
    l1 = open_l1(cache_dir, no_cache)
    with Snapshot.open(store, name, version, load_key(key_file, key_env), l1) as snap:
        with progress_bar("export", snap.manifest.memory_size) as advance:
            snap.export(out, progress=advance)
    click.echo(f"wrote {human_bytes(snap.manifest.memory_size)} to {out}")


@snapshot.command("rm")
@click.argument("spec", metavar="NAME:VERSION")
@click.option("--version", "version", default=None, help="The version to remove, if not given as NAME:VERSION.")
@store_options
def snapshot_rm(spec, version, store_url, s3_endpoint, s3_region):
    """Remove a version's manifest (or a dead PENDING claim). Chunks stay."""
    from ..snapshot import remove_snapshot

    name, version = version_of(spec, version)
    if version is None:
        raise click.UsageError(f"name the version to remove: {name}:VERSION")
    store = open_store(store_url, s3_endpoint, s3_region)
    remove_snapshot(store, name, version)
    click.echo(f"removed {name}/{version}")
