"""``iddpm bench train`` on the CPU: every case runs (each TrainLoop releases its run folder
for the next), with the channels-last rows next to the NCHW ones, and with ``--compile MODE``
the compiled rows (ours, and the reference model eager and compiled when IDDPM_REF_PATH is set)."""

import json

import pytest
import torch

from helpers.training import argv
from iddpm_ext import bench


def _fake_reference_checkout(root):
    """A folder shaped like a checkout of openai/improved-diffusion whose UNetModel is ours (same
    constructor and state-dict keys): the wiring of the reference rows, without the reference."""
    pkg = root / "improved_diffusion"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "unet.py").write_text("from iddpm_ext.unet import UNetModel  # noqa: F401\n")
    return root


@pytest.mark.slow
def test_cases_channels_last_and_compiled_rows(tmp_path, monkeypatch):
    """(torch.compile is stood in for by a wrapper that records its arguments: inductor takes
    minutes here; TrainLoop(compile=...) itself is tested in tests/training.)"""
    import sys

    calls = []

    def fake_compile(module, **kwargs):
        calls.append((type(module).__module__, kwargs))
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setenv("IDDPM_REF_PATH", str(_fake_reference_checkout(tmp_path / "ref")))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "improved_diffusion", raising=False)
    monkeypatch.delitem(sys.modules, "improved_diffusion.unet", raising=False)
    out = tmp_path / "t.json"
    args = argv(
        "train --device cpu --threads 1 --quick --warmup 0 --iters 1 --compile max-autotune --json {json}",
        json=str(out),
    )
    assert bench.main(args) == 0
    recs = json.loads(out.read_text())["records"]
    assert len(recs) == 16
    cl = [r for r in recs if r["channels_last"]]
    assert [(r["impl"], r["dtype"], r["use_checkpoint"]) for r in cl] == [
        ("auto channels-last", "float32", False),
        ("auto channels-last", "bfloat16", False),
    ]
    assert all(r["ms"] > 0 and r["images_per_s"] > 0 for r in recs)
    assert recs[0]["impl"] == "einsum" and recs[0]["speedup"] == 1
    # the compiled section, last: per dtype the reference eager, compiled, then ours compiled
    tail = [(r["impl"], r["dtype"]) for r in recs[10:]]
    assert tail == [
        (name, dtype)
        for dtype in ("float32", "bfloat16")
        for name in ("reference", "reference compile(max-autotune)", "auto compile(max-autotune)")
    ]
    assert [r["reference"] for r in recs[10:]] == [True, True, False] * 2
    assert all(not r["reference"] and r["compile"] == "none" for r in recs[:10])
    # the reference's and ours, fp32 and bf16 (the fake reference class is ours, hence one module)
    assert calls == [("iddpm_ext.unet", {"mode": "max-autotune", "dynamic": False})] * 4
    for r in recs:
        ours_compiled = r["impl"] == "auto compile(max-autotune)"
        assert ("speedup_vs_compiled_reference" in r) == ours_compiled, r["impl"]
    assert all(r["speedup_vs_compiled_reference"] > 0 for r in recs if "speedup_vs_compiled_reference" in r)
