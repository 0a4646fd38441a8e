"""Sample images: deterministic per seed, with the page mix asked for."""

from __future__ import annotations

import re

import numpy as np
import pytest

from restore.errors import InputError
from restore.sample import write_sample_image


def _kinds(path) -> tuple[float, float]:
    pages = np.fromfile(path, dtype=np.uint8).reshape(-1, 4096)
    zero = ~pages.any(axis=1)
    # Random pages use nearly all 256 byte values; text pages a few dozen.
    distinct = np.array([len(np.unique(p)) for p in pages[~zero]])
    return zero.mean(), (distinct > 200).sum() / len(pages)


def test_same_seed_same_image(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for p, seed in ((a, 1), (b, 1), (c, 2)):
        write_sample_image(p, 1 << 20, seed=seed)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


def test_page_mix(tmp_path):
    p = tmp_path / "img"
    write_sample_image(p, 16 << 20, seed=3, zero=0.5, random=0.2)
    zero, rnd = _kinds(p)
    assert 0.4 < zero < 0.6 and 0.12 < rnd < 0.28
    write_sample_image(p, 1 << 20, zero=1.0, random=0.0)
    assert p.read_bytes() == bytes(1 << 20)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"size": 0}, "sample image size 0 is not a positive multiple of 4096 bytes"),
        ({"size": 4097}, "sample image size 4097 is not a positive multiple of 4096 bytes"),
        ({"zero": 0.9, "random": 0.2}, "page fractions zero=0.9 random=0.2 must be within 0..1 and sum to at most 1"),
        ({"zero": -0.1}, "page fractions zero=-0.1 random=0.2 must be within 0..1 and sum to at most 1"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    args = {"size": 8192, **kwargs}
    with pytest.raises(InputError, match=re.escape(message)):
        write_sample_image(tmp_path / "x", args.pop("size"), **args)
