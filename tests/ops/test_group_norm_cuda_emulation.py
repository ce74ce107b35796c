"""The CUDA kernels of iddpm::group_norm_act run on the CPU: tests/ops/cuda_emulation/
group_norm_emulation.cpp compiles csrc/cuda/group_norm_kernel.cuh with the host compiler over the
warp/block emulator (shuffles and barriers of the block sums; every block of the grid in turn)
and runs the forward and backward kernels on cases written here. Their outputs are checked like
the CPU kernel's (tests/ops/test_group_norm_act.py): against a float64 oracle (fp32 ≤ 1e-5 of the
output's scale; float64 outputs to 1e-12, gradients to 1e-10), fp16/bf16 within 2× of the
reference composition's error, and every output element written (the emulator's buffers start
as NaN). Needs a C++20 compiler and the CUDA headers, not a GPU; the GPU check runs the same
kernels on a card (tests/ops/test_group_norm_act_gpu.py)."""

from __future__ import annotations

import struct
import subprocess

import numpy as np
import pytest
import torch

from helpers.emulation import build_emulator
from helpers.group_norm import make, oracle
from helpers.oracles import check_two_x_rule, max_err
from iddpm_ext.ops import group_norm as GN

# One worker runs them all: the emulator is compiled once (module fixture, about 5 s).
pytestmark = [pytest.mark.kernels, pytest.mark.xdist_group("group_norm_emulation")]

DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
BIG_GRID = 1 << 30  # the elementwise kernels get every block they need


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return build_emulator("group_norm_emulation.cpp", tmp_path_factory.mktemp("gn_emu") / "gn_emulation")


def positions(shape) -> int:
    return int(np.prod(shape[2:])) if len(shape) > 2 else 1


def memory_order(t: torch.Tensor, cl: bool) -> torch.Tensor:
    """t's elements in the kernels' memory order: [N, C, S] or, channels-last, [N, S, C]."""
    flat = t.reshape(t.shape[0], t.shape[1], positions(t.shape))
    return (flat.transpose(1, 2) if cl else flat).contiguous().reshape(-1)


def from_memory_order(v: torch.Tensor, shape, cl: bool) -> torch.Tensor:
    N, C, S = shape[0], shape[1], positions(shape)
    t = v.reshape(N, S, C).transpose(1, 2) if cl else v.reshape(N, C, S)
    return t.reshape(shape)


def run_emulated(exe, tmp_path, x, dy, G, w, b, sc, sh, eps, silu, cl, grid_cap=BIG_GRID):
    """The CUDA kernels' (y, mean, rstd, grad_x, grad_weight, grad_bias, grad_scale, grad_shift),
    float64 tensors, y and grad_x shaped as x (NCHW view)."""
    shape = tuple(x.shape)
    N, C, S = shape[0], shape[1], positions(shape)
    head = [DTYPES[x.dtype], N, C, S, G, int(cl), int(silu)]
    head += [int(t is not None) for t in (w, b, sc, sh)] + [grid_cap]
    parts = [struct.pack("<12q", *head), struct.pack("<d", eps)]
    for t in (memory_order(x, cl), memory_order(dy, cl), w, b, sc, sh):
        if t is not None:
            parts.append(t.detach().double().contiguous().numpy().tobytes())
    case, out = tmp_path / "case.bin", tmp_path / "out.bin"
    case.write_bytes(b"".join(parts))
    run = subprocess.run([str(exe), str(case), str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    v = torch.from_numpy(np.fromfile(out, dtype="<f8"))
    sizes = [N * C * S, N * G, N * G, N * C * S, C, C, N * C, N * C]
    assert v.numel() == sum(sizes)
    y, mean, rstd, gx, gw, gb, gsc, gsh = torch.split(v, sizes)
    return (
        from_memory_order(y, shape, cl),
        mean.reshape(N, G),
        rstd.reshape(N, G),
        from_memory_order(gx, shape, cl),
        gw,
        gb,
        gsc.reshape(N, C),
        gsh.reshape(N, C),
    )


def grads_of(fn, x, params, dy):
    """Gradients of fn(x, *params) · dy with respect to x and each parameter (None for absent)."""
    xs = [x.detach().requires_grad_()] + [None if p is None else p.detach().requires_grad_() for p in params]
    out = fn(*xs)
    present = [t for t in xs if t is not None]
    g = iter(torch.autograd.grad(out, present, dy.to(out.dtype)))
    return [None if t is None else next(g) for t in xs]


CASES = [
    # shape, groups, channels_last, grid cap of the elementwise kernels
    ((2, 32, 5, 7), 8, False, BIG_GRID),  # a group of 140 elements: threads without any
    ((2, 32, 5, 7), 8, True, BIG_GRID),
    ((2, 64, 300), 4, False, 3),  # groups of 4800 (each thread several) and grid-stride loops
    ((2, 24, 9, 9), 6, True, 3),
    ((2, 40, 5, 5), 8, True, 3),  # grid stride 768 = 19·40 + 8: every digit of the offset carries
    ((3, 8, 50), 4, False, 3),  # stride 768 > C·S = 400: a new sample every step
    ((1, 24, 10, 10), 8, True, BIG_GRID),  # group statistics: 300 = 100 positions × 3 channels
    ((3, 48, 4, 4), 48, True, BIG_GRID),  # one channel per group
    ((1, 520, 2, 2), 2, True, BIG_GRID),  # 260 channels per group: the backward's wide-group loop
    ((1, 8, 1, 1), 2, False, BIG_GRID),  # 4 elements per group
]


@pytest.mark.parametrize("shape, G, cl, cap", CASES)
@pytest.mark.parametrize(
    "silu, params, film", [(True, True, True), (False, True, False), (True, False, True)]
)
def test_cuda_kernels_f32_match_float64(emulator, tmp_path, shape, G, cl, cap, silu, params, film):
    x, G, w, b, sc, sh = make(shape, G, params=params, film=film, channels_last=cl)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    y, mean, rstd, *grads = run_emulated(emulator, tmp_path, x, dy, G, w, b, sc, sh, 1e-5, silu, cl, cap)
    for name, t in zip(
        ("y", "mean", "rstd", "grad_x", "gw", "gb", "gscale", "gshift"), (y, mean, rstd, *grads)
    ):
        assert not t.isnan().any(), f"{name}: elements the kernels never wrote"
    ref = oracle(x, G, w, b, sc, sh, 1e-5, silu)
    assert max_err(y, ref) <= 1e-5 * ref.abs().max().item()
    xg = x.double().reshape(shape[0], G, -1)
    torch.testing.assert_close(mean, xg.mean(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rstd, 1 / torch.sqrt(xg.var(-1, unbiased=False) + 1e-5), rtol=1e-5, atol=0)
    params64 = [None if t is None else t.double() for t in (w, b, sc, sh)]
    expected = grads_of(lambda *a: oracle(a[0], G, *a[1:], 1e-5, silu), x.double(), params64, dy.double())
    names = ("grad_x", "grad_weight", "grad_bias", "grad_scale", "grad_shift")
    for name, got, want in zip(names, (grads[0], *grads[1:]), expected):
        if want is None:
            continue  # the kernels write this gradient anyway; the glue drops it
        assert max_err(got, want) <= 1e-5 * want.abs().max().item(), name


@pytest.mark.parametrize("cl", [False, True])
def test_cuda_kernels_f64_exact(emulator, tmp_path, cl):
    x, G, w, b, sc, sh = make((2, 16, 3, 5), 4, dtype=torch.float64, channels_last=cl)
    w, b, sc, sh = (t.double() for t in (w, b, sc, sh))
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y, mean, rstd, *grads = run_emulated(emulator, tmp_path, x, dy, G, w, b, sc, sh, 1e-6, True, cl)
    torch.testing.assert_close(y, oracle(x, G, w, b, sc, sh, 1e-6), rtol=1e-12, atol=1e-12)
    expected = grads_of(lambda *a: oracle(a[0], G, *a[1:], 1e-6), x, [w, b, sc, sh], dy)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cl", [False, True])
def test_cuda_kernels_low_precision_two_x_rule(emulator, tmp_path, dtype, cl):
    x, G, w, b, sc, sh = make((2, 32, 6, 6), 8, dtype=dtype, channels_last=cl)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    y, _, _, gx, *_ = run_emulated(emulator, tmp_path, x, dy, G, w, b, sc, sh, 1e-5, True, cl)
    # The emulator returns the kernels' dtype values widened to float64: back to the dtype.
    y, gx = y.to(dtype), gx.to(dtype)
    sc_d, sh_d = sc.to(dtype), sh.to(dtype)
    eager = GN.group_norm_act_reference(x, G, w, b, sc_d, sh_d)
    check_two_x_rule(y, eager, oracle(x, G, w, b, sc, sh), f"CUDA forward {dtype}")
    gx_eager = grads_of(lambda *a: GN.group_norm_act_reference(a[0], G, *a[1:]), x, [w, b, sc_d, sh_d], dy)[0]
    gx_ref = grads_of(lambda *a: oracle(a[0], G, *a[1:]), x.double(), [w, b, sc, sh], dy.double())[0]
    check_two_x_rule(gx, gx_eager, gx_ref, f"CUDA grad_x {dtype}")
    # The CPU kernel computes the same chain in fp32 with one rounding: the two agree to a unit
    # in the last place of the dtype.
    cpu = GN.group_norm_act(x, G, w, b, sc_d, sh_d)
    ulp = torch.finfo(dtype).eps * cpu.double().abs().clamp_min(1.0)
    assert ((y.double() - cpu.double()).abs() <= ulp).all()


def test_cuda_kernels_empty_positions_and_items(emulator, tmp_path):
    # No positions: finite statistics (mean 0, rstd 1/sqrt(eps)) and zero parameter gradients.
    x, G, w, b, sc, sh = make((2, 8, 0), 2)
    out = run_emulated(emulator, tmp_path, x, torch.zeros(x.shape), G, w, b, sc, sh, 1e-5, True, False)
    _, mean, rstd = torch.ops.iddpm.group_norm_act(x, G, w, b, sc, sh, 1e-5, True)  # the CPU kernel
    torch.testing.assert_close(out[1], mean.double())
    torch.testing.assert_close(out[2], rstd.double())
    for t in out[4:]:
        assert torch.equal(t, torch.zeros_like(t))
    # No channels, channels-last: nothing to read; finite statistics.
    x, G, w, b, sc, sh = make((1, 0, 2, 2), 1, channels_last=True)
    out = run_emulated(emulator, tmp_path, x, torch.zeros(x.shape), G, w, b, sc, sh, 1e-5, True, True)
    _, mean, rstd = torch.ops.iddpm.group_norm_act(x, G, w, b, sc, sh, 1e-5, True)
    torch.testing.assert_close(out[1], mean.double())
    torch.testing.assert_close(out[2], rstd.double())
    # No items: the parameter gradients are zeros.
    x, G, w, b, sc, sh = make((0, 8, 3), 2)
    out = run_emulated(emulator, tmp_path, x, torch.zeros(x.shape), G, w, b, sc, sh, 1e-5, True, False)
    assert torch.equal(out[4], torch.zeros(8, dtype=torch.float64))
    assert torch.equal(out[5], torch.zeros(8, dtype=torch.float64))
