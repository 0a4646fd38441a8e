"""The handshake of Firecracker's UFFD protocol, over real sockets with real fds."""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from restore._native import lib
from restore.errors import InputError
from restore.protocol import (
    MAX_FDS,
    HandshakeError,
    PeerCred,
    PeerNotAllowed,
    Region,
    _JsonEnd,
    accept_handshake,
    check_regions,
    parse_regions,
    peer_credentials,
    recv_handshake,
)

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
BASE = 0x7F0000000000
GEO = dict(memory_size=GIB, snapshot_page_size=4096, chunk_size=512 * KIB)
GEO_HUGE = dict(memory_size=GIB, snapshot_page_size=4096, chunk_size=2 * MIB)


def reg(base=BASE, size=64 * MIB, offset=0, page=4096, **extra) -> dict:
    """One region as Firecracker serialises it (both page-size fields)."""
    d = {"base_host_virt_addr": base, "size": size, "offset": offset, "page_size": page, "page_size_kib": page}
    d.update(extra)
    return {k: v for k, v in d.items() if v is not None}


def msg(*regions: dict) -> bytes:
    return json.dumps(list(regions)).encode()


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def pair():
    """(handler end, guest end) of a Unix stream socketpair."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def uffd():
    fd = lib.rs_uffd_create(1, 0)
    if fd < 0:
        pytest.skip(f"userfaultfd unavailable here: {os.strerror(-fd)}")
    yield fd
    os.close(fd)


@pytest.fixture
def memfd():
    fd = os.memfd_create("guest-mem")
    yield fd
    os.close(fd)


def send_later(sock: socket.socket, *steps: tuple[float, bytes, list[int]]) -> threading.Thread:
    """A guest thread: for each (delay s, bytes, fds) sleep, then send."""

    def run():
        for delay, data, fds in steps:
            time.sleep(delay)
            if fds:
                socket.send_fds(sock, [data], fds)
            else:
                sock.sendall(data)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def refused(handler: socket.socket, message: str, *, regex: bool = False, **kw) -> None:
    """accept_handshake refuses with exactly message and leaks no fd."""
    before = open_fds()
    with pytest.raises(HandshakeError, match=message if regex else "^" + re.escape(message) + "$"):
        accept_handshake(handler, **{**GEO, **kw})
    assert open_fds() == before


def recv_refused(handler: socket.socket, message: str, **kw) -> None:
    """recv_handshake refuses with exactly message and leaks no fd."""
    before = open_fds()
    with pytest.raises(HandshakeError, match="^" + re.escape(message) + "$"):
        recv_handshake(handler, **kw)
    assert open_fds() == before


# -- accepted handshakes --------------------------------------------------------


def test_single_region_is_accepted_with_a_working_uffd(pair, uffd):
    a, b = pair
    before = open_fds()
    socket.send_fds(b, [msg(reg())], [uffd])
    hs = accept_handshake(a, **GEO)
    assert hs.regions == [Region(base=BASE, size=64 * MIB, offset=0, page_size=4096)]
    assert hs.page_size == 4096
    assert hs.peer == PeerCred(os.getpid(), os.getuid(), os.getgid())
    assert hs.uffd != uffd and os.fstat(hs.uffd)  # our own, working copy
    assert os.readlink(f"/proc/self/fd/{hs.uffd}") == "anon_inode:[userfaultfd]"
    assert os.get_inheritable(hs.uffd) is False  # received with MSG_CMSG_CLOEXEC
    hs.close()
    hs.close()  # idempotent
    assert hs.uffd == -1
    assert open_fds() == before


def test_several_regions_back_to_back(pair, uffd):
    a, b = pair
    regions = [
        reg(BASE, 256 * MIB, 0),
        reg(BASE + GIB, 512 * MIB, 256 * MIB),
        reg(BASE + 4 * GIB, 256 * MIB, 768 * MIB),
    ]
    socket.send_fds(b, [msg(*regions)], [uffd])
    with accept_handshake(a, **GEO) as hs:
        assert [(r.base, r.size, r.offset) for r in hs.regions] == [
            (BASE, 256 * MIB, 0),
            (BASE + GIB, 512 * MIB, 256 * MIB),
            (BASE + 4 * GIB, 256 * MIB, 768 * MIB),
        ]
        assert hs.regions[1].end == BASE + GIB + 512 * MIB
        assert hs.regions[1].file_end == 768 * MIB
        assert hs.regions[1].pages == 512 * MIB // 4096
        assert hs.regions[1].file_offset(BASE + GIB + 0x3000) == 256 * MIB + 0x3000
        with pytest.raises(ValueError, match="outside region"):
            hs.regions[1].file_offset(BASE)


def test_deprecated_page_size_kib_alone_carries_bytes(pair, uffd):
    a, b = pair
    socket.send_fds(b, [msg(reg(page=None, page_size_kib=2 * MIB))], [uffd])
    with accept_handshake(a, **GEO_HUGE) as hs:
        assert hs.page_size == 2 * MIB
        assert hs.regions[0].page_size == 2 * MIB


def test_huge_pages_are_accepted_with_chunks_smaller_than_a_page(pair, uffd):
    a, b = pair
    socket.send_fds(b, [msg(reg(page=2 * MIB))], [uffd])
    with accept_handshake(a, **GEO) as hs:  # 512 KiB chunks
        assert hs.page_size == 2 * MIB


def test_page_size_is_preferred_to_page_size_kib(pair, uffd):
    a, b = pair
    region = reg(page=2 * MIB)
    region["page_size_kib"] = 2048  # what a literal reading of the name would send
    socket.send_fds(b, [msg(region)], [uffd])
    with accept_handshake(a, **GEO_HUGE) as hs:
        assert hs.page_size == 2 * MIB
    # the preferred field is the one checked: a bad page_size_kib beside it is ignored
    region["page_size_kib"] = "junk"
    assert parse_regions(msg(region))[0].page_size == 2 * MIB


def test_unknown_keys_are_ignored():
    assert parse_regions(msg(reg(note="hi", extra=[1, {"x": None}]))) == [Region(BASE, 64 * MIB, 0, 4096)]


def test_detach_hands_over_the_uffd(pair, uffd):
    a, b = pair
    socket.send_fds(b, [msg(reg())], [uffd])
    hs = accept_handshake(a, **GEO)
    fd = hs.detach_uffd()
    hs.close()  # no longer ours: must not close it
    os.fstat(fd)
    os.close(fd)


# -- pieces, retries, deadlines ---------------------------------------------------


def test_payload_split_with_the_fd_on_the_second_send(pair, uffd):
    a, b = pair
    m = msg(reg(), reg(BASE + GIB, 64 * MIB, 64 * MIB))
    t = send_later(b, (0, m[:30], []), (0.05, m[30:], [uffd]))
    with accept_handshake(a, **GEO) as hs:
        assert len(hs.regions) == 2
    t.join()


def test_fd_on_the_first_send_and_more_payload_later(pair, uffd):
    a, b = pair
    m = msg(reg(), reg(BASE + GIB, 64 * MIB, 64 * MIB))
    t = send_later(b, (0, m[:1], [uffd]), (0.05, m[1:40], []), (0.05, m[40:], []))
    with accept_handshake(a, **GEO) as hs:
        assert len(hs.regions) == 2
    t.join()


def test_the_end_of_the_json_is_found_through_strings_and_escapes(pair, uffd):
    a, b = pair
    m = msg(reg(note='a]}"\\[{', more="\\"))
    cuts = [1] + [m.index(b"note") + k for k in range(6, 14)] + [len(m) - 1, len(m)]
    steps = [(0, m[:1], [uffd])] + [(0.005, m[i:j], []) for i, j in zip(cuts, cuts[1:])]
    t = send_later(b, *steps)
    payload, fds = recv_handshake(a, timeout=2.0)
    t.join()
    os.close(fds[0])
    assert payload == m  # neither cut short at a bracket inside a string nor waiting past the end
    for k in range(len(m) + 1):  # every split point, on the scanner alone
        end = _JsonEnd()
        assert not end.feed(m[:k]) or k == len(m)
        assert end.feed(m[k:])


def test_a_late_fd_after_the_payload_is_collected(pair, uffd):
    a, b = pair
    t = send_later(b, (0, msg(reg()), []), (0.02, b"\n", [uffd]))
    with accept_handshake(a, **GEO) as hs:
        assert hs.regions[0].size == 64 * MIB
    t.join()


def test_signals_during_the_wait_do_not_break_it(pair, uffd):
    a, b = pair
    hits = []
    old = signal.signal(signal.SIGALRM, lambda *_: hits.append(1))
    signal.setitimer(signal.ITIMER_REAL, 0.01, 0.01)
    try:
        t = send_later(b, (0.15, msg(reg()), [uffd]))
        with accept_handshake(a, **GEO, timeout=2.0) as hs:
            assert hs.regions[0].offset == 0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    t.join()
    assert hits


def test_a_silent_peer_times_out(pair):
    a, _ = pair
    t0 = time.monotonic()
    refused(a, "no handshake within 0.2 s", timeout=0.2)
    assert time.monotonic() - t0 >= 0.2


def test_an_unfinished_payload_times_out_and_closes_the_fd(pair, uffd):
    a, b = pair
    socket.send_fds(b, [msg(reg())[:10]], [uffd])
    refused(a, "no complete handshake within 0.2 s: 10 bytes of unfinished JSON payload and 1 fd", timeout=0.2)


def test_an_unfinished_payload_without_fd_times_out(pair):
    a, b = pair
    b.sendall(b"[{")
    refused(a, "no complete handshake within 0.2 s: 2 bytes of unfinished JSON payload and no fd", timeout=0.2)


def test_peer_closing_before_sending(pair):
    a, b = pair
    b.close()
    refused(a, "peer closed the connection during the handshake")


def test_peer_closing_mid_handshake_closes_the_fd(pair, uffd):
    a, b = pair
    socket.send_fds(b, [msg(reg())[:25]], [uffd])
    b.close()
    refused(a, "peer closed the connection during the handshake, after 25 bytes of payload and 1 fd")


def test_no_fd_is_refused_after_a_few_retries(pair):
    """A payload without its fd is refused after a few short polls for a
    late fd, not at the deadline: with an hour's deadline the refusal still
    comes (the wait for it only bounds a hang)."""
    a, b = pair
    b.sendall(msg(reg()))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        refusal = pool.submit(refused, a, "handshake carried no userfaultfd", timeout=3600.0)
        try:
            refusal.result(timeout=30)
        except concurrent.futures.TimeoutError:
            b.shutdown(socket.SHUT_RDWR)  # ends the handshake's wait, so the pool can finish
            pytest.fail("the handshake waited for its deadline instead of refusing after a few polls")


def test_no_fd_and_no_retries(pair):
    a, b = pair
    b.sendall(msg(reg()))
    recv_refused(a, "handshake carried no userfaultfd", fd_retries=0)


def test_no_fd_then_peer_closes(pair):
    a, b = pair
    b.sendall(msg(reg()))
    b.close()
    refused(a, "handshake carried no userfaultfd")


def test_oversized_payload_is_refused_and_the_fd_closed(pair, uffd):
    a, b = pair
    big = msg(reg(note="x" * 200))
    socket.send_fds(b, [big], [uffd])
    recv_refused(a, "handshake payload exceeds the 100-byte limit", max_payload=100)


def test_payload_of_exactly_max_payload_is_accepted(pair, uffd):
    a, b = pair
    m = msg(reg())
    socket.send_fds(b, [m], [uffd])
    payload, fds = recv_handshake(a, max_payload=len(m))
    os.close(fds[0])
    assert payload == m


# -- fd counts --------------------------------------------------------------------


def test_a_memfd_beside_the_uffd_is_accepted(pair, uffd, memfd):
    a, b = pair
    os.ftruncate(memfd, 64 * MIB)
    socket.send_fds(b, [msg(reg())], [uffd, memfd])
    hs = accept_handshake(a, **GEO)
    assert hs.memfd >= 0 and os.readlink(f"/proc/self/fd/{hs.memfd}").startswith("/memfd:guest-mem")
    before = open_fds()
    hs.close()
    assert hs.memfd == hs.uffd == -1 and len(before - open_fds()) == 2


def test_a_memfd_too_small_or_not_a_memfd_is_refused(pair, uffd, memfd, tmp_path):
    a, b = pair
    os.ftruncate(memfd, 32 * MIB)
    socket.send_fds(b, [msg(reg())], [uffd, memfd])
    refused(a, "the memfd holds 32 MiB, less than the regions' 64 MiB")
    plain = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        socket.send_fds(b, [msg(reg())], [uffd, plain])
        refused(a, "the handshake's second fd is not a memfd (it does not answer F_GET_SEALS)")
    finally:
        os.close(plain)
    os.ftruncate(memfd, GIB)
    socket.send_fds(b, [msg(reg(page=2 * MIB))], [uffd, memfd])
    refused(a, "a memfd of guest memory needs 4 KiB pages, not 2 MiB", **GEO_HUGE)


def test_recv_returns_both_fds_of_the_memfd_extension(pair, uffd, memfd):
    a, b = pair
    socket.send_fds(b, [msg(reg())], [uffd, memfd])
    _, fds = recv_handshake(a)
    assert len(fds) == 2
    assert os.readlink(f"/proc/self/fd/{fds[1]}").startswith("/memfd:guest-mem")
    for fd in fds:
        os.close(fd)


def test_three_fds_are_refused(pair, uffd, memfd):
    a, b = pair
    socket.send_fds(b, [msg(reg())], [uffd, memfd, memfd])
    refused(a, "handshake carried 3 fds; expected 1")


def test_more_fds_than_the_ancillary_room_are_refused(pair, uffd):
    a, b = pair
    socket.send_fds(b, [msg(reg())], [uffd] * (MAX_FDS + 3))
    refused(a, f"handshake carried more than {MAX_FDS} fds (ancillary data truncated); expected 1")


def test_an_fd_that_is_not_a_userfaultfd_is_refused(pair, memfd):
    a, b = pair
    r, w = os.pipe()
    try:
        socket.send_fds(b, [msg(reg())], [r])
        refused(a, r"^handshake fd is not a userfaultfd \(it is pipe:\[\d+\]\)$", regex=True)
    finally:
        os.close(r)
        os.close(w)


# -- payload and geometry refusals ---------------------------------------------------

HUGE = 2 * MIB

BAD_PAYLOADS = [
    (b"[{]", "handshake payload is not JSON: Expecting property name enclosed in double quotes at byte 2"),
    (b"[\xff]", "handshake payload is not UTF-8 text: bad byte at 1"),
    ('["\u00e9", }]'.encode(), "handshake payload is not JSON: Expecting value at byte 7"),
    (b"[1, 2]]", "handshake payload is not JSON: Extra data at byte 6"),
    (b"[{}}", "handshake payload is not JSON: Expecting ',' delimiter at byte 3"),
    (b"nonsense", "handshake payload is not JSON: Expecting value at byte 0"),
    (b'{"regions": []}', "handshake payload is not a JSON array of regions"),
    (b"42", "handshake payload is not a JSON array of regions"),
    (b"[[1, 2]]", "region 0 is not a JSON object, got [1, 2]"),
    (msg(reg(), reg(offset=None)), "region 1 is missing 'offset'"),
    (msg(reg(base=None)), "region 0 is missing 'base_host_virt_addr'"),
    (msg(reg(size=None)), "region 0 is missing 'size'"),
    (msg(reg(page=None)), "region 0 is missing 'page_size' (or the deprecated 'page_size_kib')"),
    (msg(reg(size="x")), "region 0 'size' should be a non-negative integer, got \"x\""),
    (msg(reg(size=True)), "region 0 'size' should be a non-negative integer, got true"),
    (msg(reg(offset=4096.0)), "region 0 'offset' should be a non-negative integer, got 4096.0"),
    (msg(reg(base=-4096)), "region 0 'base_host_virt_addr' should be a non-negative integer, got -4096"),
    (msg(reg(page=None, page_size_kib=None)), "region 0 is missing 'page_size' (or the deprecated 'page_size_kib')"),
    (msg(reg(page="4096")), "region 0 'page_size' should be a non-negative integer, got \"4096\""),
    (msg(reg(page=None, page_size_kib=[4])), "region 0 'page_size_kib' should be a non-negative integer, got [4]"),
    (msg(reg(base=1 << 64)), "region 0 'base_host_virt_addr' does not fit in 64 bits: 18446744073709551616"),
    (b"[]", "handshake lists no regions"),
    (b"  [ ]  ", "handshake lists no regions"),
]

BAD_GEOMETRY = [
    (
        [reg(BASE, 512 * MIB, 0), reg(BASE + GIB, 256 * MIB, 512 * MIB), reg(BASE + 2 * GIB, 64 * MIB, GIB - 32 * MIB)],
        GEO,
        "region 2 [0x7f0080000000, +64 MiB) at file offset 0x3e000000 ends past the 1 GiB snapshot",
    ),
    (
        [reg(BASE, 64 * MIB, 0), reg(BASE + GIB, 64 * MIB, 32 * MIB)],
        GEO,
        "region 1 overlaps region 0 in the memory file: [0x2000000, +64 MiB) and [0x0, +64 MiB)",
    ),
    (
        [reg(BASE + 32 * MIB, 64 * MIB, 64 * MIB), reg(BASE, 64 * MIB, 0)],
        GEO,
        "region 1 overlaps region 0 in host memory: [0x7f0000000000, +64 MiB) and [0x7f0002000000, +64 MiB)",
    ),
    (
        [reg(page=4096), reg(BASE + GIB, 64 * MIB, 64 * MIB, page=HUGE)],
        GEO_HUGE,
        "regions use different page sizes (4096, 2097152)",
    ),
    ([reg(page=8192)], GEO, "page size 8192 is not supported (4 KiB or 2 MiB)"),
    ([reg(page=0)], GEO, "page size 0 is not supported (4 KiB or 2 MiB)"),
    (
        [reg(base=BASE + 4096, page=HUGE)],
        GEO_HUGE,
        "region 0 base 0x7f0000001000 is not aligned to its 2 MiB page size",
    ),
    ([reg(size=HUGE + 4096, page=HUGE)], GEO_HUGE, "region 0 size 2101248 is not a multiple of its 2 MiB page size"),
    ([reg(offset=4096, page=HUGE)], GEO_HUGE, "region 0 offset 0x1000 is not aligned to its 2 MiB page size"),
    ([reg(size=100)], GEO, "region 0 size 100 is not a multiple of its 4 KiB page size"),
    ([reg(), reg(BASE + GIB, 0, 64 * MIB)], GEO, "region 1 at 0x7f0040000000 is empty"),
    (
        [reg(base=(1 << 64) - 4096, size=8192)],
        GEO,
        "region 0 [0xfffffffffffff000, +8 KiB) wraps past the top of the address space",
    ),
    (
        [reg(page=HUGE)],
        dict(GEO, memory_size=GIB + 4096),
        "the snapshot's 1048580 KiB of memory is not a multiple of the guest's 2 MiB page size",
    ),
    (
        [reg(page=4096)],
        dict(memory_size=GIB, snapshot_page_size=HUGE, chunk_size=2 * MIB),
        "guest page size 4 KiB is smaller than the snapshot's 2 MiB page size",
    ),
    ([reg(size=64 * MIB, offset=GIB - 4096)], dict(GEO, memory_size=GIB + 4096),
     "region 0 [0x7f0000000000, +64 MiB) at file offset 0x3ffff000 ends past the 1048580 KiB snapshot"),
]


@pytest.mark.parametrize("payload, message", BAD_PAYLOADS, ids=[m for _, m in BAD_PAYLOADS])
def test_bad_payload_is_refused_and_the_uffd_closed(pair, uffd, payload, message):
    a, b = pair
    socket.send_fds(b, [payload], [uffd])
    refused(a, message)


@pytest.mark.parametrize("regions, geo, message", BAD_GEOMETRY, ids=[m for _, _, m in BAD_GEOMETRY])
def test_bad_geometry_is_refused_and_the_uffd_closed(pair, uffd, regions, geo, message):
    a, b = pair
    socket.send_fds(b, [msg(*regions)], [uffd])
    refused(a, message, **geo)


def test_handshake_error_is_an_input_error():
    with pytest.raises(InputError):
        parse_regions(b"{}")


# -- peer credentials -------------------------------------------------------------------


def test_a_peer_whose_uid_is_not_allowed_is_refused_and_told_apart(pair, uffd):
    """A uid not served on the socket is refused before its regions are
    looked at; the refusal says whether the peer sent a userfaultfd (a VMM
    that would hang: kill it) or not (hang up only), and no fd is kept."""
    a, b = pair
    other = os.getuid() + 1
    before = open_fds()
    socket.send_fds(b, [msg(reg(size=3))], [uffd])  # bad regions: the uid is refused first
    with pytest.raises(PeerNotAllowed) as sent:
        accept_handshake(a, **GEO, allowed_uids={other}, socket_name="/run/fn.sock", timeout=5)
    assert str(sent.value) == f"peer uid {os.getuid()} is not allowed on /run/fn.sock (allowed: {other})"
    assert sent.value.kill and "sent a userfaultfd" in sent.value.because
    assert open_fds() == before

    c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with c, d:
        d.sendall(b"GET / HTTP/1.1\r\n\r\n")
        d.shutdown(socket.SHUT_WR)
        with pytest.raises(PeerNotAllowed) as silent:
            accept_handshake(c, **GEO, allowed_uids={other}, timeout=5)
        assert not silent.value.kill
    assert open_fds() == before


def test_a_refusal_asks_for_the_vmm_to_be_killed_by_default(pair, uffd):
    a, b = pair
    socket.send_fds(b, [msg(reg(size=3))], [uffd])
    with pytest.raises(HandshakeError) as refusal:
        accept_handshake(a, **GEO, allowed_uids={os.getuid()})
    assert refusal.value.kill and not isinstance(refusal.value, PeerNotAllowed)


def test_peer_credentials_of_a_socketpair_are_our_own(pair):
    a, b = pair
    assert peer_credentials(a) == PeerCred(os.getpid(), os.getuid(), os.getgid())
    assert peer_credentials(b).pid == os.getpid()


def test_peer_credentials_need_a_connected_unix_socket():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        message = "cannot read the peer's credentials: AF_INET is not a Unix socket"
        with pytest.raises(HandshakeError, match="^" + re.escape(message) + "$"):
            peer_credentials(s)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        message = "cannot read the peer's credentials: the socket is not connected"
        with pytest.raises(HandshakeError, match="^" + re.escape(message) + "$"):
            peer_credentials(s)


GUEST = textwrap.dedent(
    """
    import json, socket, sys
    from restore._native import lib
    fd = lib.rs_uffd_create(1, 0)
    assert fd >= 0, fd
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    regions = [{"base_host_virt_addr": 0x7f0000000000, "size": 1 << 26, "offset": 0,
                "page_size": 4096, "page_size_kib": 4096}]
    socket.send_fds(s, [json.dumps(regions).encode()], [fd])
    s.recv(1)  # like Firecracker: keep the connection open until the handler goes
    """
)


def test_a_guest_process_connecting_to_a_listening_socket(tmp_path, uffd):
    path = str(tmp_path / "uffd.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        os.chmod(path, 0o600)
        server.listen(1)
        guest = subprocess.Popen([sys.executable, "-c", GUEST, path])
        try:
            server.settimeout(10)
            conn, _ = server.accept()
            with conn, accept_handshake(conn, **GEO) as hs:
                assert hs.peer.pid == guest.pid
                assert hs.peer.uid == os.getuid()
                assert os.readlink(f"/proc/self/fd/{hs.uffd}") == "anon_inode:[userfaultfd]"
                assert hs.regions == [Region(BASE, 64 * MIB, 0, 4096)]
        finally:
            assert guest.wait(timeout=10) == 0


# -- properties over random region lists ------------------------------------------------------


def random_layout(rng: random.Random, page: int, memory: int) -> list[Region]:
    """Regions back to back in the file, scattered (in random order) in host memory."""
    n = rng.randint(1, 6)
    pages = memory // page
    cuts = sorted(rng.sample(range(1, pages), n - 1)) if n > 1 else []
    bounds = [0] + cuts + [rng.randint(cuts[-1] + 1 if cuts else 1, pages)]
    regions = []
    host = BASE
    for lo, hi in zip(bounds, bounds[1:]):
        host += rng.randint(0, 8) * page
        regions.append(Region(host, (hi - lo) * page, lo * page, page))
        host += (hi - lo) * page
    rng.shuffle(regions)
    return regions


@pytest.mark.parametrize("page", [4096, 2 * MIB])
def test_random_valid_layouts_pass_and_overlaps_are_caught(page):
    rng = random.Random(page)
    geo = dict(memory_size=256 * MIB, snapshot_page_size=4096, chunk_size=2 * MIB)
    for _ in range(300):
        regions = random_layout(rng, page, geo["memory_size"])
        assert check_regions(regions, **geo) == page
        as_json = msg(*(reg(r.base, r.size, r.offset, r.page_size) for r in regions))
        assert parse_regions(as_json) == regions
        if len(regions) < 2:
            continue
        i, j = rng.sample(range(len(regions)), 2)
        ri, rj = regions[i], regions[j]
        moved = list(regions)
        # shrink j to one page and move it inside i, in the file or in host memory
        if rng.random() < 0.5:
            moved[j] = Region(rj.base, page, ri.offset + rng.randrange(ri.pages) * page, page)
            what = "the memory file"
        else:
            moved[j] = Region(ri.base + rng.randrange(ri.pages) * page, page, rj.offset, page)
            what = "host memory"
        lo, hi = min(i, j), max(i, j)
        with pytest.raises(HandshakeError, match=rf"^region {hi} overlaps region {lo} in {what}: "):
            check_regions(moved, **geo)


@pytest.mark.parametrize("peerpidfd", [True, False])
def test_peer_pidfd_names_the_connecting_process(tmp_path, monkeypatch, peerpidfd):
    """A pidfd of the peer: from SO_PEERPIDFD, or (where that option is
    unknown) from pidfd_open of the SO_PEERCRED pid; none for a peer in
    this very process."""
    import subprocess
    import sys

    from restore import protocol

    if not peerpidfd:
        monkeypatch.setattr(protocol, "SO_PEERPIDFD", 0x7FFF)  # an option no kernel knows
    path = str(tmp_path / "p.sock")
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(path)
    lst.listen(1)
    child = subprocess.Popen([sys.executable, "-c", "import socket, sys, time; s = socket.socket(socket.AF_UNIX); "
                              "s.connect(sys.argv[1]); time.sleep(60)", path])
    try:
        conn, _ = lst.accept()
        pid = protocol.peer_credentials(conn).pid
        fd = protocol.peer_pidfd(conn, pid)
        assert fd >= 0
        try:
            fdinfo = open(f"/proc/self/fdinfo/{fd}").read()
            assert f"Pid:\t{child.pid}\n" in fdinfo, fdinfo
        finally:
            os.close(fd)
        conn.close()
        me = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        me.connect(path)
        conn, _ = lst.accept()
        assert protocol.peer_pidfd(conn, protocol.peer_credentials(conn).pid) == -1
        conn.close()
        me.close()
    finally:
        child.kill()
        child.wait()
        lst.close()
