"""The reproduction's figures, drawn from the stored results of the default run
(docs/results/reproduce_default.json, what the README shows): sizes, labels, legends, the
zoomed NLL axis with its error bars."""

import json
import os

import pytest
from PIL import Image

from helpers import REPO
from iddpm_ext.evaluation import repro_report

pytest.importorskip("matplotlib")

RESULTS = os.path.join(REPO, "docs", "results", "reproduce_default.json")


@pytest.fixture(scope="module")
def results():
    with open(RESULTS) as f:
        return json.load(f)


def test_quality_figure(results, tmp_path):
    path = str(tmp_path / "q.png")
    fig = repro_report.plot_quality(results, path)
    with Image.open(path) as im:
        assert im.size == (900, 480)
    ax = fig.axes[0]
    runs = results["settings"]["runs"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[0].startswith("floor: 500 real digits") and legend[1:] == [
        repro_report.SHORT[r] for r in runs
    ]
    assert "bootstrap" in ax.get_legend().get_title().get_text()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["25", "50", "100", "1000"]
    assert ax.get_xscale() == "log" and "sampling steps" in ax.get_xlabel() and "FD" in ax.get_ylabel()
    assert "lower is better" in ax.get_title()
    styles = [c.lines[0].get_linestyle() for c in ax.containers]
    assert styles == ["--" if r.endswith("linear") else "-" for r in runs]


def test_nll_figure_zoomed_with_error_bars(results, tmp_path):
    path = str(tmp_path / "nll.png")
    fig = repro_report.plot_nll(results, path)
    runs = results["settings"]["runs"]
    ax = fig.axes[0]
    with Image.open(path) as im:
        assert im.size == (900, 130 + 42 * len(runs))
    low = min(results["runs"][r]["nll"]["bpd"] - results["runs"][r]["nll"]["stderr"] for r in runs)
    assert 3.0 < ax.get_xlim()[0] < low  # not from 0: the 4.1–4.6 differences show
    assert [t.get_text() for t in ax.get_yticklabels()] == [repro_report.SHORT[r] for r in runs]
    errorbars = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
    assert len(errorbars) == 1 and errorbars[0].has_xerr
    assert "297 test digits" in fig.legends[0].get_texts()[0].get_text()
    assert ax.get_xlabel().startswith("bits/dim") and "1000-step bound" in ax.get_title()


def test_samples_figure(results, tmp_path):
    """Cells from each run's sample files; a missing file leaves its cell blank."""
    import numpy as np

    s = {**results["settings"], "runs": ["hybrid_cosine"], "sample_steps": [1000, 25], "grid_samples": 4}
    res = {"settings": s, "runs": {"hybrid_cosine": {"samples": {}}}}
    os.makedirs(tmp_path / "hybrid_cosine")
    np.savez(tmp_path / "hybrid_cosine" / "samples_25steps.npz", np.full((6, 8, 8, 1), 255, dtype=np.uint8))
    fig = repro_report.plot_samples(res, str(tmp_path), str(tmp_path / "s.png"))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1000 steps (full)", "25 steps"]
    assert [t.get_text() for t in ax.get_yticklabels()] == [repro_report.SHORT["hybrid_cosine"]]
    grid = ax.get_images()[0].get_array()
    half = grid.shape[1] // 2
    white = [int((grid[:, :half] == 255).sum()), int((grid[:, half:] == 255).sum())]
    assert white[1] - white[0] == 4 * 8 * 8  # the 4 white digits at 25 steps; the 1000-step cell blank
    assert os.path.getsize(tmp_path / "s.png") > 1000
    assert repro_report.plot_samples({"settings": s, "runs": {}}, str(tmp_path), None) is None
