"""improved-diffusion's scripts (image_train.py, image_sample.py, image_nll.py) run against this
library with only the import prefix changed.

(a) tests/compat/scripts/ holds our own scripts making the same calls in the same way (flags
through add_dict_to_argparser and the defaults dicts, setup_dist, logger.configure with
$OPENAI_LOGDIR, TrainLoop(...).run_loop(), dist.all_gather, np.savez of arr_0/arr_1 named
samples_NxHxWxC.npz, image_nll's bits/dim loop with dist.all_reduce). flow.py runs them in turn
(train, the same training again: it resumes, once more: nothing to do, sample, nll); here it runs
as a plain process and under torchrun with 1 and 2 processes, and the outputs are checked.
(b) With IDDPM_REF_PATH set to a checkout of openai/improved-diffusion, its real scripts
run the same way with `improved_diffusion` rewritten to `iddpm_ext` (skipped otherwise).
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import REPO
from helpers.training import blob_images, run_group
from iddpm_ext.training import checkpoint as ckpt

SCRIPTS = os.path.join(REPO, "tests", "compat", "scripts")
# An 8x8 RGB UNet (the reference's sampling script makes 3-channel images), 10 diffusion steps.
MODEL_FLAGS = (
    "--image_size 8 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 4 "
    "--num_heads 2 --learn_sigma True --diffusion_steps 10 --noise_schedule cosine"
).split()
T = 10

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)


def image_folder(path, n=12) -> str:
    """n 8x8 RGB PNGs named {label}_{i}.png (labels 0..2: classes for class_cond)."""
    from PIL import Image

    os.makedirs(path)
    images, labels = blob_images(n, 8, 3)
    for i, (img, y) in enumerate(zip(images, labels)):
        Image.fromarray(img).save(os.path.join(path, f"{y}_{i:03d}.png"))
    return str(path)


def launch(args, nproc: int, env=None, timeout=300) -> subprocess.CompletedProcess:
    """``python ARGS`` as a plain process (nproc 0) or under torchrun with nproc processes;
    ``env``: variables to set (e.g. OPENAI_LOGDIR)."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_LOGDIR", "RANK", "WORLD_SIZE")}
    full_env["PYTHONPATH"] = REPO + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env["OMP_NUM_THREADS"] = "1"
    full_env.update(env or {})
    cmd = [sys.executable]
    if nproc:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    r = run_group([*cmd, *args], full_env, timeout)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-6000:]
    assert "Traceback" not in r.stderr, r.stderr[-6000:]
    return r


def read_csv(path) -> list:
    with open(path) as f:
        lines = f.read().splitlines()
    keys = lines[0].split(",")
    return [dict(zip(keys, line.split(","))) for line in lines[1:]]


def check_train_folder(run: str, world: int, steps=(1, 2, 3)):
    """A reference-style run of batch 2 per process trained to step 2, then resumed to 3."""
    assert json.load(open(os.path.join(run, "latest.json")))["step"] == steps[-1]
    records = [json.loads(line) for line in open(os.path.join(run, "progress.jsonl"))]
    assert [r["step"] for r in records] == list(steps)
    rows = read_csv(os.path.join(run, "progress.csv"))  # continued across the three launches
    assert [int(r["step"]) for r in rows] == list(steps)
    keys = set(rows[0])
    assert {"step", "samples", "loss", "mse", "vb", "grad_norm", "lr"} <= keys
    assert any(re.fullmatch(r"loss_q[0-3]", k) for k in keys)
    for row, record in zip(rows, records):  # the same numbers as the JSONL
        assert int(row["samples"]) == record["samples"] == record["step"] * 2 * world
        for k in ("loss", "mse", "vb", "grad_norm"):
            assert float(row[k]) == pytest.approx(record[k], rel=1e-12)
            assert np.isfinite(record[k]) and record[k] >= 0
    log = open(os.path.join(run, "log.txt")).read()
    assert log.count("Logging to") == 3  # three launches, one log
    assert re.search(r"\| loss +\| ", log)  # the key table
    assert "resuming" in log and "nothing to train" in log
    # every checkpoint carries the arguments of create_model_and_diffusion
    _, config, meta = ckpt.load_weights(os.path.join(run, "model000003.safetensors"))
    assert config["image_size"] == 8 and config["num_channels"] == 32 and config["learn_sigma"] is True
    assert config["channel_mult"] == "1,2" and config["diffusion_steps"] == T
    assert meta["step"] == "3"
    ema = os.path.join(run, "ema_0.9999_000003.safetensors")
    assert ckpt.load_weights(ema)[1] == config


def check_sample_folder(folder: str, class_cond: bool):
    with np.load(os.path.join(folder, "samples_5x8x8x3.npz")) as f:
        assert sorted(f.files) == (["arr_0", "arr_1"] if class_cond else ["arr_0"])
        arr = f["arr_0"]
        assert arr.shape == (5, 8, 8, 3) and arr.dtype == np.uint8
        assert arr.min() < arr.max()  # images, not a constant
        if class_cond:
            labels = f["arr_1"]
            assert labels.shape == (5,) and labels.dtype == np.int64
            assert labels.min() >= 0 and labels.max() < 1000


def check_nll_folder(folder: str):
    for key in ("vb", "mse", "xstart_mse"):
        with np.load(os.path.join(folder, f"{key}_terms.npz")) as f:
            terms = f["arr_0"]
        assert terms.shape == (T,) and terms.dtype in (np.float32, np.float64)
        assert np.isfinite(terms).all() and (terms >= 0).all()
    log = open(os.path.join(folder, "log.txt")).read()
    bpd = [float(v) for v in re.findall(r"bpd=([0-9.eE+-]+)", log)]
    assert bpd and all(0 < b < 100 for b in bpd)


def run_flow(tmp_path, nproc: int, class_cond: bool) -> subprocess.CompletedProcess:
    data = image_folder(tmp_path / "images")
    flags = [*MODEL_FLAGS, "--class_cond", str(class_cond)]
    return launch([os.path.join(SCRIPTS, "flow.py"), str(tmp_path / "out"), data, *flags], nproc)


@pytest.mark.slow
def test_reference_style_scripts_in_a_plain_process(tmp_path):
    r = run_flow(tmp_path, 0, class_cond=False)
    out = tmp_path / "out"
    assert re.search(r"\| loss +\| ", r.stdout)  # the key table on stdout, as the reference's
    check_train_folder(str(out / "train"), world=1)
    check_sample_folder(str(out / "sample"), class_cond=False)
    check_nll_folder(str(out / "nll"))
    # `iddpm sample` rebuilds the model from the run's config alone (no model flags)
    from iddpm_ext.cli import main

    assert main(["sample", "--model_path", str(out / "train"), "--num_samples", "2", "--batch_size", "2",
                 "--out_dir", str(tmp_path / "s"), "--progress", "False"]) == 0  # fmt: skip
    with np.load(tmp_path / "s" / "samples_2x8x8x3.npz") as f:
        assert f["arr_0"].shape == (2, 8, 8, 3)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_reference_style_scripts_under_torchrun(tmp_path, nproc):
    run_flow(tmp_path, nproc, class_cond=True)
    out = tmp_path / "out"
    check_train_folder(str(out / "train"), world=nproc)
    check_sample_folder(str(out / "sample"), class_cond=True)
    check_nll_folder(str(out / "nll"))
    others = sorted(n for n in os.listdir(out / "sample") if n.startswith("log-rank"))
    assert others == (["log-rank001.txt"] if nproc == 2 else [])  # the reference's per-rank logs


# -------------------------------------------------------------------------------------
# (b) the real scripts, from a checkout given by IDDPM_REF_PATH
# -------------------------------------------------------------------------------------

REFERENCE_DIR = os.environ.get("IDDPM_REF_PATH", "")


def reference_scripts(dest) -> dict:
    """image_train/image_sample/image_nll.py of the checkout with the import prefix changed."""
    os.makedirs(dest)
    paths = {}
    for name in ("image_train", "image_sample", "image_nll"):
        text = open(os.path.join(REFERENCE_DIR, "scripts", f"{name}.py")).read()
        assert "improved_diffusion" in text
        paths[name] = os.path.join(dest, f"{name}.py")
        with open(paths[name], "w") as f:
            f.write(text.replace("improved_diffusion", "iddpm_ext"))
    return paths


@pytest.mark.slow
@pytest.mark.skipif(not REFERENCE_DIR, reason="IDDPM_REF_PATH: a checkout of openai/improved-diffusion")
@pytest.mark.parametrize("nproc", [0, 1, 2])
def test_the_reference_scripts_with_the_prefix_changed(tmp_path, nproc):
    scripts = reference_scripts(tmp_path / "scripts")
    data = image_folder(tmp_path / "images")
    out = tmp_path / "out"

    def train(steps):
        args = [scripts["image_train"], "--data_dir", data, "--batch_size", "2", "--lr", "1e-3"]
        args += ["--log_interval", "1", "--lr_anneal_steps", str(steps), *MODEL_FLAGS]
        launch(args, nproc, env={"OPENAI_LOGDIR": str(out / "train")})

    train(2)
    train(3)  # the folder holds the run: resumed at step 2
    train(3)  # finished: nothing to do
    check_train_folder(str(out / "train"), world=max(nproc, 1))
    weights = str(out / "train" / "model000003.safetensors")
    args = [scripts["image_sample"], "--model_path", weights, "--num_samples", "5", "--batch_size", "2"]
    launch([*args, *MODEL_FLAGS], nproc, env={"OPENAI_LOGDIR": str(out / "sample")})
    check_sample_folder(str(out / "sample"), class_cond=False)
    args = [scripts["image_nll"], "--model_path", weights, "--data_dir", data, "--num_samples", "4"]
    launch([*args, "--batch_size", "2", *MODEL_FLAGS], nproc, env={"OPENAI_LOGDIR": str(out / "nll")})
    check_nll_folder(str(out / "nll"))


@pytest.mark.slow
@pytest.mark.skipif(not REFERENCE_DIR, reason="IDDPM_REF_PATH: a checkout of openai/improved-diffusion")
def test_the_reference_super_res_scripts_with_the_prefix_changed(tmp_path):
    """super_res_train.py (images downsampled with F.interpolate(mode="area") as low_res) and
    super_res_sample.py (base samples from an .npz) with the import prefix changed. They
    import blobfile themselves (not a dependency of ours): a local-file stand-in is put on
    their path."""
    from PIL import Image

    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "blobfile.py").write_text("BlobFile = open\n")
    paths = {}
    for name in ("super_res_train", "super_res_sample"):
        text = open(os.path.join(REFERENCE_DIR, "scripts", f"{name}.py")).read()
        paths[name] = str(tmp_path / f"{name}.py")
        with open(paths[name], "w") as f:
            f.write(text.replace("improved_diffusion", "iddpm_ext"))
    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):  # larger than large_size: box-halved, bicubic, cropped as the reference
        Image.fromarray(rng.integers(0, 256, (70, 80, 3), dtype=np.uint8)).save(data / f"c{i % 2}_{i}.png")
    flags = ("--large_size 64 --small_size 32 --num_channels 32 --num_res_blocks 1 --num_heads 1 "
             "--learn_sigma True --diffusion_steps 10 --noise_schedule cosine "
             "--attention_resolutions 8").split()  # fmt: skip
    env = {"PYTHONPATH": str(stubs) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = tmp_path / "out"
    launch([paths["super_res_train"], "--data_dir", str(data), "--batch_size", "2", "--lr_anneal_steps", "2",
            "--log_interval", "1", *flags], 0, env={**env, "OPENAI_LOGDIR": str(out / "train")})  # fmt: skip
    weights = out / "train" / "model000002.safetensors"
    _, config, _ = ckpt.load_weights(str(weights))
    assert config["large_size"] == 64 and config["small_size"] == 32
    base = tmp_path / "base.npz"
    np.savez(base, rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8))
    launch([paths["super_res_sample"], "--model_path", str(weights), "--base_samples", str(base),
            "--num_samples", "3", "--batch_size", "2", "--timestep_respacing", "5", *flags], 0,
           env={**env, "OPENAI_LOGDIR": str(out / "sample")})  # fmt: skip
    with np.load(out / "sample" / "samples_3x64x64x3.npz") as f:
        assert f.files == ["arr_0"] and f["arr_0"].shape == (3, 64, 64, 3) and f["arr_0"].dtype == np.uint8
        assert f["arr_0"].min() < f["arr_0"].max()
