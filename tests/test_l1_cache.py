"""L1 cache: layout, verification, LRU eviction, restarts, several threads and processes."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import re
import threading
import time
import traceback
from pathlib import Path

import pytest

from restore.errors import ChunkHashMismatch, InputError
from restore.tiers.l1 import DEFAULT_BUDGET, L1Cache

SIZE = 1000  # bytes per chunk in the LRU tests


def chunk(seed: int, size: int = SIZE) -> tuple[str, bytes]:
    """A deterministic chunk of size bytes and its id."""
    data = random.Random(seed).randbytes(size)
    return hashlib.sha256(data).hexdigest(), data


def entry_files(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("??/*") if not p.name.startswith("."))


def temp_files(root: Path) -> list[Path]:
    return sorted(root.glob("??/.tmp-*"))


def fill_with_ages(cache: L1Cache, seeds: range) -> list[str]:
    """Put one chunk per seed, the first the oldest (mtime 1000 s, 2000 s, ...)."""
    ids = []
    for i, seed in enumerate(seeds):
        cid, data = chunk(seed)
        cache.put(cid, data)
        os.utime(cache.path(cid), (1000.0 * (i + 1), 1000.0 * (i + 1)))
        ids.append(cid)
    return ids


def test_round_trip_and_layout(tmp_path: Path) -> None:
    cache = L1Cache(tmp_path / "a" / "b")
    cid, data = chunk(1)
    assert cache.get(cid) is None
    assert not cache.contains(cid)
    cache.put(cid, memoryview(data))
    assert cache.get(cid) == data
    assert cache.contains(cid)
    where = tmp_path / "a" / "b" / cid[:2] / cid
    assert cache.path(cid) == where
    assert where.read_bytes() == data
    assert entry_files(tmp_path / "a" / "b") == [where]
    assert temp_files(tmp_path / "a" / "b") == []
    assert (tmp_path / "a" / "b").stat().st_mode & 0o777 == 0o700
    assert cache.budget_bytes == DEFAULT_BUDGET == 8 << 30
    assert cache.usage() == SIZE and len(cache) == 1
    assert cache.discard(cid) is True
    assert cache.discard(cid) is False
    assert cache.get(cid) is None and cache.usage() == 0


def test_round_trip_with_fsync(tmp_path: Path) -> None:
    cache = L1Cache(tmp_path, fsync=True)
    cid, data = chunk(2)
    cache.put(cid, data)
    assert cache.get(cid) == data


def test_put_with_wrong_id_raises(tmp_path: Path) -> None:
    cache = L1Cache(tmp_path)
    cid, _ = chunk(1)
    other = b"not the chunk"
    actual = hashlib.sha256(other).hexdigest()
    msg = f"chunk {cid}: SHA-256 of the 13 bytes given is {actual}, not the chunk id"
    with pytest.raises(ChunkHashMismatch, match=re.escape(msg)):
        cache.put(cid, other)
    assert entry_files(tmp_path) == [] and temp_files(tmp_path) == []


@pytest.mark.parametrize(
    "bad, shown",
    [
        ("../../etc/passwd", "'../../etc/passwd'"),
        ("A" * 64, "'" + "A" * 64 + "'"),
        ("a" * 63, "'" + "a" * 63 + "'"),
        ("a" * 64 + "\n", "'" + "a" * 64 + "\\n'"),
        ("f" * 200, "'" + "f" * 76 + "..."),
        (b"a" * 64, "b'" + "a" * 64 + "'"),
    ],
)
def test_invalid_id_raises(tmp_path: Path, bad: object, shown: str) -> None:
    cache = L1Cache(tmp_path)
    msg = f"invalid chunk id {shown}: a chunk id is 64 lowercase hex characters (SHA-256)"
    for call in (cache.get, cache.contains, cache.path, cache.discard,
                 lambda c: cache.put(c, b"x")):
        with pytest.raises(InputError, match=f"^{re.escape(msg)}$"):
            call(bad)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("budget", [0, -1])
def test_nonpositive_budget_raises(tmp_path: Path, budget: int) -> None:
    msg = f"L1 cache budget_bytes must be a positive number of bytes, got {budget}"
    with pytest.raises(InputError, match=re.escape(msg)):
        L1Cache(tmp_path, budget_bytes=budget)


def test_negative_evict_target_raises(tmp_path: Path) -> None:
    msg = "L1 cache eviction target must be >= 0 bytes, got -1"
    with pytest.raises(InputError, match=re.escape(msg)):
        L1Cache(tmp_path).evict(-1)


def test_corrupted_file_is_a_miss_and_removed(tmp_path: Path) -> None:
    cache = L1Cache(tmp_path)
    cid, data = chunk(1)
    cache.put(cid, data)
    cache.path(cid).write_bytes(bytes(b ^ 0xFF for b in data))  # same length, wrong bytes
    assert cache.get(cid) is None
    assert not cache.path(cid).exists()
    assert cache.usage() == 0


def test_put_replaces_a_truncated_file(tmp_path: Path) -> None:
    cache = L1Cache(tmp_path)
    cid, data = chunk(1)
    cache.put(cid, data)
    cache.path(cid).write_bytes(data[:10])  # as a crash without fsync can leave it
    cache.put(cid, data)
    assert cache.path(cid).read_bytes() == data
    assert cache.get(cid) == data


def test_put_of_present_id_refreshes_lru_time(tmp_path: Path) -> None:
    cache = L1Cache(tmp_path)
    cid, data = chunk(1)
    cache.put(cid, data)
    os.utime(cache.path(cid), (1000.0, 1000.0))
    cache.put(cid, data)
    assert cache.path(cid).stat().st_mtime > time.time() - 60


def test_eviction_removes_least_recently_used(tmp_path: Path) -> None:
    cache = L1Cache(tmp_path, budget_bytes=5 * SIZE)
    ids = fill_with_ages(cache, range(5))  # exactly at budget: nothing evicted yet
    assert cache.usage() == 5 * SIZE
    new, data = chunk(99)
    cache.put(new, data)  # 6000 > 5000: evict down to 4500, i.e. the two oldest
    assert [p.name for p in entry_files(tmp_path)] == sorted(ids[2:] + [new])
    assert cache.usage() == 4 * SIZE


def test_get_refreshes_entry_so_it_survives(tmp_path: Path) -> None:
    cache = L1Cache(tmp_path, budget_bytes=5 * SIZE)
    ids = fill_with_ages(cache, range(5))
    assert cache.get(ids[0]) is not None  # oldest becomes newest
    new, data = chunk(99)
    cache.put(new, data)
    assert [p.name for p in entry_files(tmp_path)] == sorted([ids[0], *ids[3:], new])


def test_evict_to_explicit_target_returns_bytes_freed(tmp_path: Path) -> None:
    cache = L1Cache(tmp_path)
    ids = fill_with_ages(cache, range(4))
    assert cache.evict(2 * SIZE) == 2 * SIZE
    assert [p.name for p in entry_files(tmp_path)] == sorted(ids[2:])
    assert cache.evict(0) == 2 * SIZE and cache.usage() == 0


def test_restart_keeps_usage_and_lru_order(tmp_path: Path) -> None:
    first = L1Cache(tmp_path, budget_bytes=5 * SIZE)
    ids = fill_with_ages(first, [10, 11, 12, 13, 14])
    del first
    assert L1Cache(tmp_path).usage() == 5 * SIZE
    assert len(L1Cache(tmp_path)) == 5
    second = L1Cache(tmp_path, budget_bytes=5 * SIZE)
    new, data = chunk(99)
    second.put(new, data)  # the first put after a restart must see the old entries
    assert [p.name for p in entry_files(tmp_path)] == sorted(ids[2:] + [new])


def test_restart_with_smaller_budget_evicts_on_first_put(tmp_path: Path) -> None:
    ids = fill_with_ages(L1Cache(tmp_path), range(5))
    small = L1Cache(tmp_path, budget_bytes=3 * SIZE)
    new, data = chunk(99)
    small.put(new, data)  # 6000 > 3000: down to 2700 means two entries remain
    assert [p.name for p in entry_files(tmp_path)] == sorted([ids[4], new])


def test_stale_temp_files_removed_fresh_kept(tmp_path: Path) -> None:
    cache = L1Cache(tmp_path)
    cid, data = chunk(1)
    cache.put(cid, data)
    sub = tmp_path / cid[:2]
    stale = sub / f".tmp-{cid}-4242-deadbeef"
    fresh = sub / f".tmp-{cid}-4243-cafef00d"
    stale.write_bytes(b"half a chunk")
    fresh.write_bytes(b"being written")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    assert cache.usage() == SIZE  # temp files never count
    assert not stale.exists()
    assert fresh.exists()
    cache.evict()
    assert fresh.exists() and cache.get(cid) == data


def test_foreign_files_are_ignored(tmp_path: Path) -> None:
    cache = L1Cache(tmp_path, budget_bytes=SIZE)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "ab").mkdir()
    (tmp_path / "ab" / "README").write_text("also mine")
    assert cache.usage() == 0
    cache.evict(0)
    assert (tmp_path / "ab" / "README").exists() and (tmp_path / "notes.txt").exists()


def test_threads_share_one_instance(tmp_path: Path) -> None:
    budget = 40 * 2048
    cache = L1Cache(tmp_path, budget_bytes=budget)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(60):
                cid, data = chunk(t * 1000 + i, 2048)
                cache.put(cid, data)
                got = cache.get(cid)
                assert got is None or got == data
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert_all_entries_valid(tmp_path)
    assert cache.usage() <= budget


def assert_all_entries_valid(root: Path) -> None:
    for p in entry_files(root):
        assert p.parent.name == p.name[:2]
        assert hashlib.sha256(p.read_bytes()).hexdigest() == p.name
    assert temp_files(root) == []


MP_BUDGET = 256 << 10  # bytes; far less than the ~7 MiB the workers write
MP_SHARED = 40  # ids every worker puts


def _mp_worker(root: str, n: int, barrier, err_path: str) -> None:
    """Run in a spawned process: put n own chunks plus the shared ones, read some back."""
    try:
        cache = L1Cache(root, budget_bytes=MP_BUDGET)
        rng = random.Random(os.getpid())
        shared = [chunk(10_000_000 + i, 8192) for i in range(MP_SHARED)]
        mine = []
        barrier.wait()
        for i in range(n):
            data = rng.randbytes(rng.randrange(4096, 16385))
            cid = hashlib.sha256(data).hexdigest()
            cache.put(cid, data)
            mine.append((cid, data))
            if i % 8 == 0:
                cache.put(*shared[rng.randrange(MP_SHARED)])
            cid, data = rng.choice(mine + shared)
            got = cache.get(cid)
            assert got is None or got == data, f"wrong bytes for {cid}"
    except BaseException:
        Path(err_path).write_text(traceback.format_exc())
        raise


def test_several_processes_share_one_root(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    ctx = multiprocessing.get_context("spawn")
    nproc = 3
    barrier = ctx.Barrier(nproc)
    procs = [
        ctx.Process(target=_mp_worker, args=(str(root), 300, barrier, str(tmp_path / f"err{i}")))
        for i in range(nproc)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    errs = [f.read_text() for f in sorted(tmp_path.glob("err*"))]
    assert errs == []
    assert [p.exitcode for p in procs] == [0] * nproc
    assert_all_entries_valid(root)
    cache = L1Cache(root, budget_bytes=MP_BUDGET)
    cache.evict()
    assert 0 < cache.usage() <= MP_BUDGET * 9 // 10
    assert_all_entries_valid(root)


def test_put_replace_rewrites_a_same_size_damaged_entry(tmp_path):
    cache = L1Cache(tmp_path / "c")
    data = os.urandom(4096)
    cid = hashlib.sha256(data).hexdigest()
    cache.put(cid, data)
    cache.path(cid).write_bytes(bytes(4096))  # same size, wrong bytes
    cache.put(cid, data)  # only refreshes the LRU time
    assert cache.path(cid).read_bytes() == bytes(4096)
    cache.put(cid, data, replace=True)
    assert cache.path(cid).read_bytes() == data
