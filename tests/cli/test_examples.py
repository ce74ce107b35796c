"""The scripts in examples/ run as documented, with tiny sizes: train on a folder of images,
then sample, nll and the sampling engine on that run folder (in this process, through each
script's main(argv))."""

import os
import runpy
import sys

import numpy as np
import pytest

from helpers import REPO

EXAMPLES = os.path.join(REPO, "examples")
TINY = "--image_size 8 --num_channels 32 --channel_mult 1,2 --attention_resolutions 4 --diffusion_steps 10"


def _main(name, monkeypatch, args: str, **values):
    monkeypatch.syspath_prepend(EXAMPLES)  # nll.py and sampling_engine.py import sample.py beside them
    monkeypatch.delitem(sys.modules, "sample", raising=False)
    main = runpy.run_path(os.path.join(EXAMPLES, f"{name}.py"))["main"]
    return main([word.format(**values) for word in args.split()])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("examples") / "run")
    with pytest.MonkeyPatch.context() as mp:
        got = _main(
            "train_on_folder",
            mp,
            TINY + " --steps 2 --batch_size 4 --num_images 8 --out_dir {out} --progress 0",
            out=out,
        )
    assert got == out
    return out


def test_train_on_folder(run_dir):
    names = os.listdir(run_dir)
    assert "latest.json" in names and "loss.png" in names and "progress.jsonl" in names
    pngs = os.listdir(run_dir + "_images")  # the synthetic folder it trained on
    assert len(pngs) == 8 and all(p.endswith(".png") for p in pngs)


def test_sample(run_dir, tmp_path, monkeypatch):
    images = _main(
        "sample",
        monkeypatch,
        "--model_path {run} --num_samples 3 --timestep_respacing 3 --out_dir {out} --progress 0",
        run=run_dir,
        out=str(tmp_path),
    )
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8
    with np.load(tmp_path / "samples_3x8x8x3.npz") as f:
        assert np.array_equal(f["arr_0"], images)
    assert os.path.getsize(tmp_path / "samples.png") > 100


def test_nll(run_dir, monkeypatch, capsys):
    res = _main(
        "nll",
        monkeypatch,
        "--model_path {run} --data_dir {data} --num_images 3 --batch_size 2 --progress 0",
        run=run_dir,
        data=run_dir + "_images",
    )
    assert res["images"] == 3 and 0 < res["bits_per_dim"] < 30 and res["stderr"] > 0
    assert "bits/dim over 3 images" in capsys.readouterr().out


@pytest.mark.kernels
def test_sampling_engine(run_dir, monkeypatch):
    res = _main(
        "sampling_engine",
        monkeypatch,
        "--model_path {run} --num_samples 2 --timestep_respacing 3",
        run=run_dir,
    )
    assert res["mode"] == "eager" and res["engine_seconds"] > 0 and res["loop_seconds"] > 0
    assert res["max_abs_diff"] < 1e-4  # the same generator: the loop's samples
    res = _main(  # the CPU's op graph
        "sampling_engine",
        monkeypatch,
        "--model_path {run} --num_samples 2 --timestep_respacing 3 --mode graph",
        run=run_dir,
    )
    assert res["mode"] == "graph" and res["max_abs_diff"] < 1e-4


@pytest.mark.kernels
def test_export(run_dir, tmp_path, monkeypatch):
    """One denoising step exported with torch.export, saved and loaded back, runs the whole
    sampling loop to the library's p_sample_loop result on the same noise (AOTInductor is the same
    program compiled: tests/model/test_unet_export.py)."""
    out = str(tmp_path / "step.pt2")
    res = _main(
        "export",
        monkeypatch,
        "--model_path {run} --out {out} --timestep_respacing 4 --num_samples 2",
        run=run_dir,
        out=out,
    )
    assert res["steps"] == 4 and os.path.getsize(out) > 1000
    assert res["moved"] > 0.1  # the loop changed x (not a comparison of x_T with itself) ...
    assert res["exported_max_abs_diff"] < 1e-5  # ... and the exported step did the same
