"""Snapshot creation's pipeline (restore.snapshot.write_version): each
encoder hands its object on itself, memory stays bounded whatever the size
of the file, and the first failure stops every thread and is raised.

The bounds are read from what the threads are doing, not from time: the
test waits until every encoder is parked where the pipeline parks it (on
the senders' room, or inside a store's put) and then counts the chunks
read so far. Where a thread waits is counted by the waits themselves (a
semaphore that tallies blocked acquires, a store whose put tallies its
callers), not by walking other threads' frames, which Python 3.11 does not
do safely while they run."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from daemon import Inside, wait_for

from restore.codec import ChunkCodec
from restore.errors import MemoryFileError, StoreError
from restore.snapshot import Snapshot, list_snapshots, write_version
from restore.tiers.durable import DurableStore

CHUNK = 64 * 1024
CHUNKS = 24
SIZE = CHUNK * CHUNKS


def _chunk(index: int) -> bytes:
    """Chunk index of the image: random bytes, no two chunks alike."""
    return np.random.default_rng(index).bytes(CHUNK)


class _Reads:
    """read(offset, view) for write_version, counting the chunks read;
    fail_at: the chunk whose read raises MemoryFileError."""

    def __init__(self, fail_at: int = -1):
        self.count = 0
        self.fail_at = fail_at
        self.lock = threading.Lock()

    def __call__(self, offset: int, view: memoryview) -> None:
        with self.lock:
            self.count += 1
        if offset // CHUNK == self.fail_at:
            raise MemoryFileError(f"memory file shrank at {offset:#x}")
        view[:] = _chunk(offset // CHUNK)


def _kind(thread: threading.Thread) -> str:
    """restore-encode, restore-upload or another thread's name."""
    return thread.name.split("_")[0]


@pytest.fixture
def on_room(monkeypatch):
    """Threads blocked acquiring a threading.Semaphore (the pipeline's room
    for the senders), by kind: Semaphore is replaced, for the test, by one
    that tallies the acquires that have to wait."""
    parked = Inside()

    class Tallied(threading.Semaphore):
        def acquire(self, blocking=True, timeout=None):
            if not blocking:
                return super().acquire(False)
            if super().acquire(False):
                return True
            with parked.entered(_kind(threading.current_thread())):
                return super().acquire(True, timeout)

    monkeypatch.setattr(threading, "Semaphore", Tallied)
    return parked


class _GatedStore(DurableStore):
    """A real store whose chunk puts wait for the gate (or fail once
    fail_after chunks are stored); in_put tallies the threads waiting there."""

    def __init__(self, url: str, s3=None, fail_after: int = -1):
        super().__init__(url, s3)
        self.gate = threading.Event()
        self.fail_after = fail_after
        self.taken = 0  # chunk puts let through
        self.lock = threading.Lock()
        self.in_put = Inside()  # by _kind

    def put(self, key, data, *, create_only=False):
        if key.startswith("chunks/"):
            with self.lock:
                if self.taken == self.fail_after:
                    raise StoreError(f"store {self.url}: put '{key}' failed: connection reset")
                self.taken += 1
            with self.in_put.entered(_kind(threading.current_thread())):
                assert self.gate.wait(60), "the test never opened the gate"
        return super().put(key, data, create_only=create_only)


def _pipeline_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("restore-encode", "restore-upload"))]


def _create(store, reads, workers, uploads):
    """write_version in a thread: (thread, outcome list)."""
    out: list = []

    def run():
        try:
            with ChunkCodec(CHUNK) as codec:
                out.append(write_version(store, codec, "vm", None, reads, SIZE, SIZE, workers=workers,
                                         uploads=uploads))
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t, out


def _check_stored(store, manifest) -> None:
    with Snapshot.open(store, "vm", manifest.version) as snap:
        for i in range(CHUNKS):
            assert bytes(snap.read_chunk(i)) == _chunk(i), f"chunk {i}"


@pytest.mark.parametrize("workers,uploads", [(2, 1), (3, 2)])
def test_a_network_store_holds_at_most_two_objects_per_sender_and_one_per_encoder(s3_server, on_room, workers,
                                                                                  uploads):
    # A prefix of its own: the S3 server keeps objects across tests, and a
    # chunk already there would never be put.
    store = _GatedStore(f"s3://snapshots/pipeline-{workers}-{uploads}", s3_server.options())
    reads = _Reads()
    t, out = _create(store, reads, workers, uploads)
    try:
        wait_for(lambda: on_room("restore-encode") == workers and store.in_put("restore-upload") == uploads,
                 "every encoder waiting for room and every sender in a put")
        # 2 x uploads objects queued or in flight, one more encoded per encoder.
        assert reads.count == 2 * uploads + workers
    finally:
        store.gate.set()
        t.join(60)
    assert not t.is_alive() and not isinstance(out[0], BaseException), out
    assert store.taken == CHUNKS and out[0].uploaded_bytes == SIZE
    _check_stored(store, out[0])
    assert _pipeline_threads() == []


def test_a_local_store_is_written_by_the_encoders_themselves(tmp_path):
    store = _GatedStore(f"file://{tmp_path / 'store'}")
    reads = _Reads()
    t, out = _create(store, reads, workers=3, uploads=16)
    try:
        wait_for(lambda: store.in_put("restore-encode") == 3, "every encoder inside its own put")
        assert reads.count == 3  # nobody reads ahead of its put
        assert sorted(_pipeline_threads()) == [f"restore-encode_{i}" for i in range(3)]  # no senders for a local store
    finally:
        store.gate.set()
        t.join(60)
    assert not t.is_alive() and not isinstance(out[0], BaseException), out
    _check_stored(store, out[0])


def test_a_failed_upload_stops_the_pipeline_and_is_raised(s3_server):
    store = _GatedStore("s3://snapshots/failing", s3_server.options(), fail_after=3)
    store.gate.set()
    t, out = _create(store, _Reads(), workers=2, uploads=2)
    t.join(60)
    assert not t.is_alive()
    assert isinstance(out[0], StoreError) and "connection reset" in str(out[0])
    assert list_snapshots(store) == []  # neither ACTIVE nor a PENDING claim
    assert store.taken == 3 and len(list(store.list("chunks/"))) == 3
    assert _pipeline_threads() == []


def test_a_failed_read_stops_the_pipeline_and_is_raised(tmp_path):
    store = _GatedStore(f"file://{tmp_path / 'store'}")
    store.gate.set()
    reads = _Reads(fail_at=5)
    t, out = _create(store, reads, workers=1, uploads=2)
    t.join(60)
    assert not t.is_alive()
    assert isinstance(out[0], MemoryFileError) and "shrank at 0x50000" in str(out[0])
    assert list_snapshots(store) == []
    assert reads.count == 6  # no chunk is taken after the failing one
    assert _pipeline_threads() == []
