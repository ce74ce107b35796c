"""The fused QKV attention op on CUDA (run by scripts/gpu_check.sh on a GPU machine).

Every check compares against an exact float64 computation on the same (rounded) inputs and
applies the low-precision rule of the project: the fused op's error must be at most twice the
error of the same math done eagerly (the reference's einsum path) in that precision, with a
small floor for cases where the eager path is exact (e.g. T = 1).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from helpers.oracles import attention_math_f64, check_two_x_rule, max_err
from iddpm_ext.ops import attention as A

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _case(B, H, C, T, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(B, 3 * H * C, T, device="cuda", generator=gen).to(dtype)
    g = torch.randn(B, H * C, T, device="cuda", generator=gen).to(dtype)
    return qkv, g


def _floor(ref):
    return 1e-5 * (1.0 + ref.abs().max().item())


def _check_fwd_bwd(B, H, C, T, dtype, seed=0):
    qkv, g = _case(B, H, C, T, dtype, seed)
    x = qkv.clone().requires_grad_()
    out = A.qkv_attention_fused(x, H)
    assert out.dtype == dtype and out.shape == (B, H * C, T)
    (grad,) = torch.autograd.grad(out, x, g)
    xe = qkv.clone().requires_grad_()
    eager = A.qkv_attention_reference(xe, H)
    (grad_eager,) = torch.autograd.grad(eager, xe, g)
    xr = qkv.double().requires_grad_()
    ref = attention_math_f64(xr, H)
    (grad_ref,) = torch.autograd.grad(ref, xr, g.double())
    what = f"B={B} H={H} C={C} T={T} {dtype}"
    check_two_x_rule(out, eager, ref, f"{what} forward", _floor(ref))
    # Per block of grad_qkv (q, k, v), so that a wrong dk cannot hide behind a large dv.
    for name, sl in (("dq", 0), ("dk", 1), ("dv", 2)):
        view = lambda t: t.reshape(B, H, 3, C, T)[:, :, sl]  # noqa: E731
        check_two_x_rule(
            view(grad), view(grad_eager), view(grad_ref), f"{what} {name}", _floor(view(grad_ref))
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", [32, 64, 128])
@pytest.mark.parametrize("T", [1, 63, 64, 257, 1000])
def test_forward_backward_two_x_rule(dtype, C, T):
    _check_fwd_bwd(2, 3, C, T, dtype, seed=T + C)


# Head dims below a tile width (run on the kernels of Cp = 64, 128 or 256 with zero-filled
# channels) and Cp = 256 itself (key tiles of 32, two channel slices in the backward). Not yet
# picked by "auto" (AUTO_HEAD_DIMS) until these pass on a card.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", [48, 80, 96, 160, 192, 256])
@pytest.mark.parametrize("T", [63, 257])
def test_forward_backward_two_x_rule_padded_head_dims(dtype, C, T):
    _check_fwd_bwd(2, 2, C, T, dtype, seed=T + C)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_imagenet64_head_dim_96(dtype):
    # The paper's ImageNet-64 model at 16×16: 4 heads of C = 96, T = 256.
    _check_fwd_bwd(8, 4, 96, 256, dtype, seed=8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_long_sequence_4096(dtype):
    _check_fwd_bwd(1, 2, 64, 4096, dtype, seed=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cifar_shape_many_heads(dtype):
    # The CIFAR-10 model's attention at 8×8 (T = 64) with a large batch: B·H = 1024 CTAs.
    _check_fwd_bwd(256, 4, 64, 64, dtype, seed=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lse(dtype):
    B, H, C, T = 2, 2, 64, 100
    qkv, _ = _case(B, H, C, T, dtype, seed=3)
    _, lse = A.qkv_attention_with_lse(qkv, H)
    assert lse.dtype == torch.float32 and lse.shape == (B, H, T)
    q, k, _ = qkv.double().reshape(B * H, 3 * C, T).split(C, dim=1)
    expect = (torch.einsum("bct,bcs->bts", q, k) / C**0.5).logsumexp(-1).reshape(B, H, T)
    assert max_err(lse, expect) < 1e-4 * (1 + expect.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_unaligned_storage_uses_guarded_loads(dtype):
    # A contiguous qkv starting one element into its storage: 16-byte loads are not allowed
    # (T = 64 would otherwise take the cp.async path).
    B, H, C, T = 2, 2, 64, 64
    gen = torch.Generator(device="cuda").manual_seed(4)
    flat = torch.randn(B * 3 * H * C * T + 1, device="cuda", generator=gen).to(dtype)
    qkv = flat[1:].view(B, 3 * H * C, T)
    assert qkv.is_contiguous() and qkv.data_ptr() % 16 != 0
    out = A.qkv_attention_fused(qkv, H)
    aligned = A.qkv_attention_fused(qkv.clone(), H)
    assert torch.equal(out, aligned)
    x = qkv.detach().requires_grad_()
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(A.qkv_attention_fused(x, H), x, g)
    xa = qkv.clone().requires_grad_()
    (grad_a,) = torch.autograd.grad(A.qkv_attention_fused(xa, H), xa, g)
    torch.testing.assert_close(grad, grad_a, rtol=1e-3, atol=1e-3)


def test_deterministic_forward_and_dk_dv():
    B, H, C, T = 2, 2, 64, 300
    qkv, g = _case(B, H, C, T, torch.float16, seed=5)
    outs, grads = [], []
    for _ in range(2):
        x = qkv.clone().requires_grad_()
        out = A.qkv_attention_fused(x, H)
        (grad,) = torch.autograd.grad(out, x, g)
        outs.append(out)
        grads.append(grad.reshape(B, H, 3, C, T))
    assert torch.equal(outs[0], outs[1])
    # dk, dv are summed in a fixed order; dq uses fp32 atomics (order may vary).
    assert torch.equal(grads[0][:, :, 1:], grads[1][:, :, 1:])
    torch.testing.assert_close(grads[0][:, :, 0], grads[1][:, :, 0], rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("C", [64, 128, 192])
def test_tile_major_launch_order_same_results(dtype, C):
    """The tile-major grid (attention_tile_major, opt-in; fp16 / bf16) computes what the default
    grid does: the forward and dk, dv bit for bit, dq up to the order of its fp32 atomics. C = 192
    runs the backward's two channel slices along gridDim.z."""
    B, H, T = 2, 3, 1000
    qkv, g = _case(B, H, C, T, dtype, seed=C)

    def run():
        x = qkv.clone().requires_grad_()
        out = A.qkv_attention_fused(x, H)
        (grad,) = torch.autograd.grad(out, x, g)
        return out, grad.reshape(B, H, 3, C, T)

    with A.attention_sm90(False):  # the sm_80 kernels, whatever IDDPM_ATTENTION_SM90 says
        out, grad = run()
        with A.attention_tile_major():
            assert A.tile_major_enabled()
            out_t, grad_t = run()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                run()
                torch.cuda.synchronize()
    # the tile-major instances ran (the kernels' last template argument, kTileMajor = true)
    names = [e.key for e in prof.key_averages() if "attn_" in e.key]
    for kernel in ("attn_fwd_kernel", "attn_bwd_kernel"):
        assert any(kernel in k and "true>" in k for k in names), names
    assert torch.equal(out, out_t)
    assert torch.equal(grad[:, :, 1:], grad_t[:, :, 1:])
    torch.testing.assert_close(grad_t[:, :, 0], grad[:, :, 0], rtol=1e-2, atol=1e-3)


def test_cuda_graph_capture():
    B, H, C, T = 2, 2, 64, 128
    qkv, g = _case(B, H, C, T, torch.float16, seed=6)
    x = qkv.clone().requires_grad_()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture
        for _ in range(2):
            (grad,) = torch.autograd.grad(A.qkv_attention_fused(x, H), x, g)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = A.qkv_attention_fused(x, H)
        (grad_static,) = torch.autograd.grad(out_static, x, g)
    x.data.copy_(torch.randn_like(qkv))
    graph.replay()
    torch.cuda.synchronize()
    expect = A.qkv_attention_fused(x.detach(), H)
    assert torch.equal(out_static, expect)
    xe = x.detach().clone().requires_grad_()
    (grad_e,) = torch.autograd.grad(A.qkv_attention_fused(xe, H), xe, g)
    torch.testing.assert_close(grad_static, grad_e, rtol=1e-3, atol=1e-3)


HEAD_DIM_MSG = (
    "head dim C = channels / \\(3·num_heads\\) that is a multiple of 8 from 8 to 256 on CUDA, got C = "
)


def test_kernel_arch_of_this_card():
    # What the op checks before launching (Turing-built code traps): on this card the build's
    # own code, for its compute capability (the check builds for exactly this card's arch).
    from iddpm_ext.ops import loader

    major, minor = torch.cuda.get_device_capability(0)
    arch = loader._C.attention_kernel_arch(0)
    assert arch >= A.CUDA_MIN_ARCH and arch <= 10 * major + minor, arch
    assert A._cuda_device_runs(0, 2, 64)  # the head dims "auto" uses fit every card of 8.0+
    limit = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    for head_dim in (64, 128, 256):
        need = max(loader._C.attention_smem_bytes(4, head_dim, b) for b in (False, True))
        assert A._cuda_device_runs(0, 4, head_dim) == (need <= limit)
    with pytest.raises(ValueError, match=r"device_index: expected a CUDA device index in \[0, "):
        loader._C.attention_kernel_arch(torch.cuda.device_count())


def test_errors():
    # Head dims without a kernel (not a multiple of 8; over 256) raise, also through "fused".
    for C in (100, 264):
        bad, _ = _case(1, 2, C, 16, torch.float16)
        with pytest.raises(ValueError, match=HEAD_DIM_MSG + f"{C} "):
            torch.ops.iddpm.qkv_attention(bad, 2)
        assert not A.fused_supported(bad, 2)
        with A.attention_impl("auto"):
            assert torch.equal(A.qkv_attention(bad, 2), A.qkv_attention_reference(bad, 2))
        with A.attention_impl("fused"), pytest.raises(ValueError, match="head dim"):
            A.qkv_attention(bad, 2)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16 on CUDA, got Double"):
        torch.ops.iddpm.qkv_attention(torch.zeros(1, 6 * 32, 4, device="cuda", dtype=torch.float64), 2)
    qkv, g = _case(1, 2, 32, 16, torch.float16)
    out, lse = A.qkv_attention_with_lse(qkv, 2)
    with pytest.raises(ValueError, match="grad_out: expected a tensor on cuda"):
        torch.ops.iddpm.qkv_attention_backward(g.cpu(), qkv, out, lse, 2)


def test_auto_keeps_unverified_head_dims_on_einsum():
    # Head dim 96 has a kernel ("fused" runs it) but has not run on a card yet: "auto" keeps
    # it on the einsum path (AUTO_HEAD_DIMS); 64 goes to the fused op.
    qkv96, _ = _case(1, 2, 96, 16, torch.float16)
    assert A.fused_supported(qkv96, 2)
    with A.attention_impl("auto"):
        assert torch.equal(A.qkv_attention(qkv96, 2), A.qkv_attention_reference(qkv96, 2))
    with A.attention_impl("fused"):
        assert torch.equal(A.qkv_attention(qkv96, 2), A.qkv_attention_fused(qkv96, 2))
    qkv64, _ = _case(1, 2, 64, 16, torch.float16)
    with A.attention_impl("auto"):
        assert torch.equal(A.qkv_attention(qkv64, 2), A.qkv_attention_fused(qkv64, 2))


@contextlib.contextmanager
def _allow_tf32(allow: bool):
    """torch.backends.cuda.matmul.allow_tf32 = allow inside (the switch the fused fp32 kernels
    follow, as cuBLAS does), restored after."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


# fp32 on tensor cores: TF32 when torch allows it, split-TF32 (3 TF32 products, fp32-accurate)
# otherwise. Each against float64 by the 2x rule with the einsum path under the same setting
# (cuBLAS follows the same switch), and split-TF32 within fp32 accuracy of float64 besides.
@pytest.mark.parametrize("allow", [False, True], ids=["split-tf32", "tf32"])
@pytest.mark.parametrize("C", [32, 64, 96, 128, 256])
@pytest.mark.parametrize("T", [63, 64, 257])
def test_fp32_tf32_and_split_tf32(allow, C, T):
    with _allow_tf32(allow):
        _check_fwd_bwd(2, 2, C, T, torch.float32, seed=T + C)
        if not allow:
            qkv, _ = _case(2, 2, C, T, torch.float32, seed=T + C)
            ref = attention_math_f64(qkv.double(), 2)
            assert max_err(A.qkv_attention_fused(qkv, 2), ref) <= 2e-6 * (1 + ref.abs().max().item())


def test_fp32_follows_torchs_tf32_switch():
    # The switch reaches the kernel at each call: TF32 is clearly less accurate than split-TF32,
    # and torch.set_float32_matmul_precision("high") (which allows TF32) gives TF32's result.
    B, H, C, T = 2, 2, 64, 256
    qkv, _ = _case(B, H, C, T, torch.float32, seed=9)
    ref = attention_math_f64(qkv.double(), H)
    with _allow_tf32(False):
        split = A.qkv_attention_fused(qkv, H)
    with _allow_tf32(True):
        tf32 = A.qkv_attention_fused(qkv, H)
    assert max_err(split, ref) * 16 < max_err(tf32, ref)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert torch.equal(A.qkv_attention_fused(qkv, H), tf32)
        torch.set_float32_matmul_precision("highest")
        assert torch.equal(A.qkv_attention_fused(qkv, H), split)
    finally:
        torch.set_float32_matmul_precision(previous)


_NEW_API_SCRIPT = r"""
import torch
from iddpm_ext.ops import attention as A

qkv = torch.randn(2, 3 * 2 * 64, 100, device="cuda")
split = A.qkv_attention_fused(qkv, 2)
torch.backends.cuda.matmul.fp32_precision = "tf32"  # the per-backend API (torch >= 2.9)
half = A.qkv_attention_fused(qkv.half(), 2)  # fp16 and bf16 do not read it at all
tf32 = A.qkv_attention_fused(qkv, 2)
torch.backends.cuda.matmul.fp32_precision = "ieee"
again = A.qkv_attention_fused(qkv, 2)
ref = A.qkv_attention_reference(qkv.double(), 2)
err = lambda a: (a.double() - ref).abs().max().item()  # noqa: E731
assert torch.equal(again, split) and err(split) * 16 < err(tf32), (err(split), err(tf32))
assert err(half) < 1e-2, err(half)
print("ok")
"""


def test_tf32_set_through_the_per_backend_api():
    # torch.backends.cuda.matmul.fp32_precision = "tf32" (which makes torch's legacy TF32 getter
    # raise): the fp16 op runs, fp32 takes TF32, "ieee" split-TF32 again. In a child process
    # (mixing the two APIs marks torch's state for the rest of a process).
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _NEW_API_SCRIPT], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


@pytest.mark.parametrize("C, T", [(64, 40), (128, 96), (192, 40)])
def test_sanitizer_subset_tf32(C, T):
    # fp32 under TF32 for compute-sanitizer (scripts/gpu_check.sh): the kTf32 kernels round
    # their shared-memory tiles in place after each load, on both load paths (T, T + 1).
    with _allow_tf32(True):
        for t in (T, T + 1):
            _check_fwd_bwd(1, 2, C, t, torch.float32, seed=t)


def test_auto_keeps_fp32_on_einsum():
    # The TF32 / split-TF32 kernels have not run on a card yet: "auto" keeps fp32 on einsum
    # under either setting; "fused" runs them.
    qkv, _ = _case(1, 2, 64, 16, torch.float32)
    assert A.fused_supported(qkv, 2)
    for allow in (False, True):
        with _allow_tf32(allow), A.attention_impl("auto"):
            assert torch.equal(A.qkv_attention(qkv, 2), A.qkv_attention_reference(qkv, 2))
        with _allow_tf32(allow), A.attention_impl("fused"):
            assert torch.equal(A.qkv_attention(qkv, 2), A.qkv_attention_fused(qkv, 2))


def test_torch_compile_fullgraph_cuda():
    torch.manual_seed(7)
    conv_in = torch.nn.Conv1d(64, 3 * 64, 1).cuda().half()
    x = torch.randn(2, 64, 40, device="cuda", dtype=torch.float16)

    def f(t):
        return A.qkv_attention(conv_in(t), 2).float().square().mean()

    with A.attention_impl("fused"):
        eager = f(x)
        eager.backward()
        grad_eager = conv_in.weight.grad.clone()
        conv_in.weight.grad = None
        compiled = torch.compile(f, fullgraph=True)(x)
        compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(conv_in.weight.grad, grad_eager, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C, T", [(64, 40), (64, 128), (128, 96), (192, 40)])
def test_sanitizer_subset(dtype, C, T):
    # Small cases for compute-sanitizer (memcheck, racecheck; scripts/gpu_check.sh):
    # T is a multiple of 8, so the cp.async path runs (with a partial tile for 40 and 96, two
    # pipelined tiles for 128); T + 1 runs the guarded element loads. C = 128 has the other
    # backward tiling (32 queries per step). C = 192 runs on the Cp = 256 kernels with 64
    # zero-filled channels (key tiles of 32, two channel slices in the backward, 16 queries
    # per step in fp32).
    for t in (T, T + 1):
        _check_fwd_bwd(1, 2, C, t, dtype, seed=t)


@pytest.mark.parametrize("C, T", [(64, 136), (192, 40)])
def test_sanitizer_subset_tile_major(C, T):
    """The tile-major kernel instances (attention_tile_major) under the sanitizers too: several
    tiles of two heads, and the Cp = 256 backward's channel slices along gridDim.z."""
    with A.attention_sm90(False), A.attention_tile_major():
        _check_fwd_bwd(1, 2, C, T, torch.float16, seed=T)
