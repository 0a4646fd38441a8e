"""`restore serve`: serve a snapshot to VMMs over Firecracker's UFFD protocol."""

from __future__ import annotations

import sys

import click

from ..config import LISTEN_SYNTAX, config_option
from ..errors import RestoreError
from ..keys import load_key
from .common import (
    Invocation,
    CACHE_HELP,
    LISTEN,
    MODE,
    OWNER,
    SIZE,
    host_cache_options,
    key_options,
    l2_option,
    open_host_cache,
    open_l1,
    open_l2,
    open_store,
    split_snapshot,
    store_options,
)


@click.command("serve")
@config_option
@click.option("--snapshot", "spec", required=True, metavar="NAME[:VERSION]", help="Snapshot to serve (default: newest version).")
@click.option("--socket", "socket_path", default=None, type=click.Path(dir_okay=False, path_type=str),
              help="Unix socket to listen on (mode 0600); its owner and allowed uids are --socket-owner and "
                   "--allow-uid. Give it, --listen, or both.")
@click.option("--listen", "listens", multiple=True, type=LISTEN, metavar=LISTEN_SYNTAX,
              help="One more socket, with its own owner (default: the server's user), mode (default 0600; "
                   "never more than 0770) and allowed uids joined with + (default: the server's own uid); "
                   "repeatable, e.g. one per jail. The path may not hold a comma.")
@click.option("--cache", "cache_dir", default=None, help=CACHE_HELP)
@click.option("--cache-budget", type=SIZE, default=None, metavar="SIZE",
              help="L1 size budget, e.g. 20G; least recently used chunks are evicted past it (default: 8 GiB).")
@click.option("--no-cache", is_flag=True, help="Do not use an L1 cache.")
@host_cache_options
@click.option("--fault-around", type=click.IntRange(min=1), default=None, help="Pages installed per fault at most.")
@click.option("--poll-us", type=click.IntRange(min=0, max=1_000_000), default=None, metavar="US",
              help="After serving a fault, keep looking for the next one this long before sleeping "
                   "(0: sleep at once; default: 50).")
@click.option("--record-fault-around", type=click.IntRange(min=1), default=None, metavar="N",
              help="Fault-around of sessions without a plan (1: record the exact working set, "
                   "for `snapshot optimize`; default: --fault-around).")
@click.option("--memfd-install", type=click.Choice(["copy", "continue"]), default="copy", show_default=True,
              help="For guests that send a memfd: UFFDIO_COPY, or write the memfd and UFFDIO_CONTINUE.")
@click.option("--allow-uid", "allow_uids", multiple=True, type=click.IntRange(min=0), metavar="UID",
              help="A uid whose VMMs may connect (repeatable; default: the server's own uid).")
@click.option("--socket-owner", type=OWNER, default=None, metavar="UID[:GID]",
              help="Give the socket to this uid (and gid), so VMMs running as it (a jailer's --uid) can connect; "
                   "allow it with --allow-uid too.")
@click.option("--socket-mode", type=MODE, default=None, metavar="OCTAL",
              help="Mode of --socket: 0600 (the default) or e.g. 0660 to let its group connect; never more than 0770.")
@click.option("--fetchers", type=click.IntRange(min=1), default=None,
              help="Chunks fetched at once per guest from L2 and the durable tier (default: 4; more for slow tiers).")
@click.option("--prefetch-inflight", type=click.IntRange(min=1), default=None, metavar="N",
              help="Plan chunks the prefetch asks for at once (default: 8; more for slow tiers).")
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=10.0, show_default=True, help="Seconds running guests get after SIGTERM before they are killed.")
@click.option("-v", "--verbose", is_flag=True, help="Log every session start and end.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="Log lines on stderr as text, or as JSON objects (one per line, with structured fields).")
@click.option("--metrics", "metrics_addr", default=None, metavar="HOST:PORT",
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (HOST defaults to 127.0.0.1; port 0: any free port).")
@click.option("--no-plan", is_flag=True, help="Do not prefetch the snapshot's working-set plan.")
@click.option("--rebuild-plan-after", type=click.IntRange(min=1), default=None, metavar="N",
              help="Rebuild the plan from the recent fault logs after every N sessions.")
@click.option("--plan-sessions", type=click.IntRange(min=1), default=5, show_default=True,
              help="Fault logs a rebuilt plan merges.")
@click.option("--audit-every", type=click.IntRange(min=1), default=None, metavar="N",
              help="Run every Nth session that has a plan without it, recording every first touch, and score the "
                   "plan by what that guest touched (useful and wasted pages, in the metrics).")
@click.option("--supervise", is_flag=True,
              help="Run the server as a worker under a supervisor that, if the worker dies, kills the VMMs it "
                   "was serving (their guests would hang) and starts a new worker on the same socket.")
@click.option("--worker-listen-fd", type=int, multiple=True, hidden=True)
@click.option("--worker-report-fd", type=int, default=None, hidden=True)
@l2_option
@key_options
@store_options
def serve(spec, socket_path, listens, cache_dir, cache_budget, no_cache, host_cache_dir, host_cache_budget, no_host_cache,
          fault_around, poll_us, record_fault_around, memfd_install,
          allow_uids, socket_owner, socket_mode, fetchers, prefetch_inflight, drain_timeout, verbose, log_format, metrics_addr, no_plan,
          rebuild_plan_after, plan_sessions, audit_every, supervise, worker_listen_fd, worker_report_fd, l2_specs,
          key_file, key_env, store_url, s3_endpoint, s3_region):
    """Serve a snapshot's memory to guests over Firecracker's UFFD protocol.

    Each connection on SOCKET (or on any --listen socket) is one guest (one
    JSON list of regions plus its userfaultfd), served if its uid is allowed
    on the socket it came on. Settings come from flags and/or a TOML file (--config).
    SIGTERM or Ctrl-C: no new guests; running guests get --drain-timeout
    seconds to finish (their fault logs are saved), then the server exits."""
    import logging
    import signal
    import threading

    from .. import logs
    from ..handler import Server
    from ..settings import (DEFAULT_FAULT_AROUND, DEFAULT_FETCHERS, DEFAULT_POLL_US, DEFAULT_PREFETCH_INFLIGHT,
                           ServerSettings)
    from ..snapshot import Snapshot
    from ..supervisor import PeerReports

    logs.configure(log_format, verbose)
    log = logging.getLogger("restore.serve")
    sockets = _serve_listens(socket_path, socket_owner, socket_mode, allow_uids, listens)
    if supervise and not worker_listen_fd:
        from ..supervisor import supervise as run_supervisor

        argv = Invocation.current().argv
        sys.exit(run_supervisor([a for a in argv if a != "--supervise"], sockets))
    listeners = _worker_listeners(worker_listen_fd, sockets) if worker_listen_fd else None
    name, version = split_snapshot(spec)
    store = open_store(store_url, s3_endpoint, s3_region)
    l1 = open_l1(cache_dir, no_cache, cache_budget)
    snap = Snapshot.open(store, name, version, load_key(key_file, key_env), l1)
    metrics = None
    if metrics_addr is not None:
        from ..metrics import ServerMetrics

        metrics = ServerMetrics(l1)
        host, port = metrics.serve(metrics_addr)
        log.info("metrics on http://%s:%d/metrics", host, port,
                 extra={"event": "metrics", "metrics_url": f"http://{host}:{port}/metrics"})
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    settings = ServerSettings(
        fault_around=fault_around or DEFAULT_FAULT_AROUND,
        record_fault_around=record_fault_around,
        memfd_install=memfd_install,
        fetchers=fetchers or DEFAULT_FETCHERS,
        prefetch_inflight=prefetch_inflight or DEFAULT_PREFETCH_INFLIGHT,
        poll_us=DEFAULT_POLL_US if poll_us is None else poll_us,
        drain_timeout=drain_timeout,
        use_plan=not no_plan,
        rebuild_plan_after=rebuild_plan_after,
        plan_sessions=plan_sessions,
        audit_every=audit_every,
    )
    server = Server(
        snap,
        sockets,
        settings,
        l1=l1,
        l2=open_l2(l2_specs),
        host_cache=open_host_cache(host_cache_dir, host_cache_budget, no_host_cache, cache_dir),
        on_fetch=metrics.observe_fetch if metrics else None,
        on_peer=PeerReports(worker_report_fd) if worker_report_fd is not None else None,
        listener=listeners,
    )
    if metrics is not None:
        metrics.attach(server)
    server.start()  # logs "serving ... on ..." once per socket
    while not stop.wait(0.5):
        pass
    log.info("stopping: no new guests; %d running get %.0f s to finish", server.active(), drain_timeout,
             extra={"event": "stopping", "active": server.active()})
    server.stop()
    snap.close()
    counts = server.counters()
    if metrics is not None:
        metrics.close()
    log.info("stopped after %d sessions, %d refused", counts.get("sessions_ended", 0),
             counts.get("sessions_refused", 0),
             extra={"event": "stopped", "sessions": counts.get("sessions_ended", 0),
                    "refused": counts.get("sessions_refused", 0)})


def _serve_listens(socket_path, socket_owner, socket_mode, allow_uids, listens) -> list:
    """serve's sockets: --socket (with --socket-owner, --socket-mode and
    --allow-uid) first, then each --listen; a path given twice, or no socket
    at all, is a usage error."""
    from ..listen import Listen, check_listens

    out = []
    if socket_path is not None:
        try:
            out.append(Listen(socket_path, socket_owner, 0o600 if socket_mode is None else socket_mode,
                              frozenset(allow_uids) if allow_uids else None))
        except RestoreError as exc:
            raise click.BadParameter(str(exc), param_hint="'--socket'") from None
    else:
        for given, name in ((socket_owner, "--socket-owner"), (socket_mode, "--socket-mode"),
                            (allow_uids, "--allow-uid")):
            if given:
                raise click.UsageError(f"{name} is a setting of --socket, and no --socket is given "
                                       "(a --listen socket takes owner=, mode= and allow=)")
    out += listens
    if not out:
        raise click.UsageError("give a socket to listen on: --socket PATH and/or --listen PATH[,...]")
    try:
        return check_listens(out)
    except RestoreError as exc:
        raise click.BadParameter(str(exc), param_hint="'--listen'") from None


def _worker_listeners(fds, sockets) -> list:
    """The listening sockets a supervisor handed its worker, one per socket
    in order; each must be bound at its socket's path."""
    import socket

    listeners = [socket.socket(fileno=fd) for fd in fds]
    names = [s.getsockname() for s in listeners]
    if names != [lst.path for lst in sockets]:
        raise RestoreError(f"the supervisor's sockets ({', '.join(map(str, names))}) are not this worker's "
                           f"({', '.join(lst.path for lst in sockets)})")
    return listeners
