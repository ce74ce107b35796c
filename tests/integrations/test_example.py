"""examples/diffusers_pipeline.py runs (tiny settings) and writes what it says."""

import os
import subprocess
import sys

import pytest
from PIL import Image

from helpers import REPO

pytest.importorskip("diffusers")


@pytest.mark.slow  # a fresh interpreter importing torch and diffusers
def test_diffusers_example_runs(tmp_path):
    script = os.path.join(REPO, "examples", "diffusers_pipeline.py")
    run = subprocess.run(
        [sys.executable, script, "--steps", "3", "--batch", "3", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "reloaded samples identical: True" in run.stdout
    with Image.open(tmp_path / "samples.png") as image:
        assert image.size == (2 * 72, 2 * 72) and image.getextrema() != (255, 255)
    for name in ("model_index.json", "unet/config.json", "scheduler/scheduler_config.json"):
        assert (tmp_path / name).is_file(), name
