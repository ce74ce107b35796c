"""Reliability of training runs: the run-folder lock (a second run or resume is refused, a
SIGKILLed holder leaves no lock, torchrun's ranks agree), the graceful stop on SIGINT /
SIGTERM (the step reached is saved, the resume is exact, ranks agree on the step), the step
stored in checkpoint files cross-checked, a failed write while saving, and the range checks
of the training flags."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers.training import (
    REPO,
    argv,
    blob_images,
    main,
    run_group,
    tiny_config,
    tiny_flags,
    train,
    write_npz,
)
from iddpm_ext.errors import CheckpointError, RunFolderLockedError, TrainingStopped
from iddpm_ext.script_util import create_model_and_diffusion
from iddpm_ext.training import checkpoint as ckpt
from iddpm_ext.training.data import ArraySource, BatchStream
from iddpm_ext.training.log import read_jsonl
from iddpm_ext.training.loop import TrainLoop
from iddpm_ext.training.runlock import LOCK_NAME, RunFolderLock

# Another process holding a run folder's lock as the kernel sees it: a POSIX record lock on
# {folder}/.lock with its pid written in (no torch import: it starts in milliseconds).
HOLDER = """import fcntl, os, sys, time
fd = os.open(os.path.join(sys.argv[1], ".lock"), os.O_RDWR | os.O_CREAT)
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.ftruncate(fd, 0)
os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
time.sleep(600)
"""


_STARTED = []


@pytest.fixture(autouse=True)
def _no_leftover_processes():
    """Processes a test started are gone after it, failed or not (loader workers included:
    the trainers here run in their own sessions, so their process group is theirs)."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _holder(folder):
    os.makedirs(folder, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    _STARTED.append(proc)
    assert proc.stdout.readline().strip() == "locked"
    return proc


class SignalAt:
    """A batch stream that sends this process ``signum`` (``times`` times) when it hands out
    batch ``at``, i.e. during step ``at``."""

    def __init__(self, stream, at, signum, times=1):
        self.stream, self.at, self.signum, self.times = stream, at, signum, times

    def __next__(self):
        item = next(self.stream)
        if self.stream.position == self.at:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)
        return item

    def state_dict(self):
        return self.stream.state_dict()

    def load_state_dict(self, state):
        return self.stream.load_state_dict(state)


def _loop(out_dir, *, resume="", signal_at=None, times=1, **kw):
    cfg = tiny_config(dropout=0.1, diffusion_steps=5)
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**cfg)
    images, labels = blob_images(48, 8, 1)
    data = BatchStream(ArraySource(images, labels), 8, seed=0, random_flip=True)
    if signal_at is not None:
        data = SignalAt(data, signal_at[0], signal_at[1], times)
    args = dict(
        model=model,
        diffusion=diffusion,
        data=data,
        batch_size=8,
        microbatch=-1,
        lr=1e-3,
        ema_rate="0.9,0.99",
        log_interval=1,
        save_interval=1000,
        resume_checkpoint=resume,
        config=cfg,
        out_dir=str(out_dir),
        progress=False,
        log=lambda *a: None,
    )
    args.update(kw)
    return TrainLoop(**args)


def _weights(run, step):
    out = {}
    for name in (f"model{step:06d}", f"ema_0.9_{step:06d}", f"ema_0.99_{step:06d}"):
        out[name] = ckpt.load_weights(os.path.join(run, name + ".safetensors"))[0]
    return out


def _same_weights(a, b):
    return a.keys() == b.keys() and all(
        a[n].keys() == b[n].keys() and all(torch.equal(a[n][k], b[n][k]) for k in a[n]) for n in a
    )


def _losses(run):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_jsonl(os.path.join(run, "progress.jsonl"))]


# -------------------------------------------------------------------------------------
# the run-folder lock
# -------------------------------------------------------------------------------------


def test_a_locked_folder_refuses_runs_and_resumes_until_its_holder_dies(tmp_path):
    run = tmp_path / "run"
    _loop(run, max_steps=2).run_loop()  # a run to resume
    holder = _holder(run)
    try:
        for resume in ("", str(run)):
            with pytest.raises(RunFolderLockedError) as err:
                _loop(run, resume=resume, max_steps=4)
            assert str(run) in str(err.value) and f"pid {holder.pid}" in str(err.value)
    finally:
        holder.kill()  # SIGKILL: the kernel drops its lock, nothing is left to clean up
        holder.wait()
    loop = _loop(run, resume=str(run), max_steps=3)
    assert open(run / LOCK_NAME).read().strip() == str(os.getpid())
    with pytest.raises(RunFolderLockedError, match="this process"):  # a second loop of this process
        _loop(run, resume=str(run), max_steps=4)
    loop.run_loop()
    assert ckpt.read_latest(str(run))["step"] == 3
    with RunFolderLock(str(run)):  # run_loop released it
        pass


@pytest.mark.slow
def test_a_failed_construction_releases_the_lock(tmp_path):
    _loop(tmp_path, max_steps=1).run_loop()
    with pytest.raises(CheckpointError, match="already holds a training run") as err:
        _loop(tmp_path, max_steps=2)
    _loop(tmp_path, resume=str(tmp_path), max_steps=2).run_loop()  # err still holds the failed loop's frame
    assert err.value is not None and ckpt.read_latest(str(tmp_path))["step"] == 2


# -------------------------------------------------------------------------------------
# graceful stop (in this process: a signal sent at a known step)
# -------------------------------------------------------------------------------------


@pytest.fixture
def default_signals():
    """SIGINT and SIGTERM with Python's default handlers for the test: a test run started as a
    background job (CI, `cmd &`) inherits SIGINT ignored, and TrainLoop keeps an ignored signal
    ignored (tested below)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.slow
def test_a_stop_signal_saves_the_step_reached_and_the_resume_is_exact(tmp_path, signum, default_signals):
    before = signal.getsignal(signum)
    full = _loop(tmp_path / "full", max_steps=6)
    full.run_loop()
    part = _loop(tmp_path / "part", max_steps=1000, signal_at=(3, signum))
    with pytest.raises(TrainingStopped) as stop:
        part.run_loop()
    assert (stop.value.signal, stop.value.step, stop.value.exit_code) == (signum, 3, 128 + signum)
    assert isinstance(stop.value, KeyboardInterrupt) and str(tmp_path / "part") in str(stop.value)
    assert signal.getsignal(signum) is before  # the handlers are given back
    assert (
        ckpt.read_latest(str(tmp_path / "part"))["step"] == 3
    )  # the step reached, though save_interval is 1000
    _loop(tmp_path / "part", resume=str(tmp_path / "part"), max_steps=6).run_loop()
    assert _same_weights(_weights(tmp_path / "full", 6), _weights(tmp_path / "part", 6))
    assert _losses(tmp_path / "full") == _losses(tmp_path / "part")


def test_an_ignored_sigint_stays_ignored(tmp_path, default_signals):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # e.g. `nohup iddpm train ... &`
    loop = _loop(tmp_path, max_steps=4, signal_at=(2, signal.SIGINT))
    loop.run_loop()  # the signal is delivered at step 2 and ignored: training goes on
    assert loop.step == 4 and ckpt.read_latest(str(tmp_path))["step"] == 4
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_a_second_signal_stops_at_once(tmp_path, default_signals):
    before = signal.getsignal(signal.SIGINT)
    loop = _loop(tmp_path, max_steps=1000, save_interval=2, signal_at=(3, signal.SIGINT), times=2)
    with pytest.raises(KeyboardInterrupt) as err:
        loop.run_loop()
    assert type(err.value) is KeyboardInterrupt  # not a TrainingStopped: step 3 was not finished
    assert ckpt.read_latest(str(tmp_path))["step"] == 2
    assert signal.getsignal(signal.SIGINT) is before
    with RunFolderLock(str(tmp_path)):
        pass


# -------------------------------------------------------------------------------------
# command lines in subprocesses, real signals
# -------------------------------------------------------------------------------------

FLAGS = "--batch_size 8 --save_interval 1000 --log_interval 1 --progress False --threads 1"


def _popen(*words):
    env = dict(
        os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1"
    )
    cmd = [sys.executable, "-m", "iddpm_ext", *words] + tiny_flags()

    def default_sigint():  # a background job may have inherited SIGINT ignored
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=default_sigint,
        start_new_session=True,
    )
    _STARTED.append(proc)
    return proc


def _wait_for_steps(proc, run, n, timeout=120):
    """Until ``run``'s progress.jsonl has ``n`` records (the process is training)."""
    deadline = time.time() + timeout
    path = os.path.join(run, "progress.jsonl")
    while time.time() < deadline:
        if os.path.isfile(path) and len(read_jsonl(path)) >= n:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError(f"{run}: no {n} steps within {timeout} s")


def _check_consistent(run):
    """latest.json's files exist, load and hold its step; the log has each step once."""
    files = ckpt.resolve_resume(run)
    for path in [files["model"], *files["ema"].values()]:
        assert int(ckpt.load_weights(path)[2]["step"]) == files["step"]
    assert ckpt.load_train_state(files["opt"])["step"] == files["step"]
    steps = [r["step"] for r in read_jsonl(os.path.join(run, "progress.jsonl"))]
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] >= files["step"]
    return files["step"]


@pytest.mark.slow
def test_two_runs_into_one_folder_then_sigterm(tmp_path):
    """The issue's reproduction: two trainings started together into one folder. One trains,
    the other exits at once with one line naming the folder and the first one's pid; SIGTERM
    then stops the first with a checkpoint of its step, from which the resume is exact."""
    data = write_npz(str(tmp_path / "d.npz"), n=48)
    run = str(tmp_path / "shared")
    words = argv("train --data_dir {data} --out_dir {run} --max_steps 100000 " + FLAGS, data=data, run=run)
    procs = [_popen(*words, "--seed", str(seed)) for seed in (0, 1)]
    deadline = time.time() + 120
    while all(p.poll() is None for p in procs):
        assert time.time() < deadline
        time.sleep(0.05)
    loser = next(p for p in procs if p.poll() is not None)
    winner = next(p for p in procs if p is not loser)
    err = loser.communicate()[1].strip().splitlines()
    assert loser.returncode == 2 and len(err) == 1, err
    assert (
        err[0].startswith(f"iddpm: error: {run}: this run folder is in use") and f"pid {winner.pid}" in err[0]
    )
    _wait_for_steps(winner, run, 2)
    winner.send_signal(signal.SIGTERM)
    out, err = winner.communicate(timeout=120)
    err = err.strip().splitlines()
    assert winner.returncode == 143 and len(err) == 1, err
    step = _check_consistent(run)
    assert err[0] == (
        f"iddpm: stopped by SIGTERM at step {step}; checkpoint saved in {run} (continue with "
        f"--resume_checkpoint {run})"
    )
    seed = 0 if winner is procs[0] else 1
    common = "--data_dir {data} --seed {seed} --max_steps {n} --ema_rate 0.9999 " + FLAGS
    assert (
        train(
            common + " --out_dir {run} --resume_checkpoint {run}", data=data, seed=seed, n=step + 2, run=run
        )
        == 0
    )
    full = str(tmp_path / "full")
    assert train(common + " --out_dir {run}", data=data, seed=seed, n=step + 2, run=full) == 0
    names = [f"model{step + 2:06d}.safetensors", f"ema_0.9999_{step + 2:06d}.safetensors"]
    for name in names:
        a, b = (ckpt.load_weights(os.path.join(r, name))[0] for r in (run, full))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert _losses(run) == _losses(full)


def _image_folder(folder, n=24):
    from PIL import Image

    os.makedirs(folder)
    images, _ = blob_images(n, 8, 1)
    for i, img in enumerate(images):
        Image.fromarray(img[..., 0]).save(os.path.join(folder, f"img_{i:03d}.png"))
    return str(folder)


@pytest.mark.slow
def test_ctrl_c_with_loader_workers_then_sigkill_leaves_no_lock(tmp_path):
    """Ctrl-C reaches the whole process group (the loader workers too): the step reached is
    saved, exit 130. A SIGKILLed trainer's folder is free at once, though its orphaned loader
    workers live on for a moment (the lock is not inherited by them)."""
    data = _image_folder(tmp_path / "images")
    run = str(tmp_path / "run")
    words = argv(
        "train --data_dir {data} --out_dir {run} --max_steps 100000 --num_workers 2 " + FLAGS,
        data=data,
        run=run,
    )
    proc = _popen(*words)
    _wait_for_steps(proc, run, 2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = err.strip().splitlines()
    assert (
        proc.returncode == 130 and len(err) == 1 and err[0].startswith("iddpm: stopped by SIGINT at step")
    ), err
    step = _check_consistent(run)

    proc = _popen(*words, "--resume_checkpoint", run)
    _wait_for_steps(proc, run, step + 2)
    proc.kill()
    proc.wait()
    step = _check_consistent(run)
    r = _popen(
        *argv(
            "train --data_dir {data} --out_dir {run} --resume_checkpoint {run} --max_steps {n} " + FLAGS,
            data=data,
            run=run,
            n=step + 1,
        )
    )
    _, err = r.communicate(timeout=120)
    assert r.returncode == 0, err[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)
def test_torchrun_ranks_agree_on_the_lock_and_the_stop_step(tmp_path):
    locked = tmp_path / "locked"
    holder = _holder(locked)
    try:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env["PYTHONPATH"] = (
            REPO + os.pathsep + os.path.join(REPO, "tests") + os.pathsep + env.get("PYTHONPATH", "")
        )
        worker = os.path.join(REPO, "tests", "helpers", "dist_stop_worker.py")
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            worker,
            str(tmp_path),
            str(locked),
        ]
        r = run_group(cmd, env, 180)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    finally:
        holder.kill()
        holder.wait()
    results = [json.load(open(tmp_path / f"result{rank}.json")) for rank in (0, 1)]
    for res in results:  # rank 0 could not lock: no rank went on
        assert f"pid {holder.pid}" in res["locked"], res
    # SIGTERM reached rank 1 alone, during step 3: both ranks finished it, saved it and stopped
    assert [res["stopped"] for res in results] == [{"signal": 15, "step": 3, "exit_code": 143}] * 2
    run = str(tmp_path / "run")
    assert _check_consistent(run) == 3
    assert len(ckpt.load_train_state(os.path.join(run, "opt000003.pt"))["rng"]) == 2


# -------------------------------------------------------------------------------------
# checkpoint steps, write errors, flag ranges
# -------------------------------------------------------------------------------------


def test_latest_json_pointing_at_another_steps_files_is_refused(tmp_path, capsys):
    data = write_npz(str(tmp_path / "d.npz"), n=16)
    run = str(tmp_path / "run")
    assert (
        train(
            "--data_dir {d} --batch_size 8 --max_steps 4 --save_interval 2 --out_dir {r} --progress False",
            d=data,
            r=run,
        )
        == 0
    )
    latest = ckpt.read_latest(run)
    for key, value in (("model", "model000002.safetensors"), ("opt", "opt000002.pt")):
        edited = {**latest, key: value}
        with open(os.path.join(run, "latest.json"), "w") as f:
            json.dump(edited, f)
        capsys.readouterr()
        assert (
            train(
                "--data_dir {d} --batch_size 8 --max_steps 6 --resume_checkpoint {r} --out_dir {r} "
                "--progress False",
                d=data,
                r=run,
            )
            == 2
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{value}: holds step 2, but is used as step 4" in err[0], err
    assert not os.path.exists(os.path.join(run, "model000006.safetensors"))
    edited = {**latest, "ema": {"0.9999": "ema_0.9999_000002.safetensors"}}
    with open(os.path.join(run, "latest.json"), "w") as f:
        json.dump(edited, f)
    assert (
        main(
            "sample --model_path {r} --num_samples 1 --out_dir {o} --progress False",
            r=run,
            o=str(tmp_path / "s"),
        )
        == 2
    )
    assert "ema_0.9999_000002.safetensors: holds step 2, but is used as step 4" in capsys.readouterr().err


def test_a_failed_write_while_saving_is_one_line_and_loses_nothing(tmp_path, capsys, monkeypatch):
    import iddpm_ext.io as io_mod

    data = write_npz(str(tmp_path / "d.npz"), n=16)
    run = str(tmp_path / "run")
    assert (
        train(
            "--data_dir {d} --batch_size 8 --max_steps 2 --save_interval 2 --log_interval 1 --out_dir {r} "
            "--progress False",
            d=data,
            r=run,
        )
        == 0
    )
    real_fsync = os.fsync

    def full_disk(fd):  # what a full disk looks like to a writer (delayed allocation fails at fsync)
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".model"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(io_mod.os, "fsync", full_disk)
    capsys.readouterr()
    rc = train(
        "--data_dir {d} --batch_size 8 --max_steps 4 --save_interval 2 --log_interval 1 "
        "--resume_checkpoint {r} --out_dir {r} --progress False",
        d=data,
        r=run,
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert err[0] == (
        f"iddpm: error: {os.path.join(run, 'model000004.safetensors')}: cannot write it (No space left on "
        "device); the previous file, if any, is unchanged"
    )
    assert ckpt.read_latest(run)["step"] == 2 and _check_consistent(run) == 2
    assert not [n for n in os.listdir(run) if n.endswith(".tmp") or "000004" in n]
    with RunFolderLock(run):  # released after the error
        pass


@pytest.mark.parametrize(
    "flags, message",
    [
        ("--max_steps -1", "max_steps: expected an int >= 0 (0: no limit), got -1"),
        ("--lr_anneal_steps -5", "lr_anneal_steps: expected an int >= 0 (0: no annealing), got -5"),
        ("--keep_checkpoints -2", "keep_checkpoints: expected an int >= 0 (0: keep all), got -2"),
    ],
)
def test_negative_step_counts_are_refused(tmp_path, capsys, flags, message):
    data = write_npz(str(tmp_path / "d.npz"), n=16)
    run = tmp_path / "run"
    assert (
        train("--data_dir {d} --batch_size 8 --out_dir {r} --progress False " + flags, d=data, r=str(run))
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"iddpm: error: {message}"]
    assert ckpt.read_latest(str(run)) is None
