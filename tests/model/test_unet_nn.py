"""iddpm_ext.nn: timestep embedding, GroupNorm32 in fp32, helpers; autocast forward."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers.models import randomize_, tiny_kwargs
from helpers.oracles import rel_err
from iddpm_ext import nn as inn
from iddpm_ext.unet import UNetModel


# ---------------------------------------------------------------------------------
# Timestep embedding
# ---------------------------------------------------------------------------------
def _embedding_closed_form(t, dim, max_period=10000.0):
    """[cos(t f_i) for i < half] + [sin(t f_i) for i < half] (+ a 0 if dim is odd),
    f_i = max_period^(-i/half), in float64."""
    half = dim // 2
    rows = []
    for tv in t:
        f = [max_period ** (-i / half) for i in range(half)]
        row = [math.cos(tv * fi) for fi in f] + [math.sin(tv * fi) for fi in f]
        rows.append(row + [0.0] * (dim % 2))
    return np.array(rows)


@pytest.mark.parametrize("dim", [2, 7, 32, 128])
def test_timestep_embedding_closed_form(dim):
    t = [0.0, 1.0, 2.5, 17.0, 999.0]
    emb = inn.timestep_embedding(torch.tensor(t), dim)
    assert emb.shape == (5, dim) and emb.dtype == torch.float32
    # fp32 frequencies times t ≤ 999 lose ~1e-4 of the angle at most.
    np.testing.assert_allclose(emb.numpy(), _embedding_closed_form(t, dim), atol=2e-4, rtol=0)


@pytest.mark.parametrize("dim", [7, 96, 160, 192])
def test_timestep_embedding_rounds_in_the_reference_order(dim):
    """Frequencies exp(-(ln P · i) / half) in float32, multiplied out in that order (the
    reference's): bit for bit, also where half is not a power of two (i / half first, as
    before, differed by up to 6e-5 at dims 96-192)."""
    t = torch.arange(1000)
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    expected = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    got = inn.timestep_embedding(t, dim)
    assert torch.equal(got[:, : 2 * half], expected)


def test_timestep_embedding_layout():
    emb = inn.timestep_embedding(torch.tensor([3, 0]), 9, max_period=100)
    torch.testing.assert_close(emb[0, 0], torch.cos(torch.tensor(3.0)))  # f_0 = 1, cos first
    torch.testing.assert_close(emb[0, 4], torch.sin(torch.tensor(3.0)))
    assert torch.equal(emb[:, 8], torch.zeros(2))  # odd dim: zero column last
    assert torch.equal(emb[1, :4], torch.ones(4)) and torch.equal(emb[1, 4:], torch.zeros(5))
    # max_period sets the lowest frequency: f_{half-1} = max_period^(-(half-1)/half)
    torch.testing.assert_close(emb[0, 3], torch.cos(torch.tensor(3.0 * 100 ** (-3 / 4))))
    with pytest.raises(ValueError, match="timesteps"):
        inn.timestep_embedding(torch.zeros(2, 1), 8)


# ---------------------------------------------------------------------------------
# GroupNorm32
# ---------------------------------------------------------------------------------
def _gn(seed=0, ch=64):
    gn = inn.normalization(ch)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        gn.weight.copy_(1 + 0.1 * torch.randn(ch, generator=gen))
        gn.bias.copy_(0.1 * torch.randn(ch, generator=gen))
    x = 3 + 2 * torch.randn(4, ch, 8, 8, generator=gen)
    return gn, x


@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_groupnorm32_bf16_input_is_normalised_in_fp32(impl):
    gn, x = _gn()
    xb = x.bfloat16()
    expected = F.group_norm(xb.float(), 32, gn.weight, gn.bias, gn.eps).bfloat16()
    with inn.groupnorm_impl(impl):
        out = gn(xb)
    assert out.dtype == torch.bfloat16
    if impl == "torch":  # the fp32 copy path: exactly the reference's computation
        assert torch.equal(out, expected)
    else:  # torch's mixed-dtype kernel (fp32 statistics): at most one bf16 rounding step away
        torch.testing.assert_close(out, expected, rtol=2**-7, atol=1e-4)
    # and not in bf16 arithmetic: a bf16 group_norm gives a different result
    naive = F.group_norm(xb, 32, gn.weight.bfloat16(), gn.bias.bfloat16(), gn.eps)
    assert not torch.equal(out, naive)


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_groupnorm32_under_autocast(in_dtype):
    gn, x = _gn(1)
    x = x.to(in_dtype)
    expected = F.group_norm(x.float(), 32, gn.weight, gn.bias, gn.eps).to(in_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16), inn.groupnorm_impl("torch"):
        out = gn(x)
    assert out.dtype == in_dtype
    assert torch.equal(out, expected)
    with torch.autocast("cpu", dtype=torch.bfloat16), inn.groupnorm_impl("auto"):
        torch.testing.assert_close(gn(x), expected, rtol=2**-7, atol=1e-4)


def test_normalization_needs_multiple_of_32():
    assert isinstance(inn.normalization(96), inn.GroupNorm32)
    with pytest.raises(ValueError, match="channels"):
        inn.normalization(48)


# ---------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------
def test_layer_factories():
    assert isinstance(inn.conv_nd(1, 4, 8, 3), torch.nn.Conv1d)
    assert isinstance(inn.conv_nd(3, 4, 8, 3), torch.nn.Conv3d)
    assert isinstance(inn.avg_pool_nd(2, 2), torch.nn.AvgPool2d)
    with pytest.raises(ValueError, match="dims"):
        inn.conv_nd(4, 4, 8, 3)
    with pytest.raises(ValueError, match="dims"):
        inn.avg_pool_nd(0, 2)


def test_zero_scale_update_ema():
    lin = inn.zero_module(torch.nn.Linear(3, 2))
    assert torch.equal(lin.weight, torch.zeros(2, 3)) and torch.equal(lin.bias, torch.zeros(2))
    lin2 = torch.nn.Linear(3, 2)
    before = lin2.weight.detach().clone()
    inn.scale_module(lin2, 0.5)
    torch.testing.assert_close(lin2.weight, 0.5 * before)
    target = [torch.full((3,), 1.0), torch.full((2,), -2.0)]
    source = [torch.full((3,), 3.0), torch.full((2,), 2.0)]
    inn.update_ema(target, source, rate=0.9)
    torch.testing.assert_close(target[0], torch.full((3,), 0.9 + 0.3))
    torch.testing.assert_close(target[1], torch.full((2,), -1.8 + 0.2))


def test_checkpoint_helper_same_values_and_grads():
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(3, 4, requires_grad=True)

    def f(a):
        return torch.tanh(lin(a)).sum(0)

    def run(flag):
        out = inn.checkpoint(f, (x,), lin.parameters(), flag)
        return (out, *torch.autograd.grad(out.sum(), (x, lin.weight)))

    ref_out, ref_gx, ref_gw = run(False)
    out, gx, gw = run(True)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(gx, ref_gx)
    torch.testing.assert_close(gw, ref_gw)
    with torch.no_grad():  # no grad: a plain call
        torch.testing.assert_close(inn.checkpoint(f, (x,), None, True), ref_out.detach())


def test_checkpoint_function_reference_call_form():
    """CheckpointFunction.apply(func, n, *inputs, *params), as the reference's code calls it:
    the same values and gradients, and func runs again in backward (it was checkpointed)."""
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(3, 4, requires_grad=True)
    calls = []

    def f(a):
        calls.append(1)
        return torch.tanh(lin(a)).sum(0)

    out = inn.CheckpointFunction.apply(f, 1, x, *lin.parameters())
    assert len(calls) == 1
    gx, gw = torch.autograd.grad(out.sum(), (x, lin.weight))
    assert len(calls) == 2  # recomputed for the backward
    ref = f(x)
    torch.testing.assert_close(out, ref)
    ref_gx, ref_gw = torch.autograd.grad(ref.sum(), (x, lin.weight))
    torch.testing.assert_close(gx, ref_gx)
    torch.testing.assert_close(gw, ref_gw)


def test_mean_flat_reexported():
    torch.testing.assert_close(inn.mean_flat(torch.arange(6.0).reshape(2, 3)), torch.tensor([1.0, 4.0]))


# ---------------------------------------------------------------------------------
# Mixed precision: autocast bf16
# ---------------------------------------------------------------------------------
def test_unet_autocast_bf16_close_to_fp32():
    model = randomize_(UNetModel(**tiny_kwargs(num_classes=4, use_scale_shift_norm=True, num_heads=4))).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    t, y = torch.tensor([10, 700]), torch.tensor([1, 3])
    ref = model(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    assert out.dtype == torch.bfloat16  # the last conv ran in bf16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    err = rel_err(out.float(), ref)
    # bf16 keeps 8 bits of mantissa (unit roundoff 2^-9 ≈ 2e-3); a dozen layers deep the
    # relative error stays at the percent level, and it must not be zero (bf16 was used).
    assert 0 < err < 3e-2
    # Casting the whole model to bf16 (no fp32 statistics anywhere) is not more accurate.
    model_bf16 = copy.deepcopy(model).bfloat16()
    err_bf16 = rel_err(model_bf16(x.bfloat16(), t, y).float(), ref)
    assert err <= 2 * err_bf16


def test_unet_autocast_bf16_training_step():
    model = randomize_(UNetModel(**tiny_kwargs(use_scale_shift_norm=True)))
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([1, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, t).float().square().mean()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    model.zero_grad()
    model(x, t).float().square().mean().backward()
    ref = torch.cat([p.grad.flatten() for p in model.parameters()])
    got = torch.cat([g.flatten() for g in grads])
    assert rel_err(got, ref) < 5e-2
