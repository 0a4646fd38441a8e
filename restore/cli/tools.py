"""`restore key`, `restore bench` and `restore sample-image`."""

from __future__ import annotations

import sys

import click

from ..keys import generate_key_file
from ..units import human_bytes
from .common import SIZE, progress_bar


@click.group()
def key() -> None:
    """Encryption keys."""


@key.command("generate")
@click.argument("path", type=click.Path(dir_okay=False, path_type=str))
def key_generate(path):
    """Write a new random 32-byte key (hex) to PATH, mode 0600."""
    generate_key_file(path)
    click.echo(f"wrote a new key to {path}; keep it safe: without it the snapshot cannot be read")


@click.command("bench", context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
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

    root = Path(__file__).resolve().parents[2]  # restore/cli/tools.py -> the source tree
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


@click.command("sample-image")
@click.argument("out", type=click.Path(dir_okay=False, path_type=str))
@click.option("--size", type=SIZE, default="256M", show_default=True, help="Image size (multiple of 4K).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--zero", type=click.FloatRange(0, 1), default=0.5, show_default=True, help="Fraction of zero pages.")
@click.option("--random", "random_", type=click.FloatRange(0, 1), default=0.2, show_default=True, help="Fraction of random pages.")
def sample_image(out, size, seed, zero, random_):
    """Write a sample memory image: zero, text-like and random pages in runs."""
    from ..sample import write_sample_image

    with progress_bar("sample image", size) as advance:
        write_sample_image(out, size, seed=seed, zero=zero, random=random_, progress=advance)
    click.echo(f"wrote {human_bytes(size)} sample image to {out}")
