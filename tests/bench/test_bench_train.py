"""``iddpm bench train`` on the CPU: every case runs (each TrainLoop releases its run folder
for the next), with the channels-last rows next to the NCHW ones, the reference model eager when
IDDPM_REF_PATH is set, and with ``--compile MODE`` the compiled rows (ours, and the reference
model compiled); ``--breakdown``'s kinds; the digits configuration."""

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
    # The fake package must not outlive the test (a real checkout may be imported later in this
    # process): sys.modules' improved_diffusion entries are put back as they were.
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] == "improved_diffusion"}
    for k in saved:
        monkeypatch.delitem(sys.modules, k)
    try:
        _run_and_check(tmp_path, calls)
    finally:
        for k in [k for k in sys.modules if k.split(".")[0] == "improved_diffusion"]:
            del sys.modules[k]  # then monkeypatch puts the saved ones back


def _run_and_check(tmp_path, calls):
    out = tmp_path / "t.json"
    args = argv(
        "train --device cpu --threads 1 --quick --warmup 0 --iters 1 --compile max-autotune --json {json}",
        json=str(out),
    )
    assert bench.main(args) == 0
    recs = json.loads(out.read_text())["records"]
    assert len(recs) == 23
    assert all(r["shape"] == [8, 3, 16, 16] for r in recs)
    cl = [r for r in recs if r["channels_last"]]
    assert [(r["impl"], r["dtype"], r["use_checkpoint"]) for r in cl] == [
        ("auto channels-last", "float32", False),
        ("auto channels-last winograd", "float32", False),
        ("auto channels-last winograd torch-dW", "float32", False),
        ("auto channels-last", "bfloat16", False),
        ("auto channels-last winograd", "bfloat16", False),
    ]
    # the Winograd training convs (CPU rows), NCHW and channels-last, fp32 and bf16
    # (weight gradients by Winograd where "auto" takes them, once by torch: fp32 channels-last)
    # (fp32 by the default rule, bf16 every call)
    wino = [
        (r["impl"], r["dtype"], r["conv_winograd_train"], r["conv_winograd_weight_grad"])
        for r in recs
        if r["conv_winograd_train"] != "off"
    ]
    assert wino == [
        ("auto winograd", "float32", "auto", "auto"),
        ("auto channels-last winograd", "float32", "auto", "auto"),
        ("auto channels-last winograd torch-dW", "float32", "auto", "off"),
        ("auto winograd F(2x2)", "float32", "auto", "auto"),
        ("auto winograd", "bfloat16", "on", "auto"),
        ("auto channels-last winograd", "bfloat16", "on", "auto"),
    ]
    assert all(r["conv_winograd_weight_grad"] is None for r in recs if r["conv_winograd_train"] == "off")
    assert all(r["ms"] > 0 and r["images_per_s"] > 0 for r in recs)
    # one network's forward + backward FLOPs per step in every row, and TFLOP/s from them
    assert len({r["gflop_per_step"] for r in recs}) == 1 and recs[0]["gflop_per_step"] > 1e-3
    for r in recs:
        assert r["tflops"] == pytest.approx(r["gflop_per_step"] / r["ms"], abs=1e-3), r
    assert recs[0]["impl"] == "einsum" and recs[0]["speedup"] == 1
    # the reference eager (fp32, bf16), then the compiled section: per dtype the reference
    # compiled, then ours compiled
    # the reference's per-tensor AdamW once (the last eager case of ours)
    assert [(r["impl"], r["dtype"]) for r in recs if not r["fused_optimizer"]] == [
        ("auto per-tensor-adamw", "float32")
    ]
    assert recs[16]["impl"] == "auto per-tensor-adamw"
    assert [r["conv_winograd_tile"] for r in recs].count("2") == 1 and recs[6]["conv_winograd_tile"] == "2"
    tail = [(r["impl"], r["dtype"]) for r in recs[17:]]
    assert tail == [("reference", "float32"), ("reference", "bfloat16")] + [
        (name, dtype)
        for dtype in ("float32", "bfloat16")
        for name in ("reference compile(max-autotune)", "auto compile(max-autotune)")
    ]
    assert [r["reference"] for r in recs[17:]] == [True, True] + [True, False] * 2
    assert all(not r["reference"] and r["compile"] == "none" for r in recs[:17])
    # ours eager without checkpointing against the reference eager of the same precision
    ref_ms = {r["dtype"]: r["ms"] for r in recs[17:19]}
    for r in recs:
        eager_ours = not r["reference"] and not r["use_checkpoint"] and r["compile"] == "none"
        assert ("speedup_vs_reference" in r) == eager_ours, r["impl"]
        if eager_ours:
            assert r["speedup_vs_reference"] == pytest.approx(ref_ms[r["dtype"]] / r["ms"], abs=1e-3)
    # the reference's and ours, fp32 and bf16 (the fake reference class is ours, hence one module)
    assert calls == [("iddpm_ext.unet", {"mode": "max-autotune", "dynamic": False})] * 4
    for r in recs:
        ours_compiled = r["impl"] == "auto compile(max-autotune)"
        assert ("speedup_vs_compiled_reference" in r) == ours_compiled, r["impl"]
    assert all(r["speedup_vs_compiled_reference"] > 0 for r in recs if "speedup_vs_compiled_reference" in r)


def test_imagenet64_config_is_bench_unets_model():
    """bench train's imagenet64 configuration builds the model bench unet/sample time (the paper's
    ImageNet-64 UNet): same state-dict keys and shapes."""
    from iddpm_ext.bench import train as bench_train
    from iddpm_ext.bench.unet import build_model
    from iddpm_ext.script_util import create_model_and_diffusion, model_and_diffusion_defaults

    cfg = model_and_diffusion_defaults()
    cfg.update(bench_train.CONFIGS["imagenet64"])
    with torch.device("meta"):  # shapes only: no 120M-parameter initialisation
        ours, _ = create_model_and_diffusion(**cfg)
        theirs, size = build_model("imagenet64", device="meta")
    assert size == cfg["image_size"] == 64
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)


def test_digits_config_and_breakdown(tmp_path, monkeypatch):
    """--config digits is --preset digits' model (1 channel, batch 64 by default; --batch 4 here);
    --breakdown gives every case its time per kind, which together are about the steps' time
    (profiled over one more step: a loose bound, the profiler's own cost and the VM's noise)."""
    from iddpm_ext.bench import train as bench_train
    from iddpm_ext.cli.presets import PRESETS

    monkeypatch.delenv("IDDPM_REF_PATH", raising=False)
    model_flags = {k: v for k, v in PRESETS["digits"]["common"].items() if k != "data_dir"}
    assert bench_train.CONFIGS["digits"] == model_flags
    assert bench_train.BATCH["digits"] == PRESETS["digits"]["train"]["batch_size"] == 64
    out = tmp_path / "t.json"
    args = argv(
        "train --device cpu --threads 1 --config digits --batch 4 --warmup 1 --iters 1 --breakdown "
        "--json {json}",
        json=str(out),
    )
    assert bench.main(args) == 0
    recs = json.loads(out.read_text())["records"]
    assert len(recs) == 17 and not any(r["reference"] for r in recs)
    assert all(r["op"].startswith("train step digits") and r["shape"] == [4, 1, 16, 16] for r in recs)
    assert 1.0e6 < recs[0]["params"] < 1.2e6  # "1.08 M parameters"
    for r in recs:
        parts = r["breakdown_ms"]
        assert list(parts) == list(bench_train.TRAIN_KINDS)
        assert parts["conv"] > 0 and parts["optimizer"] > 0 and parts["norm"] > 0, r["impl"]
        assert "speedup_vs_reference" not in r
    # the kinds add up to about the steps' time, over all cases (one case's profiled step can stall)
    profiled = sum(sum(r["breakdown_ms"].values()) for r in recs)
    timed = sum(r["ms"] for r in recs)
    assert 0.2 * timed < profiled < 3 * timed, (profiled, timed)


def test_step_kind_optimizer_scopes():
    """Ops inside AdamW's step or the loop's gradient-norm / EMA scopes count as "optimizer";
    others keep their layer kind."""
    from iddpm_ext.bench.train import _step_kind

    class Ev:
        def __init__(self, name, parent=None):
            self.name, self.cpu_parent = name, parent

    step = Ev("Optimizer.step#AdamW.step")
    assert _step_kind(Ev("aten::add_", Ev("aten::_foreach_add_", step))) == "optimizer"
    assert _step_kind(Ev("aten::lerp_", Ev("iddpm.ema"))) == "optimizer"
    assert _step_kind(Ev("aten::linalg_vector_norm", Ev("iddpm.grad_norm"))) == "optimizer"
    assert _step_kind(Ev("aten::convolution_backward", Ev("autograd::engine"))) == "conv"
    assert _step_kind(Ev("aten::add_", Ev("aten::dropout"))) == "elementwise"
    assert _step_kind(Ev("aten::addmm")) == "other"
