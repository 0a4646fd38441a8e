"""The receiving side of Firecracker's UFFD handler protocol.

The handler listens on a Unix stream socket (mode 0600). Firecracker
connects and sends **one** message, then keeps the connection open and
sends nothing more::

    sendmsg(payload = JSON array of regions, SCM_RIGHTS = [uffd])

    [{"base_host_virt_addr": 139637976727552,  u64, host address of the region
      "size": 134217728,                       bytes
      "offset": 0,                             u64, bytes into the memory file
      "page_size": 4096,                       bytes
      "page_size_kib": 4096},                  deprecated; bytes despite its name
     ...]

A region maps host address ``a`` in ``[base, base + size)`` to memory file
offset ``offset + (a - base)``. Either page-size field is accepted;
``page_size`` wins when both are present. Unknown keys are ignored.

As implemented here:

- ``recv_handshake`` reads with ``recvmsg`` (``MSG_CMSG_CLOEXEC``, ancillary
  room for 8 fds so that extra ones are seen and closed) until it holds a
  complete JSON value and at least one fd. The payload may come in pieces
  and the fd with any piece. When the JSON is complete but no fd came, it
  polls ``fd_retries`` more times, ``FD_RETRY_WAIT`` seconds each, for a
  late fd, then refuses. Everything is bounded by ``timeout`` (seconds).
  The payload is capped at ``max_payload`` bytes. Bytes sent after the
  first complete message with its fd are left unread in the socket.
- fds: one (the userfaultfd, registered by the guest in MISSING mode) is
  the upstream protocol. Two: the userfaultfd, then a memfd holding guest
  memory, as in E2B's fork, with region r mapped shared from the memfd at
  its memory-file offset and registered MISSING|MINOR. ``accept_handshake``
  checks that the second fd is a memfd (it answers F_GET_SEALS) that covers
  every region, with 4 KiB pages. More than two are refused by
  ``recv_handshake``.
- ``accept_handshake`` also reads the peer's pid/uid/gid (``SO_PEERCRED``)
  and refuses a uid not served on the socket (``PeerNotAllowed``, having
  read its handshake only to learn whether it sent a userfaultfd), checks
  that the fd is a userfaultfd (its ``/proc/self/fd`` link, when
  /proc is mounted), and checks the regions against the snapshot geometry
  (``check_regions``).

Ownership: every fd received belongs to this module until a Handshake is
returned; on any refusal all of them are closed before HandshakeError is
raised. A returned Handshake owns its ``uffd``: call ``close()`` (or use it
as a context manager), or ``detach_uffd()`` to hand the fd to someone else.
"""

from __future__ import annotations

import array
import fcntl
import json
import os
import re
import select
import socket
import struct
import time
from dataclasses import dataclass
from typing import Collection, Iterable, Optional, Sequence

from .errors import InputError
from .units import KIB, MIB, exact_bytes

__all__ = [
    "FD_RETRY_WAIT",
    "MAX_FDS",
    "PAGE_SIZES",
    "Handshake",
    "HandshakeError",
    "PeerCred",
    "Region",
    "accept_handshake",
    "check_regions",
    "parse_regions",
    "peer_credentials",
    "peer_pidfd",
    "peer_sent_uffd",
    "recv_handshake",
]

U64_LIMIT = 1 << 64

PAGE_SIZES = (4 * KIB, 2 * MIB)  # bytes: base pages and hugetlbfs huge pages
MAX_FDS = 8  # ancillary room, in fds, of each recvmsg
FD_RETRY_WAIT = 0.05  # seconds each late-fd poll waits once the payload is complete
_READ_SIZE = 64 * KIB  # bytes asked of each recvmsg at most

_REQUIRED = ("base_host_virt_addr", "size", "offset")


class HandshakeError(InputError):
    """The guest's handshake cannot be accepted; the message says why.

    kill: whether the peer's VMM must be killed (a VMM whose memory is
    registered with a userfaultfd nobody serves hangs at its first fault);
    because: why, for the log line that says it was killed."""

    def __init__(self, message: str, *, kill: bool = True,
                 because: str = "it cannot run without its page-fault handler"):
        super().__init__(message)
        self.kill = kill
        self.because = because


class PeerNotAllowed(HandshakeError):
    """The peer's uid is not served on the socket it came on. Nothing of the
    snapshot is served to it; kill says whether it sent a userfaultfd (a
    VMM that would hang), else it is only hung up on."""


def _span(start: int, size: int) -> str:
    return f"[{start:#x}, +{exact_bytes(size)})"


@dataclass(frozen=True)
class Region:
    """One guest memory region: host addresses [base, base + size) hold
    memory file bytes [offset, offset + size). All fields in bytes."""

    base: int  # host virtual address of the region's first byte
    size: int  # bytes
    offset: int  # bytes into the memory file
    page_size: int  # bytes: 4096 or 2 MiB

    @property
    def end(self) -> int:
        """Host address one past the region's last byte."""
        return self.base + self.size

    @property
    def file_end(self) -> int:
        """Memory file offset one past the region's last byte."""
        return self.offset + self.size

    @property
    def pages(self) -> int:
        return self.size // self.page_size

    def contains(self, addr: int) -> bool:
        return self.base <= addr < self.end

    def file_offset(self, addr: int) -> int:
        """The memory file offset that backs host address addr."""
        if not self.contains(addr):
            raise ValueError(f"address {addr:#x} is outside region {_span(self.base, self.size)}")
        return self.offset + (addr - self.base)


@dataclass(frozen=True)
class PeerCred:
    """The connecting process, as the kernel saw it at connect time."""

    pid: int
    uid: int
    gid: int


@dataclass
class Handshake:
    """An accepted handshake. Owns uffd (an fd, -1 once closed or detached)
    and memfd (the guest memory's memfd when the guest sent one, else -1)."""

    regions: list[Region]
    uffd: int
    peer: PeerCred
    page_size: int  # bytes: the guest page size, shared by all regions
    memfd: int = -1

    def detach_uffd(self) -> int:
        """Give up ownership of the userfaultfd and return it."""
        fd, self.uffd = self.uffd, -1
        return fd

    def close(self) -> None:
        """Close the userfaultfd and the memfd (idempotent)."""
        fds = (self.uffd, self.memfd)
        self.uffd = self.memfd = -1
        _close_all(fd for fd in fds if fd >= 0)

    def __enter__(self) -> "Handshake":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def peer_credentials(conn: socket.socket) -> PeerCred:
    """pid, uid and gid of the process at the other end of a Unix socket."""
    if conn.family != socket.AF_UNIX:
        raise HandshakeError(f"cannot read the peer's credentials: {conn.family.name} is not a Unix socket")
    size = struct.calcsize("iII")
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, size)
    except OSError as exc:
        raise HandshakeError(f"cannot read the peer's credentials (SO_PEERCRED): {exc.strerror}") from None
    pid, uid, gid = struct.unpack("iII", raw)
    if pid == 0:  # what the kernel reports for a socket that never had a peer
        raise HandshakeError("cannot read the peer's credentials: the socket is not connected")
    return PeerCred(pid, uid, gid)


SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux >= 6.5


def peer_pidfd(conn: socket.socket, pid: int) -> int:
    """A pidfd of the process at the other end of conn (O_CLOEXEC, owned by
    the caller), or -1 when there is none to have: a peer in this process
    (it will not exit while we serve it), or no pidfds here.

    SO_PEERPIDFD (Linux >= 6.5) names the very process that connected, so
    it is race-free; before it, pidfd_open(pid) with the pid from
    SO_PEERCRED, which names the right process unless that one exited and
    its pid was reused in between (the VMM waits on its handshake, so it
    has not)."""
    if pid <= 0 or pid == os.getpid():
        return -1
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4)
        fd = struct.unpack("i", raw)[0]
        if fd >= 0:
            return fd
    except OSError:
        pass
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError):
        return -1


def peer_sent_uffd(conn: socket.socket, *, timeout: float = 5.0) -> bool:
    """Read a peer's handshake (bounded as recv_handshake is) only to learn
    whether it sent a userfaultfd; closes whatever fds came. For a peer
    that is refused anyway: a VMM that sent its userfaultfd would hang at
    its first fault without a handler."""
    try:
        _payload, fds = recv_handshake(conn, timeout=timeout)
    except HandshakeError:
        return False
    try:
        _check_is_uffd(fds[0])
        return True
    except HandshakeError:
        return False
    finally:
        _close_all(fds)


# -- receiving ---------------------------------------------------------------

# Outside a string, the bytes that matter are brackets and quotes; inside,
# quotes and backslashes.
_OUTSIDE = re.compile(rb'[\[\]{}"]')
_INSIDE = re.compile(rb'["\\]')


class _JsonEnd:
    """Tells, as bytes come in, whether they hold one complete JSON array or
    object. Does not validate: a value that does not start with [ or { is
    'complete' at once, so is one with a mismatched closing bracket, and
    parse_regions then says what is wrong. Only a truly unfinished value
    makes recv_handshake wait for more."""

    _CLOSER = {b"[": b"]", b"{": b"}"}

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos = 0  # bytes of buf scanned
        self.open: list[bytes] = []  # closers expected, innermost last
        self.started = False
        self.in_string = False
        self.complete = False

    def feed(self, data: bytes) -> bool:
        self.buf += data
        if self.complete:
            return True
        if not self.started:
            stripped = bytes(self.buf).lstrip()
            if not stripped:
                return False
            self.started = True
            if stripped[:1] not in self._CLOSER:
                self.complete = True
                return True
            self.pos = len(self.buf) - len(stripped)
        buf = self.buf
        while True:
            if self.in_string:
                m = _INSIDE.search(buf, self.pos)
                if not m:
                    self.pos = len(buf)
                    return False
                if m.group() == b"\\":
                    if m.end() >= len(buf):  # the escaped byte has not come yet
                        self.pos = m.start()
                        return False
                    self.pos = m.end() + 1
                    continue
                self.in_string = False
                self.pos = m.end()
                continue
            m = _OUTSIDE.search(buf, self.pos)
            if not m:
                self.pos = len(buf)
                return False
            self.pos = m.end()
            c = m.group()
            if c == b'"':
                self.in_string = True
            elif c in self._CLOSER:
                self.open.append(self._CLOSER[c])
            elif self.open.pop() != c or not self.open:  # mismatched, or the end
                self.complete = True
                return True


def _fds_from(ancdata: Iterable[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def recv_handshake(
    conn: socket.socket,
    *,
    timeout: float = 5.0,
    max_payload: int = 1 << 20,
    fd_retries: int = 5,
) -> tuple[bytes, list[int]]:
    """Receive the handshake message: (payload bytes, fds), 1 or 2 fds.

    timeout is in seconds for the whole exchange; max_payload in bytes.
    The caller owns the fds returned. On any refusal every fd received is
    closed and HandshakeError raised. conn's blocking mode and timeout are
    left as they were.
    """
    deadline = time.monotonic() + timeout
    payload = _JsonEnd()
    fds: list[int] = []
    ancbuf = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
    flags = socket.MSG_DONTWAIT | getattr(socket, "MSG_CMSG_CLOEXEC", 0)
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    retries_left = fd_retries
    try:
        while True:
            if payload.complete and fds:
                break
            now = time.monotonic()
            if now >= deadline:
                raise _late(payload, fds, timeout)
            wait = deadline - now
            if payload.complete:  # and no fd yet: a few short polls for a late one
                if retries_left <= 0:
                    raise HandshakeError("handshake carried no userfaultfd")
                retries_left -= 1
                wait = min(wait, FD_RETRY_WAIT)
            try:
                if not poller.poll(max(1, int(wait * 1000 + 0.999))):
                    continue
                want = min(_READ_SIZE, max_payload + 1 - len(payload.buf))
                data, ancdata, msg_flags, _ = conn.recvmsg(want, ancbuf, flags)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                raise HandshakeError(f"reading the handshake failed: {exc.strerror or exc}") from None
            fds.extend(_fds_from(ancdata))
            if msg_flags & socket.MSG_CTRUNC:
                raise HandshakeError(
                    f"handshake carried more than {MAX_FDS} fds (ancillary data truncated); expected 1"
                )
            if len(fds) > 2:
                raise HandshakeError(f"handshake carried {len(fds)} fds; expected 1")
            if not data and not ancdata:  # end of stream
                if payload.complete:
                    raise HandshakeError("handshake carried no userfaultfd")
                if payload.buf or fds:
                    raise HandshakeError(
                        "peer closed the connection during the handshake, "
                        f"after {len(payload.buf)} bytes of payload and {_fd_count(fds)}"
                    )
                raise HandshakeError("peer closed the connection during the handshake")
            payload.feed(data)
            if len(payload.buf) > max_payload:
                raise HandshakeError(f"handshake payload exceeds the {max_payload}-byte limit")
    except BaseException:
        _close_all(fds)
        raise
    return bytes(payload.buf), fds


def _late(payload: _JsonEnd, fds: list[int], timeout: float) -> HandshakeError:
    if not payload.buf and not fds:
        return HandshakeError(f"no handshake within {timeout} s")
    if payload.complete:  # only when the deadline cut the late-fd polls short
        return HandshakeError("handshake carried no userfaultfd")
    return HandshakeError(
        f"no complete handshake within {timeout} s: "
        f"{len(payload.buf)} bytes of unfinished JSON payload and {_fd_count(fds)}"
    )


def _fd_count(fds: list[int]) -> str:
    return "no fd" if not fds else f"{len(fds)} fd" + ("s" if len(fds) > 1 else "")


# -- parsing and checking ------------------------------------------------------


def _u64(obj: dict, key: str, i: int) -> int:
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise HandshakeError(f"region {i} {key!r} should be a non-negative integer, got {json.dumps(v)[:40]}")
    if v >= U64_LIMIT:
        raise HandshakeError(f"region {i} {key!r} does not fit in 64 bits: {v}")
    return v


def parse_regions(payload: bytes) -> list[Region]:
    """Parse the handshake payload strictly: a JSON array of objects with
    integer (not bool, not float) non-negative u64 fields. Unknown keys are
    ignored. Geometry is checked by check_regions, not here."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HandshakeError(f"handshake payload is not UTF-8 text: bad byte at {exc.start}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        at = len(text[: exc.pos].encode())
        raise HandshakeError(f"handshake payload is not JSON: {exc.msg} at byte {at}") from None
    if not isinstance(doc, list):
        raise HandshakeError("handshake payload is not a JSON array of regions")
    regions = []
    for i, obj in enumerate(doc):
        if not isinstance(obj, dict):
            raise HandshakeError(f"region {i} is not a JSON object, got {json.dumps(obj)[:40]}")
        for key in _REQUIRED:
            if key not in obj:
                raise HandshakeError(f"region {i} is missing {key!r}")
        if "page_size" in obj:
            page_key = "page_size"
        elif "page_size_kib" in obj:
            page_key = "page_size_kib"  # carries bytes, despite its name
        else:
            raise HandshakeError(f"region {i} is missing 'page_size' (or the deprecated 'page_size_kib')")
        regions.append(
            Region(
                base=_u64(obj, "base_host_virt_addr", i),
                size=_u64(obj, "size", i),
                offset=_u64(obj, "offset", i),
                page_size=_u64(obj, page_key, i),
            )
        )
    return regions


def _first_overlap(spans: Sequence[tuple[int, int, int]]) -> Optional[tuple[int, int]]:
    """spans: (start, size, index). The (later, earlier) indices of an
    overlapping pair, or None. Empty spans never overlap."""
    ordered = sorted(s for s in spans if s[1] > 0)
    for (a_start, a_size, a), (b_start, _b_size, b) in zip(ordered, ordered[1:]):
        if b_start < a_start + a_size:
            return (max(a, b), min(a, b))
    return None


def check_regions(
    regions: Sequence[Region],
    *,
    memory_size: int,
    snapshot_page_size: int,
    chunk_size: int,
) -> int:
    """Check the guest's regions against a snapshot; return the guest page
    size (bytes). memory_size, snapshot_page_size and chunk_size are the
    snapshot manifest's, in bytes. Any chunk size serves any guest page
    size: a guest page larger than a chunk is assembled from its chunks."""
    if not regions:
        raise HandshakeError("handshake lists no regions")
    sizes = sorted({r.page_size for r in regions})
    if len(sizes) > 1:
        raise HandshakeError(f"regions use different page sizes ({', '.join(map(str, sizes))})")
    page = sizes[0]
    if page not in PAGE_SIZES:
        raise HandshakeError(f"page size {page} is not supported (4 KiB or 2 MiB)")
    if page < snapshot_page_size:
        raise HandshakeError(
            f"guest page size {exact_bytes(page)} is smaller than the snapshot's "
            f"{exact_bytes(snapshot_page_size)} page size"
        )
    if page % snapshot_page_size:
        raise HandshakeError(
            f"guest page size {exact_bytes(page)} is not a multiple of the snapshot's "
            f"{exact_bytes(snapshot_page_size)} page size"
        )
    # A guest page larger than a chunk is assembled from the chunks it
    # spans: any chunk size serves it. The memory file must be whole pages.
    if memory_size % page:
        raise HandshakeError(
            f"the snapshot's {exact_bytes(memory_size)} of memory is not a multiple of the guest's "
            f"{exact_bytes(page)} page size"
        )
    psz = exact_bytes(page)
    for i, r in enumerate(regions):
        if r.size == 0:
            raise HandshakeError(f"region {i} at {r.base:#x} is empty")
        if r.base % page:
            raise HandshakeError(f"region {i} base {r.base:#x} is not aligned to its {psz} page size")
        if r.size % page:
            raise HandshakeError(f"region {i} size {r.size} is not a multiple of its {psz} page size")
        if r.offset % page:
            raise HandshakeError(f"region {i} offset {r.offset:#x} is not aligned to its {psz} page size")
        if r.end > U64_LIMIT:
            raise HandshakeError(f"region {i} {_span(r.base, r.size)} wraps past the top of the address space")
        if r.file_end > memory_size:
            raise HandshakeError(
                f"region {i} {_span(r.base, r.size)} at file offset {r.offset:#x} "
                f"ends past the {exact_bytes(memory_size)} snapshot"
            )
    for what, key in (("the memory file", lambda r: r.offset), ("host memory", lambda r: r.base)):
        pair = _first_overlap([(key(r), r.size, i) for i, r in enumerate(regions)])
        if pair:
            j, i = pair
            rj, ri = regions[j], regions[i]
            raise HandshakeError(
                f"region {j} overlaps region {i} in {what}: "
                f"{_span(key(rj), rj.size)} and {_span(key(ri), ri.size)}"
            )
    return page


def _check_is_uffd(fd: int) -> None:
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # no /proc here: nothing to check against
        return
    if target != "anon_inode:[userfaultfd]":
        raise HandshakeError(f"handshake fd is not a userfaultfd (it is {target})")


def accept_handshake(
    conn: socket.socket,
    *,
    memory_size: int,
    snapshot_page_size: int,
    chunk_size: int,
    allowed_uids: Optional[Collection[int]] = None,
    socket_name: str = "this socket",
    timeout: float = 5.0,
) -> Handshake:
    """Check a guest's peer, then receive, parse and check its handshake on
    an accepted connection. Returns a Handshake owning the userfaultfd; on
    any refusal raises HandshakeError (PeerNotAllowed for a uid not in
    allowed_uids, the uids served on socket_name; None: any) with every
    received fd closed. Sizes in bytes, timeout in seconds."""
    peer = peer_credentials(conn)
    if allowed_uids is not None and peer.uid not in allowed_uids:
        # Its handshake is still read (bounded) to learn whether it sent a
        # userfaultfd: a VMM that did blocks at its first fault (during
        # Firecracker's PUT /snapshot/load, before the VM resumes) and would
        # hang for ever, so it must be killed.
        raise PeerNotAllowed(
            f"peer uid {peer.uid} is not allowed on {socket_name} (allowed: "
            f"{', '.join(map(str, sorted(allowed_uids)))})", kill=peer_sent_uffd(conn, timeout=timeout),
            because="it sent a userfaultfd, and a VMM whose memory nobody serves hangs at its first page fault")
    payload, fds = recv_handshake(conn, timeout=timeout)
    try:
        _check_is_uffd(fds[0])
        regions = parse_regions(payload)
        page = check_regions(
            regions, memory_size=memory_size, snapshot_page_size=snapshot_page_size, chunk_size=chunk_size
        )
        if len(fds) == 2:
            _check_memfd(fds[1], regions, page)
    except BaseException:
        _close_all(fds)
        raise
    return Handshake(regions=regions, uffd=fds[0], peer=peer, page_size=page, memfd=fds[1] if len(fds) == 2 else -1)


def _check_memfd(fd: int, regions: list[Region], page_size: int) -> None:
    """The second fd must be a memfd covering every region's file range."""
    try:
        fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise HandshakeError("the handshake's second fd is not a memfd (it does not answer F_GET_SEALS)") from None
    if page_size != 4096:
        raise HandshakeError(f"a memfd of guest memory needs 4 KiB pages, not {exact_bytes(page_size)}")
    size = os.fstat(fd).st_size
    extent = max(r.offset + r.size for r in regions)
    if size < extent:
        raise HandshakeError(f"the memfd holds {exact_bytes(size)}, less than the regions' {exact_bytes(extent)}")
