"""Working-set plans and replay prefetch: plans built from fault logs have
the expected order and merge behaviour; a restore with a plan gives the
guest the same bytes with fewer faults; prefetch never undoes a REMOVE; a
plan for another snapshot is refused; prefetch stops with its guest."""

from __future__ import annotations

import io
import json
import re
import threading
import time

import numpy as np
import pytest

from restore.faultlog import LOG_DTYPE
from restore.handler import Server
from restore.settings import ServerSettings
from restore.objects import plan_pointer_key
from restore.session import prefetch_usage
from restore.snapshot import Snapshot, create_snapshot
from restore.guest import Guest, reads, remove
from restore.testing import expected_sums
from restore.tiers.durable import DurableStore
from restore.tiers.l1 import L1Cache
from restore.workingset import PlanError, PlanKeeper, build_plan, load_plan, plan_info, rebuild_plan, save_plan

P = 4096
CHUNK = 256 * 1024
SIZE = 16 << 20


def _log(offsets):
    rec = np.zeros(len(offsets), dtype=LOG_DTYPE)
    rec["offset"] = np.asarray(offsets, dtype=np.uint64) * P
    rec["t_ns"] = np.arange(len(offsets)) * 1000 + 5
    return rec


def test_plan_order_and_merge():
    logs = [_log([5, 1, 3, 9]), _log([1, 5, 3]), _log([1, 3, 7])]
    assert list(build_plan(logs, 0.5) // P) == [1, 5, 3]  # in >= 2 of 3, by median rank
    assert list(build_plan(logs, 1.0) // P) == [1, 3]  # in every log
    assert list(build_plan(logs, 0.3) // P) == [1, 5, 3, 7, 9]  # ties by offset
    assert list(build_plan([_log([4, 2, 8])]) // P) == [4, 2, 8]  # one log: its first-touch order
    # Logs are taken in time order, whatever order their records come in.
    shuffled = _log([6, 2, 4])[::-1]
    assert list(build_plan([shuffled]) // P) == [6, 2, 4]
    assert len(build_plan([])) == 0
    with pytest.raises(ValueError, match=re.escape("min_share 0 is not within (0, 1]")):
        build_plan(logs, 0)


@pytest.fixture(scope="module")
def image(make_image):
    return make_image(SIZE, seed=41)


@pytest.fixture
def snap(open_snapshot, image):
    return open_snapshot(image, "fn", chunk_size=CHUNK)


def _trace(image, seed, n=1500):
    """A working set: runs of 3 pages, shifted a little per invocation."""
    rng = np.random.default_rng(seed)
    starts = np.sort(rng.choice(np.arange(0, SIZE // P - 4, 7), size=n // 3, replace=False))
    rng.shuffle(starts)
    offs = (starts[:, None] + np.arange(3)).reshape(-1)
    return offs.astype(np.uint64) * P


@pytest.fixture(params=["anon", "memfd-copy", "memfd-continue"])
def mem(request):
    """(Guest keywords, ServerSettings keywords): anonymous guest memory, or a memfd
    sent with the handshake and filled by UFFDIO_COPY or UFFDIO_CONTINUE."""
    if request.param == "anon":
        return {}, {}
    return {"memfd": True}, {"memfd_install": request.param.split("-")[1]}


def _run(server, image, offsets, **guest_kw):
    before = len(server.summaries)
    with Guest(server.socket_path, memory_size=SIZE, **guest_kw) as g:
        res = g.run(reads(offsets), timeout=120)
    assert (res.sums == expected_sums(image, offsets)).all()
    deadline = time.monotonic() + 10
    while len(server.summaries) == before:
        assert time.monotonic() < deadline, "the session did not end"
        time.sleep(0.01)
    return server.summaries[-1]


def test_replay_gives_identical_bytes_with_fewer_faults(tmp_path, snap, image, mem):
    guest_kw, server_kw = mem
    trace = _trace(image, 1)
    with Server(snap, tmp_path / "a.sock", ServerSettings(fault_around=1, **server_kw),
                l1=L1Cache(tmp_path / "l1")) as server:
        recorded = _run(server, image, trace, **guest_kw)
        assert recorded.stats.prefetch_chunks == 0
        info = rebuild_plan(snap.store, snap.manifest, sessions=1)
        assert info.pages == len(np.unique(trace)) and info.built_from == [recorded.session_id]
        plan = load_plan(snap.store, snap.manifest)
        assert (plan == trace[np.sort(np.unique(trace, return_index=True)[1])]).all()  # first-touch order
        replayed = _run(server, image, trace, **guest_kw)
    st = replayed.stats
    assert st.prefetch_chunks > 0 and st.prefetch_pages > 0
    assert st.faults < recorded.stats.faults / 3
    # "continue" writes every data page into the memfd, then maps it.
    nonzero = int(np.fromfile(image, dtype=np.uint8).reshape(-1, P)[np.unique(trace) // P].any(axis=1).sum())
    if server_kw.get("memfd_install") == "continue":
        assert st.memfd_written >= nonzero
    else:
        assert st.memfd_written == 0
    assert st.first_touches["failed"] == 0
    # Every first touch is accounted for: a demand fault, or a planned page
    # the prefetch put in ahead of it (logged at install).
    assert st.first_touches["prefetched"] + st.faults_planned + st.faults_unplanned == len(np.unique(trace))
    assert st.faults_unplanned == 0
    # So the replay's log names the same pages as the recording's, and a plan
    # rebuilt from it is the same set: the cycle neither shrinks nor drifts.
    logs = [np.load(io.BytesIO(snap.store.get(s.log_key))) for s in (recorded, replayed)]
    assert set(logs[0]["offset"]) == set(logs[1]["offset"]) == set(trace)
    rebuild_plan(snap.store, snap.manifest, sessions=1)
    assert set(load_plan(snap.store, snap.manifest)) == set(trace)
    # fault_around=1: the prefetch installed exactly the plan, all of it read.
    assert len(replayed.prefetched) == st.prefetch_pages
    assert set(replayed.prefetched) <= set(trace)
    assert st.install_ns >= st.prefetch_install_ns > 0 and st.decode_ns > 0 and st.l1_read_ns > 0


def test_replay_with_a_different_invocation(tmp_path, snap, image):
    with Server(snap, tmp_path / "b.sock", ServerSettings(rebuild_plan_after=1), l1=L1Cache(tmp_path / "l1")) as server:
        _run(server, image, _trace(image, 2))  # records; the server then builds the plan
        assert plan_info(snap.store, snap.manifest) is not None
        other = _trace(image, 3)  # another request: a different, overlapping working set
        replayed = _run(server, image, other)
    st = replayed.stats
    assert st.prefetch_pages > 0
    assert st.faults_unplanned > 0  # pages this invocation touched that the plan lacked
    # Useful and wasted prefetch, against what this guest read: the plan came
    # from another invocation, so some of it was never read.
    useful, wasted = prefetch_usage(replayed.prefetched, other)
    assert useful == len(set(replayed.prefetched) & set(other))
    assert useful + wasted == st.prefetch_pages and useful > 0 and wasted > 0


def test_recording_with_fault_around_1_names_the_working_set_exactly(tmp_path, snap, image):
    trace = _trace(image, 6)
    with Server(snap, tmp_path / "x.sock", ServerSettings(record_fault_around=1, rebuild_plan_after=1),
                l1=L1Cache(tmp_path / "l1")) as server:
        recorded = _run(server, image, trace)
        # Every touched page faulted once: the log is the working set.
        assert recorded.stats.faults == recorded.stats.pages_installed == len(np.unique(trace))
        assert set(load_plan(snap.store, snap.manifest)) == set(trace)
        replayed = _run(server, image, trace)
    # The plan was recorded page by page, so the prefetch installs exactly
    # its pages, not fault-around windows around each of them.
    assert 0 < replayed.stats.prefetch_pages <= len(np.unique(trace))
    assert set(replayed.prefetched.tolist()) <= set(trace.tolist())


def test_prefetch_never_undoes_a_remove(tmp_path, snap, image, mem):
    pages = np.fromfile(image, dtype=np.uint8).reshape(-1, P)
    nonzero = np.flatnonzero(pages.any(axis=1))
    target = nonzero[(nonzero >= 512) & (nonzero < 1024)][:32].astype(np.uint64) * P
    save_plan(snap.store, snap.manifest, np.concatenate([target, nonzero[:2000].astype(np.uint64) * P]), [], 1.0)
    guest_kw, server_kw = mem
    for i in range(5):
        with Server(snap, tmp_path / f"r{i}.sock", ServerSettings(**server_kw), l1=L1Cache(tmp_path / "l1")) as server:
            # Drop the whole span (the balloon), then read the planned pages.
            ops = np.concatenate([remove(512 * P, 512), reads(target)])
            with Guest(server.socket_path, memory_size=SIZE, **guest_kw) as g:
                res = g.run(ops, timeout=60)
        assert (res.sums[1:] == 0).all(), f"round {i}: a removed page holds snapshot bytes"


def test_a_plan_for_another_snapshot_is_refused(tmp_path, snap, image, caplog):
    create_snapshot(snap.store, image, "fn", chunk_size=CHUNK)  # version 2
    save_plan(snap.store, snap.manifest, _trace(image, 4), [], 1.0)
    v1 = snap.store.get(plan_pointer_key("fn", "1"))
    snap.store.put(plan_pointer_key("fn", "2"), v1)
    with Snapshot.open(snap.store, "fn", "2") as v2:
        with pytest.raises(PlanError, match=re.escape(
            f"plan pointer {snap.store.url}/snapshots/fn/2/plan.json is for snapshot fn/1 "
            f"({SIZE} bytes, {CHUNK}-byte chunks), not fn/2 ({SIZE} bytes, {CHUNK}-byte chunks)"
        )):
            load_plan(v2.store, v2.manifest)
        with Server(v2, tmp_path / "v2.sock") as server:
            summary = _run(server, image, _trace(image, 5)[:300])
        assert summary.stats.prefetch_chunks == 0  # served, without the wrong plan
    assert any("not using its plan" in r.getMessage() for r in caplog.records)
    doc = json.loads(snap.store.get(plan_pointer_key("fn", "1")))
    assert doc["snapshot"]["version"] == "1" and doc["format"] == "restore-plan"


class _SlowStore(DurableStore):
    """A real file store whose chunk reads take a while (a slow network)."""

    def get(self, key):
        if key.startswith("chunks/"):
            time.sleep(0.05)
        return super().get(key)


def test_prefetch_stops_cleanly_when_the_guest_dies(tmp_path, snap, image):
    save_plan(snap.store, snap.manifest, np.arange(0, SIZE, P, dtype=np.uint64), [], 1.0)
    slow = _SlowStore(snap.store.url)
    with Snapshot.open(slow, "fn") as s:
        server = Server(s, tmp_path / "d.sock").start()
        g = Guest(server.socket_path, memory_size=SIZE).start(reads(np.arange(0, SIZE, P, dtype=np.uint64)))
        deadline = time.monotonic() + 10
        while server.active() == 0:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        time.sleep(0.1)
        g.kill()
        g.close()
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        stopper.join(30)
        assert not stopper.is_alive(), "the server did not stop"
    assert len(server.summaries) == 1
    st = server.summaries[0].stats
    assert 0 < st.prefetch_chunks < len(snap.manifest.chunks)


def test_a_known_plan_is_not_read_again(snap, image):
    """A server keeps the plan it read last: only the pointer is read for the
    next session, and a new plan (a new pointer) is read when it comes."""
    first = save_plan(snap.store, snap.manifest, _trace(image, 7), [], 1.0)
    known: dict = {}
    plan = load_plan(snap.store, snap.manifest, known)
    assert list(known) == [first.plan_id] and not plan.flags.writeable
    snap.store.delete(f"plans/{first.plan_id}")  # plan objects never change: the kept one serves
    assert load_plan(snap.store, snap.manifest, known) is plan
    with pytest.raises(PlanError, match="is missing"):
        load_plan(snap.store, snap.manifest)  # nobody kept it
    second = save_plan(snap.store, snap.manifest, _trace(image, 8), [], 1.0)
    again = load_plan(snap.store, snap.manifest, known)
    assert list(known) == [second.plan_id] and (again == load_plan(snap.store, snap.manifest)).all()


def test_a_server_keeps_its_plan_and_follows_a_new_one(snap, image):
    keeper = PlanKeeper(snap.store, snap.manifest)
    assert keeper.current() is None  # no plan yet: read (waited for) each time
    first = _trace(image, 9)
    save_plan(snap.store, snap.manifest, first, [], 1.0)
    a = keeper.current()
    assert (a == first).all()
    second = save_plan(snap.store, snap.manifest, _trace(image, 10), [], 1.0)
    assert keeper.current() is a  # the known plan at once; the pointer is read again behind it
    assert keeper.wait(30)
    b = keeper.current()
    assert (b == _trace(image, 10)).all()
    assert keeper.wait(30)  # the pointer read current() started, before the store changes under it
    # A pointer to a plan that is gone: the plan is dropped, the next session told why.
    snap.store.delete(f"plans/{second.plan_id}")
    save_plan(snap.store, snap.manifest, _trace(image, 11), [], 1.0)
    snap.store.delete(f"plans/{plan_info(snap.store, snap.manifest).plan_id}")
    assert keeper.current() is b
    assert keeper.wait(30)
    with pytest.raises(PlanError, match="is missing"):
        keeper.current()
