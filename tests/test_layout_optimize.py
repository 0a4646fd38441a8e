"""`restore snapshot optimize`: a working-set-first version holds the same
memory (guests restored from it read exactly the original bytes, for full
sweeps and random traces), puts the plan's pages first in first-touch order,
leaves the source version alone, and is idempotent in content."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections import Counter

import numpy as np
import pytest

from restore.errors import ChunkMissing, InputError
from restore.handler import Server
from restore.settings import ServerSettings
from restore import layout
from restore.layout import NO_PAGE, optimize_snapshot, packed_order
from restore.manifest import PAGE_MAP_DTYPE, ZERO_PAGE
from restore.objects import chunk_key, plan_pointer_key
from restore.snapshot import Snapshot, create_snapshot, list_snapshots, load_manifest
from restore.guest import Guest, reads
from restore.testing import expected_sums
from restore.tiers.durable import DurableStore
from restore.tiers.l1 import L1Cache
from restore.workingset import load_plan, plan_info, save_plan

P = 4096
CHUNK = 64 * 1024
SIZE = 8 << 20


@pytest.fixture(scope="module")
def image(make_image):
    return make_image(SIZE, seed=17)


def _plan(image, seed=2, n=300):
    """A working set: runs of 3 non-zero pages in random order."""
    pages = np.fromfile(image, dtype=np.uint8).reshape(-1, P)
    nonzero = np.flatnonzero(pages.any(axis=1))
    rng = np.random.default_rng(seed)
    starts = rng.choice(nonzero[nonzero < len(pages) - 3], n // 3, replace=False)
    return ((starts[:, None] + np.arange(3)).reshape(-1)).astype(np.uint64) * P


@pytest.fixture(params=[None, b"k" * 32], ids=["plain", "encrypted"])
def snap(request, tmp_path, image):
    store = DurableStore(f"file://{tmp_path}/store")
    create_snapshot(store, image, "fn", chunk_size=CHUNK, key=request.param)
    save_plan(store, load_manifest(store, "fn"), _plan(image), ["s1"], 0.5)
    with Snapshot.open(store, "fn", "1", key=request.param) as s:
        s.test_key = request.param  # for opening the versions it makes
        yield s


def test_optimized_version_puts_the_plan_first_and_keeps_the_bytes(tmp_path, snap, image):
    store = snap.store
    v1_manifest = store.get("snapshots/fn/1/manifest.json")
    v1_pointer = store.get(plan_pointer_key("fn", "1"))
    plan = load_plan(store, snap.manifest)
    opt = optimize_snapshot(snap)
    m = opt.manifest
    assert m.version == "2" and m.memory_size == SIZE and m.page_map is not None
    # The source version is untouched, and the new one carries the plan.
    assert store.get("snapshots/fn/1/manifest.json") == v1_manifest
    assert store.get(plan_pointer_key("fn", "1")) == v1_pointer
    assert (load_plan(store, m) == plan).all() and plan_info(store, m).built_from == ["s1"]

    with Snapshot.open(store, "fn", "2", key=snap.test_key) as v2:
        pm = v2.page_map()
        # Hot chunks: the plan's non-zero pages, in first-touch order, from slot 0.
        pages = np.fromfile(image, dtype=np.uint8).reshape(-1, P)
        _, first = np.unique(plan // P, return_index=True)
        hot = (plan // P)[np.sort(first)].astype(np.int64)
        hot = hot[pages[hot].any(axis=1)]
        pos = pm["chunk"][hot].astype(np.int64) * (CHUNK // P) + pm["slot"][hot]
        assert (pos == np.arange(len(hot))).all()
        assert opt.hot_chunks == -(-len(hot) // (CHUNK // P)) < opt.source_chunks
        # Cold chunks: the rest, in offset order, from the next chunk boundary.
        cold = np.setdiff1d(np.flatnonzero(pages.any(axis=1)), hot)
        cpos = pm["chunk"][cold].astype(np.int64) * (CHUNK // P) + pm["slot"][cold]
        assert cpos[0] == opt.hot_chunks * (CHUNK // P) and (np.diff(cpos) == 1).all()
        assert (pm["chunk"][~pages.any(axis=1)] == ZERO_PAGE).all()
        out = np.zeros(SIZE, dtype=np.uint8)
        v2.read_into(out)
        assert out.tobytes() == image.read_bytes()
        assert v2.verify() == []

        # Real guests restored from it read the original bytes: a full sweep,
        # and a random trace with the plan replayed.
        l1 = L1Cache(tmp_path / "l1")
        sweep = np.arange(0, SIZE, P, dtype=np.uint64)
        trace = np.random.default_rng(5).permutation(SIZE // P)[:800].astype(np.uint64) * P
        with Server(v2, tmp_path / "v2.sock", l1=l1) as server:
            for offsets in (sweep, np.concatenate([plan, trace])):
                with Guest(server.socket_path, memory_size=SIZE) as g:
                    res = g.run(reads(offsets), timeout=60)
                assert (res.sums == expected_sums(image, offsets)).all()


def test_optimizing_twice_writes_nothing_new(snap):
    first = optimize_snapshot(snap)
    with Snapshot.open(snap.store, "fn", first.manifest.version, key=snap.test_key) as v2:
        second = optimize_snapshot(v2, version="again")
        pm2 = v2.page_map()
    assert second.manifest.uploaded_bytes == 0
    assert [c.id for c in second.manifest.chunks] == [c.id for c in first.manifest.chunks]
    assert second.manifest.page_map == first.manifest.page_map
    with Snapshot.open(snap.store, "fn", "again", key=snap.test_key) as v3:
        assert (v3.page_map() == pm2).all()
    assert second.hot_chunks == second.source_chunks == first.hot_chunks


def test_a_replay_on_the_optimized_version_fetches_fewer_chunks(tmp_path, snap, image):
    plan = load_plan(snap.store, snap.manifest)
    opt = optimize_snapshot(snap)
    fetched = {}
    for version in ("1", opt.manifest.version):
        with Snapshot.open(snap.store, "fn", version, key=snap.test_key) as s:
            with Server(s, tmp_path / f"r{version}.sock", ServerSettings(persist_logs=False),
                        l1=L1Cache(tmp_path / f"l1-{version}")) as server:
                with Guest(server.socket_path, memory_size=SIZE) as g:
                    res = g.run(reads(plan), timeout=60)
                assert (res.sums == expected_sums(image, plan)).all()
            deadline = time.monotonic() + 10
            while not server.summaries:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            st = server.summaries[0].stats
            fetched[version] = st.chunks_fetched
    assert fetched[opt.manifest.version] <= opt.hot_chunks < fetched["1"]


def test_bad_plans_are_refused(snap):
    with pytest.raises(InputError, match="is empty"):
        optimize_snapshot(snap, np.zeros(0, dtype=np.uint64))
    with pytest.raises(InputError, match=f"multiples of {P} below {SIZE}"):
        optimize_snapshot(snap, np.array([SIZE], dtype=np.uint64))
    with pytest.raises(InputError, match=f"multiples of {P}"):
        optimize_snapshot(snap, np.array([P + 1], dtype=np.uint64))
    snap.store.delete(plan_pointer_key("fn", "1"))
    with pytest.raises(InputError, match=re.escape("snapshot fn/1 has no plan: record sessions")):
        optimize_snapshot(snap)
    assert [v for v in ("2",) if snap.store.get(f"snapshots/fn/{v}/manifest.json")] == []


def test_cli_optimize(tmp_path, image, run_cli):
    store = f"file://{tmp_path}/cli-store"
    run_cli("snapshot", "create", str(image), "--name", "fn", "--chunk-size", "64K", "--store", store, check=True)
    np.save(tmp_path / "plan.npy", _plan(image))
    out = run_cli("snapshot", "optimize", "fn:1", "--plan", str(tmp_path / "plan.npy"), "--store", store,
                  check=True).stdout
    m = re.match(r"created fn/2 from fn/1, working set first: (\d+) hot chunks, \d+ cold chunks; [\d.]+ \w+ uploaded\n"
                 r"plan [0-9a-f]{16} \(300 pages\) carried over: its pages lie in (\d+) chunks now, (\d+) in fn/1\n", out)
    assert m and int(m[1]) == int(m[2]) < int(m[3]), out
    shown = run_cli("plan", "show", "fn:2", "--store", store, check=True).stdout
    assert re.search(r"pages:\s+300 ", shown) and "offset 0x" in shown
    plan_id = re.search(r"plan:\s+([0-9a-f]{64}) ", shown)[1]
    again = run_cli("snapshot", "optimize", "fn:2", "--store", store, check=True).stdout
    assert "0 B uploaded" in again
    by_id = run_cli("snapshot", "optimize", "fn:1", "--plan", plan_id, "--store", store, check=True).stdout
    assert by_id.startswith("created fn/4 from fn/1")
    (tmp_path / "bad.npy").write_text("not numpy")
    np.save(tmp_path / "neg.npy", np.array([-4096]))
    for args, message in [
        (["--plan", "nope"], "error: plan 'nope' is neither a file nor a plan id (64 hex digits; see `restore plan show`)\n"),
        (["--plan", "0" * 64], f"error: no plan {'0' * 64} in {store}\n"),
        (["--plan", str(tmp_path / "bad.npy")], f"error: plan file {tmp_path / 'bad.npy'} is not a .npy array"),
        (["--plan", str(tmp_path / "neg.npy")], f"error: plan {tmp_path / 'neg.npy'} must be a 1-D array of file offsets"),
    ]:
        r = run_cli("snapshot", "optimize", "fn:1", *args, "--store", store)
        assert r.returncode == 1 and r.stderr.startswith(message), r.stderr
    r = run_cli("snapshot", "optimize", "nope", "--store", store)
    assert r.returncode == 1 and "no snapshot named 'nope'" in r.stderr


# ---------------------------------------------------------------- bounded memory

W = 3  # workers: the cold pass may hold CACHE_PER_WORKER * W decoded source chunks


def _reference(src, plan):
    """What optimize wrote when it held the whole memory: the source read in
    full, its pages put in packed order, each chunk encoded with the
    source's codec. Returns the chunk entries (id, stored length, flags,
    zero bitmap), the page map, the stored bytes' length and the memory."""
    m = src.manifest
    slots = CHUNK // P
    memory = bytearray(m.memory_size)
    src.read_into(memory)
    pages = np.frombuffer(memory, dtype=np.uint8).reshape(-1, P)
    order, _ = packed_order(src.page_map(), (plan // P).astype(np.int64), slots)
    live = np.flatnonzero(order != NO_PAGE)
    stored = np.zeros((len(order), P), dtype=np.uint8)
    stored[live] = pages[order[live]]
    raw = stored.reshape(-1)
    entries = []
    for i in range(0, len(raw), CHUNK):
        e = src.codec.encode(raw[i : i + CHUNK])
        entries.append((e.id, len(e.data), e.flags, e.zero_bitmap))
    page_map = np.zeros(m.pages, dtype=PAGE_MAP_DTYPE)
    page_map["chunk"] = ZERO_PAGE
    page_map["chunk"][order[live]] = live // slots
    page_map["slot"][order[live]] = live % slots
    return entries, page_map, len(raw), bytes(memory)


def _record_decodes(monkeypatch):
    """Every Snapshot.read_chunk from now on, as (version, chunk, pass,
    buffer): the pass is the thread's pool, restore-decode (the first
    pass) or restore-encode (the cold pass, in the encoders); the buffers
    are kept, so distinct ones are the decoded chunks held at once."""
    calls = []
    read_chunk = Snapshot.read_chunk

    def recorded(self, index, out=None, use_l1=True):
        calls.append((self.manifest.version, index, threading.current_thread().name.split("_")[0], out))
        return read_chunk(self, index, out, use_l1)

    monkeypatch.setattr(Snapshot, "read_chunk", recorded)
    return calls


@pytest.mark.parametrize("source", ["identity", "optimized", "optimized, cache only"])
def test_bounded_optimize_writes_what_the_whole_memory_gave(snap, image, monkeypatch, source):
    """The version optimize writes from a bounded number of decoded chunks
    is the one it wrote from the whole memory: the same chunks (ids,
    lengths, flags, zero bitmaps), page map and bytes, from an identity
    source and from an optimized one (page-mapped: its old hot chunks feed
    cold pages all over, gathered up front or, with GATHER_LIMIT 0, through
    the cache). Each source chunk is decoded once per pass from an identity
    source, and the cold pass never holds more than its cache's chunks."""
    store, key = snap.store, snap.test_key
    pages = np.fromfile(image, dtype=np.uint8).reshape(-1, P)
    zero = np.flatnonzero(~pages.any(axis=1))
    runs = _plan(image, seed=3)  # another working set than the stored plan's
    plan = np.concatenate([runs, zero[::40] * P, runs[:7]]).astype(np.uint64)  # zero pages, repeats
    with contextlib.ExitStack() as opened:
        src = snap
        if source != "identity":
            optimize_snapshot(snap, version="A")  # with the stored plan
            src = opened.enter_context(Snapshot.open(store, "fn", "A", key=key))
            assert src.manifest.page_map is not None
        if source.endswith("cache only"):
            monkeypatch.setattr(layout, "GATHER_LIMIT", 0)
        entries, page_map, packed, memory = _reference(src, plan)
        assert packed % CHUNK and len(zero) > 40 and memory == image.read_bytes()
        calls = _record_decodes(monkeypatch)
        done = []
        opt = optimize_snapshot(src, plan, "B", workers=W, progress=done.append)
        calls = list(calls)  # optimize's; not the reads below
        assert opt.source_chunks > 3 * opt.hot_chunks  # the plan's pages lie all over the source
        assert [(c.id, c.stored_len, c.flags, c.zero) for c in opt.manifest.chunks] == entries
        assert sum(done) == SIZE and min(done) >= 0
        with Snapshot.open(store, "fn", "B", key=key) as new:
            assert (new.page_map() == page_map).all()
            out = bytearray(SIZE)
            new.read_into(out)
            assert out == memory

    version = src.manifest.version
    assert {(v, who) for v, _, who, _ in calls} <= {(version, "restore-decode"), (version, "restore-encode")}
    first = Counter(c for _, c, who, _ in calls if who == "restore-decode")
    cold = Counter(c for _, c, who, _ in calls if who == "restore-encode")
    held = {id(buf) for _, _, who, buf in calls if who == "restore-encode"}
    assert max(first.values()) == 1
    assert 0 < len(held) <= layout.CACHE_PER_WORKER * W
    if source == "identity":
        chunk = src.page_map()["chunk"]
        hot = np.zeros(len(chunk), dtype=bool)
        hot[(plan // P).astype(np.int64)] = True
        assert set(first) == set(chunk[hot & (chunk != ZERO_PAGE)].tolist())
        assert max(cold.values()) == 1
        assert set(cold) == set(chunk[~hot & (chunk != ZERO_PAGE)].tolist())
    elif source == "optimized":
        # A chunk the cold chunks need more than twice was gathered up front,
        # so the cache is asked for the others at most twice each.
        assert max((first + cold).values()) <= 3


@pytest.mark.parametrize("holds", ["plan pages", "cold pages only"])
def test_a_missing_source_chunk_fails_optimize_and_leaves_no_version(snap, image, holds):
    """A source chunk that cannot be read fails optimize with ChunkMissing,
    whether the first pass or the encoders (through the cache, where other
    threads may wait for it) ask for it; no version is left behind."""
    plan = load_plan(snap.store, snap.manifest)
    chunk = snap.page_map()["chunk"]
    planned = set(chunk[(plan // P).astype(np.int64)].tolist())
    ids = [c.id for c in snap.manifest.chunks]
    bad = next(i for i, c in enumerate(ids) if c and (i in planned) == (holds == "plan pages")
               and ids.count(c) == 1 and (chunk == i).any())
    snap.store.delete(chunk_key(ids[bad]))
    with pytest.raises(ChunkMissing, match=f"snapshot fn/1 chunk {bad} at offset"):
        optimize_snapshot(snap, workers=W)
    assert [r.version for r in list_snapshots(snap.store, "fn")] == ["1"]
