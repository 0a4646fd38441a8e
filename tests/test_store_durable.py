"""The durable store wrapper over obstore: URLs, atomic create-only puts,
listing, and errors that name the store."""

from __future__ import annotations

import re

import pytest

from restore.errors import StoreError, UnknownStoreScheme
from restore.tiers.durable import DurableStore, S3Options, default_store_url


@pytest.mark.parametrize("kind", ["file", "plain-path", "memory"])
def test_basic_operations(tmp_path, kind):
    url = {"file": f"file://{tmp_path}/s", "plain-path": str(tmp_path / "s"), "memory": "memory://"}[kind]
    s = DurableStore(url)
    assert s.get("chunks/a") is None and not s.exists("chunks/a")
    assert s.put("chunks/a", b"one", create_only=True) is True
    assert s.put("chunks/a", b"two", create_only=True) is False  # left as it was
    assert s.put_new("chunks/a", b"two") is False
    assert s.get("chunks/a") == b"one"
    assert s.put_new("chunks/b", b"new") is True and s.get("chunks/b") == b"new"
    s.delete("chunks/b")
    s.put("chunks/a", b"three")
    assert s.get("chunks/a") == b"three"
    s.put("snapshots/x/1/manifest.json", b"{}")
    assert sorted(i.key for i in s.list("chunks/")) == ["chunks/a"]
    assert {i.key: i.size for i in s.list("")} == {"chunks/a": 5, "snapshots/x/1/manifest.json": 2}
    s.delete("chunks/a")
    s.delete("chunks/a")  # deleting a missing object is fine
    assert not s.exists("chunks/a")
    assert list(s.list("nothing/")) == []


@pytest.mark.parametrize("kind", ["file", "memory"])
@pytest.mark.parametrize("keys", [("chunks/" + "ab" * 32, "chunks/" + "cd" * 32),
                                  ("snapshots/x/1/manifest.json", "snapshots/x/2/manifest.json")])
def test_put_stores_the_bytes_as_they_were(tmp_path, kind, keys):
    """A buffer changed after put does not change the object (obstore's
    memory store would keep the buffer itself)."""
    s = DurableStore({"file": f"file://{tmp_path}/s", "memory": "memory://"}[kind])
    first, second = keys
    buf = bytearray(b"before" * 1000)
    assert s.put(first, buf) is True
    view = memoryview(bytearray(b"second" * 1000))
    assert s.put_new(second, view[1000:]) is True
    buf[:6] = b"AFTER!"
    view[1000:1006] = b"AFTER!"
    assert s.get(first) == b"before" * 1000
    assert s.get(second) == (b"second" * 1000)[1000:]


def test_file_store_chunk_objects_are_obstores_layout(tmp_path):
    """A file:// store reads and writes chunk objects itself: obstore reads
    what it wrote and the other way round, staging files never show, and
    failures are StoreErrors naming the store and the key."""
    import obstore
    from obstore.store import LocalStore

    s, raw = DurableStore(f"file://{tmp_path}/s"), LocalStore(tmp_path / "s")
    mine, theirs, missing = (f"chunks/{c * 64}" for c in "abc")
    assert s.get(missing) is None  # no chunks/ directory yet
    assert s.put(mine, b"one", create_only=True) is True
    assert bytes(obstore.get(raw, mine).bytes()) == b"one"
    assert s.put(mine, b"two", create_only=True) is False and s.get(mine) == b"one"
    s.put(mine, memoryview(b"three"))
    assert bytes(obstore.get(raw, mine).bytes()) == b"three"
    obstore.put(raw, theirs, b"obstore's")
    assert s.get(theirs) == b"obstore's" and s.get(missing) is None
    assert sorted((tmp_path / "s" / "chunks").iterdir()) == [tmp_path / "s" / k for k in (mine, theirs)]
    (tmp_path / "s" / f"{missing}#12").write_bytes(b"left by a crash")
    assert sorted(i.key for i in s.list("chunks/")) == [mine, theirs]

    (tmp_path / "s" / missing).mkdir()
    with pytest.raises(StoreError, match=re.escape(f"store file://{tmp_path}/s: get '{missing}' failed: ")):
        s.get(missing)
    blocked = DurableStore(f"file://{tmp_path}/t")
    (tmp_path / "t" / "chunks").write_bytes(b"a file where the directory goes")
    with pytest.raises(StoreError, match=re.escape(f"store file://{tmp_path}/t: put '{mine}' failed: ")):
        blocked.put_new(mine, b"one")


def test_relative_file_url_resolves_from_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    DurableStore("file://rel/store").put("k", b"v")
    assert (tmp_path / "rel" / "store" / "k").read_bytes() == b"v"


def test_default_store_url(monkeypatch, tmp_path):
    monkeypatch.delenv("RESTORE_STORE", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_store_url() == f"file://{tmp_path}/restore/store"
    monkeypatch.setenv("RESTORE_STORE", "s3://b/p")
    assert default_store_url() == "s3://b/p"


@pytest.mark.parametrize("url,scheme", [("ftp://h/x", "ftp"), ("http://h/x", "http"), ("S4://b", "s4")])
def test_unknown_schemes(url, scheme):
    with pytest.raises(UnknownStoreScheme, match=re.escape(f"store URL '{url}': unknown scheme '{scheme}'")):
        DurableStore(url)


def test_s3_url_needs_a_bucket():
    with pytest.raises(UnknownStoreScheme, match=re.escape("store URL 's3://' names no bucket")):
        DurableStore("s3://")


def test_s3_store_config_is_accepted_without_network():
    s = DurableStore(
        "s3://bucket/some/prefix",
        S3Options(endpoint="http://127.0.0.1:1", region="us-east-1", access_key_id="a", secret_access_key="b"),
    )
    assert repr(s) == "DurableStore('s3://bucket/some/prefix')"


def test_unreachable_s3_endpoint_is_a_store_error():
    """Nothing listens on port 1: the error names the endpoint's setting, why, the store and the key."""
    s = DurableStore(
        "s3://bucket",
        S3Options(endpoint="http://127.0.0.1:1", region="us-east-1", access_key_id="a", secret_access_key="b",
                  deadline=1),
    )
    with pytest.raises(StoreError, match=re.escape(
            "S3Options.endpoint=http://127.0.0.1:1: cannot connect: connection refused (store s3://bucket: get 'chunks/x' failed)")):
        s.get("chunks/x")
