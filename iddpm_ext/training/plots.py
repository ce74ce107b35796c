"""The project's figures, drawn with matplotlib on its Agg canvas (no pyplot, no display, no
global backend switch); matplotlib is imported only when a figure is drawn.

Every function returns the :class:`matplotlib.figure.Figure` (tests read its labels and
legends) and, given ``path``, writes it as a PNG of exactly ``size`` pixels, atomically:

- :func:`loss_figure`        training curves (loss, mse, vb with their quartiles of t; grad norm)
- :func:`errorbar_figure`    lines with error bars over a log x axis (FD vs sampling steps)
- :func:`bar_figure`         horizontal bars with error bars on a zoomed value axis (bits/dim)
- :func:`image_grid_figure`  a grid of image cells with row and column labels (trajectories,
                             sample grids per run and step count)
- :func:`scatter_figure`     side-by-side scatter plots of 2-D points

Ticks are round numbers: 1-2-5 steps on linear axes, 1-2-5 × 10^k on log axes (a log axis is
used only where the values span a factor of 3 or more).

It sits in the training layer, the lowest one that draws (the training log); the evaluation
reports and the command line use it too.
"""

from __future__ import annotations

import io
import math

import numpy as np

from ..io import atomic_write_bytes

DPI = 100
LOG_SPAN = 3.0  # a log axis only when max / min reaches this


def new_figure(size: tuple) -> object:
    """An empty Figure of ``size`` = (width, height) pixels on an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width, height = size
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def save(fig, path: str | None, overwrite: bool = True):
    """Write ``fig`` to ``path`` as a PNG (atomically; nothing when ``path`` is None)."""
    if path:
        atomic_write_bytes(path, png_bytes(fig), overwrite=overwrite)
    return fig


def _round_label(v: float, _pos=None) -> str:
    """0.02, 0.5, 3, 2000, 1e-05: the shortest plain form of a round tick value."""
    if v == 0:
        return "0"
    if 1e-4 <= abs(v) < 1e5:
        return f"{v:.6g}"
    return f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e")


def round_ticks(ax, axis: str, values=(), log=None):
    """Round ticks on ``axis`` ("x" or "y") of ``ax``: log scale when ``log`` is True, or when
    None and the positive ``values`` span a factor of LOG_SPAN or more (ticks at 1-2-5 × 10^k,
    or at the powers of 10 alone over more than two decades); else linear with 1-2-5 steps,
    labelled with a common number of decimals. Returns whether the axis is logarithmic."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter, ScalarFormatter

    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if log is None:
        log = bool(finite) and min(finite) > 0 and max(finite) / min(finite) >= LOG_SPAN
    which = ax.xaxis if axis == "x" else ax.yaxis
    if log:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
        positive = [v for v in finite if v > 0]
        decades = math.log10(max(positive) / min(positive)) if positive else 0.0
        which.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 2.5 else (1.0,)))
        which.set_minor_formatter(NullFormatter())
        which.set_major_formatter(FuncFormatter(_round_label))
    else:
        which.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
        plain = ScalarFormatter(useOffset=False)
        plain.set_powerlimits((-4, 6))
        which.set_major_formatter(plain)
    return log


# -------------------------------------------------------------------------------------
# the training log
# -------------------------------------------------------------------------------------

# (key, panel title, y-axis label): the reference's loss terms, per element of the image
PANELS = (
    ("loss", "loss = mse + vb", "loss per dimension"),
    ("mse", "mse: ε-prediction error", "mean squared error of ε"),
    ("vb", "vb: variational-bound term", "bits per dimension"),
    ("grad_norm", "gradient norm", "L2 norm (before clipping)"),
)
QUARTILE_CMAP = "viridis"


def _quartile_label(q: int, num_timesteps: int | None) -> str:
    if num_timesteps:
        lo, hi = math.ceil(q * num_timesteps / 4), math.ceil((q + 1) * num_timesteps / 4)
        return f"t in [{lo}, {hi})"
    return f"t in quarter {q + 1} of [0, T)"


def loss_figure(
    records: list,
    path: str | None = None,
    title: str = "",
    num_timesteps: int | None = None,
    size=(1000, 680),
):
    """Training curves of ``records`` (the JSONL log's dicts, each with a "step"): a panel per
    logged term (loss, mse, vb: the mean over the batch, thick, and the mean over the items
    whose t falls in each quarter of [0, T), thin; grad norm). ``num_timesteps``: T, to name the
    quarters' ranges."""
    import matplotlib

    records = [r for r in records if "step" in r]
    panels = [p for p in PANELS if any(p[0] in r for r in records)] or list(PANELS[:1])
    fig = new_figure(size)
    ncols = 2 if len(panels) > 2 else len(panels)
    nrows = math.ceil(len(panels) / ncols)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colors = matplotlib.colormaps[QUARTILE_CMAP](np.linspace(0.0, 0.85, 4))
    for ax, (key, name, ylabel) in zip(axes, panels):
        curves = []
        for q in range(4):
            pts = [(r["step"], r[f"{key}_q{q}"]) for r in records if f"{key}_q{q}" in r]
            if pts:
                curves.append((pts, dict(color=colors[q], lw=1.0, label=_quartile_label(q, num_timesteps))))
        pts = [(r["step"], r[key]) for r in records if key in r]
        mean_label = "mean over the batch" if curves else key.replace("_", " ")
        curves.append((pts, dict(color="black", lw=2.0, label=mean_label)))
        values = []
        for pts, style in curves:
            xs = [p[0] for p in pts]
            ys = [p[1] if p[1] is not None and math.isfinite(p[1]) else float("nan") for p in pts]
            ax.plot(xs, ys, marker="o" if len(pts) == 1 else None, ms=3, **style)
            values += ys
        if not pts:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", color="gray")
        positive = [v for v in values if math.isfinite(v) and v > 0]
        round_ticks(ax, "y", positive, log=None if len(positive) == len(values) else False)
        round_ticks(ax, "x", log=False)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    return save(fig, path)


# -------------------------------------------------------------------------------------
# lines, bars, images, points
# -------------------------------------------------------------------------------------


def errorbar_figure(
    series: list,
    path: str | None = None,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    xticks=None,
    hlines=(),
    note: str = "",
    size=(900, 480),
):
    """Lines with error bars: ``series`` = [(label, xs, ys, errs, style dict)], x on a log
    axis with ``xticks`` (the x values, by default) labelled as they are; ``hlines`` =
    [(y, label, style)] drawn across; y from 0. ``note``: a line under the legend."""
    fig = new_figure(size)
    ax = fig.subplots()
    xs_all = sorted({x for _, xs, _, _, _ in series for x in xs})
    for label, xs, ys, errs, style in series:
        ax.errorbar(xs, ys, yerr=errs, label=label, capsize=3, marker="o", ms=4, lw=1.8, **style)
    for y, label, style in hlines:
        ax.axhline(y, label=label, **{"color": "0.45", "ls": ":", "lw": 1.5, **style})
    ax.set_xscale("log")
    ticks = list(xticks) if xticks is not None else xs_all
    if ticks:
        from matplotlib.ticker import NullLocator

        ax.set_xticks(ticks, [_round_label(t) for t in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlim(min(ticks) / 1.25, max(ticks) * 1.25)
    round_ticks(ax, "y", log=False)
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    legend = ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    if note:
        legend.set_title(note, prop={"size": 8})
        legend._legend_box.align = "left"
    return save(fig, path)


def _nice_step(span: float) -> float:
    """A 1-2-5 step giving about 5 intervals over ``span``."""
    raw = span / 5 if span > 0 else 1.0
    base = 10 ** math.floor(math.log10(raw))
    return next(m * base for m in (1, 2, 2.5, 5, 10) if m * base >= raw)


def bar_figure(
    rows: list, path: str | None = None, *, title: str, xlabel: str, err_label: str, size=(900, None)
):
    """Horizontal bars with ± error bars, one per row of ``rows`` = [(label, value, err,
    color)], on a value axis zoomed to the values (it starts at a round number below the
    lowest value minus its error, not at 0, which the x label says), each value written at
    its bar's end. ``size``: (width, height or None: from the number of rows)."""
    from matplotlib.lines import Line2D

    width, height = size
    fig = new_figure((width, height or 130 + 42 * max(1, len(rows))))
    ax = fig.subplots()
    errs = [e if e is not None and math.isfinite(e) else 0.0 for _, _, e, _ in rows]
    lo = min([v - e for (_, v, _, _), e in zip(rows, errs)], default=0.0)
    hi = max([v + e for (_, v, _, _), e in zip(rows, errs)], default=1.0)
    step = _nice_step(max(hi - lo, 1e-12) * 1.4)
    left = round(math.floor((lo - 0.15 * (hi - lo)) / step) * step, 12)
    right = hi + 0.3 * (hi - lo) + 1e-12  # room for the values
    ys = np.arange(len(rows))[::-1]  # the first row on top
    values = [v for _, v, _, _ in rows]
    colors = [c for _, _, _, c in rows]
    ax.barh(ys, [v - left for v in values], left=left, color=colors, height=0.6)
    ax.errorbar(values, ys, xerr=errs, fmt="none", ecolor="black", capsize=4, lw=1.5)
    for y, v, e in zip(ys, values, errs):
        ax.text(v + e + 0.02 * (right - left), y, f"{v:.3f}", va="center", fontsize=9)
    ax.set_yticks(ys, [label for label, _, _, _ in rows])
    ax.set_xlim(left, right)
    round_ticks(ax, "x", log=False)
    ax.set_xlim(left, right)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(f"{xlabel} (axis starts at {_round_label(left)}, not 0)")
    ax.grid(True, axis="x", alpha=0.3)
    handle = Line2D([], [], color="black", marker="|", ms=10, lw=1.5, label=err_label)
    fig.legend(handles=[handle], fontsize=8, loc="outside lower right")
    return save(fig, path)


def montage(cells: list, pad: int = 2, fill: int = 255) -> np.ndarray:
    """uint8 [rows × H', cols × W', C] tiling ``cells`` (rows of uint8 [H, W, C] arrays, every
    cell the same shape) with ``pad`` pixels of ``fill`` between them and around."""
    h, w, c = cells[0][0].shape
    nrow, ncol = len(cells), max(len(r) for r in cells)
    out = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), fill, dtype=np.uint8)
    for i, row in enumerate(cells):
        for j, cell in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y : y + h, x : x + w] = cell
    return out


def image_grid_figure(
    cells: list,
    path: str | None = None,
    *,
    row_labels,
    col_labels,
    title: str,
    xlabel: str = "",
    ylabel: str = "",
    cell_px: int = 64,
    pad: int = 2,
    label_px: int = 120,
):
    """A grid of images with a label on each row and column: ``cells`` = rows of uint8
    [H, W, C] images (C 1 or 3), drawn ``cell_px`` pixels wide each (nearest neighbour)."""
    grid = montage(cells, pad=pad)
    gh, gw = grid.shape[:2]
    h, w = cells[0][0].shape[:2]
    scale = cell_px / w
    fig = new_figure((int(gw * scale + label_px + 40), int(gh * scale + 110)))
    ax = fig.subplots()
    gray = grid.shape[2] == 1
    ax.imshow(
        grid[..., 0] if gray else grid,
        cmap="gray" if gray else None,
        vmin=0,
        vmax=255,
        interpolation="nearest",
    )
    ax.set_xticks([pad + j * (w + pad) + (w - 1) / 2 for j in range(len(col_labels))], col_labels, fontsize=8)
    ax.set_yticks([pad + i * (h + pad) + (h - 1) / 2 for i in range(len(row_labels))], row_labels, fontsize=8)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return save(fig, path)


def scatter_figure(panels: list, path: str | None = None, *, title: str, lim=(-1.0, 1.0), panel_px=300):
    """Side-by-side scatter plots: ``panels`` = [(title, points [N, 2] array, legend label)],
    each on the square ``lim`` × ``lim``."""
    fig = new_figure((panel_px * len(panels) + 40, panel_px + 50))
    axes = fig.subplots(1, len(panels), squeeze=False).ravel()
    for i, (ax, (name, pts, label)) in enumerate(zip(axes, panels)):
        pts = np.asarray(pts, dtype=np.float64)
        ax.scatter(pts[:, 0], pts[:, 1], s=2, color=f"C{i}", label=label, rasterized=True)
        ax.set_xlim(*lim)
        ax.set_ylim(*lim)
        ax.set_aspect("equal")
        round_ticks(ax, "x", log=False)
        round_ticks(ax, "y", log=False)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("x₁")
        ax.set_ylabel("x₂")
        ax.legend(fontsize=7, loc="upper right", markerscale=4)
    fig.suptitle(title, fontsize=11)
    return save(fig, path)
