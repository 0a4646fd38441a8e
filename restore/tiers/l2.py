"""L2: memcached clusters, one per availability zone.

Chunk objects are stored in memcached under their id (64 hex digits) as
the exact stored bytes. A cluster is several memcached nodes with
rendezvous hashing over them (pymemcache's HashClient): each chunk id has
one home node, and losing a node moves only that node's chunks. Timeouts
are short (a slow L2 must cost little: the durable tier is always behind
it); a node that fails is marked dead, skipped, and retried after
``dead_timeout`` seconds. Every error is a miss: L2 is a cache, and every
byte read from it is verified by the engine before it is used.

memcached must accept items as large as a chunk: start it with ``-I`` at
least the chunk size (``-I 2m`` for 512 KiB chunks).

Configuration: ``az1=host:port,host:port`` per zone (``--l2`` on the
command line, repeatable); the first zone given is the local one, read
first; ``warm`` writes to every zone.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Optional, Sequence

from pymemcache.client.hash import HashClient

from ..errors import InputError

log = logging.getLogger("restore.l2")

CONNECT_TIMEOUT = 0.2  # seconds
TIMEOUT = 0.5  # seconds per operation
DEAD_TIMEOUT = 5.0  # seconds before a failed node is tried again


def parse_zone(spec: str) -> tuple[str, list[tuple[str, int]]]:
    """'az1=host:port,host:port' → ('az1', [(host, port), ...]). Raises
    InputError naming the spec or node when it is malformed."""
    zone, sep, nodes = spec.partition("=")
    if not sep or not zone or not nodes:
        raise InputError(f"L2 zone {spec!r} is not NAME=HOST:PORT[,HOST:PORT...]")
    out = []
    for node in nodes.split(","):
        host, colon, port = node.strip().rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InputError(f"L2 zone {zone}: node {node!r} is not HOST:PORT")
        out.append((host, int(port)))
    return zone, out


@dataclass
class L2Counters:
    """What an L2Cluster did since it was made (all zones together)."""

    hits: int = 0
    misses: int = 0
    errors: int = 0  # timeouts, refused connections, dead nodes
    bad: int = 0  # copies that failed verification (dropped)
    writes: int = 0


class L2Cluster:
    """The L2 clusters of every zone; reads go to the local (first) zone.

    zones: (zone name, [(host, port), ...]) pairs, the local zone first.
    connect_timeout, timeout (per operation) and dead_timeout (before a
    failed node is tried again) are seconds. Thread-safe: each zone's
    client keeps a pool of up to 16 connections per node. No method raises
    for a node's failure: errors are counted (counters) and read as
    misses. close() closes the connections. Raises InputError for an
    empty zone list.
    """

    def __init__(
        self,
        zones: Sequence[tuple[str, Sequence[tuple[str, int]]]],
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        timeout: float = TIMEOUT,
        dead_timeout: float = DEAD_TIMEOUT,
    ):
        if not zones:
            raise InputError("an L2 configuration needs at least one zone")
        self.zones = [(name, list(nodes)) for name, nodes in zones]
        self.counters = L2Counters()
        self.connect_timeout, self.timeout, self.dead_timeout = connect_timeout, timeout, dead_timeout
        self._lock = threading.Lock()
        self._clients = [
            (
                name,
                HashClient(
                    nodes,
                    connect_timeout=connect_timeout,
                    timeout=timeout,
                    retry_attempts=1,
                    retry_timeout=0,
                    dead_timeout=dead_timeout,
                    ignore_exc=False,
                    use_pooling=True,
                    max_pool_size=16,
                    default_noreply=False,
                ),
            )
            for name, nodes in self.zones
        ]

    @classmethod
    def from_specs(cls, specs: Sequence[str], **kw) -> Optional["L2Cluster"]:
        """From 'az=host:port,...' strings; None when there are none."""
        return cls([parse_zone(s) for s in specs], **kw) if specs else None

    @property
    def local_zone(self) -> str:
        """The name of the zone reads go to."""
        return self.zones[0][0]

    def _count(self, field: str, n: int = 1) -> None:
        with self._lock:
            setattr(self.counters, field, getattr(self.counters, field) + n)

    def get(self, chunk_id: str) -> Optional[bytes]:
        """The stored bytes of chunk_id from the local zone, or None (miss or
        error). Not verified here: the caller checks them (rs_engine_supply)."""
        _, client = self._clients[0]
        try:
            value = client.get(chunk_id)
        except Exception as exc:  # any node trouble is a miss
            self._count("errors")
            log.debug("L2 get %s: %s", chunk_id, exc)
            return None
        if value is None:
            self._count("misses")
            return None
        self._count("hits")
        return bytes(value)

    def put(self, chunk_id: str, data: bytes, zones: str = "local") -> int:
        """Write a verified chunk to the local zone ("local") or every zone
        ("all"); returns how many zones took it. Errors are logged, never
        raised: a write to a cache is best effort."""
        done = 0
        for name, client in self._clients if zones == "all" else self._clients[:1]:
            try:
                if client.set(chunk_id, data, noreply=False):
                    done += 1
            except Exception as exc:
                self._count("errors")
                log.debug("L2 zone %s set %s: %s", name, chunk_id, exc)
        self._count("writes", done)
        return done

    def drop(self, chunk_id: str) -> None:
        """Forget a bad copy in the local zone (counted as bad)."""
        self._count("bad")
        try:
            self._clients[0][1].delete(chunk_id, noreply=False)
        except Exception as exc:
            self._count("errors")
            log.debug("L2 delete %s: %s", chunk_id, exc)

    def close(self) -> None:
        """Close every zone's connections."""
        for _, client in self._clients:
            client.close()
