"""Key providers: every accepted encoding, and clear errors otherwise."""

from __future__ import annotations

import base64
import os
import re

import pytest

from restore.errors import KeyProviderError
from restore.keys import generate_key_file, key_from_env, key_from_file, load_key

KEY = bytes(range(32))


@pytest.mark.parametrize(
    "content",
    [KEY, KEY.hex().encode(), KEY.hex().encode() + b"\n", KEY.hex().upper().encode(), base64.b64encode(KEY) + b"\n"],
    ids=["raw", "hex", "hex-newline", "HEX", "base64"],
)
def test_key_file_encodings(tmp_path, content):
    p = tmp_path / "k"
    p.write_bytes(content)
    assert key_from_file(p) == KEY


@pytest.mark.parametrize("content", [b"", b"abc", KEY[:31], KEY.hex()[:-2].encode(), b"z" * 64])
def test_bad_key_files(tmp_path, content):
    p = tmp_path / "k"
    p.write_bytes(content)
    with pytest.raises(
        KeyProviderError,
        match=re.escape(f"key file '{p}' does not hold a 32-byte key (expected 64 hex digits, base64 of 32 bytes, or 32 raw bytes)"),
    ):
        key_from_file(p)


def test_missing_key_file_and_directory(tmp_path):
    with pytest.raises(KeyProviderError, match=re.escape(f"key file '{tmp_path / 'x'}': no such file")):
        key_from_file(tmp_path / "x")
    with pytest.raises(KeyProviderError, match=re.escape(f"key file '{tmp_path}' is a directory")):
        key_from_file(tmp_path)


def test_env_keys(monkeypatch):
    monkeypatch.setenv("K_HEX", KEY.hex())
    monkeypatch.setenv("K_B64", base64.b64encode(KEY).decode())
    monkeypatch.setenv("K_BAD", "hunter2")
    assert key_from_env("K_HEX") == KEY == key_from_env("K_B64")
    with pytest.raises(KeyProviderError, match=re.escape("environment variable K_BAD does not hold a 32-byte key")):
        key_from_env("K_BAD")
    monkeypatch.delenv("K_NONE", raising=False)
    with pytest.raises(KeyProviderError, match=re.escape("environment variable K_NONE is not set")):
        key_from_env("K_NONE")


def test_load_key_picks_one_source(tmp_path, monkeypatch):
    assert load_key() is None
    p = generate_key_file(tmp_path / "k")
    assert os.stat(p).st_mode & 0o777 == 0o600
    assert len(load_key(key_file=p)) == 32
    monkeypatch.setenv("K", KEY.hex())
    assert load_key(key_env="K") == KEY
    with pytest.raises(KeyProviderError, match="not both"):
        load_key(key_file=p, key_env="K")
    with pytest.raises(KeyProviderError, match=re.escape(f"key file '{p}' already exists; refusing to overwrite a key")):
        generate_key_file(p)


def test_providers_read_the_key_each_time_and_never_show_it(tmp_path, monkeypatch):
    from restore.keys import EnvKeyProvider, FileKeyProvider, key_provider

    p = tmp_path / "k"
    p.write_text(KEY.hex())
    fp = key_provider(key_file=p)
    assert isinstance(fp, FileKeyProvider) and fp.key() == KEY and fp.describe() == f"key file '{p}'"
    other = bytes(range(32))
    p.write_text(other.hex())  # rotated: the next read sees the new key
    assert fp.key() == other
    monkeypatch.setenv("K", KEY.hex())
    ep = key_provider(key_env="K")
    assert isinstance(ep, EnvKeyProvider) and ep.key() == KEY and ep.describe() == "environment variable K"
    for provider in (fp, ep):
        assert KEY.hex() not in repr(provider) and other.hex() not in repr(provider)
    assert key_provider() is None
