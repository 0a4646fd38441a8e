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

Every value is checked the way the flag's value is, and a bad file is
refused as a whole, with its path, the key and why.
"""

from __future__ import annotations

import os
import tomllib
from typing import Any

import click

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
        textual = isinstance(param.type, (click.Path, click.Choice)) or param.type is click.STRING
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
