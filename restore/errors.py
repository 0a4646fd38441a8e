"""The package's exceptions, and the one place where C results become them.

Expected failures (bad input, a damaged chunk, a wrong key) raise a typed
exception whose message names the problem and the input. A C result that
cannot happen with valid arguments raises InternalError with the raw code.
"""

from __future__ import annotations

import errno
import os


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


# errno → (class, what it means); used by check().
_ERRNO_CLASSES: dict[int, tuple[type[RestoreError], str]] = {
    errno.EBADMSG: (ChunkHashMismatch, "SHA-256 of the stored bytes is not the chunk id"),
    errno.EPROTO: (ChunkMalformed, "stored bytes do not decode to the chunk's pages"),
    errno.ENOKEY: (MissingKey, "the chunk is encrypted and no key was given"),
    errno.EKEYREJECTED: (WrongKey, "decryption failed: wrong key or forged ciphertext"),
}


def check(rc: int, fn: str, context: str = "") -> None:
    """Raise the package's exception for a negative result of C function fn.

    context names the input (e.g. "chunk 3 at offset 0x180000") and starts
    the message. ENOMEM raises MemoryError; an unexpected code raises
    InternalError carrying an OSError with the raw errno.
    """
    if rc >= 0:
        return
    code = -rc
    prefix = f"{context}: " if context else ""
    if code == errno.ENOMEM:
        raise MemoryError(f"{prefix}out of memory (from {fn})")
    known = _ERRNO_CLASSES.get(code)
    if known:
        cls, what = known
        raise cls(f"{prefix}{what} (from {fn})")
    raise InternalError(f"{prefix}{fn} failed: {os.strerror(code)}") from OSError(
        code, f"{os.strerror(code)} (from {fn})"
    )
