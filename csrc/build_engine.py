"""cffi builder for restore._engine (API mode).

The cdef is the hand-written headers in this directory, read verbatim;
the sources are every C file beside them. This file is used by setup.py's
cffi_modules and is not part of the installed package.
"""

import os
import pathlib
import re

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent

# Every header is part of the cdef: first these, whose types others use, in
# this order, then the rest by name.
FIRST = ["version.h", "chunk.h", "faultlog.h", "fetchq.h", "uffd.h"]
HEADERS = FIRST + sorted(p.name for p in HERE.glob("*.h") if p.name not in FIRST)


def _package_version() -> str:
    text = (ROOT / "restore" / "_version.py").read_text()
    match = re.search(r'__version__ = "([^"]+)"', text)
    if not match:
        raise RuntimeError("restore/_version.py has no __version__")
    return match.group(1)


def _compile_args() -> list[str]:
    args = ["-std=gnu11", "-O2", "-g", "-Wall", "-Wextra", "-fvisibility=hidden"]
    # Tests and CI build with RESTORE_WERROR=1 so a new warning fails them;
    # a user's build on a newer compiler does not.
    if os.environ.get("RESTORE_WERROR") == "1":
        args.append("-Werror")
    return args


ffibuilder = FFI()
ffibuilder.cdef("\n".join((HERE / h).read_text() for h in HEADERS))
ffibuilder.set_source(
    "restore._engine",
    "#include <stddef.h>\n#include <stdint.h>\n"
    + "".join(f'#include "{h}"\n' for h in HEADERS),
    sources=sorted(str(p.relative_to(ROOT)) for p in HERE.glob("*.c")),
    include_dirs=[str(HERE.relative_to(ROOT))],
    libraries=["lz4", "crypto"],
    define_macros=[("RS_PKG_VERSION", f'"{_package_version()}"')],
    extra_compile_args=_compile_args(),
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
