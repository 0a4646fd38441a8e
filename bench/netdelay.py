"""The network tiers on their own "hosts", behind a round-trip delay.

    with netdelay.tiers(l2_rtt_ms=0.5, s3_rtt_ms=20) as t:
        L2Cluster([("az1", [t.l2_address])])
        DurableStore(f"s3://{t.bucket}/prefix", t.s3_options())
        t.s3_server  # "s3rver" or "moto"
        t.method     # "netem" or "relay": how the delay is made
        t.relay_pid  # the delay line's process (relay), else None

Each service gets a network namespace (``rsbench-<role>-<pid>``) joined to
the root namespace by a veth pair in a private /30 (10.213.N.0/30: .1 in
the root namespace, .2 in the service's). memcached and an S3 server run
inside (``ip netns exec``). The S3 server (``s3_server``) is s3rver (npm,
installed by ``make install`` next to Azurite), which keeps connections
alive, or moto's server, which answers every request with ``Connection:
close`` (so each request costs a new connection, one more round trip) and
spends about 3 ms of CPU per 512 KiB GET; "auto" takes s3rver when it is
installed. ``t.s3_options()`` are the S3Options that reach it. The delay
is added by netem on both veth ends (half the RTT each) when the kernel
has sch_netem; else by a userspace delay line (``Relay``) in a child
process of its own in the root namespace, so that it never waits for the
GIL of the process whose fetches it delays. It listens on 127.0.0.1 and holds every chunk of bytes
half the RTT in each direction, and a new connection's first bytes another
RTT (the TCP handshake a real link would cost). Needs root (``ip netns
add``); everything made is removed on exit, whatever happens inside the
``with``.

The delay line alone, for any targets (no namespaces, no root):

    with netdelay.relay_process([(("127.0.0.1", 11211), 0.25e-3)]) as r:
        r.addresses[0]  # ("127.0.0.1", port): 0.25 ms each way to 11211
        r.pid           # the child process serving it

which runs ``python -m bench.netdelay relay --forward HOST:PORT:ONE_WAY_S
...``: it prints its listening addresses (``127.0.0.1:PORT``, one a line,
in the order given), then serves until its stdin reads end-of-file (the
parent closed it or died) or it is signalled.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import select
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Optional, Sequence

PREFIX = "rsbench"  # namespace names: rsbench-<role>-<pid>
SUBNET = "10.213"  # 10.213.N.0/30 per host; only namespaces made here are contacted
L2_PORT, S3_PORT = 11211, 5000
ROOT = Path(__file__).resolve().parent.parent  # where `python -m bench.netdelay` finds the package
S3RVER = ROOT / "build" / "node" / "node_modules" / ".bin" / "s3rver"  # make install
S3_SERVERS = ("auto", "s3rver", "moto")


class NetDelayError(RuntimeError):
    pass


class NoNamespaces(NetDelayError):
    """This process may not create network namespaces (not root)."""


@dataclass(frozen=True)
class Tiers:
    l2_address: tuple[str, int]  # memcached, as clients should reach it
    s3_endpoint: str  # http://host:port of the S3 server
    bucket: str  # created empty
    method: str  # "netem" or "relay"
    why: str  # why that method
    l2_rtt_ms: float
    s3_rtt_ms: float
    relay_pid: Optional[int] = None  # the delay line's process (method "relay"), a child of this one
    s3_server: str = "moto"  # which S3 server: "s3rver" or "moto"
    s3_key: tuple[str, str] = ("test", "test")  # the credentials it accepts

    def s3_options(self):
        from restore.tiers.durable import S3Options

        return S3Options(endpoint=self.s3_endpoint, region="us-east-1", access_key_id=self.s3_key[0],
                         secret_access_key=self.s3_key[1])


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NetDelayError(f"ip {' '.join(args)}: {proc.stderr.strip() or f'exit {proc.returncode}'}")
    return proc


def _kill_namespace(ns: str) -> None:
    """Kill every process in ns (all started here), then delete it."""
    for pid in _ip("netns", "pids", ns, check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + 5
    while _ip("netns", "pids", ns, check=False).stdout.strip() and time.monotonic() < deadline:
        time.sleep(0.02)
    _ip("netns", "del", ns, check=False)


def sweep_stale() -> None:
    """Remove namespaces left by earlier runs whose process is gone (killed -9)."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        m = re.fullmatch(rf"({PREFIX}-\w+-(\d+))(\s.*)?", line.strip())
        if m and int(m.group(2)) != os.getpid() and not os.path.exists(f"/proc/{m.group(2)}"):
            _kill_namespace(m.group(1))


def _free_subnets(k: int) -> list[int]:
    used = set(re.findall(rf"inet {re.escape(SUBNET)}\.(\d+)\.", _ip("-4", "-o", "addr", "show").stdout))
    start = os.getpid() % 250
    free = [n % 250 + 1 for n in range(start, start + 250) if str(n % 250 + 1) not in used]
    if len(free) < k:
        raise NetDelayError(f"no free {SUBNET}.N.0/30 subnets")
    return free[:k]


def _wait_port(addr: tuple[str, int], proc: subprocess.Popen, log: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise NetDelayError(f"{proc.args[4]} exited {proc.returncode}: {_tail(log)}")
        try:
            socket.create_connection(addr, timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise NetDelayError(f"{proc.args[4]} does not answer on {addr} after {timeout} s: {_tail(log)}")
            time.sleep(0.05)


def _tail(path: str) -> str:
    with contextlib.suppress(OSError):
        with open(path, errors="replace") as f:
            return " | ".join(f.read().strip().splitlines()[-5:]) or "no output"
    return "no output"


class _Host:
    """A namespace joined to the root namespace by a veth pair."""

    def __init__(self, stack: contextlib.ExitStack, role: str, n: int):
        pid = os.getpid()
        self.ns = f"{PREFIX}-{role}-{pid}"
        self.veth = f"rb{role}{pid}h"  # root end; "...n" is the namespace end
        self.addr = f"{SUBNET}.{n}.2"
        self._stack = stack
        try:
            _ip("netns", "add", self.ns)
        except NetDelayError as exc:
            raise NoNamespaces(f"cannot create a network namespace (root or CAP_SYS_ADMIN needed): {exc}") from None
        stack.callback(_kill_namespace, self.ns)
        peer = self.veth[:-1] + "n"
        _ip("link", "add", self.veth, "type", "veth", "peer", "name", peer)
        stack.callback(_ip, "link", "del", self.veth, check=False)  # gone already if the namespace went
        _ip("link", "set", peer, "netns", self.ns)
        _ip("addr", "add", f"{SUBNET}.{n}.1/30", "dev", self.veth)
        _ip("link", "set", self.veth, "up")
        _ip("-n", self.ns, "addr", "add", f"{self.addr}/30", "dev", peer)
        _ip("-n", self.ns, "link", "set", peer, "up")
        _ip("-n", self.ns, "link", "set", "lo", "up")
        self.peer = peer

    def netem(self, rtt_ms: float) -> None:
        """Delay both directions by half the RTT each; NetDelayError if tc cannot."""
        delay = f"{rtt_ms * 500:.0f}us"
        for prefix, dev in (([], self.veth), (["ip", "netns", "exec", self.ns], self.peer)):
            proc = subprocess.run([*prefix, "tc", "qdisc", "add", "dev", dev, "root", "netem", "delay", delay],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise NetDelayError(proc.stderr.strip() or f"tc exit {proc.returncode}")

    def spawn(self, argv: list[str], port: int, logdir: str) -> None:
        """Run argv inside the namespace until the stack unwinds; wait for port."""
        log = os.path.join(logdir, f"{self.ns}.log")
        with open(log, "wb") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *argv], stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=out, start_new_session=True)
        self._stack.callback(_reap, proc)
        _wait_port((self.addr, port), proc, log)


def _reap(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


class _Half:
    """One direction of a relayed connection: bytes read from src wait in
    the queue until due, then go to dst. None in the queue is the EOF."""

    LIMIT = 8 << 20  # bytes queued before src is no longer read

    def __init__(self, src: socket.socket, dst: socket.socket, delay: float, not_before: float):
        self.src, self.dst, self.delay, self.not_before = src, dst, delay, not_before
        self.queue: deque = deque()  # (due, bytes or memoryview or None)
        self.queued = 0
        self.eof_read = self.eof_sent = self.blocked = False

    def read(self, now: float) -> None:
        data = self.src.recv(1 << 20)
        self.queue.append((max(now, self.not_before) + self.delay, data or None))
        self.queued += len(data)
        self.eof_read = not data

    def due(self) -> Optional[float]:
        return self.queue[0][0] if self.queue and not self.blocked else None

    def flush(self, now: float) -> None:
        while self.queue and not self.blocked and self.queue[0][0] <= now:
            due, data = self.queue[0]
            if data is None:
                self.dst.shutdown(socket.SHUT_WR)
                self.eof_sent = True
                self.queue.popleft()
                continue
            try:
                n = self.dst.send(data)
            except BlockingIOError:
                n = 0
            self.queued -= n
            if n < len(data):
                self.queue[0] = (due, memoryview(data)[n:])
                self.blocked = True  # until dst is writable
            else:
                self.queue.popleft()


class _Conn:
    def __init__(self, client: socket.socket, server: socket.socket, delay: float, now: float):
        self.socks = (client, server)
        # The client's first bytes also wait for the handshake a real link costs (one RTT).
        self.up = _Half(client, server, delay, now + 2 * delay)
        self.down = _Half(server, client, delay, 0.0)
        self.events = {client: 0, server: 0}

    def halves(self, sock: socket.socket) -> tuple[_Half, _Half]:
        """(the half sock feeds, the half that writes to sock)"""
        return (self.up, self.down) if sock is self.socks[0] else (self.down, self.up)

    def wanted(self, sock: socket.socket) -> int:
        out, into = self.halves(sock)
        read = not out.eof_read and out.queued < _Half.LIMIT
        return (selectors.EVENT_READ if read else 0) | (selectors.EVENT_WRITE if into.blocked else 0)

    def done(self) -> bool:
        return self.up.eof_sent and self.down.eof_sent


class Relay:
    """A userspace TCP delay line: forward(target, one_way_s) gives a
    127.0.0.1 address whose connections reach target with that delay each
    way; run(stop_fd) serves them all on the calling thread until stop_fd
    reads end-of-file. Connections are independent (timestamps, not
    sleeps). Run it in a process of its own (relay_process), never beside
    the code whose traffic it delays: it would share that code's GIL."""

    def __init__(self):
        # select() takes microsecond timeouts; epoll and poll round up to milliseconds,
        # too coarse for a 0.25 ms one-way delay. The relay holds few sockets.
        self._sel = selectors.SelectSelector()
        self._conns: set[_Conn] = set()

    def forward(self, target: tuple[str, int], one_way_s: float) -> tuple[str, int]:
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.bind(("127.0.0.1", 0))
        ls.listen(128)
        ls.setblocking(False)
        self._sel.register(ls, selectors.EVENT_READ, (target, one_way_s))
        return ls.getsockname()

    def run(self, stop_fd: int) -> None:
        """Serve until stop_fd reads end-of-file (bytes read from it are
        ignored), then close every socket."""
        self._sel.register(stop_fd, selectors.EVENT_READ, None)
        try:
            self._loop(stop_fd)
        finally:
            self._sel.unregister(stop_fd)
            self.close()

    def close(self) -> None:
        for key in list(self._sel.get_map().values()):
            key.fileobj.close()
        self._sel.close()

    def _loop(self, stop_fd: int) -> None:
        while True:
            now = time.monotonic()
            dues = [d for c in self._conns for h in (c.up, c.down) if (d := h.due()) is not None]
            timeout = max(0.0, min(dues) - now) if dues else None
            for key, events in self._sel.select(timeout):
                now = time.monotonic()
                if key.data is None:  # stop_fd
                    if not os.read(stop_fd, 4096):
                        return
                    continue
                if isinstance(key.data, tuple):
                    self._accept(key.fileobj, *key.data, now)
                    continue
                conn: _Conn = key.data
                if conn not in self._conns:  # dropped earlier in this batch
                    continue
                out, into = conn.halves(key.fileobj)
                try:
                    if events & selectors.EVENT_READ:
                        out.read(now)
                except OSError:
                    self._drop(conn)
                    continue
                if events & selectors.EVENT_WRITE:
                    into.blocked = False
            now = time.monotonic()
            for conn in list(self._conns):
                try:
                    conn.up.flush(now)
                    conn.down.flush(now)
                except OSError:
                    self._drop(conn)
                    continue
                if conn.done():
                    self._drop(conn)
                else:
                    self._update(conn)

    def _accept(self, ls: socket.socket, target, delay: float, now: float) -> None:
        try:
            client, _ = ls.accept()
        except BlockingIOError:
            return
        try:
            server = socket.create_connection(target, timeout=2)  # a veth away: no wait worth a thread
        except OSError:
            client.close()
            return
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
        conn = _Conn(client, server, delay, now)
        self._conns.add(conn)
        self._update(conn)

    def _update(self, conn: _Conn) -> None:
        for s in conn.socks:
            want = conn.wanted(s)
            if want != conn.events[s]:
                if conn.events[s] == 0:
                    self._sel.register(s, want, conn)
                elif want == 0:
                    self._sel.unregister(s)
                else:
                    self._sel.modify(s, want, conn)
                conn.events[s] = want

    def _drop(self, conn: _Conn) -> None:
        self._conns.discard(conn)
        for s in conn.socks:
            if conn.events[s]:
                self._sel.unregister(s)
                conn.events[s] = 0
            s.close()


def _fine_timer_slack() -> None:
    """Let this thread's timed waits end within ~1 us, not the default 50 us."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(29, 1000, 0, 0, 0)  # PR_SET_TIMERSLACK, ns


@dataclass(frozen=True)
class RelayProcess:
    pid: int  # the child process running the delay line
    addresses: list[tuple[str, int]]  # 127.0.0.1 listening addresses, in the order of the forwards


@contextlib.contextmanager
def relay_process(forwards: Sequence[tuple[tuple[str, int], float]],
                  timeout: float = 30.0) -> Iterator[RelayProcess]:
    """A Relay in a child process of its own, forwarding to each (target,
    one_way_s) in forwards; killed and reaped on exit, whatever happens
    inside the ``with``. NetDelayError if it does not print its addresses
    within timeout seconds, or if it exited by itself before the end of the
    ``with`` (connections made after that were refused)."""
    if not forwards:
        raise ValueError("relay_process: no targets to forward to")
    argv = [sys.executable, "-m", "bench.netdelay", "relay"]
    for (host, port), one_way_s in forwards:
        argv += ["--forward", f"{host}:{port}:{one_way_s!r}"]
    with tempfile.TemporaryFile() as err:
        # A session of its own: a Ctrl-C meant for this process is not the relay's;
        # this process ends it (or, if this one dies first, its stdin reads end-of-file).
        proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                start_new_session=True)
        try:
            lines = _read_lines(proc, len(forwards), err, timeout)
            addresses = [(host, int(port)) for host, port in (line.rsplit(":", 1) for line in lines)]
            yield RelayProcess(proc.pid, addresses)
            if proc.poll() is not None:
                raise NetDelayError(f"the delay line (pid {proc.pid}) exited {proc.returncode} while in use: "
                                    f"{_file_tail(err)}")
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdin.close()
            proc.stdout.close()


def _read_lines(proc: subprocess.Popen, n: int, err: IO[bytes], timeout: float) -> list[str]:
    """The first n lines proc prints, waiting at most timeout seconds."""
    fd, buf = proc.stdout.fileno(), b""
    deadline = time.monotonic() + timeout
    while buf.count(b"\n") < n:
        left = deadline - time.monotonic()
        if left <= 0:
            got = buf.count(b"\n")
            raise NetDelayError(f"the delay line (pid {proc.pid}) printed {got} of {n} addresses in {timeout} s: "
                                f"{_file_tail(err)}")
        if select.select([fd], [], [], left)[0]:
            data = os.read(fd, 4096)
            if not data:
                raise NetDelayError(f"the delay line exited {proc.wait()} before listening: {_file_tail(err)}")
            buf += data
    return buf.decode().splitlines()[:n]


def _file_tail(f: IO[bytes]) -> str:
    f.seek(0)
    return " | ".join(f.read().decode(errors="replace").strip().splitlines()[-5:]) or "no output"


@contextlib.contextmanager
def tiers(l2_rtt_ms: float = 0.5, s3_rtt_ms: float = 20.0, bucket: str = "restore-bench",
          memcached_mb: int = 256, s3_server: str = "auto") -> Iterator[Tiers]:
    """memcached and an S3 server (s3_server: see the module text), each on
    its own host behind the given RTT."""
    memcached = shutil.which("memcached")
    if not memcached:
        raise NetDelayError("memcached is not installed")
    sweep_stale()
    with contextlib.ExitStack() as stack:
        logdir = tempfile.mkdtemp(prefix="netdelay-")
        stack.callback(shutil.rmtree, logdir, ignore_errors=True)
        n_l2, n_s3 = _free_subnets(2)
        l2, s3 = _Host(stack, "l2", n_l2), _Host(stack, "s3", n_s3)
        try:
            l2.netem(l2_rtt_ms)
            s3.netem(s3_rtt_ms)
            method, why = "netem", "tc netem on both veth ends"
        except NetDelayError as exc:
            method, why = "relay", f"netem unavailable ({exc}); userspace delay line"
            for h in (l2, s3):  # a half-applied netem would add to the relay's delay
                subprocess.run(["tc", "qdisc", "del", "dev", h.veth, "root"], capture_output=True)
                subprocess.run(["ip", "netns", "exec", h.ns, "tc", "qdisc", "del", "dev", h.peer, "root"],
                               capture_output=True)
        l2.spawn([memcached, "-l", l2.addr, "-p", str(L2_PORT), "-U", "0", "-I", "2m", "-m", str(memcached_mb),
                  "-u", "nobody"], L2_PORT, logdir)
        if s3_server == "auto":
            s3_server = "s3rver" if S3RVER.exists() else "moto"
        if s3_server == "s3rver":
            if not S3RVER.exists():
                raise NetDelayError(f"s3rver is not installed ({S3RVER}): run make install")
            data = os.path.join(logdir, "s3rver")
            os.mkdir(data)
            s3.spawn([str(S3RVER), "-d", data, "-a", s3.addr, "-p", str(S3_PORT), "-s",
                      "--configure-bucket", bucket], S3_PORT, logdir)
            key = ("S3RVER", "S3RVER")  # its fixed credentials
        elif s3_server == "moto":
            s3.spawn([sys.executable, "-m", "moto.server", "-H", s3.addr, "-p", str(S3_PORT)], S3_PORT, logdir)
            key = ("test", "test")
        else:
            raise NetDelayError(f"unknown S3 server {s3_server!r}: choose from {', '.join(S3_SERVERS)}")
        l2_address, s3_address = (l2.addr, L2_PORT), (s3.addr, S3_PORT)
        relay_pid = None
        if method == "relay":
            relay = stack.enter_context(relay_process([(l2_address, l2_rtt_ms / 2e3), (s3_address, s3_rtt_ms / 2e3)]))
            l2_address, s3_address = relay.addresses
            relay_pid = relay.pid
            why += f" in its own process (pid {relay.pid})"
        t = Tiers(l2_address, f"http://{s3_address[0]}:{s3_address[1]}", bucket, method, why, l2_rtt_ms, s3_rtt_ms,
                  relay_pid, s3_server, key)
        if s3_server == "moto":
            import boto3  # comes with moto; obstore cannot create buckets

            boto3.client("s3", endpoint_url=t.s3_endpoint, region_name="us-east-1", aws_access_key_id=key[0],
                         aws_secret_access_key=key[1]).create_bucket(Bucket=bucket)
        yield t


def _forward_arg(text: str) -> tuple[tuple[str, int], float]:
    try:
        host, port, one_way_s = text.rsplit(":", 2)
        return (host, int(port)), float(one_way_s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT:ONE_WAY_S (seconds)") from None


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.netdelay",
                                 description="The userspace delay line of bench/netdelay, on its own.")
    sub = ap.add_subparsers(dest="command", required=True)
    relay = sub.add_parser("relay", help="forward 127.0.0.1 ports to targets, delayed; print the ports, "
                                         "serve until stdin reads end-of-file")
    relay.add_argument("--forward", action="append", required=True, type=_forward_arg,
                       metavar="HOST:PORT:ONE_WAY_S", help="a target and its one-way delay in seconds (repeatable)")
    a = ap.parse_args(argv)
    _fine_timer_slack()
    r = Relay()
    for target, one_way_s in a.forward:
        host, port = r.forward(target, one_way_s)
        print(f"{host}:{port}", flush=True)
    r.run(sys.stdin.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
