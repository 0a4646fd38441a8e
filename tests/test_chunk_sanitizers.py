"""Run the C chunk codec (csrc/chunk.c) under AddressSanitizer + UBSan and under valgrind.

tests/c/chunk_selftest.c is a standalone program that calls every entry point
of csrc/chunk.h many times: codec creation with good and bad geometry, encode
and decode round trips for every chunk shape (with and without a key, full and
short chunks, 4 KiB to 2 MiB), each documented error code of decode, and both
calls from two threads on one shared codec. Every buffer it hands the codec is
a heap block of exactly the documented size, so an overrun, a leak or
undefined behaviour in the codec fails one of these tests.

The program is built with gcc from the repository's sources into tmp_path:
once with -fsanitize=address,undefined, once plain and run under valgrind's
memcheck (with "quick" iteration counts, valgrind being slow).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["tests/c/chunk_selftest.c", "csrc/chunk.c"]
CFLAGS = ["-std=gnu11", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-I", "csrc"]
LIBS = ["-llz4", "-lcrypto", "-pthread"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
PASSED = re.compile(r"^chunk_selftest: \d+ checks passed$", re.MULTILINE)


def _output(proc: subprocess.CompletedProcess[str]) -> str:
    return f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"


def _compile(out: Path, extra: list[str]) -> subprocess.CompletedProcess[str]:
    gcc = shutil.which("gcc")
    assert gcc, "gcc is not on PATH; `make test` installs it"
    cmd = [gcc, *CFLAGS, *extra, *SOURCES, "-o", str(out), *LIBS]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_chunk_codec_under_asan_and_ubsan(tmp_path: Path) -> None:
    exe = tmp_path / "chunk_selftest_asan"
    build = _compile(exe, SANITIZE)
    assert build.returncode == 0, f"gcc failed (the sanitizer runtimes come with Debian's gcc):\n{_output(build)}"

    env = dict(
        os.environ,
        ASAN_OPTIONS="detect_leaks=1:abort_on_error=1",
        UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
    )
    run = subprocess.run([str(exe)], env=env, capture_output=True, text=True, timeout=300)

    assert run.returncode == 0, f"chunk_selftest exited {run.returncode}:\n{_output(run)}"
    assert PASSED.search(run.stdout), f"no success line:\n{_output(run)}"


def test_chunk_codec_under_valgrind(tmp_path: Path) -> None:
    valgrind = shutil.which("valgrind")
    assert valgrind, "valgrind is not on PATH; `make test` installs it"
    exe = tmp_path / "chunk_selftest"
    build = _compile(exe, [])
    assert build.returncode == 0, f"gcc failed:\n{_output(build)}"

    cmd = [
        valgrind,
        "-q",
        "--error-exitcode=99",
        "--leak-check=full",
        "--errors-for-leak-kinds=definite,indirect",
        str(exe),
        "quick",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)

    assert run.returncode == 0, f"valgrind exited {run.returncode}:\n{_output(run)}"
    assert PASSED.search(run.stdout), f"no success line:\n{_output(run)}"
