"""``iddpm fid`` through the command line, with a randomly initialised Inception-v3 of the
right architecture: the numbers equal the library's, reference statistics are cached, and
every bad input is one clear line (exit status 2), never a traceback."""

import json
import re

import numpy as np
import pytest
import torch

from helpers.training import argv
from iddpm_ext.cli import app as cli
from iddpm_ext.evaluation import evaluate

pytestmark = pytest.mark.xdist_group("inception")  # with test_fid.py's users of random_inception


@pytest.fixture(scope="module")
def weights(random_inception):  # tests/conftest.py: a random network saved as a weights file
    return random_inception


@pytest.fixture(scope="module")
def npzs(tmp_path_factory):
    d = tmp_path_factory.mktemp("npz")
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)  # 4: precision/recall need > k = 3
    samples = np.clip(ref.astype(np.int16) + rng.integers(-20, 21, size=ref.shape), 0, 255).astype(np.uint8)
    np.savez(d / "ref.npz", arr_0=ref)
    np.savez(d / "samples.npz", arr_0=samples[..., :1])  # grayscale samples are accepted
    np.savez(d / "float.npz", arr_0=ref.astype(np.float32))
    (d / "junk.npz").write_bytes(b"not a zip file")
    return {k: str(d / f"{k}.npz") for k in ("ref", "samples", "float", "junk")}


def _run(args, capsys):
    rc = cli.main(args)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out, err


@pytest.mark.slow
def test_fid_command_prints_and_writes_the_library_numbers(tmp_path, weights, npzs, capsys):
    cache, js = tmp_path / "cache", tmp_path / "fid.json"
    args = argv(
        (
            "fid {ref} {samples} --inception {inception} --batch_size 4 --cache_dir "
            "{cache_dir} --device cpu --json {json}"
        ),
        ref=npzs["ref"],
        samples=npzs["samples"],
        inception=weights,
        cache_dir=str(cache),
        json=str(js),
    )
    rc, out, err = _run(args, capsys)
    assert rc == 0
    assert "FID" in out and "Inception Score" in out and "precision" in out and "recall" in out
    assert "computed and cached" in out
    for desc in ("inception (reference)", "inception (samples)"):  # progress bars over the images, on stderr
        assert re.search(re.escape(desc) + r": 100%\|[^|]*\| 4/4 \[", err), desc
    got = json.loads(js.read_text())
    assert len(list(cache.iterdir())) == 1
    # The library with the same cache: reads the reference statistics the command wrote,
    # and gives the same numbers. (Each Inception pass costs seconds on a CPU: few images.)
    want = evaluate(npzs["ref"], npzs["samples"], weights, batch_size=4, cache_dir=str(cache), device="cpu")
    assert want["reference_cached"]
    for key in ("fid", "inception_score", "inception_score_std", "precision", "recall"):
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
    assert got["num_reference"] == got["num_samples"] == 4 and got["fid"] > 0
    rc, out, err = _run(args + ["--progress", "False"], capsys)  # the reference from the cache: one pass
    assert rc == 0 and "read from the cache" in out and "%|" not in err


def test_fid_command_bad_weights_are_clear_errors(tmp_path, npzs, capsys):
    base = argv("fid {ref} {samples} --no_cache --inception", ref=npzs["ref"], samples=npzs["samples"])
    rc, _, err = _run(base + [str(tmp_path / "missing.pth")], capsys)
    assert rc == 2 and "iddpm: error: inception: no such file" in err and "nothing is downloaded" in err
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")  # a state dict of another network
    rc, _, err = _run(base + [str(tmp_path / "other.pth")], capsys)
    assert rc == 2 and "is not an Inception-v3 FID weights file" in err and "missing" in err
    (tmp_path / "junk.pth").write_bytes(b"garbage")
    rc, _, err = _run(base + [str(tmp_path / "junk.pth")], capsys)
    assert rc == 2 and "not a readable weights file" in err
    with pytest.raises(SystemExit) as e:  # --inception is required: argparse's usage error
        cli.main(["fid", npzs["ref"], npzs["samples"]])
    assert e.value.code == 2 and "--inception" in capsys.readouterr().err


def test_fid_command_bad_inputs_are_clear_errors(tmp_path, weights, npzs, capsys):
    tail = argv("--inception {inception} --no_cache", inception=weights)
    rc, _, err = _run(["fid", str(tmp_path / "nope.npz"), npzs["samples"], *tail], capsys)
    assert rc == 2 and "ref: no such file" in err
    rc, _, err = _run(["fid", npzs["ref"], str(tmp_path / "nope.npz"), *tail], capsys)
    assert rc == 2 and "samples: no such file" in err
    rc, _, err = _run(["fid", npzs["ref"], npzs["float"], *tail], capsys)
    assert rc == 2 and "expected arr_0 as uint8" in err
    rc, _, err = _run(["fid", npzs["junk"], npzs["samples"], *tail], capsys)
    assert rc == 2 and "not a readable .npz" in err
    rc, _, err = _run(["fid", npzs["ref"], npzs["samples"], *tail, "--batch_size", "0"], capsys)
    assert rc == 2 and "batch_size: expected a positive int" in err
    if not torch.cuda.is_available():
        rc, _, err = _run(["fid", npzs["ref"], npzs["samples"], *tail, "--device", "cuda"], capsys)
        assert rc == 2 and "no CUDA device" in err
