"""Snapshot creation speed: the figures a new user meets, side by side.

    python -m bench.create_speed [--rounds 5] [--dense16 PATH] [--json FILE]

Images (written once, untimed, into a temporary directory on the disk that
holds the stores):
  sparse-16g    a 16 GiB memory file whose first 64 MiB hold sample data,
                the rest a hole (a guest with most of its memory free)
  half-zero-1g  1 GiB sample image: half zero pages, 20 % random, the rest
                text-like (`restore sample-image --size 1G --seed 1`)
  mixed-256m    256 MiB sample image, a quarter random pages, half zero
                (`restore sample-image --random 0.25 --seed 2`)
  dense-16g     with --dense16 PATH: that file, taken as it is, created,
                optimized and exported once each after the rounds (for
                peak RSS)

Ways of creating, each image's interleaved round by round:
  cli/file      `restore snapshot create` into a file:// store, as a user
                runs it: wall time including Python's start-up and imports;
                the command's peak RSS (its VmHWM)
  lib/file      create_snapshot() in this process into a file:// store
  lib/memory    create_snapshot() in this process into a memory:// store
                (the last round's store dropped first)
  encode        the C encoder alone over the image held in memory, one
                thread per core (the codec's own ceiling; no read, no store;
                each object dropped once encoded, as creation drops it
                once stored)
  floor         no creation: one thread's time for the work no pipeline
                can skip (each chunk read from the page cache, lz4 of its
                non-zero pages, SHA-256 of that), divided by the cores, as
                if they shared it perfectly with nothing else to do: the
                fastest any creation of the image could be on this machine;
                with it, the share lz4 leaves of the non-zero bytes (an
                incompressible chunk counted whole, as the encoder keeps it)
  floor/acc4    the same floor with lz4 at acceleration 4 instead of 1: what
                trading stored bytes for lz4's speed would buy (the stored
                form would change, and with it every chunk id)
  cli/optimize  `restore snapshot optimize --plan` of a snapshot of the
                image (made once, untimed) with a plan of 20 000 of its
                non-zero pages chosen at random, into a copy of its store
                (objects hard-linked): wall time and peak RSS
  cli/export    `restore snapshot export` of that snapshot to a new file
  `restore --version`  start-up and imports alone

Cache state, the same for every way: before each round, untimed, the
memory file it reads (for optimize and export, the source store) is read
so it is in the page cache (holes need none), and the share of it mincore
then finds resident is kept with the round. Once before the rounds is not
enough here: the machine's proactive reclaim (DAMON pageout) evicts page
cache left idle for about a minute. Every round
writes a new store (or export file); before it, dirty pages are synced
(untimed), so writeback of earlier rounds does not compete. Nothing is
removed until the run ends: on a disk that discards deleted blocks the
deletions would weigh on the next round's writes. After the rounds the
last snapshot of each way is read back and compared with its image.

Prints medians with their ranges and keeps every round as JSON (default
bench/results/<UTC time>-create-speed.json; `python -m bench.report
--docs docs/benchmarks.md` makes the table).
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from statistics import median

import numpy as np

from bench import pagecache, results
from restore.codec import ChunkCodec
from restore.manifest import ChunkEntry
from restore.sample import write_sample_image
from restore.snapshot import DEFAULT_CHUNK_SIZE, Snapshot, create_snapshot, data_extents
from restore.tiers.durable import DurableStore

SPARSE_SIZE, SPARSE_DATA = 16 << 30, 64 << 20
PAGE = 4096
PLAN_PAGES = 20_000  # the working set cli/optimize lays out first
WAYS = ("cli/file", "lib/file", "lib/memory", "encode", "floor", "floor/acc4")
# The design's targets, kept in the document: per image, what every way of
# creating it (not the encoder alone) must reach, and what optimize and
# export must of any image. s: at most this many seconds; gb_s: at least this many GB/s
# (10^9 bytes of memory file per second); rss: the command's peak RSS at
# most this many bytes.
TARGETS = {
    "sparse-16g": {"s": 1.0, "rss": 512 << 20},
    "half-zero-1g": {"gb_s": 1.5},
    "mixed-256m": {"gb_s": 1.0},
    "dense": {"rss": 512 << 20},
    "optimize": {"rss": 512 << 20},
    "export": {"rss": 512 << 20},
}


def _write_images(work: Path) -> dict[str, Path]:
    images = {"sparse-16g": work / "sparse-16g.img", "half-zero-1g": work / "half-zero-1g.img",
              "mixed-256m": work / "mixed-256m.img"}
    write_sample_image(images["sparse-16g"], SPARSE_DATA, seed=3)
    os.truncate(images["sparse-16g"], SPARSE_SIZE)
    write_sample_image(images["half-zero-1g"], 1 << 30, seed=1, zero=0.5, random=0.2)
    write_sample_image(images["mixed-256m"], 256 << 20, seed=2, zero=0.5, random=0.25)
    return images


def warm(paths: list[Path]) -> float:
    """Read the files' data extents (directories: every file under them) so
    their pages are in the page cache; returns the share of those pages
    that mincore then finds resident, the state the round starts in."""
    pages = resident = 0
    for path in pagecache.files(paths):
        with open(path, "rb") as f:
            extents = data_extents(f.fileno(), os.fstat(f.fileno()).st_size)
            for start, end in extents:
                f.seek(start)
                left = end - start
                while left:
                    left -= len(f.read(min(left, 64 << 20)))
        cached = pagecache.resident_pages(path)
        for start, end in extents:  # holes' pages are not counted, read ahead or not
            span = cached[start // PAGE:-(-end // PAGE)]
            pages, resident = pages + len(span), resident + int(np.count_nonzero(span))
    return resident / pages if pages else 1.0


# The command as `python -m restore` runs it, then its own peak RSS (VmHWM:
# this process's memory alone; wait4's ru_maxrss would count the bench's,
# which the child inherits at fork) written to the file argv[1] names.
_RUN_AND_REPORT_HWM = """
import sys
from restore.cli import main
try:
    main(sys.argv[2:])
finally:
    with open("/proc/self/status") as f:
        hwm = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    with open(sys.argv[1], "w") as f:
        f.write(hwm)
"""


def _cli(args: list[str], work: Path) -> tuple[float, int]:
    """Run the `restore` command with ARGS: (wall seconds, peak RSS bytes)."""
    hwm = work / "hwm"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _RUN_AND_REPORT_HWM, str(hwm), *args], stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"restore {' '.join(args)} exited {proc.returncode}")
    return wall, int(hwm.read_text()) * 1024


def each_on_cores(n: int, work) -> None:
    """work(i) for every i in range(n), on one thread per core, each thread
    taking the next i as creation's encoders take chunks: no future, and no
    wake-up of the calling thread, per item (handing chunks out through
    pool.map cost up to a fifth of the encoder's time). The first failure
    stops the other threads and is raised."""
    taken = itertools.count()  # next() on it is atomic under the GIL
    failed: list[BaseException] = []

    def some() -> None:
        try:
            while not failed and (i := next(taken)) < n:
                work(i)
        except BaseException as exc:
            failed.append(exc)

    threads = [threading.Thread(target=some) for _ in range(os.cpu_count() or 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        raise failed[0]


def encode_all(codec: ChunkCodec, data: bytes) -> list[ChunkEntry]:
    """data's chunks encoded in order, one thread per core (each_on_cores);
    returns their entries. Each chunk's stored bytes are dropped once
    encoded, as creation drops them once stored: keeping a gigabyte's
    objects would time the page faults of new memory with the encoder
    (30 % more here). check_encoded tells whether the entries are right."""
    view, C = memoryview(data), codec.chunk_size
    out: list = [None] * -(-len(data) // C)

    def encode(i: int) -> None:
        e = codec.encode(view[i * C:(i + 1) * C])
        out[i] = e.entry

    each_on_cores(len(out), encode)
    return out


def check_encoded(codec: ChunkCodec, data: bytes, entries: list[ChunkEntry]) -> None:
    """encode_all's entries are data's: each chunk, encoded again, has its
    entry, and its stored bytes decode to the chunk. Raises RuntimeError
    naming the first chunk that differs."""
    C, out = codec.chunk_size, bytearray(codec.chunk_size)
    if len(entries) != -(-len(data) // C):
        raise RuntimeError(f"{len(entries)} entries for {-(-len(data) // C)} chunks")
    for i, entry in enumerate(entries):
        raw = data[i * C:(i + 1) * C]
        e = codec.encode(raw)
        if e.entry != entry:
            raise RuntimeError(f"chunk {i}: its entry is not what encoding it gives")
        codec.decode(e.data, e.id, e.flags, e.zero_bitmap, out)
        if out[:len(raw)] != raw:
            raise RuntimeError(f"chunk {i} does not decode to its input")


def _floor(image: Path, acceleration: int = 1) -> tuple[float, float]:
    """The floor way's seconds: the one-thread time of reading each chunk
    (pread from the page cache), compressing its non-zero pages with lz4
    (the lz4 package's block compression, at acceleration 1 as the encoder
    calls liblz4; the package bundles the same liblz4 release as this
    machine's) and hashing that with SHA-256, divided by the cores. Finding
    zero pages, packing them, the store and Python are left out, so no
    creation beats it by more than noise. Also returns the share of the
    non-zero bytes lz4 leaves, a chunk it cannot shrink counted whole."""
    import hashlib

    import lz4.block

    C, spent, packed_bytes, stored_bytes = DEFAULT_CHUNK_SIZE, 0.0, 0, 0
    buf = bytearray(C)
    with open(image, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for at in range(0, size, C):
            view = memoryview(buf)[: min(C, size - at)]
            t0 = time.perf_counter()
            os.preadv(f.fileno(), [view], at)
            t1 = time.perf_counter()
            pages = np.frombuffer(view, dtype=np.uint64).reshape(-1, PAGE // 8)
            packed = pages[pages.any(axis=1)].tobytes()
            t2 = time.perf_counter()
            if packed:
                out = lz4.block.compress(packed, mode="fast", acceleration=acceleration, store_size=False)
                hashlib.sha256(out).digest()
            spent += (t1 - t0) + (time.perf_counter() - t2)
            packed_bytes += len(packed)
            stored_bytes += min(len(out), len(packed)) if packed else 0
    return spent / (os.cpu_count() or 1), stored_bytes / packed_bytes if packed_bytes else 1.0


class Way:
    """One way of creating snapshots of one image, its rounds and stores."""

    def __init__(self, work: Path, image: Path, way: str):
        self.work, self.image, self.way = work, image, way
        self.n = 0
        self.store: str | None = None  # the last round's
        self.kept: DurableStore | None = None  # the last round's store object (memory:// lives in it)
        self.data: bytes | None = None  # the image, for the encoder
        self.encoded: list = []
        self.exported: Path | None = None  # cli/export's last file

    def _fresh_store(self) -> str:
        os.sync()
        self.n += 1
        if self.way.endswith("/memory"):
            # The last round's objects go first: held through this round,
            # they made it fault in new memory for all of its own.
            self.kept = None
            return "memory://"
        return f"file://{self.work}/{self.image.stem}-{self.way.replace('/', '-')}-{self.n}"

    def _source(self) -> str:
        """For cli/optimize and cli/export: a file:// store holding the
        image as snapshot bench:1 (created once, untimed) and PLAN_PAGES of
        its non-zero pages as a plan file; returns the store's directory."""
        src = self.work / f"{self.image.stem}-source"
        if not src.exists():
            create_snapshot(DurableStore(f"file://{src}"), self.image, "bench")
            with open(self.image, "rb") as f:
                extents = data_extents(f.fileno(), self.image.stat().st_size)
            rng = np.random.default_rng(4)
            nonzero = []
            for start, end in extents:  # the non-zero pages, 256 MiB at a time
                for at in range(start, end, 256 << 20):
                    n = min(end, at + (256 << 20)) - at
                    pages = np.fromfile(self.image, dtype=np.uint8, count=n, offset=at).reshape(-1, PAGE)
                    nonzero.append(np.flatnonzero(pages.any(axis=1)) + at // PAGE)
            nonzero = np.concatenate(nonzero)
            plan = rng.choice(nonzero, min(PLAN_PAGES, len(nonzero)), replace=False).astype(np.uint64) * PAGE
            np.save(self.work / f"{self.image.stem}-plan.npy", plan)
        return str(src)

    def round(self) -> dict:
        """One timed round; its inputs (the image, or for optimize and
        export the source store) are read into the page cache first,
        untimed, as this machine's proactive reclaim (DAMON pageout) may
        have evicted pages idle since the run began, and the share found
        resident is kept with the round ("cached")."""
        if self.way == "encode":  # the image in this process's memory, read once
            return self._timed()
        inputs = [Path(self._source())] if self.way in ("cli/export", "cli/optimize") else [self.image]
        cached = warm(inputs)
        return {**self._timed(), "cached": cached}

    def _timed(self) -> dict:
        if self.way == "cli/export":
            src = self._source()
            os.sync()
            self.n += 1
            self.exported = self.work / f"{self.image.stem}-export-{self.n}.img"
            wall, rss = _cli(["snapshot", "export", "bench:1", str(self.exported), "--store", f"file://{src}"],
                             self.work)
            return {"s": wall, "max_rss": rss}
        if self.way == "cli/optimize":
            src = self._source()
            url = self._fresh_store()
            # The source's objects linked in: the store is the source as it
            # was, and what optimize writes is new in every round.
            shutil.copytree(src, url.removeprefix("file://"), copy_function=os.link)
            plan = self.work / f"{self.image.stem}-plan.npy"
            wall, rss = _cli(["snapshot", "optimize", "bench:1", "--plan", str(plan), "--store", url], self.work)
            self.store = url
            return {"s": wall, "max_rss": rss}
        if self.way.startswith("floor"):
            s, lz4_share = _floor(self.image, 4 if self.way == "floor/acc4" else 1)
            return {"s": s, "lz4_share": lz4_share}
        if self.way == "encode":
            if self.data is None:
                self.data = self.image.read_bytes()
            with ChunkCodec(DEFAULT_CHUNK_SIZE) as codec:
                t0 = time.perf_counter()
                self.encoded = encode_all(codec, self.data)
                return {"s": time.perf_counter() - t0}
        url = self._fresh_store()
        if self.way == "cli/file":
            wall, rss = _cli(["snapshot", "create", str(self.image), "--name", "bench", "--store", url], self.work)
            self.store = url
            return {"s": wall, "max_rss": rss}
        store = DurableStore(url)
        t0 = time.perf_counter()
        create_snapshot(store, self.image, "bench")
        wall = time.perf_counter() - t0
        self.store, self.kept = url, store
        return {"s": wall}

    def check(self) -> None:
        """The last round's snapshot (or encoding, or export) gives the
        image back."""
        size = self.image.stat().st_size
        if self.way.startswith("floor"):
            return  # nothing made
        if self.way == "cli/export":
            if not _same_data(self.exported, self.image):
                raise RuntimeError(f"{self.image.name}: the export is not the image")
            return
        if self.way == "encode":
            with ChunkCodec(DEFAULT_CHUNK_SIZE) as codec:
                try:
                    check_encoded(codec, self.data, self.encoded)
                except RuntimeError as exc:
                    raise RuntimeError(f"{self.image.name}: {exc}") from None
            return
        store = self.kept if self.way.endswith("/memory") else DurableStore(self.store)
        with Snapshot.open(store, "bench", "2" if self.way == "cli/optimize" else "1") as snap:
            if size > 4 << 30:  # export sparse; the data must be there and the rest holes
                out = self.work / "check.img"
                snap.export(out)
                same = _same_data(out, self.image)
                out.unlink()
            else:
                buf = bytearray(size)
                snap.read_into(buf)
                same = buf == self.image.read_bytes()
        if not same:
            raise RuntimeError(f"{self.image.name} {self.way}: the snapshot does not read back as the image")


def _same_data(a: Path, b: Path) -> bool:
    """Two files of one size hold the same bytes, compared over b's data
    extents; a's extents must lie within b's (holes read as zero)."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        size = os.fstat(fb.fileno()).st_size
        ext_b = data_extents(fb.fileno(), size)
        for start, end in ext_b:
            fa.seek(start)
            fb.seek(start)
            while start < end:
                n = min(end - start, 64 << 20)
                if fa.read(n) != fb.read(n):
                    return False
                start += n
        inside = lambda s, e: any(bs <= s and e <= be for bs, be in ext_b)  # noqa: E731
        return all(inside(s, e) for s, e in data_extents(fa.fileno(), size))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dense16", type=Path, default=None,
                    help="a dense memory file (e.g. 16 GiB) to create once through the CLI, for its peak RSS")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    started = results.now()
    raw: dict[str, list[dict]] = {}
    path = args.json or results.default_path(kind="create-speed")
    shown = {**vars(args), "dense16": args.dense16 and str(args.dense16), "json": args.json and str(args.json)}
    dense_size = args.dense16.stat().st_size if args.dense16 else 0
    dense = args.dense16 and f"dense-{dense_size >> 30}g"

    def keep() -> None:
        """Write what has been measured so far: the rounds are kept even
        if the dense file's runs (minutes, tens of GiB of disk) fail."""
        doc = results.bench_document("create_speed", "bench.create_speed", argv, shown, started, raw)
        doc["image_bytes"] = {"sparse-16g": SPARSE_SIZE, "half-zero-1g": 1 << 30, "mixed-256m": 256 << 20}
        doc["targets"] = TARGETS
        if dense:
            doc["image_bytes"][dense] = dense_size
        results.write(doc, path)

    with tempfile.TemporaryDirectory(prefix="restore-create-", dir=os.environ.get("TMPDIR")) as tmp:
        work = Path(tmp)
        print("writing the images", file=sys.stderr)
        images = _write_images(work)
        ways = [Way(work, images["sparse-16g"], w) for w in ("cli/file", "lib/memory")]
        for name in ("half-zero-1g", "mixed-256m"):
            ways += [Way(work, images[name], w) for w in WAYS]
        ways += [Way(work, images["half-zero-1g"], w) for w in ("cli/optimize", "cli/export")]
        for r in range(args.rounds):
            raw.setdefault("–/restore --version", []).append(dict(zip(("s", "max_rss"), _cli(["--version"], work))))
            for w in ways:
                raw.setdefault(f"{w.image.stem}/{w.way}", []).append(w.round())
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        for w in ways:
            w.check()
        keep()
        if args.dense16:
            print(f"rounds kept as {path}; now the dense file, once each way", file=sys.stderr)
            for way in ("cli/file", "cli/optimize", "cli/export"):
                raw[f"{dense}/{way}"] = [Way(work, args.dense16, way).round()]
                keep()
            print("dense file created, optimized and exported once", file=sys.stderr)
    print(f"\nmedian [min-max] of {args.rounds} interleaved rounds")
    for key, rounds in raw.items():
        s = [x["s"] for x in rounds]
        rss = [x["max_rss"] for x in rounds if "max_rss" in x]
        cached = [x["cached"] for x in rounds if "cached" in x]
        lz4_share = [x["lz4_share"] for x in rounds if "lz4_share" in x]
        print(f"{key:<28}{median(s) * 1e3:9.0f} ms [{min(s) * 1e3:.0f}-{max(s) * 1e3:.0f}]"
              + (f"   peak RSS {median(rss) / 2**20:.0f} MiB" if rss else "")
              + (f"   cached at start >= {min(cached):.1%}" if cached else "")
              + (f"   lz4 leaves {median(lz4_share):.1%}" if lz4_share else ""))
    print(f"kept as {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
