"""iddpm::group_norm_act (+ backward) on CUDA (marked gpu; run by scripts/gpu_check.sh): the
same checks as the CPU kernel's (tests/ops/test_group_norm_act.py) — fp32 against float64
forward and backward, fp16/bf16 within 2× of the reference composition's error, NCHW and
channels-last, 1-D and 3-D — plus agreement with the CPU kernel, a whole UNet with the fused
norm sites against the reference's ops, and errors that need a CUDA tensor."""

from __future__ import annotations

import pytest
import torch

from helpers.group_norm import make, oracle
from helpers.models import randomize_, tiny_kwargs
from helpers.oracles import check_two_x_rule, max_err, no_tf32
from iddpm_ext import nn as inn
from iddpm_ext.ops import group_norm as GN
from iddpm_ext.unet import UNetModel

pytestmark = pytest.mark.gpu

DEV = "cuda"

CASES = [
    # shape, groups, channels_last
    ((2, 64, 8, 8), 32, False),
    ((2, 64, 8, 8), 32, True),
    ((3, 48, 5, 7), 4, True),  # C = 48: a tail per channels-last row
    ((2, 32, 300), 8, False),  # 1-D, S = 300
    ((1, 16, 3, 4, 5), 4, False),  # 3-D
    ((2, 8, 1, 1), 8, False),  # one element per group
    ((4, 256, 32, 32), 32, True),  # the CIFAR-10 UNet's widest norm, channels-last
    ((4, 256, 32, 32), 32, False),
    ((1, 520, 2, 2), 2, True),  # 260 channels per group: the channels-last backward's wide-group loop
]


def _cuda(*tensors):
    return [None if t is None else t.to(DEV) for t in tensors]


@pytest.mark.parametrize("shape, G, cl", CASES)
@pytest.mark.parametrize(
    "silu, params, film", [(True, True, True), (False, True, False), (True, False, True)]
)
def test_forward_f32_matches_float64(shape, G, cl, silu, params, film):
    x, G, w, b, sc, sh = make(shape, G, params=params, film=film, channels_last=cl)
    x, w, b, sc, sh = _cuda(x, w, b, sc, sh)
    out, mean, rstd = torch.ops.iddpm.group_norm_act(x, G, w, b, sc, sh, 1e-5, silu)
    ref = oracle(x, G, w, b, sc, sh, 1e-5, silu)
    assert out.device.type == "cuda" and out.dtype == x.dtype and out.shape == x.shape
    assert out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    assert max_err(out, ref) <= 1e-5 * ref.abs().max().item()
    xg = x.double().reshape(x.shape[0], G, -1)
    torch.testing.assert_close(mean.double(), xg.mean(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape, G, cl", [c for c in CASES if c[0] != (2, 8, 1, 1)])  # that one: dx = 0
def test_backward_f32_matches_float64(shape, G, cl):
    x, G, w, b, sc, sh = make(shape, G, channels_last=cl, seed=4)
    xs = [t.detach().requires_grad_() for t in _cuda(x, w, b, sc, sh)]
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(DEV)
    grads = torch.autograd.grad(GN.group_norm_act(xs[0], G, *xs[1:]), xs, dy)
    x64 = [t.detach().double().requires_grad_() for t in xs]
    refs = torch.autograd.grad(oracle(x64[0], G, *x64[1:]), x64, dy.double())
    for name, a, r in zip(("x", "weight", "bias", "scale", "shift"), grads, refs):
        assert a.dtype == torch.float32 and a.shape == r.shape and a.device.type == "cuda", name
        assert max_err(a, r) <= 1e-5 * r.abs().max().item(), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cl", [False, True])
def test_low_precision_two_x_rule(dtype, cl):
    x, G, w, b, sc, sh = make((2, 64, 16, 16), 32, dtype=dtype, channels_last=cl)
    x, w, b, sc, sh = _cuda(x, w, b, sc.to(dtype), sh.to(dtype))
    ours = GN.group_norm_act(x, G, w, b, sc, sh)
    eager = GN.group_norm_act_reference(x, G, w, b, sc, sh)
    assert ours.dtype == dtype
    check_two_x_rule(ours, eager, oracle(x, G, w, b, sc, sh), f"forward {dtype}")
    xs = [t.detach().requires_grad_() for t in (x, w, b, sc, sh)]
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEV)
    grads_ours = torch.autograd.grad(GN.group_norm_act(xs[0], G, *xs[1:]), xs, dy)
    grads_eager = torch.autograd.grad(GN.group_norm_act_reference(xs[0], G, *xs[1:]), xs, dy)
    x64 = [t.detach().double().requires_grad_() for t in xs]
    grads_ref = torch.autograd.grad(oracle(x64[0], G, *x64[1:]), x64, dy.double())
    for name, a, e, r in zip(("x", "weight", "bias", "scale", "shift"), grads_ours, grads_eager, grads_ref):
        check_two_x_rule(a, e, r, f"grad {name} {dtype}")


def test_cuda_and_cpu_kernels_agree():
    x, G, w, b, sc, sh = make((2, 64, 8, 8), 32, channels_last=True, seed=7)
    cpu = GN.group_norm_act(x, G, w, b, sc, sh)
    gpu = GN.group_norm_act(*_cuda(x), G, *_cuda(w, b, sc, sh))
    assert max_err(gpu.cpu(), cpu) <= 1e-5 * cpu.abs().max().item()


@pytest.mark.parametrize("channels_last", [False, True])
def test_unet_with_fused_norms_matches_the_reference_ops(channels_last):
    torch.manual_seed(0)
    model = randomize_(UNetModel(**tiny_kwargs())).to(DEV).eval()
    x, t = torch.randn(3, 3, 16, 16, device=DEV), torch.tensor([0, 5, 9], device=DEV)
    if channels_last:
        model, x = (
            model.to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
        )
    with torch.no_grad(), no_tf32():  # (TF32 convs would amplify the norms' last-bit differences)
        with inn.groupnorm_impl("torch"):
            ref = model(x, t)
        with inn.groupnorm_impl("fused"):
            ours = model(x, t)
    assert max_err(ours, ref) <= 1e-5 * ref.abs().max().item()


def test_arguments_on_two_devices_are_clear_errors():
    x, G, w, b, sc, sh = make((2, 8, 4, 4), 2)
    with pytest.raises(ValueError, match="weight"):
        torch.ops.iddpm.group_norm_act(x.to(DEV), G, w, b.to(DEV), sc.to(DEV), sh.to(DEV), 1e-5, True)
    with pytest.raises(ValueError, match="scale"):
        torch.ops.iddpm.group_norm_act(x.to(DEV), G, w.to(DEV), b.to(DEV), sc, sh.to(DEV), 1e-5, True)
