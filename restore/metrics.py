"""Prometheus metrics of a `restore serve` process.

``ServerMetrics`` turns a Server's figures into Prometheus metrics and
serves them over HTTP (``prometheus_client``). Most are read from the
server when scraped (``Server.counters``: the engine's counters of every
session, the running ones included), so a scrape costs a few struct reads
per running guest and nothing on any fault path. Fetch latencies are
observed as they happen, from the fetcher threads (Server ``on_fetch``).

Metric                                      type       labels
restore_first_touches_total                 counter    source (zero, l1, l2, durable, host, prefetched, removed, failed)
restore_faults_total                        counter    kind (all, minor, planned, unplanned)
restore_fault_service_seconds               histogram  demand faults of ended sessions
restore_pages_installed_total               counter
restore_bytes_installed_total               counter
restore_fetch_seconds                       histogram  tier (l2, durable), outcome (hit, miss, bad, error)
restore_fetch_errors_total                  counter    tier, kind (error, bad)
restore_fetch_bytes_total                   counter    tier
restore_fetch_hedged_total                  counter    tier (l2): slow reads hedged to another replica
restore_chunks_total                        counter    outcome (host, l1, fetched, failed, released, reloaded)
restore_host_cache_chunks_total             counter    event (filled, waited, error)
restore_service_poll_seconds_total          counter    service thread time looking for the next fault awake
restore_l1_lookups_total                    counter    result (hit, miss, bad)
restore_l1_hit_ratio                        gauge      L1 hits / lookups, all sessions
restore_l1_size_bytes                       gauge      bytes in the L1 directory (this process's estimate, rescanned every minute)
restore_prefetch_pages_total                counter    pages the prefetch installed
restore_prefetch_useful_pages_total         counter    plan pages audit sessions touched
restore_prefetch_wasted_pages_total         counter    plan pages audit sessions never touched
restore_plan_audits_total                   counter
restore_sessions_total                      counter    outcome (ended, refused)
restore_active_sessions                     gauge
restore_poisoned_pages_total                counter
"""

from __future__ import annotations

import threading
import time
from typing import Iterator, Optional, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from .errors import InputError
from .faultlog import SOURCES
from .tiers.l1 import L1Cache

# Network fetch latency buckets, seconds: a memcached hit on loopback (~100 us)
# to a durable read retried within its deadline (tens of seconds).
FETCH_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
L1_SCAN_INTERVAL = 60.0  # seconds between scans of the L1 directory (for other processes' writes)


def parse_listen(addr: str) -> tuple[str, int]:
    """HOST:PORT (or :PORT, or PORT) for the metrics endpoint; the host
    defaults to 127.0.0.1 (metrics are not for the whole network unless
    asked), port 0 picks a free one."""
    host, sep, port = addr.rpartition(":")
    if not sep:
        host = ""
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise InputError(f"metrics address {addr!r} is not HOST:PORT") from None
    if not 0 <= number <= 65535:
        raise InputError(f"metrics address {addr!r}: port {number} is not in 0..65535")
    return host, number


class Served(Protocol):
    """What metrics read of a server at scrape time (restore.handler.Server
    has it): its counters and its demand-fault service-time histogram."""

    def counters(self) -> dict[str, int]: ...

    def service_histogram(self) -> tuple[tuple[int, ...], list[int], int]: ...


class _ServerCollector:
    """Read at scrape time from the server (and the L1 directory)."""

    def __init__(self, server: Served, l1: Optional[L1Cache]):
        self._server = server
        self._l1 = l1
        self._l1_scanned = -float("inf")
        self._lock = threading.Lock()

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: the names are fixed, the values come at collect()

    def _l1_bytes(self, l1: L1Cache) -> int:
        with self._lock:
            if time.monotonic() - self._l1_scanned >= L1_SCAN_INTERVAL:
                self._l1_scanned = time.monotonic()
                return l1.usage()
        return l1.usage_estimate()

    def collect(self) -> Iterator[Metric]:
        c = self._server.counters()

        def counter(name: str, doc: str, value: int) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        def labelled(name: str, doc: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
            m = CounterMetricFamily(name, doc, labels=[label])
            for key, value in values.items():
                m.add_metric([key], value)
            return m

        yield labelled("restore_first_touches", "First touches of guest pages, by where the page came from "
                       "(prefetched: installed ahead of the touch)", "source",
                       {s: c.get(f"first_touches.{s}", 0) for s in SOURCES if s != "fetched"})
        yield labelled("restore_faults", "Page-fault events: all, minor (memfd page not mapped), and first "
                       "touches of planned pages the prefetch had not reached / of pages not in the plan", "kind",
                       {"all": c.get("faults", 0), "minor": c.get("minor_faults", 0),
                        "planned": c.get("faults_planned", 0), "unplanned": c.get("faults_unplanned", 0)})
        yield counter("restore_pages_installed", "Guest pages installed (fault-around and prefetch included)",
                      c.get("pages_installed", 0))
        yield counter("restore_bytes_installed", "Bytes installed by copy or zeropage", c.get("bytes_installed", 0))
        yield labelled("restore_chunks", "Chunks by outcome: taken from the host cache as they were, decoded from "
                       "L1, fetched from L2/durable, given up (pages poisoned), decoded copy released, released "
                       "and loaded again", "outcome",
                       {"host": c.get("chunks_host", 0), "l1": c.get("chunks_l1", 0),
                        "fetched": c.get("chunks_fetched", 0),
                        "failed": c.get("chunks_failed", 0), "released": c.get("chunks_released", 0),
                        "reloaded": c.get("chunks_reloaded", 0)})
        yield labelled("restore_host_cache_chunks", "Host cache: chunks decoded into it, chunks another session "
                       "or process was filling (waited for), writes that failed", "event",
                       {"filled": c.get("host_fills", 0), "waited": c.get("host_waits", 0),
                        "error": c.get("host_errors", 0)})
        yield CounterMetricFamily("restore_service_poll_seconds", "Service thread time spent looking for the next "
                                  "fault without sleeping (--poll-us)", value=c.get("poll_ns", 0) / 1e9)
        hits, misses, bad = c.get("chunks_l1", 0), c.get("l1_misses", 0), c.get("l1_bad", 0)
        yield labelled("restore_l1_lookups", "L1 lookups of chunks: found and verified, not there, failed "
                       "verification", "result", {"hit": hits, "miss": misses, "bad": bad})
        lookups = hits + misses + bad
        yield GaugeMetricFamily("restore_l1_hit_ratio", "L1 hits per lookup, all sessions (0 before any lookup)",
                                value=hits / lookups if lookups else 0.0)
        if self._l1 is not None:
            yield GaugeMetricFamily("restore_l1_size_bytes", "Bytes of chunks in the L1 directory",
                                    value=self._l1_bytes(self._l1))
        yield counter("restore_prefetch_pages", "Pages the replay prefetch installed", c.get("prefetch_pages", 0))
        yield counter("restore_prefetch_useful_pages", "Plan pages the guests of audit sessions touched",
                      c.get("prefetch_useful_pages", 0))
        yield counter("restore_prefetch_wasted_pages", "Plan pages the guests of audit sessions never touched",
                      c.get("prefetch_wasted_pages", 0))
        yield counter("restore_plan_audits", "Sessions run without their plan to score it", c.get("audits", 0))
        yield counter("restore_poisoned_pages", "Pages poisoned because their chunk could not be had",
                      c.get("poisoned", 0))
        yield counter("restore_sessions_conn_closed", "Sessions whose VMM closed its connection after the "
                      "handshake (as Firecracker 1.10 and 1.11 do), served on until the VMM exited",
                      c.get("conn_closed", 0))
        yield counter("restore_vmm_unservable_kills", "VMMs killed because a page could be neither served nor "
                      "poisoned (a kernel without UFFDIO_POISON)", c.get("vmm_killed", 0))
        yield labelled("restore_sessions", "Guests served to the end, and refused", "outcome",
                       {"ended": c.get("sessions_ended", 0), "refused": c.get("sessions_refused", 0)})
        yield GaugeMetricFamily("restore_active_sessions", "Guests being served now", value=c.get("sessions_active", 0))
        bounds, counts, total_ns = self._server.service_histogram()
        cumulative, buckets = 0, []
        for bound, n in zip([*(b / 1e9 for b in bounds), float("inf")], counts):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        yield HistogramMetricFamily("restore_fault_service_seconds", "Demand-fault service time, event read to "
                                    "page installed (sessions that ended)", buckets=buckets, sum_value=total_ns / 1e9)


class ServerMetrics:
    """Metrics of one Server on their own registry. Pass ``observe_fetch``
    as the server's on_fetch; ``serve(addr)`` starts the HTTP endpoint."""

    def __init__(self, l1: Optional[L1Cache] = None):
        self.registry = CollectorRegistry()
        self._l1 = l1
        self._fetch_seconds = Histogram("restore_fetch_seconds", "Requests to a network tier, by outcome",
                                        ["tier", "outcome"], buckets=FETCH_BUCKETS, registry=self.registry)
        self._fetch_errors = Counter("restore_fetch_errors", "Failed requests to a network tier (error) and "
                                     "copies that failed verification (bad)", ["tier", "kind"],
                                     registry=self.registry)
        self._fetch_bytes = Counter("restore_fetch_bytes", "Stored bytes received from a network tier", ["tier"],
                                    registry=self.registry)
        self._fetch_hedged = Counter("restore_fetch_hedged", "Slow requests to a network tier hedged to another "
                                     "replica", ["tier"], registry=self.registry)
        self._fetch_hedged.labels("l2")
        for tier in ("l2", "durable"):  # present from the start, at zero
            self._fetch_bytes.labels(tier)
            for kind in ("error", "bad"):
                self._fetch_errors.labels(tier, kind)
        self._http = None

    def observe_fetch(self, tier: str, seconds: float, outcome: str, nbytes: int) -> None:
        """Server on_fetch: one request to a tier (fetcher threads call it),
        or a hedge (outcome "hedged": counted, not a request)."""
        if outcome == "hedged":
            self._fetch_hedged.labels(tier).inc()
            return
        self._fetch_seconds.labels(tier, outcome).observe(seconds)
        if outcome in ("error", "bad"):
            self._fetch_errors.labels(tier, outcome).inc()
        if nbytes:
            self._fetch_bytes.labels(tier).inc(nbytes)

    def attach(self, server: Served) -> None:
        """Report the server's figures at every scrape."""
        self.registry.register(_ServerCollector(server, self._l1))

    def serve(self, addr: str) -> tuple[str, int]:
        """Serve /metrics over HTTP on addr (HOST:PORT, see parse_listen);
        returns the address bound (the real port when 0 was asked)."""
        host, port = parse_listen(addr)
        try:
            self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise InputError(f"metrics address {addr}: cannot listen: {exc.strerror or exc}") from None
        return self._http.server_address[:2]

    def close(self) -> None:
        """Stop the HTTP endpoint."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
