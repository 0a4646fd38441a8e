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
from pathlib import Path
from typing import Optional

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
    """Read a key from a file (hex, base64 or 32 raw bytes)."""
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
    """Read a key from environment variable name (hex or base64)."""
    value = os.environ.get(name)
    if value is None:
        raise KeyProviderError(f"environment variable {name} is not set")
    return _parse(value.encode(), f"environment variable {name}")


def load_key(key_file: Optional[str | os.PathLike] = None, key_env: Optional[str] = None) -> Optional[bytes]:
    """The key named by at most one of key_file / key_env, or None."""
    if key_file is not None and key_env is not None:
        raise KeyProviderError("give the key either as a file or as an environment variable, not both")
    if key_file is not None:
        return key_from_file(key_file)
    if key_env is not None:
        return key_from_env(key_env)
    return None


def generate_key_file(path: str | os.PathLike) -> Path:
    """Write a new random key, as hex, to a new file of mode 0600."""
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
