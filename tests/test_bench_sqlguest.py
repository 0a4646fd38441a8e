"""The comparison's SQLite workload (bench/realistic.py, bench/sqlguest.py):
a guest process opens a real SQLite database in place in its memory and
answers a request mix the same whether its memory is resident, mapped from
the file, or restored lazily through a real restore Server."""

from __future__ import annotations

import json

import pytest

from bench.realistic import build_image, check_answers, mixes, reference_answers
from bench.sqlguest import GuestFailure, run_guest
from restore.handler import Server
from restore.settings import ServerSettings
from restore.snapshot import Snapshot, create_snapshot
from restore.tiers.l1 import L1Cache


@pytest.fixture(scope="module")
def sql_image(tmp_path_factory):
    """32 MiB of memory holding a ~2 MiB database, and mix B as a file."""
    d = tmp_path_factory.mktemp("sqlguest")
    info = build_image(d / "sql.img", 32 << 20, db_mib=2)
    _, mix = mixes(info, 120)
    requests = d / "mix-B.json"
    requests.write_text(json.dumps(mix))
    return info, mix, requests


def test_resident_guest_answers_like_sqlite3(sql_image):
    """The guest's in-place SQLite (ctypes, sqlite3_deserialize) gives what
    Python's sqlite3 module gives on the database file, and the answers are
    not trivial: most requests return rows, every kind of query is there."""
    info, mix, requests = sql_image
    assert info.db_offset % 4096 == 0 and info.db_offset % (512 << 10) != 0
    assert info.db_offset + info.db_length <= info.size
    res = run_guest("resident", info.size, info.db_offset, info.db_length, requests, image=info.image, timeout=60)
    want = reference_answers(info, mix)
    assert res.answers == want
    assert sum(1 for a in res.answers if a) >= len(mix) * 3 // 4
    assert sum(len(a) for a in res.answers) > len(mix)
    assert len({q for q, _ in mix}) >= 6
    # The pager read pages where they lie (xFetch), not into its own cache.
    assert res.info["page_cache_bytes"] < 64 << 10
    # mmap of the file (Firecracker's File backend) agrees too.
    check_answers(run_guest("mmap", info.size, info.db_offset, info.db_length, requests, image=info.image,
                            timeout=60).answers, want, "mmap")


def test_guest_restored_through_a_server_answers_the_same(sql_image, store, tmp_path):
    """Restored lazily by restore's engine (the uffd handshake of bench/sqlguest.py),
    the guest answers exactly as resident; its pages came through faults."""
    info, mix, requests = sql_image
    create_snapshot(store, info.image, "sql")
    l1 = L1Cache(tmp_path / "l1")
    with Snapshot.open(store, "sql") as snap:
        with Server(snap, tmp_path / "s.sock", ServerSettings(use_plan=False, persist_logs=False), l1=l1) as server:
            res = run_guest("uffd", info.size, info.db_offset, info.db_length, requests,
                            socket_path=server.socket_path, timeout=60)
    check_answers(res.answers, reference_answers(info, mix), "uffd-lazy")
    assert sum(1 for a in res.answers if a) >= len(mix) * 3 // 4
    stats = server.summaries[-1].stats
    assert stats.faults > 0


def test_guest_failure_is_reported(sql_image, tmp_path):
    """A guest that cannot reach its handler fails with the reason, not a hang."""
    info, _, requests = sql_image
    with pytest.raises(GuestFailure, match="exited 1"):
        run_guest("uffd", info.size, info.db_offset, info.db_length, requests,
                  socket_path=tmp_path / "nobody.sock", timeout=60)
