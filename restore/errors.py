"""The package's exceptions, and the one place where C results become them.

Expected failures (bad input, a damaged chunk, a wrong key) raise a typed
exception whose message names the problem and the input. A C result that
cannot happen with valid arguments raises InternalError with the raw code.
"""

from __future__ import annotations

import errno
import os
from typing import Optional


class RestoreError(Exception):
    """Base class of every error this package raises on purpose."""


class InputError(RestoreError, ValueError):
    """An argument, file or setting given to restore is not acceptable."""


class MemoryFileError(InputError):
    """The memory file is missing, unreadable, or has a bad size."""


class ChunkSizeError(InputError):
    """The chunk size is not a power of two of at least 4 KiB."""


class InvalidName(InputError):
    """A snapshot name or version has characters or a length we refuse."""


class UnknownStoreScheme(InputError):
    """A store URL names a scheme restore cannot open."""


class KeyProviderError(InputError):
    """An encryption key could not be read (missing file, bad length, ...)."""


class SnapshotExists(RestoreError):
    """A snapshot name and version already exist; versions are immutable."""


class SnapshotNotFound(RestoreError):
    """No snapshot (or no such version) in the store."""


class SnapshotPending(RestoreError):
    """The snapshot version is still being created (or its creation died)."""


class ManifestError(RestoreError):
    """A manifest is truncated, not JSON, or inconsistent."""


class UnsupportedManifestVersion(ManifestError):
    """A manifest's format major version is newer than this package reads."""


class ChunkError(RestoreError):
    """A chunk's stored bytes cannot be used."""


class ChunkHashMismatch(ChunkError):
    """SHA-256 of a chunk's stored bytes is not its id."""


class ChunkMalformed(ChunkError):
    """A chunk passed its hash check but does not decode to its slots."""


class ChunkMissing(ChunkError):
    """A chunk object named by the manifest is absent from the store."""


class DecryptionError(RestoreError):
    """An encrypted snapshot could not be decrypted."""


class MissingKey(DecryptionError):
    """The snapshot is encrypted and no key was given."""


class WrongKey(DecryptionError):
    """The key given is not the snapshot's key, or the ciphertext was forged."""


class StoreError(RestoreError):
    """The object store failed (I/O, permissions, network)."""


class HostCacheError(RestoreError):
    """The host cache's files cannot be opened or written (a full or
    read-only disk, permissions, files of another boot in use)."""


class InternalError(RestoreError):
    """A C call failed in a way valid arguments cannot cause."""


class UffdError(RestoreError, OSError):
    """A userfaultfd call failed.

    errno: the kernel's error code; strerror: its text.
    done: bytes handled before the error (install ioctls), else 0.
    str(): names the operation, the range and the C function, e.g.
    ``UFFDIO_COPY [0x7f2a1c000000, +0x1000): File exists (from rs_uffd_copy)``.
    """

    def __init__(self, code: int, message: str, done: int = 0):
        super().__init__(code, os.strerror(code))
        self.message = message
        self.done = done

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        return (type(self), (self.errno, self.message, self.done))


class PageExists(UffdError):
    """EEXIST: the first page of the range is already present (done is 0).

    Another installer won the race: the page is there, so wake the range
    (install ioctls do not wake on this error) and treat it as served.
    """


class MappingChanging(UffdError):
    """EAGAIN: the install stopped early; retry from dst + done.

    Two causes, which the kernel does not tell apart: the address space is
    changing (a REMOVE/UNMAP/REMAP event is pending: read events, then
    retry; EAGAIN lasts until the thread that caused the event has resumed),
    or the ioctl installed only part of the range (done > 0) and stopped
    at a page it could not fill, e.g. one already present; retrying from
    dst + done then reports the real reason (PageExists). The installed part
    was woken unless wake=False.
    """


class GuestGone(UffdError):
    """ESRCH: the address space the userfaultfd serves no longer exists
    (the guest process exited)."""


class UffdUnavailable(UffdError):
    """A userfaultfd could not be created or its API handshake was refused:
    ENOSYS (no userfaultfd in this kernel), EPERM/EACCES (not allowed), ..."""


# errno → (class, what it means; None: strerror's text), for each kind of
# C call: the key is the class a call's other failures raise (error_for's
# base). The same code can mean different things to different calls
# (EAGAIN from an install ioctl is not EAGAIN from the host cache).
_ERRNO_CLASSES: dict[type[Exception], dict[int, tuple[type[Exception], Optional[str]]]] = {
    # The engine and the codec: decoding, verifying and decrypting chunks.
    InternalError: {
        errno.EBADMSG: (ChunkHashMismatch, "SHA-256 of the stored bytes is not the chunk id"),
        errno.EPROTO: (ChunkMalformed, "stored bytes do not decode to the chunk's pages"),
        errno.ENOKEY: (MissingKey, "the chunk is encrypted and no key was given"),
        errno.EKEYREJECTED: (WrongKey, "decryption failed: wrong key or forged ciphertext"),
    },
    # userfaultfd ioctls.
    UffdError: {
        errno.EEXIST: (PageExists, None),
        errno.EAGAIN: (MappingChanging, None),
        errno.ESRCH: (GuestGone, None),
    },
}


def meaning(rc: int, base: type[Exception] = InternalError) -> str:
    """What a negative C result means, in words."""
    what = _ERRNO_CLASSES.get(base, {}).get(-rc, (None, None))[1]
    return what or os.strerror(-rc)


def error_for(rc: int, fn: str, context: str = "", *, base: type[Exception] = InternalError,
              done: int = 0) -> Exception:
    """The package's exception for a negative result rc of C function fn.

    context names the input (e.g. "chunk 3 at offset 0x180000" or
    "UFFDIO_COPY [0x7f..., +0x1000)") and starts the message. base: the kind
    of call, and the class of a failure its table does not name
    (InternalError: the engine and codec; UffdError: userfaultfd calls;
    or any RestoreError taking a message, e.g. HostCacheError). UffdError
    classes carry the errno and done (bytes handled before the error). With
    base InternalError, ENOMEM is a MemoryError and any other unnamed code
    an InternalError carrying an OSError with the raw errno.
    """
    code = -rc
    prefix = f"{context}: " if context else ""
    cls, what = _ERRNO_CLASSES.get(base, {}).get(code, (base, None))
    if issubclass(cls, UffdError):
        after = f" after {done:#x} bytes" if done else ""
        return cls(code, f"{prefix}{os.strerror(code)}{after} (from {fn})", done)
    if cls is not InternalError:
        return cls(f"{prefix}{what or os.strerror(code)} (from {fn})")
    if code == errno.ENOMEM:
        return MemoryError(f"{prefix}out of memory (from {fn})")
    exc = InternalError(f"{prefix}{fn} failed: {os.strerror(code)}")
    exc.__cause__ = OSError(code, f"{os.strerror(code)} (from {fn})")
    return exc


def check(rc: int, fn: str, context: str = "", base: type[Exception] = InternalError) -> int:
    """rc, if C function fn succeeded (rc >= 0); else raise error_for's exception."""
    if rc < 0:
        raise error_for(rc, fn, context, base=base)
    return rc
