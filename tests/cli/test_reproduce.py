"""``iddpm reproduce`` end to end at the tiny scale, its numbers against ``iddpm nll`` and
``iddpm sample`` on its run folders, the digits classifier and its Fréchet distance, and
the checks of the paper's expected directions."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from helpers.training import main
from iddpm_ext.cli import reproduce
from iddpm_ext.evaluation import repro_report
from iddpm_ext.evaluation.digits_classifier import (
    FeatureFD,
    classifier_features,
    load_classifier,
    save_classifier,
    train_classifier,
)
from iddpm_ext.training.data import open_source

# One pytest-xdist worker runs this module (make test: --dist loadgroup), so its two module
# fixtures (a tiny reproduction, the digits classifier) are computed once, not once per worker.
pytestmark = pytest.mark.xdist_group("reproduce")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("repro") / "out")
    rc = main("reproduce --scale tiny --out {out} --jobs 1 --threads 1", out=out)
    assert rc == 0
    with open(os.path.join(out, "results.json")) as f:
        return out, json.load(f)


def test_tiny_reproduction_writes_every_number_and_figure(tiny_run):
    out, res = tiny_run
    s = res["settings"]
    assert res["scale"] == "tiny" and s["runs"] == ["simple_cosine", "hybrid_cosine"]
    assert s["sample_steps"] == [20, 10, 5]  # 0 = the full T
    for name in s["runs"]:
        r = res["runs"][name]
        assert r["train"]["steps"] == s["train_steps"] and np.isfinite(r["train"]["final_loss"])
        assert r["nll"]["images"] == s["nll_images"] and 0 < r["nll"]["bpd"] < 20 and r["nll"]["stderr"] > 0
        for k in s["sample_steps"]:
            e = r["samples"]["by_steps"][str(k)]
            assert (
                e["fd"] >= 0
                and np.isfinite(e["fd_bootstrap_std"])
                and sum(e["class_counts"]) == s["num_samples"]
            )
            with np.load(os.path.join(out, name, f"samples_{k}steps.npz")) as z:
                assert z["arr_0"].shape == (s["num_samples"], 8, 8, 1) and z["arr_0"].dtype == np.uint8
        assert r["commands"]["nll"].startswith("iddpm nll --model_path")
    assert res["runs"]["simple_cosine"]["spec"]["learn_sigma"] is False
    assert res["runs"]["hybrid_cosine"]["spec"]["learn_sigma"] is True
    c = res["classifier"]
    assert 0 <= c["test_accuracy"] <= 1 and c["real_floor_fd"] >= 0 and c["test_images"] == 297
    t = res["timing"]
    assert t["wall_seconds"] > 0 and t["jobs"] == 1 and t["threads"] == 1
    claims = [ch["claim"] for ch in res["checks"]]
    assert "hybrid NLL below simple NLL (cosine)" in claims
    assert "learned sigma loses less quality than fixed sigma at 5 steps (cosine)" not in claims  # only 50/25
    for name in ("quality_vs_steps.png", "nll.png", "samples.png"):
        with Image.open(os.path.join(out, name)) as im:
            assert im.width > 200 and im.height > 50
    table = open(os.path.join(out, "table.md")).read()
    assert "`simple_cosine`" in table and "`hybrid_cosine`" in table and "Not Inception FID" in table


def test_run_folders_are_iddpm_nll_and_sample_inputs(tiny_run, tmp_path, capsys):
    """The reproduction's NLL and samples are what ``iddpm nll`` / ``iddpm sample`` give."""
    out, res = tiny_run
    s, run = res["settings"], "hybrid_cosine"
    model, n = os.path.join(out, run), s["nll_images"]
    nll = (
        "nll --model_path {model} --data_dir digits --split test --num_samples {n} --batch_size {n} --seed 0"
    )
    rc = main(nll + " --out_dir {out} --progress False", model=model, n=n, out=str(tmp_path / "nll"))
    assert rc == 0
    bpd = np.load(tmp_path / "nll" / "bpd.npz")["total_bpd"]
    assert float(bpd.mean()) == pytest.approx(res["runs"][run]["nll"]["bpd"], rel=1e-6)
    sample = "sample --model_path {model} --num_samples {n} --batch_size 5 --timestep_respacing 10 --seed 0"
    rc = main(
        sample + " --out_dir {out} --progress False", model=model, n=s["num_samples"], out=str(tmp_path / "s")
    )
    assert rc == 0
    with (
        np.load(tmp_path / "s" / f"samples_{s['num_samples']}x8x8x1.npz") as a,
        np.load(os.path.join(out, run, "samples_10steps.npz")) as b,
    ):
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    capsys.readouterr()


@pytest.mark.slow
def test_reuse_and_two_jobs_give_the_same_numbers(tiny_run, tmp_path, capsys):
    out, res = tiny_run
    again = reproduce.run(out_dir=out, scale="tiny", jobs=1, threads=1, reuse=True, log=lambda *a: None)
    for name in res["settings"]["runs"]:
        assert again["runs"][name]["nll"]["bpd"] == res["runs"][name]["nll"]["bpd"]
        assert again["runs"][name]["train"]["seconds"] == res["runs"][name]["train"]["seconds"]  # reused
    # Two jobs on one run (the other run's numbers do not depend on it): after its training,
    # its NLL and its sampling run in two worker processes at once, with the same numbers.
    name = "hybrid_cosine"
    par = reproduce.run(
        out_dir=str(tmp_path / "p"), scale="tiny", jobs=2, threads=1, runs=[name], log=lambda *a: None
    )
    assert list(par["runs"]) == [name]
    assert par["runs"][name]["nll"]["bpd"] == pytest.approx(res["runs"][name]["nll"]["bpd"], rel=1e-5)
    for k, e in res["runs"][name]["samples"]["by_steps"].items():
        assert par["runs"][name]["samples"]["by_steps"][k]["fd"] == pytest.approx(e["fd"], rel=1e-4, abs=1e-6)
    capsys.readouterr()


def test_settings_and_cli_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="runs: expected names from"):
        reproduce.scale_settings("tiny", runs=["nope"])
    with pytest.raises(ValueError, match=r"sample_steps: expected counts in \[1, T=20\]"):
        reproduce.scale_settings("tiny", sample_steps=[0, 50])
    with pytest.raises(ValueError, match="scale: expected one of"):
        reproduce.scale_settings("huge")
    s = reproduce.scale_settings("default")
    assert s["sample_steps"] == [1000, 100, 50, 25] and s["nll_images"] == 297 and len(s["runs"]) == 5
    rc = main("reproduce --scale tiny --runs simple_cosine,bogus --out {out}", out=str(tmp_path))
    err = capsys.readouterr().err
    assert rc == 2 and "iddpm: error: runs: expected names from" in err and "Traceback" not in err
    rc = main("reproduce --scale tiny --sample_steps 10,x --out {out}", out=str(tmp_path))
    assert rc == 2 and "sample_steps: expected comma-separated ints" in capsys.readouterr().err
    (tmp_path / "simple_cosine").mkdir()  # a folder that is not ours is never deleted
    (tmp_path / "simple_cosine" / "notes.txt").write_text("keep me")
    rc = main("reproduce --scale tiny --runs simple_cosine --jobs 1 --out {out}", out=str(tmp_path))
    assert rc == 2 and "is not a reproduction run folder" in capsys.readouterr().err
    assert (tmp_path / "simple_cosine" / "notes.txt").read_text() == "keep me"


# -------------------------------------------------------------------------------------
# the classifier and its Fréchet distance
# -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_classifier():
    train = open_source("digits", image_size=8, image_channels=1, split="train")
    test = open_source("digits", image_size=8, image_channels=1, split="test")
    model, info = train_classifier(train.images, train.labels, test.images, test.labels, epochs=40, seed=0)
    return model, info, test


def test_classifier_is_accurate_and_saves(digits_classifier, tmp_path):
    model, info, test = digits_classifier
    assert info["test_accuracy"] > 0.95, info
    save_classifier(str(tmp_path / "c.pt"), model, info)
    again = load_classifier(str(tmp_path / "c.pt"))
    np.testing.assert_array_equal(
        classifier_features(again, test.images), classifier_features(model, test.images)
    )


def test_feature_fd_is_zero_for_identical_sets_and_grows_with_distortion(digits_classifier):
    model, _, test = digits_classifier
    fd = FeatureFD(model, test.images)
    assert fd(test.images) == pytest.approx(0.0, abs=1e-6)
    assert fd(test.images[::-1].copy()) == pytest.approx(0.0, abs=1e-6)  # order does not matter
    rng = np.random.default_rng(0)
    noise = rng.normal(size=test.images.shape)
    values = [fd(np.clip(test.images + s * noise, 0, 255).astype(np.uint8)) for s in (8, 32, 96)]
    assert 0 < values[0] < values[1] < values[2], values
    blank = np.zeros_like(test.images)
    assert fd(blank) > values[2]
    only_ones = test.images[test.labels == 1]
    assert fd(only_ones) > 10 * fd(np.clip(test.images + 8 * noise, 0, 255).astype(np.uint8))
    with pytest.raises(ValueError, match="the classifier takes 8x8 images"):
        fd(np.zeros((4, 16, 16, 1), np.uint8))
    with pytest.raises(ValueError, match="expected uint8"):
        fd(np.zeros((4, 8, 8, 1), np.float32))


# -------------------------------------------------------------------------------------
# the expected directions
# -------------------------------------------------------------------------------------


def _fake_results(tmp_path, nll, fd):
    runs = {}
    for name in nll:
        os.makedirs(tmp_path / name, exist_ok=True)
        np.savez(
            tmp_path / name / "bpd.npz",
            total_bpd=np.full(10, nll[name]) + np.linspace(-0.1, 0.1, 10),
            prior_bpd=np.zeros(10),
        )
        runs[name] = {
            "nll": {"bpd": nll[name], "stderr": 0.01},
            "samples": {
                "by_steps": {str(k): {"fd": v, "fd_bootstrap_std": 0.5} for k, v in fd[name].items()}
            },
        }
    return {"runs": runs, "settings": {"diffusion_steps": 1000, "sample_steps": [1000, 100, 50, 25]}}


def test_expected_directions_follow_the_numbers(tmp_path):
    nll = {"simple_cosine": 2.0, "hybrid_cosine": 1.5, "hybrid_linear": 1.7, "vlb_cosine": 1.6}
    fd = {
        "simple_cosine": {1000: 5, 100: 8, 50: 20, 25: 40},
        "hybrid_cosine": {1000: 6, 100: 6, 50: 7, 25: 9},
        "hybrid_linear": {1000: 5, 100: 9, 50: 12, 25: 15},
        "vlb_cosine": {1000: 30, 100: 30, 50: 31, 25: 33},
    }
    checks = {
        c["claim"]: c
        for c in repro_report.expected_directions(_fake_results(tmp_path, nll, fd), str(tmp_path))
    }
    assert checks["hybrid NLL below simple NLL (cosine)"]["holds"] is True
    diff = checks["hybrid NLL below simple NLL (cosine)"]["difference"]
    assert diff[0] == pytest.approx(-0.5) and diff[1] == pytest.approx(0.0, abs=1e-12)  # paired: same images
    assert checks["learned sigma loses less quality than fixed sigma at 50 steps (cosine)"]["holds"] is True
    assert checks["learned sigma loses less quality than fixed sigma at 25 steps (cosine)"]["holds"] is True
    assert checks["cosine NLL not worse than linear (hybrid)"]["holds"] is True
    assert checks["cosine sample quality not worse than linear (hybrid)"]["holds"] is True
    assert checks["vlb NLL below hybrid NLL (cosine)"]["holds"] is False
    assert checks["vlb samples worse than hybrid samples (1000 steps, cosine)"]["holds"] is True
    assert not any("linear)" in c and "simple" in c for c in checks)  # simple_linear was not run
    # the other way round
    nll2 = {"simple_cosine": 1.5, "hybrid_cosine": 2.0}
    fd2 = {
        "simple_cosine": {1000: 5, 100: 6, 50: 6, 25: 7},
        "hybrid_cosine": {1000: 5, 100: 9, 50: 20, 25: 40},
    }
    checks2 = {
        c["claim"]: c["holds"]
        for c in repro_report.expected_directions(
            _fake_results(tmp_path / "b", nll2, fd2), str(tmp_path / "b")
        )
    }
    assert checks2["hybrid NLL below simple NLL (cosine)"] is False
    assert checks2["learned sigma loses less quality than fixed sigma at 25 steps (cosine)"] is False
