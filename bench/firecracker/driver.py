"""Boot, snapshot and restore the guest (guest.c) under a real Firecracker.

``binaries()`` finds Firecracker and its jailer (``RESTORE_FIRECRACKER`` /
``RESTORE_JAILER``, else the pinned build that ``make firecracker`` fetches
into ``build/firecracker``); ``build_guest()`` compiles the guest; ``VM``
runs one Firecracker process (optionally under the jailer) and talks to it
over its API socket, and to the guest over its serial port (Firecracker's
standard input and output).
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from . import fetch as _fetch

HERE = Path(__file__).resolve().parent
GUEST_CFLAGS = [
    "-m64", "-ffreestanding", "-fno-pic", "-mno-red-zone", "-mcmodel=small", "-mgeneral-regs-only",
    "-fno-stack-protector", "-nostdlib", "-O2", "-Wall", "-Wextra", "-Werror",
]
API_TIMEOUT = 60.0  # seconds for one API call (a load with a slow handler included)


class FirecrackerError(RuntimeError):
    pass


@dataclass(frozen=True)
class Binaries:
    firecracker: Path
    jailer: Optional[Path]


def binaries(fetch: bool = True) -> Binaries:
    """Firecracker and its jailer: RESTORE_FIRECRACKER (and RESTORE_JAILER,
    else a jailer next to it) when set, else the pinned build in
    build/firecracker (fetched first when fetch and missing)."""
    env = os.environ.get("RESTORE_FIRECRACKER")
    if env:
        fc = Path(env)
        jailer = Path(os.environ.get("RESTORE_JAILER") or fc.with_name("jailer"))
    else:
        dest = _fetch.fetch() if fetch else _fetch.DEFAULT_DEST
        fc, jailer = dest / "firecracker", dest / "jailer"
    if not os.access(fc, os.X_OK):
        raise FirecrackerError(f"no Firecracker executable at {fc} (run make firecracker, or set RESTORE_FIRECRACKER)")
    return Binaries(fc, jailer if os.access(jailer, os.X_OK) else None)


def version(fc: Path) -> str:
    """The version Firecracker reports, e.g. "1.12.1"."""
    out = subprocess.run([str(fc), "--version"], capture_output=True, text=True, timeout=30).stdout
    for word in out.split():
        if word.startswith("v") and word[1:2].isdigit():
            return word[1:]
    raise FirecrackerError(f"{fc} --version printed no version: {out!r}")


def build_guest(out_dir: str | os.PathLike) -> Path:
    """Compile guest.c into out_dir/fcguest.elf (system gcc and ld); skips the
    work when the output is newer than its sources."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    obj, elf = out / "fcguest.o", out / "fcguest.elf"
    sources = [HERE / "guest.c", HERE / "guest.ld", HERE.parent / "guestwork.h"]
    if elf.exists() and elf.stat().st_mtime > max(p.stat().st_mtime for p in sources):
        return elf
    for tool in ("gcc", "ld"):
        if shutil.which(tool) is None:
            raise FirecrackerError(f"{tool} is needed to build the Firecracker guest")
    _run(["gcc", *GUEST_CFLAGS, "-c", str(HERE / "guest.c"), "-o", str(obj)])
    _run(["ld", "-m", "elf_x86_64", "--no-warn-rwx-segments", "-T", str(HERE / "guest.ld"), "-o", str(elf), str(obj)])
    return elf


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise FirecrackerError(f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


@dataclass(frozen=True)
class Answer:
    request: int
    value: int
    at: float  # time.monotonic() when the line arrived


@dataclass(frozen=True)
class Jail:
    """Run Firecracker under the jailer: its own uid/gid, chrooted in
    base/firecracker/<id>/root."""

    jailer: Path
    uid: int
    gid: int
    base: Path


class VM:
    """One Firecracker process. workdir holds its API socket and logs; under
    the jailer they go in the jail's root instead (workdir unused). Paths
    given to the API are as Firecracker sees them (relative to the chroot
    under the jailer: see host_path and place)."""

    def __init__(self, fc: Path, workdir: Optional[str | os.PathLike], *, vm_id: str = "fc",
                 jail: Optional[Jail] = None):
        self.vm_id = vm_id
        self.jail = jail
        if jail is not None:
            self.root = jail.base / Path(fc).name / vm_id / "root"
            self.root.mkdir(parents=True, exist_ok=True)
            self.workdir = self.root
            api, log = "/api.sock", "/firecracker.log"
        else:
            self.root = None
            self.workdir = Path(workdir)
            self.workdir.mkdir(parents=True, exist_ok=True)
            api, log = str(self.workdir / "api.sock"), str(self.workdir / "firecracker.log")
        self.api_sock = self.host_path(api)
        self.log_path = self.host_path(log)
        try:
            self.api_sock.unlink()
        except FileNotFoundError:
            pass
        self.log_path.write_text("")
        if jail is not None:
            os.chown(self.log_path, jail.uid, jail.gid)
        args = ["--api-sock", api, "--log-path", log, "--level", "Info"]
        if jail is None:
            cmd = [str(fc), *args]
        else:
            cmd = [str(jail.jailer), "--id", vm_id, "--exec-file", str(fc), "--uid", str(jail.uid),
                   "--gid", str(jail.gid), "--chroot-base-dir", str(jail.base), "--", *args]
        self.stderr_path = self.workdir / "firecracker.stderr"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        self.lines: "queue.Queue[tuple[float, Optional[str]]]" = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"fc-{vm_id}-serial", daemon=True)
        self._reader.start()
        self._wait_api()

    # -- paths -----------------------------------------------------------------
    def host_path(self, path: str | os.PathLike) -> Path:
        """Where a path Firecracker sees is on the host."""
        if self.root is None:
            return Path(path)
        return self.root / str(path).lstrip("/")

    def place(self, src: str | os.PathLike, name: str) -> str:
        """Make src visible to Firecracker as name (a hard link, or a copy,
        inside the jail; src itself when not jailed); returns its path as
        Firecracker sees it."""
        if self.root is None:
            return str(src)
        dst = self.root / name
        try:
            dst.unlink()
        except FileNotFoundError:
            pass
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
        os.chown(dst, self.jail.uid, self.jail.gid)
        return "/" + name

    # -- the process -------------------------------------------------------------
    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put((time.monotonic(), raw.decode(errors="replace").rstrip("\r\n")))
        self.lines.put((time.monotonic(), None))

    def _wait_api(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise FirecrackerError(f"Firecracker exited {self.proc.returncode} at start: {self.diagnostics()}")
            if self.api_sock.exists():
                try:
                    self.api("GET", "/")
                    return
                except (OSError, FirecrackerError):
                    pass
            time.sleep(0.005)
        raise FirecrackerError(f"Firecracker's API socket {self.api_sock} did not come up: {self.diagnostics()}")

    def diagnostics(self) -> str:
        """Firecracker's log and standard error, for error messages."""
        parts = []
        for p in (self.log_path, self.stderr_path):
            try:
                parts.append(p.read_text(errors="replace")[-3000:])
            except OSError:
                pass
        return "\n".join(p for p in parts if p.strip()) or "(no log)"

    def api(self, method: str, path: str, body: Any = None, timeout: float = API_TIMEOUT) -> Any:
        """One API call; returns the decoded JSON answer (None for 204);
        raises FirecrackerError with Firecracker's fault message otherwise."""
        conn = _UnixHTTP(str(self.api_sock), timeout)
        try:
            payload = json.dumps(body) if body is not None else None
            conn.request(method, path, payload, {"Content-Type": "application/json", "Accept": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:  # e.g. Firecracker killed during the call
            raise FirecrackerError(f"{method} {path}: no answer from Firecracker ({exc!r})") from None
        finally:
            conn.close()
        if resp.status >= 300:
            try:
                fault = json.loads(data).get("fault_message", data.decode())
            except ValueError:
                fault = data.decode(errors="replace")
            raise FirecrackerError(f"{method} {path}: {resp.status} {fault}")
        return json.loads(data) if data else None

    # -- the VM's life -------------------------------------------------------------
    def boot(self, kernel: str | os.PathLike, mem_mib: int, huge_pages: Optional[str] = None,
             track_dirty_pages: bool = False) -> str:
        """Configure and start the guest; returns its "ready ..." line.
        track_dirty_pages: Firecracker keeps the dirty-page log that a Diff
        snapshot needs."""
        machine: dict[str, Any] = {"vcpu_count": 1, "mem_size_mib": mem_mib}
        if huge_pages:
            machine["huge_pages"] = huge_pages
        if track_dirty_pages:
            machine["track_dirty_pages"] = True
        self.api("PUT", "/machine-config", machine)
        self.api("PUT", "/boot-source", {"kernel_image_path": self.place(kernel, "guest.elf")})
        self.api("PUT", "/actions", {"action_type": "InstanceStart"})
        return self.expect("ready")

    def snapshot(self, state: str | os.PathLike, mem: str | os.PathLike, kind: str = "Full") -> None:
        """Pause and write a snapshot: the microVM state and the memory file
        (paths on the host; under the jailer they must lie in the jail's
        root). kind "Full", or "Diff": the memory file holds the pages
        dirtied since the last snapshot, the rest holes (boot with
        track_dirty_pages)."""
        self.api("PATCH", "/vm", {"state": "Paused"})
        self.api("PUT", "/snapshot/create", {"snapshot_type": kind, "snapshot_path": self._fc_path(state),
                                              "mem_file_path": self._fc_path(mem)})

    def resume(self) -> None:
        """Let a paused VM run on."""
        self.api("PATCH", "/vm", {"state": "Resumed"})

    def load(self, state: str | os.PathLike, backend_type: str, backend_path: str | os.PathLike,
             timeout: float = API_TIMEOUT) -> None:
        """PUT /snapshot/load and resume. backend_type "Uffd" (backend_path:
        the handler's socket) or "File" (the memory file); paths as
        Firecracker sees them."""
        self.api("PUT", "/snapshot/load", {
            "snapshot_path": str(state),
            "mem_backend": {"backend_type": backend_type, "backend_path": str(backend_path)},
            "resume_vm": True,
        }, timeout=timeout)

    def _fc_path(self, host: str | os.PathLike) -> str:
        if self.root is None:
            return str(host)
        return "/" + str(Path(host).relative_to(self.root))

    # -- the serial port -------------------------------------------------------------
    def send(self, lines: Iterable[str]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("".join(f"{x}\n" for x in lines).encode())
        self.proc.stdin.flush()

    def expect(self, prefix: str, timeout: float = 120.0) -> str:
        """The next serial line that starts with prefix (other lines are
        skipped); raises when Firecracker exits or timeout passes first."""
        return self._next(prefix, timeout)[1]

    def _next(self, prefix: str, timeout: float) -> tuple[float, str]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                at, line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise FirecrackerError(f"no {prefix!r} line from the guest within {timeout} s: {self.diagnostics()}") from None
            if line is None:
                self.lines.put((at, None))
                code = self.proc.wait()
                raise FirecrackerError(f"Firecracker exited {code} before the guest said {prefix!r}: {self.diagnostics()}")
            if line.startswith(prefix):
                return at, line

    def ask(self, requests: Sequence[int], timeout: float = 120.0) -> list[Answer]:
        """Send requests and collect their answers, in order."""
        self.send(str(r) for r in requests)
        return self.answers(len(requests), timeout)

    def answers(self, n: int, timeout: float = 120.0) -> list[Answer]:
        out = []
        for _ in range(n):
            at, line = self._next("answer", timeout)
            _, req, value = line.split()
            out.append(Answer(int(req), int(value), at))
        return out

    def state_sum(self, timeout: float = 120.0) -> int:
        """The guest's hash over its whole state."""
        self.send(["sum"])
        return int(self.expect("sum", timeout).split()[1])

    # -- ending ---------------------------------------------------------------------
    @property
    def pid(self) -> int:
        """Firecracker's pid (the jailer execs it, so the same process)."""
        return self.proc.pid

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def wait(self, timeout: Optional[float] = None) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        self.kill()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()
        self._reader.join(timeout=5)

    def __enter__(self) -> "VM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
