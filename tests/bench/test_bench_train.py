"""``iddpm bench train`` on the CPU: every case runs (each TrainLoop releases its run folder
for the next), with the channels-last rows next to the NCHW ones."""

import json

import pytest

from helpers.training import argv
from iddpm_ext import bench


@pytest.mark.slow
def test_cases_and_channels_last_rows(tmp_path):
    out = tmp_path / "t.json"
    args = argv("train --device cpu --threads 1 --quick --warmup 0 --iters 1 --json {json}", json=str(out))
    assert bench.main(args) == 0
    recs = json.loads(out.read_text())["records"]
    assert len(recs) == 10
    cl = [r for r in recs if r["channels_last"]]
    assert [(r["impl"], r["dtype"], r["use_checkpoint"]) for r in cl] == [
        ("auto channels-last", "float32", False),
        ("auto channels-last", "bfloat16", False),
    ]
    assert all(r["ms"] > 0 and r["images_per_s"] > 0 for r in recs)
    assert recs[0]["impl"] == "einsum" and recs[0]["speedup"] == 1
