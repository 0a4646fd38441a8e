"""Build and drive minivm (minivm.c + guest.c) from Python.

minivm is a tiny KVM VMM with Firecracker's snapshot/restore shape: `boot`
runs the guest's INIT and writes a memory file plus vCPU state; `restore`
maps anonymous memory, hands its userfaultfd to a handler over Firecracker's
UFFD protocol and serves requests; `resident` serves them from memory read
in full first. Tests and benchmarks use it as a real VM workload.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

HERE = Path(__file__).resolve().parent
GUEST_CFLAGS = [
    "-m64", "-ffreestanding", "-fno-pic", "-mno-red-zone", "-mcmodel=small",
    "-fno-stack-protector", "-nostdlib", "-O2", "-Wall", "-Wextra", "-Werror",
]


def kvm_available() -> bool:
    """True when /dev/kvm can be opened for a VM."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


@dataclass(frozen=True)
class Build:
    minivm: Path  # the VMM executable
    guest: Path  # the guest's flat binary


def build(out_dir: str | os.PathLike) -> Build:
    """Compile minivm and the guest program into out_dir (system gcc, ld,
    objcopy); skips work when the outputs are newer than the sources."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vmm, guest_o, guest_elf, guest_bin = out / "minivm", out / "guest.o", out / "guest.elf", out / "guest.bin"
    sources = [HERE / "minivm.c", HERE / "guest.c", HERE / "guest.ld", HERE.parent / "guestwork.h"]
    newest = max(p.stat().st_mtime for p in sources)
    if not (vmm.exists() and guest_bin.exists() and min(vmm.stat().st_mtime, guest_bin.stat().st_mtime) > newest):
        for tool in ("gcc", "ld", "objcopy"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is needed to build minivm")
        _run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(vmm), str(HERE / "minivm.c")])
        _run(["gcc", *GUEST_CFLAGS, "-c", str(HERE / "guest.c"), "-o", str(guest_o)])
        _run(["ld", "-m", "elf_x86_64", "--no-warn-rwx-segments", "-T", str(HERE / "guest.ld"), "-o", str(guest_elf), str(guest_o)])
        _run(["objcopy", "-O", "binary", str(guest_elf), str(guest_bin)])
    return Build(vmm, guest_bin)


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")


@dataclass(frozen=True)
class Answer:
    request: int
    value: int
    ns: int  # from restore start (restore) or vCPU resumption (resident, boot)


def _requests(requests: Iterable[int]) -> list[str]:
    args = []
    for r in requests:
        if not 0 < r < 2**32:
            raise ValueError(f"request {r} is not in 1..2^32-1")
        args += ["--request", str(r)]
    return args


def _answers(stdout: str) -> list[Answer]:
    out = []
    for line in stdout.splitlines():
        parts = line.split()
        if parts and parts[0] == "answer":
            out.append(Answer(int(parts[1]), int(parts[2]), int(parts[3])))
    return out


def _check(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode != 0:
        raise RuntimeError(f"minivm {what} exited {proc.returncode}: {proc.stderr.strip()}")


def boot(
    b: Build,
    image: str | os.PathLike,
    state: str | os.PathLike,
    mem_mib: int,
    regions: int = 1,
    requests: Sequence[int] = (),
    timeout: float = 300,
) -> list[Answer]:
    """Run INIT, write the memory file and vCPU state; then answer requests
    from memory that never left (the reference answers)."""
    proc = subprocess.run(
        [str(b.minivm), "boot", "--guest", str(b.guest), "--mem", str(mem_mib), "--regions", str(regions),
         "--image", str(image), "--state", str(state), *_requests(requests)],
        capture_output=True, text=True, timeout=timeout,
    )
    _check(proc, "boot")
    return _answers(proc.stdout)


def restore(b: Build, socket_path: str | os.PathLike, state: str | os.PathLike, requests: Sequence[int],
            timeout: float = 300, memfd: bool = False) -> list[Answer]:
    """Restore through the handler at socket_path and answer requests.
    memfd: back guest memory with a memfd and send it with the handshake."""
    return _wait(start_restore(b, socket_path, state, requests, memfd), "restore", timeout)


def start_restore(b: Build, socket_path: str | os.PathLike, state: str | os.PathLike,
                  requests: Sequence[int], memfd: bool = False) -> subprocess.Popen:
    """Start a restore in the background; finish it with wait_restore()."""
    return subprocess.Popen(
        [str(b.minivm), "restore", "--socket", str(socket_path), "--state", str(state),
         *(["--memfd", "1"] if memfd else []), *_requests(requests)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_restore(proc: subprocess.Popen, timeout: Optional[float] = 300) -> list[Answer]:
    return _wait(proc, "restore", timeout)


def _wait(proc: subprocess.Popen, what: str, timeout: Optional[float]) -> list[Answer]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise RuntimeError(f"minivm {what} did not finish within {timeout} s: {err.strip()}") from None
    _check(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), what)
    return _answers(out)


def resident(b: Build, image: str | os.PathLike, state: str | os.PathLike, requests: Sequence[int],
             timeout: float = 300) -> list[Answer]:
    """Answer requests from memory read in full first (the resident baseline)."""
    proc = subprocess.run(
        [str(b.minivm), "resident", "--image", str(image), "--state", str(state), *_requests(requests)],
        capture_output=True, text=True, timeout=timeout,
    )
    _check(proc, "resident")
    return _answers(proc.stdout)
