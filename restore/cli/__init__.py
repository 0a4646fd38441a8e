"""The `restore` command (also `python -m restore`).

One module per command group: snapshots (`restore snapshot`), serving
(`restore serve`), trial (`restore try`), plans (`restore plan`), sessions
(`restore session`) and tools (`restore key`, `bench`, `sample-image`);
common holds what they share. Each command imports the heavy modules it
needs when it runs, so `restore --help` loads neither the engine nor numpy.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import click

from .._version import __version__
from ..errors import RestoreError
from .common import Invocation
from .plans import plan
from .serving import serve
from .sessions import session
from .snapshots import snapshot
from .tools import bench, key, sample_image
from .trial import try_


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="restore")
def cli() -> None:
    """restore: lazy memory restore for microVM snapshots."""


for command in (snapshot, serve, try_, plan, session, key, bench, sample_image):
    cli.add_command(command)


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: run the CLI, turning the package's errors into one line.

    numpy's OpenBLAS starts a thread per core when numpy is imported, and
    each spins for some 0.1 s of CPU before it sleeps; restore does no
    linear algebra, so a command (and a handler, many to a host) asks for
    none unless OPENBLAS_NUM_THREADS is set. Commands import numpy when they
    run, after this."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        cli.main(args=args, prog_name="restore", standalone_mode=False, obj=Invocation(tuple(args)))
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
