"""Fuzz targets for the parsers that take outside input, and a small
mutational fuzzer that drives them:

    python tests/fuzz_parsers.py [--runs 100000] [--seed 1] [--target handshake|manifest|plan]

Each target takes bytes and passes when the parser raises the package's
input error (a RestoreError) or returns something that holds what the
parser promises (checked on every input that parses: the target returns
True then); any other exception or a broken promise is a finding, printed
with the input that caused it.
The fuzzer starts from valid inputs and mutates them (bit flips, byte
insertions and deletions, splices, interesting numbers written over
digits). The targets take the same bytes an atheris or AFL harness would.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import traceback

import numpy as np

from restore.errors import RestoreError
from restore.manifest import FLAG_ENCRYPTED, KNOWN_FLAGS, ChunkEntry, Manifest
from restore.objects import plan_pointer_key
from restore.protocol import check_regions, parse_regions
from restore.tiers.durable import DurableStore
from restore.workingset import load_plan, save_plan

GEO = dict(memory_size=1 << 30, snapshot_page_size=4096, chunk_size=512 << 10)


def target_handshake(data: bytes) -> bool:
    """Whatever check_regions accepts is what a Server relies on: non-empty,
    aligned regions inside the snapshot, overlapping neither in the guest's
    address space nor in the memory file."""
    try:
        regions = parse_regions(data)
        page = check_regions(regions, **GEO)
    except RestoreError:
        return False
    for r in regions:
        assert r.size > 0 and r.base % page == 0 and r.size % page == 0 and r.offset % page == 0
        assert r.offset + r.size <= GEO["memory_size"] and r.base + r.size <= 2**64
    for spans in (sorted((r.base, r.size) for r in regions), sorted((r.offset, r.size) for r in regions)):
        for (a, n), (b, _) in zip(spans, spans[1:]):
            assert a + n <= b
    return True


def check_manifest(m: Manifest) -> None:
    """What Manifest.parse promises of a manifest it returns (the engine
    and the codec rely on it): a page size of 4 KiB or 2 MiB; a power-of-two
    chunk size from the page size to 1 GiB; a memory size of whole pages;
    chunk entries whose id, length, flags and zero bitmap agree with each
    other and with the snapshot's encryption; without a page map, exactly
    the chunks the memory needs, and no stored page past the end of
    memory; with one, a page count that is the memory's. And it writes
    itself out and parses back to the same manifest."""
    assert m.page_size in (4096, 2 << 20), m.page_size
    assert m.chunk_size & (m.chunk_size - 1) == 0 and max(4096, m.page_size) <= m.chunk_size <= 1 << 30
    assert m.memory_size > 0 and m.memory_size % m.page_size == 0
    assert m.chunks
    for c in m.chunks:
        assert len(c.zero) == max(1, m.slots_per_chunk // 8)
        assert (c.id is None) == (c.stored_len == 0) and c.stored_len >= 0
        assert not c.flags & ~KNOWN_FLAGS and c.flags >= 0
        assert c.id is None or bool(c.flags & FLAG_ENCRYPTED) == m.encrypted
    if m.page_map is None:
        assert len(m.chunks) == -(-m.memory_size // m.chunk_size)
        stored_pages = np.flatnonzero(~m.zero_bitmaps().reshape(-1))
        assert len(stored_pages) == 0 or int(stored_pages.max()) * m.page_size < m.memory_size
    else:
        assert m.page_map.pages == m.pages
    assert Manifest.parse(m.to_json(), "again") == m


def target_manifest(data: bytes) -> bool:
    try:
        m = Manifest.parse(data, "fuzz")
    except RestoreError:
        return False
    check_manifest(m)
    return True


_MANIFEST = Manifest(name="fz", version="1", memory_size=1 << 20, chunk_size=1 << 19, page_size=4096,
                     chunks=[ChunkEntry("a" * 64, 100, 1, bytes(16)), ChunkEntry(None, 0, 0, b"\xff" * 16)],
                     created_at="2026-11-27T00:00:00Z")


def target_plan(data: bytes) -> bool:
    """data: a plan pointer, a NUL byte, then the plan object's bytes. A
    pointer naming plan 000...0 is pointed at the object's real id, so that
    damaged objects get past the id check to the .npy parser."""
    pointer, _, blob = data.partition(b"\0")
    pid = hashlib.sha256(blob).hexdigest()
    store = DurableStore("memory://")
    store.put(plan_pointer_key("fz", "1"), pointer.replace(b"0" * 64, pid.encode()))
    store.put(f"plans/{pid}", blob)
    try:
        plan = load_plan(store, _MANIFEST)
    except RestoreError:
        return False
    assert plan is None or (plan.dtype == np.uint64 and plan.ndim == 1 and not (plan % 4096).any()
                            and (len(plan) == 0 or int(plan.max()) < (1 << 20)))
    return True


def seeds() -> dict[str, list[bytes]]:
    region = {"base_host_virt_addr": 1 << 40, "size": 64 << 20, "offset": 0, "page_size": 4096,
              "page_size_kib": 4096}
    hs = [json.dumps([region]).encode(),
          json.dumps([region, {**region, "base_host_virt_addr": (1 << 40) + (128 << 20), "offset": 64 << 20}]).encode()]
    store = DurableStore("memory://")
    save_plan(store, _MANIFEST, np.arange(0, 1 << 20, 4096 * 7, dtype=np.uint64), ["s1"], 0.5)
    pointer = store.get(plan_pointer_key("fz", "1"))
    plan_id = json.loads(pointer)["plan"]["id"]
    pointer = pointer.replace(plan_id.encode(), b"0" * 64)
    return {"handshake": hs, "manifest": [_MANIFEST.to_json()],
            "plan": [pointer + b"\0" + store.get(f"plans/{plan_id}")]}


TARGETS = {"handshake": target_handshake, "manifest": target_manifest, "plan": target_plan}
INTERESTING = [b"0", b"-1", b"4096", b"2097152", b"18446744073709551615", b"18446744073709551616", b"1e308",
               b"null", b"true", b"[]", b"{}", b'""', b"9" * 40]


def mutate(data: bytes, rng: random.Random, corpus: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(pos, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[pos:pos] = bytes([rng.randrange(256)])
        elif op == 2 and b:
            del b[pos:pos + rng.randint(1, 8)]
        elif op == 3:
            other = rng.choice(corpus)
            start = rng.randrange(len(other) + 1)
            b[pos:pos] = other[start:start + rng.randint(1, 32)]
        elif op == 4:
            digits = [i for i, c in enumerate(b) if 48 <= c <= 57]
            if digits:
                i = rng.choice(digits)
                j = i
                while j < len(b) and 48 <= b[j] <= 57:
                    j += 1
                b[i:j] = rng.choice(INTERESTING)
        else:
            b[pos:pos] = rng.choice(INTERESTING)
    return bytes(b)


def fuzz(target: str, runs: int, seed: int = 1) -> tuple[int, int, list[tuple[bytes, str]]]:
    """Run target on runs mutated inputs; (executions, inputs that parsed
    and had their promises checked, findings)."""
    rng = random.Random(seed)
    corpus = list(seeds()[target])
    fn = TARGETS[target]
    findings = []
    parsed = 0
    for i in range(runs):
        data = corpus[i % len(corpus)] if i < len(corpus) else mutate(rng.choice(corpus), rng, corpus)
        try:
            parsed += fn(data)
        except Exception:  # a finding: anything but the package's input error
            findings.append((data, traceback.format_exc(limit=3)))
        else:
            if len(corpus) < 200 and rng.random() < 0.02:
                corpus.append(data)  # keep some survivors to mutate further
    return runs, parsed, findings


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--target", choices=sorted(TARGETS), action="append")
    args = ap.parse_args(argv)
    bad = 0
    for t in args.target or sorted(TARGETS):
        n, parsed, findings = fuzz(t, args.runs, args.seed)
        print(f"{t}: {n} executions, {parsed} parsed and checked, {len(findings)} findings")
        for data, tb in findings[:3]:
            print(f"  input {data[:200]!r}\n{tb}")
        bad += len(findings)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
