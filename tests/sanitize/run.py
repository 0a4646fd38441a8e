"""Build the C extensions with a sanitizer and run the engine's tests against them.

    python tests/sanitize/run.py thread [address ...] [-- pytest arguments]

(`make sanitize` and `make test` run both.) For each sanitizer (thread: ThreadSanitizer;
address: AddressSanitizer with UBSan):

1. build/sanitize/<kind>/restore/ is made a copy of the restore package
   (its Python files, not the extensions of the normal build) and both
   extensions, restore._engine and restore._testbed, are compiled into it
   by csrc/build_cffi.py with RESTORE_SANITIZE=<kind>. The source tree's
   extensions and the virtual environment are not touched.
2. pytest runs the engine, session, replay, host-cache and huge-page tests
   in build/sanitize/<kind>, with that directory on PYTHONPATH (so the tests
   and every Python child they start, guests and `restore serve` daemons,
   import the copy), the sanitizer's runtime in LD_PRELOAD (python itself is
   not instrumented), RESTORE_SANITIZER=<kind> (tests/conftest.py checks
   that the engine it imported is the instrumented one, and the few checks
   a sanitizer's runtime makes meaningless skip themselves) and the
   sanitizer's options: stop at the first report, suppressions from
   tests/sanitize/, and every TSan and ASan report written to
   build/sanitize/<kind>/reports/ by whichever process made it (UBSan's go
   to stderr, which pytest leaves alone: --capture=sys). Every build is
   made first; then the sanitizers' pytest runs go side by side, each
   writing to build/sanitize/<kind>/pytest.log, which is printed when the
   run ends.
3. The run fails if pytest fails or if any process wrote a report (a
   report in a child process need not fail the test that started it).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
HERE = ROOT / "tests" / "sanitize"

TESTS = [
    "tests/test_engine_leaks.py",
    "tests/test_session_restore.py",
    "tests/test_workingset_replay.py",
    "tests/test_host_cache.py",
    "tests/test_huge_pages.py",
]

# Per sanitizer: its runtime library (gcc's), the symbol an instrumented
# object references, and the options its runtime reads from the environment.
RUNTIME = {"thread": "libtsan.so", "address": "libasan.so"}
INIT_SYMBOL = {"thread": "__tsan_init", "address": "__asan_init"}


# A guest touching a poisoned page (UFFDIO_POISON) dies of SIGBUS, which
# tests expect to see: the sanitizers leave SIGBUS alone (their handler
# would turn it into a report and an abort).
SIGBUS = "handle_sigbus=0"


def _options(kind: str, reports: Path) -> dict[str, str]:
    if kind == "thread":
        return {
            "TSAN_OPTIONS": ":".join([
                "halt_on_error=1",
                "second_deadlock_stack=1",
                SIGBUS,
                f"suppressions={HERE / 'tsan.supp'}",
                f"log_path={reports / 'tsan'}",
            ]),
        }
    return {
        # CPython does not free everything at exit: no leak checking (the
        # engine's own leaks are test_engine_leaks's business).
        "ASAN_OPTIONS": ":".join([
            "detect_leaks=0",
            SIGBUS,
            "halt_on_error=1",
            "abort_on_error=1",
            f"log_path={reports / 'asan'}",
        ]),
        # UBSan, inside ASan's runtime here, writes its reports to stderr
        # whatever log_path says: pytest runs with --capture=sys so that
        # they reach the terminal; the process exits 1 at the first one.
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
    }


def _runtime(kind: str) -> str:
    lib = subprocess.run(["gcc", f"-print-file-name={RUNTIME[kind]}"], capture_output=True, text=True,
                         check=True).stdout.strip()
    if not os.path.isabs(lib) or not os.path.exists(lib):
        sys.exit(f"gcc has no {RUNTIME[kind]} (Debian: libtsan2, libasan8; `make sanitize` installs them)")
    return os.path.realpath(lib)


def build(kind: str, out: Path) -> list[Path]:
    """Copy the package into out/restore and compile the sanitized
    extensions there; returns their paths."""
    pkg = out / "restore"
    if pkg.exists():
        shutil.rmtree(pkg)
    shutil.copytree(ROOT / "restore", pkg,
                    ignore=shutil.ignore_patterns("*.so", "_engine.c", "_testbed.c", "__pycache__"))
    # cffi compiles in its tmpdir, where the builder's source paths
    # (csrc/..., relative to the repository) must then lead: a copy of
    # csrc/, so the objects stay out of the source tree too.
    if (out / "csrc").exists():
        shutil.rmtree(out / "csrc")
    shutil.copytree(ROOT / "csrc", out / "csrc", ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, RESTORE_SANITIZE=kind, RESTORE_WERROR="1")
    code = ("import sys; sys.path.insert(0, 'csrc'); import build_cffi as b\n"
            "for make in (b.engine, b.testbed): make().compile(tmpdir=sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    built = sorted(pkg.glob("_engine*.so")) + sorted(pkg.glob("_testbed*.so"))
    if len(built) != 2:
        sys.exit(f"expected the two extensions in {pkg}, found {built}")
    for so in built:
        undefined = subprocess.run(["nm", "-D", "--undefined-only", str(so)], capture_output=True, text=True,
                                   check=True).stdout.split()
        if INIT_SYMBOL[kind] not in undefined:
            sys.exit(f"{so} does not reference {INIT_SYMBOL[kind]}: not built with the {kind} sanitizer")
    return built


class Pass:
    """One sanitizer's pass: its build, then its pytest run, whose output
    goes to out/pytest.log while it runs beside the other passes."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.out = ROOT / "build" / "sanitize" / kind
        self.reports = self.out / "reports"
        self.log = self.out / "pytest.log"
        self.proc: subprocess.Popen | None = None
        self.waiter: threading.Thread | None = None
        self.ended = 0.0
        self.built_s = 0.0
        self.started = 0.0

    def build(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.reports.exists():
            shutil.rmtree(self.reports)
        self.reports.mkdir()
        started = time.monotonic()
        for so in build(self.kind, self.out):
            print(f"sanitize[{self.kind}]: built {so.relative_to(ROOT)}", flush=True)
        self.built_s = time.monotonic() - started

    def start(self, pytest_args: list[str]) -> None:
        env = dict(os.environ)
        env.update(_options(self.kind, self.reports))
        env.update({
            "LD_PRELOAD": _runtime(self.kind),
            "PYTHONPATH": os.pathsep.join([str(self.out), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "RESTORE_SANITIZER": self.kind,
        })
        # Arguments naming tests (paths from the repository's root, with or
        # without ::node) run those instead of TESTS.
        named = [a for a in pytest_args if (ROOT / a.split("::")[0]).exists()]
        rest = [a for a in pytest_args if a not in named]
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--capture=sys",
                "--rootdir", str(ROOT),
                *(str(ROOT / t) for t in named or TESTS), *rest]
        # ThreadSanitizer needs its fixed address layout; a kernel with more
        # mmap randomisation than it expects ("unexpected memory mapping") is
        # why its run goes without address randomisation.
        if self.kind == "thread":
            argv = ["setarch", platform.machine(), "-R", *argv]
        print(f"sanitize[{self.kind}]: running the tests (output: {self.log.relative_to(ROOT)})", flush=True)
        self.started = time.monotonic()
        # cwd is the build directory: python -m puts it first on sys.path, in
        # the tests' process as in the children they start with -m.
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=self.out, env=env, stdout=log, stderr=subprocess.STDOUT)
        # Its own time, though its output waits for the passes before it.
        self.waiter = threading.Thread(target=self._wait, name=f"sanitize-{self.kind}")
        self.waiter.start()

    def _wait(self) -> None:
        assert self.proc is not None
        self.proc.wait()
        self.ended = time.monotonic()

    def finish(self) -> bool:
        """Wait for the run, print its output and reports; True when clean."""
        assert self.proc is not None and self.waiter is not None
        self.waiter.join()
        rc = self.proc.returncode
        tests_s = self.ended - self.started
        print(f"===== sanitize[{self.kind}]: pytest output =====", flush=True)
        sys.stdout.buffer.write(self.log.read_bytes())
        found = sorted(p for p in self.reports.iterdir() if p.is_file())
        for p in found:
            print(f"===== sanitize[{self.kind}]: report {p.relative_to(ROOT)} =====")
            print(p.read_text(errors="replace"))
        ok = rc == 0 and not found
        print(f"sanitize[{self.kind}]: {'clean' if ok else 'FAILED'}: pytest exited {rc}, "
              f"{len(found)} report file(s); build {self.built_s:.0f} s, tests {tests_s:.0f} s", flush=True)
        return ok


def main(argv: list[str]) -> int:
    if "--" in argv:
        kinds, pytest_args = argv[: argv.index("--")], argv[argv.index("--") + 1:]
    else:
        kinds, pytest_args = argv, []
    for kind in kinds or list(RUNTIME):
        if kind not in RUNTIME:
            sys.exit(f"unknown sanitizer {kind!r}: expected {' or '.join(RUNTIME)}")
    passes = [Pass(kind) for kind in kinds or list(RUNTIME)]
    for p in passes:
        p.build()
    # The passes run side by side: each keeps about one core busy
    # (ThreadSanitizer's run is mostly one thread's instrumented work), so
    # on two cores they take little longer than the slower one alone.
    try:
        for p in passes:
            p.start(pytest_args)
        results = [p.finish() for p in passes]
    finally:
        for p in passes:
            if p.proc is not None and p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait()
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
