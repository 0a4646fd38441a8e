"""bench.microtables: the markdown tables made from a pytest-benchmark JSON
document carry the document's figures, and a benchmark missing from it
gives no row."""

from __future__ import annotations

import json

import pytest

from bench.microtables import SECTIONS, fmt, main, tables

MIB = 1 << 20


def bench(name: str, median_s: float, params=None, **extra) -> dict:
    """One entry of doc["benchmarks"], as pytest-benchmark writes it."""
    return {
        "group": None, "name": name, "fullname": f"bench/x.py::{name}", "params": params,
        "param": None if params is None else "-".join(map(str, params.values())),
        "extra_info": extra, "options": {},
        "stats": {"min": median_s * 0.9, "max": median_s * 1.2, "mean": median_s, "stddev": 0.0,
                  "rounds": 5, "median": median_s, "iqr": 0.0, "q1": median_s, "q3": median_s,
                  "iqr_outliers": 0, "stddev_outliers": 0, "outliers": "0;0", "ld15iqr": median_s,
                  "hd15iqr": median_s, "ops": 1 / median_s, "total": 5 * median_s, "iterations": 1},
    }


def roundtrip(handler: str, placement: str, dec: float, fresh: float, p99_fresh: float) -> dict:
    return bench(f"test_bench_fault_roundtrip[{handler}-{placement}]", 0.5,
                 {"handler": handler, "placement": placement}, p50_ns=dec, p99_ns=2 * dec, p50_ns_decoded=dec,
                 p99_ns_decoded=3 * dec, p50_ns_fresh=fresh, p99_ns_fresh=p99_fresh, touches_decoded=14745,
                 touches_fresh=255, serves_from=f"{handler} label")


@pytest.fixture
def doc() -> dict:
    return {"machine_info": {}, "commit_info": {}, "datetime": "2026-12-01T00:00:00", "version": "5.3.1",
            "benchmarks": [
                roundtrip("bare", "one-cpu", 4000, 4800, 150_000),
                roundtrip("engine-l1", "one-cpu", 5000, 500_000, 2_345_678),
                roundtrip("engine-l1", "free", 6000, 600_000, 3_000_000),  # no bare "free": no ratio
                bench("test_bench_fault_around[1-sequential]", 1.0, {"fault_around": 1, "order": "sequential"},
                      touch_ms=400.0),
                bench("test_bench_fault_around[64-sequential]", 1.0, {"fault_around": 64, "order": "sequential"},
                      touch_ms=50.0),
                bench("test_bench_raw_copy[2048]", 0.1, {"run_kib": 2048}, bytes=256 * MIB,
                      label="raw UFFDIO_COPY, 2048 KiB runs"),
                bench("test_bench_prefetch_install", 0.4, None, bytes=256 * MIB, label="prefetch, end to end",
                      cpus=2, l1_read_thread_ms=16.0, decode_thread_ms=167.0, install_thread_ms=65.4),
                bench("test_bench_minivm_invocation[resident]", 1.0, {"how": "resident"}, answer_ms=8.42,
                      label="resident"),
                bench("test_bench_minivm_invocation[lazy-warm-l1]", 1.0, {"how": "lazy-warm-l1"}, answer_ms=241.1,
                      label="lazy, in-process Server, warm L1"),
                bench("test_bench_decode_512k[mixed-plain]", 131072 / 4e9, {"kind": "mixed", "encrypted": False},
                      bytes=131072, label="decode one 512 KiB mixed chunk"),
            ]}


def rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]


def row(text: str, first: str, second: str | None = None) -> list[str]:
    found = [r for r in rows(text) if r[0] == first and (second is None or r[2] == second)]
    assert len(found) == 1, (first, text)
    return found[0]


@pytest.mark.parametrize("x,text", [(1234.0, "1230"), (4.0, "4.00"), (0.01234, "0.0123"), (9.996, "10.0"),
                                    (241.1, "241"), (28.63, "28.6"), (0.0, "0"), (None, "–")])
def test_fmt_gives_three_significant_digits(x, text):
    assert fmt(x) == text


def test_sections_are_those_with_rows(doc):
    out = tables(doc)
    assert list(out) == ["fault", "prefetch", "minivm", "create-decode"]
    assert set(out) <= set(SECTIONS)
    for text in out.values():
        for table in text.split("\n\n"):
            lines = table.splitlines()
            assert lines[1] == "|" + "---|" * len(rows(table)[0])


def test_fault_rows_split_decoded_and_fresh(doc):
    text = tables(doc)["fault"]
    bare = row(text, "bare", "one-cpu")
    engine = row(text, "engine-l1", "one-cpu")
    assert bare[1] == "bare label"
    assert engine[3:] == ["5.00 µs", "15.0 µs", "500 µs", "2350 µs", "14745 / 255", "1.25×", "104×"]
    assert bare[3:] == ["4.00 µs", "12.0 µs", "4.80 µs", "150 µs", "14745 / 255", "1.00×", "1.00×"]
    # No bare handler placed freely in the document: its ratios are missing.
    assert row(text, "engine-l1", "free")[-2:] == ["–", "–"]
    assert row(text, "64") == ["64", "50.0 ms", "0.125×"]


def test_prefetch_ratios_are_wall_clock(doc):
    text = tables(doc)["prefetch"]
    assert row(text, "raw UFFDIO_COPY, 2048 KiB runs")[1:] == ["2.68 GB/s", "1.00×"]
    assert row(text, "prefetch, end to end")[1:] == ["0.671 GB/s", "0.250×"]
    assert "512 KiB" not in text  # not in the document: no row, no column
    assert row(text, "install ioctls, thread time (summed over threads)")[1] == "65.4 ms"
    assert row(text, "wall clock on 2 CPUs")[1] == "400 ms"


def test_minivm_and_create_decode(doc):
    out = tables(doc)
    assert row(out["minivm"], "lazy, in-process Server, warm L1")[1:] == ["241 ms", "28.6×"]
    assert row(out["create-decode"], "decode one 512 KiB mixed chunk")[1:] == ["4.00 GB/s", "–"]


def test_missing_benchmarks_give_no_rows(doc):
    doc["benchmarks"] = [b for b in doc["benchmarks"] if "bare" not in b["name"] and "minivm" not in b["name"]]
    out = tables(doc)
    assert "minivm" not in out
    assert [r[0] for r in rows(out["fault"]) if r[0] in ("bare", "engine-l1")] == ["engine-l1", "engine-l1"]
    assert tables({"benchmarks": []}) == {}


def test_main_prints_the_sections_asked_for(doc, tmp_path, capsys):
    p = tmp_path / "micro.json"
    p.write_text(json.dumps(doc))
    assert main([str(p), "minivm"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("## minivm\n") and "## fault" not in out
    with pytest.raises(SystemExit):
        main([str(p), "no-such-section"])
