"""cffi builders (API mode) for restore's two C extensions.

restore._engine is the engine: every C file in this directory but the test
bed's, its cdef the engine's headers. restore._testbed is what tests,
benchmarks and `restore try` run against the engine: the test guest that
plays Firecracker (guest.c), the bare handler (bare.c) and memory touched
from C (mem.c); it compiles uffd.c (the guest and the bare handler call its
wrappers) and version.c (restore._native checks both extensions' versions)
in again, privately. Each cdef is its headers, read verbatim.

setup.py's cffi_modules names engine and testbed; each returns its builder.
This file is not part of the installed package.
"""

import os
import pathlib
import re

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent

# The test bed's own sources and headers; everything else is the engine's.
TESTBED_SOURCES = ["guest.c", "bare.c", "mem.c"]
TESTBED_HEADERS = ["guest.h", "bare.h", "mem.h"]

# The engine's headers, all of them in its cdef: first these, whose types
# others use, in this order, then the rest by name.
FIRST = ["version.h", "chunk.h", "faultlog.h", "fetchq.h", "uffd.h"]
ENGINE_HEADERS = FIRST + sorted(
    p.name for p in HERE.glob("*.h") if p.name not in FIRST and p.name not in TESTBED_HEADERS
)
ENGINE_SOURCES = sorted(p.name for p in HERE.glob("*.c") if p.name not in TESTBED_SOURCES)


def _package_version() -> str:
    text = (ROOT / "restore" / "_version.py").read_text()
    match = re.search(r'__version__ = "([^"]+)"', text)
    if not match:
        raise RuntimeError("restore/_version.py has no __version__")
    return match.group(1)


# RESTORE_SANITIZE=thread or address builds both extensions instrumented
# (ThreadSanitizer; AddressSanitizer with UBSan), for tests/sanitize/run.py
# (`make sanitize`), which builds them into build/sanitize/ and runs tests
# against them with the sanitizer's runtime preloaded.
SANITIZE = {
    "thread": ["-fsanitize=thread"],
    "address": ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
}


def _sanitize_args() -> list[str]:
    kind = os.environ.get("RESTORE_SANITIZE", "")
    if not kind:
        return []
    if kind not in SANITIZE:
        raise RuntimeError(f"RESTORE_SANITIZE={kind!r}: expected one of {', '.join(SANITIZE)}")
    return [*SANITIZE[kind], "-fno-omit-frame-pointer"]


def _compile_args() -> list[str]:
    sanitize = _sanitize_args()
    # A sanitized build is -O1 (the sanitizers' advice: fast enough, and
    # its reports' stacks match the source).
    args = ["-std=gnu11", "-O1" if sanitize else "-O2", "-g", "-Wall", "-Wextra", "-fvisibility=hidden", *sanitize]
    # Tests and CI build with RESTORE_WERROR=1 so a new warning fails them;
    # a user's build on a newer compiler does not.
    if os.environ.get("RESTORE_WERROR") == "1":
        args.append("-Werror")
    return args


def _builder(module: str, headers: list[str], sources: list[str], libraries: list[str]) -> FFI:
    """An FFI builder for restore.<module>: cdef the headers, compile the
    sources (file names in this directory) with the shared flags."""
    ffibuilder = FFI()
    ffibuilder.cdef("\n".join((HERE / h).read_text() for h in headers))
    ffibuilder.set_source(
        module,
        "#include <stddef.h>\n#include <stdint.h>\n" + "".join(f'#include "{h}"\n' for h in headers),
        sources=[str((HERE / s).relative_to(ROOT)) for s in sources],
        include_dirs=[str(HERE.relative_to(ROOT))],
        libraries=libraries,
        define_macros=[("RS_PKG_VERSION", f'"{_package_version()}"')],
        extra_compile_args=_compile_args(),
        extra_link_args=_sanitize_args(),
    )
    return ffibuilder


def engine() -> FFI:
    """restore._engine: the engine alone."""
    return _builder("restore._engine", ENGINE_HEADERS, ENGINE_SOURCES, ["lz4", "crypto"])


def testbed() -> FFI:
    """restore._testbed: the test guest, the bare handler and rs_mem_*."""
    return _builder(
        "restore._testbed",
        ["version.h", *TESTBED_HEADERS],
        sorted(["version.c", "uffd.c", *TESTBED_SOURCES]),
        [],
    )


if __name__ == "__main__":
    for make in (engine, testbed):
        make().compile(verbose=True)
