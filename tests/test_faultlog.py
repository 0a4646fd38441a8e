"""The fault log's Python twin of csrc/faultlog.h, and reading logs back."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest

from restore.errors import InputError
from restore.faultlog import LOG_DTYPE, SOURCES, _check_against_c, load_fault_log, parse_npy


def test_the_twin_is_checked_against_the_c_record():
    _check_against_c()  # as at import
    with pytest.raises(ImportError, match="RS_SRC_"):
        _check_against_c(sources=SOURCES[:-1])
    with pytest.raises(ImportError, match="RS_SRC_"):
        _check_against_c(sources=("l1", "zero") + SOURCES[2:])
    shifted = np.dtype({"names": list(LOG_DTYPE.names), "formats": ["<u8", "<u8", "<u4", "<u4", "u1"],
                        "offsets": [0, 8, 16, 20, 25], "itemsize": 32})
    with pytest.raises(ImportError, match="rs_fault_record"):
        _check_against_c(dtype=shifted)


def test_a_saved_log_reads_back_and_a_bad_one_is_named():
    log = np.zeros(3, dtype=LOG_DTYPE)
    log["offset"] = [0, 4096, 8192]
    log["source"] = [SOURCES.index("l2"), SOURCES.index("host"), SOURCES.index("zero")]
    buf = io.BytesIO()
    np.save(buf, log)
    back = load_fault_log(buf.getvalue(), "here")
    assert back.dtype == LOG_DTYPE and (back == log).all()
    log["source"][1] = len(SOURCES)
    buf = io.BytesIO()
    np.save(buf, log)
    with pytest.raises(InputError, match=f"fault log here: record 1 has source {len(SOURCES)}"):
        load_fault_log(buf.getvalue(), "here")
    with pytest.raises(InputError, match="fault log there is not a .npy array"):
        load_fault_log(b"not numpy", "there")


def test_a_header_the_tokenizer_warns_about_is_refused_without_a_warning():
    """numpy reads a .npy header with Python's tokenizer: an invalid escape
    in it is refused as a bad array, not printed as a warning on stderr."""
    buf = io.BytesIO()
    np.save(buf, np.zeros(3, dtype=LOG_DTYPE))
    data = buf.getvalue().replace(b"'shape': (3,)", b"'shape': (3,), 'x\\o': 1", 1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(InputError, match=r"^log x is not a \.npy array: "):
            parse_npy(data, "log x")
    assert seen == []
