"""`restore session plot` and `restore plan plot` against real sessions: a
snapshot restored into real guest processes (`restore try`), once recording
and once replaying the plan built from that recording. The PNGs must be
valid images of exactly the size asked for, with something drawn on them;
bad input gets one clear line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from restore.cli import main
from restore.faultlog import SOURCES
from restore.handler import Server
from restore.plot import SOURCE_COLOURS, plot_plan
from restore.sample import write_sample_image
from restore.snapshot import Snapshot, create_snapshot
from restore.guest import Guest, reads
from restore.tiers.durable import DurableStore

SIZE = 16 << 20
PAGES = "300"


def restore(capsys, *args: str) -> tuple[int, str, str]:
    """Run the `restore` command in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels from a PNG's IHDR header."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def drawn(path: Path, width: int, height: int) -> set[str]:
    """Check path is a PNG of width x height pixels with a picture on it;
    return the colours of its pixels ("#rrggbb")."""
    import matplotlib.image

    assert png_size(path) == (width, height)
    pixels = matplotlib.image.imread(path)  # RGBA floats in [0, 1]
    assert pixels.shape == (height, width, 4)
    rgb = np.round(pixels[..., :3] * 255).astype(np.uint32)
    codes = np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2])
    assert len(codes) > 50, f"{path} is (nearly) blank: {len(codes)} colours"
    return {f"#{int(c):06x}" for c in codes}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A 16 MiB snapshot fn/1 with a recording session (no plan, every record
    a demand fault), a plan built from it, and a replay session of that plan.
    Yields (work dir, store URL, [recording id, replay id])."""
    work = tmp_path_factory.mktemp("plot")
    image = work / "mem.img"
    write_sample_image(image, SIZE, seed=12)
    store = f"file://{work}/store"
    create_snapshot(DurableStore(store), image, "fn", chunk_size=256 << 10)
    cache = ["--cache", str(work / "cache"), "--store", store]
    for args in (["try", "fn", "--pages", PAGES, "--no-plan", *cache], ["plan", "build", "fn", "--sessions", "1",
                 "--store", store], ["try", "fn", "--pages", PAGES, *cache]):
        subprocess.run([sys.executable, "-m", "restore", *args], check=True, capture_output=True, timeout=120)
    ids = sorted(p.stem for p in (work / "store/snapshots/fn/1/sessions").glob("*.npy"))
    assert len(ids) == 2
    return work, store, ids


def test_session_plot_of_the_recording_and_the_replay(made, capsys):
    work, store, (recording, _) = made
    out = work / "record.png"
    code, text, err = restore(capsys, "session", "plot", "fn", recording, "-o", str(out), "--store", store)
    assert (code, text, err) == (0, f"wrote {out}\n", "")
    colours = drawn(out, 1200, 800)
    # Every record is a demand fault, drawn opaque in its source's colour.
    log = np.load(work / "store/snapshots/fn/1/sessions" / f"{recording}.npy")
    assert "prefetched" not in {SOURCES[i] for i in log["source"]}
    for i in np.unique(log["source"]):
        assert SOURCE_COLOURS[SOURCES[i]].lower() in colours, SOURCES[i]
    out = work / "replay.png"
    code, text, err = restore(capsys, "session", "plot", "fn:1", "-o", str(out), "--size", "900x600",
                              "--store", store)  # the newest session: the replay
    assert (code, err) == (0, "")
    drawn(out, 900, 600)


def test_plan_plot(made, capsys):
    work, store, _ = made
    out = work / "plan.png"
    code, text, err = restore(capsys, "plan", "plot", "fn", "-o", str(out), "--size", "1001x701", "--store", store)
    assert (code, text, err) == (0, f"wrote {out}\n", "")
    drawn(out, 1001, 701)


def test_the_installed_command_draws_too(made):
    """The console script, in a child process with its own HOME and cache."""
    work, store, _ = made
    out = work / "child.png"
    env = dict(os.environ, HOME=str(work / "home"), RESTORE_STORE=store, RESTORE_CACHE_DIR=str(work / "cache"))
    proc = subprocess.run([str(Path(sys.executable).with_name("restore")), "session", "plot", "fn", "-o", str(out),
                           "--size", "640x480"], check=False, capture_output=True, text=True, env=env, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"wrote {out}\n", "")
    drawn(out, 640, 480)


@pytest.mark.parametrize(
    "size,why",
    [
        ("12x", "'12x' is not WIDTHxHEIGHT in pixels, e.g. 1200x800"),
        ("abc", "'abc' is not WIDTHxHEIGHT in pixels, e.g. 1200x800"),
        ("-5x300", "'-5x300' is not WIDTHxHEIGHT in pixels, e.g. 1200x800"),
        ("0x5", "picture size 0x5: width and height must each be 200 to 10000 pixels"),
        ("1200x100000", "picture size 1200x100000: width and height must each be 200 to 10000 pixels"),
    ],
)
def test_bad_size(made, capsys, size, why):
    work, store, _ = made
    for command in (["session", "plot"], ["plan", "plot"]):
        code, text, err = restore(capsys, *command, "fn", "-o", str(work / "x.png"), "--size", size, "--store", store)
        assert code == 2 and text == ""
        assert f"Error: Invalid value for '--size': {why}\n" in err, err
    assert not (work / "x.png").exists()


def test_out_is_required(made, capsys):
    _, store, _ = made
    code, _, err = restore(capsys, "plan", "plot", "fn", "--store", store)
    assert code == 2 and "Error: Missing option '-o' / '--out'." in err, err


def test_missing_session_and_missing_directory(made, capsys):
    work, store, _ = made
    code, text, err = restore(capsys, "session", "plot", "fn", "nope", "-o", str(work / "x.png"), "--store", store)
    assert (code, text, err) == (1, "", "error: no session nope of fn/1\n")
    out = work / "no" / "such" / "dir" / "x.png"
    for command in (["session", "plot"], ["plan", "plot"]):
        code, text, err = restore(capsys, *command, "fn", "-o", str(out), "--store", store)
        assert (code, text, err) == (1, "", f"error: cannot write {out}: directory {out.parent} does not exist\n")


def test_a_snapshot_without_sessions_or_plan(made, capsys):
    work, store, _ = made
    create_snapshot(DurableStore(store), work / "mem.img", "bare")
    out = str(work / "x.png")
    code, text, err = restore(capsys, "plan", "plot", "bare", "-o", out, "--store", store)
    assert (code, text, err) == (1, "", "error: snapshot bare/1 has no plan (see `restore plan build`)\n")
    code, text, err = restore(capsys, "session", "plot", "bare", "-o", out, "--store", store)
    assert (code, text, err) == (1, "", "error: no sessions of bare/1\n")


def test_a_session_that_touched_nothing_and_its_empty_plan(made, capsys):
    """A guest that connects and touches no page leaves a real, empty fault
    log; a plan built from it alone is empty too. Neither has anything to draw."""
    work, store, _ = made
    create_snapshot(DurableStore(store), work / "mem.img", "idle")
    with Snapshot.open(DurableStore(store), "idle") as snap, Server(snap, work / "idle.sock") as server:
        with Guest(server.socket_path, memory_size=SIZE) as guest:
            guest.run(reads(np.zeros(0, dtype=np.uint64)), timeout=60)
    assert server.summaries[0].stats.faults == 0
    sid = server.summaries[0].session_id
    out = str(work / "x.png")
    code, text, err = restore(capsys, "session", "plot", "idle", "-o", out, "--store", store)
    assert (code, text, err) == (1, "", f"error: idle/1 session {sid}: the fault log has no records, nothing to plot\n")
    assert restore(capsys, "plan", "build", "idle", "--sessions", "1", "--store", store)[0] == 0
    code, text, err = restore(capsys, "plan", "plot", "idle", "-o", out, "--store", store)
    assert code == 1 and text == ""
    assert re.fullmatch(r"error: idle/1 plan [0-9a-f]{16}: the plan is empty, nothing to plot\n", err), err
    assert not Path(out).exists()


def test_plan_pages_outside_the_snapshots_chunks(tmp_path):
    offsets = np.array([0, 1 << 20], dtype=np.uint64)
    with pytest.raises(ValueError, match=re.escape(
            "plan p: a planned page lies in chunk 2, but the snapshot has 2 chunks")):
        plot_plan(offsets, str(tmp_path / "p.png"), title="plan p", memory_size=2 << 20, chunk_size=512 << 10,
                  page_size=4096, chunk_count=2)


def test_every_source_has_a_colour():
    assert set(SOURCES) <= set(SOURCE_COLOURS)
