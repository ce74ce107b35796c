"""The UNet with the fused GroupNorm + scale-shift + SiLU op (iddpm_ext.nn groupnorm impl "fused")
against the same model with torch's GroupNorm ("torch"): fp32 outputs and gradients ≤ 1e-5
relative (with and without use_scale_shift_norm, NCHW and channels-last), bf16 autocast within 2×
of the reference's own autocast error against a float64 oracle, the switch and its errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from helpers.models import randomize_, tiny_kwargs
from iddpm_ext import nn as inn
from iddpm_ext.nn import groupnorm_impl, set_groupnorm_impl, use_fused_groupnorm
from iddpm_ext.ops.attention import attention_impl
from iddpm_ext.unet import UNetModel


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _model(seed=0, **overrides):
    kw = tiny_kwargs(out_channels=6, num_heads=2, **overrides)
    return randomize_(UNetModel(**kw), seed)


def _inputs(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g)


@pytest.mark.slow  # two training steps of the tiny UNet (~3-7 s on 2 cores with other jobs)
@pytest.mark.parametrize("scale_shift, channels_last", [(True, False), (False, True)])
def test_fp32_outputs_and_gradients_match_torch_groupnorm(scale_shift, channels_last):
    model = _model(use_scale_shift_norm=scale_shift).train()
    if channels_last:
        model.channels_last = True  # the torso in NHWC (what to_inference(channels_last=True) sets)
    x, t = _inputs()
    results = {}
    for impl in ("torch", "fused"):
        m = copy.deepcopy(model)
        with groupnorm_impl(impl), attention_impl("einsum"):
            out = m(x, t)
            loss = F.mse_loss(out, torch.ones_like(out))
            loss.backward()
        results[impl] = (out.detach(), loss.item(), {n: p.grad.clone() for n, p in m.named_parameters()})
    (o_t, l_t, g_t), (o_f, l_f, g_f) = results["torch"], results["fused"]
    assert _rel(o_f, o_t) <= 1e-5
    assert abs(l_f - l_t) <= 1e-5 * abs(l_t)
    assert g_f.keys() == g_t.keys()
    flat_f, flat_t = (torch.cat([g[n].flatten() for n in g_t]) for g in (g_f, g_t))
    assert _rel(flat_f, flat_t) <= 1e-5
    for name in g_t:  # each parameter too, but those whose gradient is zero up to rounding (a conv
        # bias right before a GroupNorm with one channel per group) only against the total norm
        scale = max(g_t[name].norm().item(), 1e-2 * flat_t.norm().item())
        assert (g_f[name] - g_t[name]).norm().item() <= 1e-5 * scale, name


def test_fused_sites_are_used_and_state_dict_is_unchanged(monkeypatch):
    model = _model(use_scale_shift_norm=True).eval()
    keys = list(model.state_dict())
    calls = []
    real = inn._group_norm_ops.group_norm_act
    monkeypatch.setattr(inn._group_norm_ops, "group_norm_act", lambda *a: calls.append(a[-1]) or real(*a))
    x, t = _inputs()
    with torch.no_grad(), groupnorm_impl("fused"):
        model(x, t)
    # tiny model: 4 ResBlocks in, 2 middle, 6 out (2 norm sites each, SiLU), 3 attention norms
    # (no SiLU) and the output head.
    n_res = sum(type(m).__name__ == "ResBlock" for m in model.modules())
    n_attn = sum(type(m).__name__ == "AttentionBlock" for m in model.modules())
    assert calls.count(True) == 2 * n_res + 1 and calls.count(False) == n_attn
    assert list(model.state_dict()) == keys


def test_bf16_autocast_within_twice_the_reference_error():
    model = _model(seed=2, use_scale_shift_norm=True).eval()
    x, t = _inputs(seed=3)
    with torch.no_grad(), attention_impl("einsum"), groupnorm_impl("torch"):
        oracle = copy.deepcopy(model).double()(x.double(), t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = model(x, t).float()
    with torch.no_grad(), attention_impl("einsum"), groupnorm_impl("fused"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x, t).float()
    ref_err, err = _rel(ref, oracle), _rel(got, oracle)
    assert 0 < ref_err and err <= 2 * ref_err, (err, ref_err)


def test_switch_env_and_auto(monkeypatch):
    previous = set_groupnorm_impl("fused")
    try:
        assert inn.get_groupnorm_impl() == "fused"
        assert use_fused_groupnorm(torch.ones(1, 32, 2, 2))
        with groupnorm_impl("torch"):
            assert not use_fused_groupnorm(torch.ones(1, 32, 2, 2))
        with groupnorm_impl("auto"):
            for dtype in (torch.float32, torch.bfloat16, torch.float64):
                expected = dtype in inn._AUTO_FUSED["cpu"]
                assert use_fused_groupnorm(torch.ones(1, 32, 2, 2, dtype=dtype)) == expected
            assert not use_fused_groupnorm(torch.ones(1, 32, 2, 2, device="meta"))
        with pytest.raises(ValueError, match="has no kernel for device meta"):
            use_fused_groupnorm(torch.ones(1, 32, 2, 2, device="meta"))
    finally:
        set_groupnorm_impl(previous)
    monkeypatch.setenv("IDDPM_GROUPNORM_IMPL", "Fused")
    assert inn._groupnorm_impl_from_env() == "fused"
