"""Test and benchmark helpers: the bare handler and what a correct restore reads.

BareHandler serves one guest (restore.guest.Guest) from an image in memory
with csrc/bare.c (in restore._testbed): one UFFDIO_COPY per fault, nothing
else. It is the performance floor the engine is measured against, and a
known-good handler for tests. expected_sums, pattern and written_sum give
the checksums a guest reports when the restore is right.
"""

from __future__ import annotations

import errno as errno_mod
import os
import threading
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from ._native import load_testbed
from .errors import InputError, InternalError, check

ffi, lib = load_testbed()

ImageLike = Union[bytes, bytearray, memoryview, np.ndarray, str, os.PathLike]


def pattern(index: int) -> int:
    """The byte a WRITE at trace position index stores (1 + index % 255)."""
    return int(lib.rs_guest_pattern(index))


def written_sum(index: int, page_size: int = 4096) -> int:
    """Checksum of a page written by the WRITE at trace position index."""
    word = pattern(index) * 0x0101010101010101
    return (page_size // 8 * word) % 2**64


def _image_array(image: ImageLike) -> np.ndarray:
    if isinstance(image, (str, os.PathLike)):
        return np.fromfile(image, dtype=np.uint8)
    if isinstance(image, np.ndarray):
        return np.ascontiguousarray(image).reshape(-1).view(np.uint8)
    return np.frombuffer(image, dtype=np.uint8)


def expected_sums(image: ImageLike, offsets: Iterable[int], page_size: int = 4096) -> np.ndarray:
    """The checksums a correct restore of image yields for reads of offsets.

    image: the memory file (bytes, array or path); offsets: file offsets in
    bytes, multiples of page_size. Equal to rs_mem_checksum of each page:
    the sum of its little-endian 64-bit words modulo 2^64.
    """
    img = _image_array(image)
    offs = np.asarray(list(offsets) if not isinstance(offsets, np.ndarray) else offsets, dtype=np.uint64)
    if offs.size and (np.any(offs % page_size) or int(offs.max()) + page_size > len(img)):
        raise InputError(
            f"offsets must be multiples of {page_size} inside the {len(img)}-byte image"
        )
    n_pages = len(img) // page_size
    per_page = img[: n_pages * page_size].view("<u8").reshape(n_pages, page_size // 8).sum(axis=1, dtype=np.uint64)
    return per_page[offs // np.uint64(page_size)]


class BareHandler:
    """Serve one guest from an image in memory with the bare C handler.

    image: the memory file (bytes, array or path); copied once into a
    page-aligned buffer. serve() starts a Python thread that runs
    rs_bare_serve in C with the GIL released; stop() ends it. It answers
    faults in removed ranges (after a REMOVE event) with zero pages. It does
    no socket handling: the caller receives the handshake and passes the
    uffd and regions.
    """

    def __init__(self, image: ImageLike):
        src = _image_array(image)
        buf = np.empty(len(src) + 4096, dtype=np.uint8)
        start = -buf.ctypes.data % 4096
        self._image = buf[start : start + len(src)]
        self._image[:] = src
        self._faults = ffi.new("uint64_t *")
        self._thread: Optional[threading.Thread] = None
        self._stop_fd: Optional[int] = None
        self._rc: Optional[int] = None
        self._args: tuple = ()

    @property
    def faults(self) -> int:
        """Faults served so far (updated after every batch)."""
        return int(self._faults[0])

    @property
    def running(self) -> bool:
        """True while the C loop runs."""
        return self._thread is not None and self._thread.is_alive()

    def serve(
        self,
        uffd: int,
        regions: Sequence[tuple[int, int, int]],
        page_size: int = 4096,
        peer_fd: Optional[int] = None,
    ) -> "BareHandler":
        """Start serving uffd (borrowed: the caller closes it after stop()).

        regions: (base_host_virt_addr, size, offset) in bytes, from the
        handshake. peer_fd: an fd that turns readable or hangs up when the
        guest is gone (its handshake socket, or a pidfd): the loop then ends
        by itself, since the uffd does not tell.
        """
        if self._thread is not None:
            raise InputError("this BareHandler is serving already")
        for i, (base, size, offset) in enumerate(regions):
            if base % page_size or offset % page_size or size <= 0 or size % page_size:
                raise InputError(f"region {i} (base {base:#x}, size {size:#x}, offset {offset:#x}) "
                                 f"is not aligned to the {page_size}-byte page")
            if offset + size > len(self._image):
                raise InputError(f"region {i} [{offset:#x}, +{size:#x}) ends past the "
                                 f"{len(self._image)}-byte image")
        bases = ffi.new("uint64_t[]", [r[0] for r in regions])
        sizes = ffi.new("uint64_t[]", [r[1] for r in regions])
        offsets = ffi.new("uint64_t[]", [r[2] for r in regions])
        image = ffi.from_buffer("uint8_t[]", self._image)
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC)
        self._args = (bases, sizes, offsets, image)  # keep alive while C runs
        call = (uffd, bases, sizes, offsets, len(regions), page_size, image, len(self._image),
                self._stop_fd, -1 if peer_fd is None else peer_fd, self._faults)
        self._rc = None
        self._thread = threading.Thread(target=self._run, args=call, name="restore-bare-handler", daemon=True)
        self._thread.start()
        return self

    def _run(self, *call) -> None:
        self._rc = lib.rs_bare_serve(*call)

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait for the loop to end by itself (the guest is gone); True if it did."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop and join the thread; raise what rs_bare_serve returned."""
        if self._thread is None:
            return
        assert self._stop_fd is not None
        os.eventfd_write(self._stop_fd, 1)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise InternalError(f"the bare handler did not stop within {timeout} s")
        os.close(self._stop_fd)
        self._thread, self._stop_fd, self._args = None, None, ()
        rc, self._rc = self._rc, None
        check(rc if rc is not None else -errno_mod.EIO, "rs_bare_serve", "bare handler")

    def __enter__(self) -> "BareHandler":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
