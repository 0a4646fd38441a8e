"""Load the compiled C extensions and check that they were built for this package.

restore._engine (the engine) is ffi and lib here, loaded on import.
restore._testbed (the test guest, the bare handler and rs_mem_*: tests,
benchmarks and `restore try` use it, the engine never does) is loaded by
load_testbed() on first call, so that importing the product does not load it;
only restore.guest and restore.testing call it in the package.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

from ._version import __version__


def _load(name: str) -> Any:
    """Import restore.<name>, a cffi extension built from csrc/, and check
    that it was built for this version of the package."""
    try:
        module = importlib.import_module(f"{__package__}.{name}")
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            f"restore's C core (restore.{name}) is not built: run `pip install -e .` "
            "with liblz4-dev and libssl-dev installed (`make test` does both)"
        ) from exc
    built = module.ffi.string(module.lib.rs_version()).decode()
    if built != __version__:  # pragma: no cover - depends on the install
        raise ImportError(
            f"restore.{name} was built for version {built} but the package is {__version__}: "
            "rebuild it with `pip install -e .`"
        )
    return module


_engine = _load("_engine")
ffi = _engine.ffi
lib = _engine.lib


@functools.cache
def load_testbed() -> tuple[Any, Any]:
    """(ffi, lib) of restore._testbed, checked as the engine is."""
    module = _load("_testbed")
    return module.ffi, module.lib


__all__ = ["ffi", "lib", "load_testbed"]
