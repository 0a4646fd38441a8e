"""Sample memory images: a stand-in for a VM's memory file in demos,
tests and benchmarks.

Pages come in runs (memory is allocated in runs, not page by page): zero
pages, text-like pages (words, numbers and punctuation, as heaps of a
language runtime hold) and random pages (compressed or encrypted data,
which lz4 cannot shrink). The mix is given as fractions of pages; the same
seed always gives the same image.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from .errors import InputError

PAGE = 4096
_BLOCK_PAGES = 4096  # pages generated per write (16 MiB)
_WORDS = (
    "the of and to in is it that for on with as was at by this be from or are an which but not have one had "
    "all were when there can more if no out so said what up its about into than them only other new some "
    "could time these two may then do first any my now such like our over man me even most made after also "
    "did many before must through back years where much your way well down should because each just those "
    "function return value object string number true false null undefined self class import module lambda "
    "request response header status error handler session snapshot memory page chunk region offset size "
    "cache store fetch fault guest kernel thread queue buffer lock event timer socket stream index key"
).split()


def _text_corpus(rng: np.random.Generator, size: int) -> np.ndarray:
    words = rng.choice(_WORDS, size=size // 4)
    seps = rng.choice([" ", " ", " ", ", ", ". ", "\n", ": ", '": "', "(", ") ", "=", "{", "}"], size=len(words))
    nums = rng.integers(0, 100000, size=len(words))
    parts = [f"{w}{s}{n if n < 3000 else ''}" for w, s, n in zip(words, seps, nums)]
    text = "".join(parts).encode()
    return np.frombuffer(text[:size], dtype=np.uint8)


def write_sample_image(
    path: str | os.PathLike,
    size: int,
    *,
    seed: int = 0,
    zero: float = 0.5,
    random: float = 0.2,
    mean_run: int = 16,
    progress: Callable[[int], None] = lambda n: None,
) -> None:
    """Write a size-byte image (a multiple of 4096) to path.

    zero, random: fractions of pages that are all zero / random; the rest is
    text-like. mean_run: mean length of a run of pages of one kind.
    progress(n) is called with bytes written.
    """
    if size <= 0 or size % PAGE:
        raise InputError(f"sample image size {size} is not a positive multiple of {PAGE} bytes")
    if not (0 <= zero <= 1 and 0 <= random <= 1 and zero + random <= 1):
        raise InputError(f"page fractions zero={zero} random={random} must be within 0..1 and sum to at most 1")
    rng = np.random.default_rng(seed)
    pages = size // PAGE
    # Runs of one kind each: 0 zero, 1 random, 2 text.
    n_runs = pages // max(1, mean_run) + 1
    lengths = rng.geometric(1 / max(1, mean_run), size=n_runs)
    while lengths.sum() < pages:
        lengths = np.concatenate([lengths, rng.geometric(1 / max(1, mean_run), size=n_runs)])
    kinds = rng.choice(3, size=len(lengths), p=[zero, random, 1 - zero - random])
    kind_of_page = np.repeat(kinds, lengths)[:pages].astype(np.uint8)
    corpus = _text_corpus(rng, 1 << 20)
    span = len(corpus) - PAGE
    cols = np.arange(PAGE)

    with open(path, "wb") as f:
        for start in range(0, pages, _BLOCK_PAGES):
            k = kind_of_page[start : start + _BLOCK_PAGES]
            block = np.zeros((len(k), PAGE), dtype=np.uint8)
            rnd = np.flatnonzero(k == 1)
            if len(rnd):
                block[rnd] = rng.integers(0, 256, size=(len(rnd), PAGE), dtype=np.uint8)
            txt = np.flatnonzero(k == 2)
            if len(txt):
                starts = rng.integers(0, span, size=len(txt))
                block[txt] = corpus[starts[:, None] + cols]
            f.write(block.data)
            progress(block.nbytes)
