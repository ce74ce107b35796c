"""Progress bars: on stderr with the time left when --progress is on (the default), none with
--progress False, ticking per denoising step in `iddpm sample` (inside each batch), per
timestep of a batch in `iddpm nll`, per task of `iddpm reproduce`, per stage in `iddpm demo`.
(`iddpm fid`'s bars: tests/evaluation/test_fid_cli.py.)"""

import re

import pytest

from helpers.training import main, train, write_npz
from iddpm_ext.cli import reproduce


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("progress")
    data = write_npz(str(d / "d.npz"), n=8)
    out = str(d / "run")
    rc = train(
        "--data_dir {data} --out_dir {run} --batch_size 4 --max_steps 1 --progress False", data=data, run=out
    )
    assert rc == 0
    return {"data": data, "run": out}


def _bars(err: str, desc: str) -> list:
    """The last state of each redraw of the bar ``desc``: (n, total) pairs."""
    return [
        (int(a), int(b)) for a, b in re.findall(rf"{re.escape(desc)}:\s+\d+%\|[^|]*\| (\d+)/(\d+) \[", err)
    ]


@pytest.mark.parametrize("on", [True, False])
def test_sample_ticks_per_denoising_step(run, tmp_path, capsys, on):
    # 3 samples in batches of 2 with 4 steps: 2 batches × 4 steps = 8 ticks
    rc = main(
        "sample --model_path {run} --num_samples 3 --batch_size 2 --timestep_respacing 4 --out_dir {out} "
        "--progress {on}",
        run=run["run"],
        out=str(tmp_path),
        on=on,
    )
    assert rc == 0
    captured = capsys.readouterr()
    bars = _bars(captured.err, "sample")
    if on:
        assert bars[-1] == (8, 8) and "batch 2/2" in captured.err
        assert re.search(r"step/s|s/step", captured.err)  # the rate
        assert "<00:00" in captured.err  # the time left
    else:
        assert bars == [] and "%|" not in captured.err
    assert "%|" not in captured.out  # never on stdout


@pytest.mark.kernels
def test_sample_ticks_per_step_with_the_engine(run, tmp_path, capsys):
    # the engine's per-step callback ticks the bar (and keeps the trajectory's frames)
    rc = main(
        "sample --model_path {run} --num_samples 3 --batch_size 2 --timestep_respacing 4 --out_dir {out} "
        "--engine eager --trajectory 2",
        run=run["run"],
        out=str(tmp_path),
    )
    assert rc == 0 and _bars(capsys.readouterr().err, "sample")[-1] == (8, 8)
    assert (tmp_path / "trajectory.png").is_file()


@pytest.mark.parametrize("on", [True, False])
def test_nll_ticks_per_timestep(run, tmp_path, capsys, on):
    # 3 images in batches of 2, T = 10: 2 batches × 10 timesteps
    rc = main(
        "nll --model_path {run} --data_dir {data} --num_samples 3 --batch_size 2 --out_dir {out} "
        "--progress {on}",
        run=run["run"],
        data=run["data"],
        out=str(tmp_path),
        on=on,
    )
    assert rc == 0
    err = capsys.readouterr().err
    if on:
        assert _bars(err, "nll")[-1] == (20, 20) and re.search(r"timestep/s|s/timestep", err)
    else:
        assert "%|" not in err


@pytest.mark.parametrize("on", [True, False])
def test_reproduce_bar_over_the_tasks(tmp_path, capsys, monkeypatch, on):
    """The bar's share per finished task (the tasks themselves replaced by stand-ins)."""
    done = []

    def fake_task(kind, name, settings, out_dir, device, threads):
        done.append((kind, name))
        return kind, name, {"seconds": 0.0}

    monkeypatch.setattr(reproduce, "_task_entry", fake_task)
    settings = reproduce.scale_settings("tiny")
    runs = reproduce._schedule(settings, str(tmp_path), "cpu", 1, 1, False, lambda *a: None, progress=on)
    assert len(done) == 3 * len(settings["runs"]) and set(runs) == set(settings["runs"])
    err = capsys.readouterr().err
    if on:
        assert "reproduce: 100%|" in err and "hybrid_cosine samples done" in err
    else:
        assert err == ""


@pytest.mark.slow
@pytest.mark.parametrize("on", [True, False])
def test_demo_bars(tmp_path, capsys, on):
    pytest.importorskip("sklearn")
    rc = main(
        "demo --out {out} --num_samples 2 --sample_steps 2 --nll_images 1 --progress {on}",
        out=str(tmp_path),
        on=on,
    )
    assert rc == 0
    captured = capsys.readouterr()
    if on:
        assert (2, 2) in _bars(captured.err, "sample")  # the grid: 1 batch × 2 steps
        assert _bars(captured.err, "nll estimate")[-1] == (50, 50)  # 10 exact terms + 40 strata
    else:
        assert "%|" not in captured.err
    assert "held-out digits" in captured.out
