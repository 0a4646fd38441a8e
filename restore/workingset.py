"""Working-set plans: what a restore should prefetch, in what order.

A plan is built from the fault logs of earlier sessions (first touches, in
time order) and lists memory-file page offsets in the order the guest is
expected to touch them. With several logs, a page is kept when it was
touched in at least ``min_share`` of them, and pages are ordered by their
median first-touch rank, so one unusual session cannot inflate the plan
to the whole VM.

Storage, beside the snapshot (the manifest itself is immutable):

    plans/<sha256 hex>                        the plan: a .npy array of
                                              uint64 file offsets, in order
    snapshots/<name>/<version>/plan.json      the pointer: which plan object
                                              is current, for which snapshot
                                              geometry, built from which sessions

A new plan is a new object plus a rewritten pointer; chunks are never
touched. A pointer naming another snapshot (name, version or geometry) is
refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional, Sequence

import numpy as np

from .errors import InputError, ManifestError, RestoreError
from .manifest import Manifest
from .faultlog import load_fault_log, parse_npy
from .objects import plan_key, plan_pointer_key, session_ids, session_key
from .threads import spawn
from .tiers.durable import DurableStore

log = logging.getLogger("restore.workingset")

PLAN_FORMAT = "restore-plan"
DEFAULT_MIN_SHARE = 0.5


class PlanError(ManifestError):
    """A plan or its pointer is missing, damaged, or for another snapshot."""


def build_plan(logs: Sequence[np.ndarray], min_share: float = DEFAULT_MIN_SHARE) -> np.ndarray:
    """Merge fault logs (LOG_DTYPE, each in first-touch order) into a plan:
    uint64 file offsets touched in at least min_share of the logs, ordered
    by median first-touch rank (ties by offset).

    A page is kept when it appears in at least ceil(min_share * n) of the n
    non-empty logs; a log's rank of a page is its position in the log
    sorted by t_ns. Returns a new array (empty when every log is). Raises
    InputError when min_share is not within (0, 1]."""
    if not 0 < min_share <= 1:
        raise InputError(f"min_share {min_share} is not within (0, 1]")
    logs = [np.sort(log, order="t_ns", kind="stable") for log in logs if len(log)]
    if not logs:
        return np.zeros(0, dtype=np.uint64)
    offsets = np.concatenate([log["offset"] for log in logs]).astype(np.uint64)
    ranks = np.concatenate([np.arange(len(log), dtype=np.float64) for log in logs])
    pages, inverse = np.unique(offsets, return_inverse=True)
    order = np.lexsort((ranks, inverse))  # by page, then rank
    sorted_ranks = ranks[order]
    counts = np.bincount(inverse, minlength=len(pages))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    median = (sorted_ranks[starts + (counts - 1) // 2] + sorted_ranks[starts + counts // 2]) / 2
    keep = counts >= math.ceil(min_share * len(logs) - 1e-9)
    kept, med = pages[keep], median[keep]
    return kept[np.lexsort((kept, med))]


@dataclass(frozen=True)
class PlanInfo:
    """The current plan of a snapshot version, as its pointer describes it."""

    plan_id: str
    pages: int
    built_from: list[str]
    min_share: float
    created: str


def save_plan(store: DurableStore, manifest: Manifest, plan: np.ndarray, built_from: Sequence[str],
              min_share: float) -> PlanInfo:
    """Store plan as a new object and point the snapshot version at it.

    plan: file offsets in bytes (multiples of the page size, below
    memory_size), in order. built_from: the session ids it was merged from;
    min_share: the threshold used (both recorded in the pointer). The plan
    object is plans/<sha256 of its .npy bytes>, written once; the pointer
    is overwritten. Raises PlanError for offsets outside the snapshot,
    StoreError when the store fails."""
    plan = np.ascontiguousarray(plan, dtype=np.uint64)
    _check_offsets(plan, manifest, "new plan")
    buf = io.BytesIO()
    np.save(buf, plan, allow_pickle=False)
    data = buf.getvalue()
    plan_id = hashlib.sha256(data).hexdigest()
    store.put_new(plan_key(plan_id), data)
    info = PlanInfo(plan_id, len(plan), list(built_from), min_share,
                    datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    pointer = {
        "format": PLAN_FORMAT,
        "format_version": "1.0",
        "snapshot": {"name": manifest.name, "version": manifest.version, "memory_size": manifest.memory_size,
                     "chunk_size": manifest.chunk_size, "page_size": manifest.page_size},
        "plan": {"id": plan_id, "pages": len(plan)},
        "built_from": info.built_from,
        "min_share": min_share,
        "created": info.created,
    }
    store.put(plan_pointer_key(manifest.name, manifest.version), (json.dumps(pointer, indent=1) + "\n").encode())
    return info


def plan_info(store: DurableStore, manifest: Manifest) -> Optional[PlanInfo]:
    """The pointer of the snapshot's current plan, checked; None if none.

    Raises PlanError when the pointer is damaged or names another snapshot
    (name, version, memory, chunk or page size), StoreError when the store
    fails."""
    key = plan_pointer_key(manifest.name, manifest.version)
    data = store.get(key)
    if data is None:
        return None
    where = f"{store.url}/{key}"
    try:
        doc = json.loads(data)
        snap, plan = doc["snapshot"], doc["plan"]
        if doc.get("format") != PLAN_FORMAT:
            raise PlanError(f"plan pointer {where} is not a restore plan pointer")
        ident = (snap["name"], snap["version"], snap["memory_size"], snap["chunk_size"], snap["page_size"])
        info = PlanInfo(str(plan["id"]), int(plan["pages"]), list(doc.get("built_from", [])),
                        float(doc.get("min_share", DEFAULT_MIN_SHARE)), str(doc.get("created", "")))
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
        raise PlanError(f"plan pointer {where} is damaged: {exc!r}") from None
    want = (manifest.name, manifest.version, manifest.memory_size, manifest.chunk_size, manifest.page_size)
    if ident != want:
        raise PlanError(
            f"plan pointer {where} is for snapshot {ident[0]}/{ident[1]} "
            f"({ident[2]} bytes, {ident[3]}-byte chunks), not {want[0]}/{want[1]} "
            f"({want[2]} bytes, {want[3]}-byte chunks)"
        )
    return info


def load_plan(store: DurableStore, manifest: Manifest, known: Optional[dict[str, np.ndarray]] = None
              ) -> Optional[np.ndarray]:
    """The snapshot's current plan (uint64 file offsets, bytes), or None.

    known: plans already read, by id, kept by the caller (a server, for its
    sessions): a plan object never changes (its key is its SHA-256), so only
    the pointer is read again when the pointer names a known plan; the plan
    read last is kept there in place of the others.

    Raises PlanError when the pointer or the plan object is missing,
    damaged, not its id's bytes, or does not fit the snapshot; StoreError
    when the store fails."""
    info = plan_info(store, manifest)
    if info is None:
        return None
    if known is not None and info.plan_id in known:
        return known[info.plan_id]
    key = plan_key(info.plan_id)
    data = store.get(key)
    if data is None:
        raise PlanError(f"plan {store.url}/{key} is missing")
    if hashlib.sha256(data).hexdigest() != info.plan_id:
        raise PlanError(f"plan {store.url}/{key}: SHA-256 of its bytes is not its id")
    plan = parse_npy(data, f"plan {store.url}/{key}", PlanError)
    if plan.dtype != np.uint64 or plan.ndim != 1:
        raise PlanError(f"plan {store.url}/{key} has dtype {plan.dtype}, shape {plan.shape}")
    _check_offsets(plan, manifest, f"plan {store.url}/{key}")
    if known is not None:
        plan.flags.writeable = False  # shared by the sessions that read it
        known.clear()
        known[info.plan_id] = plan
    return plan


class PlanKeeper:
    """A version's current plan as a server keeps it for its sessions.

    The plan is read from the store in the background, once when the keeper
    is made (with the version, as the manifest is read when the server opens
    it) and again whenever refresh() is called; a session then starts with
    the plan known at once, without a round trip to the durable tier on the
    way to its first fault. current() returns the known plan and checks the
    pointer again in the background, so a plan made by another process is
    used from the session after the one that started when it was made.
    Without a known plan, current() waits for a read (the one under way, or
    a new one) and raises its error.
    """

    def __init__(self, store: DurableStore, manifest: Manifest):
        self._store = store
        self._manifest = manifest
        self._known: dict[str, np.ndarray] = {}  # load_plan's, touched by the one read under way
        self._lock = threading.Lock()
        self._plan: Optional[np.ndarray] = None
        self._error: Optional[RestoreError] = None  # the last read's
        self._reading: Optional[threading.Event] = None  # set when the read under way ends
        self._again = False  # refresh() was called during the read under way
        self.refresh()

    def refresh(self) -> None:
        """Read the pointer (and a plan not read yet) in the background; if
        a read is under way, read again after it."""
        with self._lock:
            if self._reading is not None:
                self._again = True
                return
            self._reading = done = threading.Event()
            self._again = False
        spawn(self._read, done)

    def _read(self, done: threading.Event) -> None:
        while True:
            plan, error = None, None
            try:
                plan = load_plan(self._store, self._manifest, self._known)
            except RestoreError as exc:
                error = exc
                log.debug("%s/%s: reading its plan: %s", self._manifest.name, self._manifest.version, exc)
            with self._lock:
                # A store that failed leaves the known plan as it was; a plan
                # that is gone or bad is not used again.
                if error is None or isinstance(error, PlanError):
                    self._plan = plan
                self._error = error
                if not self._again:
                    self._reading = None
                    break
                self._again = False
        done.set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for the read under way, if any; False if it is still going."""
        with self._lock:
            reading = self._reading
        return reading is None or reading.wait(timeout)

    def current(self) -> Optional[np.ndarray]:
        """The plan for a session starting now (None: the version has none).
        Raises PlanError or StoreError when there is no known plan and
        reading it failed."""
        with self._lock:
            plan, reading = self._plan, self._reading
        if plan is not None:
            self.refresh()  # for the next session
            return plan
        if reading is None:
            self.refresh()
        self.wait()  # the read under way, or the one just started
        with self._lock:
            if self._plan is None and self._error is not None:
                raise self._error
            return self._plan


def _check_offsets(plan: np.ndarray, manifest: Manifest, where: str) -> None:
    if len(plan) and ((plan % manifest.page_size).any() or plan.max() >= manifest.memory_size):
        raise PlanError(f"{where}: offsets must be multiples of {manifest.page_size} below {manifest.memory_size}")


def rebuild_plan(store: DurableStore, manifest: Manifest, sessions: int = 5,
                 min_share: float = DEFAULT_MIN_SHARE) -> PlanInfo:
    """Build a plan from the last `sessions` fault logs and make it current.

    Returns the new pointer's PlanInfo. Raises InputError when the version
    has no saved sessions (or min_share is out of range), InputError naming
    the log when a fault log is damaged, StoreError when the store fails."""
    ids = session_ids(store, manifest.name, manifest.version)[-sessions:]
    if not ids:
        raise InputError(f"snapshot {manifest.name}/{manifest.version} has no recorded sessions to build a plan from")
    logs = []
    for sid in ids:
        key = session_key(manifest.name, manifest.version, sid)
        data = store.get(key)
        if data is not None:
            logs.append(load_fault_log(data, f"{store.url}/{key}"))
    return save_plan(store, manifest, build_plan(logs, min_share), ids, min_share)


PLAN_READ_TIMEOUT = 30.0  # seconds a rebuilt plan's read may hold up the end of the session that rebuilt it


@dataclass(frozen=True)
class SessionPlan:
    """What PlanPolicy.choose() gives a session: the plan it replays (None:
    none), the plan it audits instead (None: no audit; then plan is None)
    and its fault-around."""

    plan: Optional[np.ndarray]
    audited: Optional[np.ndarray]
    fault_around: int


class PlanPolicy:
    """Which plan each session of a server replays, which sessions audit it,
    and when it is rebuilt (the settings are restore.settings.ServerSettings').

    use_plan: replay the version's plan (kept by a PlanKeeper, read in the
    background). A session without a plan records with record_fault_around
    (None: fault_around). Every audit_every-th session that would replay the
    plan audits it instead: no prefetch, fault-around 1, so every first
    touch is seen and the plan can be scored. Every rebuild_after recorded
    sessions, the plan is rebuilt from the last `sessions` fault logs (so the
    plan follows the function as it changes) and read before the next
    session. A plan that cannot be read or rebuilt costs speed, never
    correctness: it is logged and the session runs without.
    """

    def __init__(self, store: DurableStore, manifest: Manifest, *, fault_around: int,
                 record_fault_around: Optional[int] = None, use_plan: bool = True,
                 rebuild_after: Optional[int] = None, sessions: int = 5, audit_every: Optional[int] = None):
        self._store = store
        self._manifest = manifest
        self._label = f"{manifest.name}/{manifest.version}"
        self._fault_around = fault_around
        self._record_fault_around = record_fault_around
        self._rebuild_after = rebuild_after
        self._sessions = sessions
        self._audit_every = audit_every
        self._keeper = PlanKeeper(store, manifest) if use_plan else None
        self._lock = threading.Lock()
        self._with_plan = 0  # sessions that found a plan (audits counted)
        self._since_rebuild = 0  # sessions recorded since the plan was rebuilt

    def choose(self) -> SessionPlan:
        """The plan, audit and fault-around of a session starting now."""
        plan = None
        if self._keeper is not None:
            try:
                plan = self._keeper.current()
            except RestoreError as exc:
                log.error("%s: not using its plan: %s", self._label, exc)
        audited = None
        if plan is not None and self._audit_every:
            with self._lock:
                self._with_plan += 1
                if self._with_plan % self._audit_every == 0:
                    audited, plan = plan, None
        if audited is not None:
            return SessionPlan(None, audited, 1)
        if plan is None and self._record_fault_around:
            return SessionPlan(None, None, self._record_fault_around)
        return SessionPlan(plan, None, self._fault_around)

    def session_ended(self, recorded: bool) -> None:
        """A session ended (recorded: its fault log was saved); rebuild the
        plan when it is time."""
        if not recorded or not self._rebuild_after:
            return
        with self._lock:
            self._since_rebuild += 1
            if self._since_rebuild < self._rebuild_after:
                return
            self._since_rebuild = 0
        try:
            info = rebuild_plan(self._store, self._manifest, self._sessions)
            log.info("%s: rebuilt its plan from %d sessions: %d pages", self._label, len(info.built_from), info.pages)
            if self._keeper is not None:  # read now (the session is over), for the next session
                self._keeper.refresh()
                self._keeper.wait(PLAN_READ_TIMEOUT)
        except RestoreError as exc:
            log.error("%s: could not rebuild its plan: %s", self._label, exc)
