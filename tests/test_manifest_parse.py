"""Manifests: what creation writes parses back; truncated, non-JSON, newer
and inconsistent manifests are refused with errors naming the problem."""

from __future__ import annotations

import json
import re

import pytest

from restore.errors import ManifestError, UnsupportedManifestVersion
from restore.manifest import Manifest
from restore.sample import write_sample_image
from restore.snapshot import create_snapshot, load_manifest
from restore.tiers.durable import DurableStore

WHERE = "file:///s/snapshots/vm/1/manifest.json"


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> bytes:
    img = tmp_path_factory.mktemp("img") / "mixed.img"
    write_sample_image(img, (4 << 20) + 3 * 4096, seed=7)
    return create_snapshot(DurableStore("memory://"), img, "vm", chunk_size=64 * 1024).to_json()


@pytest.fixture
def doc(written) -> dict:
    return json.loads(written)


def _parse(d) -> Manifest:
    return Manifest.parse(json.dumps(d).encode(), WHERE)


def _refused(d, message: str, cls=ManifestError):
    with pytest.raises(cls, match=re.escape(f"manifest {WHERE}: {message}")):
        _parse(d)


def test_written_manifest_is_self_describing(doc):
    assert doc["format"] == "restore-snapshot" and doc["format_version"] == "1.1"
    assert doc["page_map"] is None and doc["plan"] is None and doc["encryption"] is None
    assert set(doc["chunks"][0]) == {"id", "stored_len", "flags", "zero"}
    m = _parse(doc)
    assert m.memory_size == (4 << 20) + 3 * 4096 and m.chunk_size == 65536 and m.page_size == 4096


def test_written_manifest_has_a_chunk_entry_per_line(written):
    lines = written.decode().splitlines()
    entries = [json.loads(line.strip().rstrip(",")) for line in lines if line.startswith('  {"id": ')]
    assert entries == json.loads(written)["chunks"] and len(entries) == 65
    assert written.endswith(b"\n ]\n}\n") and Manifest.parse(written, WHERE).to_json() == written


def test_truncated(store, doc):
    data = json.dumps(doc).encode()
    for cut in (1, len(data) // 2, len(data) - 1):
        with pytest.raises(ManifestError, match=re.escape(f"manifest {WHERE}: is not valid JSON (truncated?)")):
            Manifest.parse(data[:cut], WHERE)
    with pytest.raises(ManifestError, match=re.escape(f"manifest {WHERE}: is empty")):
        Manifest.parse(b"", WHERE)


def test_not_json():
    with pytest.raises(ManifestError, match=re.escape(f"manifest {WHERE}: is not valid JSON (truncated?): Expecting value at byte 0")):
        Manifest.parse(b"<html>503</html>", WHERE)
    with pytest.raises(ManifestError, match=re.escape(f"manifest {WHERE}: is not UTF-8 text")):
        Manifest.parse(b"\xff\xfe{", WHERE)
    with pytest.raises(ManifestError, match=re.escape(f"manifest {WHERE}: is not a JSON object")):
        Manifest.parse(b"[1, 2]", WHERE)


def test_unknown_major_version(doc):
    doc["format_version"] = "2.0"
    _refused(doc, "format version 2.0 is not supported; restore 0.1.0 reads format 1.x", UnsupportedManifestVersion)


def test_newer_minor_version_is_read_and_keeps_unknown_fields(doc):
    doc["format_version"] = "1.7"
    doc["future_field"] = {"x": 1}
    m = _parse(doc)
    assert json.loads(m.to_json())["future_field"] == {"x": 1}


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d.update(format="zip"), "is not a restore snapshot manifest (format 'zip')"),
        (lambda d: d.update(format_version="one"), "format_version 'one' is not MAJOR.MINOR"),
        (lambda d: d.pop("memory_size"), "missing field 'memory_size'"),
        (lambda d: d.update(memory_size="big"), "field 'memory_size' should be int, got \"big\""),
        (lambda d: d.update(memory_size=True), "field 'memory_size' should be int, got true"),
        (lambda d: d.update(memory_size=4097), "memory_size 4097 is not a positive multiple of the page size"),
        (lambda d: d.update(chunk_size=1000), "chunk size 1000 is not a power of two of at least 4096 bytes"),
        (lambda d: d.update(page_size=8192), "page size 8192 is not 4096 (4 KiB) or 2097152 (2 MiB)"),
        (lambda d: d.update(name="../x"), "snapshot name '../x' is not valid"),
        (lambda d: d["chunks"].pop(), "has 64 chunks but 4206592 bytes of memory in 65536-byte chunks need 65"),
        (lambda d: d.update(chunks=[]), "has no chunks"),
        (lambda d: d["chunks"][3].update(id="XYZ"), "field 'chunks[3].id' should be null or 64 lowercase hex digits"),
        (lambda d: d["chunks"][3].update(zero="ff"), "field 'chunks[3].zero' should be 4 hex digits"),
        (lambda d: d["chunks"][3].update(flags=64), "chunks[3] has unknown flags 0x40"),
        (lambda d: d["chunks"][3].update(stored_len=0), "chunks[3] has id"),
        (lambda d: d["chunks"][-1].update(zero="0000"), "chunk 64 claims slots past the end of memory"),
        (lambda d: d["chunks"][3].update(flags=3), "chunks[3] flags 0x3 disagree with the snapshot, which is not encrypted"),
        (lambda d: d.update(encryption={"algorithm": "ROT13", "key_check": "0" * 32}), "encryption algorithm 'ROT13' is not supported"),
        (lambda d: d.update(encryption={"algorithm": "AES-256-GCM", "key_check": "zz"}), "field 'encryption.key_check' should be 32 hex digits"),
        (lambda d: d.pop("encryption"), "missing field 'encryption'"),
        (lambda d: d.update(page_map={"id": "0" * 64, "pages": 3}), "page map has 3 pages but the memory has 1027"),
        (lambda d: d.update(plan="nope"), "field 'plan' should be null or 64 hex digits"),
        (lambda d: d["created"].pop("at"), "missing field 'created.at'"),
        (lambda d: d["chunks"].__setitem__(2, 5), "chunks[2] is not an object"),
    ],
)
def test_inconsistent_manifests(doc, mutate, message):
    mutate(doc)
    _refused(doc, message)


def test_manifest_naming_another_snapshot_is_refused(store, doc):
    doc["version"] = "9"
    store.put("snapshots/vm/1/manifest.json", json.dumps(doc).encode())
    with pytest.raises(ManifestError, match=re.escape("names snapshot vm/9")):
        load_manifest(store, "vm", "1")
