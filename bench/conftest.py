"""Benchmark fixtures and a throughput summary.

Each benchmark stores the bytes one round processes in
benchmark.extra_info["bytes"]; the summary turns medians into GB/s
(10^9 bytes per second of memory file) so figures compare across runs.
"""

from __future__ import annotations

import pytest

from restore.sample import write_sample_image

GIB = 1 << 30


@pytest.fixture(scope="session")
def mixed_gib(tmp_path_factory):
    """A 1 GiB sample image: half zero pages, 20 % random, 30 % text-like."""
    p = tmp_path_factory.mktemp("bench") / "mixed-1g.img"
    write_sample_image(p, GIB, seed=1, zero=0.5, random=0.2)
    return p


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    benches = getattr(session, "benchmarks", None) or []
    rows = [(b.name, b.extra_info["bytes"], b.stats.median) for b in benches if "bytes" in b.extra_info]
    if rows:
        terminalreporter.section("throughput (median)")
        for name, nbytes, median in sorted(rows):
            terminalreporter.write_line(f"{name:<60} {nbytes / median / 1e9:7.2f} GB/s  ({median * 1e3:9.2f} ms)")
    phases = [b for b in benches if "install_gbps" in b.extra_info]
    raw = {b.name: b.extra_info["bytes"] / b.stats.median / 1e9 for b in benches if b.name.startswith("test_bench_raw_copy")}
    for b in phases:
        e = b.extra_info
        terminalreporter.section("prefetch against raw UFFDIO_COPY (medians)")
        for name, gbps in sorted(raw.items()):
            terminalreporter.write_line(f"{name:<60} {gbps:7.2f} GB/s  (the floor)")
        end = e["bytes"] / b.stats.median / 1e9
        vs = {name: f"{end / g:.0%} of {name.split('[')[1][:-1]} KiB" for name, g in raw.items()}
        terminalreporter.write_line(f"{'prefetch, end to end':<60} {end:7.2f} GB/s  ({', '.join(vs.values())})")
        vs = {name: f"{e['install_gbps'] / g:.0%} of {name.split('[')[1][:-1]} KiB" for name, g in raw.items()}
        terminalreporter.write_line(f"{'prefetch, install ioctls only':<60} {e['install_gbps']:7.2f} GB/s  ({', '.join(vs.values())})")
        terminalreporter.write_line(
            f"{'prefetch thread time per round':<60} L1 read {e['l1_read_ms']:.1f} ms, verify+decode {e['decode_ms']:.1f} ms, "
            f"install {e['install_ms']:.1f} ms; wall {b.stats.median * 1e3:.1f} ms on {e['cpus']} CPUs"
        )
    faults = [(b.name, b.extra_info["p50_ns"], b.extra_info.get("role")) for b in benches if "p50_ns" in b.extra_info]
    if faults:
        # Roles are "floor:<placement>" or "engine:<placement>": ratios are
        # taken against the floor measured with the same placement.
        floors = {role.split(":")[1]: p50 for _, p50, role in faults if role and role.startswith("floor:")}
        terminalreporter.section("fault round trip as the guest sees it (median of per-round p50)")
        for name, p50, role in sorted(faults):
            floor = floors.get((role or ":").split(":")[1])
            ratio = f"  {p50 / floor:5.2f} x the bare handler" if floor else ""
            terminalreporter.write_line(f"{name:<60} {p50 / 1e3:7.2f} us{ratio}")
    touch = [(b.name, b.extra_info["touch_ms"]) for b in benches if "touch_ms" in b.extra_info]
    if touch:
        terminalreporter.section("guest time touching its memory (median over rounds)")
        for name, ms in sorted(touch):
            terminalreporter.write_line(f"{name:<60} {ms:9.1f} ms")
    answers = [(b.name, b.extra_info["answer_ms"], b.extra_info.get("answer_role")) for b in benches
               if "answer_ms" in b.extra_info]
    if answers:
        floor = next((ms for _, ms, role in answers if role == "floor"), None)
        terminalreporter.section("minivm: restore start to answer (median over rounds)")
        for name, ms, _ in sorted(answers):
            ratio = f"  {ms / floor:6.2f} x resident" if floor else ""
            terminalreporter.write_line(f"{name:<60} {ms:9.2f} ms{ratio}")
    kvm = [(b.name, b.extra_info["kvm_fault_us"]) for b in benches if "kvm_fault_us" in b.extra_info]
    for name, us in kvm:
        terminalreporter.write_line(f"{name:<60} {us:9.1f} us per KVM-side fault (fault-around 1)")
    fetches = [b for b in benches if "fetch_tier" in b.extra_info]
    restores = [b for b in benches if "restore_ms" in b.extra_info]
    if fetches or restores:
        x = (fetches or restores)[0].extra_info
        rtts = f", probed: memcached no-op {x['l2_noop_ms']:.2f} ms, S3 HEAD {x['s3_head_ms']:.1f} ms" if fetches else ""
        terminalreporter.section(f"network tiers, delay by {x['method']}{rtts}")
        for b in fetches:
            e = b.extra_info
            rtt = {"l2": f"  (RTT {e['l2_rtt_ms']} ms)", "durable": f"  (RTT {e['s3_rtt_ms']} ms)"}.get(e["fetch_tier"], "")
            terminalreporter.write_line(
                f"{b.name:<60} {b.stats.median * 1e3:9.2f} ms  one {e['stored_bytes'] >> 10} KiB chunk"
                f" from {e['fetch_tier']}{rtt}"
            )
        from_l2 = next((b.extra_info["restore_ms"] for b in restores if b.extra_info["source"] == "l2"), None)
        for b in restores:
            e = b.extra_info
            ratio = f", {e['restore_ms'] / from_l2:.1f} x from L2" if from_l2 and e["source"] != "l2" else ""
            terminalreporter.write_line(
                f"{b.name:<60} {e['restore_ms']:9.1f} ms  cold-L1 restore from {e['source']}, {e['fetchers']} fetchers,"
                f" {e['chunks_fetched']} chunks (p50 {e['fetch_p50_ms']:.2f} ms each), {e['touches']} touches{ratio}"
            )
