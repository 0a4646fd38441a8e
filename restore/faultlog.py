"""The fault log: one record per first touch of a page, in time order.

The record is csrc/faultlog.h's ``rs_fault_record``; LOG_DTYPE is its
numpy twin and SOURCES names its ``source`` values (RS_SRC_* by index).
Both are checked against the C definitions when this module is imported,
so the two sides cannot drift apart. A session saves its log as a .npy
array of LOG_DTYPE (restore.objects.session_key); load_fault_log reads
one back from bytes that came from outside.
"""

from __future__ import annotations

import io
import warnings

import numpy as np

from ._native import ffi, lib
from .errors import InputError

LOG_DTYPE = np.dtype(
    {
        "names": ["t_ns", "offset", "chunk", "service_ns", "source"],
        "formats": ["<u8", "<u8", "<u4", "<u4", "u1"],
        "offsets": [0, 8, 16, 20, 24],
        "itemsize": 32,
    }
)
NO_CHUNK = 0xFFFFFFFF  # a record's chunk when the page has none (a zero page, a removed range)
# RS_SRC_* by index. "fetched" (a network tier, which one not recorded) is
# found only in logs written before l2 and durable were told apart.
SOURCES = ("zero", "l1", "fetched", "removed", "prefetched", "failed", "l2", "durable", "host")


def _check_against_c(sources: tuple = SOURCES, dtype: np.dtype = LOG_DTYPE) -> None:
    """ImportError unless sources and dtype are csrc/faultlog.h's."""
    if len(sources) != lib.RS_N_SOURCES or any(getattr(lib, f"RS_SRC_{s.upper()}", -1) != i
                                                for i, s in enumerate(sources)):
        raise ImportError("SOURCES does not match RS_SRC_* of csrc/faultlog.h")
    c = dict(ffi.typeof("rs_fault_record").fields)
    if ffi.sizeof("rs_fault_record") != dtype.itemsize or any(
            n not in c or c[n].offset != dtype.fields[n][1] or ffi.sizeof(c[n].type) != dtype.fields[n][0].itemsize
            for n in dtype.names):
        raise ImportError("LOG_DTYPE does not match rs_fault_record of csrc/faultlog.h")


_check_against_c()


def parse_npy(data: bytes, what: str, error: type[InputError] = InputError) -> np.ndarray:
    """Parse .npy bytes from outside (no pickles). numpy reads the header
    with Python's tokenizer, so damaged bytes raise all sorts (SyntaxError,
    tokenize errors, ...): every one becomes error("<what> is not a .npy
    array: ..."). So does a header the tokenizer only warns about (an
    invalid escape in a string), rather than a warning on stderr."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            warnings.simplefilter("error", SyntaxWarning)
            return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - whatever numpy raises on bad bytes
        raise error(f"{what} is not a .npy array: {type(exc).__name__}: {exc}") from None


def load_fault_log(data: bytes, where: str) -> np.ndarray:
    """Parse a saved fault log (.npy of LOG_DTYPE); InputError names where."""
    arr = parse_npy(data, f"fault log {where}")
    if arr.dtype != LOG_DTYPE or arr.ndim != 1:
        raise InputError(f"fault log {where} has dtype {arr.dtype} / shape {arr.shape}, not a fault log")
    bad = np.flatnonzero(arr["source"] >= len(SOURCES))
    if len(bad):
        raise InputError(f"fault log {where}: record {int(bad[0])} has source {int(arr['source'][bad[0]])}, "
                         f"not one of 0..{len(SOURCES) - 1}")
    return arr
