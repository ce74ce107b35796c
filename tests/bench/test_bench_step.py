"""``iddpm bench step``: the per-call rows (a public p_sample / ddim_sample call with a constant
model, against the reference's call), host µs and ops per call on every row, each case printed
as soon as it is measured, and the reference taken from a checkout named by IDDPM_REF_PATH."""

import json
import sys

import pytest

from helpers.training import argv
from iddpm_ext import bench

pytestmark = pytest.mark.kernels


def _run(tmp_path, capsys, extra=""):
    out = tmp_path / "s.json"
    template = (
        "step --device cpu --threads 1 --warmup 1 --iters 2 --no-compile --sizes 1x3x8x8 --json {json} "
    )
    template += extra
    words = argv(template, json=str(out))
    assert bench.main(words) == 0
    text = capsys.readouterr().out
    return json.loads(out.read_text())["records"], text


def test_call_and_step_rows_carry_host_time_and_ops_per_call(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("IDDPM_REF_PATH", raising=False)
    recs, text = _run(tmp_path, capsys)
    calls = {r["impl"]: r for r in recs if r["op"] == "p_sample call"}
    assert set(calls) == {"GaussianDiffusion.p_sample", "reference-style p_sample"}
    # ours: the noise draw (randn_like, as the reference) and the fused op; nothing else
    assert calls["GaussianDiffusion.p_sample"]["ops_per_call"] == 2
    assert calls["reference-style p_sample"]["ops_per_call"] > 10
    fused = next(r for r in recs if r["impl"] == "fused (explicit noise)")
    assert fused["ops_per_call"] == 1
    assert all(r["host_us"] > 0 for r in recs)
    # every case was printed as a line before the final table
    table_at = text.index("iddpm bench step —")
    for r in recs:
        assert text.index(f"{r['op']} | {r['impl']} |") < table_at


def test_reference_comes_from_the_checkout_named_by_the_environment(tmp_path, capsys, monkeypatch):
    # A stand-in checkout: an improved_diffusion package whose gaussian_diffusion is this
    # library's (the harness only needs the reference's API).
    pkg = tmp_path / "ref" / "improved_diffusion"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "gaussian_diffusion.py").write_text("from iddpm_ext.gaussian_diffusion import *  # noqa\n")
    monkeypatch.setenv("IDDPM_REF_PATH", str(tmp_path / "ref"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        recs, _ = _run(tmp_path, capsys, "--rule ddim")
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] == "improved_diffusion"]:
            del sys.modules[name]
    calls = {r["impl"]: r for r in recs if r["op"] == "ddim_sample call"}
    assert set(calls) == {"GaussianDiffusion.ddim_sample", "improved-diffusion ddim_sample"}
    assert calls["improved-diffusion ddim_sample"]["speedup"] == 1


def test_a_wrong_reference_path_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("IDDPM_REF_PATH", str(tmp_path))
    assert bench.main(argv("step --device cpu --sizes 1x3x8x8 --no-compile")) == 2
    err = capsys.readouterr().err
    assert "IDDPM_REF_PATH: expected a checkout of openai/improved-diffusion" in err
