"""Bad input to snapshot creation and reading: a clear error naming the
problem and the input, and nothing partially written that looks ACTIVE."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import pytest

from restore.errors import (
    ChunkSizeError,
    InputError,
    InvalidName,
    MemoryFileError,
    MissingKey,
    SnapshotExists,
    SnapshotNotFound,
    SnapshotPending,
    StoreError,
    UnknownStoreScheme,
    WrongKey,
)
from restore.objects import chunk_key
from restore.snapshot import Snapshot, create_snapshot, list_snapshots, load_manifest, remove_snapshot
from restore.tiers.durable import DurableStore

CHUNK = 64 * 1024


def test_missing_memory_file(tmp_path, store):
    p = tmp_path / "nope.img"
    with pytest.raises(MemoryFileError, match=re.escape(f"memory file '{p}': no such file")):
        create_snapshot(store, p, "vm")


def test_memory_file_is_a_directory(tmp_path, store):
    with pytest.raises(MemoryFileError, match=re.escape(f"memory file '{tmp_path}' is a directory")):
        create_snapshot(store, tmp_path, "vm")


def test_empty_memory_file(tmp_path, store):
    p = tmp_path / "empty.img"
    p.write_bytes(b"")
    with pytest.raises(MemoryFileError, match=re.escape(f"memory file '{p}' is empty")):
        create_snapshot(store, p, "vm")


def test_memory_file_not_page_multiple(tmp_path, store):
    p = tmp_path / "odd.img"
    p.write_bytes(b"x" * 10000)
    with pytest.raises(
        MemoryFileError, match=re.escape(f"memory file '{p}' is 10000 bytes, not a multiple of the 4096-byte page size")
    ):
        create_snapshot(store, p, "vm")
    assert list_snapshots(store) == []


def test_unreadable_memory_file(tmp_path):
    """Checked in a child process that runs as an unprivileged user when we
    are root (root reads any file)."""
    d = tempfile.mkdtemp(prefix="restore-unreadable-")
    try:
        os.chmod(d, 0o755)
        p = os.path.join(d, "secret.img")
        with open(p, "wb") as f:
            f.write(bytes(8192))
        os.chmod(p, 0)
        code = (
            "import os, sys\n"
            "from restore.snapshot import memory_file_size\n"
            "from restore.errors import MemoryFileError\n"
            "if os.geteuid() == 0: os.setgid(65534); os.setuid(65534)\n"
            "try: memory_file_size(sys.argv[1])\n"
            "except MemoryFileError as e: print(e)\n"
        )
        proc = subprocess.run([sys.executable, "-c", code, p], capture_output=True, text=True, timeout=60)
        assert proc.stdout.strip() == f"memory file '{p}' cannot be read: Permission denied", proc.stderr
    finally:
        os.chmod(os.path.join(d, "secret.img"), 0o600)
        os.unlink(os.path.join(d, "secret.img"))
        os.rmdir(d)


@pytest.mark.parametrize(
    "size,message",
    [
        (3000, "chunk size 3000 is not a power of two of at least 4096 bytes"),
        (2048, "chunk size 2048 is not a power of two of at least 4096 bytes"),
        (3 * 65536, "chunk size 196608 is not a power of two of at least 4096 bytes"),
        (0, "chunk size 0 is not a power of two of at least 4096 bytes"),
    ],
)
def test_bad_chunk_size(store, mixed_image, size, message):
    with pytest.raises(ChunkSizeError, match=re.escape(message)):
        create_snapshot(store, mixed_image, "vm", chunk_size=size)


@pytest.mark.parametrize("name", ["", "../etc", "a/b", ".hidden", "-x", "x" * 129, "sp ace"])
def test_bad_names(store, mixed_image, name):
    with pytest.raises(InvalidName, match=re.escape(f"snapshot name {name!r} is not valid")):
        create_snapshot(store, mixed_image, name)
    with pytest.raises(InvalidName, match=re.escape(f"snapshot version {name!r} is not valid")):
        create_snapshot(store, mixed_image, "vm", name)


def test_existing_version_is_refused(store, mixed_image):
    create_snapshot(store, mixed_image, "vm", "7", chunk_size=CHUNK)
    before = store.get("snapshots/vm/7/manifest.json")
    with pytest.raises(
        SnapshotExists,
        match=re.escape("snapshot vm/7 already exists; versions are immutable (choose another --version)"),
    ):
        create_snapshot(store, mixed_image, "vm", "7", chunk_size=CHUNK)
    assert store.get("snapshots/vm/7/manifest.json") == before
    assert create_snapshot(store, mixed_image, "vm", chunk_size=CHUNK).version == "8"


def test_pending_version_is_refused_until_removed(store, mixed_image):
    store.put("snapshots/vm/3/pending.json", b'{"pid": 1}')
    assert [(r.version, r.state) for r in list_snapshots(store)] == [("3", "PENDING")]
    with pytest.raises(SnapshotExists, match=re.escape("snapshot vm/3 is PENDING: another creation claimed it")):
        create_snapshot(store, mixed_image, "vm", "3")
    with pytest.raises(SnapshotPending, match=re.escape("snapshot vm/3 is PENDING")):
        load_manifest(store, "vm", "3")
    with pytest.raises(SnapshotNotFound, match=re.escape("no snapshot named 'vm' in")):
        load_manifest(store, "vm")  # a PENDING version is never the default
    remove_snapshot(store, "vm", "3")
    assert create_snapshot(store, mixed_image, "vm", "3", chunk_size=CHUNK).version == "3"


def test_unknown_store_scheme():
    with pytest.raises(
        UnknownStoreScheme,
        match=re.escape("store URL 'ftp://host/x': unknown scheme 'ftp' (use one of file://, memory://, s3://, gs://, az://)"),
    ):
        DurableStore("ftp://host/x")


def test_store_path_that_is_a_file(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(StoreError, match=re.escape(f"store directory '{f}' is not a directory")):
        DurableStore(f"file://{f}")


class _FailingStore(DurableStore):
    """A real file store whose chunk uploads start failing after a few
    objects, as a full disk or a dropped connection would."""

    def __init__(self, url: str, fail_after: int):
        super().__init__(url)
        self.left = fail_after

    def put(self, key, data, *, create_only=False):
        if key.startswith("chunks/"):
            if self.left == 0:
                raise StoreError(f"store {self.url}: put '{key}' failed: No space left on device")
            self.left -= 1
        return super().put(key, data, create_only=create_only)


def test_failed_creation_leaves_nothing_active(tmp_path, mixed_image):
    store = _FailingStore(f"file://{tmp_path / 'store'}", fail_after=5)
    with pytest.raises(StoreError, match="No space left on device"):
        create_snapshot(store, mixed_image, "vm", chunk_size=4096)
    assert list_snapshots(store) == []  # neither ACTIVE nor a stale PENDING claim
    assert 0 < len(list(store.list("chunks/"))) <= 5
    # The same version can then be created for real.
    good = DurableStore(store.url)
    assert create_snapshot(good, mixed_image, "vm", chunk_size=4096).version == "1"


def test_bad_worker_counts(store, mixed_image):
    with pytest.raises(InputError, match=re.escape("workers must be at least 1, got 0")):
        create_snapshot(store, mixed_image, "vm", workers=0)
    with pytest.raises(InputError, match=re.escape("uploads must be at least 1, got 0")):
        create_snapshot(store, mixed_image, "vm", uploads=0)


def test_missing_and_wrong_key(store, mixed_image, key):
    create_snapshot(store, mixed_image, "vm", chunk_size=CHUNK, key=key)
    with pytest.raises(MissingKey, match=re.escape("snapshot vm/1 is encrypted: give its key (--key-file or --key-env)")):
        Snapshot.open(store, "vm")
    with pytest.raises(WrongKey, match=re.escape("the key given is not the key of snapshot vm/1 (key check differs)")):
        Snapshot.open(store, "vm", key=b"\x07" * 32)
    # Nothing readable without the key: the stored chunks are ciphertext.
    text = mixed_image.read_bytes()[:4096]
    assert all(text[:64] not in store.get(i.key) for i in store.list("chunks/"))


def test_verify_names_each_bad_chunk(store, mixed_image):
    m = create_snapshot(store, mixed_image, "vm", chunk_size=CHUNK)
    stored = [i for i, c in enumerate(m.chunks) if c.id]
    damaged, missing = stored[1], stored[-1]
    k = chunk_key(m.chunks[damaged].id)
    data = bytearray(store.get(k))
    data[10] ^= 0xFF
    store.put(k, bytes(data))
    store.delete(chunk_key(m.chunks[missing].id))
    with Snapshot.open(store, "vm") as snap:
        bad = snap.verify()
    assert [(b.index, b.offset) for b in bad] == [(damaged, damaged * CHUNK), (missing, missing * CHUNK)]
    assert bad[0].reason == (
        f"snapshot vm/1 chunk {damaged} at offset {damaged * CHUNK:#x}: "
        "SHA-256 of the stored bytes is not the chunk id (from rs_chunk_decode)"
    )
    assert bad[1].reason == (
        f"snapshot vm/1 chunk {missing} at offset {missing * CHUNK:#x}: "
        f"object {chunk_key(m.chunks[missing].id)} is missing from {store.url}"
    )


def test_an_encrypted_snapshots_manifest_is_authenticated(tmp_path, store, key, mixed_image, run_cli):
    """A manifest altered in the store (chunks swapped, so a guest would get
    another chunk's bytes), stripped of its MAC, or given a made-up one is
    refused before any chunk is read; a plain snapshot has no MAC to check."""
    import json

    from restore.errors import ManifestError

    m = create_snapshot(store, mixed_image, "sec", chunk_size=64 * 1024, key=key)
    good = store.get(m.key)
    doc = json.loads(good)
    assert len(doc["mac"]) == 64
    with Snapshot.open(store, "sec", key=key) as s:
        assert s.verify() == []
    data = [i for i, c in enumerate(doc["chunks"]) if c["id"]]
    swapped = json.loads(good)
    a, b = data[0], data[1]
    swapped["chunks"][a], swapped["chunks"][b] = swapped["chunks"][b], swapped["chunks"][a]
    stripped = {k: v for k, v in doc.items() if k != "mac"}
    made_up = {**doc, "mac": "0" * 64}
    where = f"{store.url}/{m.key}"
    for bad, why in [(swapped, "fails authentication: it was altered or forged"),
                     (made_up, "fails authentication: it was altered or forged"),
                     (stripped, "is not authenticated (it has no mac)")]:
        store.put(m.key, json.dumps(bad).encode())
        with pytest.raises(ManifestError, match=re.escape(f"manifest {where} {why}")):
            Snapshot.open(store, "sec", key=key)
    key_file = tmp_path / "k.hex"
    key_file.write_text(key.hex())
    cli = run_cli("snapshot", "verify", "sec", "--key-file", str(key_file), "--store", store.url)
    assert cli.returncode == 1 and "is not authenticated (it has no mac)" in cli.stderr
    store.put(m.key, good)
    plain = create_snapshot(store, mixed_image, "open", chunk_size=64 * 1024)
    assert "mac" not in json.loads(store.get(plain.key))
    with Snapshot.open(store, "open") as s:
        assert s.verify() == []
