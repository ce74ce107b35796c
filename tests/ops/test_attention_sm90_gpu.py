"""The Hopper (sm_90a) attention kernels on a card (run by scripts/gpu_check.sh). Forward: against
float64 under the project's low-precision rule (at most twice the eager einsum's error), against
the sm_80 forward of the same op, its lse, that it is the kernel that ran (profiler) only when
asked for, and the sm_80 backward through its lse. Backward: dq, dk, dv against float64 under the
same rule (eager = autograd through the einsum in that dtype) and against the sm_80 backward, the
sm_90a backward through the sm_80 forward's lse, that its kernel ran only when asked for. The
forward's pipelined consumers (attention_sm90_pipelined) get the forward, profiler, sanitizer and
random-shape tests too, and the backward's bulk dq reductions (attention_sm90_bulk_dq) the
backward, profiler, sanitizer and random-shape tests; every test pins both switches. Skipped
without CUDA, without the sm90 build, or off a compute-capability 9.x card. The kernels have never
run on a card before this check."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.oracles import attention_math_f64, check_two_x_rule, max_err
from iddpm_ext.ops import attention as A

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or not A.sm90_built() or torch.cuda.get_device_capability()[0] != 9,
        reason="needs a compute-capability 9.x card and the sm_90a attention forward built",
    ),
]


def _qkv(B, H, C, T, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(B, 3 * H * C, T, device="cuda", generator=gen).to(dtype)


def _kernel_names(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.key for e in prof.key_averages()}


@contextlib.contextmanager
def _sm90(pipelined: bool = False, bulk_dq: bool = False):
    """The sm_90a kernels switched on, the forward's consumer loop pinned (plain or pipelined) and
    the backward's dq path (atomics or bulk reductions)."""
    with A.attention_sm90(), A.attention_sm90_pipelined(pipelined), A.attention_sm90_bulk_dq(bulk_dq):
        yield


@pytest.mark.parametrize("pipelined", [False, True], ids=["plain", "pipelined"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("C", [64, 128])
@pytest.mark.parametrize("T", [37, 256, 1024, 4096])
def test_sm90_forward_against_float64_and_sm80(dtype, C, T, pipelined):
    B, H = (2, 3) if T <= 1024 else (1, 2)
    qkv = _qkv(B, H, C, T, dtype, seed=T + C)
    assert A.sm90_supported(qkv, H)
    with _sm90(pipelined):
        out, lse = A.qkv_attention_with_lse(qkv, H)
    out80, lse80 = A.qkv_attention_with_lse(qkv, H)  # without the switch: the sm_80 forward
    ref = attention_math_f64(qkv, H)
    eager = A.qkv_attention_reference(qkv, H)
    what = f"sm90{' pipelined' if pipelined else ''} B={B} H={H} C={C} T={T} {dtype}"
    floor = 1e-5 * (1.0 + ref.abs().max().item())
    check_two_x_rule(out, eager, ref, what, floor)
    e80 = max_err(out80, ref)
    assert max_err(out, out80) <= 2 * e80 + floor, what + ": far from the sm_80 forward"
    assert max_err(lse, lse80) <= 1e-4 * (1.0 + lse80.abs().max().item()), what + ": lse"


def test_sm90_kernel_runs_only_when_asked():
    qkv = _qkv(2, 2, 64, 512, torch.float16, seed=1)
    with _sm90():
        asked = _kernel_names(lambda: A.qkv_attention_fused(qkv, 2))
    default = _kernel_names(lambda: A.qkv_attention_fused(qkv, 2))
    assert any("attn_fwd_sm90_kernel" in k for k in asked), sorted(asked)
    assert not any("attn_fwd_sm90_kernel" in k for k in default), sorted(default)
    # a head dim it lacks: the sm_80 forward runs even when asked
    q96 = _qkv(1, 2, 96, 256, torch.float16, seed=2)
    with _sm90():
        other = _kernel_names(lambda: A.qkv_attention_fused(q96, 2))
    assert not any("attn_fwd_sm90_kernel" in k for k in other), sorted(other)


def test_sm90_pipelined_kernel_runs_only_when_asked():
    """The pipelined instances (template flag true) run under both switches, the plain ones under
    the sm90 switch alone; the pipelined switch alone changes nothing (the sm_80 forward)."""
    qkv = _qkv(2, 2, 128, 512, torch.bfloat16, seed=3)
    with _sm90(True):
        piped = _kernel_names(lambda: A.qkv_attention_fused(qkv, 2))
    with _sm90(False):
        plain = _kernel_names(lambda: A.qkv_attention_fused(qkv, 2))
    with A.attention_sm90(False), A.attention_sm90_pipelined():
        alone = _kernel_names(lambda: A.qkv_attention_fused(qkv, 2))
    fwd = [k for k in piped if "attn_fwd_sm90_kernel" in k]
    assert fwd and all("true>" in k for k in fwd), sorted(piped)
    fwd = [k for k in plain if "attn_fwd_sm90_kernel" in k]
    assert fwd and all("false>" in k for k in fwd), sorted(plain)
    assert not any("sm90" in k for k in alone), sorted(alone)


def test_sm90_forward_feeds_the_backward():
    B, H, C, T = 2, 2, 128, 300
    qkv = _qkv(B, H, C, T, torch.bfloat16, seed=3)
    g = torch.randn(B, H * C, T, device="cuda", dtype=torch.bfloat16)
    x = qkv.clone().requires_grad_()
    with _sm90():
        out = A.qkv_attention_fused(x, H)
    (grad,) = torch.autograd.grad(out, x, g)
    x80 = qkv.clone().requires_grad_()
    (grad80,) = torch.autograd.grad(A.qkv_attention_fused(x80, H), x80, g)
    xr = qkv.double().requires_grad_()
    (grad_ref,) = torch.autograd.grad(attention_math_f64(xr, H), xr, g.double())
    assert max_err(grad, grad_ref) <= 2 * max_err(grad80, grad_ref) + 1e-4


def _grads(fn, qkv, g):
    """grad_qkv of fn at (a copy of) qkv for the output gradient g."""
    x = qkv.clone().requires_grad_()
    (grad,) = torch.autograd.grad(fn(x), x, g)
    return grad


@pytest.mark.parametrize("bulk_dq", [False, True], ids=["atomic-dq", "bulk-dq"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("C", [64, 128])
@pytest.mark.parametrize("T", [8, 37, 200, 1024])
def test_sm90_backward_against_float64_and_sm80(dtype, C, T, bulk_dq):
    B, H = (2, 2) if T <= 256 else (1, 2)
    qkv = _qkv(B, H, C, T, dtype, seed=7 * T + C)
    gen = torch.Generator(device="cuda").manual_seed(T)
    g = torch.randn(B, H * C, T, device="cuda", generator=gen).to(dtype)
    with _sm90(bulk_dq=bulk_dq):  # forward and backward on the sm_90a kernels
        grad = _grads(lambda x: A.qkv_attention_fused(x, H), qkv, g)
    grad80 = _grads(lambda x: A.qkv_attention_fused(x, H), qkv, g)
    eager = _grads(lambda x: A.qkv_attention_reference(x, H), qkv, g)
    ref = _grads(lambda x: attention_math_f64(x, H), qkv.double(), g.double())
    what = f"sm90 backward{' bulk-dq' if bulk_dq else ''} B={B} H={H} C={C} T={T} {dtype}"
    for part, name in enumerate(("dq", "dk", "dv")):  # each gradient on its own scale
        sl = lambda t: t.reshape(B, H, 3, C, T)[:, :, part]  # noqa: E731
        floor = 1e-5 * (1.0 + sl(ref).abs().max().item())
        check_two_x_rule(sl(grad), sl(eager), sl(ref), f"{what} {name}", floor)
        e80 = max_err(sl(grad80), sl(ref))
        assert max_err(sl(grad), sl(grad80)) <= 2 * e80 + floor, f"{what} {name}: far from sm_80"


@pytest.mark.parametrize("bulk_dq", [False, True], ids=["atomic-dq", "bulk-dq"])
def test_sm90_backward_many_ctas_and_query_tiles(bulk_dq):
    """More CTAs than the card runs at once (B·H = 64, 16 key tiles each) and 32 query tiles per
    CTA (16 rounds of each stage; bulk dq: 16 rounds of each dq buffer): the timing a small case
    cannot show, against the sm_80 backward (float64 at this size would take gigabytes)."""
    B, H, C, T = 4, 16, 64, 2048
    qkv = _qkv(B, H, C, T, torch.float16, seed=13)
    g = torch.randn(B, H * C, T, device="cuda", dtype=torch.float16)
    with _sm90(bulk_dq=bulk_dq):
        grad = _grads(lambda x: A.qkv_attention_fused(x, H), qkv, g)
    grad80 = _grads(lambda x: A.qkv_attention_fused(x, H), qkv, g)
    assert torch.isfinite(grad).all()
    for part, name in enumerate(("dq", "dk", "dv")):
        a = grad.reshape(B, H, 3, C, T)[:, :, part]
        b = grad80.reshape(B, H, 3, C, T)[:, :, part]
        assert max_err(a, b) <= 4e-3 * (1.0 + b.abs().max().item()), name


def test_sm90_backward_through_the_sm80_forward():
    B, H, C, T = 1, 2, 64, 300
    qkv = _qkv(B, H, C, T, torch.float16, seed=11)
    g = torch.randn(B, H * C, T, device="cuda", dtype=torch.float16)
    out, lse = A.qkv_attention_with_lse(qkv, H)  # the sm_80 forward
    with _sm90():
        grad = A.qkv_attention_backward(g, qkv, out, lse, H)
    grad80 = A.qkv_attention_backward(g, qkv, out, lse, H)
    ref = _grads(lambda x: attention_math_f64(x, H), qkv.double(), g.double())
    assert max_err(grad, ref) <= 2 * max_err(grad80, ref) + 1e-4


def test_sm90_backward_kernel_runs_only_when_asked():
    qkv = _qkv(1, 2, 128, 256, torch.bfloat16, seed=5)
    g = torch.randn(1, 2 * 128, 256, device="cuda", dtype=torch.bfloat16)
    fn = lambda: _grads(lambda x: A.qkv_attention_fused(x, 2), qkv, g)  # noqa: E731
    with _sm90():
        asked = _kernel_names(fn)
    default = _kernel_names(fn)
    assert any("attn_bwd_sm90_kernel" in k for k in asked), sorted(asked)
    assert not any("attn_bwd_kernel" in k and "sm90" not in k for k in asked), sorted(asked)
    assert not any("attn_bwd_sm90_kernel" in k for k in default), sorted(default)


def test_sm90_bulk_dq_kernel_runs_only_when_asked():
    """The bulk-dq backward instances (template flag true) run under both switches where
    T % 4 == 0; at T % 4 != 0 the atomic ones run even when asked; the bulk switch alone changes
    nothing (the sm_80 backward)."""
    H = 2

    def bwd_kernels(T, **switches):
        qkv = _qkv(1, H, 64, T, torch.float16, seed=T)
        g = torch.randn(1, H * 64, T, device="cuda", dtype=torch.float16)
        with contextlib.ExitStack() as stack:
            if switches:
                stack.enter_context(_sm90(**switches))
            else:
                stack.enter_context(A.attention_sm90(False))
                stack.enter_context(A.attention_sm90_bulk_dq())
            names = _kernel_names(lambda: _grads(lambda x: A.qkv_attention_fused(x, H), qkv, g))
        return [k for k in names if "attn_bwd" in k]

    bulk = [k for k in bwd_kernels(256, bulk_dq=True) if "sm90" in k]
    assert bulk and all("true>" in k for k in bulk), bulk
    atomic = [k for k in bwd_kernels(256, bulk_dq=False) if "sm90" in k]
    assert atomic and all("false>" in k for k in atomic), atomic
    odd = [k for k in bwd_kernels(250, bulk_dq=True) if "sm90" in k]
    assert odd and all("false>" in k for k in odd), odd
    alone = bwd_kernels(256)
    assert alone and not any("sm90" in k for k in alone), alone


@pytest.mark.parametrize(
    "C, T, offset, pipelined, bulk_dq",
    [
        (64, 37, 0, False, False),
        (128, 256, 0, False, False),
        (64, 256, 1, False, False),
        (64, 640, 0, True, False),
        (128, 200, 1, True, False),
        (64, 320, 0, False, True),
        (128, 200, 1, False, True),
    ],
    ids=[
        "C64-T37-guarded",
        "C128-T256-tma",
        "C64-T256-unaligned",
        "pipelined-C64-T640-tma",
        "pipelined-C128-T200-unaligned",
        "bulk-dq-C64-T320-tma",
        "bulk-dq-C128-T200-unaligned",
    ],
)
def test_sm90_sanitizer_subset(C, T, offset, pipelined, bulk_dq):
    """Small calls of the sm90 forward and backward for compute-sanitizer (gpu_check's
    memcheck_sm90 and racecheck_sm90 steps): the guarded cp.async loads (T = 37), the TMA path
    (T = 256, aligned) and the cp.async path on storage that is not 16-byte aligned (a view one
    element in; the backward's grad_out is aligned there, so its producer takes the guarded loads
    for qkv's sake); the pipelined forward over more tiles than stages and unaligned; each against
    the sm_80 kernels; the backward's bulk dq reductions over several query tiles (both dq
    buffers reused), aligned and not."""
    B, H = 1, 2
    n = B * 3 * H * C * T
    storage = _qkv(1, 1, 1, n + offset, torch.float16, seed=C + T).flatten()  # 3·(n + offset) values
    qkv = storage[offset : offset + n].view(B, 3 * H * C, T)  # contiguous; offset 1: 2 bytes in
    assert (qkv.data_ptr() % 16 == 0) is (offset == 0)
    g = _qkv(1, 1, 1, B * H * C * T, torch.float16, seed=T).flatten()[: B * H * C * T].view(B, H * C, T)
    with _sm90(pipelined, bulk_dq):
        out, lse = A.qkv_attention_with_lse(qkv, H)
        grad = A.qkv_attention_backward(g, qkv, out, lse, H)
    out80, lse80 = A.qkv_attention_with_lse(qkv, H)
    grad80 = A.qkv_attention_backward(g, qkv, out80, lse80, H)
    torch.cuda.synchronize()
    assert max_err(out, out80) <= 2e-3 * (1.0 + out80.abs().max().item())
    assert max_err(lse, lse80) <= 1e-4 * (1.0 + lse80.abs().max().item())
    assert max_err(grad, grad80) <= 4e-3 * (1.0 + grad80.abs().max().item())


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    B=st.integers(1, 3),
    H=st.integers(1, 4),
    C=st.sampled_from([64, 128]),
    T=st.integers(1, 700),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    offset=st.sampled_from([0, 1]),
    pipelined=st.booleans(),
    bulk_dq=st.booleans(),
)
def test_sm90_random_shapes_match_sm80(B, H, C, T, dtype, offset, pipelined, bulk_dq):
    """Random valid calls of both sm_90a kernels (any T from 1, aligned or not: every producer
    path and masking case) against the sm_80 kernels of the same op, forward and backward: no
    crash, no hang, the same results within rounding."""
    n = B * 3 * H * C * T
    storage = _qkv(1, 1, 1, n + offset, dtype, seed=T).flatten()
    qkv = storage[offset : offset + n].view(B, 3 * H * C, T)
    g = torch.randn(B, H * C, T, device="cuda", dtype=dtype)
    with _sm90(pipelined, bulk_dq):
        out, lse = A.qkv_attention_with_lse(qkv, H)
        grad = A.qkv_attention_backward(g, qkv, out, lse, H)
    out80, lse80 = A.qkv_attention_with_lse(qkv, H)
    grad80 = A.qkv_attention_backward(g, qkv, out80, lse80, H)
    tol = 4e-3 if dtype == torch.float16 else 3e-2
    assert max_err(out, out80) <= tol * (1.0 + out80.abs().max().item())
    assert max_err(lse, lse80) <= 1e-4 * (1.0 + lse80.abs().max().item())
    assert max_err(grad, grad80) <= 2 * tol * (1.0 + grad80.abs().max().item())
