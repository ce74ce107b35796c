"""TrainLoop and iddpm_ext.logger: the reference's key-value log (stdout table, log.txt,
progress.csv, TensorBoard) next to progress.jsonl, the model's recorded config in every
checkpoint, reference-style runs resumed when started again in their folder, and `iddpm train`
with $OPENAI_LOGDIR and --tensorboard."""

import json
import os
import sys

import pytest
import torch

from helpers.training import blob_images, fake_tensorboard, forget_logger, tiny_config, tiny_flags, write_npz
from iddpm_ext import logger
from iddpm_ext.cli import main
from iddpm_ext.errors import CheckpointError, MissingDependencyError
from iddpm_ext.resample import create_named_schedule_sampler
from iddpm_ext.script_util import create_model_and_diffusion
from iddpm_ext.training import checkpoint as ckpt
from iddpm_ext.training.data import ArraySource, BatchStream
from iddpm_ext.training.log import read_jsonl
from iddpm_ext.training.loop import TrainLoop


@pytest.fixture(autouse=True)
def _no_logger():
    logger.reset()
    yield
    logger.reset()


def reference_loop(steps, **kw):
    """A TrainLoop made as the reference's image_train.py makes it (no config, no out_dir)."""
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**tiny_config())
    images, _ = blob_images(32, 8, 1)
    data = BatchStream(ArraySource(images, None), 4)
    args = dict(model=model, diffusion=diffusion, data=data, batch_size=4, microbatch=-1, lr=1e-3,
                ema_rate="0.9999", log_interval=1, save_interval=100, resume_checkpoint="",
                schedule_sampler=create_named_schedule_sampler("uniform", diffusion), weight_decay=0.0,
                lr_anneal_steps=steps)  # fmt: skip
    args.update(kw)
    return TrainLoop(**args)


def csv_rows(path):
    with open(path) as f:
        lines = f.read().splitlines()
    return [dict(zip(lines[0].split(","), line.split(","))) for line in lines[1:]]


def test_create_model_and_diffusion_records_its_arguments():
    cfg = tiny_config()
    model, _ = create_model_and_diffusion(**cfg)
    assert model.iddpm_config == cfg
    assert model.iddpm_config is not cfg  # a copy


def test_trainloop_logs_through_the_logger_and_jsonl(tmp_path, capsys):
    run = str(tmp_path / "run")
    logger.configure(dir=run, format_strs=["stdout", "log", "csv", "json"])
    loop = reference_loop(2)
    assert not loop.progress  # the key table on stdout replaces the progress bar
    loop.run_loop()
    out = capsys.readouterr().out
    assert out.count("| loss ") == 2 and "| grad_norm" in out and "| step " in out
    records = read_jsonl(os.path.join(run, "progress.jsonl"))
    rows = csv_rows(os.path.join(run, "progress.csv"))
    assert [int(r["step"]) for r in rows] == [r["step"] for r in records] == [1, 2]
    for row, record in zip(rows, records):
        assert set(record) <= set(row)
        for k, v in record.items():
            assert float(row[k]) == pytest.approx(v, rel=1e-12), k
    assert any(k.startswith("vb_q") for k in rows[0]) and "samples" in rows[0]
    log = open(os.path.join(run, "log.txt")).read()
    assert log.count("| loss ") == 2
    assert len(read_jsonl(os.path.join(run, "progress.json"))) == 2
    # the config create_model_and_diffusion recorded is in every checkpoint
    for name in ("model000002.safetensors", "ema_0.9999_000002.safetensors"):
        assert ckpt.load_weights(os.path.join(run, name))[1] == tiny_config()
    assert json.loads(ckpt.load_train_state(os.path.join(run, "opt000002.pt"))["config"]) == tiny_config()


def test_without_a_configured_logger_only_jsonl(tmp_path, capsys):
    loop = reference_loop(1, out_dir=str(tmp_path / "run"), progress=False)
    loop.run_loop()
    assert "| loss" not in capsys.readouterr().out
    assert sorted(n for n in os.listdir(tmp_path / "run") if n.startswith(("progress", "log"))) == [
        "progress.jsonl"
    ]


def test_first_logging_call_configures_the_default_logger(tmp_path, monkeypatch, capsys):
    """As the reference's logger: before any configure(), the first call configures the default
    logger ($OPENAI_LOGDIR, else a new openai-<time> folder in the temp dir; stdout, log.txt and
    progress.csv), and reset() returns to it."""
    monkeypatch.delenv("OPENAI_LOG_FORMAT", raising=False)
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "env"))
    assert not logger.is_configured()
    logger.logkv("loss", 0.5)
    assert logger.is_configured() and logger.get_dir() == str(tmp_path / "env")
    logger.dumpkvs()
    assert csv_rows(tmp_path / "env" / "progress.csv") == [{"loss": "0.5"}]
    out = capsys.readouterr().out
    assert f"Logging to {tmp_path / 'env'}" in out and "| loss" in out
    default = logger.get_current()
    logger.configure(dir=str(tmp_path / "other"), format_strs=["log"])
    logger.reset()
    assert logger.get_current() is default
    assert "Reset logger" in open(tmp_path / "env" / "log.txt").read()

    forget_logger()  # a fresh process without $OPENAI_LOGDIR
    monkeypatch.delenv("OPENAI_LOGDIR")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    made = logger.get_dir()
    assert os.path.dirname(made) == str(tmp_path / "tmp") and os.path.basename(made).startswith("openai-")
    assert sorted(os.listdir(made)) == ["log.txt", "progress.csv"]


def test_reference_style_run_without_a_configured_logger(tmp_path, monkeypatch, capsys):
    """The reference's TrainLoop without logger.configure() saves into the default logger's
    folder ($OPENAI_LOGDIR here) and logs its key values there; so does ours."""
    monkeypatch.delenv("OPENAI_LOG_FORMAT", raising=False)
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "env"))
    loop = reference_loop(1)
    assert loop.out_dir == str(tmp_path / "env") and logger.is_configured()
    loop.run_loop()
    assert ckpt.read_latest(str(tmp_path / "env"))["step"] == 1
    assert [int(r["step"]) for r in csv_rows(tmp_path / "env" / "progress.csv")] == [1]
    assert capsys.readouterr().out.count("| loss ") == 1


def test_the_last_partial_interval_is_logged(tmp_path):
    """A run that ends between two log intervals records its last steps too (means over the
    steps since the previous record), so a run shorter than log_interval has its progress.jsonl,
    progress.csv row and loss.png."""
    data = write_npz(str(tmp_path / "d.npz"), n=16)
    out = tmp_path / "run"
    args = ["train", "--data_dir", data, "--batch_size", "4", "--max_steps", "5", "--log_interval", "3"]
    assert main([*args, "--out_dir", str(out), "--progress", "False", *tiny_flags()]) == 0
    records = read_jsonl(str(out / "progress.jsonl"))
    assert [r["step"] for r in records] == [3, 5] and records[1]["loss"] > 0
    assert [int(r["step"]) for r in csv_rows(out / "progress.csv")] == [3, 5]
    assert os.path.getsize(out / "loss.png") > 0
    short = tmp_path / "short"
    assert (
        main([*args, "--max_steps", "2", "--out_dir", str(short), "--progress", "False", *tiny_flags()]) == 0
    )
    assert [r["step"] for r in read_jsonl(str(short / "progress.jsonl"))] == [2]
    assert os.path.exists(short / "loss.png")


def test_reference_style_run_started_again_resumes(tmp_path, capsys):
    run = str(tmp_path / "run")
    logger.configure(dir=run, format_strs=["log", "csv"])
    reference_loop(1).run_loop()
    logger.configure(dir=run, format_strs=["log", "csv"])  # the script started again
    again = reference_loop(2)
    assert again.step == 1
    again.run_loop()
    logger.configure(dir=run, format_strs=["log", "csv"])
    done = reference_loop(2)
    done.run_loop()
    assert done.step == 2
    assert [r["step"] for r in read_jsonl(os.path.join(run, "progress.jsonl"))] == [1, 2]
    assert [int(r["step"]) for r in csv_rows(os.path.join(run, "progress.csv"))] == [1, 2]
    log = open(os.path.join(run, "log.txt")).read()
    assert "holds a training run saved at step 1: resuming it" in log
    assert "nothing to train: the run is at step 2" in log
    assert ckpt.read_latest(run)["step"] == 2
    # the library's own way (an explicit out_dir) still refuses a folder holding a run
    with pytest.raises(CheckpointError, match="already holds a training run"):
        reference_loop(2, out_dir=run)


def test_logger_tensorboard_format(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # tensorboard not installed
    with pytest.raises(MissingDependencyError, match="tensorboard: .*pip install tensorboard"):
        logger.configure(dir=str(tmp_path / "x"), format_strs=["log", "tensorboard"])
    assert not os.path.exists(tmp_path / "x")  # checked before anything was made

    written = fake_tensorboard(monkeypatch)
    with logger.scoped_configure(dir=str(tmp_path / "tb"), format_strs=["tensorboard"]):
        logger.logkv("step", 7)
        logger.logkv("loss", 0.5)
        logger.logkv("note", "text")
        logger.dumpkvs()
        logger.logkv("loss", 0.25)  # no step: the dump count
        logger.dumpkvs()
    assert written == [("dir", str(tmp_path / "tb" / "tb")), ("loss", 0.5, 7), ("loss", 0.25, 1), "closed"]


def test_scoped_configure_restores_the_logger_when_configure_fails(tmp_path):
    outer = logger.configure(dir=str(tmp_path / "a"), format_strs=["log"])
    with pytest.raises(ValueError, match="format_strs"):
        with logger.scoped_configure(dir=str(tmp_path / "b"), format_strs=["nope"]):
            pass
    assert logger.get_current() is outer


def test_iddpm_train_log_files_and_openai_logdir(tmp_path, monkeypatch, capsys):
    data = write_npz(str(tmp_path / "d.npz"), n=16)
    env_dir = tmp_path / "from_env"
    monkeypatch.setenv("OPENAI_LOGDIR", str(env_dir))
    base = ["train", "--data_dir", data, "--batch_size", "4", "--max_steps", "2", "--log_interval", "1"]
    assert main([*base, "--progress", "False", *tiny_flags()]) == 0  # no --out_dir: $OPENAI_LOGDIR
    assert ckpt.read_latest(str(env_dir))["step"] == 2
    rows = csv_rows(env_dir / "progress.csv")
    assert [int(r["step"]) for r in rows] == [1, 2] and float(rows[0]["loss"]) > 0
    assert open(env_dir / "log.txt").read().count("| loss ") == 2
    assert capsys.readouterr().out.count("| loss ") == 2  # --progress False: the tables on stdout
    assert not logger.is_configured()  # the command's logger is gone afterwards
    explicit = tmp_path / "explicit"
    assert main([*base, "--max_steps", "1", "--out_dir", str(explicit), *tiny_flags()]) == 0  # --out_dir wins
    assert ckpt.read_latest(str(explicit))["step"] == 1 and ckpt.read_latest(str(env_dir))["step"] == 2
    assert "| loss" not in capsys.readouterr().out  # with a progress bar: tables only in log.txt
    assert open(explicit / "log.txt").read().count("| loss ") == 1


def test_iddpm_train_tensorboard_without_the_package_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    data = write_npz(str(tmp_path / "d.npz"), n=16)
    out = tmp_path / "run"
    args = ["train", "--data_dir", data, "--max_steps", "1", "--out_dir", str(out), "--tensorboard", "True"]
    assert main(args + tiny_flags()) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("iddpm: error: tensorboard:") and "pip install tensorboard" in err
    assert len(err.splitlines()) == 1 and not out.exists()
