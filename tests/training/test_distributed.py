"""torchrun with 2 CPU processes (gloo): DDP keeps parameters identical across ranks,
loss-second-moment histories are all-gathered, and distributed sampling gathers exactly N
distinct samples equal to a single process's. Each launch takes ~10-20 s."""

import json
import os
import sys

import numpy as np
import pytest
import torch

from helpers.models import randomize_
from helpers.training import REPO, argv, main, run_group, tiny_config, tiny_flags, write_npz
from iddpm_ext.cli import generate as S
from iddpm_ext.script_util import create_model_and_diffusion

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)


def _torchrun(args, timeout=180):
    env = dict(os.environ)
    env["PYTHONPATH"] = (
        REPO + os.pathsep + os.path.join(REPO, "tests") + os.pathsep + env.get("PYTHONPATH", "")
    )
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    r = run_group(cmd, env, timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


@pytest.mark.slow
def test_ddp_training_and_sampling_across_two_processes(tmp_path):
    _torchrun([os.path.join(REPO, "tests", "helpers", "dist_worker.py"), str(tmp_path)])
    result = json.load(open(tmp_path / "result.json"))
    assert result["world"] == 2 and result["step"] == 6
    assert result["params_moved"] > 0
    assert result["params_max_diff"] == 0.0  # identical parameters on both ranks
    assert result["ema_max_diff"] == 0.0
    assert result["history_max_diff"] == 0.0 and result["history_filled"] > 0
    assert json.load(open(tmp_path / "run" / "latest.json"))["step"] == 6

    with np.load(tmp_path / "dist_samples.npz") as f:
        dist_images = f["arr_0"]
    assert dist_images.shape == (7, 8, 8, 1)
    assert len({img.tobytes() for img in dist_images}) == 7  # exactly N distinct samples
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**tiny_config(timestep_respacing="5"))
    randomize_(model)
    model.eval()
    single = S.generate(model, diffusion, 7, (1, 8, 8), batch_size=3, seed=11)["images"]
    assert np.array_equal(dist_images, single)  # independent of processes and batch size


@pytest.mark.slow
def test_torchrun_iddpm_train_and_sample(tmp_path):
    """``iddpm train``, ``sample`` and ``nll`` on two ranks, in one torchrun launch (each rank
    runs the three command lines in turn, tests/helpers/cli_sequence.py: a launch costs three
    Python start-ups); the samples equal a single process's."""
    data = write_npz(str(tmp_path / "d.npz"), n=32)
    run, out, nll = (str(tmp_path / name) for name in ("run", "s", "nll"))
    commands = [
        argv(
            "train --data_dir {data_dir} --batch_size 4 --max_steps 2 --out_dir {out_dir} --progress False",
            data_dir=data,
            out_dir=run,
        )
        + tiny_flags(),
        argv(
            "sample --model_path {model_path} --num_samples 5 --batch_size 2 --timestep_respacing 3 "
            "--out_dir {out_dir} --progress False",
            model_path=run,
            out_dir=out,
        ),
        argv(
            "nll --model_path {model_path} --data_dir {data_dir} --num_samples 5 --batch_size 2 "
            "--out_dir {out_dir} --progress False",
            model_path=run,
            data_dir=data,
            out_dir=nll,
        ),
    ]
    r = _torchrun([os.path.join(REPO, "tests", "helpers", "cli_sequence.py"), json.dumps(commands)])
    assert json.load(open(os.path.join(run, "latest.json")))["step"] == 2
    assert "2 process(es)" in r.stdout
    with np.load(os.path.join(out, "samples_5x8x8x1.npz")) as f:
        two = f["arr_0"]
    assert two.shape == (5, 8, 8, 1) and len({i.tobytes() for i in two}) == 5

    one_out = str(tmp_path / "one")
    assert (
        main(
            (
                "sample --model_path {model_path} --num_samples 5 --batch_size 5 "
                "--timestep_respacing 3 --out_dir {out_dir} --progress False"
            ),
            model_path=run,
            out_dir=one_out,
        )
        == 0
    )
    with np.load(os.path.join(one_out, "samples_5x8x8x1.npz")) as f:
        assert np.array_equal(f["arr_0"], two)
    assert json.loads(r.stdout.strip().splitlines()[-1])["num_images"] == 5
    with np.load(os.path.join(nll, "bpd.npz")) as f:
        assert f["total_bpd"].shape == (5,) and np.isfinite(f["total_bpd"]).all()
    with np.load(os.path.join(nll, "vb_terms.npz")) as f:
        assert f["arr_0"].shape == (10,)
