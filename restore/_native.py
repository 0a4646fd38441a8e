"""Load the compiled C core and check that it was built for this package."""

from __future__ import annotations

from ._version import __version__

try:
    from ._engine import ffi, lib
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "restore's C core (restore._engine) is not built: run `pip install -e .` "
        "with liblz4-dev and libssl-dev installed (`make test` does both)"
    ) from exc

_built = ffi.string(lib.rs_version()).decode()
if _built != __version__:  # pragma: no cover - depends on the install
    raise ImportError(
        f"restore._engine was built for version {_built} but the package is {__version__}: "
        "rebuild it with `pip install -e .`"
    )

__all__ = ["ffi", "lib"]
