"""The shared figures (iddpm_ext.training.plots): each writes a PNG of the size asked for, and
its labels, legends and ticks are read back from the returned matplotlib Figure (not from
pixels). The training log's loss.png goes through them too."""

import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from iddpm_ext.training import plots
from iddpm_ext.training.log import plot_curves

pytest.importorskip("matplotlib")


def _records(n=30, quartiles=True):
    """A log like TrainLoop's: loss = mse + vb decaying, per-quartile values, grad norm."""
    out = []
    for i in range(1, n + 1):
        r = {"step": 20 * i, "mse": 0.5 / i + 0.03, "vb": 0.3 / i**2 + 1e-3, "grad_norm": 3.0 / i + 0.1}
        r["loss"] = r["mse"] + r["vb"]
        if quartiles:
            for q in range(4):
                for key in ("loss", "mse", "vb"):
                    r[f"{key}_q{q}"] = r[key] * (0.5 + q / 2)
        out.append(r)
    return out


def _png_size(path):
    with Image.open(path) as im:
        return im.size


def _legend_texts(ax):
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


def _tick_values(ax, axis):
    """The major tick values inside the axis' view limits."""
    lo, hi = sorted(ax.get_xlim() if axis == "x" else ax.get_ylim())
    ticks = ax.get_xticks() if axis == "x" else ax.get_yticks()
    return [float(t) for t in ticks if lo <= t <= hi]


def _mantissa(v):
    return round(v / 10 ** math.floor(math.log10(abs(v))), 6)


def test_loss_figure_panels_labels_legends_and_size(tmp_path):
    path = str(tmp_path / "loss.png")
    fig = plot_curves(_records(), path, title="a run", num_timesteps=1000)
    assert _png_size(path) == (1000, 680)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == [
        "loss = mse + vb",
        "mse: ε-prediction error",
        "vb: variational-bound term",
        "gradient norm",
    ]
    assert fig.get_suptitle() == "a run"
    quartiles = ["t in [0, 250)", "t in [250, 500)", "t in [500, 750)", "t in [750, 1000)"]
    for ax in axes[:3]:
        assert _legend_texts(ax) == quartiles + ["mean over the batch"]  # one entry per curve
        assert len(ax.get_lines()) == 5
    assert _legend_texts(axes[3]) == ["grad norm"]
    for ax in axes:
        assert ax.get_xlabel() == "training step" and ax.get_ylabel()
    assert axes[2].get_ylabel() == "bits per dimension"


def test_loss_figure_ticks_are_round(tmp_path):
    fig = plots.loss_figure(_records(), None, num_timesteps=1000)
    vb = fig.axes[2]  # values over 2+ decades: log scale, ticks at powers of 10
    assert vb.get_yscale() == "log"
    assert _tick_values(vb, "y") and all(_mantissa(v) == 1 for v in _tick_values(vb, "y"))
    loss = fig.axes[0]  # about one decade: 1-2-5 ticks
    assert loss.get_yscale() == "log" and {_mantissa(v) for v in _tick_values(loss, "y")} <= {1, 2, 5}
    steps = _tick_values(loss, "x")
    assert len(steps) >= 4 and all(v == int(v) for v in steps)
    gaps = {round(b - a, 9) for a, b in zip(steps, steps[1:])}
    assert len(gaps) == 1 and _mantissa(gaps.pop()) in (1, 2, 2.5, 5)
    # a narrow range (less than a factor LOG_SPAN) stays linear, with round steps
    narrow = [{"step": i, "loss": 0.021 + 0.008 * i / 9} for i in range(10)]
    ax = plots.loss_figure(narrow, None).axes[0]
    ys = _tick_values(ax, "y")
    assert ax.get_yscale() == "linear" and len(ys) >= 3
    assert _mantissa(round(ys[1] - ys[0], 12)) in (1, 2, 2.5, 5)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len({len(s.split(".")[-1]) for s in labels if s}) == 1  # a common number of decimals


def test_loss_figure_without_quartiles_or_data(tmp_path):
    fig = plots.loss_figure(_records(quartiles=False), str(tmp_path / "a.png"))
    assert _legend_texts(fig.axes[0]) == ["loss"] and len(fig.axes[0].get_lines()) == 1
    fig = plots.loss_figure([{"step": 1, "loss": 0.5}], str(tmp_path / "b.png"))  # one point
    assert [ax.get_visible() for ax in fig.axes] == [True] and _png_size(tmp_path / "b.png") == (1000, 680)
    fig = plots.loss_figure([], str(tmp_path / "c.png"))
    assert any(t.get_text() == "no data" for t in fig.axes[0].texts)
    # quartile names without T
    assert plots.loss_figure(_records(3), None).axes[0].get_legend().get_texts()[0].get_text() == (
        "t in quarter 1 of [0, T)"
    )


def test_errorbar_figure(tmp_path):
    path = str(tmp_path / "e.png")
    series = [
        ("a", [25, 50, 100], [9.0, 5.0, 4.0], [1.0, 0.5, 0.4], {}),
        ("b", [25, 50, 100], [12.0, 6.0, 4.5], [1.0, 0.5, 0.4], {"ls": "--"}),
    ]
    fig = plots.errorbar_figure(
        series,
        path,
        title="T",
        xlabel="steps",
        ylabel="FD",
        hlines=[(3.0, "floor", {})],
        note="bars: std",
        size=(800, 400),
    )
    assert _png_size(path) == (800, 400)
    ax = fig.axes[0]
    assert _legend_texts(ax) == ["floor", "a", "b"] and ax.get_legend().get_title().get_text() == "bars: std"
    assert ax.get_xscale() == "log" and [t.get_text() for t in ax.get_xticklabels()] == ["25", "50", "100"]
    assert ax.get_ylim()[0] == 0 and (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == (
        "T",
        "steps",
        "FD",
    )


def test_bar_figure_zoomed_axis_with_error_bars(tmp_path):
    path = str(tmp_path / "b.png")
    rows = [("x", 4.48, 0.027, "C0"), ("y", 4.11, 0.024, "C1"), ("z", 4.64, 0.026, "C2")]
    fig = plots.bar_figure(
        rows, path, title="NLL", xlabel="bits/dim", err_label="± 1 standard error", size=(900, 300)
    )
    assert _png_size(path) == (900, 300)
    ax = fig.axes[0]
    left, right = ax.get_xlim()
    assert 3.5 < left < 4.11 - 0.024 and right > 4.64 + 0.026  # zoomed: not from 0, every bar inside
    assert left == round(left, 1) and _tick_values(ax, "x")[0] == pytest.approx(left)  # round, on a tick
    assert [t.get_text() for t in ax.get_yticklabels()] == ["x", "y", "z"]  # the first row on top
    bars = ax.containers[0]
    assert [round(b.get_x() + b.get_width(), 6) for b in bars] == [4.48, 4.11, 4.64]
    errorbars = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
    assert len(errorbars) == 1 and errorbars[0].has_xerr
    assert "bits/dim" in ax.get_xlabel() and "not 0" in ax.get_xlabel() and ax.get_title() == "NLL"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["± 1 standard error"]
    assert {t.get_text() for t in ax.texts} == {"4.480", "4.110", "4.640"}


def test_image_grid_and_scatter_figures(tmp_path):
    cells = [[np.full((8, 8, 1), 40 * (i + j), dtype=np.uint8) for j in range(3)] for i in range(2)]
    fig = plots.image_grid_figure(
        cells,
        str(tmp_path / "g.png"),
        row_labels=["0", "1"],
        col_labels=["t=9", "t=5", "t=0"],
        title="grid",
        xlabel="t",
        cell_px=32,
    )
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["t=9", "t=5", "t=0"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1"]
    w, h = _png_size(tmp_path / "g.png")
    grid_w, grid_h = 3 * 10 + 2, 2 * 10 + 2  # montage of 8-px cells, 2-px pads
    assert (w, h) == (int(grid_w * 4 + 160), int(grid_h * 4 + 110))
    assert plots.montage(cells).shape == (grid_h, grid_w, 1)
    pts = np.random.default_rng(0).uniform(-1, 1, (50, 2))
    fig = plots.scatter_figure(
        [("data", pts, "50 points"), ("samples", pts, "50 points")],
        str(tmp_path / "s.png"),
        title="toy",
        panel_px=200,
    )
    assert _png_size(tmp_path / "s.png") == (440, 250)
    assert [ax.get_title() for ax in fig.axes] == ["data", "samples"]
    assert all(_legend_texts(ax) == ["50 points"] and ax.get_xlabel() == "x₁" for ax in fig.axes)


def test_figures_write_atomically_and_import_matplotlib_lazily(tmp_path):
    path = tmp_path / "loss.png"
    path.write_bytes(b"old")
    plot_curves(_records(3), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not [p for p in tmp_path.iterdir() if p != path]
    code = "import sys, iddpm_ext, iddpm_ext.training.log, iddpm_ext.cli; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_training_log_goes_on_without_matplotlib(tmp_path, monkeypatch):
    import warnings

    from iddpm_ext.training.log import MetricsLog

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    log = MetricsLog(str(tmp_path / "progress.jsonl"), str(tmp_path / "loss.png"))
    log.append({"step": 1, "loss": 0.5})
    with pytest.warns(UserWarning, match="loss.png not drawn: matplotlib is not installed"):
        log.plot()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log.plot()  # warned once
    assert not (tmp_path / "loss.png").exists() and (tmp_path / "progress.jsonl").is_file()
