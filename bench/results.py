"""What a run of the strategy comparison keeps: its rows, every sample,
the conditions they were taken under, the machine and the code.

A row is one workload under one condition and one cache state, measured
once per round for each strategy, interleaved with every other row's
strategies. A run's JSON document (``document()``) holds:

    schema       RESULTS_SCHEMA
    command      the argv the run was started with
    args         its parsed options
    started, finished, elapsed_s
    machine      kernel, CPUs and their model, memory, hypervisor
    versions     Python, the packages the engine and benchmark use,
                 Firecracker, and the commit (with "dirty" when the
                 working tree differed from it)
    strategies, cache_states, runners   what the names in the rows mean
    rows         every Row, as a dict

bench/report.py turns a document into the tables of docs/benchmarks.md.
This module imports nothing heavy: the report and its test read documents
without loading the engine.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Optional

RESULTS_SCHEMA = 1

STRATEGIES = {
    "resident": "memory already in place (the memory file read in full before the timer starts): the floor",
    "mmap": "the memory file mapped MAP_PRIVATE, as Firecracker's File backend maps it (in the Firecracker rows, "
            "that backend itself)",
    "uffd-lazy": "restore's engine, demand faults only (no plan)",
    "uffd-reap": "REAP: the working set recorded exactly (fault-around 1), fetched as a compact working-set file "
                 "(the working-set-first version's hot chunks) and installed in full, exactly the recorded pages, "
                 "before the guest starts",
    "uffd-reap-offset": "the same blocking prefetch on the offset layout (the plan's pages where the memory file "
                        "has them, spread over its chunks)",
    "uffd-replay": "the engine replaying the plan as an asynchronous prefetch while the guest runs",
    "uffd-replay-ws": "the same on the working-set-first version (`restore snapshot optimize`)",
    "uffd-replay-ws-memfd": "the same with guest memory in a memfd sent with the handshake, filled by UFFDIO_COPY",
    "uffd-replay-ws-memfd-cont": "the same, filled by writing the memfd and mapping with UFFDIO_CONTINUE",
    "uffd-replay-l1": "uffd-replay without a host cache: every chunk read from L1, verified and decoded for this "
                      "restore",
    "uffd-replay-hc-empty": "uffd-replay with a new, empty host cache: the first restore of a version on a host, "
                            "decoding into it",
    "uffd-lazy-threads": "uffd-lazy with the network tiers read by a pool of Python threads, one request each "
                         "(Server(fetch_loop=False)), as before the fetch loop (slow-tier rows only)",
    "uffd-replay-threads": "uffd-replay with the same thread pool (slow-tier rows only)",
}
UFFD = [s for s in STRATEGIES if s.startswith("uffd-")]
SLOW_ONLY = ["uffd-lazy-threads", "uffd-replay-threads"]  # the fetch path only matters behind the network tiers

CACHE_STATES = {
    "warm": "before each run, every local file the strategy reads is dropped from the page cache and read back in "
            "full, so that every run finds the same page cache: the memory file (resident, mmap); L1's chunk files, "
            "the host cache's files and the file store (uffd-*); Firecracker's state file (its rows)",
    "cold": "before each run, the same files are written back and dropped from the page cache (sync, "
            "POSIX_FADV_DONTNEED): what the strategy reads comes from the disk",
    "empty": "L1 and the host cache new and empty for each run: every chunk comes from the network tiers",
}

RUNNERS = {
    "in-process": "the uffd strategies are served by an in-process restore.handler.Server (the engine's C threads "
                  "in the benchmark's process; no fault goes through Python)",
    "serve": "the uffd strategies are served by a `restore serve` process, as deployed",
}


@dataclass
class Row:
    """One workload, condition and cache state; samples in ms per strategy,
    in round order."""

    id: str  # stable key, e.g. "heap/warm": the report's verdicts and targets name rows by it
    workload: str  # what runs
    condition: str  # where the chunks come from
    cache: str  # a CACHE_STATES key
    runner: str  # a RUNNERS key
    measure: str  # what the time is from and to
    baseline: str  # the strategy ratios are to
    samples: dict[str, list[float]] = field(default_factory=dict)
    resident_mib: dict[str, list[float]] = field(default_factory=dict)  # cache-controlled files in the page cache
    details: dict[str, list[dict]] = field(default_factory=dict)  # what each served run did (compare._detail)

    def add(self, strategy: str, ms: float, resident_bytes: Optional[int] = None,
            detail: Optional[dict] = None) -> None:
        self.samples.setdefault(strategy, []).append(ms)
        if resident_bytes is not None:
            self.resident_mib.setdefault(strategy, []).append(round(resident_bytes / 2**20, 1))
        if detail is not None:
            self.details.setdefault(strategy, []).append(detail)


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) * 1024 for line in _read("/proc/meminfo").splitlines()
                if line.startswith("MemTotal:")), 0)
    kvm = sorted(m.name for m in Path("/sys/module").glob("kvm*")) if Path("/sys/module").is_dir() else []
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "cpu_model": cpu, "memory_bytes": mem,
            "kvm_modules": kvm, "kvm": os.path.exists("/dev/kvm"), "damon": damon()}


def damon() -> list[str]:
    """The kernel's running DAMON contexts as "operations: actions" (a
    host that runs DAMON with a pageout scheme reclaims memory nothing has
    touched lately, page cache included, and its sampling costs the
    workloads it watches)."""
    out = []
    for kd in sorted(Path("/sys/kernel/mm/damon/admin/kdamonds").glob("[0-9]*")):
        if _read(str(kd / "state")).strip() != "on":
            continue
        for ctx in sorted((kd / "contexts").glob("[0-9]*")):
            actions = [_read(str(a)).strip() for a in sorted((ctx / "schemes").glob("[0-9]*/action"))]
            out.append(f"{_read(str(ctx / 'operations')).strip()}: {', '.join(actions) or 'monitoring only'}")
    return out


def _git(root: Path, *args: str) -> str:
    proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def versions(firecracker: Optional[str] = None) -> dict:
    root = Path(__file__).resolve().parent.parent
    out = {"python": platform.python_version()}
    for dist in ("restore", "cffi", "numpy", "lz4", "cryptography", "obstore", "pymemcache", "moto"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    out["commit"] = _git(root, "rev-parse", "HEAD") or None
    out["dirty"] = bool(_git(root, "status", "--porcelain", "--untracked-files=no"))
    if firecracker:
        out["firecracker"] = firecracker
    return out


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def document(rows: list[Row], *, command: list[str], args: dict, started: str, elapsed_s: float,
             firecracker: Optional[str] = None) -> dict:
    return {"schema": RESULTS_SCHEMA, "command": command, "args": args, "started": started, "finished": now(),
            "elapsed_s": round(elapsed_s, 1), "machine": machine(), "versions": versions(firecracker),
            "strategies": STRATEGIES, "cache_states": CACHE_STATES, "runners": RUNNERS,
            "rows": [asdict(r) for r in rows]}


def bench_document(kind: str, module: str, argv: Optional[list[str]], args: dict, started: str, raw: dict) -> dict:
    """The document of a benchmark other than the comparison (bench.report
    reads it by its kind): its rounds as it keeps them, with the command,
    machine and versions."""
    return {"kind": kind, "command": [f"python -m {module}", *(sys.argv[1:] if argv is None else argv)],
            "args": args, "started": started, "machine": machine(), "versions": versions(), "raw": raw}


def default_path(root: Optional[Path] = None, kind: str = "compare") -> Path:
    """Where a run keeps its document when not told: bench/results/
    <UTC date>-<time>-<kind>.json of the source tree."""
    root = root or Path(__file__).resolve().parent / "results"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d-%H%M%S")
    return root / f"{stamp}-{kind}.json"


def write(doc: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def load(path: str | os.PathLike) -> dict:
    return checked(json.loads(Path(path).read_text()), path)


def checked(doc: dict, path: str | os.PathLike) -> dict:
    """doc, if it is a comparison run's document of this schema."""
    if doc.get("schema") != RESULTS_SCHEMA:
        raise ValueError(f"{path}: results schema {doc.get('schema')!r}, this report reads {RESULTS_SCHEMA}")
    return doc
