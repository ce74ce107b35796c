"""Cases of the fused-step tests (tests/ops/test_step*.py, tests/core/test_step_parity.py):
diffusions, inputs, one step through the public methods, and the parity rule. The oracles
(float64 step, numpy Philox) are in :mod:`helpers.oracles`."""

from __future__ import annotations

import torch

from helpers.oracles import max_err
from iddpm_ext import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    SpacedDiffusion,
    get_named_beta_schedule,
    ops,
    space_timesteps,
)


def make_diffusion(
    mean_type=ModelMeanType.EPSILON,
    var_type=ModelVarType.LEARNED_RANGE,
    steps=100,
    schedule="linear",
    respacing=None,
):
    betas = get_named_beta_schedule(schedule, steps)
    kwargs = dict(betas=betas, model_mean_type=mean_type, model_var_type=var_type, loss_type=LossType.MSE)
    if respacing is not None:
        return SpacedDiffusion(space_timesteps(steps, respacing), **kwargs)
    return GaussianDiffusion(**kwargs)


def make_inputs(d, shape, seed=0, x_dtype=torch.float32, mo_dtype=torch.float32):
    """x, model output and noise for ``d``: float32 values rounded to the given dtypes
    (noise to x's dtype). The model's mean output is N(0, 1.5²) (so clipping matters),
    its variance output v in [-1, 1] (learned range) or log σ² in [-9, 0] (learned)."""
    g = torch.Generator().manual_seed(seed)
    B, C = shape[:2]
    x = torch.randn(shape, generator=g)
    mean = 1.5 * torch.randn(shape, generator=g)
    if d.model_var_type == ModelVarType.LEARNED_RANGE:
        mo = torch.cat([mean, torch.rand(shape, generator=g) * 2 - 1], dim=1)
    elif d.model_var_type == ModelVarType.LEARNED:
        mo = torch.cat([mean, -9 * torch.rand(shape, generator=g)], dim=1)
    else:
        mo = mean
    noise = torch.randn(shape, generator=g)
    return x.to(x_dtype), mo.to(mo_dtype), noise.to(x_dtype)


def const_model(model_output):
    return lambda x, t, **kwargs: model_output


def run_step(d, rule, x, mo, t, clip=True, eta=0.0, noise=None, fused=True):
    """One step through the diffusion's public method, fused or eager: the sample dict."""
    old = d.use_fused
    d.use_fused = fused
    try:
        model = const_model(mo)
        if rule == "ancestral":
            return d.p_sample(model, x, t, clip_denoised=clip, noise=noise)
        if rule == "ddim":
            return d.ddim_sample(model, x, t, clip_denoised=clip, eta=eta, noise=noise)
        return d.ddim_reverse_sample(model, x, t, clip_denoised=clip)
    finally:
        d.use_fused = old


def assert_parity(fused, eager, truth=None, rel=1e-5):
    """fp32 parity with the eager path: within `rel` of it, measured against the output's
    scale. Where the float32 formula itself is ill-conditioned (e.g. sqrt(1 - ᾱ_prev - σ²)
    with η = 1 and large respaced jumps), 1-ulp differences of libm/SLEEF functions grow, so
    the bound is widened to twice the eager path's own error against ``truth``
    (:func:`reference_step64`), when given; the fused result must then also be at least
    as close to ``truth`` as that bound."""
    assert fused.shape == eager.shape
    if eager.numel() == 0:
        return
    scale = max(1.0, eager.abs().max().item())
    allowed = rel * scale
    if truth is not None:
        allowed = max(allowed, 2 * max_err(eager, truth))
        assert max_err(fused, truth) <= allowed
    torch.testing.assert_close(fused.float(), eager.float(), rtol=rel, atol=allowed)


def noise_probe(d_steps=100, shape=(4, 3, 8, 8), t_value=5, device="cpu", x_dtype=torch.float32):
    """Arguments of an ancestral step whose output is exactly its noise: x = 0, x0 model with
    output 0, learned log σ² = 0, no clipping -> x_{t-1} = 0 + 1·z (t != 0)."""
    d = make_diffusion(ModelMeanType.START_X, ModelVarType.LEARNED, steps=d_steps)
    B, C = shape[:2]
    x = torch.zeros(shape, device=device, dtype=x_dtype)
    mo = torch.zeros((B, 2 * C, *shape[2:]), device=device, dtype=x_dtype)
    t = torch.full((B,), t_value, device=device, dtype=torch.long)
    return d, x, mo, t


def probe_noise(d, x, mo, t, **kwargs):
    """The noise the kernel drew for the arguments of :func:`noise_probe`: the sample of a step
    whose output is 1·z (``kwargs``: noise source, generator, sample_index)."""
    table = d.coef_table(x.device)
    sample, _ = ops.p_sample_step(x, mo, t, table, d.model_mean_type, d.model_var_type, clip_denoised=False,
                                  return_pred_xstart=False, **kwargs)  # fmt: skip
    return sample
