"""A fault-injecting TCP proxy for the fault-injection suite.

FaultProxy listens on a loopback port and relays each client connection to
an upstream (memcached, the S3 server). The protocols relayed are request
then reply, so the proxy counts requests: client bytes that arrive while
no request is outstanding on their connection start one (its number is
the proxy's running count), and the first reply bytes relayed end its
wait. What it does is decided by its current fault, looked up as bytes
pass, so a fault set now applies to open connections too (clients keep
connections alive):

    pass       relay both ways
    delay      hold every upstream reply chunk for `seconds` first
    stall      hold the replies back (until the client gives up or the
               fault is cleared)
    reset      relay `after` bytes of a reply, then reset the connection
               (RST: SO_LINGER 0)
    truncate   relay `after` bytes of a reply, then close (FIN)
    http503    answer every HTTP request with 503 SlowDown, as S3 does when
               it throttles, without asking upstream
    flip       relay, but flip one byte in every `every` reply bytes past
               the first `after` of each reply (the payload, past headers)

`share` (0..1] is the fraction of connections that get it: each connection
draws a number when accepted (seeded generator) and is faulted while its
number is below the share. `limit`: the fault lands on at most that many
replies, then the proxy relays (a fault that passes).

What the proxy counts is what took effect, never what was merely set:
`landed` counts, per kind, the replies a fault actually changed (held,
delayed, cut, answered 503, damaged); `cut` the connections cut while a
request on them was outstanding (by reset/truncate, by cut_all(), or by
the upstream dying under it); `refused` the connections the upstream
refused (it was down); `gave_up` the connections whose client hung up
while its request was outstanding (a client timeout); `relayed` the
requests forwarded to the upstream.

Events, for faults timed by what happens rather than by sleeps:
`on_request(n, head)` (settable) is called with each request's number and
its first bytes from the relaying thread before the request is forwarded, so whatever it does (kill
the upstream, stop it) lands while that request is in flight; wait_for()
waits, with a deadline, until a condition on the counts holds (woken by
every count). The proxy runs on threads: one accept loop, two pumps per
connection.
"""

from __future__ import annotations

import collections
import random
import socket
import struct
import threading
import time
from typing import Callable, Optional

KINDS = ("pass", "delay", "stall", "reset", "truncate", "http503", "flip")

_SLOWDOWN = (
    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: %d\r\n"
    b"Connection: close\r\n\r\n%s"
)
_SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FaultProxy:
    def __init__(self, upstream: tuple[str, int], seed: int = 0):
        self.upstream = upstream
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified on every count
        self._kind = "pass"
        self._params: dict = {}
        self._share = 1.0
        self._limit: Optional[int] = None
        self._landed_now = 0  # landings of the fault in force (against its limit)
        self._rng = random.Random(seed)
        self.landed: collections.Counter = collections.Counter()  # kind -> replies it changed
        self._landed_on: set[tuple[int, int, str]] = set()  # (connection, request, kind) counted
        self.requests = 0
        self.relayed = 0
        self.cut = 0
        self.refused = 0
        self.gave_up = 0
        self.connections = 0
        self.on_request: Optional[Callable[[int, bytes], None]] = None
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.port = self._sock.getsockname()[1]
        self._closing = threading.Event()
        self._conns: set["_Conn"] = set()
        self._thread = threading.Thread(target=self._accept_loop, name="fault-proxy", daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set(self, kind: str, share: float = 1.0, limit: Optional[int] = None, **params) -> None:
        """Fault from now on, on open connections too (see the module text)."""
        if kind not in KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {', '.join(KINDS)}")
        if not 0 < share <= 1:
            raise ValueError(f"share {share} is not within (0, 1]")
        with self._lock:
            self._kind, self._share, self._params, self._limit = kind, share, params, limit
            self._landed_now = 0
            self._changed.notify_all()

    def clear(self) -> None:
        """Back to relaying."""
        self.set("pass")

    def cut_all(self) -> int:
        """Reset every open connection, both ways, as the death of the
        upstream's process would; returns how many had a request
        outstanding (counted in `cut`)."""
        with self._lock:
            conns = list(self._conns)
        n = 0
        for conn in conns:
            n += self._cut(conn, reset=True)
        return n

    def wait_for(self, cond: Callable[["FaultProxy"], bool], what: str, timeout: float = 30.0) -> None:
        """Until cond(self) holds, woken by every count; fails with `what`
        after timeout seconds (a bound on a hang, not a measure)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not cond(self):
                left = deadline - time.monotonic()
                assert left > 0, f"{what} (requests {self.requests}, relayed {self.relayed}, cut {self.cut}, " \
                                 f"refused {self.refused}, gave up {self.gave_up}, landed {dict(self.landed)})"
                self._changed.wait(min(left, 0.5))

    def close(self) -> None:
        self._closing.set()
        self._thread.join(5)
        _close(self._sock)
        with self._lock:
            held = list(self._conns)
        for conn in held:
            for s in (conn.client, conn.upstream):
                if s is not None:
                    _close(s)

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)
            self._changed.notify_all()

    def _fault(self, conn: "_Conn") -> tuple[str, dict]:
        """The fault that applies to conn's current request right now."""
        with self._lock:
            kind = self._kind
            if kind == "pass" or conn.draw >= self._share:
                return "pass", {}
            if (self._limit is not None and self._landed_now >= self._limit
                    and (conn.ident, conn.turn, kind) not in self._landed_on):
                return "pass", {}
            return kind, dict(self._params)

    def _land(self, conn: "_Conn", kind: str) -> None:
        """The fault kind changed conn's current reply: count it, once."""
        with self._lock:
            key = (conn.ident, conn.turn, kind)
            if key not in self._landed_on:
                self._landed_on.add(key)
                self.landed[kind] += 1
                self._landed_now += 1
                self._changed.notify_all()

    def _cut(self, conn: "_Conn", reset: bool) -> int:
        """Close both sides of conn (RST to the client when reset); 1 when
        a request on it was outstanding (counted in `cut`)."""
        with self._lock:
            live, conn.awaiting = conn.awaiting, False
            if live:
                self.cut += 1
                self._changed.notify_all()
        if reset:
            try:
                conn.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        for s in (conn.client, conn.upstream):
            if s is not None:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                _close(s)
        return int(live)

    # -- relaying ------------------------------------------------------------

    def _accept_loop(self) -> None:
        self._sock.settimeout(0.2)  # to see close() soon: closing does not wake accept()
        while not self._closing.is_set():
            try:
                client, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            client.settimeout(None)
            with self._lock:
                self.connections += 1
                conn = _Conn(self.connections, self._rng.random(), client)
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: "_Conn") -> None:
        try:
            if self._fault(conn)[0] != "http503":  # a throttled S3 answers without asking upstream
                try:
                    conn.upstream = socket.create_connection(self.upstream, timeout=5)
                except OSError:  # upstream down (being restarted): the client sees its connection end
                    self._count("refused")
                    return
                conn.upstream.settimeout(None)
                down = threading.Thread(target=self._downstream, args=(conn,), daemon=True)
                down.start()
            self._upstream_pump(conn)
        finally:
            with self._lock:
                self._conns.discard(conn)
            for s in (conn.client, conn.upstream):
                if s is not None:
                    _close(s)

    def _upstream_pump(self, conn: "_Conn") -> None:
        """Client to upstream: requests, or 503 answers while throttling."""
        try:
            while not self._closing.is_set():
                data = conn.client.recv(65536)
                if not data:
                    with self._lock:
                        if conn.awaiting:  # the client hung up on its own request: it gave up
                            conn.awaiting = False
                            self.gave_up += 1
                            self._changed.notify_all()
                    break
                new = False
                with self._lock:
                    if not conn.awaiting:
                        conn.awaiting, new = True, True
                        conn.turn += 1
                        self.requests += 1
                        number = self.requests
                        self._changed.notify_all()
                if new and self.on_request is not None:
                    self.on_request(number, data)  # before forwarding: what it does lands on this request
                kind, _ = self._fault(conn)
                if kind == "http503":
                    _read_request_rest(conn.client, data)
                    self._land(conn, kind)
                    with self._lock:
                        conn.awaiting = False
                    conn.client.sendall(_SLOWDOWN % (len(_SLOWDOWN_BODY), _SLOWDOWN_BODY))
                    continue
                if conn.upstream is None:
                    break
                try:
                    conn.upstream.sendall(data)
                except OSError:  # the upstream died under the request: cut
                    self._cut(conn, reset=True)
                    return
                if new:
                    self._count("relayed")
        except OSError:
            pass
        finally:
            if conn.upstream is not None:
                try:
                    conn.upstream.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

    def _downstream(self, conn: "_Conn") -> None:
        """Upstream to client: replies, faulted as the proxy says now."""
        sent, turn = 0, -1  # reply bytes relayed of request `turn`
        try:
            while True:
                try:
                    data = conn.upstream.recv(65536)
                except OSError:
                    data = b""
                if not data:  # the upstream closed: a request outstanding is cut
                    self._cut(conn, reset=False)
                    return
                if conn.turn != turn:
                    sent, turn = 0, conn.turn
                kind, params = self._fault(conn)
                after = int(params.get("after", 0))
                if kind == "stall":
                    self._land(conn, kind)
                    while self._fault(conn)[0] == "stall" and not self._closing.is_set():
                        time.sleep(0.05)  # hold the reply back (polls the fault in force)
                    if self._closing.is_set():
                        return
                elif kind == "delay":
                    self._land(conn, kind)
                    time.sleep(float(params.get("seconds", 0.0)))  # the fault itself, not a wait for an event
                elif kind in ("reset", "truncate") and sent + len(data) > after:
                    self._land(conn, kind)
                    conn.client.sendall(data[: max(0, after - sent)])
                    self._cut(conn, reset=kind == "reset")
                    return
                elif kind == "flip":
                    every = int(params.get("every", 4096))
                    data = bytearray(data)
                    for i in range(len(data)):
                        pos = sent + i
                        if pos >= after and (pos - after) % every == every // 2:
                            data[i] ^= 0x5A
                            self._land(conn, kind)
                    data = bytes(data)
                with self._lock:
                    conn.awaiting = False  # the reply is on its way
                conn.client.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            try:
                conn.client.shutdown(socket.SHUT_WR)
            except OSError:
                pass


class _Conn:
    """One relayed connection: its number, its draw against the fault's
    share (fixed for its life), its two sockets, its current request's
    number on it (turn) and whether that request awaits its reply."""

    def __init__(self, ident: int, draw: float, client: socket.socket):
        self.ident = ident
        self.draw = draw
        self.client = client
        self.upstream: Optional[socket.socket] = None
        self.turn = 0
        self.awaiting = False


def _read_request_rest(sock: socket.socket, data: bytes) -> None:
    """Finish reading one HTTP request whose first bytes are data."""
    sock.settimeout(5)
    buf = data
    while b"\r\n\r\n" not in buf:
        more = sock.recv(65536)
        if not more:
            return
        buf += more
    head, _, body = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip() or 0)
    while len(body) < length:
        more = sock.recv(65536)
        if not more:
            break
        body += more
    sock.settimeout(None)


def _close(s: socket.socket) -> None:
    try:
        s.close()
    except OSError:
        pass
