"""The digits demo (`make demo`): the shipped checkpoint loads, samples look like digits
(dark borders, bright strokes in the middle, like the data), bits/dim is finite; the
--train_steps path trains a model first."""

import json
import os

import numpy as np
import pytest
import torch

from iddpm_ext.cli import demo
from iddpm_ext.training import checkpoint as ckpt

pytest.importorskip("sklearn")


def _digit_like(images):
    """Share of images whose outer ring is dark and whose centre has bright pixels."""
    img = images[..., 0].astype(float)
    ring = np.concatenate([img[:, 0, :], img[:, -1, :], img[:, :, 0], img[:, :, -1]], axis=1).mean(axis=1)
    centre = img[:, 4:12, 4:12].max(axis=(1, 2))
    return float(np.mean((ring < 60) & (centre > 150)))


def test_shipped_checkpoint_and_log():
    assert os.path.getsize(demo.CHECKPOINT) <= 8 * 2**20
    state, config, meta = ckpt.load_weights(demo.CHECKPOINT)
    assert config["image_size"] == 16 and config["image_channels"] == 1 and config["learn_sigma"] is True
    assert int(meta["step"]) >= 1000 and meta["kind"] == "ema"
    records = [json.loads(line) for line in open(demo.TRAIN_LOG)]
    assert records[-1]["step"] == int(meta["step"]) and records[-1]["loss"] < records[0]["loss"]


@pytest.mark.slow
def test_demo_with_the_shipped_checkpoint(tmp_path):
    lines = []
    res = demo.run(out_dir=str(tmp_path), num_samples=16, sample_steps=50, nll_images=4, log=lines.append)
    for name in ("samples.png", "trajectory.png", "loss.png", "results.json", "samples_16x16x16x1.npz"):
        assert os.path.getsize(tmp_path / name) > 100, name
    with np.load(tmp_path / "samples_16x16x16x1.npz") as f:
        samples = f["arr_0"]
    from iddpm_ext.training.data import open_source

    data = open_source("digits", image_size=16, image_channels=1, split="test").images
    assert _digit_like(data) > 0.9  # the statistic holds for real digits ...
    assert _digit_like(samples) > 0.75  # ... and for the samples
    assert np.isfinite(res["bits_per_dim"]) and 0 < res["bits_per_dim"] < 8 and res["nll_images"] == 4
    assert any("bits/dim" in line and "±" in line for line in lines)
    assert json.load(open(tmp_path / "results.json"))["bits_per_dim"] == res["bits_per_dim"]
    assert res["nll_terms_per_image"] == 50 and "unbiased" in res["nll_estimator"]
    if res["sample_fused"]:  # the first samples again through the eager step: the same pixels
        assert res["max_pixel_diff_fused_vs_eager"] == 0 and res["compared_samples"] == 8
        assert res["step_ms_fused"] > 0 and res["step_ms_eager"] > 0
        assert any("the step alone: fused" in line for line in lines)


@pytest.mark.slow
def test_demo_trains_when_asked(tmp_path):
    res = demo.run(
        out_dir=str(tmp_path), train_steps=2, num_samples=2, sample_steps=2, nll_images=1, log=lambda *a: None
    )
    assert res["checkpoint_step"] == 2 and os.path.isfile(tmp_path / "train" / "latest.json")
    assert np.isfinite(res["bits_per_dim"])


def test_engine_against_the_reference_style_loop_runs():
    """What the demo times on a GPU, here on the CPU (the library loop against the
    reference-style loop, both from the same x_T)."""
    from iddpm_ext.cli.commands import build

    state, config, _ = ckpt.load_weights(demo.CHECKPOINT)
    model, diffusion = build({**config, "timestep_respacing": "2"}, "cpu")
    ckpt.load_into(model, state, demo.CHECKPOINT)
    speed = demo._reference_speed(model.eval(), diffusion, (1, 16, 16), 2, torch.device("cpu"))
    assert speed["engine"] == "loop" and speed["engine_seconds"] > 0 and speed["reference_loop_seconds"] > 0
