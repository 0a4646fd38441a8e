"""The host cache: decoded chunks shared by every session of every process
on the host. Restores from a cold and a warm host cache are byte-exact on
every kind of guest memory; a chunk is decoded once however many sessions
and processes want it; a fill killed half-way, a host crash and damaged
files never serve wrong bytes; the byte budget holds without touching a
version a session uses."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from restore._native import ffi, lib
from restore.errors import InputError
from restore.handler import Server
from restore.settings import ServerSettings
from restore.sample import write_sample_image
from restore.snapshot import Snapshot, create_snapshot
from restore.guest import Guest, reads, remove, wait
from restore.testing import expected_sums
from restore.tiers.durable import DurableStore
from restore.tiers.host import HostCache, version_id
from restore.tiers.l1 import L1Cache

P = 4096
CHUNK = 256 * 1024
SIZE = 16 << 20
STATE_AT = 4096


@pytest.fixture(scope="module")
def image(make_image):
    return make_image(SIZE, seed=31)


@pytest.fixture
def snap(open_snapshot, image):
    return open_snapshot(image, "vm", chunk_size=CHUNK)


@pytest.fixture
def host(tmp_path):
    return HostCache(tmp_path / "host")


@pytest.fixture
def serve(tmp_path, snap, host):
    servers = []

    def make(snapshot=None, **kw):
        kw = {"l1": L1Cache(tmp_path / "l1"), "host_cache": host, **kw}
        settings, kw = ServerSettings.take(kw)
        s = Server(snapshot or snap, tmp_path / f"s{len(servers)}.sock", settings, **kw).start()
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


def _wait_sessions(server, n, timeout=30.0):
    deadline = time.monotonic() + timeout
    while len(server.summaries) < n:
        assert time.monotonic() < deadline, f"{len(server.summaries)} of {n} sessions ended"
        time.sleep(0.01)
    return list(server.summaries)


def _trace(image, n=300, seed=0):
    """Offsets of n non-zero pages of the image, in random order, plus some
    zero pages: a guest reading them needs many chunks."""
    data = np.fromfile(image, dtype=np.uint8).reshape(-1, P)
    nonzero = np.flatnonzero(data.any(axis=1))
    zero = np.flatnonzero(~data.any(axis=1))
    rng = np.random.default_rng(seed)
    pages = np.concatenate([rng.choice(nonzero, n, replace=False), rng.choice(zero, 20, replace=False)])
    rng.shuffle(pages)
    return pages.astype(np.uint64) * P


def _present(host_dir: Path) -> np.ndarray:
    """Chunk indices marked present in a version's state file."""
    return np.flatnonzero(np.frombuffer((host_dir / "state").read_bytes()[STATE_AT:], dtype=np.uint8) == 1)


def _decodes(stats) -> int:
    return stats.chunks_l1 + stats.chunks_fetched


MEMORY = pytest.mark.parametrize("memfd", [None, "copy", "continue"], ids=["anon", "memfd-copy", "memfd-continue"])


@MEMORY
def test_cold_then_warm_host_cache_is_byte_exact_and_decodes_nothing(serve, snap, host, image, memfd):
    server = serve(memfd_install=memfd or "copy", use_plan=False)
    offs = _trace(image)
    for _ in range(2):
        with Guest(server.socket_path, memory_size=SIZE, memfd=memfd is not None) as g:
            assert (g.run(reads(offs), timeout=60).sums == expected_sums(image, offs)).all()
    cold, warm = (s.stats for s in _wait_sessions(server, 2))
    path, _ = host.open_version(snap.manifest)
    assert cold.host_fills == _decodes(cold) == len(_present(path)) > 0
    assert cold.chunks_host == 0 and cold.first_touches["host"] == 0
    # Warm: every chunk from the host cache's mapping, nothing read or decoded.
    assert warm.chunks_host == cold.host_fills and _decodes(warm) == 0 and warm.decode_ns == 0
    assert warm.first_touches["host"] == cold.first_touches["durable"] + cold.first_touches["l1"]
    assert warm.host_errors == cold.host_errors == 0


def _fill(serve, snap, host, image):
    """One restore through a new server, filling the host cache: (server,
    the offsets read, the version's host cache directory)."""
    server = serve(use_plan=False)
    offs = _trace(image)
    with Guest(server.socket_path, memory_size=SIZE) as g:
        assert (g.run(reads(offs), timeout=60).sums == expected_sums(image, offs)).all()
    _wait_sessions(server, 1)
    return server, offs, host.open_version(snap.manifest)[0]


def test_zero_slots_stay_holes_and_files_are_private(serve, snap, host, image):
    _, _, path = _fill(serve, snap, host, image)
    data = path / "data"
    present = _present(path)
    zero_slots = sum(bin(b).count("1") for i in present for b in snap.manifest.chunks[i].zero)
    assert os.stat(data).st_size == len(snap.manifest.chunks) * CHUNK
    # Allocated: the present chunks' non-zero slots (and no more than that).
    assert os.stat(data).st_blocks * 512 <= (len(present) * CHUNK // P - zero_slots) * P + CHUNK
    assert stat.S_IMODE(os.stat(host.root).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    for f in ("data", "state", "info.json"):
        assert stat.S_IMODE(os.stat(path / f).st_mode) == 0o600
    assert json.loads((path / "info.json").read_text())["snapshot"] == "vm/1"
    # The bytes on disk are the decoded chunks, zero slots reading as zeros.
    raw = np.fromfile(image, dtype=np.uint8)
    got = np.fromfile(data, dtype=np.uint8)
    for i in present:
        assert (got[i * CHUNK:(i + 1) * CHUNK] == raw[i * CHUNK:(i + 1) * CHUNK]).all()


def test_remove_still_reads_zeros_from_a_warm_host_cache(serve, image):
    server = serve(use_plan=False)
    offs = _trace(image, n=50)
    with Guest(server.socket_path, memory_size=SIZE) as g:
        g.run(reads(offs), timeout=60)
    page = int(next(o for o in offs if expected_sums(image, [o])[0] != 0))
    trace = np.concatenate([reads([page]), remove(page), reads([page])])
    with Guest(server.socket_path, memory_size=SIZE) as g:
        sums = g.run(trace, timeout=60).sums
    assert sums[0] == expected_sums(image, [page])[0] != 0
    assert sums[2] == 0
    st = _wait_sessions(server, 2)[1].stats
    assert st.first_touches["host"] >= 1 and st.removes >= 1


def test_eight_concurrent_guests_decode_each_chunk_once(serve, snap, host, image):
    server = serve(use_plan=False)
    guests = [Guest(server.socket_path, memory_size=SIZE) for _ in range(8)]
    traces = [_trace(image, seed=i % 2) for i in range(8)]  # two working sets, heavily shared
    try:
        for g, t in zip(guests, traces):
            g.start(reads(t))
        for g, t in zip(guests, traces):
            assert (g.wait(60).sums == expected_sums(image, t)).all()
    finally:
        for g in guests:
            g.close()
    stats = [s.stats for s in _wait_sessions(server, 8)]
    path, _ = host.open_version(snap.manifest)
    decoded = sum(_decodes(s) for s in stats)
    assert decoded == sum(s.host_fills for s in stats) == len(_present(path))
    assert sum(s.chunks_host for s in stats) > 0


# Sessions of the many-restores test: 100, and 25 under a sanitizer, where
# each guest process starts several times slower (its start-up, not the
# engine, was most of the ThreadSanitizer pass's time).
MANY = 25 if os.environ.get("RESTORE_SANITIZER") else 100


def test_many_restores_decode_each_chunk_at_most_once(serve, snap, host, image):
    """MANY sessions one after another, each reading its own pages: every
    chunk any of them needed was decoded once, by the first that needed it."""
    server = serve(use_plan=False)
    for i in range(MANY):
        t = _trace(image, n=12, seed=i)
        with Guest(server.socket_path, memory_size=SIZE) as g:
            assert (g.run(reads(t), timeout=60).sums == expected_sums(image, t)).all()
    stats = [s.stats for s in _wait_sessions(server, MANY)]
    path, _ = host.open_version(snap.manifest)
    assert sum(_decodes(s) for s in stats) == sum(s.host_fills for s in stats) == len(_present(path))
    assert sum(s.chunks_host for s in stats) > len(_present(path))  # later sessions took what earlier ones decoded


class _HeldFill:
    """A fill lock on chunk c of a version's host cache, held by this test
    through the product's C API (as another session's filler would hold it)."""

    def __init__(self, path: Path, snapshot: Snapshot, c: int):
        m = snapshot.manifest
        out = ffi.new("rs_hostcache **")
        assert lib.rs_hostcache_open(out, os.fsencode(str(path)), len(m.chunks), m.chunk_size,
                                     version_id(m)) == 0
        self.h, self.c, self.snapshot = out[0], c, snapshot
        waited = ffi.new("int *")
        assert lib.rs_hostcache_claim(self.h, c, waited) == 0

    def fill(self) -> None:
        decoded = np.asarray(self.snapshot.read_chunk(self.c), dtype=np.uint8)
        assert lib.rs_hostcache_fill(self.h, self.c, ffi.from_buffer(decoded), self.snapshot.manifest.chunks[self.c].zero,
                                     self.snapshot.manifest.page_size) == 0

    def close(self) -> None:
        lib.rs_hostcache_close(self.h)


def _lock_waiters(path: Path) -> int:
    """Processes blocked on a lock of this file (/proc/locks: '->' lines)."""
    ino = os.stat(path).st_ino
    return sum(1 for line in Path("/proc/locks").read_text().splitlines()
               if "->" in line and re.search(rf":{ino} ", line))


def test_two_server_processes_wait_for_one_filler(tmp_path, snap, host, image):
    """Two `restore serve` processes want the same chunk while a third
    party holds its fill lock: both wait, then take its bytes; neither
    decodes it. Then they fill the rest of the version at once: each chunk
    is decoded by one of them."""
    path, _ = host.open_version(snap.manifest)
    c = 5
    held = _HeldFill(path, snap, c)
    daemons = []
    try:
        for i in range(2):
            sock = tmp_path / f"d{i}.sock"
            daemons.append((subprocess.Popen(
                [sys.executable, "-m", "restore", "serve", "--snapshot", "vm", "--socket", str(sock),
                 "--store", snap.store.url, "--cache", str(tmp_path / f"l1-{i}"), "--host-cache", str(host.root),
                 "--log-format", "json", "-v", "--no-plan"],
                stderr=subprocess.PIPE, text=True), sock))
        for _, sock in daemons:
            deadline = time.monotonic() + 30
            while not sock.exists():
                assert time.monotonic() < deadline
                time.sleep(0.02)
        page = c * CHUNK + next(s for s in range(CHUNK // P) if not
                                (snap.manifest.chunks[c].zero[s // 8] >> (s % 8)) & 1) * P
        guests = [Guest(str(sock), memory_size=SIZE).start(reads([page])) for _, sock in daemons]
        deadline = time.monotonic() + 30
        while _lock_waiters(path / "state") < 2:  # both servers' fillers are blocked on our lock
            assert time.monotonic() < deadline, Path("/proc/locks").read_text()
            time.sleep(0.01)
        held.fill()
        for g in guests:
            assert g.wait(30).sums[0] == expected_sums(image, [page])[0]
            g.close()
        # Then both fill the rest of the version at once, from a cold host
        # cache, for guests that want the same pages.
        offs = _trace(image)
        guests = [Guest(str(sock), memory_size=SIZE).start(reads(offs)) for _, sock in daemons]
        for g in guests:
            assert (g.wait(60).sums == expected_sums(image, offs)).all()
            g.close()
        ends = []
        for proc, _ in daemons:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
            ends.append([json.loads(x) for x in err.splitlines() if '"session_end"' in x])
        for first, _ in ends:
            assert first["chunks"]["host_waits"] == 1 and first["chunks"]["host"] == 1
            assert first["chunks"]["host_fills"] == 0 and first["first_touches"]["host"] == 1
        # Every chunk was decoded by one of the two processes, none by both.
        fills = sum(second["chunks"]["host_fills"] for _, second in ends)
        decodes = sum(second["chunks"]["l1"] + second["chunks"]["fetched"] for _, second in ends)
        assert fills == decodes == len(_present(path)) - 1  # the held chunk was ours
    finally:
        held.close()
        for proc, _ in daemons:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


_FILLER = """
import os, sys, numpy as np
from restore._native import ffi, lib
path, n, size, vid, c = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), bytes.fromhex(sys.argv[4]), int(sys.argv[5])
out = ffi.new("rs_hostcache **")
assert lib.rs_hostcache_open(out, os.fsencode(path), n, size, vid) == 0
assert lib.rs_hostcache_claim(out[0], c, ffi.new("int *")) == 0
fd = os.open(os.path.join(path, "data"), os.O_WRONLY)
os.pwrite(fd, b"\\xa5" * size, c * size)  # half-way through its writes, as it were
print("filling", flush=True)
sys.stdin.read()  # killed here
"""


def test_kill_9_mid_fill_then_restart_serves_no_torn_bytes(serve, snap, host, image):
    """A filler killed after writing bytes but before marking the chunk
    present: its lock goes with it, the chunk stays absent, and the next
    filler punches the torn bytes out (its zero slots must read as zeros)."""
    path, vid = host.open_version(snap.manifest)
    m = snap.manifest
    c = next(i for i, ch in enumerate(m.chunks) if any(ch.zero) and ch.stored_len)  # zero and data slots
    proc = subprocess.Popen([sys.executable, "-c", _FILLER, str(path), str(len(m.chunks)), str(m.chunk_size),
                             vid.hex(), str(c)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "filling\n"
    proc.kill()
    proc.wait()
    assert c not in _present(path)
    server = serve(use_plan=False)
    offs = np.arange(c * CHUNK, (c + 1) * CHUNK, P, dtype=np.uint64)
    with Guest(server.socket_path, memory_size=SIZE) as g:
        assert (g.run(reads(offs), timeout=60).sums == expected_sums(image, offs)).all()
    st = _wait_sessions(server, 1)[0].stats
    assert st.host_fills == 1 and st.host_waits == 0
    raw = np.fromfile(image, dtype=np.uint8)[c * CHUNK:(c + 1) * CHUNK]
    assert (np.fromfile(path / "data", dtype=np.uint8)[c * CHUNK:(c + 1) * CHUNK] == raw).all()


@pytest.mark.parametrize("damage", ["another boot", "short data file", "garbage header"])
def test_damaged_host_cache_after_an_unclean_stop_is_never_served(serve, snap, host, image, damage):
    server, offs, path = _fill(serve, snap, host, image)
    filled = len(_present(path))
    # Wrong bytes everywhere, with every chunk still marked present ...
    with open(path / "data", "r+b") as f:
        f.write(b"\x5a" * os.stat(path / "data").st_size)
    with open(path / "state", "r+b") as f:
        if damage == "another boot":  # the host crashed: page-cache bytes may be lost
            f.seek(56)
            f.write(b"00000000-0000-0000-0000-000000000000")
        elif damage == "garbage header":
            f.write(b"\xff" * 64)
    if damage == "short data file":
        os.truncate(path / "data", CHUNK)
    # ... and yet a restore is byte-exact: the version was emptied and refilled.
    with Guest(server.socket_path, memory_size=SIZE) as g:
        assert (g.run(reads(offs), timeout=60).sums == expected_sums(image, offs)).all()
    st = _wait_sessions(server, 2)[1].stats
    assert st.chunks_host == 0 and st.host_fills == filled == len(_present(path))


def test_budget_is_kept_and_eviction_waits_for_running_sessions(tmp_path, snap, image):
    """Two versions, a budget for about one: the version a paused guest is
    using stays (bytes unchanged) until its session ends."""
    host = HostCache(tmp_path / "small", budget_bytes=6 << 20)
    other_img = tmp_path / "other.img"
    write_sample_image(other_img, SIZE, seed=99)
    create_snapshot(snap.store, other_img, "other", chunk_size=CHUNK)
    every = np.arange(0, SIZE, P, dtype=np.uint64)
    with Snapshot.open(snap.store, "other") as other:
        a = Server(snap, tmp_path / "a.sock", ServerSettings(use_plan=False), host_cache=host).start()
        b = Server(other, tmp_path / "b.sock", ServerSettings(use_plan=False), host_cache=host).start()
        try:
            ga = Guest(a.socket_path, memory_size=SIZE)
            # Reads all of its memory, then waits for a go-ahead that never comes.
            ga.start(np.concatenate([reads(every), wait()]))
            deadline = time.monotonic() + 60
            while a.counters().get("pages_installed", 0) < len(every):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            path_a, _ = host.open_version(snap.manifest)
            before = (path_a / "data").read_bytes()
            assert host.usage() > host.budget_bytes  # one version is past the budget already
            with Guest(b.socket_path, memory_size=SIZE) as gb:
                assert (gb.run(reads(every), timeout=60).sums == expected_sums(other_img, every)).all()
            _wait_sessions(b, 1)
            # b's version was evicted at its session's end; a's is in use: kept, unchanged.
            versions = host.versions()
            assert [v.snapshot for v in versions] == ["vm/1"] and versions[0].in_use
            assert (path_a / "data").read_bytes() == before
            ga.kill()
            _wait_sessions(a, 1)
            assert host.versions() == [] and host.usage() == 0  # evicted once its session ended
        finally:
            a.stop()
            b.stop()


def test_encrypted_snapshot_plaintext_lands_only_in_the_private_host_cache(tmp_path, image, key):
    store = DurableStore(f"file://{tmp_path}/estore")
    create_snapshot(store, image, "enc", chunk_size=CHUNK, key=key)
    offs = _trace(image, n=40)
    needle = np.fromfile(image, dtype=np.uint8)[int(offs[0]):int(offs[0]) + P].tobytes()
    for use in (False, True):
        host = HostCache(tmp_path / f"host-{use}")
        with Snapshot.open(store, "enc", key=key) as s:
            server = Server(s, tmp_path / f"e{use}.sock", ServerSettings(use_plan=False),
                            l1=L1Cache(tmp_path / f"el1-{use}"), host_cache=host if use else None).start()
            try:
                with Guest(server.socket_path, memory_size=SIZE) as g:
                    assert (g.run(reads(offs), timeout=60).sums == expected_sums(image, offs)).all()
                _wait_sessions(server, 1)
            finally:
                server.stop()
        on_disk = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".img"
                           and f"host-{not use}" not in str(p))
        # L1 and the store hold ciphertext only; the host cache, when used, the plaintext.
        assert (needle in on_disk) == use
        if use:
            d = host.versions()[0].path
            assert stat.S_IMODE(os.stat(d / "data").st_mode) == 0o600
            assert stat.S_IMODE(os.stat(d).st_mode) == 0o700


def test_host_cache_arguments_are_checked(tmp_path):
    with pytest.raises(InputError, match=re.escape("host cache budget_bytes must be a positive number of bytes, got 0")):
        HostCache(tmp_path / "h", budget_bytes=0)
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="host cache directory .* cannot be created"):
        HostCache(tmp_path / "file" / "h")
    with pytest.raises(InputError, match=re.escape("host cache eviction target must be >= 0 bytes, got -1")):
        HostCache(tmp_path / "h").evict(-1)


def test_version_id_names_the_decoded_bytes(snap, tmp_path, image):
    """Same chunks, same id (a second version of the same image shares the
    directory); other bytes, another id."""
    create_snapshot(snap.store, image, "vm", chunk_size=CHUNK)
    with Snapshot.open(snap.store, "vm", "2") as again:
        assert version_id(again.manifest) == version_id(snap.manifest)
    other = tmp_path / "o.img"
    write_sample_image(other, SIZE, seed=5)
    create_snapshot(snap.store, other, "o", chunk_size=CHUNK)
    with Snapshot.open(snap.store, "o") as o:
        assert version_id(o.manifest) != version_id(snap.manifest)


def test_a_host_cache_that_cannot_be_used_costs_speed_not_the_restore(serve, snap, host, image, caplog):
    """The version's directory is a file (say, a damaged host cache): the
    session serves without the host cache, byte-exact, and says why."""
    (host.root / "v1" / version_id(snap.manifest).hex()).write_bytes(b"not a directory")
    server = serve(use_plan=False)
    offs = _trace(image, n=40)
    with caplog.at_level("WARNING", logger="restore.session"):
        with Guest(server.socket_path, memory_size=SIZE) as g:
            assert (g.run(reads(offs), timeout=60).sums == expected_sums(image, offs)).all()
        st = _wait_sessions(server, 1)[0].stats
    assert st.chunks_host == st.host_fills == 0 and _decodes(st) > 0
    assert re.search(r"host cache .* cannot be used \(Not a directory\): serving without it", caplog.text), caplog.text
