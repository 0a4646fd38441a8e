"""bench/netdelay's delay line runs in a child process of its own: bytes
come back intact through it, it is a different process from the one it
serves, and leaving the ``with`` (or the parent dying) ends it. With root,
tiers() puts memcached and moto behind it and removes everything after."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import select
import signal
import socket
import socketserver
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bench import netdelay
from restore.tiers.durable import DurableStore

ROOT = Path(__file__).resolve().parent.parent
HANG = 60.0  # s: a guard against hanging forever, not a measure of speed
ONE_WAY_S = 0.25e-3


class _Echo(socketserver.BaseRequestHandler):
    """Sends back the server's tag, then every byte received, then EOF."""

    def handle(self) -> None:
        self.request.sendall(self.server.tag)
        while data := self.request.recv(1 << 16):
            self.request.sendall(data)
        self.request.shutdown(socket.SHUT_WR)


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True

    def __init__(self, tag: bytes):
        super().__init__(("127.0.0.1", 0), _Echo)
        self.tag = tag


@pytest.fixture
def echo():
    """start(tag) -> (host, port) of a TCP echo server on 127.0.0.1 that
    prefixes its replies with tag; all are stopped at teardown."""
    servers = []

    def start(tag: bytes) -> tuple[str, int]:
        srv = _EchoServer(tag)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv.server_address

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _roundtrip(addr: tuple[str, int], payload: bytes) -> bytes:
    """Send payload (from a second thread, so neither direction waits on
    the other), close the sending side, and return all bytes received."""
    with socket.create_connection(addr, timeout=HANG) as s:
        def send():
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        got = bytearray()
        while data := s.recv(1 << 20):
            got += data
        sender.join()
    return bytes(got)


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^PPid:\s+(\d+)$", f.read(), re.M).group(1))


def _wait_exit(pid: int) -> None:
    """Return once pid has exited (a pidfd becomes readable then)."""
    fd = os.pidfd_open(pid)
    try:
        assert select.select([fd], [], [], HANG)[0], f"process {pid} still runs"
    finally:
        os.close(fd)


def _assert_reaped(pid: int) -> None:
    """pid was a child of this process, has exited and been waited for."""
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    assert not os.path.exists(f"/proc/{pid}")


@pytest.mark.parametrize("size", [1, 1000, 65536 + 7, 1 << 20, (3 << 20) + 5])
def test_bytes_come_back_intact(echo, size):
    payload = os.urandom(size)
    with netdelay.relay_process([(echo(b"A"), ONE_WAY_S)]) as r:
        assert _roundtrip(r.addresses[0], payload) == b"A" + payload


def test_addresses_follow_the_order_of_the_targets(echo):
    a, b = echo(b"A"), echo(b"B")
    with netdelay.relay_process([(a, ONE_WAY_S), (b, 0.0)]) as r:
        assert len(r.addresses) == 2
        assert all(host == "127.0.0.1" for host, _ in r.addresses)
        assert _roundtrip(r.addresses[0], b"x") == b"Ax"
        assert _roundtrip(r.addresses[1], b"y") == b"By"


def test_concurrent_connections_keep_their_own_bytes(echo):
    n = 8
    targets = [echo(b"A"), echo(b"B")]
    payloads = [os.urandom(256 * 1024 + i) for i in range(n)]
    results: list = [None] * n
    start = threading.Barrier(n)
    with netdelay.relay_process([(t, ONE_WAY_S) for t in targets]) as r:
        def run(i):
            start.wait()
            results[i] = _roundtrip(r.addresses[i % 2], payloads[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i, (p, got) in enumerate(zip(payloads, results)):
        assert got == (b"A", b"B")[i % 2] + p, f"connection {i}"


def test_the_relay_is_a_child_process(echo):
    with netdelay.relay_process([(echo(b"A"), ONE_WAY_S)]) as r:
        assert r.pid != os.getpid()
        assert _ppid(r.pid) == os.getpid()
        with open(f"/proc/{r.pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        assert argv[1:4] == [b"-m", b"bench.netdelay", b"relay"]


def test_leaving_the_with_kills_and_reaps_it(echo):
    with netdelay.relay_process([(echo(b"A"), ONE_WAY_S)]) as r:
        assert _roundtrip(r.addresses[0], b"ping") == b"Aping"
    _assert_reaped(r.pid)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(r.addresses[0], timeout=HANG)


def test_an_exception_in_the_with_still_kills_it(echo):
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with netdelay.relay_process([(echo(b"A"), ONE_WAY_S)]) as r:
            raise Boom
    _assert_reaped(r.pid)


def test_a_relay_that_exits_while_in_use_is_reported(echo):
    with pytest.raises(netdelay.NetDelayError) as exc:
        with netdelay.relay_process([(echo(b"A"), ONE_WAY_S)]) as r:
            os.kill(r.pid, signal.SIGTERM)
            _wait_exit(r.pid)
    assert str(exc.value) == f"the delay line (pid {r.pid}) exited -15 while in use: no output"
    _assert_reaped(r.pid)


def test_the_relay_ends_when_its_parent_dies(echo):
    """The parent killed -9 runs no cleanup; the relay sees its stdin close."""
    target = echo(b"A")
    parent = subprocess.Popen(
        [sys.executable, "-c",
         "import sys\n"
         "from bench import netdelay\n"
         f"with netdelay.relay_process([({target!r}, {ONE_WAY_S!r})]) as r:\n"
         "    print(r.pid, flush=True)\n"
         "    sys.stdin.read()\n"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        assert _ppid(pid) == parent.pid
        fd = os.pidfd_open(pid)  # before the parent dies: pid is not reused while this is open
    finally:
        parent.kill()
        parent.wait()
        parent.stdin.close()
        parent.stdout.close()
    try:
        assert select.select([fd], [], [], HANG)[0], f"the relay {pid} outlived its parent"
    finally:
        os.close(fd)


def test_no_targets():
    with pytest.raises(ValueError, match=re.escape("relay_process: no targets to forward to")):
        with netdelay.relay_process([]):
            pass


def test_a_malformed_forward_is_refused():
    proc = subprocess.run([sys.executable, "-m", "bench.netdelay", "relay", "--forward", "127.0.0.1:11211"],
                          cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert "argument --forward: '127.0.0.1:11211' is not HOST:PORT:ONE_WAY_S (seconds)" in proc.stderr


def _our_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines()
            if re.fullmatch(rf"{netdelay.PREFIX}-\w+-{os.getpid()}", line.split()[0])]


@pytest.mark.parametrize("server", ["moto", "s3rver"])
def test_tiers_behind_the_relay_process(server):
    from pymemcache.client.base import Client

    with contextlib.ExitStack() as stack:
        try:
            t = stack.enter_context(netdelay.tiers(l2_rtt_ms=0.5, s3_rtt_ms=2.0, memcached_mb=16, s3_server=server))
        except netdelay.NoNamespaces as exc:  # not root: the feature is missing here
            pytest.skip(str(exc))
        assert t.s3_server == server
        assert len(_our_namespaces()) == 2
        client = Client(t.l2_address, connect_timeout=HANG, timeout=HANG)
        stack.callback(client.close)
        value = os.urandom(100_000)
        assert client.set("netdelay-key", value, noreply=False)
        assert client.get("netdelay-key") == value
        import boto3

        s3 = boto3.client("s3", endpoint_url=t.s3_endpoint, region_name="us-east-1", aws_access_key_id=t.s3_key[0],
                          aws_secret_access_key=t.s3_key[1])
        s3.put_object(Bucket=t.bucket, Key="k", Body=b"stored")
        assert s3.get_object(Bucket=t.bucket, Key="k")["Body"].read() == b"stored"
        # The store as the benchmark opens it; s3rver keeps the connection.
        store = DurableStore(f"s3://{t.bucket}/p", t.s3_options())
        store.put("o", b"through obstore")
        assert store.get("o") == b"through obstore" and store.get("absent") is None
        conn = http.client.HTTPConnection(*t.s3_endpoint[len("http://"):].split(":"), timeout=HANG)
        stack.callback(conn.close)
        conn.request("GET", f"/{t.bucket}/k")
        reply = conn.getresponse()
        reply.read()
        assert reply.getheader("Connection") == ("close" if server == "moto" else "keep-alive")
        if t.method == "relay":
            assert t.relay_pid is not None and t.relay_pid != os.getpid()
            assert _ppid(t.relay_pid) == os.getpid()
            assert t.why.endswith(f"in its own process (pid {t.relay_pid})")
            assert t.l2_address[0] == "127.0.0.1"
        else:
            assert t.method == "netem" and t.relay_pid is None
    if t.relay_pid is not None:
        _assert_reaped(t.relay_pid)
    assert _our_namespaces() == []
