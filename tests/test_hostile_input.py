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
from restore.errors import InputError, ManifestError, RestoreError
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


@EXAMPLES
@given(st.binary(max_size=400))
def test_manifest_bytes(data):
    try:
        Manifest.parse(data, "fuzz")
    except ManifestError:
        pass


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
    assert Manifest.parse(m.to_json(), "again") == m


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


@EXAMPLES
@given(st.binary(max_size=300))
def test_fault_log_bytes(data):
    try:
        load_fault_log(data, "fuzz")
    except RestoreError:
        pass


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


@EXAMPLES
@given(st.dictionaries(st.sampled_from(["snapshot", "socket", "fault_around", "allow_uid", "no_cache", "l2",
                                        "metrics", "log_format", "cache_budget", "socket_owner", "socket_mode",
                                        "listen", "bogus"]),
                       st.one_of(st.integers(-5, 5), st.text(max_size=8), st.booleans(), st.floats(allow_nan=False),
                                 st.lists(st.integers(-2, 3), max_size=2), st.lists(st.text(max_size=5), max_size=2),
                                 st.dictionaries(st.text(max_size=4), st.lists(st.text(max_size=6), max_size=2),
                                                 max_size=2)),
                       max_size=4))
def test_serve_config_values(tmp_path_factory, settings):
    path = tmp_path_factory.mktemp("config") / "serve.toml"
    path.write_bytes(tomli_w_dumps(settings))
    try:
        config.load(str(path), serve, click.Context(serve))
    except click.BadParameter as exc:
        assert str(exc.message).startswith(f"{path}: ")


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
        runs, findings = fuzz_parsers.fuzz(target, 20000, seed=7)
        assert runs == 20000 and findings == [], (target, findings[:1])


def test_what_the_fuzzer_found_stays_fixed():
    """numpy parses .npy headers with Python's tokenizer (SyntaxError and
    tokenize errors on damaged bytes), and a number too large for an int
    overflowed: both are input errors now."""
    from restore.faultlog import parse_npy

    bad_header = b"\x93NUMPY\x01\x00v\x00{'descr': '<u8', 'fortran_order': False, 'shape': (3,"
    for data in (bad_header, bad_header + b" " * 40 + b"\n", b"\x93NUMPY\x01\x00\x04\x00{'a'"):
        try:
            parse_npy(data, "x")
        except InputError as exc:
            assert str(exc).startswith("x is not a .npy array: ")
    store = DurableStore("memory://")
    m = Manifest.parse(json.dumps(_valid_manifest()).encode(), "ok")
    from restore.workingset import save_plan

    save_plan(store, m, np.zeros(1, dtype=np.uint64), [], 1.0)
    pointer = json.loads(store.get(plan_pointer_key(m.name, m.version)))
    text = json.dumps(pointer).replace(f'"pages": {pointer["plan"]["pages"]}', '"pages": 1e999')
    store.put(plan_pointer_key(m.name, m.version), text.encode())
    try:
        load_plan(store, m)
    except PlanError as exc:
        assert "is damaged" in str(exc)
    else:
        raise AssertionError("a pointer with an infinite page count was accepted")
