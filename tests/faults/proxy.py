"""A fault-injecting TCP proxy for the fault-injection suite.

FaultProxy listens on a loopback port and relays each client connection to
an upstream (memcached, the S3 server). What it does to a connection is
decided when the connection is accepted, from the proxy's current fault:

    pass       relay both ways
    delay      hold every upstream reply chunk for `seconds` first
    stall      hold the replies back (until the client gives up or the
               fault is cleared)
    reset      relay `after` bytes of the reply, then reset the connection
               (RST: SO_LINGER 0)
    truncate   relay `after` bytes of the reply, then close (FIN)
    http503    answer every HTTP request with 503 SlowDown, as S3 does when
               it throttles, without asking upstream
    flip       relay, but flip one byte in every `every` reply bytes past
               the first `after` (the payload, past headers)

The fault in force applies at once, to open connections too (clients keep
connections alive). `share` (0..1] is the fraction of connections that
get it: each connection draws a number when accepted (seeded generator)
and is faulted while its number is below the share. `injected` counts the
connections each kind of fault touched. The proxy runs on threads: one
accept loop, two pumps per connection.
"""

from __future__ import annotations

import collections
import random
import socket
import struct
import threading
import time
from typing import Optional

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
        self._kind = "pass"
        self._params: dict = {}
        self._share = 1.0
        self._rng = random.Random(seed)
        self.injected: collections.Counter = collections.Counter()  # kind -> connections faulted
        self._seen: set[tuple[int, str]] = set()
        self.connections = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.port = self._sock.getsockname()[1]
        self._closing = threading.Event()
        self._open: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept_loop, name="fault-proxy", daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set(self, kind: str, share: float = 1.0, **params) -> None:
        """Fault from now on, on open connections too (see the module text)."""
        if kind not in KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {', '.join(KINDS)}")
        if not 0 < share <= 1:
            raise ValueError(f"share {share} is not within (0, 1]")
        with self._lock:
            self._kind, self._share, self._params = kind, share, params

    def clear(self) -> None:
        """Back to relaying."""
        self.set("pass")

    def close(self) -> None:
        self._closing.set()
        self._thread.join(5)
        _close(self._sock)
        with self._lock:
            held = list(self._open)
        for s in held:
            _close(s)

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _fault(self, conn: "_Conn") -> tuple[str, dict]:
        """The fault that applies to conn right now (counted once per kind)."""
        with self._lock:
            if self._kind == "pass" or conn.draw >= self._share:
                return "pass", {}
            if (conn.ident, self._kind) not in self._seen:
                self._seen.add((conn.ident, self._kind))
                self.injected[self._kind] += 1
            return self._kind, dict(self._params)

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
                self._open.add(client)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: "_Conn") -> None:
        try:
            kind, _ = self._fault(conn)
            if kind != "http503":  # a throttled S3 answers without asking upstream
                try:
                    conn.upstream = socket.create_connection(self.upstream, timeout=5)
                except OSError:  # upstream down (being restarted): the client sees a reset
                    return
                conn.upstream.settimeout(None)
                with self._lock:
                    self._open.add(conn.upstream)
                down = threading.Thread(target=self._downstream, args=(conn,), daemon=True)
                down.start()
            self._upstream_pump(conn)
        finally:
            for s in (conn.client, conn.upstream):
                if s is not None:
                    with self._lock:
                        self._open.discard(s)
                    _close(s)

    def _upstream_pump(self, conn: "_Conn") -> None:
        """Client to upstream: requests, or 503 answers while throttling."""
        try:
            while not self._closing.is_set():
                data = conn.client.recv(65536)
                if not data:
                    break
                kind, _ = self._fault(conn)
                if kind == "http503":
                    _read_request_rest(conn.client, data)
                    conn.client.sendall(_SLOWDOWN % (len(_SLOWDOWN_BODY), _SLOWDOWN_BODY))
                    continue
                if conn.upstream is None:
                    break
                conn.upstream.sendall(data)
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
        sent = 0  # reply bytes relayed since the current fault began
        last = "pass"
        try:
            while True:
                data = conn.upstream.recv(65536)
                if not data:
                    break
                kind, params = self._fault(conn)
                if kind != last:
                    sent, last = 0, kind
                after = int(params.get("after", 0))
                if kind == "stall":
                    while self._fault(conn)[0] == "stall" and not self._closing.is_set():
                        time.sleep(0.05)  # hold the reply back
                    if self._closing.is_set():
                        return
                elif kind == "delay":
                    time.sleep(float(params.get("seconds", 0.0)))
                elif kind in ("reset", "truncate") and sent + len(data) > after:
                    conn.client.sendall(data[: max(0, after - sent)])
                    if kind == "reset":
                        conn.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    _close(conn.client)
                    _close(conn.upstream)
                    return
                elif kind == "flip":
                    every = int(params.get("every", 4096))
                    data = bytearray(data)
                    for i in range(len(data)):
                        pos = sent + i
                        if pos >= after and (pos - after) % every == every // 2:
                            data[i] ^= 0x5A
                    data = bytes(data)
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
    share (fixed for its life), its two sockets."""

    def __init__(self, ident: int, draw: float, client: socket.socket):
        self.ident = ident
        self.draw = draw
        self.client = client
        self.upstream: Optional[socket.socket] = None


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
