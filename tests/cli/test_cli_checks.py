"""Early one-line errors of ``iddpm train | sample | nll``: an unusable --out_dir is found
before any work, --device names what is accepted, --eta outside [0, 1], counts below 1,
and a data-loader worker's error is one line as without workers."""

import os

import pytest
import torch

from helpers.training import blob_images, main, train
from iddpm_ext.cli import commands


@pytest.fixture
def no_work(monkeypatch):
    """Every kind of work fails the test: building a model, reading a checkpoint, the data."""

    def fail(*a, **k):
        raise AssertionError("work started before --out_dir was checked")

    monkeypatch.setattr(commands, "build", fail)
    monkeypatch.setattr(commands, "resolve_model", fail)
    monkeypatch.setattr(commands.ckpt, "resolve_resume", fail)
    monkeypatch.setattr("iddpm_ext.training.data.open_source", fail)
    monkeypatch.setattr(commands.dist_util, "setup_dist", fail)


def _bad_out_dirs(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    return {
        str(blocker / "out"): "a file is in the way",  # under a regular file
        str(blocker): "a file is in the way",  # a regular file itself
        "/proc/iddpm-test/out": "cannot write to '/proc/iddpm-test/out'",  # cannot be created
    }


@pytest.mark.parametrize(
    "command",
    [
        "sample --model_path {m} --num_samples 64 --out_dir {o}",
        "nll --model_path {m} --data_dir digits --out_dir {o}",
        "train --data_dir digits --resume_checkpoint {m} --out_dir {o}",
    ],
)
def test_an_unusable_out_dir_fails_before_any_work(tmp_path, capsys, no_work, command):
    for out, why in _bad_out_dirs(tmp_path).items():
        assert main(command, m=str(tmp_path / "model.safetensors"), o=out) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"iddpm: error: out_dir: cannot write to {out!r}"), err
        assert why in err[0]


def test_the_out_dir_probe_leaves_nothing(tmp_path):
    from iddpm_ext.io import check_writable_dir

    out = tmp_path / "a" / "b"
    assert check_writable_dir(str(out)) == str(out) and not os.path.exists(tmp_path / "a")
    out.mkdir(parents=True)
    assert check_writable_dir(str(out)) == str(out) and os.listdir(out) == []


def test_the_out_dir_probe_survives_a_concurrent_check_removing_the_new_folder(tmp_path, monkeypatch):
    """Two runs started together into one new folder: the other's check made it and removed it
    again (empty) between our makedirs and our probe; ours makes it again (CI saw the loser of
    test_two_runs_into_one_folder_then_sigterm fail with 'cannot write' instead of 'in use')."""
    import shutil
    import tempfile

    from iddpm_ext import io as iio

    out = tmp_path / "shared"
    real, calls = tempfile.mkstemp, []

    def mkstemp(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # the concurrent check's rmdir lands here
            shutil.rmtree(out)
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    assert iio.check_writable_dir(str(out)) == str(out) and len(calls) == 2
    assert not out.exists()  # and it still leaves nothing behind

    def gone():
        raise FileNotFoundError(2, "No such file or directory")

    with pytest.raises(FileNotFoundError):  # a folder that keeps vanishing: the error, not a loop
        iio.makedirs_and(str(out), gone)


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "meta", "cuda:99", "cpu:0:1", "cuda"])
def test_bad_devices_are_one_line_naming_the_flag(tmp_path, capsys, device):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    m = str(tmp_path / "model.safetensors")
    commands_ = [
        "sample --model_path {m} --out_dir {o} --device {d}",
        "nll --model_path {m} --data_dir digits --out_dir {o} --device {d}",
        "train --data_dir digits --out_dir {o} --device {d}",
    ]
    for command in commands_:
        assert main(command, m=m, o=str(tmp_path / "out"), d=device) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("iddpm: error: --device: expected "), err
        assert repr(device) in err[0]


@pytest.mark.parametrize("eta", ["1.5", "-0.1", "nan"])
def test_sample_refuses_eta_outside_zero_one_before_any_work(tmp_path, capsys, no_work, eta):
    assert (
        main(
            "sample --model_path {m} --use_ddim True --eta {e} --out_dir {o}",
            m=str(tmp_path / "m.safetensors"),
            e=eta,
            o=str(tmp_path / "s"),
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("iddpm: error: eta: expected a number in [0, 1]"), err
    assert not os.path.exists(tmp_path / "s")


@pytest.mark.parametrize("flags", ["--num_samples 0", "--num_samples -3", "--batch_size 0"])
def test_nll_refuses_counts_below_one(tmp_path, capsys, no_work, flags):
    assert (
        main(
            "nll --model_path {m} --data_dir digits --out_dir {o} " + flags,
            m=str(tmp_path / "m.safetensors"),
            o=str(tmp_path / "n"),
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "num_samples, batch_size: expected positive ints" in err[0], err


def test_a_corrupt_image_with_loader_workers_is_one_line(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    images, _ = blob_images(16, 8, 1)
    for i, img in enumerate(images):
        Image.fromarray(img[..., 0]).save(folder / f"img_{i:02d}.png")
    blob = (folder / "img_05.png").read_bytes()
    (folder / "img_05.png").write_bytes(blob[: len(blob) // 2])  # truncated
    errors = {}
    for workers in (0, 2):
        out = tmp_path / f"run{workers}"
        rc = train(
            "--data_dir {d} --batch_size 16 --max_steps 2 --out_dir {o} --progress False --num_workers {w}",
            d=str(folder),
            o=str(out),
            w=workers,
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, err
        errors[workers] = err[0]
    assert errors[0] == errors[2] and "img_05.png: cannot read this image" in errors[0]
