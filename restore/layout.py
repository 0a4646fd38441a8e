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

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .errors import InputError
from .manifest import PAGE_MAP_DTYPE, ZERO_PAGE, Manifest
from .snapshot import DEFAULT_UPLOADS, Progress, Snapshot, _no_progress, write_version
from .workingset import PlanInfo, load_plan, plan_info, save_plan

NO_PAGE = -1  # padding between the hot and the cold chunks


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
    progress(n): n more bytes of the work done, memory_size in all (reading
    the source is the first half, encoding the new chunks the second).
    warm_l2: an L2Cluster that gets every chunk of the new version in every
    zone. Returns the new version, its plan and how many chunks the plan's
    pages lie in, before and after. The source version is not changed.

    The new version is written with snap's codec (the same key) to snap's
    store; the whole memory (memory_size bytes) is held in this process
    while it works. Raises InputError for a missing or empty plan or
    offsets outside the snapshot, PlanError for a damaged stored plan,
    SnapshotExists when the version is taken, and what reading the source
    raises (ChunkError, StoreError).
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

    # The memory, read once (through L1 when the snapshot has one), then
    # gathered into the new order chunk by chunk as the encoders ask.
    memory = np.zeros(m.memory_size, dtype=np.uint8)
    half = m.memory_size // 2
    snap.read_into(memory, workers, lambda n: progress(n * half // m.memory_size))
    pages = memory.reshape(-1, P)
    packed = len(order) * P

    def read(offset: int, view: memoryview) -> None:
        idx = order[offset // P : (offset + len(view)) // P]
        out = np.frombuffer(view, dtype=np.uint8).reshape(-1, P)
        out[idx == NO_PAGE] = 0
        out[idx != NO_PAGE] = pages[idx[idx != NO_PAGE]]

    page_map = np.empty(m.pages, dtype=PAGE_MAP_DTYPE)
    page_map["chunk"] = ZERO_PAGE
    page_map["slot"] = 0
    stored = np.flatnonzero(order != NO_PAGE)
    page_map["chunk"][order[stored]] = stored // slots
    page_map["slot"][order[stored]] = stored % slots

    new = write_version(snap.store, snap.codec, m.name, version, read, packed, m.memory_size, page_map=page_map,
                        workers=workers, uploads=uploads, progress=lambda n: progress(n * (m.memory_size - half) // packed),
                        warm_l2=warm_l2)
    built_from = info.built_from if info else []
    min_share = info.min_share if info else 1.0
    return Optimized(new, save_plan(snap.store, new, plan, built_from, min_share), n_hot, n_src)
