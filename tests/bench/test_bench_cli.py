"""``iddpm bench`` argument handling: the attention benchmark's --passes (``both`` = fwd and
fwd+bwd), shapes given on the command line, bad values as one error line (exit 2), and the CPU
features in the JSON environment."""

import json

import pytest

from helpers.training import argv
from iddpm_ext import bench, ops


def test_attention_passes_both_gives_forward_and_backward_rows(tmp_path, capsys):
    out = tmp_path / "a.json"
    args = argv(
        (
            "attention --device cpu --threads 1 --warmup 1 --iters 2 --cases "
            "1x2x32x16 --passes both --json {json}"
        ),
        json=str(out),
    )
    assert bench.main(args) == 0
    capsys.readouterr()
    recs = json.loads(out.read_text())["records"]
    ops_seen = {r["op"] for r in recs}
    assert ops_seen == {"qkv_attention fwd", "qkv_attention fwd+bwd"}
    assert all(r["shape"] == [1, 2, 32, 16] for r in recs)
    impls = {r["impl"] for r in recs}
    assert "einsum (reference)" in impls
    if ops.has_kernel("cpu"):
        assert "iddpm (fused)" in impls


def test_attention_fp32_rows_under_each_tf32_setting(tmp_path, capsys):
    # float32 runs with torch's TF32 switch off, float32+tf32 with it on (each row says which);
    # the switch is restored afterwards.
    import torch

    out = tmp_path / "a.json"
    args = argv(
        (
            "attention --device cpu --threads 1 --warmup 0 --iters 1 --cases 1x1x8x8 --passes fwd "
            "--dtype float32,float32+tf32 --json {json}"
        ),
        json=str(out),
    )
    before = torch.backends.cuda.matmul.allow_tf32
    assert bench.main(args) == 0
    capsys.readouterr()
    assert torch.backends.cuda.matmul.allow_tf32 == before
    recs = json.loads(out.read_text())["records"]
    seen = {(r["dtype"], r["tf32"]) for r in recs if r["impl"] == "einsum (reference)"}
    assert seen == {("float32", False), ("float32+tf32", True)}


def test_step_sizes_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "s.json"
    args = argv(
        ("step --device cpu --threads 1 --warmup 1 --iters 2 --no-compile --sizes 2x3x8x8 --json {json}"),
        json=str(out),
    )
    assert bench.main(args) == 0
    capsys.readouterr()
    recs = json.loads(out.read_text())["records"]
    assert recs and all(r["shape"][:4] == [2, 3, 8, 8] for r in recs)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            argv("attention --device cpu --passes forward"),
            "--passes: expected fwd, fwd+bwd or both, got 'forward'",
        ),
        (argv("attention --device cpu --cases 1x4x64"), "--cases: expected 4 positive ints"),
        (argv("attention --device cpu --cases 1x4x0x64"), "got '1x4x0x64'"),
        (argv("attention --device cpu --dtype float8"), "--dtype: expected names from"),
        (argv("step --device cpu --sizes 64x3xAx32"), "--sizes: expected 4 positive ints"),
    ],
)
def test_bad_values_are_one_error_line(args, message, capsys):
    assert bench.main(args) == 2
    out, err = capsys.readouterr()
    assert message in err and "Traceback" not in out + err
    assert err.startswith("iddpm bench: error:")


def test_json_environment_names_the_cpu_features(tmp_path):
    """Each JSON says which vector ISA torch runs and whether the CPU has AVX-512-BF16 and AMX:
    the same VM has been hosts with and without them, and the CPU kernels' speeds depend on it."""
    import torch

    out = tmp_path / "g.json"
    assert bench.main(argv("gather --device cpu --quick --json {json}", json=str(out))) == 0
    feats = json.loads(out.read_text())["environment"]["cpu_features"]
    assert feats["capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(feats) == {"capability", "avx512_bf16", "amx"}
    assert all(feats[k] in (True, False, None) for k in ("avx512_bf16", "amx"))
