"""Hostile input, property-based (hypothesis): whatever bytes or JSON reach
the handshake, manifest, plan-pointer, plan and fault-log parsers, they
either parse into something that passes their own checks or raise the
package's one-line input error. Never another exception, never a value
that breaks the invariants the engine relies on."""

from __future__ import annotations

import io
import json
import re

import fuzz_parsers
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import click

from restore import config
from restore.cli import serve
from restore.errors import InputError, ManifestError
from restore.faultlog import LOG_DTYPE, SOURCES, load_fault_log
from restore.manifest import Manifest
from restore.objects import plan_pointer_key
from restore.snapshot import create_snapshot, load_manifest
from restore.tiers.durable import DurableStore
from restore.workingset import PlanError, load_plan

EXAMPLES = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                      st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=12), inner, max_size=5)),
                          max_leaves=20)
KEYS = ["base_host_virt_addr", "size", "offset", "page_size", "page_size_kib"]
region_like = st.dictionaries(st.sampled_from(KEYS + ["extra"]),
                              st.one_of(st.integers(-10, 2**66), st.sampled_from([0, 4096, 2 << 20, 1 << 30]),
                                        json_leaf), max_size=6)


def _handshake(payload: bytes) -> None:
    fuzz_parsers.target_handshake(payload)


@EXAMPLES
@given(st.binary(max_size=300))
def test_handshake_bytes(payload):
    _handshake(payload)


@EXAMPLES
@given(st.one_of(json_value, st.lists(region_like, max_size=4)))
def test_handshake_json(doc):
    _handshake(json.dumps(doc).encode())


@EXAMPLES
@given(st.lists(st.tuples(st.integers(0, 64), st.integers(0, 8), st.integers(0, 300)), min_size=1, max_size=5),
       st.sampled_from([4096, 2 << 20]))
def test_handshake_geometry(spans, page):
    """Plausible region lists (pages, not bytes): overlapping, touching,
    past the end. Whatever check_regions accepts is sound."""
    doc = [{"base_host_virt_addr": (1 << 40) + b * page, "size": n * page, "offset": o * page, "page_size": page}
           for b, n, o in spans]
    _handshake(json.dumps(doc).encode())


def _edited(valid: bytes):
    """valid's bytes with up to four edits (a byte overwritten, inserted or
    deleted at any place): many still parse, so what a parsed value
    promises is checked as well as the refusals."""
    edit = st.tuples(st.sampled_from(["set", "insert", "delete"]), st.integers(0, len(valid)), st.integers(0, 255))

    def apply(edits):
        b = bytearray(valid)
        for kind, pos, byte in edits:
            pos = min(pos, len(b))
            if kind == "insert":
                b[pos:pos] = bytes([byte])
            elif b and pos < len(b):
                if kind == "set":
                    b[pos] = byte
                else:
                    del b[pos]
        return bytes(b)

    return st.lists(edit, max_size=4).map(apply)


@EXAMPLES
@given(st.data())
def test_manifest_bytes(data):
    """Any bytes, or a valid manifest's bytes edited: refused with
    ManifestError, or a manifest that keeps every promise of
    fuzz_parsers.check_manifest (its geometry, its chunk entries, no page
    past the end of memory, and a round trip to the same manifest)."""
    raw = data.draw(st.one_of(st.binary(max_size=400), _edited(fuzz_parsers._MANIFEST.to_json()),
                              _edited(json.dumps(_valid_manifest()).encode())))
    try:
        m = Manifest.parse(raw, "fuzz")
    except ManifestError as exc:
        assert str(exc).startswith("manifest fuzz: ") and "\n" not in str(exc)
        return
    fuzz_parsers.check_manifest(m)


@EXAMPLES
@given(st.data(), st.integers(1, 300), st.sampled_from([1, 2, 8, 16, 128]), st.integers(-1, 1), st.booleans())
def test_manifest_geometry(data, pages, chunk_pages, extra_chunks, encrypted):
    """Manifests of any memory size (often not a whole number of chunks),
    any number of chunks near the right one and any zero bitmaps (often
    with slots past the end of memory marked stored): refused with
    ManifestError, or a manifest that keeps check_manifest's promises,
    no stored page past the end of memory among them."""
    slots_hex = 2 * max(1, chunk_pages // 8)
    needed = -(-pages // chunk_pages)
    flags = 3 if encrypted else 1

    def chunk(i):
        stored = data.draw(st.booleans())
        tail = min(chunk_pages, max(0, (i + 1) * chunk_pages - pages))  # its slots past the end of memory
        bits = data.draw(st.one_of(
            st.integers(0, 2 ** (slots_hex * 4) - 1),  # any bitmap
            st.integers(0, 2 ** (chunk_pages - tail) - 1).map(  # the slots past the end marked zero
                lambda b: b | ((2**tail - 1) << (chunk_pages - tail)))))
        zero = bits.to_bytes(slots_hex // 2, "little").hex()
        return {"id": "ab" * 32 if stored else None, "stored_len": 100 if stored else 0, "flags": flags,
                "zero": zero}

    doc = {"format": "restore-snapshot", "format_version": "1.1", "name": "g", "version": "1",
           "memory_size": pages * 4096, "chunk_size": chunk_pages * 4096, "page_size": 4096,
           "encryption": {"algorithm": "AES-256-GCM", "key_check": "0" * 32} if encrypted else None,
           "page_map": None, "plan": None, "created": {"at": "2026-11-27T00:00:00Z", "by": "x", "uploaded_bytes": 0},
           "chunks": [chunk(i) for i in range(max(1, needed + extra_chunks))]}
    try:
        m = Manifest.parse(json.dumps(doc).encode(), "geometry")
    except ManifestError as exc:
        assert str(exc).startswith("manifest geometry: ")
        return
    fuzz_parsers.check_manifest(m)


_VALID = None


def _valid_manifest() -> dict:
    global _VALID
    if _VALID is None:
        store = DurableStore("memory://")
        import tempfile
        from pathlib import Path

        from restore.sample import write_sample_image

        with tempfile.TemporaryDirectory() as d:
            img = Path(d) / "m.img"
            write_sample_image(img, 256 << 10, seed=2)
            create_snapshot(store, img, "fz", chunk_size=64 << 10)
        _VALID = json.loads(store.get(load_manifest(store, "fz").key))
    return json.loads(json.dumps(_VALID))


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:3]):
            yield from _paths(v, prefix + (i,))


@EXAMPLES
@given(st.data())
def test_manifest_with_one_field_replaced(data):
    """A valid manifest with any one field (at any depth) replaced by any
    JSON value: refused with ManifestError, or parsed into a manifest that
    writes itself back out and parses again to the same thing."""
    doc = _valid_manifest()
    path = data.draw(st.sampled_from(list(_paths(doc))[1:]))
    target = doc
    for k in path[:-1]:
        target = target[k]
    if data.draw(st.booleans()):
        target[path[-1]] = data.draw(json_value)
    elif isinstance(target, dict):
        del target[path[-1]]
    else:
        target.pop(path[-1])
    try:
        m = Manifest.parse(json.dumps(doc).encode(), "fuzz")
    except ManifestError:
        return
    fuzz_parsers.check_manifest(m)


@EXAMPLES
@given(st.one_of(json_value, st.binary(max_size=200)), st.binary(max_size=300))
def test_plan_pointer_and_plan_bytes(pointer, plan_bytes):
    """A plan pointer and plan object written by someone else: refused with
    PlanError (or an input error), or a plan of in-range page offsets."""
    store = DurableStore("memory://")
    doc = _valid_manifest()
    m = Manifest.parse(json.dumps(doc).encode(), "ok")
    raw = pointer if isinstance(pointer, bytes) else json.dumps(pointer).encode()
    store.put(plan_pointer_key(m.name, m.version), raw)
    store.put("plans/" + "0" * 64, plan_bytes)
    try:
        plan = load_plan(store, m)
    except (PlanError, InputError):
        return
    assert plan is None or (plan.dtype == np.uint64 and not (plan % m.page_size).any()
                            and (len(plan) == 0 or int(plan.max()) < m.memory_size))


@EXAMPLES
@given(st.data())
def test_plan_objects(data):
    """A well-formed pointer to a plan object holding any .npy array."""
    import hashlib

    from restore.workingset import save_plan

    store = DurableStore("memory://")
    m = Manifest.parse(json.dumps(_valid_manifest()).encode(), "ok")
    save_plan(store, m, np.zeros(1, dtype=np.uint64), [], 1.0)
    dtype = data.draw(st.sampled_from(["<u8", "<i8", "<u4", "<f8", ">u8", "u1"]))
    arr = np.array(data.draw(st.lists(st.integers(0, 2**40), max_size=20)), dtype=np.uint64).astype(dtype)
    if data.draw(st.booleans()):
        arr = arr.reshape(-1, 1) if len(arr) else arr
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    blob = buf.getvalue()
    pid = hashlib.sha256(blob).hexdigest()
    store.put(f"plans/{pid}", blob)
    pointer = json.loads(store.get(plan_pointer_key(m.name, m.version)))
    pointer["plan"]["id"] = pid
    store.put(plan_pointer_key(m.name, m.version), json.dumps(pointer).encode())
    try:
        plan = load_plan(store, m)
    except PlanError:
        return
    assert plan.dtype == np.uint64 and plan.ndim == 1
    assert not (plan % m.page_size).any() and (len(plan) == 0 or int(plan.max()) < m.memory_size)


def _fault_log_bytes():
    """A saved fault log (.npy of LOG_DTYPE, sources any byte) as bytes."""
    record = st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
                       st.integers(0, 2**32 - 1), st.integers(0, 255))

    def save(records):
        buf = io.BytesIO()
        np.save(buf, np.array(records, dtype=LOG_DTYPE), allow_pickle=False)
        return buf.getvalue()

    return st.lists(record, max_size=5).map(save)


@EXAMPLES
@given(st.data())
def test_fault_log_bytes(data):
    """Any bytes, or a fault log's bytes edited: refused with one InputError
    naming it, or a one-dimensional array of LOG_DTYPE records whose
    sources are all known, that saves and loads back to the same records."""
    raw = data.draw(st.one_of(st.binary(max_size=300), _fault_log_bytes(),
                              _fault_log_bytes().flatmap(_edited)))
    try:
        log = load_fault_log(raw, "fuzz")
    except InputError as exc:
        assert str(exc).startswith("fault log fuzz") and "\n" not in str(exc)
        return
    assert log.dtype == LOG_DTYPE and log.ndim == 1
    assert (log["source"] < len(SOURCES)).all()
    buf = io.BytesIO()
    np.save(buf, log, allow_pickle=False)
    assert (load_fault_log(buf.getvalue(), "again") == log).all()


@EXAMPLES
@given(st.binary(max_size=400))
def test_serve_config_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("config") / "serve.toml"
    path.write_bytes(data)
    ctx = click.Context(serve)
    try:
        settings = config.load(str(path), serve, ctx)
    except click.BadParameter as exc:
        assert str(exc.message).startswith(f"{path}: ")
        return
    assert set(settings) <= {p.name for p in serve.params}


_ANY_VALUE = st.one_of(st.integers(-5, 5), st.text(max_size=8), st.booleans(), st.floats(allow_nan=False),
                       st.lists(st.integers(-2, 3), max_size=2), st.lists(st.text(max_size=5), max_size=2),
                       st.dictionaries(st.text(max_size=4), st.lists(st.text(max_size=6), max_size=2), max_size=2))
# Values each setting takes, so that many files are accepted and what an
# accepted file gives is checked too.
_FITTING = {"snapshot": ["fn", "fn:1"], "socket": ["/run/fn.sock"], "fault_around": [1, 4],
            "allow_uid": [[0], [0, 5]], "no_cache": [True, False], "l2": [["127.0.0.1:1"], {"az1": ["127.0.0.1:1"]}],
            "metrics": ["127.0.0.1:0"], "log_format": ["json", "text"], "cache_budget": ["1G", "512M"],
            "socket_owner": ["1:2", "0"], "socket_mode": ["0660", "0600"], "listen": [["/run/a.sock"]],
            "bogus": [1]}


@EXAMPLES
@given(st.dictionaries(st.sampled_from(sorted(_FITTING)), st.none(), max_size=4).flatmap(
    lambda keys: st.fixed_dictionaries({k: st.one_of(st.sampled_from(_FITTING[k]), _ANY_VALUE) for k in keys})))
def test_serve_config_values(tmp_path_factory, settings):
    path = tmp_path_factory.mktemp("config") / "serve.toml"
    path.write_bytes(tomli_w_dumps(settings))
    ctx = click.Context(serve)
    try:
        loaded = config.load(str(path), serve, ctx)
    except click.BadParameter as exc:
        assert str(exc.message).startswith(f"{path}: ")
        return
    # Accepted: each key became its flag's setting, no other, and each value
    # is one its flag accepts as it is (converting it again changes nothing).
    params = {p.name: p for p in serve.params}
    names = {p.name for key in settings for p in serve.params
             if isinstance(p, click.Option) and f"--{key.replace('_', '-')}" in p.opts}
    assert set(loaded) == names, (settings, loaded)
    for name, v in loaded.items():
        if name != "listens":  # Listen objects, checked by test_serve_config_listen_tables
            assert params[name].type_cast_value(ctx, v) == v, (name, v)


@EXAMPLES
@given(st.lists(st.dictionaries(st.sampled_from(["path", "owner", "mode", "allow_uids", "allow"]),
                                st.one_of(st.integers(-2, 5), st.text(max_size=8), st.booleans(),
                                          st.sampled_from(["0600", "0660", "0770", "0666", "1:2", "4294967295"]),
                                          st.lists(st.integers(-2, 5), max_size=2)),
                                max_size=4), max_size=3))
def test_serve_config_listen_tables(tmp_path_factory, tables):
    """[[listen]] tables: a Listen per table, or one error naming the file."""
    path = tmp_path_factory.mktemp("config") / "serve.toml"
    path.write_bytes("".join("[[listen]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in t.items())
                             for t in tables).encode())
    try:
        settings = config.load(str(path), serve, click.Context(serve))
    except click.BadParameter as exc:
        assert str(exc.message).startswith(f"{path}: ") and "\n" not in str(exc.message)
        return
    for lst in settings.get("listens", []):
        assert lst.path and not lst.mode & ~0o770 and (lst.allowed_uids is None or lst.allowed_uids)


def tomli_w_dumps(settings: dict) -> bytes:
    """A TOML document of top-level keys (JSON scalars and arrays are TOML; tables last)."""
    plain = [f"{k} = {json.dumps(v)}" for k, v in settings.items() if not isinstance(v, dict)]
    tables = [f"[{k}]\n" + "".join(f"{json.dumps(z)} = {json.dumps(n)}\n" for z, n in v.items())
              for k, v in settings.items() if isinstance(v, dict)]
    return ("\n".join(plain) + "\n" + "\n".join(tables)).encode()


def test_fault_log_with_an_unknown_source():
    recs = np.zeros(3, dtype=LOG_DTYPE)
    recs["source"] = [1, 0, len(SOURCES)]
    buf = io.BytesIO()
    np.save(buf, recs)
    with pytest.raises(InputError, match=re.escape(
            f"fault log bad.npy: record 2 has source {len(SOURCES)}, not one of 0..{len(SOURCES) - 1}")):
        load_fault_log(buf.getvalue(), "bad.npy")


def test_the_fuzz_targets_find_nothing():
    """tests/fuzz_parsers.py's mutational fuzzer, 20000 inputs per target
    (`python tests/fuzz_parsers.py --runs N` runs it longer)."""
    for target in fuzz_parsers.TARGETS:
        runs, parsed, findings = fuzz_parsers.fuzz(target, 20000, seed=7)
        assert runs == 20000 and findings == [], (target, findings[:1])
        assert parsed > 0, f"no {target} input parsed: the target's promises were never checked"


def test_what_the_fuzzer_found_stays_fixed():
    """numpy parses .npy headers with Python's tokenizer (SyntaxError and
    tokenize errors on damaged bytes), and a number too large for an int
    overflowed: both are input errors now."""
    from restore.faultlog import parse_npy

    bad_header = b"\x93NUMPY\x01\x00v\x00{'descr': '<u8', 'fortran_order': False, 'shape': (3,"
    for data in (bad_header, bad_header + b" " * 40 + b"\n", b"\x93NUMPY\x01\x00\x04\x00{'a'"):
        with pytest.raises(InputError, match=r"^x is not a \.npy array: "):
            parse_npy(data, "x")
    store = DurableStore("memory://")
    m = Manifest.parse(json.dumps(_valid_manifest()).encode(), "ok")
    from restore.workingset import save_plan

    save_plan(store, m, np.zeros(1, dtype=np.uint64), [], 1.0)
    pointer = json.loads(store.get(plan_pointer_key(m.name, m.version)))
    text = json.dumps(pointer).replace(f'"pages": {pointer["plan"]["pages"]}', '"pages": 1e999')
    store.put(plan_pointer_key(m.name, m.version), text.encode())
    with pytest.raises(PlanError, match="is damaged"):
        load_plan(store, m)
