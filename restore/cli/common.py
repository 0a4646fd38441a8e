"""What the commands share: parameter types, option groups, the openers of
stores and caches, output helpers, and how a snapshot version is named."""

from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import click

from ..config import parse_listen, parse_mode
from ..tiers.durable import DurableStore, S3Options, default_store_url
from ..tiers.l1 import L1Cache


@dataclass(frozen=True)
class Invocation:
    """How the `restore` command was invoked (click's context object):
    `serve --supervise` starts its worker with the same command line."""

    argv: tuple[str, ...]

    @classmethod
    def current(cls) -> "Invocation":
        """This invocation (a command run without main(), e.g. by click's
        test runner, is taken as invoked with sys.argv)."""
        obj = click.get_current_context().find_root().obj
        return obj if isinstance(obj, cls) else cls(tuple(sys.argv[1:]))


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
        from ..errors import InputError
        from ..plot import check_size

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


@contextmanager
def progress_bar(description: str, total: int) -> Iterator:
    """A progress bar on a terminal (stderr); nothing when not a terminal,
    and then the bar's library is not even loaded (a command run by a
    script starts sooner)."""
    if not sys.stderr.isatty() and "FORCE_TERMINAL" not in os.environ:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

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


STORE_DEADLINE = "restore.store_deadline"  # ctx.meta key: --store-deadline, read by open_store


def _keep_store_deadline(ctx: click.Context, param: click.Parameter, value: float) -> float:
    ctx.meta[STORE_DEADLINE] = value
    return value


def store_options(f):
    f = click.option(
        "--store-deadline",
        type=click.FloatRange(min=0),
        envvar="RESTORE_STORE_DEADLINE",
        default=S3Options.deadline,
        show_default=True,
        metavar="SECONDS",
        expose_value=False,
        callback=_keep_store_deadline,
        help="Seconds within which a failed request to a network store (s3://, gs://, az://: a 5xx, throttling, "
        "a refused or dropped connection, a timeout) is retried, with backoff, before it is an error; 0 tries "
        "once (env RESTORE_STORE_DEADLINE).",
    )(f)
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
    """The L2 cluster --l2 names, or None (and the memcached client is not
    loaded) when it names none."""
    if not specs:
        return None
    from ..tiers.l2 import L2Cluster

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
    deadline = ctx.meta.get(STORE_DEADLINE, S3Options.deadline) if ctx is not None else S3Options.deadline
    return DurableStore(store_url or default_store_url(),
                        S3Options(endpoint=s3_endpoint, region=s3_region, endpoint_from=endpoint_from,
                                  deadline=deadline))


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


def open_l1(cache_dir, no_cache, budget=None):
    """The L1Cache the flags ask for (--cache, --no-cache, a budget), or None."""
    if no_cache:
        return None
    return L1Cache(cache_dir or default_cache_dir(), **({"budget_bytes": budget} if budget else {}))


def open_host_cache(host_cache_dir, budget, no_host_cache, cache_dir):
    """The HostCache the flags ask for, or None."""
    from ..tiers.host import HostCache

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
