"""An asyncio memcached client for the fetch loop (restore/asyncfetch.py).

Only what the fetch path needs: get, set and delete of chunk objects in
memcached's text protocol, with the same node choice as L2Cluster's
pymemcache HashClient (rendezvous hashing, murmur3, node key "host:port"),
so a zone warmed through L2Cluster is read here. Each node keeps its
connections open between requests (keep-alive) and uses up to
``max_conns`` at once, one request per connection at a time: a stalled
request holds up no other. A request that is cancelled (timed out, or lost
a hedge race) closes its connection, whose state is then unknown.

Errors are raised (OSError, asyncio.TimeoutError, ProtocolError); the
caller reads them as misses. A node that failed is skipped for
``dead_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Optional, Sequence

from pymemcache.client.murmur3 import murmur3_32


class ProtocolError(OSError):
    """memcached answered something this client does not understand."""


class NodeDead(OSError):
    """The node failed recently and is not asked until its dead time ends."""


class Node:
    """One memcached server: a pool of keep-alive connections."""

    def __init__(self, host: str, port: int, *, connect_timeout: float, dead_timeout: float, max_conns: int = 16):
        self.host, self.port = host, port
        self.key = f"{host}:{port}"
        self.connect_timeout = connect_timeout
        self.dead_timeout = dead_timeout
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._sem: Optional[asyncio.Semaphore] = None
        self._max = max_conns
        self.dead_until = 0.0
        self.opened = 0  # connections made (reuse = requests - opened)

    def alive(self) -> bool:
        return time.monotonic() >= self.dead_until

    def _mark_dead(self) -> None:
        self.dead_until = time.monotonic() + self.dead_timeout
        for _, w in self._idle:
            w.close()
        self._idle.clear()

    async def _conn(self):
        if self._idle:
            return self._idle.pop()
        r, w = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, limit=1 << 20), self.connect_timeout
        )
        sock = w.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.opened += 1
        return r, w

    async def _call(self, request: bytes | Sequence, reply):
        if not self.alive():
            raise NodeDead(f"memcached {self.key} failed recently")
        if self._sem is None:
            self._sem = asyncio.Semaphore(self._max)
        async with self._sem:
            ok = False
            try:
                r, w = await self._conn()
            except (OSError, asyncio.TimeoutError):
                self._mark_dead()
                raise
            try:
                if isinstance(request, bytes):
                    w.write(request)
                else:
                    w.writelines(request)
                out = await reply(r)
                ok = True
                return out
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                if not isinstance(exc, ProtocolError):
                    self._mark_dead()
                raise ProtocolError(f"memcached {self.key}: {exc}") from exc
            finally:  # cancelled, timed out or failed: the connection's state is unknown
                if ok:
                    self._idle.append((r, w))
                else:
                    w.close()

    async def get(self, key: str) -> Optional[memoryview]:
        async def reply(r):
            line = await r.readline()
            if line == b"END\r\n":
                return None
            parts = line.split()
            if len(parts) < 4 or parts[0] != b"VALUE":
                raise ProtocolError(f"unexpected reply {line[:40]!r}")
            n = int(parts[3])
            data = await r.readexactly(n + 7)  # the value, \r\n, END\r\n
            if data[n:] != b"\r\nEND\r\n":
                raise ProtocolError("value not followed by END")
            return memoryview(data)[:n]

        return await self._call(b"get " + key.encode() + b"\r\n", reply)

    async def set(self, key: str, data) -> bool:
        async def reply(r):
            line = await r.readline()
            if line not in (b"STORED\r\n", b"NOT_STORED\r\n"):
                raise ProtocolError(f"unexpected reply {line[:40]!r}")
            return line == b"STORED\r\n"

        head = b"set %s 0 0 %d\r\n" % (key.encode(), len(data))
        return await self._call([head, data, b"\r\n"], reply)

    async def delete(self, key: str) -> bool:
        async def reply(r):
            line = await r.readline()
            if line not in (b"DELETED\r\n", b"NOT_FOUND\r\n"):
                raise ProtocolError(f"unexpected reply {line[:40]!r}")
            return line == b"DELETED\r\n"

        return await self._call(b"delete " + key.encode() + b"\r\n", reply)

    def close(self) -> None:
        for _, w in self._idle:
            w.close()
        self._idle.clear()


class Zone:
    """One zone's nodes, with pymemcache's rendezvous choice of node."""

    def __init__(self, name: str, nodes: Sequence[tuple[str, int]], **kw):
        self.name = name
        self.nodes = [Node(h, p, **kw) for h, p in nodes]

    def ranked(self, key: str) -> list[Node]:
        """The zone's live nodes, the key's home first (as HashClient picks
        it among live nodes), then the others by falling score."""
        live = [n for n in self.nodes if n.alive()]
        if len(live) < 2:
            return live  # nothing to rank (murmur3_32 is pure Python: a tenth of a millisecond a node)
        return sorted(live, key=lambda n: (murmur3_32(f"{n.key}-{key}", 0), n.key), reverse=True)

    def close(self) -> None:
        for n in self.nodes:
            n.close()
