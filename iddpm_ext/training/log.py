"""Training metrics: a JSONL log (one record per logged step) and a PNG plot of the curves
(matplotlib, :mod:`.plots`), refreshed as training runs."""

from __future__ import annotations

import json
import os
import warnings

from ..io import atomic_write_bytes


def read_jsonl(path: str) -> list:
    """The records of a JSONL log (a torn last line, from a kill mid-write, is skipped)."""
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class MetricsLog:
    """Appends records to ``jsonl_path`` and redraws ``png_path`` from them (``num_timesteps``:
    the diffusion's T, which names the quartiles of t in the plot's legends)."""

    def __init__(
        self,
        jsonl_path: str,
        png_path: str | None = None,
        resume_step: int | None = None,
        num_timesteps: int | None = None,
    ):
        self.jsonl_path = jsonl_path
        self.png_path = png_path
        self.num_timesteps = num_timesteps
        self._warned = False
        self.records = []
        if resume_step is not None and os.path.isfile(jsonl_path):
            # Keep what the checkpoint covers; later lines belong to the interrupted run.
            self.records = [r for r in read_jsonl(jsonl_path) if r.get("step", 0) <= resume_step]
            data = "".join(json.dumps(r) + "\n" for r in self.records).encode()
            atomic_write_bytes(jsonl_path, data)
        elif os.path.exists(jsonl_path):
            os.remove(jsonl_path)

    def append(self, record: dict):
        self.records.append(record)
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self, title: str = ""):
        """Redraw the PNG; without matplotlib (a dependency, but an environment may lack it)
        training goes on without the plot, with one warning."""
        if not (self.png_path and self.records):
            return
        try:
            plot_curves(self.records, self.png_path, title=title, num_timesteps=self.num_timesteps)
        except ModuleNotFoundError as err:
            if err.name != "matplotlib" and not (err.name or "").startswith("matplotlib."):
                raise
            if not self._warned:
                warnings.warn(f"{self.png_path} not drawn: matplotlib is not installed", stacklevel=2)
                self._warned = True


def plot_curves(records: list, path: str, title: str = "", num_timesteps: int | None = None):
    """Draw the loss / mse / vb panels (each with its per-quartile-of-t curves) and the
    grad-norm panel of ``records`` (dicts with a "step") into a PNG at ``path`` (atomically);
    returns the matplotlib Figure (:func:`iddpm_ext.training.plots.loss_figure`)."""
    from .plots import loss_figure

    return loss_figure(records, path, title=title, num_timesteps=num_timesteps)
