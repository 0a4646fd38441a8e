"""`restore serve`, `restore try` and `restore session`, run as real
processes: a guest restored through the served socket reads the image, the
session's log can be shown, SIGTERM stops the server cleanly."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from bench.results import SLOW_ONLY
from daemon import wait_for_socket
from restore.guest import Guest, reads
from restore.testing import expected_sums

SIZE = 4 << 20


@pytest.fixture
def made(cli_snapshot):
    return cli_snapshot(SIZE, seed=8)


def _serve(tmp_path, store, *extra):
    sock = tmp_path / "fn.sock"
    env = dict(os.environ, RESTORE_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "restore", "serve", "--snapshot", "fn", "--socket", str(sock), "--store", store, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    wait_for_socket(proc, sock)
    return proc, sock


def test_serve_a_guest_then_sigterm(tmp_path, made, run_cli):
    img, store = made
    proc, sock = _serve(tmp_path, store, "-v")
    try:
        offsets = np.arange(0, SIZE, 4096 * 3, dtype=np.uint64)
        with Guest(sock, memory_size=SIZE) as g:
            res = g.run(reads(offsets), timeout=60)
        assert (res.sums == expected_sums(img, offsets)).all()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "stopped after 1 sessions, 0 refused" in err
    # Said once, with what the socket lets in.
    assert err.count("serving fn/1 on") == 1, err
    assert f"serving fn/1 on {sock} (owner {os.getuid()}:{os.getgid()}, mode 0600, allows {os.getuid()})" in err
    assert re.search(r"restore: guest pid \d+: session \S+ of fn/1 ended: \d+ faults", err), err
    assert not sock.exists()

    ls = run_cli("session", "ls", "fn", "--store", store, check=True).stdout.split()
    assert len(ls) == 1
    show = run_cli("session", "show", "fn:1", "--store", store, check=True).stdout
    assert show.startswith(f"session:           {ls[0]} of fn/1\n")
    first = int(re.search(r"first touches:\s+(\d+)", show).group(1))
    assert 0 < first <= len(offsets)
    assert re.search(r"\n  durable:\s+\d+\n", show), show
    assert "prefetched" not in show  # no plan: every record is a demand fault
    assert f"demand faults:     {first}\n" in show
    assert "service p50/p99:" in show and "chunks touched:" in show
    assert show.count("  t=") == 10


def test_serve_refuses_bad_settings(tmp_path, made, run_cli):
    _, store = made
    unknown = run_cli("serve", "--snapshot", "nope", "--socket", str(tmp_path / "s"), "--store", store)
    assert unknown.returncode == 1
    assert unknown.stderr == f"error: no snapshot named 'nope' in {store}\n"
    (tmp_path / "plain").write_text("x")
    taken = run_cli("serve", "--snapshot", "fn", "--socket", str(tmp_path / "plain"), "--store", store)
    assert taken.returncode == 1
    assert taken.stderr == f"error: socket path {tmp_path / 'plain'} exists and is not a socket\n"
    zero = run_cli("serve", "--snapshot", "fn", "--socket", str(tmp_path / "s"), "--record-fault-around", "0",
                   "--store", store)
    assert zero.returncode == 2 and "--record-fault-around" in zero.stderr
    bogus = run_cli("serve", "--snapshot", "fn", "--socket", str(tmp_path / "s"), "--memfd-install", "mmap",
                    "--store", store)
    assert bogus.returncode == 2 and "'mmap' is not one of 'copy', 'continue'" in bogus.stderr
    negative = run_cli("serve", "--snapshot", "fn", "--socket", str(tmp_path / "s"), "--allow-uid", "-1",
                       "--store", store)
    assert negative.returncode == 2 and "--allow-uid" in negative.stderr
    missing = run_cli("session", "show", "fn", "--store", store)
    assert missing.returncode == 1 and missing.stderr == "error: no sessions of fn/1\n"


def test_try_checks_every_page(tmp_path, made, run_cli):
    _, store = made
    first = run_cli("try", "fn", "--pages", "300", "--store", store, check=True).stdout
    assert re.match(r"fn/1: guest read 300 pages in [\d.]+ (ns|us|ms) .*; every page matches the snapshot\n", first), first
    fetched = re.search(r"chunks:\s+0 from the host cache, 0 from L1, ([1-9]\d*) fetched, 0 failed; "
                        r"(\d+) decoded into the host cache", first)
    assert fetched and fetched[1] == fetched[2], first
    again = run_cli("try", "fn", "--pages", "300", "--store", store, check=True).stdout
    assert re.search(rf"chunks:\s+{fetched[1]} from the host cache, 0 from L1, 0 fetched, 0 failed\n", again), again
    assert "fault log:         snapshots/fn/1/sessions/" in again
    # Without the host cache, the chunks are decoded again, from L1.
    alone = run_cli("try", "fn", "--pages", "300", "--no-host-cache", "--store", store, check=True).stdout
    assert re.search(rf"chunks:\s+0 from the host cache, {fetched[1]} from L1, 0 fetched, 0 failed\n", alone), alone


def test_plan_build_and_show(tmp_path, made, run_cli):
    _, store = made
    none = run_cli("plan", "build", "fn", "--store", store)
    assert none.returncode == 1
    assert none.stderr == "error: snapshot fn/1 has no recorded sessions to build a plan from\n"
    missing = run_cli("plan", "show", "fn", "--store", store)
    assert missing.returncode == 1 and missing.stderr == "error: snapshot fn/1 has no plan (see `restore plan build`)\n"
    run_cli("try", "fn", "--pages", "200", "--no-plan", "--store", store, check=True)
    built = run_cli("plan", "build", "fn:1", "--sessions", "3", "--min-share", "0.5", "--store", store, check=True).stdout
    assert re.fullmatch(r"plan [0-9a-f]{16} for fn/1: \d+ pages \([\d.]+ [KM]iB\) from 1 sessions\n", built), built
    shown = run_cli("plan", "show", "fn", "--store", store, check=True).stdout
    assert "built from:        1 sessions, pages kept if in >= 50% of them" in shown
    assert shown.count("  offset 0x") == 10
    bad = run_cli("plan", "build", "fn", "--min-share", "0", "--store", store)
    assert bad.returncode == 2 and "0<x<=1" in bad.stderr
    replay = run_cli("try", "fn", "--pages", "200", "--store", store, check=True).stdout
    # The plan was loaded (its chunks planned); how many pages the prefetch
    # put in before the guest's own faults did is a race this small guest
    # may win outright, so only the accounting is checked.
    m = re.search(r"prefetch:\s+(\d+) pages from (\d+) planned chunks, (\d+) of them read by the guest, (\d+) not",
                  replay)
    assert m and int(m[2]) > 0 and int(m[1]) == int(m[3]) + int(m[4]), replay
    late = re.search(r"demand faults:\s+(\d+) on planned pages whose chunk was not in yet, \d+ on pages not in the plan",
                     replay)
    assert late and (int(m[1]) > 0 or int(late[1]) > 0), replay  # every planned page came one way or the other
    prefetched = int(m[1])

    # The recording and the replay, side by side: the replay logs the pages
    # its prefetch installed, so it records as much as the first run did.
    ids = run_cli("session", "ls", "fn", "--store", store, check=True).stdout.split()
    side = run_cli("session", "compare", "fn", "--store", store, check=True).stdout.splitlines()
    assert side[0] == "fn/1" and side[1].split() == ids[-2:]
    rows = {line.split(":")[0].strip(): line.split(":", 1)[1].split() for line in side[2:]}
    if prefetched:
        assert rows["prefetched"][0] == "-" and int(rows["prefetched"][1]) > 0
        assert int(rows["demand faults"][1]) < int(rows["demand faults"][0])
    else:  # the guest outran the prefetch: nothing logged as prefetched
        assert "prefetched" not in rows, side
    assert rows["first touches"][0] == rows["first touches"][1]  # same invocation, same first touches
    explicit = run_cli("session", "compare", "fn", ids[-2], ids[-1], "--store", store, check=True).stdout.splitlines()
    assert explicit == side
    one = run_cli("session", "compare", "fn", ids[-1], "--store", store)
    assert one.returncode == 2 and "give two session ids, or none for the two newest" in one.stderr
    unknown = run_cli("session", "compare", "fn", ids[-1], "nope", "--store", store)
    assert unknown.returncode == 1 and unknown.stderr == "error: no session nope of fn/1\n"


def test_restore_bench_runs_the_comparison(tmp_path, run_cli):
    """`restore bench` is bench/compare.py: a small run prints the tables,
    keeps every sample with its conditions as JSON, and writes the plot;
    bad arguments exit 2 with the reason."""
    out, raw = tmp_path / "compare.png", tmp_path / "raw.json"
    res = run_cli("bench", "--rounds", "1", "--size-mib", "8", "--no-minivm", "--realistic-size-mib", "16",
                  "--firecracker-mem-mib", "16", "--out", str(out), "--json", str(raw), check=True).stdout
    assert "## comparison-synthetic" in res and "## targets" in res, res
    table = res.split("## verdicts-synthetic")[0]
    for strategy in ("`resident`", "`mmap`", "`lazy`", "`reap`", "`reap-offset`", "`replay`"):
        assert strategy in table
    assert re.search(r"\| heap, warm \| `replay` \| \d+ \| \d+", res), res
    doc = json.loads(raw.read_text())
    rows = {r["id"]: r for r in doc["rows"]}
    want = {"heap/warm", "heap/cold", "scatter/warm", "scan/cold", "sqlite/warm", "sqlite/cold"}
    if os.path.exists("/dev/kvm"):  # a real Firecracker: its File backend against restore serve
        want |= {"firecracker/another/first/warm", "firecracker/recorded/end/cold"}
        assert rows["firecracker/another/first/warm"]["runner"] == "serve"
        assert doc["versions"]["firecracker"] == "1.12.1"
    assert want <= set(rows), sorted(rows)
    heap = rows["heap/warm"]
    # Every strategy but the fetch-path ones, which only the slow-tier rows run.
    assert set(heap["samples"]) == set(doc["strategies"]) - set(SLOW_ONLY)
    assert all(len(v) == 1 for v in heap["samples"].values())
    assert heap["runner"] == "in-process" and heap["baseline"] == "mmap"
    # The cache states were set, and mincore saw them: warm files resident, cold ones not.
    assert heap["resident_mib"]["mmap"][0] >= 7.9 and rows["heap/cold"]["resident_mib"]["mmap"][0] < 0.5
    assert rows["heap/cold"]["resident_mib"]["uffd-replay"][0] < 0.5 < heap["resident_mib"]["uffd-replay"][0]
    assert len(heap["details"]["uffd-reap"]) == 1 and heap["details"]["uffd-reap"][0]["prefetched"] > 0
    assert doc["machine"]["cpus"] == os.cpu_count() and doc["versions"]["numpy"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for bad, why in [(["--rounds", "0"], "0 is not at least 1"), (["--size-mib", "x"], "'x' is not a whole number"),
                     (["--cache", "tepid"], "choose from warm, cold")]:
        r = run_cli("bench", *bad)
        assert r.returncode == 2 and why in r.stderr, r.stderr
