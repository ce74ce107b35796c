"""The toy end-to-end run behind `make demo` works and learns the data (short run)."""

import json
import os

import pytest

from iddpm_ext.cli import toy


@pytest.mark.slow
def test_toy_demo_short_run(tmp_path):
    lines = []
    res = toy.run(
        out_dir=str(tmp_path), train_steps=1500, seed=0, log=lines.append, num_samples=500, num_held_out=200
    )
    assert os.path.getsize(tmp_path / "toy_samples.png") > 1000
    saved = json.load(open(tmp_path / "toy_results.json"))
    assert saved["results"]["bits_per_dim"] == res["bits_per_dim"]
    # even a short run puts most samples near the 8 blobs (random points in [-1,1]² would give ~6%)
    assert res["samples_1000"]["frac_within_3sigma"] > 0.2
    assert res["samples_1000"]["modes_covered"] >= 6
    assert 0 < res["bits_per_dim"] < 12
    assert any("held-out NLL" in line for line in lines)
