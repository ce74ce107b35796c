"""``iddpm bench conv``: one row per impl × dtype × case with its error against float64, the
per-forward sums weighted by the model's conv counts, a one-line error for a bad --dtype, and
nothing timed off the CPU."""

import json

import pytest
import torch

from helpers.training import argv
from iddpm_ext import bench
from iddpm_ext.bench import conv as bench_conv
from iddpm_ext.ops import winograd

PACKED = winograd.packed_available()  # the packed bf16 row: AVX512-BF16 CPUs, packable shapes


def _impls(dtype, shape):
    packable = winograd.packed_refusal(getattr(torch, dtype), shape[1], shape[2]) is None
    impls = [i for i in bench_conv.IMPLS if packable or i != "iddpm (winograd, packed)"]
    return [i for i in impls if dtype == "float32" or i != F4]  # F(4×4, 3×3): float32 only


F4 = "iddpm (winograd F4)"
WGRAD_IMPLS = ("torch conv", "iddpm (winograd)", F4)


pytestmark = pytest.mark.kernels


def test_rows_errors_and_per_forward_sums(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench_conv, "CASES", [(2, 32, 64, 8, 8, 3), (1, 16, 16, 5, 7, 0)])
    out = tmp_path / "c.json"
    words = argv("conv --device cpu --threads 1 --warmup 0 --iters 1 --json {json}", json=str(out))
    assert bench.main(words) == 0
    recs = json.loads(out.read_text())["records"]
    per_case = [r for r in recs if r["op"] == "conv3x3"]
    assert [(r["dtype"], r["impl"], r["shape"]) for r in per_case] == [
        (d, impl, shape)
        for d in ("float32", "bfloat16")
        for shape in ([2, 32, 64, 8, 8], [1, 16, 16, 5, 7])
        for impl in _impls(d, shape)
    ]
    for r in per_case:
        assert r["ms"] > 0 and r["tflops"] >= 0 and r["per_forward"] in (3, 0)
        assert r["err"] <= (1e-5 if r["dtype"] == "float32" else 2e-2), r
        assert (r["vs_packed"] is None) == (r["impl"] == "torch conv")
    sums = [r for r in recs if r["op"] == "conv3x3 per forward"]
    assert [(r["dtype"], r["impl"]) for r in sums] == [
        (d, impl) for d in ("float32", "bfloat16") for impl in _impls(d, [2, 32, 64, 8, 8])
    ]
    for s in sums:  # 3 × the first case's time (the second is not in the model)
        # (2×8×8 has 8 tiles of 4×4: the tile rule keeps it on F(2×2), so the F4 row sums that time)
        impl = "iddpm (winograd)" if s["impl"] == F4 else s["impl"]
        first = next(
            r for r in per_case if (r["dtype"], r["impl"], r["per_forward"]) == (s["dtype"], impl, 3)
        )
        assert s["ms"] == pytest.approx(3 * first["ms"], rel=1e-3)
        assert s["shape"] == "cifar10"
    assert "iddpm bench conv" in capsys.readouterr().out


def test_weight_gradient_pass(tmp_path, capsys, monkeypatch):
    """--passes wgrad: torch's and the Winograd weight gradient per case (float32 only: a line for
    bf16), their errors against float64, and the per-backward sums."""
    monkeypatch.setattr(bench_conv, "CASES", [(2, 32, 64, 8, 8, 3), (1, 16, 16, 5, 7, 0)])
    out = tmp_path / "w.json"
    words = argv("conv --device cpu --passes wgrad --warmup 0 --iters 1 --json {json}", json=str(out))
    assert bench.main(words) == 0
    recs = json.loads(out.read_text())["records"]
    assert [(r["op"], r["impl"], r["shape"]) for r in recs] == [
        ("conv3x3 weight grad", impl, shape)
        for shape in ([2, 32, 64, 8, 8], [1, 16, 16, 5, 7])
        for impl in WGRAD_IMPLS
    ] + [("conv3x3 weight grad per backward", impl, "cifar10") for impl in WGRAD_IMPLS]
    assert all(r["dtype"] == "float32" and r["ms"] > 0 for r in recs)
    assert all(r["err"] <= 1e-5 for r in recs[:6])
    for s in recs[6:]:  # (the F4 row: F(2×2)'s time, as training's tile rule keeps 2×8×8 there)
        impl = "iddpm (winograd)" if s["impl"] == F4 else s["impl"]
        first = next(r for r in recs[:6] if r["impl"] == impl and r["per_forward"] == 3)
        assert s["ms"] == pytest.approx(3 * first["ms"], rel=1e-3)
    assert "the wgrad pass is float32 only; no wgrad rows in torch.bfloat16" in capsys.readouterr().out
    assert bench.main(["conv", "--device", "cpu", "--passes", "bwd"]) == 2


def test_train_pass(tmp_path, capsys, monkeypatch):
    """--passes train: one training call (forward + backward) by torch's convs and by Winograd, per
    case, channels-last then NCHW, each with whether "auto" takes it (as iddpm_ext.nn decides), the
    weight gradient's error against float64, and per-step sums per layout."""
    from iddpm_ext import nn as inn

    monkeypatch.setattr(bench_conv, "CASES", [(4, 32, 64, 8, 8, 2), (1, 16, 16, 5, 7, 0)])
    out = tmp_path / "t.json"
    words = argv("conv --device cpu --passes train --warmup 0 --iters 1 --json {json}", json=str(out))
    assert bench.main(words) == 0
    recs = json.loads(out.read_text())["records"]
    impls = WGRAD_IMPLS
    expected = []
    for layout in ("channels_last", "nchw"):
        shapes = ([4, 32, 64, 8, 8], [1, 16, 16, 5, 7])
        expected += [("conv3x3 train", impl, shape, layout) for shape in shapes for impl in impls]
        expected += [("conv3x3 train per step", impl, "cifar10", layout) for impl in impls]
    assert [(r["op"], r["impl"], r["shape"], r["layout"]) for r in recs] == expected
    per_case = [r for r in recs if r["op"] == "conv3x3 train"]
    assert all(r["dtype"] == "float32" and r["ms"] > 0 and r["err"] <= 1e-5 for r in per_case)
    # "auto": the first case channels-last only (NCHW needs 128 channels in and out), never the second
    assert [r["auto"] for r in per_case] == [True] * 3 + [False] * 9
    conv = inn.conv_nd(2, 32, 64, 3, padding=1)
    x_cl = torch.randn(4, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    with inn.conv_winograd_train("auto"):
        assert inn.winograd_train_takes(conv, x_cl)
        assert not inn.winograd_train_takes(conv, torch.randn(4, 32, 8, 8))
    with inn.conv_winograd_train("off"):
        assert not inn.winograd_train_takes(conv, x_cl)
    assert "the train pass is float32 only; no train rows in torch.bfloat16" in capsys.readouterr().out


def test_without_onednn_bf16_no_packed_row(monkeypatch):
    monkeypatch.setattr(bench_conv, "CASES", [(1, 16, 16, 4, 4, 2)])
    monkeypatch.setattr(bench_conv, "_packed_available", lambda dtype: dtype != torch.bfloat16)
    args = bench.build_parser().parse_args(["conv", "--device", "cpu", "--warmup", "0", "--iters", "1"])
    recs = bench_conv.run(args)
    bf16 = [(r["op"], r["impl"], r["vs_packed"]) for r in recs if r["dtype"] == "bfloat16"]
    assert bf16 == [
        ("conv3x3", "torch conv", None),
        ("conv3x3", "iddpm (winograd)", None),
        ("conv3x3 per forward", "torch conv", None),
        ("conv3x3 per forward", "iddpm (winograd)", None),
    ] + ([("conv3x3 per forward", "iddpm (winograd, packed)", None)] if PACKED else [])
    assert sum(r["impl"] == "packed (oneDNN)" for r in recs) == 2  # the fp32 rows keep it


@pytest.mark.skipif(not PACKED, reason="this CPU has no AVX512-BF16: no packed rows")
def test_packed_sum_takes_the_plain_time_where_it_does_not_pack(monkeypatch):
    monkeypatch.setattr(bench_conv, "CASES", [(1, 16, 32, 4, 4, 2), (1, 16, 24, 4, 4, 3)])
    args = bench.build_parser().parse_args(
        ["conv", "--device", "cpu", "--dtype", "bfloat16", "--warmup", "0", "--iters", "1"]
    )
    recs = bench_conv.run(args)
    ms = {(r["impl"], tuple(r["shape"])): r["ms"] for r in recs if r["op"] == "conv3x3"}
    assert ("iddpm (winograd, packed)", (1, 16, 24, 4, 4)) not in ms  # Cout 24: not packable
    total = next(r["ms"] for r in recs if r["impl"] == "iddpm (winograd, packed)" and r["op"] != "conv3x3")
    expected = (
        2 * ms["iddpm (winograd, packed)", (1, 16, 32, 4, 4)] + 3 * ms["iddpm (winograd)", (1, 16, 24, 4, 4)]
    )
    assert total == pytest.approx(expected, rel=1e-3)


def test_bad_dtype_is_one_line_error(capsys):
    assert bench.main(["conv", "--device", "cpu", "--dtype", "float16"]) == 2
    err = capsys.readouterr().err
    assert "--dtype: expected names from ['float32', 'bfloat16'], got 'float16'" in err
    assert len(err.strip().splitlines()) == 1


def test_other_devices_time_nothing(capsys):
    args = bench.build_parser().parse_args(["conv", "--device", "cuda"])
    assert bench_conv.run(args) == []
    assert "CPU op; nothing to time on cuda" in capsys.readouterr().out
