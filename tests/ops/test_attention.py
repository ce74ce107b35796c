"""The fused QKV attention op on CPU: forward and backward against the einsum reference and
an independent float64 computation, gradcheck, opcheck, torch.compile, errors, and the
implementation switch. GPU tests are in test_attention_gpu.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.cuda_fake import FakeCudaC
from helpers.oracles import attention_math_f64, check_two_x_rule, max_err
from iddpm_ext.ops import attention as A

pytestmark = pytest.mark.kernels

# (B, H, C, T): odd T, one key, several heads, odd head dims, T not a multiple of any block.
SHAPES = [(2, 3, 16, 37), (1, 4, 64, 64), (2, 2, 32, 257), (1, 1, 5, 1), (3, 1, 7, 130), (1, 2, 128, 96)]


def fused(qkv, num_heads):
    return A.qkv_attention_fused(qkv, num_heads)


@pytest.fixture(params=["native", "avx2", "generic"])
def isa(request, monkeypatch):
    """Runs a test with each vector build of the CPU kernel this machine can execute."""
    if request.param != "native":
        monkeypatch.setenv("IDDPM_ATTN_CPU_ISA", request.param)
    return request.param


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_f32_matches_reference(shape, isa):
    B, H, C, T = shape
    qkv = torch.randn(B, 3 * H * C, T, generator=torch.Generator().manual_seed(1))
    out = fused(qkv, H)
    assert out.shape == (B, H * C, T) and out.dtype == torch.float32
    ref = A.qkv_attention_reference(qkv, H)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_f64_exact(shape):
    B, H, C, T = shape
    qkv = torch.randn(B, 3 * H * C, T, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out, lse = A.qkv_attention_with_lse(qkv, H)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64 and lse.shape == (B, H, T)
    torch.testing.assert_close(out, attention_math_f64(qkv, H), rtol=1e-12, atol=1e-13)
    # lse = logsumexp over keys of qᵀk / √C.
    q, k, _ = qkv.reshape(B * H, 3 * C, T).split(C, dim=1)
    logits = torch.einsum("bct,bcs->bts", q, k) / C**0.5
    torch.testing.assert_close(lse.reshape(B * H, T), logits.logsumexp(-1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_backward_f64_exact(shape):
    B, H, C, T = shape
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, 3 * H * C, T, dtype=torch.float64, generator=gen, requires_grad=True)
    g = torch.randn(B, H * C, T, dtype=torch.float64, generator=gen)
    (ours,) = torch.autograd.grad(fused(qkv, H), qkv, g)
    (ref,) = torch.autograd.grad(attention_math_f64(qkv, H), qkv, g)
    torch.testing.assert_close(ours, ref, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_backward_f32_matches_reference_autograd(shape, isa):
    B, H, C, T = shape
    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(B, 3 * H * C, T, generator=gen, requires_grad=True)
    g = torch.randn(B, H * C, T, generator=gen)
    (ours,) = torch.autograd.grad(fused(qkv, H), qkv, g)
    (ref,) = torch.autograd.grad(A.qkv_attention_reference(qkv, H), qkv, g)
    scale = ref.abs().max().item()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=2e-6 * scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_two_x_rule(dtype):
    B, H, C, T = 2, 2, 32, 100
    gen = torch.Generator().manual_seed(5)
    qkv32 = torch.randn(B, 3 * H * C, T, generator=gen)
    g32 = torch.randn(B, H * C, T, generator=gen)
    x = qkv32.to(dtype).requires_grad_()
    out = fused(x, H)
    assert out.dtype == dtype
    (grad,) = torch.autograd.grad(out, x, g32.to(dtype))
    xe = qkv32.to(dtype).requires_grad_()
    eager = A.qkv_attention_reference(xe, H)
    (grad_eager,) = torch.autograd.grad(eager, xe, g32.to(dtype))
    xr = qkv32.to(dtype).double().requires_grad_()  # the same rounded inputs, exact math
    ref = attention_math_f64(xr, H)
    (grad_ref,) = torch.autograd.grad(ref, xr, g32.to(dtype).double())
    check_two_x_rule(out, eager, ref, f"{dtype} forward")
    check_two_x_rule(grad, grad_eager, grad_ref, f"{dtype} backward")


def test_gradcheck_f64():
    qkv = torch.randn(2, 3 * 2 * 4, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: fused(x, 2), (qkv,))
    qkv1 = torch.randn(1, 3 * 3 * 5, 1, dtype=torch.float64, requires_grad=True)  # T = 1
    assert torch.autograd.gradcheck(lambda x: fused(x, 3), (qkv1,))


def test_large_t_is_blocked_and_correct():
    # T = 2048: one (b, h) score matrix would be 2048² floats (16 MiB); the kernel keeps
    # [128, 64] / [64, 64] blocks. Correctness at this size (odd T) in float64.
    B, H, C, T = 1, 2, 16, 2047
    gen = torch.Generator().manual_seed(6)
    qkv = torch.randn(B, 3 * H * C, T, dtype=torch.float64, generator=gen, requires_grad=True)
    g = torch.randn(B, H * C, T, dtype=torch.float64, generator=gen)
    out = fused(qkv, H)
    ref = attention_math_f64(qkv, H)
    torch.testing.assert_close(out, ref, rtol=1e-11, atol=1e-12)
    (ours,) = torch.autograd.grad(out, qkv, g)
    (expect,) = torch.autograd.grad(ref, qkv, g)
    torch.testing.assert_close(ours, expect, rtol=1e-10, atol=1e-11)


def test_non_contiguous_qkv():
    base = torch.randn(2, 3 * 2 * 8, 40 * 2, generator=torch.Generator().manual_seed(7))
    qkv = base[:, :, ::2]  # strided along T
    assert not qkv.is_contiguous()
    torch.testing.assert_close(fused(qkv, 2), fused(qkv.contiguous(), 2), rtol=0, atol=0)


def test_empty_batch():
    out, lse = A.qkv_attention_with_lse(torch.randn(0, 12, 5), 2)
    assert out.shape == (0, 4, 5) and lse.shape == (0, 2, 5)


@pytest.mark.slow
def test_opcheck_forward_and_backward():
    gen = torch.Generator().manual_seed(8)
    qkv = torch.randn(2, 3 * 2 * 8, 11, dtype=torch.float64, generator=gen, requires_grad=True)
    torch.library.opcheck(torch.ops.iddpm.qkv_attention.default, (qkv, 2))
    out, lse = A.qkv_attention_with_lse(qkv.detach(), 2)
    g = torch.randn_like(out)
    torch.library.opcheck(torch.ops.iddpm.qkv_attention_backward.default, (g, qkv.detach(), out, lse, 2))
    qkv32 = torch.randn(1, 3 * 4 * 16, 20, generator=gen, requires_grad=True)
    torch.library.opcheck(torch.ops.iddpm.qkv_attention.default, (qkv32, 4))


class _TinyAttention(torch.nn.Module):
    def __init__(self, channels=32, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Conv1d(channels, 3 * channels, 1)
        self.proj = torch.nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        return x + self.proj(A.qkv_attention(self.qkv(x), self.heads))


def test_torch_compile_fullgraph():
    torch.manual_seed(9)
    model = _TinyAttention()
    x = torch.randn(2, 32, 19)
    with A.attention_impl("fused"):
        eager = model(x)
        eager.sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        compiled = torch.compile(model, fullgraph=True)
        out = compiled(x)
        out.sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


def test_impl_switch():
    qkv = torch.randn(2, 3 * 2 * 8, 30, generator=torch.Generator().manual_seed(10))
    expect_fused = fused(qkv, 2)
    expect_ref = A.qkv_attention_reference(qkv, 2)
    assert not torch.equal(expect_fused, expect_ref)  # the two paths are distinguishable
    with A.attention_impl("auto"):
        assert A.fused_supported(qkv, 2)
        assert torch.equal(A.qkv_attention(qkv, 2), expect_fused)
    with A.attention_impl("einsum"):
        assert torch.equal(A.qkv_attention(qkv, 2), expect_ref)
    with A.attention_impl("fused"):
        assert torch.equal(A.qkv_attention(qkv, 2), expect_fused)
    assert A.get_attention_impl() == "auto"
    # No kernel for these: auto falls back to the reference.
    assert not A.fused_supported(torch.zeros(1, 6, 4, dtype=torch.int32), 2)
    assert not A.fused_supported(torch.zeros(1, 6, 4, device="meta"), 2)
    assert not A.fused_supported(torch.zeros(1, 7, 4), 2)
    with pytest.raises(ValueError, match="impl"):
        A.set_attention_impl("flash")


def test_auto_on_cuda_picks_fused_only_for_card_verified_head_dims(monkeypatch):
    # CUDA kernels exist for every multiple of 8 up to 256, but "auto" sends only the head dims
    # that have run on a card (AUTO_HEAD_DIMS: 32, 64, 128) to them; the rest stay on einsum.
    # CUDA capabilities as _C reports them, so that this runs on CPU-only builds too.
    from torch._subclasses.fake_tensor import FakeTensorMode

    caps = {
        "dtypes": (torch.float32, torch.float16, torch.bfloat16),
        "head_dims": tuple(range(8, 257, 8)),
        "max_positions": 65535 * 64,
        "max_batch_heads": 2**31 - 1,
    }
    monkeypatch.setitem(A._KERNELS, "cuda", caps)
    assert A.AUTO_HEAD_DIMS["cuda"] == {32, 64, 128} and A.AUTO_HEAD_DIMS["cpu"] is None
    with FakeTensorMode():
        for C in (8, 32, 48, 64, 96, 128, 160, 256, 100):
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                qkv = torch.empty(2, 3 * 2 * C, 16, dtype=dtype, device="cuda")
                assert A.fused_supported(qkv, 2) == (C % 8 == 0)
                # fp32 stays on einsum on CUDA whatever the head dim (_AUTO_DTYPES).
                assert A._auto_fused(qkv, 2) == (C in (32, 64, 128) and dtype != torch.float32)
    # Every head dim on CPU.
    for C in (5, 96, 300):
        assert A._auto_fused(torch.zeros(1, 3 * C, 4), 1)


def test_auto_on_cuda_skips_fused_where_the_card_cannot_run_it(monkeypatch):
    # fused_supported on CUDA also asks the device: code built for 8.0 or newer (a build that
    # reaches the card only through 7.5, e.g. a T4, has kernels that trap there) and the
    # kernel's shared memory within the card's opt-in limit (the kernels are sized for the
    # H100's 227 KB). Where not, it is False, so "auto" uses einsum (the op refuses it). The
    # device's answers are faked (no GPU): device 0 runs 7.5 code, device 1 is an sm_86-like
    # card (99 KB), device 2 an H100-like one, device 3 has no kernel image at all.
    from torch._subclasses import fake_tensor
    from torch._subclasses.fake_tensor import FakeTensorMode

    from iddpm_ext.ops import loader

    # A fake CUDA tensor makes a real one on its device first where torch.cuda says it may
    # (torch 2.11's init_gpu_context asks is_available, faked here; on a one-GPU card cuda:1..4 do
    # not exist): skipped, the fake devices have nothing to initialize.
    monkeypatch.setattr(fake_tensor, "init_gpu_context", lambda device: None)
    caps = {
        "dtypes": (torch.float16,),
        "head_dims": (64, 256),
        "max_positions": 2**22,
        "max_batch_heads": 2**31,
    }
    monkeypatch.setitem(A._KERNELS, "cuda", caps)
    monkeypatch.setattr(A, "AUTO_HEAD_DIMS", {**A.AUTO_HEAD_DIMS, "cuda": {64, 256}})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    limits = {0: 64 * 1024, 1: 99 * 1024, 2: 227 * 1024}
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: type("P", (), {"shared_memory_per_block_optin": limits[i]}))  # fmt: skip
    no_image = RuntimeError("CUDA error: no kernel image is available for execution on the device")
    illegal = RuntimeError("CUDA error: an illegal memory access was encountered")
    fake = FakeCudaC(loader._C, {0: 75, 1: 86, 2: 90, 3: no_image, 4: illegal})
    monkeypatch.setattr(loader, "_C", fake)
    monkeypatch.setattr(A, "_CUDA_RUNS", {})
    with FakeTensorMode():
        qkv = {(i, c): torch.empty(1, 3 * 2 * c, 8, dtype=torch.float16, device=f"cuda:{i}")
               for i in range(4) for c in (64, 256)}  # fmt: skip
    runs = {(0, 64): False, (0, 256): False, (1, 64): True, (1, 256): False, (2, 64): True, (2, 256): True,
            (3, 64): False, (3, 256): False}  # fmt: skip
    for _ in range(2):
        for key, want in runs.items():
            assert A.fused_supported(qkv[key], 2) == want, key
            assert A._auto_fused(qkv[key], 2) == want, key
    assert sorted(fake.asked) == [0, 0, 1, 1, 2, 2, 3, 3]  # once per (device, element size, head dim)
    # Any other CUDA error is not an answer about the device: raised, not kept.
    with FakeTensorMode():
        on_4 = torch.empty(1, 3 * 2 * 64, 8, dtype=torch.float16, device="cuda:4")
    for _ in range(2):
        with pytest.raises(RuntimeError, match="illegal memory access"):
            A.fused_supported(on_4, 2)
    assert (4, 2, 64) not in A._CUDA_RUNS
    # torch.compile (fullgraph) takes the answer as a constant instead of breaking the graph
    # (dynamo asks torch.cuda.is_available itself: the real one again).
    monkeypatch.undo()
    monkeypatch.setattr(loader, "_C", fake)
    monkeypatch.setattr(A, "_CUDA_RUNS", {})

    def pick(x):
        return x + 1 if A._cuda_device_runs_cached(x.device.index or 0, 2, 64) else x - 1

    assert torch.equal(torch.compile(pick, fullgraph=True, backend="eager")(torch.zeros(2)), -torch.ones(2))
    assert fake.asked[-1] == 0


@pytest.mark.parametrize(
    "shape, heads, match",
    [
        ((2, 3 * 2 * 4 + 1, 5), 2, "multiple of 3·num_heads = 6"),
        ((2, 24, 5), 0, "num_heads: expected a positive"),
        ((24, 5), 2, r"3-D tensor"),
    ],
)
def test_forward_errors(shape, heads, match):
    with pytest.raises(ValueError, match=match):
        torch.ops.iddpm.qkv_attention(torch.randn(shape), heads)


def test_dtype_error():
    with pytest.raises(
        ValueError, match="qkv: expected dtype float32, float64, float16 or bfloat16 on CPU, got Long"
    ):
        torch.ops.iddpm.qkv_attention(torch.zeros(1, 6, 3, dtype=torch.long), 2)


def test_backward_errors():
    qkv = torch.randn(2, 24, 5)
    out, lse = A.qkv_attention_with_lse(qkv, 2)
    bwd = torch.ops.iddpm.qkv_attention_backward
    with pytest.raises(ValueError, match=r"grad_out: expected shape \[2, 8, 5\]"):
        bwd(torch.randn(2, 8, 4), qkv, out, lse, 2)
    with pytest.raises(ValueError, match="grad_out: expected dtype Float"):
        bwd(out.double(), qkv, out, lse, 2)
    with pytest.raises(ValueError, match=r"out: expected shape"):
        bwd(out, qkv, out[:, :4], lse, 2)
    with pytest.raises(ValueError, match="lse: expected dtype Float"):
        bwd(out, qkv, out, lse.double(), 2)
    with pytest.raises(ValueError, match=r"lse: expected shape \[2, 2, 5\]"):
        bwd(out, qkv, out, lse[:, :1], 2)


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(0, 2),
    width=st.integers(1, 40),
    T=st.integers(0, 9),
    heads=st.integers(-1, 5),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.int32]),
)
def test_arguments_give_result_or_clean_error(B, width, T, heads, dtype):
    qkv = torch.ones(B, width, T, dtype=dtype)
    try:
        out, lse = torch.ops.iddpm.qkv_attention(qkv, heads)
    except ValueError as e:
        assert "qkv" in str(e) or "num_heads" in str(e)
        return
    assert heads >= 1 and width % (3 * heads) == 0 and dtype != torch.int32
    assert out.shape == (B, width // 3, T) and lse.shape == (B, heads, T)
    if out.numel():
        # Constant inputs: uniform attention, so the output is the (constant) v.
        assert max_err(out, torch.ones_like(out)) < 1e-6


_TF32_SCRIPT = r"""
import sys
import torch
from iddpm_ext import _C

m = torch.backends.cuda.matmul
seen = [_C.attention_fp32_tf32()]
if sys.argv[1] == "legacy":
    torch.set_float32_matmul_precision("high")
    seen.append(_C.attention_fp32_tf32())
    m.allow_tf32 = False
    seen.append(_C.attention_fp32_tf32())
    m.allow_tf32 = True
    seen.append(_C.attention_fp32_tf32())
elif sys.argv[1] == "new":
    m.fp32_precision = "tf32"
    seen.append(_C.attention_fp32_tf32())
    try:  # torch's own legacy getter refuses a precision the new API set (what the op read before)
        m.allow_tf32
        seen.append("legacy getter answered")
    except RuntimeError:
        seen.append("legacy getter raised")
    m.fp32_precision = "ieee"
    seen.append(_C.attention_fp32_tf32())
else:  # the all-backends default
    torch.backends.fp32_precision = "tf32"
    seen.append(_C.attention_fp32_tf32())
print(seen)
"""


@pytest.mark.parametrize(
    "api, want",
    [
        ("legacy", "[False, True, False, True]"),
        ("new", "[False, True, 'legacy getter raised', False]"),
        ("generic", "[False, True]"),
    ],
)
def test_fp32_tf32_follows_torchs_setting_through_either_api(api, want):
    """The fused CUDA op's TF32 choice (read by _C.attention_fp32_tf32 at each call, fp32 only)
    follows torch's setting whether the legacy API (allow_tf32, set_float32_matmul_precision) or
    the per-backend one (fp32_precision) set it, and reading it never raises: torch's legacy
    getter, which the op used to call for every dtype, raises once the new API set the precision.
    In a child process (mixing the two APIs marks torch's state for the rest of a process)."""
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-c", _TF32_SCRIPT, api], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == want
