"""Key providers: where the 32-byte snapshot encryption key comes from.

A key is 32 bytes of AES-256 key material. It is read from a key file or an
environment variable, as 64 hex digits, as base64 of 32 bytes, or (files
only) as exactly 32 raw bytes. Plaintext keys are never written to the
object store or to logs: a manifest holds only a 16-byte key check value.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

from .errors import KeyProviderError

KEY_BYTES = 32


def _parse(text: bytes, where: str) -> bytes:
    stripped = text.strip()
    if len(stripped) == 2 * KEY_BYTES:
        try:
            return bytes.fromhex(stripped.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    try:
        decoded = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) == KEY_BYTES:
        return decoded
    raise KeyProviderError(
        f"{where} does not hold a {KEY_BYTES}-byte key "
        f"(expected {2 * KEY_BYTES} hex digits, base64 of {KEY_BYTES} bytes, or {KEY_BYTES} raw bytes)"
    )


def key_from_file(path: str | os.PathLike) -> bytes:
    """Read a key from a file (hex, base64 or 32 raw bytes); returns the
    32 key bytes. Raises KeyProviderError naming the file when it is
    missing, a directory, unreadable, or holds no 32-byte key."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise KeyProviderError(f"key file '{p}': no such file") from None
    except IsADirectoryError:
        raise KeyProviderError(f"key file '{p}' is a directory") from None
    except OSError as exc:
        raise KeyProviderError(f"key file '{p}' cannot be read: {exc.strerror}") from None
    if len(data) == KEY_BYTES:
        return data
    return _parse(data, f"key file '{p}'")


def key_from_env(name: str) -> bytes:
    """Read a key from environment variable name (hex or base64); returns
    the 32 key bytes. Raises KeyProviderError naming the variable when it
    is unset or holds no 32-byte key."""
    value = os.environ.get(name)
    if value is None:
        raise KeyProviderError(f"environment variable {name} is not set")
    return _parse(value.encode(), f"environment variable {name}")


class KeyProvider(Protocol):
    """Where a snapshot key comes from. key() reads it (32 bytes) each time
    it is called, so a rotated file or variable is picked up; describe()
    names the source, never the key."""

    def key(self) -> bytes: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class FileKeyProvider:
    """A key file: 64 hex digits, base64 of 32 bytes, or 32 raw bytes."""

    path: str

    def key(self) -> bytes:
        return key_from_file(self.path)

    def describe(self) -> str:
        return f"key file '{self.path}'"


@dataclass(frozen=True)
class EnvKeyProvider:
    """An environment variable: 64 hex digits or base64 of 32 bytes."""

    name: str

    def key(self) -> bytes:
        return key_from_env(self.name)

    def describe(self) -> str:
        return f"environment variable {self.name}"


def key_provider(key_file: Optional[str | os.PathLike] = None,
                 key_env: Optional[str] = None) -> Optional[KeyProvider]:
    """The provider named by at most one of key_file / key_env, or None.
    Nothing is read yet. Raises KeyProviderError when both are given."""
    if key_file is not None and key_env is not None:
        raise KeyProviderError("give the key either as a file or as an environment variable, not both")
    if key_file is not None:
        return FileKeyProvider(os.fspath(key_file))
    if key_env is not None:
        return EnvKeyProvider(key_env)
    return None


def load_key(key_file: Optional[str | os.PathLike] = None, key_env: Optional[str] = None) -> Optional[bytes]:
    """The key (32 bytes) named by at most one of key_file / key_env, or
    None when neither is given. Raises KeyProviderError (both given, or the
    key cannot be read)."""
    provider = key_provider(key_file, key_env)
    return provider.key() if provider is not None else None


def generate_key_file(path: str | os.PathLike) -> Path:
    """Write a new random 32-byte key, as 64 hex digits and a newline, to a
    new file of mode 0600; returns its path. Raises KeyProviderError when
    the file exists (a key is never overwritten) or cannot be created."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyProviderError(f"key file '{p}' already exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise KeyProviderError(f"key file '{p}' cannot be created: {exc.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_bytes(KEY_BYTES).hex() + "\n")
    return p
