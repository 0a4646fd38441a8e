"""Huge pages for the tests that need them: reserve more 2 MiB pages, and
give back what was there before, under a lock file that serializes the
tests (concurrent runs would otherwise undo each other's reservations)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

import pytest

from restore._native import ffi, lib
from restore.errors import check

NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
LOCK = "/tmp/restore-tests-hugepages.lock"


def meminfo(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0])
    raise KeyError(field)


@contextlib.contextmanager
def reserved(want: int) -> Iterator[None]:
    """want more free 2 MiB pages while the block runs; skips the test where
    this kernel's userfaultfd cannot handle hugetlbfs, or without root."""
    features = ffi.new("uint64_t *")
    check(lib.rs_uffd_probe(features), "rs_uffd_probe")
    if not features[0] & lib.RS_UFFD_FEATURE_MISSING_HUGETLBFS:
        pytest.skip("this kernel's userfaultfd does not handle hugetlbfs")
    if not os.access(NR_HUGEPAGES, os.W_OK):
        pytest.skip("reserving huge pages needs root")
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = int(NR_HUGEPAGES.read_text())
        try:
            NR_HUGEPAGES.write_text(str(old + want))
            free = meminfo("HugePages_Free")
            if free < want:
                pytest.skip(f"only {free} free huge pages after asking for {want} more")
            yield
        finally:
            NR_HUGEPAGES.write_text(str(old))
