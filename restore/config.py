"""The `restore serve` configuration file (TOML).

A config file holds the same settings as serve's flags, one key per flag:
the flag's long name without the dashes (``fault-around`` or
``fault_around``). Flags given on the command line win over the file;
environment variables (RESTORE_STORE, ...) win over the file too, as they
are the command line's defaults. Repeatable flags take arrays, flags
without a value take booleans, and ``l2`` may also be a table of zones::

    snapshot = "fn-hello"
    socket = "/run/restore/fn-hello.sock"
    store = "s3://snapshots/prod"
    allow_uid = [123]
    metrics = "127.0.0.1:9464"
    log_format = "json"

    [l2]
    use1-az1 = ["10.0.1.5:11211", "10.0.1.6:11211"]
    use1-az2 = ["10.0.2.5:11211"]

    [[listen]]                     # --listen, repeatable: one table per socket
    path = "/srv/jailer/firecracker/fn1/root/run/fn.sock"
    owner = "123:123"
    mode = "0600"
    allow_uids = [123]

Every value is checked the way the flag's value is, and a bad file is
refused as a whole, with its path, the key and why.
"""

from __future__ import annotations

import os
import re
import tomllib
from typing import Any

import click

from .errors import RestoreError
from .listen import MAX_ID, MODE_BITS, Listen

# Settings a file may not hold: the file itself, and the worker's hidden plumbing.
NOT_IN_FILE = {"config", "worker_listen_fd", "worker_report_fd"}


def _l2_specs(path: str, value: Any) -> Any:
    """l2 as a table {zone: [host:port, ...]} → ["zone=host:port,..."]; other
    shapes are left to the flag's own check."""
    if not isinstance(value, dict):
        return value
    specs = []
    for zone, nodes in value.items():
        if isinstance(nodes, str):
            nodes = [nodes]
        if not isinstance(nodes, list) or not nodes or not all(isinstance(n, str) for n in nodes):
            raise click.BadParameter(f"{path}: l2.{zone} must be a list of HOST:PORT strings, got {nodes!r}")
        specs.append(f"{zone}={','.join(nodes)}")
    return specs


LISTEN_KEYS = ("path", "owner", "mode", "allow_uids")  # a [[listen]] table's keys
LISTEN_SYNTAX = "PATH[,owner=UID[:GID]][,mode=OCTAL][,allow=UID[+UID...]]"


def parse_id(text: str, what: str) -> int:
    """A uid or gid: decimal digits, at most MAX_ID. Raises ValueError."""
    if not re.fullmatch(r"\d+", text) or int(text) > MAX_ID:
        raise ValueError(f"{what} {text!r} is not a number in 0..{MAX_ID}")
    return int(text)


def parse_owner(text: str) -> tuple[int, int]:
    """UID or UID:GID → (uid, gid), gid -1 when left out. Raises ValueError."""
    uid, colon, gid = text.partition(":")
    if not uid or (colon and not gid):
        raise ValueError(f"owner {text!r} is not UID or UID:GID (numbers)")
    return parse_id(uid, "owner uid"), parse_id(gid, "owner gid") if colon else -1


def parse_mode(text: str) -> int:
    """A socket mode: 3 or 4 octal digits giving nothing to others
    (e.g. 0600, 0660). Raises ValueError."""
    if not re.fullmatch(r"[0-7]{3,4}", text):
        raise ValueError(f"mode {text!r} is not octal digits such as 0600 or 0660")
    mode = int(text, 8)
    if mode & ~MODE_BITS:
        raise ValueError(f"mode {text} gives access to others than the socket's owner and group "
                         f"(at most {MODE_BITS:04o})")
    return mode


def _make_listen(path: str, owner, mode, allow):
    try:
        return Listen(path, owner, 0o600 if mode is None else mode,
                      frozenset(allow) if allow is not None else None)
    except RestoreError as exc:
        raise ValueError(str(exc)) from None


def parse_listen(spec: str):
    """--listen PATH[,owner=UID[:GID]][,mode=OCTAL][,allow=UID[+UID...]] →
    a restore.listen.Listen. The path comes first and may not hold a
    comma (a [[listen]] table in a config file takes any path). Raises
    ValueError with a one-line reason."""
    path, *pieces = spec.split(",")
    if not path:
        raise ValueError(f"{spec!r} does not start with the socket's path (syntax: {LISTEN_SYNTAX})")
    got: dict[str, str] = {}
    for piece in pieces:
        key, eq, value = piece.partition("=")
        if not eq or key not in ("owner", "mode", "allow"):
            raise ValueError(f"{piece!r} in {spec!r} is not owner=, mode= or allow= (syntax: {LISTEN_SYNTAX}; "
                             "a path with a comma needs a [[listen]] table in a config file)")
        if key in got:
            raise ValueError(f"{key}= is given twice in {spec!r}")
        got[key] = value
    owner = parse_owner(got["owner"]) if "owner" in got else None
    mode = parse_mode(got["mode"]) if "mode" in got else None
    allow = None
    if "allow" in got:
        if not got["allow"]:
            raise ValueError(f"allow= is empty in {spec!r}: no VMM could ever be served")
        allow = [parse_id(u, "allowed uid") for u in got["allow"].split("+")]
    return _make_listen(path, owner, mode, allow)


def listen_from_table(table: Any):
    """A [[listen]] table (path, owner, mode, allow_uids) → a Listen.
    Raises ValueError naming the key."""
    if isinstance(table, str):
        return parse_listen(table)
    if not isinstance(table, dict):
        raise ValueError(f"must be a table (path, owner, mode, allow_uids) or a string, got {table!r}")
    unknown = [k for k in table if k not in LISTEN_KEYS]
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (known: {', '.join(LISTEN_KEYS)})")
    path = table.get("path")
    if not isinstance(path, str) or not path:
        raise ValueError(f"path must be the socket's path, a non-empty string, got {path!r}")
    owner = table.get("owner")
    if owner is not None:
        if isinstance(owner, int) and not isinstance(owner, bool):
            owner = str(owner)
        if not isinstance(owner, str):
            raise ValueError(f"owner must be \"UID\" or \"UID:GID\", got {owner!r}")
        try:
            owner = parse_owner(owner)
        except ValueError as exc:
            raise ValueError(f"owner: {exc}") from None
    mode = table.get("mode")
    if mode is not None:
        if not isinstance(mode, str):
            raise ValueError(f"mode must be a string of octal digits such as \"0660\", got {mode!r}")
        try:
            mode = parse_mode(mode)
        except ValueError as exc:
            raise ValueError(f"mode: {exc}") from None
    allow = table.get("allow_uids")
    if allow is not None:
        if not isinstance(allow, list) or not all(isinstance(u, int) and not isinstance(u, bool) for u in allow):
            raise ValueError(f"allow_uids must be an array of uids, got {allow!r}")
        if not allow:
            raise ValueError("allow_uids is empty: no VMM could ever be served")
        bad = [u for u in allow if not 0 <= u <= MAX_ID]
        if bad:
            raise ValueError(f"allow_uids: {bad[0]} is not a uid in 0..{MAX_ID}")
    return _make_listen(path, owner, mode, allow)


def _listens(path: str, value: Any) -> Any:
    """listen as an array of tables (or of --listen strings) → Listens, each
    error naming listen[i] (counted from 1)."""
    if not isinstance(value, list):
        raise click.BadParameter(f"{path}: listen must be an array of tables ([[listen]]), got {value!r}")
    out = []
    for i, table in enumerate(value, 1):
        try:
            out.append(listen_from_table(table))
        except ValueError as exc:
            raise click.BadParameter(f"{path}: listen[{i}]: {exc}") from None
    return out


def _type_words(t: click.ParamType) -> str:
    if isinstance(t, click.Choice):
        return "one of " + ", ".join(map(str, t.choices))
    if isinstance(t, click.types.IntParamType):
        return "an integer"
    if isinstance(t, click.types.FloatParamType):
        return "a number"
    if isinstance(t, click.Path):
        return "a path"
    return "a string" if t is click.STRING else f"a {t.name}"


def _check_type(path: str, key: str, param: click.Option, value: Any) -> None:
    """What TOML gives must be what the flag takes: booleans for flags,
    arrays for repeatable flags, no tables elsewhere."""
    if param.is_flag:
        if not isinstance(value, bool):
            raise click.BadParameter(f"{path}: {key} must be true or false, got {value!r}")
        return
    items = value if param.multiple else [value]
    if param.multiple and not isinstance(value, list):
        raise click.BadParameter(f"{path}: {key} must be an array (it may be given several times), got {value!r}")
    for item in items:
        textual = (isinstance(param.type, (click.Path, click.Choice)) or param.type is click.STRING
                   or getattr(param.type, "textual", False))
        if isinstance(item, (dict, list, bool)) or (textual and not isinstance(item, str)) or (
                isinstance(item, float) and isinstance(param.type, click.types.IntParamType)):
            raise click.BadParameter(f"{path}: {key} must be {_type_words(param.type)}, got {item!r}")


def load(path: str, command: click.Command, ctx: click.Context) -> dict[str, Any]:
    """Read a config file for command: a click default_map (param name →
    value, checked and converted like the flag's value). Raises
    click.BadParameter naming the file and the key."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise click.BadParameter(f"{path}: no such file") from None
    except IsADirectoryError:
        raise click.BadParameter(f"{path}: is a directory") from None
    except PermissionError:
        raise click.BadParameter(f"{path}: permission denied") from None
    except tomllib.TOMLDecodeError as exc:
        raise click.BadParameter(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise click.BadParameter(f"{path}: not valid TOML: not UTF-8 text") from None
    options = {}
    for p in command.params:
        if isinstance(p, click.Option) and p.name not in NOT_IN_FILE:
            for opt in p.opts:
                if opt.startswith("--"):
                    options[opt[2:].replace("-", "_")] = p
    out: dict[str, Any] = {}
    for key, value in data.items():
        param = options.get(key.replace("-", "_"))
        if param is None:
            raise click.BadParameter(
                f"{path}: unknown setting {key!r} (known: {', '.join(sorted(options))})")
        if param.name in out:
            raise click.BadParameter(f"{path}: {key!r} is given twice")
        if key.replace("-", "_") == "l2":
            value = _l2_specs(path, value)
        if param.name == "listens":
            if any("\0" in text for text in _strings(value)):
                raise click.BadParameter(f"{path}: {key} contains a NUL character")
            out[param.name] = _listens(path, value)
            continue
        _check_type(path, key, param, value)
        if any("\0" in text for text in _strings(value)):
            raise click.BadParameter(f"{path}: {key} contains a NUL character")
        try:
            out[param.name] = param.type_cast_value(ctx, value)
        except click.BadParameter as exc:
            raise click.BadParameter(f"{path}: {key}: {exc.message}") from None
    return out


def _strings(value: Any):
    """Every string in a TOML value (arrays and tables walked)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)


def config_option(f):
    """--config FILE for a command: read first, its settings become the
    defaults of the other options."""

    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is not None:
            ctx.default_map = {**(ctx.default_map or {}), **load(os.fspath(value), ctx.command, ctx)}
        return value

    return click.option(
        "--config",
        metavar="FILE",
        is_eager=True,
        expose_value=False,
        callback=callback,
        help="TOML file of settings, one per option (long name without dashes); options given here win.",
    )(f)
