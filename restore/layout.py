"""Working-set-first layout: `restore snapshot optimize`.

A function's faulting pages form runs of a few pages scattered over its
memory, so with chunks cut in offset order nearly every chunk holds a few
pages of the working set, and a restore must fetch and decode almost all of
them. An optimized version keeps the same memory (the same bytes at the same
file offsets) but stores it through a page map:

    hot chunks    the plan's pages, in first-touch order, packed from chunk 0
    cold chunks   every other non-zero page, in offset order, from the next
                  chunk boundary

so a restore that replays the plan fetches the few hot chunks first and most
of the cold ones never. The plan itself is a list of file offsets, which do
not move, so the new version carries the same plan. Chunks are
content-addressed: whatever the new layout shares with stored chunks is not
uploaded again, and optimizing an optimized version with its own plan
writes nothing new.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .errors import InputError
from .manifest import PAGE_MAP_DTYPE, ZERO_PAGE, Manifest
from .snapshot import DEFAULT_UPLOADS, Progress, Snapshot, _no_progress, by_chunk, chunk_pages, write_version
from .workingset import PlanInfo, load_plan, plan_info, save_plan

NO_PAGE = -1  # padding between the hot and the cold chunks
CACHE_PER_WORKER = 6  # decoded source chunks the cold pages are copied from, per worker
GATHER_LIMIT = 256 << 20  # bytes of scattered cold pages gathered up front (_scattered)


def packed_order(page_map: np.ndarray, plan_pages: np.ndarray, slots: int) -> tuple[np.ndarray, int]:
    """The stored order of the pages: (page index per stored slot, NO_PAGE
    for padding; the number of hot chunks). page_map: the source's
    PAGE_MAP_DTYPE map (zero pages are left out). plan_pages: page indices
    in first-touch order (repeats and zero pages are skipped). slots: pages
    per chunk. Hot pages fill whole chunks from slot 0; cold pages follow
    in page order from the next chunk boundary."""
    nonzero = page_map["chunk"] != ZERO_PAGE
    _, first = np.unique(plan_pages, return_index=True)
    hot = plan_pages[np.sort(first)]
    hot = hot[nonzero[hot]]
    is_hot = np.zeros(len(page_map), dtype=bool)
    is_hot[hot] = True
    cold = np.flatnonzero(nonzero & ~is_hot)
    n_hot = -(-len(hot) // slots)
    pad = np.full(n_hot * slots - len(hot), NO_PAGE, dtype=np.int64)
    return np.concatenate([hot.astype(np.int64), pad, cold.astype(np.int64)]), n_hot


@dataclass(frozen=True)
class Optimized:
    """What optimize_snapshot wrote."""

    manifest: Manifest  # the new version
    plan: PlanInfo  # its plan (the same offsets)
    hot_chunks: int  # chunks holding the plan's pages now
    source_chunks: int  # chunks holding the plan's pages in the source version


def optimize_snapshot(
    snap: Snapshot,
    plan: Optional[np.ndarray] = None,
    version: Optional[str] = None,
    *,
    workers: Optional[int] = None,
    uploads: int = DEFAULT_UPLOADS,
    progress: Progress = _no_progress,
    warm_l2=None,
) -> Optimized:
    """Write a working-set-first version of snap (see the module text).

    plan: file offsets in first-touch order (default: the snapshot's current
    plan). version: the new version's name (default: the next integer).
    progress(n): n more bytes of the work done, memory_size in all (shared
    between gathering the plan's pages, a chunk's worth per source chunk
    decoded, and writing the new chunks, a byte per byte encoded).
    warm_l2: an L2Cluster that gets every chunk of the new version in every
    zone. Returns the new version, its plan and how many chunks the plan's
    pages lie in, before and after. The source version is not changed.

    The new version is written with snap's codec (the same key) to snap's
    store. Memory stays bounded, not memory_size: this process holds the
    plan's non-zero pages (page_size bytes each); the cold pages of source
    chunks that the cold chunks would need far apart (an optimized source's
    hot chunks; none with the identity layout), up to GATHER_LIMIT bytes;
    up to CACHE_PER_WORKER decoded source chunks per worker; and the chunks
    the encoders have in flight. With the identity layout each source
    chunk is decoded once, and once more if it holds plan pages.

    Raises InputError for a missing or empty plan or offsets outside the
    snapshot, PlanError for a damaged stored plan, SnapshotExists when the
    version is taken, and what reading the source raises (ChunkError,
    StoreError).
    """
    m = snap.manifest
    info = None
    if plan is None:
        info = plan_info(snap.store, m)
        plan = load_plan(snap.store, m)
        if plan is None:
            raise InputError(
                f"snapshot {snap.label} has no plan: record sessions and run `restore plan build`, or give a plan"
            )
    plan = np.asarray(plan, dtype=np.uint64)
    if len(plan) == 0:
        raise InputError(f"the plan for {snap.label} is empty: there is no working set to put first")
    if ((plan % m.page_size) != 0).any() or int(plan.max()) >= m.memory_size:
        raise InputError(f"plan offsets must be multiples of {m.page_size} below {m.memory_size}")
    P, slots = m.page_size, m.chunk_size // m.page_size
    plan_pages = (plan // np.uint64(P)).astype(np.int64)
    src_map = snap.page_map()
    order, n_hot = packed_order(src_map, plan_pages, slots)
    src_chunks = src_map["chunk"][plan_pages]
    n_src = len(np.unique(src_chunks[src_chunks != ZERO_PAGE]))

    # First pass: gather the hot pages, and the cold pages of source chunks
    # that the cold chunks would need far apart (an optimized source's hot
    # chunks; an identity layout has none), decoding each source chunk once.
    # Then the encoders copy the other cold pages from source chunks decoded
    # as they ask, through a bounded cache. Progress counts a chunk_size per
    # source chunk the first pass decodes, then the bytes encoded.
    w = workers or os.cpu_count() or 1
    hot = order[: n_hot * slots]
    hot = hot[hot != NO_PAGE]
    cold = order[n_hot * slots :]
    cold_chunk = src_map["chunk"][cold]
    uses = _uses(cold_chunk, slots, len(m.chunks))
    early = _scattered(uses, np.bincount(cold_chunk, minlength=len(m.chunks)), GATHER_LIMIT // P)
    uses[early] = 0
    early_at = np.flatnonzero(early[cold_chunk])  # their positions in cold
    first = src_map[np.concatenate([hot, cold[early_at]])]
    packed = len(order) * P
    work = len(np.unique(first["chunk"])) * m.chunk_size + packed
    advance = _scaled(progress, m.memory_size, work or 1)
    gathered = np.zeros((len(first), P), dtype=np.uint8)  # hot pages, then early_at's
    snap.decode_pages(first, gathered.__setitem__, w, lambda n: advance(m.chunk_size))
    cache = _ChunkCache(snap, CACHE_PER_WORKER * w, uses.tolist())

    def read(offset: int, view: memoryview) -> None:
        out = np.frombuffer(view, dtype=np.uint8).reshape(-1, P)
        at = offset // P - n_hot * slots  # position in cold
        if at < 0:  # a hot chunk (they hold no cold page)
            rows = gathered[offset // P : min(offset // P + len(out), len(hot))]
            out[: len(rows)] = rows
            out[len(rows) :] = 0
            return
        lo, hi = np.searchsorted(early_at, [at, at + len(out)])
        out[early_at[lo:hi] - at] = gathered[len(hot) + lo : len(hot) + hi]
        where = src_map[cold[at : at + len(out)]]
        rest = np.flatnonzero(~early[where["chunk"]])
        for c, rows in by_chunk(where[rest]):
            rows = rest[rows]
            buf = cache.get(c)
            try:
                out[rows] = chunk_pages(buf, m)[where["slot"][rows]]
            finally:
                cache.release(c)

    page_map = np.empty(m.pages, dtype=PAGE_MAP_DTYPE)
    page_map["chunk"] = ZERO_PAGE
    page_map["slot"] = 0
    stored = np.flatnonzero(order != NO_PAGE)
    page_map["chunk"][order[stored]] = stored // slots
    page_map["slot"][order[stored]] = stored % slots

    new = write_version(snap.store, snap.codec, m.name, version, read, packed, m.memory_size, page_map=page_map,
                        workers=w, uploads=uploads, progress=advance, warm_l2=warm_l2)
    if not work:  # nothing to read or encode: the memory is all zero
        progress(m.memory_size)
    built_from = info.built_from if info else []
    min_share = info.min_share if info else 1.0
    return Optimized(new, save_plan(snap.store, new, plan, built_from, min_share), n_hot, n_src)


def _scaled(progress: Progress, total: int, work: int) -> Callable[[int], None]:
    """A progress callback for `work` units of work that passes progress
    the share of total done so far (the calls add up to total exactly)."""
    done = reported = 0

    def advance(n: int) -> None:
        nonlocal done, reported
        done += n
        now = total * done // work
        progress(now - reported)
        reported = now

    return advance


def _uses(chunk_of: np.ndarray, slots: int, n_chunks: int) -> np.ndarray:
    """For each source chunk, how many stored chunks of slots pages need it,
    when the k-th stored page is held by source chunk chunk_of[k]."""
    key = np.arange(len(chunk_of), dtype=np.int64)  # (stored chunk, source chunk), in place
    key //= slots
    key *= n_chunks
    key += chunk_of
    key.sort()
    distinct = np.ones(len(key), dtype=bool)
    distinct[1:] = key[1:] != key[:-1]
    return np.bincount(key[distinct] % n_chunks, minlength=n_chunks)


def _scattered(uses: np.ndarray, pages: np.ndarray, limit: int) -> np.ndarray:
    """A bool per source chunk: True for those needed by more than two
    stored chunks (uses; with the identity layout, cold pages in page order
    take a source chunk's pages into two stored chunks at most), most
    needed first, while their pages (pages per chunk) add up to at most
    limit."""
    many = np.flatnonzero(uses > 2)
    many = many[np.argsort(-uses[many], kind="stable")]
    chosen = np.zeros(len(uses), dtype=bool)
    chosen[many[np.cumsum(pages[many]) <= limit]] = True
    return chosen


class _ChunkCache:
    """Decoded source chunks, at most size of them at once (more only if
    size or more threads hold one each). uses[c]: how many more times
    chunk c will be asked for; an entry goes once the last of them has
    released it, and otherwise the least recently used entry that no
    thread holds makes room. A chunk in the cache is decoded once: a thread
    that asks for a chunk another thread is decoding waits for it."""

    def __init__(self, snap: Snapshot, size: int, uses: list[int]):
        self.snap, self.size, self.uses = snap, size, uses
        self.entries: OrderedDict[int, list] = OrderedDict()  # chunk -> [buffer, holders, decoded (Future)]
        self.spare: list[bytearray] = []  # buffers of entries that went
        self.lock = threading.Lock()

    def get(self, c: int) -> bytearray:
        """Chunk c decoded (hold it until release(c)); raises what
        Snapshot.read_chunk raises."""
        with self.lock:
            entry = self.entries.get(c)
            decode = entry is None
            if decode:
                if len(self.entries) >= self.size:
                    idle = next((k for k, e in self.entries.items() if e[1] == 0), None)
                    if idle is not None:
                        self.spare.append(self.entries.pop(idle)[0])
                buf = self.spare.pop() if self.spare else bytearray(self.snap.manifest.chunk_size)
                entry = self.entries[c] = [buf, 0, Future()]
            entry[1] += 1
            self.entries.move_to_end(c)
        if decode:
            try:
                self.snap.read_chunk(c, entry[0])
            except BaseException as exc:
                with self.lock:
                    del self.entries[c]
                entry[2].set_exception(exc)
                raise
            entry[2].set_result(None)
        entry[2].result()
        return entry[0]

    def release(self, c: int) -> None:
        with self.lock:
            entry = self.entries[c]
            entry[1] -= 1
            self.uses[c] -= 1
            if self.uses[c] == 0:
                self.spare.append(self.entries.pop(c)[0])
