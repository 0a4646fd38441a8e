"""`restore serve` as a service: settings from a TOML file, JSON log lines,
a Prometheus endpoint whose counters follow real restores, and SIGTERM
during a restore letting it finish."""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon import Daemon, wait_for
from restore.guest import Guest, reads, wait
from restore.testing import expected_sums

SIZE = 16 << 20


@pytest.fixture
def made(cli_snapshot):
    return cli_snapshot(SIZE, seed=11)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of the endpoint: (name, sorted labels) → value."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def write_config(path: Path, **settings) -> Path:
    lines = []
    for key, v in settings.items():
        lines.append(f"{key} = {json.dumps(v)}")  # JSON strings, numbers, booleans and arrays are TOML too
    path.write_text("\n".join(lines) + "\n")
    return path


def test_serve_from_a_config_file_with_metrics(tmp_path, made, run_cli):
    img, store = made
    sock = tmp_path / "fn.sock"
    config = write_config(tmp_path / "serve.toml", snapshot="fn", socket=str(sock), store=store,
                          cache=str(tmp_path / "cache"), metrics="127.0.0.1:0", log_format="json", verbose=True,
                          audit_every=2, fetchers=2)
    d = Daemon(tmp_path, "--config", str(config))
    try:
        url = d.event("metrics")["metrics_url"]
        assert d.event("serving")["socket"] == str(sock)
        before = scrape(url)
        assert value(before, "restore_active_sessions") == 0
        assert value(before, "restore_sessions_total", outcome="ended") == 0

        rng = np.random.default_rng(3)
        offsets = np.sort(rng.choice(SIZE // 4096, 600, replace=False)).astype(np.uint64) * 4096

        def restore_once() -> dict:
            with Guest(str(sock), memory_size=SIZE) as g:
                res = g.run(reads(offsets), timeout=60)
            assert (res.sums == expected_sums(img, offsets)).all()
            return d.event("session_end")

        # 1: no plan yet, a cold L1: every chunk comes from the durable store.
        first = restore_once()
        after1 = scrape(url)
        assert first["faults"] > 0 and first["first_touches"]["durable"] > 0 and first["log_key"]
        assert value(after1, "restore_sessions_total", outcome="ended") == 1
        assert value(after1, "restore_first_touches_total", source="durable") == first["first_touches"]["durable"]
        assert value(after1, "restore_first_touches_total", source="zero") == first["first_touches"]["zero"]
        assert value(after1, "restore_faults_total", kind="all") == first["faults"]
        assert value(after1, "restore_l1_lookups_total", result="miss") > 0
        assert value(after1, "restore_fetch_seconds_count", tier="durable", outcome="hit") > 0
        assert value(after1, "restore_fetch_bytes_total", tier="durable") > 0
        assert value(after1, "restore_fetch_errors_total", tier="durable", kind="error") == 0
        demand = first["faults"] - first["first_touches"]["prefetched"]
        assert value(after1, "restore_fault_service_seconds_count") == sum(
            n for s, n in first["first_touches"].items() if s != "prefetched")
        assert value(after1, "restore_fault_service_seconds_sum") > 0 and demand > 0
        assert value(after1, "restore_l1_size_bytes") > 0
        # Session 1 decoded what it fetched into the host cache.
        assert value(after1, "restore_host_cache_chunks_total", event="filled") == first["chunks"]["host_fills"] > 0
        assert first["chunks"]["host"] == 0

        run_cli("plan", "build", "fn", "--sessions", "1", "--store", store, check=True)

        # 2: the plan is replayed; its chunks are in the host cache now, as
        # session 1 decoded them: nothing is read from L1 or decoded again.
        second = restore_once()
        after2 = scrape(url)
        assert second["prefetch_pages"] > 0
        assert value(after2, "restore_prefetch_pages_total") == second["prefetch_pages"]
        assert value(after2, "restore_first_touches_total", source="prefetched") > 0
        assert value(after2, "restore_chunks_total", outcome="host") == second["chunks"]["host"] > 0
        assert second["chunks"]["l1"] == second["chunks"]["fetched"] == second["chunks"]["host_fills"] == 0
        assert value(after2, "restore_l1_lookups_total", result="hit") == 0
        assert value(after2, "restore_prefetch_useful_pages_total") == 0

        # 3: every second session with a plan is an audit: no prefetch, the plan scored.
        third = restore_once()
        audit = d.event("plan_audit")
        after3 = scrape(url)
        assert third["prefetch_pages"] == 0 and audit["useful"] > 0
        assert value(after3, "restore_plan_audits_total") == 1
        assert value(after3, "restore_prefetch_useful_pages_total") == audit["useful"]
        assert value(after3, "restore_prefetch_wasted_pages_total") == audit["wasted"]
        assert value(after3, "restore_sessions_total", outcome="ended") == 3
        for name in ("restore_faults_total", "restore_pages_installed_total", "restore_bytes_installed_total"):
            assert value(after3, name, **({"kind": "all"} if "faults" in name else {})) > value(after1, name, **(
                {"kind": "all"} if "faults" in name else {}))
        assert d.stop() == 0
    finally:
        d.kill()
    stopped = [json.loads(x) for x in d.lines if '"stopped"' in x]
    assert stopped and stopped[-1]["sessions"] == 3 and stopped[-1]["refused"] == 0
    ls = run_cli("session", "ls", "fn", "--store", store, check=True).stdout.split()
    assert len(ls) == 3


def _release_wait(guest: Guest) -> None:
    """Let a guest blocked at a wait() step go on. `restore serve` sends no
    go-ahead, so the guest's own end of its connection is shut for reading,
    through a copy of its socket fd (pidfd_getfd, root here): its recv()
    returns end-of-file, and the server's end stays open (it sees no EOF)."""
    fds = [int(fd) for fd in os.listdir(f"/proc/{guest.pid}/fd")
           if os.readlink(f"/proc/{guest.pid}/fd/{fd}").startswith("socket:")]
    assert len(fds) == 1, fds  # the guest's one socket: its connection
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(guest.pid)
    try:
        fd = libc.syscall(438, pidfd, fds[0], 0)  # SYS_pidfd_getfd
        assert fd >= 0, os.strerror(ctypes.get_errno())
    finally:
        os.close(pidfd)
    with socket.socket(fileno=fd) as s:
        s.shutdown(socket.SHUT_RD)


def test_sigterm_during_a_restore_lets_it_finish(tmp_path, made, run_cli):
    """The guest reads half its pages, then waits at a wait() step until the
    test lets it go: SIGTERM reaches the server while the guest is certainly
    mid-restore (no race with the guest finishing first), and the other half
    is served after SIGTERM."""
    img, store = made
    sock = tmp_path / "fn.sock"
    config = write_config(tmp_path / "serve.toml", snapshot="fn", socket=str(sock), store=store,
                          no_cache=True, fault_around=1, log_format="json", verbose=True, drain_timeout=60)
    d = Daemon(tmp_path, "--config", str(config))
    try:
        d.event("serving")
        # Every page once, in a scattered order, each its own fault (half
        # before SIGTERM, half after), then twice more over present pages.
        offsets = np.random.default_rng(5).permutation(SIZE // 4096).astype(np.uint64) * 4096
        half = len(offsets) // 2
        ops = np.concatenate([reads(offsets[:half]), wait(), reads(offsets[half:])] + [reads(offsets)] * 2)
        with Guest(str(sock), memory_size=SIZE) as g:
            g.start(ops)
            wait_for(lambda: len(g.done_so_far().ns) >= half, "the guest did not read its first half", 60)
            d.proc.send_signal(signal.SIGTERM)
            stopping = d.event("stopping")
            assert stopping["active"] == 1  # the guest, held at its wait() step
            assert len(g.done_so_far().ns) == half  # still there: nothing but the test lets it go
            _release_wait(g)
            res = g.wait(timeout=60)
        expected = expected_sums(img, offsets)
        assert (res.sums == np.concatenate([expected[:half], [0], expected[half:], expected, expected])).all()
        end = d.event("session_end")
        assert end["errors"] == 0 and end["log_key"]
        assert sum(end["first_touches"].values()) == len(offsets), end["first_touches"]
        assert d.proc.wait(60) == 0
    finally:
        d.kill()
    assert run_cli("session", "ls", "fn", "--store", store, check=True).stdout.split() == [
        Path(end["log_key"]).stem]


def test_flags_win_over_the_config_file(tmp_path, made):
    _, store = made
    config = write_config(tmp_path / "serve.toml", snapshot="fn", socket=str(tmp_path / "from-file.sock"),
                          store=store, no_cache=True, log_format="json")
    sock = tmp_path / "from-flag.sock"
    d = Daemon(tmp_path, "--config", str(config), "--socket", str(sock))
    try:
        assert d.event("serving")["socket"] == str(sock)
        assert sock.exists() and not (tmp_path / "from-file.sock").exists()
        assert d.stop() == 0
    finally:
        d.kill()


def test_l2_as_a_table_of_zones(tmp_path, made, run_cli):
    _, store = made
    (tmp_path / "serve.toml").write_text(
        f'snapshot = "fn"\nsocket = "{tmp_path}/fn.sock"\nstore = "{store}"\n'
        '[l2]\naz1 = ["127.0.0.1:1", "127.0.0.1:2"]\naz2 = "127.0.0.1:3"\nbad = [1]\n')
    r = run_cli("serve", "--config", str(tmp_path / "serve.toml"))
    assert r.returncode == 2
    assert f"{tmp_path}/serve.toml: l2.bad must be a list of HOST:PORT strings, got [1]" in r.stderr


@pytest.mark.parametrize(
    "text, message",
    [
        ('snapshot = "fn"\nsockett = "x"\n', "serve.toml: unknown setting 'sockett' (known: "),
        ('snapshot = "fn"\nfault_around = "many"\n', "serve.toml: fault_around: 'many' is not a valid integer"),
        ('snapshot = "fn"\nfault_around = 0\n', "serve.toml: fault_around: 0 is not in the range x>=1"),
        ('snapshot = "fn"\nno_cache = "yes"\n', "serve.toml: no_cache must be true or false, got 'yes'"),
        ('snapshot = "fn"\nallow_uid = 5\n', "serve.toml: allow_uid must be an array (it may be given several "
                                             "times), got 5"),
        ('snapshot = "fn"\nallow_uid = [-1]\n', "serve.toml: allow_uid: -1 is not in the range x>=0"),
        ('snapshot = "fn"\nsocket = ["a"]\n', "serve.toml: socket must be a path, got ['a']"),
        ('snapshot = "fn"\nsocket = 5\n', "serve.toml: socket must be a path, got 5"),
        ('snapshot = "fn"\nsocket = "a\\u0000b"\n', "serve.toml: socket contains a NUL character"),
        ('snapshot = 1.5\n', "serve.toml: snapshot must be a string, got 1.5"),
        ('snapshot = "fn"\nfetchers = 2.5\n', "serve.toml: fetchers must be an integer, got 2.5"),
        ('snapshot = "fn"\ncache_budget = "lots"\n', "serve.toml: cache_budget: 'lots' is not a size"),
        ('snapshot = "fn"\nl2 = [{a = 1}]\n', "serve.toml: l2 must be a string, got {'a': 1}"),
        ('snapshot = "fn"\nlog_format = "xml"\n', "serve.toml: log_format: 'xml' is not one of 'text', 'json'"),
        ('snapshot = "fn"\nfault_around = 2\nfault-around = 3\n', "serve.toml: 'fault-around' is given twice"),
        ('snapshot = "fn"\nconfig = "other.toml"\n', "serve.toml: unknown setting 'config'"),
        ('snapshot = "fn"\nworker_listen_fd = 3\n', "serve.toml: unknown setting 'worker_listen_fd'"),
        ('snapshot = "fn"\nlisten = "a.sock"\n', "serve.toml: listen must be an array of tables ([[listen]]), "
                                                  "got 'a.sock'"),
        ('[[listen]]\nowner = "1"\n', "serve.toml: listen[1]: path must be the socket's path, a non-empty "
                                       "string, got None"),
        ('[[listen]]\npath = "a"\nallow = [1]\n', "serve.toml: listen[1]: unknown key 'allow' (known: path, "
                                                   "owner, mode, allow_uids)"),
        ('[[listen]]\npath = "a"\n[[listen]]\npath = "b"\nmode = "0604"\n',
         "serve.toml: listen[2]: mode: mode 0604 gives access to others than the socket's owner and group"),
        ('[[listen]]\npath = "a"\nmode = 432\n', "serve.toml: listen[1]: mode must be a string of octal digits "
                                                  "such as \"0660\", got 432"),
        ('[[listen]]\npath = "a"\nowner = "x:1"\n', "serve.toml: listen[1]: owner: owner uid 'x' is not a number"),
        ('[[listen]]\npath = "a"\nowner = -3\n', "serve.toml: listen[1]: owner: owner uid '-3' is not a number"),
        ('[[listen]]\npath = "a"\nallow_uids = []\n', "serve.toml: listen[1]: allow_uids is empty: no VMM could "
                                                       "ever be served"),
        ('[[listen]]\npath = "a"\nallow_uids = [1, "2"]\n', "serve.toml: listen[1]: allow_uids must be an array "
                                                             "of uids, got [1, '2']"),
        ('[[listen]]\npath = "a"\nallow_uids = [4294967295]\n', "serve.toml: listen[1]: allow_uids: 4294967295 "
                                                                 "is not a uid in 0..4294967294"),
        ('[[listen]]\npath = "a\\u0000"\n', "serve.toml: listen contains a NUL character"),
        ('snapshot = "fn"\nsocket_mode = 384\n', "serve.toml: socket_mode must be a mode, got 384"),
        ('snapshot = "fn"\nsocket_mode = "0666"\n', "serve.toml: socket_mode: mode 0666 gives access to others"),
        ('snapshot = "fn\n', "serve.toml: not valid TOML: "),
        ('[serve\n', "serve.toml: not valid TOML: "),
        (b'snapshot = "\xff"\n', "serve.toml: not valid TOML: "),
    ],
)
def test_bad_config_files_are_refused(tmp_path, run_cli, text, message):
    path = tmp_path / "serve.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    r = run_cli("serve", "--config", str(path), "--socket", str(tmp_path / "s.sock"))
    assert r.returncode == 2, r.stderr
    assert "Invalid value for '--config'" in r.stderr and message in r.stderr, r.stderr
    assert not (tmp_path / "s.sock").exists()


def test_config_file_missing_or_a_directory(tmp_path, run_cli):
    r = run_cli("serve", "--config", str(tmp_path / "nope.toml"))
    assert r.returncode == 2 and f"{tmp_path}/nope.toml: no such file" in r.stderr
    r = run_cli("serve", "--config", str(tmp_path))
    assert r.returncode == 2 and f"{tmp_path}: is a directory" in r.stderr


@pytest.mark.parametrize(
    "addr, message",
    [
        ("nonsense", "metrics address 'nonsense' is not HOST:PORT"),
        ("127.0.0.1:99999", "metrics address '127.0.0.1:99999': port 99999 is not in 0..65535"),
        ("127.0.0.1:x", "metrics address '127.0.0.1:x' is not HOST:PORT"),
        ("192.0.2.1:9464", "metrics address 192.0.2.1:9464: cannot listen: "),
    ],
)
def test_bad_metrics_addresses(tmp_path, made, run_cli, addr, message):
    _, store = made
    sock = tmp_path / "fn.sock"
    r = run_cli("serve", "--snapshot", "fn", "--socket", str(sock), "--store", store, "--metrics", addr)
    assert r.returncode == 1 and f"error: {message}" in r.stderr, r.stderr
    assert not sock.exists()


def test_metrics_port_in_use(tmp_path, made, run_cli):
    _, store = made
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        port = busy.getsockname()[1]
        r = run_cli("serve", "--snapshot", "fn", "--socket", str(tmp_path / "fn.sock"), "--store", store,
                    "--metrics", f"127.0.0.1:{port}")
    finally:
        busy.close()
    assert r.returncode == 1 and re.search(rf"error: metrics address 127.0.0.1:{port}: cannot listen: .*in use",
                                           r.stderr), r.stderr


def test_try_through_a_server_that_is_not_there(tmp_path, made, run_cli):
    _, store = made
    not_a_socket = tmp_path / "file.sock"
    not_a_socket.write_text("")
    r = run_cli("try", "fn", "--store", store, "--socket", str(not_a_socket))
    assert r.returncode == 2 and f"Invalid value for '--socket': {not_a_socket} is not a socket" in r.stderr, r.stderr


def test_try_through_a_running_server(tmp_path, made, run_cli):
    _, store = made
    sock = tmp_path / "fn.sock"
    d = Daemon(tmp_path, "--snapshot", "fn", "--socket", str(sock), "--store", store, "--no-cache",
               "--log-format", "json", "-v")
    try:
        r = run_cli("try", "fn", "--store", store, "--socket", str(sock), "--pages", "300", check=True)
        assert "every page matches the snapshot" in r.stdout and f"served by:         {sock}" in r.stdout
        assert d.event("session_end")["faults"] > 0
        assert d.stop() == 0
    finally:
        d.kill()


def test_socket_owner_lets_a_jailed_uid_connect(tmp_path, made):
    _, store = made
    jail = Path(tempfile.mkdtemp(prefix="restore-jail-"))  # a directory uid 65534 can reach
    jail.chmod(0o755)
    sock = jail / "fn.sock"
    d = Daemon(tmp_path, "--snapshot", "fn", "--socket", str(sock), "--store", store, "--no-cache",
               "--socket-owner", "65534:65534", "--allow-uid", "65534", "--log-format", "json")
    try:
        d.event("serving")
        st = sock.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (65534, 65534, 0o600)
        # A VMM running as uid 65534 connects, then hangs up without a
        # handshake: it is refused for that (and killed), not for its uid.
        client = subprocess.run(
            ["python3", "-c", "import socket, sys, time; s = socket.socket(socket.AF_UNIX); "
             "s.connect(sys.argv[1]); s.close(); time.sleep(30)", str(sock)], user=65534, group=65534,
            capture_output=True, text=True, timeout=60)
        assert client.returncode == -signal.SIGKILL, client.stderr
        refused = d.event("refused")
        assert refused["reason"] == "peer closed the connection during the handshake", refused
        assert d.stop() == 0
    finally:
        d.kill()
        shutil.rmtree(jail, ignore_errors=True)


def test_bad_socket_owner(tmp_path, made, run_cli):
    _, store = made
    r = run_cli("serve", "--snapshot", "fn", "--socket", str(tmp_path / "fn.sock"), "--store", store,
                "--socket-owner", "nobody")
    assert r.returncode == 2 and "'nobody' is not UID or UID:GID (numbers)" in r.stderr, r.stderr
