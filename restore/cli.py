"""The `restore` command (also `python -m restore`)."""

from __future__ import annotations

import json
import os
import re
import sys
from contextlib import contextmanager
from typing import Iterator, Optional

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

from ._version import __version__
from .config import LISTEN_SYNTAX, config_option, parse_listen, parse_mode
from .errors import RestoreError
from .keys import generate_key_file, load_key
from .tiers.durable import DurableStore, S3Options, default_store_url
from .tiers.l1 import L1Cache

_SIZE_RE = re.compile(r"(\d+)\s*([kmgt]?)(i?b)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class SizeParam(click.ParamType):
    """A byte count: 524288, 512K, 512KiB, 2M, 1G (binary units)."""

    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        m = _SIZE_RE.fullmatch(str(value).strip())
        if not m:
            self.fail(f"{value!r} is not a size (use bytes or a K/M/G suffix, e.g. 512K)", param, ctx)
        return int(m.group(1)) * _UNITS[m.group(2).lower()]


SIZE = SizeParam()


class OwnerParam(click.ParamType):
    """UID or UID:GID, numbers (a gid left out: -1, unchanged)."""

    name = "owner"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        m = re.fullmatch(r"(\d+)(?::(\d+))?", str(value).strip())
        if not m:
            self.fail(f"{value!r} is not UID or UID:GID (numbers)", param, ctx)
        return int(m.group(1)), int(m.group(2)) if m.group(2) is not None else -1


OWNER = OwnerParam()


class ModeParam(click.ParamType):
    """A socket mode: octal digits giving nothing to others (0600, 0660)."""

    name = "mode"
    textual = True  # a config file gives it as a string ("0660"), never as a number

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value and not value & ~0o770:
            return value  # converted already (a config file's value)
        if not isinstance(value, str):
            self.fail(f"{value!r} is not a string of octal digits such as \"0660\"", param, ctx)
        try:
            return parse_mode(value.strip())
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class ListenParam(click.ParamType):
    """PATH[,owner=UID[:GID]][,mode=OCTAL][,allow=UID[+UID...]] → a Listen."""

    name = "listen"

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value  # a Listen, from a config file's [[listen]] table
        try:
            return parse_listen(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


MODE = ModeParam()
LISTEN = ListenParam()

_PIXELS_RE = re.compile(r"(\d+)x(\d+)", re.IGNORECASE)


class PixelsParam(click.ParamType):
    """A picture size in pixels, WIDTHxHEIGHT (e.g. 1200x800): (width, height)."""

    name = "WxH"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        m = _PIXELS_RE.fullmatch(str(value).strip())
        if not m:
            self.fail(f"{value!r} is not WIDTHxHEIGHT in pixels, e.g. 1200x800", param, ctx)
        from .errors import InputError
        from .plot import check_size

        width, height = int(m.group(1)), int(m.group(2))
        try:
            check_size(width, height)
        except InputError as exc:
            self.fail(str(exc), param, ctx)
        return width, height


def plot_options(f):
    """-o/--out and --size of the commands that draw a PNG."""
    f = click.option("--size", "size", type=PixelsParam(), default="1200x800", show_default=True,
                     metavar="WIDTHxHEIGHT", help="Picture size in pixels.")(f)
    return click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=False, path_type=str),
                        help="The PNG file to write.")(f)


def fmt_ns(ns: float) -> str:
    """A duration in ns, in the unit that reads best: 850 ns, 12.8 us, 3.1 ms."""
    if ns < 1e3:
        return f"{ns:.0f} ns"
    if ns < 1e6:
        return f"{ns / 1e3:.1f} us"
    return f"{ns / 1e6:.1f} ms"


def human(n: float) -> str:
    """Bytes in binary units, e.g. 256.0 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@contextmanager
def progress_bar(description: str, total: int) -> Iterator:
    """A progress bar on a terminal (stderr); nothing when not a terminal."""
    console = Console(stderr=True)
    if not console.is_terminal:
        yield lambda n: None
        return
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def store_options(f):
    f = click.option(
        "--s3-region", envvar="RESTORE_S3_REGION", default=None,
        help="S3 region (env RESTORE_S3_REGION; else AWS_REGION, AWS_DEFAULT_REGION or the AWS profile's region)."
    )(f)
    f = click.option(
        "--s3-endpoint",
        envvar="RESTORE_S3_ENDPOINT",
        default=None,
        help="S3 endpoint URL, e.g. http://127.0.0.1:5000 (env RESTORE_S3_ENDPOINT; else AWS_ENDPOINT_URL_S3, "
        "AWS_ENDPOINT_URL or the AWS profile's endpoint_url). Credentials come from AWS_ACCESS_KEY_ID / "
        "AWS_SECRET_ACCESS_KEY or the AWS profile (AWS_PROFILE).",
    )(f)
    f = click.option(
        "--store",
        "store_url",
        envvar="RESTORE_STORE",
        default=None,
        metavar="URL",
        help="Object store: file://DIR, s3://BUCKET/PREFIX, gs://, az://, memory:// "
        "(env RESTORE_STORE; default file://~/.local/share/restore/store).",
    )(f)
    return f


def l2_option(f):
    return click.option(
        "--l2",
        "l2_specs",
        multiple=True,
        metavar="ZONE=HOST:PORT[,HOST:PORT]",
        envvar="RESTORE_L2",
        help="A memcached L2 cluster of one availability zone (repeat for more zones; the first is local).",
    )(f)


def open_l2(specs):
    from .tiers.l2 import L2Cluster

    return L2Cluster.from_specs(list(specs))


def key_options(f):
    f = click.option("--key-env", metavar="VAR", default=None, help="Environment variable holding the key.")(f)
    f = click.option(
        "--key-file",
        metavar="FILE",
        default=None,
        help="File holding the 32-byte AES-256 key (hex, base64 or raw); see `restore key generate`.",
    )(f)
    return f


def open_store(store_url: Optional[str], s3_endpoint: Optional[str], s3_region: Optional[str]) -> DurableStore:
    endpoint_from = None
    ctx = click.get_current_context(silent=True)
    if s3_endpoint and ctx is not None:
        source = ctx.get_parameter_source("s3_endpoint")
        endpoint_from = "RESTORE_S3_ENDPOINT" if source == click.core.ParameterSource.ENVIRONMENT else "--s3-endpoint"
    return DurableStore(store_url or default_store_url(),
                        S3Options(endpoint=s3_endpoint, region=s3_region, endpoint_from=endpoint_from))


HOST_CACHE_HELP = ("Host cache of decoded chunks, shared by every server on the host (default: host/ in the "
                   "cache directory).")
VERSION_HELP = "The version, if not given as NAME:VERSION (default: the newest ACTIVE)."


def host_cache_options(f):
    """--host-cache DIR, --host-cache-budget SIZE, --no-host-cache."""
    f = click.option("--no-host-cache", is_flag=True,
                     help="Decode chunks for each session alone; nothing decoded is kept on disk.")(f)
    f = click.option("--host-cache-budget", type=SIZE, default=None, metavar="SIZE",
                     help="Host cache size budget, e.g. 32G; least recently used versions no session uses are "
                          "evicted past it (default: 16 GiB).")(f)
    return click.option("--host-cache", "host_cache_dir", default=None, metavar="DIR", help=HOST_CACHE_HELP)(f)


def open_host_cache(host_cache_dir, budget, no_host_cache, cache_dir):
    """The HostCache the flags ask for, or None."""
    from .tiers.host import HostCache

    if no_host_cache:
        return None
    root = host_cache_dir or os.path.join(cache_dir or default_cache_dir(), "host")
    return HostCache(root, **({"budget_bytes": budget} if budget else {}))


CACHE_HELP = "L1 chunk cache directory (env RESTORE_CACHE_DIR; default $XDG_CACHE_HOME/restore, else ~/.cache/restore)."


def default_cache_dir() -> str:
    env = os.environ.get("RESTORE_CACHE_DIR")
    if env:
        return env
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_home, "restore")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="restore")
def cli() -> None:
    """restore: lazy memory restore for microVM snapshots."""


@cli.group()
def snapshot() -> None:
    """Create, list, inspect, verify and export snapshots."""


@snapshot.command("create")
@click.argument("memfile", type=click.Path(dir_okay=True, path_type=str))
@click.option("--name", required=True, help="Snapshot name.")
@click.option("--version", "version", default=None, help="Version (default: next integer).")
@click.option("--chunk-size", type=SIZE, default="512K", show_default=True, help="Chunk size, a power of two >= 4K.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Encoding threads (default: one per core).")
@click.option("--warm-l2", is_flag=True, help="Also push every chunk into the --l2 clusters (all zones).")
@l2_option
@key_options
@store_options
def snapshot_create(memfile, name, version, chunk_size, workers, warm_l2, l2_specs, key_file, key_env, store_url, s3_endpoint, s3_region):
    """Cut MEMFILE into chunks and store them as a new snapshot version."""
    from .snapshot import create_snapshot, describe, memory_file_size

    key = load_key(key_file, key_env)
    store = open_store(store_url, s3_endpoint, s3_region)
    size = memory_file_size(memfile)  # fail before drawing a bar
    l2 = open_l2(l2_specs)
    if warm_l2 and l2 is None:
        raise click.UsageError("--warm-l2 needs --l2 ZONE=HOST:PORT")
    with progress_bar("snapshot", size) as advance:
        m = create_snapshot(
            store, memfile, name, version, chunk_size=chunk_size, key=key, workers=workers, progress=advance,
            warm_l2=l2 if warm_l2 else None,
        )
    d = describe(store, m)
    click.echo(
        f"created {m.name}/{m.version} in {store.url}: {human(m.memory_size)} of memory, "
        f"{d['chunks']} chunks, {human(d['stored_bytes'])} stored, {human(m.uploaded_bytes)} uploaded"
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
    from .layout import optimize_snapshot
    from .snapshot import Snapshot, describe

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
        f"{d['chunks'] - opt.hot_chunks} cold chunks; {human(m.uploaded_bytes)} uploaded"
    )
    click.echo(f"plan {opt.plan.plan_id[:16]} ({opt.plan.pages} pages) carried over: its pages lie in "
               f"{opt.hot_chunks} chunks now, {opt.source_chunks} in {src}")


def _read_plan(store, ref: str):
    """A plan given on the command line: a .npy file, or a plan id."""
    import os

    import numpy as np

    from .errors import InputError
    from .faultlog import parse_npy
    from .objects import plan_key

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
    from .snapshot import list_snapshots

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
    from .errors import SnapshotPending
    from .snapshot import describe, load_manifest, pending_info

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
        ("memory size", f"{human(d['memory_size'])} ({d['memory_size']} bytes)"),
        ("page size", human(d["page_size"])),
        ("chunk size", human(d["chunk_size"])),
        ("chunks", f"{d['chunks']} ({d['zero_chunks']} all zero, {d['objects']} distinct objects)"),
        ("zero pages", f"{d['zero_pages']} ({d['zero_pages_pct']:.1f} %)"),
        ("stored bytes", human(d["stored_bytes"])),
        ("compression ratio", ratio),
        ("dedup savings", f"{human(d['dedup_within_bytes'])} within, {human(d['dedup_across_bytes'])} shared with other snapshots"),
        ("uploaded", human(d["uploaded_bytes"])),
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
    from .snapshot import Snapshot

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
    from .snapshot import Snapshot

    name, version = version_of(spec, version)
    store = open_store(store_url, s3_endpoint, s3_region)
    l1 = None if no_cache else L1Cache(cache_dir or default_cache_dir())
    with Snapshot.open(store, name, version, load_key(key_file, key_env), l1) as snap:
        with progress_bar("export", snap.manifest.memory_size) as advance:
            snap.export(out, progress=advance)
    click.echo(f"wrote {human(snap.manifest.memory_size)} to {out}")


@snapshot.command("rm")
@click.argument("spec", metavar="NAME:VERSION")
@click.option("--version", "version", default=None, help="The version to remove, if not given as NAME:VERSION.")
@store_options
def snapshot_rm(spec, version, store_url, s3_endpoint, s3_region):
    """Remove a version's manifest (or a dead PENDING claim). Chunks stay."""
    from .snapshot import remove_snapshot

    name, version = version_of(spec, version)
    if version is None:
        raise click.UsageError(f"name the version to remove: {name}:VERSION")
    store = open_store(store_url, s3_endpoint, s3_region)
    remove_snapshot(store, name, version)
    click.echo(f"removed {name}/{version}")


def split_snapshot(spec: str) -> tuple[str, Optional[str]]:
    """NAME or NAME:VERSION."""
    name, _, version = spec.partition(":")
    return name, (version or None)


def version_of(spec: str, version: Optional[str]) -> tuple[str, Optional[str]]:
    """(name, version) of NAME[:VERSION], or of NAME with --version: one
    snapshot named one way or the other, not two."""
    name, given = split_snapshot(spec)
    if given and version and given != version:
        raise click.UsageError(f"{spec} and --version {version} name different versions")
    return name, given or version


@cli.command("serve")
@config_option
@click.option("--snapshot", "spec", required=True, metavar="NAME[:VERSION]", help="Snapshot to serve (default: newest version).")
@click.option("--socket", "socket_path", default=None, type=click.Path(dir_okay=False, path_type=str),
              help="Unix socket to listen on (mode 0600); its owner and allowed uids are --socket-owner and "
                   "--allow-uid. Give it, --listen, or both.")
@click.option("--listen", "listens", multiple=True, type=LISTEN, metavar=LISTEN_SYNTAX,
              help="One more socket, with its own owner (default: the server's user), mode (default 0600; "
                   "never more than 0770) and allowed uids joined with + (default: the server's own uid); "
                   "repeatable, e.g. one per jail. The path may not hold a comma.")
@click.option("--cache", "cache_dir", default=None, help=CACHE_HELP)
@click.option("--cache-budget", type=SIZE, default=None, metavar="SIZE",
              help="L1 size budget, e.g. 20G; least recently used chunks are evicted past it (default: 8 GiB).")
@click.option("--no-cache", is_flag=True, help="Do not use an L1 cache.")
@host_cache_options
@click.option("--fault-around", type=click.IntRange(min=1), default=None, help="Pages installed per fault at most.")
@click.option("--poll-us", type=click.IntRange(min=0, max=1_000_000), default=None, metavar="US",
              help="After serving a fault, keep looking for the next one this long before sleeping "
                   "(0: sleep at once; default: 50).")
@click.option("--record-fault-around", type=click.IntRange(min=1), default=None, metavar="N",
              help="Fault-around of sessions without a plan (1: record the exact working set, "
                   "for `snapshot optimize`; default: --fault-around).")
@click.option("--memfd-install", type=click.Choice(["copy", "continue"]), default="copy", show_default=True,
              help="For guests that send a memfd: UFFDIO_COPY, or write the memfd and UFFDIO_CONTINUE.")
@click.option("--allow-uid", "allow_uids", multiple=True, type=click.IntRange(min=0), metavar="UID",
              help="A uid whose VMMs may connect (repeatable; default: the server's own uid).")
@click.option("--socket-owner", type=OWNER, default=None, metavar="UID[:GID]",
              help="Give the socket to this uid (and gid), so VMMs running as it (a jailer's --uid) can connect; "
                   "allow it with --allow-uid too.")
@click.option("--socket-mode", type=MODE, default=None, metavar="OCTAL",
              help="Mode of --socket: 0600 (the default) or e.g. 0660 to let its group connect; never more than 0770.")
@click.option("--fetchers", type=click.IntRange(min=1), default=None,
              help="Chunks fetched at once per guest from L2 and the durable tier (default: 4; more for slow tiers).")
@click.option("--prefetch-inflight", type=click.IntRange(min=1), default=None, metavar="N",
              help="Plan chunks the prefetch asks for at once (default: 8; more for slow tiers).")
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=10.0, show_default=True, help="Seconds running guests get after SIGTERM before they are killed.")
@click.option("-v", "--verbose", is_flag=True, help="Log every session start and end.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="Log lines on stderr as text, or as JSON objects (one per line, with structured fields).")
@click.option("--metrics", "metrics_addr", default=None, metavar="HOST:PORT",
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (HOST defaults to 127.0.0.1; port 0: any free port).")
@click.option("--no-plan", is_flag=True, help="Do not prefetch the snapshot's working-set plan.")
@click.option("--rebuild-plan-after", type=click.IntRange(min=1), default=None, metavar="N",
              help="Rebuild the plan from the recent fault logs after every N sessions.")
@click.option("--plan-sessions", type=click.IntRange(min=1), default=5, show_default=True,
              help="Fault logs a rebuilt plan merges.")
@click.option("--audit-every", type=click.IntRange(min=1), default=None, metavar="N",
              help="Run every Nth session that has a plan without it, recording every first touch, and score the "
                   "plan by what that guest touched (useful and wasted pages, in the metrics).")
@click.option("--supervise", is_flag=True,
              help="Run the server as a worker under a supervisor that, if the worker dies, kills the VMMs it "
                   "was serving (their guests would hang) and starts a new worker on the same socket.")
@click.option("--worker-listen-fd", type=int, multiple=True, hidden=True)
@click.option("--worker-report-fd", type=int, default=None, hidden=True)
@l2_option
@key_options
@store_options
def serve(spec, socket_path, listens, cache_dir, cache_budget, no_cache, host_cache_dir, host_cache_budget, no_host_cache,
          fault_around, poll_us, record_fault_around, memfd_install,
          allow_uids, socket_owner, socket_mode, fetchers, prefetch_inflight, drain_timeout, verbose, log_format, metrics_addr, no_plan,
          rebuild_plan_after, plan_sessions, audit_every, supervise, worker_listen_fd, worker_report_fd, l2_specs,
          key_file, key_env, store_url, s3_endpoint, s3_region):
    """Serve a snapshot's memory to guests over Firecracker's UFFD protocol.

    Each connection on SOCKET (or on any --listen socket) is one guest (one
    JSON list of regions plus its userfaultfd), served if its uid is allowed
    on the socket it came on. Settings come from flags and/or a TOML file (--config).
    SIGTERM or Ctrl-C: no new guests; running guests get --drain-timeout
    seconds to finish (their fault logs are saved), then the server exits."""
    import logging
    import signal
    import threading

    from . import logs
    from .handler import Server
    from .session import DEFAULT_FAULT_AROUND, DEFAULT_FETCHERS, DEFAULT_POLL_US, DEFAULT_PREFETCH_INFLIGHT
    from .snapshot import Snapshot
    from .supervisor import PeerReports

    logs.configure(log_format, verbose)
    log = logging.getLogger("restore.serve")
    sockets = _serve_listens(socket_path, socket_owner, socket_mode, allow_uids, listens)
    if supervise and not worker_listen_fd:
        from .supervisor import supervise as run_supervisor

        sys.exit(run_supervisor([a for a in _ARGV if a != "--supervise"], sockets))
    listeners = _worker_listeners(worker_listen_fd, sockets) if worker_listen_fd else None
    name, version = split_snapshot(spec)
    store = open_store(store_url, s3_endpoint, s3_region)
    l1 = None
    if not no_cache:
        l1 = L1Cache(cache_dir or default_cache_dir(), **({"budget_bytes": cache_budget} if cache_budget else {}))
    snap = Snapshot.open(store, name, version, load_key(key_file, key_env), l1)
    metrics = None
    if metrics_addr is not None:
        from .metrics import ServerMetrics

        metrics = ServerMetrics(l1)
        host, port = metrics.serve(metrics_addr)
        log.info("metrics on http://%s:%d/metrics", host, port,
                 extra={"event": "metrics", "metrics_url": f"http://{host}:{port}/metrics"})
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = Server(
        snap,
        sockets,
        l1=l1,
        l2=open_l2(l2_specs),
        fault_around=fault_around or DEFAULT_FAULT_AROUND,
        record_fault_around=record_fault_around,
        memfd_install=memfd_install,
        fetchers=fetchers or DEFAULT_FETCHERS,
        prefetch_inflight=prefetch_inflight or DEFAULT_PREFETCH_INFLIGHT,
        drain_timeout=drain_timeout,
        use_plan=not no_plan,
        rebuild_plan_after=rebuild_plan_after,
        plan_sessions=plan_sessions,
        audit_every=audit_every,
        on_fetch=metrics.observe_fetch if metrics else None,
        listener=listeners,
        on_peer=PeerReports(worker_report_fd) if worker_report_fd is not None else None,
        host_cache=open_host_cache(host_cache_dir, host_cache_budget, no_host_cache, cache_dir),
        poll_us=DEFAULT_POLL_US if poll_us is None else poll_us,
    )
    if metrics is not None:
        metrics.attach(server)
    server.start()  # logs "serving ... on ..." once per socket
    while not stop.wait(0.5):
        pass
    log.info("stopping: no new guests; %d running get %.0f s to finish", server.active(), drain_timeout,
             extra={"event": "stopping", "active": server.active()})
    server.stop()
    snap.close()
    counts = server.counters()
    if metrics is not None:
        metrics.close()
    log.info("stopped after %d sessions, %d refused", counts.get("sessions_ended", 0),
             counts.get("sessions_refused", 0),
             extra={"event": "stopped", "sessions": counts.get("sessions_ended", 0),
                    "refused": counts.get("sessions_refused", 0)})


def _serve_listens(socket_path, socket_owner, socket_mode, allow_uids, listens) -> list:
    """serve's sockets: --socket (with --socket-owner, --socket-mode and
    --allow-uid) first, then each --listen; a path given twice, or no socket
    at all, is a usage error."""
    from .handler import Listen, check_listens

    out = []
    if socket_path is not None:
        try:
            out.append(Listen(socket_path, socket_owner, 0o600 if socket_mode is None else socket_mode,
                              frozenset(allow_uids) if allow_uids else None))
        except RestoreError as exc:
            raise click.BadParameter(str(exc), param_hint="'--socket'") from None
    else:
        for given, name in ((socket_owner, "--socket-owner"), (socket_mode, "--socket-mode"),
                            (allow_uids, "--allow-uid")):
            if given:
                raise click.UsageError(f"{name} is a setting of --socket, and no --socket is given "
                                       "(a --listen socket takes owner=, mode= and allow=)")
    out += listens
    if not out:
        raise click.UsageError("give a socket to listen on: --socket PATH and/or --listen PATH[,...]")
    try:
        return check_listens(out)
    except RestoreError as exc:
        raise click.BadParameter(str(exc), param_hint="'--listen'") from None


def _worker_listeners(fds, sockets) -> list:
    """The listening sockets a supervisor handed its worker, one per socket
    in order; each must be bound at its socket's path."""
    import socket

    listeners = [socket.socket(fileno=fd) for fd in fds]
    names = [s.getsockname() for s in listeners]
    if names != [lst.path for lst in sockets]:
        raise RestoreError(f"the supervisor's sockets ({', '.join(map(str, names))}) are not this worker's "
                           f"({', '.join(lst.path for lst in sockets)})")
    return listeners


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


@cli.command("try")
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
    server at --socket), runs a guest process (restore.testing.Guest) that
    maps the snapshot's memory and reads a working set of pages (runs of
    adjacent pages, in random order), checks every page it read against the
    snapshot, and prints the session's stats."""
    import tempfile

    import numpy as np

    from .handler import Server
    from .session import DEFAULT_FAULT_AROUND, prefetch_usage
    from .snapshot import Snapshot
    from .guest import Guest, reads

    name, version = split_snapshot(spec)
    store = open_store(store_url, s3_endpoint, s3_region)
    l1 = None if no_cache else L1Cache(cache_dir or default_cache_dir())
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
                server = Server(
                    snap, f"{tmp}/uffd.sock", l1=l1, l2=open_l2(l2_specs),
                    fault_around=fault_around or DEFAULT_FAULT_AROUND, use_plan=not no_plan,
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
    click.echo(f"{'pages installed:':<19}{st.pages_installed} ({human(st.bytes_installed)})")
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


@cli.group()
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
    from .snapshot import load_manifest
    from .workingset import rebuild_plan

    store = open_store(store_url, s3_endpoint, s3_region)
    name, version = split_snapshot(spec)
    m = load_manifest(store, name, version)
    info = rebuild_plan(store, m, sessions, min_share)
    click.echo(f"plan {info.plan_id[:16]} for {m.name}/{m.version}: {info.pages} pages "
               f"({human(info.pages * m.page_size)}) from {len(info.built_from)} sessions")


@plan.command("show")
@click.argument("spec", metavar="NAME[:VERSION]")
@click.option("--head", type=click.IntRange(min=0), default=10, show_default=True, help="First pages to list.")
@store_options
def plan_show(spec, head, store_url, s3_endpoint, s3_region):
    """Show a snapshot version's current plan."""
    import numpy as np

    from .manifest import ZERO_PAGE, page_chunks
    from .snapshot import load_page_map

    store = open_store(store_url, s3_endpoint, s3_region)
    m, info, pages = _current_plan(store, spec)
    chunks = page_chunks(load_page_map(store, m), pages, m.page_size)
    click.echo(f"{'plan:':<19}{info.plan_id} ({info.created})")
    click.echo(f"{'pages:':<19}{info.pages} ({human(info.pages * m.page_size)}, "
               f"{100 * info.pages * m.page_size / m.memory_size:.1f} % of memory)")
    click.echo(f"{'chunks:':<19}{len(np.unique(chunks[chunks != ZERO_PAGE]))} of {len(m.chunks)}"
               + (f" (and {int((chunks == ZERO_PAGE).sum())} all-zero pages)" if (chunks == ZERO_PAGE).any() else ""))
    click.echo(f"{'built from:':<19}{len(info.built_from)} sessions, pages kept if in >= {info.min_share:.0%} of them")
    for off, c in zip(pages[:head], chunks[:head]):
        click.echo(f"  offset {int(off):#012x}  chunk {'-' if c == ZERO_PAGE else int(c)}")


def _current_plan(store: DurableStore, spec: str):
    """(manifest, PlanInfo, uint64 file offsets) of the current plan of the
    snapshot version NAME[:VERSION]; SnapshotNotFound if it has none."""
    from .errors import SnapshotNotFound
    from .snapshot import load_manifest
    from .workingset import load_plan, plan_info

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
    from .plot import plot_plan
    from .snapshot import load_page_map

    store = open_store(store_url, s3_endpoint, s3_region)
    m, info, pages = _current_plan(store, spec)
    plot_plan(pages, out, title=f"{m.name}/{m.version} plan {info.plan_id[:16]}", memory_size=m.memory_size,
              chunk_size=m.chunk_size, page_size=m.page_size, page_map=load_page_map(store, m),
              chunk_count=len(m.chunks), width_px=size[0], height_px=size[1])
    click.echo(f"wrote {out}")


@cli.group()
def session() -> None:
    """Fault logs of past restore sessions."""


def _session_logs(store: DurableStore, spec: str):
    """(manifest, ids of its saved sessions, oldest first) of NAME[:VERSION]."""
    from .objects import session_ids
    from .snapshot import load_manifest

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
    from .errors import SnapshotNotFound
    from .faultlog import load_fault_log
    from .objects import session_key

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

    from .faultlog import NO_CHUNK, SOURCES

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
    from .faultlog import NO_CHUNK, SOURCES

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
    from .faultlog import SOURCES

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
    from .plot import plot_session

    store = open_store(store_url, s3_endpoint, s3_region)
    m, ids = _session_logs(store, spec)
    name, version = m.name, m.version
    sid, recs = _load_session(store, name, version, ids, session_id)
    plot_session(recs, out, title=f"{name}/{version} session {sid}",
                 page_size=m.page_size, width_px=size[0], height_px=size[1])
    click.echo(f"wrote {out}")


@cli.group()
def key() -> None:
    """Encryption keys."""


@key.command("generate")
@click.argument("path", type=click.Path(dir_okay=False, path_type=str))
def key_generate(path):
    """Write a new random 32-byte key (hex) to PATH, mode 0600."""
    generate_key_file(path)
    click.echo(f"wrote a new key to {path}; keep it safe: without it the snapshot cannot be read")


@cli.command("bench", context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
             add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args):
    """The strategy comparison (bench/compare.py; --help for its options).

    Runs `python -m bench.compare` from the source tree this package was
    installed from (pip install -e .): every strategy, workload, tier
    condition and cache state, interleaved; prints medians with their
    spread, verdicts and targets, keeps every sample as JSON
    (bench/results/ unless --json) and writes a plot."""
    import runpy
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if not (root / "bench" / "compare.py").is_file():
        raise click.ClickException(
            f"the strategy comparison lives in the source tree's bench/ directory, and {root} has none: "
            "install restore from a checkout (pip install -e .) to run it"
        )
    sys.path.insert(0, str(root))
    sys.argv = ["restore bench", *args]
    try:
        runpy.run_module("bench.compare", run_name="__main__")
    except SystemExit as exc:
        if exc.code:
            raise


@cli.command("sample-image")
@click.argument("out", type=click.Path(dir_okay=False, path_type=str))
@click.option("--size", type=SIZE, default="256M", show_default=True, help="Image size (multiple of 4K).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--zero", type=click.FloatRange(0, 1), default=0.5, show_default=True, help="Fraction of zero pages.")
@click.option("--random", "random_", type=click.FloatRange(0, 1), default=0.2, show_default=True, help="Fraction of random pages.")
def sample_image(out, size, seed, zero, random_):
    """Write a sample memory image: zero, text-like and random pages in runs."""
    from .sample import write_sample_image

    with progress_bar("sample image", size) as advance:
        write_sample_image(out, size, seed=seed, zero=zero, random=random_, progress=advance)
    click.echo(f"wrote {human(size)} sample image to {out}")


_ARGV: list[str] = []  # the command line, for `serve --supervise` to start its worker with


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: run the CLI, turning the package's errors into one line."""
    global _ARGV
    _ARGV = list(sys.argv[1:] if argv is None else argv)
    try:
        cli.main(args=argv, prog_name="restore", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except RestoreError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
