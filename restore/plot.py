"""Pictures of a restore: a session's first touches, a plan over the memory
map, and the strategy comparison's bars, all in one style.

Every picture is a PNG of exactly ``width_px`` x ``height_px`` pixels. It is
drawn with matplotlib's object-oriented API on an Agg canvas of its own: no
pyplot, no global figure registry and no process-wide backend switch, so a
long-running process (a server, a notebook) can draw as often as it likes
and each figure is freed with its last reference.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from typing import Iterator, Mapping, Optional, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .errors import InputError
from .manifest import ZERO_PAGE, page_chunks
from .faultlog import SOURCES
from .units import MIB, exact_bytes
DPI = 100  # pixels per figure inch: figsize = pixels / DPI
MIN_PX, MAX_PX = 200, 10000  # allowed width and height of a picture, pixels

# One style for every picture (matplotlib rc settings).
STYLE: dict[str, object] = {
    "font.family": "DejaVu Sans",
    "font.size": 10,
    "axes.titlesize": 10,
    "axes.labelsize": 10,
    "figure.titlesize": 12,
    "legend.fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "axes.grid": True,
    "grid.color": "#d0d0d0",
    "grid.linewidth": 0.6,
    "axes.axisbelow": True,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
}
# A colour per fault-log source (restore.session.SOURCES; Okabe-Ito hues,
# told apart with colour-blindness too).
SOURCE_COLOURS: dict[str, str] = {
    "zero": "#999999",
    "l1": "#0072B2",
    "l2": "#E69F00",
    "durable": "#D55E00",
    "fetched": "#CC79A7",  # tier unknown: logs of format 1.0
    "prefetched": "#009E73",
    "removed": "#56B4E9",
    "failed": "#000000",
    "host": "#F0E442",
}
# Colours of the series of a chart (bars, lines), in order.
SERIES_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000",
                  "#999999", "#882255", "#44AA99", "#AA4499")
DEMAND_EDGE = "#000000"  # outline of a demand fault's marker
CURVE = "#404040"  # a running total
SEQUENTIAL = "viridis"  # colour map of an order (plan rank, fetch order)
BLANK = "#f2f2f2"  # cells with nothing to show


def check_size(width_px: int, height_px: int) -> None:
    """Refuse a picture size (pixels) outside MIN_PX..MAX_PX per side."""
    if not (MIN_PX <= width_px <= MAX_PX and MIN_PX <= height_px <= MAX_PX):
        raise InputError(f"picture size {width_px}x{height_px}: width and height must each be "
                         f"{MIN_PX} to {MAX_PX} pixels")


@contextmanager
def figure(out_path: str, width_px: int, height_px: int) -> Iterator[Figure]:
    """A Figure in STYLE, saved to out_path as a PNG of exactly width_px x
    height_px pixels when the block ends without an error (nothing is
    written otherwise). The figure belongs to the caller's block only."""
    check_size(width_px, height_px)
    folder = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(folder):
        raise InputError(f"cannot write {out_path}: directory {folder} does not exist")
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        yield fig
        try:
            fig.savefig(out_path, format="png", dpi=DPI)
        except OSError as exc:
            raise InputError(f"cannot write {out_path}: {exc.strerror or exc}") from None


# ------------------------------------------------------------------ sessions


def plot_session(recs: np.ndarray, out_path: str, *, title: str, page_size: int, width_px: int = 1200,
                 height_px: int = 800) -> None:
    """Draw one restore from its fault log (restore.session.LOG_DTYPE) as a
    PNG at out_path.

    Top: each logged first touch at its time since session start (ms) and
    memory offset (MiB), coloured by source; demand faults (every source but
    "prefetched") are outlined. Bottom, same time axis: logged pages x
    page_size (bytes), cumulative, in MiB, with the demand faults on it. The
    log holds first touches the engine saw: neighbours a fault-around
    installed and the guest then touched unseen are not in it. title names
    the session (it starts the error when the log is empty)."""
    if len(recs) == 0:
        raise InputError(f"{title}: the fault log has no records, nothing to plot")
    recs = np.sort(recs, order="t_ns", kind="stable")
    t_ms = recs["t_ns"] / 1e6
    offset_mib = recs["offset"] / MIB
    logged_mib = np.arange(1, len(recs) + 1) * page_size / MIB
    demand = recs["source"] != SOURCES.index("prefetched")
    with figure(out_path, width_px, height_px) as fig:
        top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
        for i in np.unique(recs["source"]):
            name = SOURCES[i]
            sel = recs["source"] == i
            kind = "installed ahead" if name == "prefetched" else "demand faults"
            top.scatter(t_ms[sel], offset_mib[sel], label=f"{name} ({kind}): {int(sel.sum())}",
                        **_touch_marker(name, len(recs)))
        top.set_ylabel("memory offset of the logged page (MiB)")
        top.set_title("first touches, one point per logged page (demand faults outlined)", loc="left")
        bottom.step(t_ms, logged_mib, where="post", color=CURVE, linewidth=1.2)
        for i in np.unique(recs["source"][demand]):
            sel = demand & (recs["source"] == i)
            bottom.scatter(t_ms[sel], logged_mib[sel], **_touch_marker(SOURCES[i], len(recs)))
        bottom.set_ylabel(f"logged pages x {exact_bytes(page_size)},\ncumulative (MiB)")
        bottom.set_xlabel("time since session start (ms)")
        bottom.set_title("installed so far, counting logged pages only (demand faults outlined)", loc="left")
        bottom.set_ylim(bottom=0)
        fig.suptitle(f"{title}: {len(recs)} logged pages, {int(demand.sum())} demand faults, "
                     f"last at {t_ms[-1]:.1f} ms")
        top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), title="source: logged pages", markerscale=1.5)


def _touch_marker(source: str, n: int) -> dict:
    """Scatter keywords for a logged page of this source among n points:
    prefetched pages plain, demand faults larger and outlined."""
    colour = SOURCE_COLOURS[source]
    if source == "prefetched":
        return {"s": _dot_area(n), "color": colour, "alpha": 0.7, "linewidths": 0}
    return {"s": 2.5 * _dot_area(n), "color": colour, "edgecolors": DEMAND_EDGE, "linewidths": 0.6, "zorder": 3}


def _dot_area(n: int) -> float:
    """Marker area (points^2) for a scatter of n points: larger when few."""
    return min(16.0, max(3.0, 8000 / n))


# --------------------------------------------------------------------- plans


def plot_plan(plan_offsets: np.ndarray, out_path: str, *, title: str, memory_size: int, chunk_size: int,
              page_size: int, page_map: Optional[np.ndarray] = None, chunk_count: Optional[int] = None,
              width_px: int = 1200, height_px: int = 800) -> None:
    """Draw a working-set plan (uint64 file offsets, bytes, in prefetch
    order) over the snapshot's memory map as a PNG at out_path.

    Top: each planned page at its memory offset (MiB) and rank in the plan,
    coloured by the order in which the plan first needs its chunk (the fetch
    order). Bottom: the snapshot's chunks (chunk_size bytes each) in stored
    order, each coloured the same way, blank when the plan needs none of
    its pages. page_map (restore.manifest.PAGE_MAP_DTYPE, one entry per
    page_size page) says which chunk holds a page; None means the identity
    layout (page at offset o in chunk o // chunk_size). chunk_count is the
    snapshot's number of chunks (default: the identity layout's, memory_size
    / chunk_size rounded up). Pages of all-zero memory are grey: no chunk
    holds them. title names the plan (it starts the error when the plan is
    empty)."""
    offsets = np.asarray(plan_offsets, dtype=np.uint64)
    if len(offsets) == 0:
        raise InputError(f"{title}: the plan is empty, nothing to plot")
    if page_map is None:
        chunks = (offsets // np.uint64(chunk_size)).astype(np.int64)
    else:
        chunks = page_chunks(page_map, offsets, page_size).astype(np.int64)
    planned = chunks != ZERO_PAGE
    need = _fetch_order(chunks[planned])
    n_cells = chunk_count or math.ceil(memory_size / chunk_size)
    if planned.any() and chunks[planned].max() >= n_cells:
        raise InputError(f"{title}: a planned page lies in chunk {int(chunks[planned].max())}, "
                         f"but the snapshot has {n_cells} chunks")
    strip, per_cell = _chunk_strip(chunks[planned], need, n_cells, width_px // 2)
    n_needed = int(need.max(initial=-1)) + 1
    cmap = _order_cmap()
    with figure(out_path, width_px, height_px) as fig:
        top, bottom = fig.subplots(2, 1, height_ratios=[5, 1])
        rank = np.arange(len(offsets))
        offset_mib = offsets / MIB
        area = _dot_area(len(offsets))
        top.scatter(offset_mib[~planned], rank[~planned], s=area, color=SOURCE_COLOURS["zero"], linewidths=0,
                    label=f"all-zero page, no chunk: {int((~planned).sum())}")
        dots = top.scatter(offset_mib[planned], rank[planned], s=area, c=need, cmap=cmap, vmin=0,
                           vmax=max(n_needed - 1, 1), linewidths=0)
        top.set_xlim(0, memory_size / MIB)
        top.set_xlabel("memory offset of the planned page (MiB)")
        top.set_ylabel("rank in the plan (n-th page prefetched)")
        top.yaxis.set_major_locator(MaxNLocator(integer=True))
        top.set_title("planned pages over the memory map, coloured by fetch order of their chunk", loc="left")
        if not planned.all():
            top.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), borderaxespad=0.2)
        bar = fig.colorbar(dots, ax=[top, bottom], label="fetch order: n-th chunk the plan needs", shrink=0.9)
        bar.locator = MaxNLocator(integer=True)
        bar.update_ticks()
        bottom.imshow(strip[None, :], aspect="auto", cmap=cmap, vmin=0, vmax=max(n_needed - 1, 1),
                      extent=(0, len(strip) * per_cell, 0, 1), interpolation="nearest")
        bottom.set_yticks([])
        bottom.grid(False)
        bottom.set_xlim(0, n_cells)
        bottom.set_xlabel(f"chunk index, in stored order ({exact_bytes(chunk_size)} chunks)")
        cell = "" if per_cell == 1 else f"; a cell is {per_cell} chunks, coloured by the first of them needed"
        bottom.set_title(f"chunks the plan needs ({n_needed}) by fetch order (blank: not needed{cell})", loc="left")
        fig.suptitle(f"{title}: {len(offsets)} pages ({len(offsets) * page_size / MIB:.1f} MiB) "
                     f"in {n_needed} of {n_cells} chunks")


def _fetch_order(chunks: np.ndarray) -> np.ndarray:
    """For each entry of chunks (in plan order), the rank of its chunk among
    the distinct chunks by first appearance: 0 for the first chunk needed."""
    uniq, first, inverse = np.unique(chunks, return_index=True, return_inverse=True)
    order = np.empty(len(uniq), dtype=np.int64)
    order[np.argsort(first)] = np.arange(len(uniq))
    return order[inverse]


def _chunk_strip(chunks: np.ndarray, order: np.ndarray, n_chunks: int, max_cells: int) -> tuple[np.ndarray, int]:
    """(cells, chunks per cell): the fetch order of each of n_chunks chunks
    (NaN: not needed), given the needed chunks and their order; with more
    chunks than max_cells, each cell spans several chunks and shows the
    earliest order among them, so no needed chunk disappears."""
    per_cell = math.ceil(n_chunks / max_cells)
    cells = np.full(math.ceil(n_chunks / per_cell), np.inf)
    np.minimum.at(cells, chunks // per_cell, order)
    cells[np.isinf(cells)] = np.nan
    return cells, per_cell


def _order_cmap() -> ListedColormap:
    """SEQUENTIAL, with BLANK for cells that have no order (NaN)."""
    return matplotlib.colormaps[SEQUENTIAL].with_extremes(bad=BLANK)


# -------------------------------------------------------------------- charts


def plot_grouped_bars(groups: Mapping[str, Mapping[str, float]], out_path: str, *, series: Sequence[str],
                      title: str, ylabel: str, baseline: Optional[float] = None, log: bool = False,
                      width_px: int = 1200, height_px: int = 700) -> None:
    """A grouped bar chart as a PNG at out_path: one group of bars per key
    of groups (its label, line breaks allowed), one bar per name in series
    (in SERIES_COLOURS, in that order) with the value groups[key][name];
    a name missing from a group leaves a gap. baseline draws a horizontal
    reference line; log makes the value axis logarithmic."""
    width = 0.8 / len(series)
    x = np.arange(len(groups))
    with figure(out_path, width_px, height_px) as fig:
        ax = fig.subplots()
        for i, name in enumerate(series):
            ys = [values.get(name, np.nan) for values in groups.values()]
            ax.bar(x + i * width, ys, width, label=name, color=SERIES_COLOURS[i % len(SERIES_COLOURS)])
        if log:
            ax.set_yscale("log")
        if baseline is not None:
            ax.axhline(baseline, color="black", linewidth=0.8)
        ax.set_ylabel(ylabel)
        ax.set_xticks(x + 0.4 - width / 2, list(groups))
        ax.grid(False, axis="x")
        fig.suptitle(title)
        fig.legend(loc="outside lower center", ncol=min(len(series), 5))
