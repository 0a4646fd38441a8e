"""Byte counts and durations as people read them, in one place."""

from __future__ import annotations

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30


def human_bytes(n: float) -> str:
    """Bytes in binary units, rounded: 512 B, 12.5 KiB, 256.0 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def exact_bytes(n: int) -> str:
    """Bytes as '64 MiB', '4 KiB', '2 MiB' when a whole number of a unit,
    else '12345 bytes' (sizes in messages, where rounding would mislead)."""
    for unit, name in ((GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")):
        if n >= unit and n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n} bytes"


def fmt_ns(ns: float) -> str:
    """A duration in ns, in the unit that reads best: 850 ns, 12.8 us, 3.1 ms."""
    if ns < 1e3:
        return f"{ns:.0f} ns"
    if ns < 1e6:
        return f"{ns / 1e3:.1f} us"
    return f"{ns / 1e6:.1f} ms"
