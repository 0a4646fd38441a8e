"""One `restore serve` for many jails: several listening sockets, each with
its own owner, mode and allowed uids, from flags or a config file, under
--supervise too. Guests run as the jails' uids (restore.guest.Guest with
user=), so the sockets' owners and modes are what lets them connect, and
each connection is checked against the allow-list of the socket it came
on."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from restore.guest import Guest, GuestError, reads, wait
from restore.testing import expected_sums
from daemon import Daemon, children, wait_for

SIZE = 8 << 20
P = 4096
A_UID, B_UID, SHARED_GID = 60001, 60002, 60100

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="giving sockets to other uids and running guests as them "
                                                          "needs root")


@pytest.fixture
def made(cli_snapshot):
    return cli_snapshot(SIZE, seed=13)


@pytest.fixture
def jails():
    """Two jail directories every uid can reach, as the jailer's roots are."""
    root = Path(tempfile.mkdtemp(prefix="restore-jails-"))
    root.chmod(0o755)
    for name in ("a", "b"):
        (root / name).mkdir(mode=0o755)
    yield root / "a", root / "b"
    shutil.rmtree(root, ignore_errors=True)


def _served(sock: Path, img: Path, user: tuple[int, int]) -> None:
    offsets = np.arange(0, SIZE, 9 * P, dtype=np.uint64)
    with Guest(str(sock), memory_size=SIZE, user=user) as g:
        res = g.run(reads(offsets), timeout=60)
    assert (res.sums == expected_sums(img, offsets)).all()


def _owner_mode(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_uid, st.st_gid, st.st_mode & 0o777


def test_two_jails_one_server(tmp_path, made, jails):
    """Socket A belongs to uid A (0600) and allows A; socket B belongs to
    uid B with a group A shares (0660) and allows only B. A guest of each
    jail is served on its socket; A's uid, which can connect to B through
    the group, is refused there for its uid and not killed."""
    img, store = made
    a, b = jails[0] / "fn.sock", jails[1] / "fn.sock"
    d = Daemon(tmp_path, "--snapshot", "fn", "--store", store, "--no-cache", "--log-format", "json",
               "--listen", f"{a},owner={A_UID}:{A_UID},allow={A_UID}",
               "--listen", f"{b},owner={B_UID}:{SHARED_GID},mode=0660,allow={B_UID}")
    try:
        first, second = d.event("serving"), d.event("serving")
        assert (first["socket"], second["socket"]) == (str(a), str(b))
        assert (first["owner"], first["mode"], first["allowed_uids"]) == ([A_UID, A_UID], "0600", [A_UID])
        assert (second["owner"], second["mode"], second["allowed_uids"]) == ([B_UID, SHARED_GID], "0660", [B_UID])
        assert second["msg"] == f"serving fn/1 on {b} (owner {B_UID}:{SHARED_GID}, mode 0660, allows {B_UID})"
        assert _owner_mode(a) == (A_UID, A_UID, 0o600)
        assert _owner_mode(b) == (B_UID, SHARED_GID, 0o660)

        _served(a, img, (A_UID, A_UID))
        _served(b, img, (B_UID, B_UID))

        # Uid A in the shared group may connect to B's socket, but B does not allow it.
        with Guest(str(b), memory_size=SIZE, user=(A_UID, SHARED_GID)) as g:
            g.start(reads([0]))
            refused = d.event("refused")
            assert refused["reason"] == f"peer uid {A_UID} is not allowed on {b} (allowed: {B_UID})", refused
            assert refused["pid"] == g.pid
            # It sent a userfaultfd: a VMM that would hang, so it is killed.
            with pytest.raises(GuestError) as died:
                g.wait(30)
            assert died.value.signal == signal.SIGKILL
        # ... while on its own socket the same uid and group is served.
        _served(a, img, (A_UID, SHARED_GID))
        assert d.stop() == 0
    finally:
        d.kill()
    records = d.records + [r for r in map(_json, d.lines[len(d.records):]) if r]
    assert [r["socket"] for r in records if r.get("event") == "serving"] == [str(a), str(b)]  # once each
    stopped = [r for r in records if r.get("event") == "stopped"]
    assert stopped and (stopped[-1]["sessions"], stopped[-1]["refused"]) == (3, 1)
    assert not a.exists() and not b.exists()


def _json(line: str):
    import json

    try:
        return json.loads(line)
    except ValueError:
        return None


def test_sockets_from_a_config_file(tmp_path, made, jails):
    """[[listen]] tables, next to the plain `socket` key: three sockets, each
    with its owner, mode and allow-list as the file says."""
    img, store = made
    a, b, own = jails[0] / "fn.sock", jails[1] / "fn.sock", tmp_path / "own.sock"
    config = tmp_path / "serve.toml"
    config.write_text(
        f'snapshot = "fn"\nstore = "{store}"\nno_cache = true\nlog_format = "json"\nsocket = "{own}"\n'
        f'[[listen]]\npath = "{a}"\nowner = "{A_UID}:{A_UID}"\nallow_uids = [{A_UID}]\n'
        f'[[listen]]\npath = "{b}"\nowner = "{B_UID}"\nmode = "0660"\nallow_uids = [{B_UID}, {A_UID}]\n')
    d = Daemon(tmp_path, "--config", str(config))
    try:
        serving = [d.event("serving") for _ in range(3)]
        assert [s["socket"] for s in serving] == [str(own), str(a), str(b)]
        assert serving[0]["allowed_uids"] == [os.getuid()] and serving[0]["mode"] == "0600"
        assert serving[2]["owner"] == [B_UID, -1] and serving[2]["allowed_uids"] == [A_UID, B_UID]
        assert _owner_mode(a) == (A_UID, A_UID, 0o600)
        assert _owner_mode(b) == (B_UID, 0, 0o660)  # gid left out: unchanged (the server's)
        assert _owner_mode(own) == (os.getuid(), os.getgid(), 0o600)
        _served(a, img, (A_UID, A_UID))
        _served(b, img, (B_UID, B_UID))
        _served(own, img, (os.getuid(), os.getgid()))
        # Uid B is not allowed on A: it cannot even connect (A's socket is 0600, A's).
        with pytest.raises(GuestError, match=f"connect {a}: Permission denied") as refused:
            with Guest(str(a), memory_size=SIZE, user=(B_UID, B_UID)) as g:
                g.run(reads([0]), timeout=30)
        assert refused.value.errno == errno.EACCES
        assert d.stop() == 0
    finally:
        d.kill()
    assert not any(r.get("event") == "refused" for r in d.records)


def test_supervise_hands_every_socket_to_each_worker(tmp_path, made, jails):
    """Under --supervise both sockets are served; the worker killed, the
    VMMs it served on each socket are killed, and its successor serves both
    sockets again, with their allow-lists."""
    img, store = made
    a, b = jails[0] / "fn.sock", jails[1] / "fn.sock"
    env = {**os.environ, "RESTORE_CACHE_DIR": str(tmp_path / "cache")}
    sup = subprocess.Popen([sys.executable, "-m", "restore", "serve", "--supervise", "--snapshot", "fn",
                            "--store", store, "--listen", f"{a},owner={A_UID}:{A_UID},allow={A_UID}",
                            "--listen", f"{b},owner={B_UID}:{B_UID},mode=0660,allow={B_UID}"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for(lambda: a.exists() and b.exists() and children(sup.pid), "the supervisor did not start")
        worker = children(sup.pid)[0]
        assert _owner_mode(a) == (A_UID, A_UID, 0o600) and _owner_mode(b) == (B_UID, B_UID, 0o660)
        offsets = np.arange(0, SIZE, 16 * P, dtype=np.uint64)
        ga = Guest(str(a), memory_size=SIZE, user=(A_UID, A_UID))
        gb = Guest(str(b), memory_size=SIZE, user=(B_UID, B_UID))
        with ga, gb:
            for g in (ga, gb):
                g.start(np.concatenate([reads(offsets[:4]), wait(), reads(offsets)]))  # served, then waits
            wait_for(lambda: ga.done_so_far().sums.size >= 4 and gb.done_so_far().sums.size >= 4,
                      "the guests were not served")
            os.kill(worker, signal.SIGKILL)
            for g in (ga, gb):
                with pytest.raises(GuestError) as died:
                    g.wait(30)
                assert died.value.signal == signal.SIGKILL  # killed by the supervisor, not left hanging
        wait_for(lambda: children(sup.pid) and children(sup.pid)[0] != worker, "no new worker")
        assert _owner_mode(a) == (A_UID, A_UID, 0o600) and _owner_mode(b) == (B_UID, B_UID, 0o660)
        _served(a, img, (A_UID, A_UID))
        _served(b, img, (B_UID, B_UID))
        # The new worker still checks each socket's own allow-list.
        with Guest(str(b), memory_size=SIZE) as g:  # root may connect anywhere; B allows only B_UID
            g.start(reads([0]))
            with pytest.raises(GuestError) as died:  # refused, and killed as a VMM nobody serves
                g.wait(30)
            assert died.value.signal == signal.SIGKILL
    finally:
        sup.send_signal(signal.SIGTERM)
        out, err = sup.communicate(timeout=60)
    assert sup.returncode == 0, err
    assert f"worker pid {worker} killed by signal 9; killed the VMMs it was serving ({ga.pid}, {gb.pid})" in err \
        or f"worker pid {worker} killed by signal 9; killed the VMMs it was serving ({gb.pid}, {ga.pid})" in err, err
    assert err.count(f"serving on {a}, {b}") == 2, err  # the supervisor's line, once per worker
    assert f"peer uid 0 is not allowed on {b} (allowed: {B_UID})" in err, err
    assert err.count(f"serving fn/1 on {a} (owner {A_UID}:{A_UID}, mode 0600, allows {A_UID})") == 2, err
    assert not a.exists() and not b.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--listen", "{d}/x.sock,mode=0666"], "Invalid value for '--listen': mode 0666 gives access to others "
                                               "than the socket's owner and group (at most 0770)"),
        (["--listen", "{d}/x.sock,mode=rw"], "Invalid value for '--listen': mode 'rw' is not octal digits"),
        (["--listen", "{d}/x.sock,owner=nobody"], "Invalid value for '--listen': owner uid 'nobody' is not a "
                                                  "number in 0..4294967294"),
        (["--listen", "{d}/x.sock,owner=5:"], "Invalid value for '--listen': owner '5:' is not UID or UID:GID"),
        (["--listen", "{d}/x.sock,allow="], "Invalid value for '--listen': allow= is empty in"),
        (["--listen", "{d}/x.sock,allow=5+x"], "Invalid value for '--listen': allowed uid 'x' is not a number"),
        (["--listen", "{d}/x.sock,allow=4294967295"], "allowed uid '4294967295' is not a number in 0..4294967294"),
        (["--listen", "{d}/x.sock,colour=red"], "Invalid value for '--listen': 'colour=red' in '{d}/x.sock,colour=red'"
                                                " is not owner=, mode= or allow="),
        (["--listen", "{d}/x.sock,mode=0600,mode=0660"], "Invalid value for '--listen': mode= is given twice"),
        (["--listen", ",mode=0600"], "Invalid value for '--listen': ',mode=0600' does not start with the socket's path"),
        (["--socket", "{d}/x.sock", "--listen", "{d}/x.sock,allow=5"],
         "Invalid value for '--listen': socket path {d}/x.sock is given twice"),
        (["--listen", "{d}/y.sock", "--listen", "{d}/../{n}/y.sock"],
         "Invalid value for '--listen': socket path {d}/../{n}/y.sock is given twice"),
        (["--socket", "{d}/x.sock", "--socket-mode", "0606"], "Invalid value for '--socket-mode': mode 0606 gives "
                                                              "access to others"),
        (["--socket-owner", "5", "--listen", "{d}/x.sock"], "--socket-owner is a setting of --socket, and no "
                                                            "--socket is given"),
        (["--allow-uid", "5", "--listen", "{d}/x.sock"], "--allow-uid is a setting of --socket"),
        ([], "give a socket to listen on: --socket PATH and/or --listen PATH[,...]"),
    ],
)
def test_bad_socket_options(tmp_path, made, run_cli, args, message):
    _, store = made
    d, n = str(tmp_path), tmp_path.name
    r = run_cli("serve", "--snapshot", "fn", "--store", store, *[a.format(d=d, n=n) for a in args])
    assert r.returncode == 2, r.stderr
    assert message.format(d=d, n=n) in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()[-1]) and "Traceback" not in r.stderr
    assert not list(tmp_path.glob("*.sock"))


def test_a_bad_second_socket_leaves_no_first_socket(tmp_path, made, run_cli):
    """Sockets are bound in order; one that cannot be bound removes those
    bound before it, in the server and in the supervisor."""
    _, store = made
    (tmp_path / "plain").write_text("x")
    for extra in ([], ["--supervise"]):
        r = run_cli("serve", "--snapshot", "fn", "--store", store, *extra, "--listen", f"{tmp_path}/first.sock",
                    "--listen", f"{tmp_path}/plain")
        assert r.returncode == 1 and f"error: socket path {tmp_path}/plain exists and is not a socket" in r.stderr
        assert not (tmp_path / "first.sock").exists()
