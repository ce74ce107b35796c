"""``iddpm bench unet``'s forward section: the variants, their fields (ms, images/s, TFLOP/s,
speedup over the baseline, error against the fp32 baseline, per-layer-kind breakdown), the
baseline's name without IDDPM_REF_PATH, and bad values as one error line."""

import json

import pytest

from helpers.training import argv
from iddpm_ext import bench
from iddpm_ext.bench import unet as bench_unet
from iddpm_ext.ops.winograd import packed_available


@pytest.mark.slow
def test_forward_section_records(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("IDDPM_REF_PATH", raising=False)
    out = tmp_path / "u.json"
    args = argv(
        (
            "unet --device cpu --threads 1 --config tiny --batch-sizes 1 --forward-only --breakdown "
            "--warmup 1 --iters 1 --json {json}"
        ),
        json=str(out),
    )
    assert bench.main(args) == 0
    printed = capsys.readouterr().out
    recs = json.loads(out.read_text())["records"]
    packed = packed_available()  # then a bf16 row with the Winograd convs on the plain weight
    assert [r["dtype"] for r in recs] == ["float32"] * 7 + ["bfloat16"] * (10 if packed else 9)
    assert recs[0]["impl"].startswith("baseline (ours, all fast paths off")
    assert recs[7]["impl"].endswith("+ bf16 autocast")
    assert [r["impl"] for r in recs if "prepack" in r["impl"]] == [
        "ours to_inference(channels-last, prepack)",
        "ours to_inference(channels-last, prepack), winograd off",
        "ours to_inference(channels-last, prepack), winograd F(2x2)",
        "ours to_inference(channels-last, prepack), op graph",
        "ours to_inference(channels-last, prepack) + bf16 autocast",
        "ours to_inference(channels-last, prepack) + bf16 autocast, op graph",
        "ours to_inference(bf16, channels-last, prepack)",
        "ours to_inference(bf16, channels-last, prepack), op graph",
        "ours to_inference(bf16, channels-last, prepack), winograd off",
    ] + (["ours to_inference(bf16, channels-last, prepack), winograd unpacked"] if packed else [])
    by_impl = {(r["impl"], r["dtype"]): r for r in recs}
    for (impl, dtype), r in by_impl.items():  # a replayed forward gives the eager forward's bits
        if impl.endswith(", op graph"):
            assert r["rel_err"] == by_impl[(impl[: -len(", op graph")], dtype)]["rel_err"]
    assert recs[0]["speedup"] == 1 and recs[7]["speedup"] == 1
    assert recs[0]["speedup_cpu"] == 1 and all(r["cpu_ms"] > 0 for r in recs)
    for r in recs:
        assert r["op"] == "unet tiny fwd" and r["shape"] == [1, 3, 16, 16]
        assert r["ms"] > 0 and r["tflops"] > 0 and r["images_per_s"] > 0
        assert set(r["breakdown_ms"]) == set(bench_unet.KINDS) and r["breakdown_ms"]["conv"] > 0
    # fp32 fast paths within 1e-5 of the fp32 baseline; bf16 ones a bf16-sized error, not garbage
    assert recs[0]["rel_err"] == 0 and all(r["rel_err"] <= 1e-5 for r in recs[:6])
    assert all(0 < r["rel_err"] < 0.1 for r in recs[6:])
    assert "fwd B=1" in printed and "conv " in printed
    assert "  unet tiny fwd | ours to_inference" in printed  # each row printed as it is made


@pytest.mark.slow
def test_forward_rows_survive_graph_pool_outputs_and_are_written_as_made(tmp_path, monkeypatch):
    """Every variant's forward returns one shared static buffer (as CUDA-graph replays of
    torch.compile's "max-autotune" return graph-pool memory that the next run overwrites): the
    errors are still each variant's own (its first output is copied), and the JSON file is
    rewritten after every forward row (a run cut short keeps them)."""
    import torch

    from iddpm_ext.bench import common

    monkeypatch.delenv("IDDPM_REF_PATH", raising=False)
    real_call, pool = bench_unet._forward_call, {}

    def pooled_call(variant, x, t, device):
        fwd = real_call(variant, x, t, device)

        def call():
            out = fwd().float()
            buf = pool.setdefault("out", torch.empty_like(out))
            return buf.copy_(out)

        return call

    monkeypatch.setattr(bench_unet, "_forward_call", pooled_call)
    written = []
    real_write = common.write_json
    monkeypatch.setattr(
        common, "write_json", lambda path, recs: (written.append(len(recs)), real_write(path, recs))
    )
    out = tmp_path / "u.json"
    args = argv(
        "unet --device cpu --threads 1 --config tiny --batch-sizes 1 --forward-only --warmup 1 --iters 1 "
        "--json {json}",
        json=str(out),
    )
    assert bench.main(args) == 0
    recs = json.loads(out.read_text())["records"]
    assert recs[0]["rel_err"] == 0 and all(0 < r["rel_err"] < 0.1 for r in recs if r["dtype"] == "bfloat16")
    assert written[: len(recs)] == list(range(1, len(recs) + 1))


@pytest.mark.slow
def test_compiled_reference_rows(tmp_path, monkeypatch):
    """--compile-reference MODE: the baseline under torch.compile(mode=MODE) after each dtype's
    baseline, and our rows' speedup over it. (torch.compile is stood in for by a wrapper that
    records its arguments: compiling the UNet takes minutes here.)"""
    import torch

    monkeypatch.delenv("IDDPM_REF_PATH", raising=False)
    calls = []

    def fake_compile(module, **kwargs):
        calls.append(kwargs)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    out = tmp_path / "u.json"
    args = argv(
        (
            "unet --device cpu --threads 1 --config tiny --batch-sizes 1 --forward-only "
            "--warmup 1 --iters 1 --compile-reference max-autotune --json {json}"
        ),
        json=str(out),
    )
    assert bench.main(args) == 0
    recs = json.loads(out.read_text())["records"]
    assert calls == [{"mode": "max-autotune"}]
    impls = [r["impl"] for r in recs]
    base = impls[0]
    assert impls[1] == f"{base} torch.compile(max-autotune)"
    assert f"{base} torch.compile(max-autotune) + bf16 autocast" in impls
    for r in recs:
        ours = r["impl"].startswith("ours")
        assert ("speedup_vs_compiled" in r) == ours, r["impl"]
        if ours:
            assert r["speedup_vs_compiled"] > 0
    assert recs[1]["rel_err"] == 0  # the stand-in compiles nothing: the baseline's own output


@pytest.mark.parametrize(
    "name, kind",
    [
        ("aten::mkldnn_convolution", "conv"),
        ("mkldnn::_convolution_pointwise", "conv"),
        ("aten::cudnn_convolution", "conv"),
        ("aten::native_group_norm", "norm"),
        ("aten::silu", "elementwise"),
        ("aten::add", "elementwise"),
        ("aten::cat", "elementwise"),
        ("iddpm::qkv_attention", "attention"),
        ("aten::bmm", "attention"),
        ("aten::_softmax", "attention"),
        ("aten::addmm", "other"),
        ("aten::upsample_nearest2d", "elementwise"),
        ("aten::empty", "other"),
    ],
)
def test_layer_kind(name, kind):
    assert bench_unet.layer_kind(name) == kind


@pytest.mark.kernels
def test_breakdown_counts_nested_ops_for_their_outermost_kind():
    """The GEMMs (aten::bmm) inside the Winograd conv are conv time, those of einsum attention
    attention time; a linear layer's addmm stays "other"."""
    import torch

    x = torch.randn(2, 64, 16, 16).contiguous(memory_format=torch.channels_last)
    u = torch.ops.iddpm.winograd_weight(torch.randn(64, 64, 3, 3))
    q, k = torch.randn(2, 32, 64), torch.randn(2, 32, 64)
    a, b = torch.randn(4, 8), torch.randn(8, 8)

    def conv():
        for _ in range(3):
            torch.ops.iddpm.conv3x3_winograd(x, u)

    def attention():
        torch.einsum("bct,bcs->bts", q, k).softmax(-1)

    def linear():
        torch.nn.functional.linear(a, b)

    cpu = torch.device("cpu")
    got = {name: bench_unet.breakdown_ms(fn, cpu) for name, fn in
           [("conv", conv), ("attention", attention), ("other", linear)]}  # fmt: skip
    for name, totals in got.items():
        assert totals[name] > 0 and all(v == 0 for k, v in totals.items() if k != name), (name, totals)


@pytest.mark.parametrize(
    "args, env, message",
    [
        (argv("unet --device cpu --batch-sizes 1,0"), None, "--batch-sizes: expected positive ints"),
        (argv("unet --device cpu --batch-sizes 2,x"), None, "got 'x'"),
        (argv("unet --device cpu --config tiny --forward-only"), "/nonexistent", "IDDPM_REF_PATH: expected"),
    ],
)
def test_bad_values_are_one_error_line(args, env, message, capsys, monkeypatch):
    if env:
        monkeypatch.setenv("IDDPM_REF_PATH", env)
    assert bench.main(args) == 2
    _, err = capsys.readouterr()
    assert message in err and len(err.strip().splitlines()) == 1
