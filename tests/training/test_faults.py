"""Faults: SIGKILL during training never leaves a bad latest checkpoint; damaged
checkpoints are clear errors and nothing good is overwritten."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from helpers.training import REPO, argv, main, tiny_flags, train, write_npz
from iddpm_ext.training import checkpoint as ckpt
from iddpm_ext.training.log import read_jsonl


def _start_training(data, run, resume):
    env = dict(
        os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1"
    )
    flags = "--save_interval 1 --log_interval 1 --max_steps 100000 --ema_rate 0.9,0.99 --progress False"
    args = argv("{python} -m iddpm_ext train --data_dir {data} --batch_size 8 --out_dir {run} " + flags,
                python=sys.executable, data=data, run=run) + tiny_flags()  # fmt: skip
    if resume:
        args += ["--resume_checkpoint", run]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


# Continue the run in {run}, the data {data}.
RESUME = "--data_dir {data} --batch_size 8 --resume_checkpoint {run} --out_dir {run} --progress False"


def _check_latest_loads(run):
    files = ckpt.resolve_resume(run)
    for path in [files["model"], *files["ema"].values()]:
        state, config, meta = ckpt.load_weights(path)
        assert config is not None and int(meta["step"]) == files["step"] and state
    state = ckpt.load_train_state(files["opt"])
    assert state["step"] == files["step"]
    return files["step"]


@pytest.mark.slow
def test_sigkill_during_training_leaves_a_loadable_latest(tmp_path):
    data = write_npz(str(tmp_path / "d.npz"), n=32)
    run = str(tmp_path / "run")
    rng = random.Random(0)
    steps = []
    for attempt in range(4):
        proc = _start_training(data, run, resume=attempt > 0)
        deadline = time.time() + 120
        start_step = steps[-1] if steps else 0
        while time.time() < deadline:  # wait until it has saved at least one new step
            latest = ckpt.read_latest(run) if os.path.isdir(run) else None
            if latest and latest["step"] > start_step:
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.6))  # then kill it at a random moment (saving every step)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        steps.append(_check_latest_loads(run))
    assert steps == sorted(steps) and steps[-1] > steps[0]
    # a resumed run cleans up temporaries and its log has one record per step
    flags = "--ema_rate 0.9,0.99 --log_interval 1 --max_steps {n}"
    assert train(RESUME + " " + flags, data=data, run=run, n=steps[-1] + 2) == 0
    assert not [n for n in os.listdir(run) if n.endswith(".tmp")]
    logged = [r["step"] for r in read_jsonl(os.path.join(run, "progress.jsonl"))]
    assert logged == list(range(1, steps[-1] + 3))


def test_damaged_checkpoints_are_clear_errors(tmp_path, capsys):
    data = write_npz(str(tmp_path / "d.npz"), n=16)
    run = str(tmp_path / "run")
    first = (
        "--data_dir {data} --batch_size 8 --max_steps 2 --save_interval 2 --out_dir {run} --progress False"
    )
    assert train(first, data=data, run=run) == 0
    model = os.path.join(run, "model000002.safetensors")
    blob = open(model, "rb").read()
    open(model, "wb").write(blob[: len(blob) // 3])
    capsys.readouterr()
    assert train(RESUME + " --max_steps 4", data=data, run=run) == 2
    assert "model000002.safetensors: not a readable safetensors file" in capsys.readouterr().err
    assert ckpt.read_latest(run)["step"] == 2
    assert not os.path.exists(os.path.join(run, "model000004.safetensors"))
    assert main("sample --model_path {model} --out_dir {out}", model=model, out=str(tmp_path / "s")) == 2
    assert "truncated or corrupt" in capsys.readouterr().err and not os.path.exists(tmp_path / "s")
    opt = os.path.join(run, "opt000002.pt")
    open(model, "wb").write(blob)
    open(opt, "wb").write(b"garbage")
    assert train(RESUME + " --max_steps 4", data=data, run=run) == 2
    assert "opt000002.pt: cannot load the training state" in capsys.readouterr().err
