"""The engine's C entry points, called many times, leave memory and fds flat."""

from __future__ import annotations

import os

import numpy as np
import pytest

from restore._native import ffi, lib
from restore.codec import ChunkCodec

C = 64 * 1024
P = 4096
PAGES = 64

# The sanitizer tests/sanitize/run.py built the engine with, if any.
SANITIZER = os.environ.get("RESTORE_SANITIZER", "")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _engine(codec, raw_chunks):
    enc = [codec.encode(r) for r in raw_chunks]
    n = len(enc)
    cfg = ffi.new(
        "rs_engine_config *",
        {"memory_size": PAGES * P, "chunk_size": C, "page_size": P, "n_chunks": n,
         "fault_around": 4, "l1_threads": 0, "log_capacity": 0},
    )
    regs = ffi.new("rs_engine_region[]", [{"base": 1 << 30, "size": PAGES * P, "offset": 0}])
    pages = np.arange(PAGES, dtype=np.uint32)
    chunk = (pages // (C // P)).astype(np.uint32)
    off = ((pages % (C // P)) * P).astype(np.uint32)
    out = ffi.new("rs_engine **")
    # The engine borrows its tables: they live as long as it does.
    tables = (ffi.from_buffer("uint32_t[]", chunk), ffi.from_buffer("uint32_t[]", off),
              ffi.from_buffer("uint8_t[]", b"".join(bytes.fromhex(e.id) for e in enc)),
              ffi.from_buffer("uint32_t[]", np.array([len(e.data) for e in enc], dtype=np.uint32)),
              ffi.from_buffer("uint32_t[]", np.array([e.flags for e in enc], dtype=np.uint32)),
              ffi.from_buffer("uint8_t[]", b"".join(e.zero_bitmap for e in enc)))
    rc = lib.rs_engine_create(out, cfg, codec.handle(), regs, 1, *tables, ffi.NULL)
    assert rc == 0
    return out[0], enc, tables


def _cycles(n: int) -> None:
    """Create, start, supply, fail, stop and destroy an engine n times."""
    codec = ChunkCodec(C, P)
    raw = [os.urandom(C) for _ in range(PAGES * P // C)]
    uffd = lib.rs_uffd_create(1, 0)
    assert uffd >= 0 and lib.rs_uffd_api(uffd, 0, ffi.NULL, ffi.NULL) == 0
    req = ffi.new("uint32_t *")
    try:
        for _ in range(n):
            eng, enc, _tables = _engine(codec, raw)
            assert lib.rs_engine_start(eng, uffd, -1) == 0
            assert lib.rs_engine_next_request(eng, req, 0) == 0  # nothing asked for
            # Supplying a chunk nobody asked for is refused; failing one is not.
            assert lib.rs_engine_supply(eng, 0, enc[0].data, len(enc[0].data), lib.RS_SRC_L2) < 0
            assert lib.rs_engine_fail(eng, 1, -5) == 0
            st = ffi.new("rs_engine_stats *")
            lib.rs_engine_get_stats(eng, st)
            assert st.chunks_failed == 1 and st.error == -5
            lib.rs_engine_stop(eng)
            assert lib.rs_engine_next_request(eng, req, 0) < 0  # -ESHUTDOWN
            assert lib.rs_engine_wait(eng, 0) == 1
            lib.rs_engine_destroy(eng)
    finally:
        os.close(uffd)


def test_create_start_supply_stop_destroy_leaves_fds_flat():
    _cycles(50)
    fds = len(os.listdir("/proc/self/fd"))
    _cycles(500)
    assert len(os.listdir("/proc/self/fd")) == fds


@pytest.mark.skipif(
    SANITIZER == "address",
    reason="under AddressSanitizer (RESTORE_SANITIZER=address) the resident size measures its allocator, "
    "whose quarantine holds freed blocks (RSS grows by ~160 MiB over 500 cycles), not the engine",
)
def test_create_start_supply_stop_destroy_leaves_memory_flat():
    _cycles(50)
    before = _rss()
    _cycles(500)
    assert _rss() - before < 4 << 20


def test_create_refuses_bad_geometry():
    codec = ChunkCodec(C, P)
    out = ffi.new("rs_engine **")
    zeros = np.zeros(PAGES, dtype=np.uint32)
    for cfg, region in [
        ({"page_size": 3000}, {}),
        ({"fault_around": 0}, {}),
        ({}, {"size": PAGES * P * 2}),  # past the memory file
        ({}, {"base": (1 << 30) + 1}),  # misaligned
    ]:
        c = {"memory_size": PAGES * P, "chunk_size": C, "page_size": P, "n_chunks": 1,
             "fault_around": 1, "l1_threads": 0, "log_capacity": 0, **cfg}
        r = {"base": 1 << 30, "size": PAGES * P, "offset": 0, **region}
        rc = lib.rs_engine_create(
            out, ffi.new("rs_engine_config *", c), codec.handle(), ffi.new("rs_engine_region[]", [r]), 1,
            ffi.from_buffer("uint32_t[]", zeros), ffi.from_buffer("uint32_t[]", zeros),
            bytes(32), ffi.from_buffer("uint32_t[]", zeros[:1]), ffi.from_buffer("uint32_t[]", zeros[:1]),
            bytes(codec.bitmap_bytes), ffi.NULL,
        )
        assert rc == -22, (cfg, region)  # -EINVAL
    # A page table naming a chunk that does not exist.
    bad = np.full(PAGES, 7, dtype=np.uint32)
    c = {"memory_size": PAGES * P, "chunk_size": C, "page_size": P, "n_chunks": 1,
         "fault_around": 1, "l1_threads": 0, "log_capacity": 0}
    rc = lib.rs_engine_create(
        out, ffi.new("rs_engine_config *", c), codec.handle(),
        ffi.new("rs_engine_region[]", [{"base": 1 << 30, "size": PAGES * P, "offset": 0}]), 1,
        ffi.from_buffer("uint32_t[]", bad), ffi.from_buffer("uint32_t[]", zeros),
        bytes(32), ffi.from_buffer("uint32_t[]", zeros[:1]), ffi.from_buffer("uint32_t[]", zeros[:1]),
        bytes(codec.bitmap_bytes), ffi.NULL,
    )
    assert rc == -22
