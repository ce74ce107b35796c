"""Shared helpers of the fused-step tests (tests/test_step_*.py): diffusions, inputs, the
eager reference, a numpy Philox4x32-10 + Box–Muller, and the comparison rules."""

from __future__ import annotations

import numpy as np
import torch

from iddpm_ext import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    SpacedDiffusion,
    get_named_beta_schedule,
    space_timesteps,
)
from iddpm_ext.core.tables import COEF_INDEX

LEARNED = (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)


def make_diffusion(mean_type=ModelMeanType.EPSILON, var_type=ModelVarType.LEARNED_RANGE,
                   steps=100, schedule="linear", respacing=None):
    betas = get_named_beta_schedule(schedule, steps)
    kwargs = dict(betas=betas, model_mean_type=mean_type, model_var_type=var_type,
                  loss_type=LossType.MSE)
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


def reference_step64(d, rule, x, mo, t, clip=True, eta=0.0, noise=None):
    """The paper's update in float64 from the diffusion's float32 coefficient table: an
    oracle independent of both implementations (Ho et al. eq. 11/7, Nichol & Dhariwal
    eq. 15, Song et al. eq. 12)."""
    table = d.coef_table("cpu").double()[t.cpu().long()]
    shape = (-1,) + (1,) * (x.dim() - 1)

    def col(name):
        return table[:, COEF_INDEX[name]].view(shape)

    x, mo = x.double().cpu(), mo.double().cpu()
    C = x.shape[1]
    out, v = (mo[:, :C], mo[:, C:]) if d.model_var_type in LEARNED else (mo, None)
    mt = d.model_mean_type
    if mt == ModelMeanType.EPSILON:
        x0 = x / col("alphas_cumprod").sqrt() - (1 / col("alphas_cumprod") - 1).sqrt() * out
    elif mt == ModelMeanType.START_X:
        x0 = out
    else:
        x0 = (out - col("posterior_mean_coef2") * x) / col("posterior_mean_coef1")
    if clip:
        x0 = x0.clamp(-1, 1)
    mask = (t.cpu() != 0).double().view(shape)
    if rule == "ancestral":
        mean = out if mt == ModelMeanType.PREVIOUS_X else (
            col("posterior_mean_coef1") * x0 + col("posterior_mean_coef2") * x)
        vt = d.model_var_type
        if vt == ModelVarType.LEARNED:
            log_var = v
        elif vt == ModelVarType.LEARNED_RANGE:
            frac = (v + 1) / 2
            log_var = frac * col("log_betas") + (1 - frac) * col("posterior_log_variance_clipped")
        elif vt == ModelVarType.FIXED_LARGE:
            log_var = col("fixed_large_log_variance")
        else:
            log_var = col("posterior_log_variance_clipped")
        sample = mean + mask * torch.exp(0.5 * log_var) * noise.double().cpu()
        return {"sample": sample, "pred_xstart": x0}
    eps = (x / col("alphas_cumprod").sqrt() - x0) / (1 / col("alphas_cumprod") - 1).sqrt()
    if rule == "ddim":
        ab, abp = col("alphas_cumprod"), col("alphas_cumprod_prev")
        sigma = eta * ((1 - abp) / (1 - ab)).sqrt() * (1 - ab / abp).sqrt()
        sample = x0 * abp.sqrt() + (1 - abp - sigma**2).clamp(min=0).sqrt() * eps
        if noise is not None:
            sample = sample + mask * sigma * noise.double().cpu()
        return {"sample": sample, "pred_xstart": x0}
    abn = col("alphas_cumprod_next")
    return {"sample": x0 * abn.sqrt() + (1 - abn).sqrt() * eps, "pred_xstart": x0}


def max_err(a, ref):
    if a.numel() == 0:
        return 0.0
    return (a.double() - ref.double()).abs().max().item()


# ---- Philox4x32-10 and Box–Muller in numpy (the algorithm of csrc/common/philox.h) ----

_MASK = np.uint64(0xFFFFFFFF)


def philox4x32_10(ctr, key0, key1):
    """Four uint32 arrays (as uint64) -> four uint32 arrays, key (key0, key1)."""
    c = [np.asarray(v, dtype=np.uint64) & _MASK for v in ctr]
    k0, k1 = np.uint64(key0) & _MASK, np.uint64(key1) & _MASK
    for r in range(10):
        if r:
            k0 = (k0 + np.uint64(0x9E3779B9)) & _MASK
            k1 = (k1 + np.uint64(0xBB67AE85)) & _MASK
        p0 = np.uint64(0xD2511F53) * c[0]
        p1 = np.uint64(0xCD9E8D57) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & _MASK, (p0 >> np.uint64(32)) ^ c[3] ^ k1,
             p0 & _MASK]
    return c


def philox_normals(seed: int, offset: int, n: int, first: int = 0) -> np.ndarray:
    """The in-kernel noise of Philox elements first .. first+n-1 for a Philox (seed, offset):
    elements 0..n-1 of x in memory order by default; sample j's C*S elements start at
    first = j*C*S (per-sample streams, docs/step.md)."""
    g0 = first // 4
    groups = np.arange(g0, (first + n + 3) // 4, dtype=np.uint64)
    step = offset // 4
    zeros = np.zeros_like(groups)
    bits = philox4x32_10(
        [zeros + np.uint64(step & 0xFFFFFFFF), zeros + np.uint64(step >> 32), groups & _MASK,
         groups >> np.uint64(32)], seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)

    def box_muller(a, b):
        u1 = ((a >> np.uint64(8)) + np.uint64(1)).astype(np.float32) * np.float32(2.0**-24)
        angle = (b >> np.uint64(8)).astype(np.float32) * np.float32(2 * np.pi * 2.0**-24)
        angle = angle - np.float32(np.pi)
        r = np.sqrt(np.float32(-2.0) * np.log(u1))
        return r * np.cos(angle), r * np.sin(angle)

    z0, z1 = box_muller(bits[0], bits[1])
    z2, z3 = box_muller(bits[2], bits[3])
    return np.stack([z0, z1, z2, z3], axis=1).ravel()[first - 4 * g0:][:n]


def cpu_generator_key(generator: torch.Generator) -> int:
    """The Philox key the CPU kernel takes from ``generator`` (its next random64 draw),
    read from a copy so that ``generator`` does not move."""
    copy = torch.Generator()
    copy.set_state(generator.get_state())
    value = torch.empty((), dtype=torch.int64).random_(-(2**63), None, generator=copy).item()
    return value & (2**64 - 1)


def noise_probe(d_steps=100, shape=(4, 3, 8, 8), t_value=5, device="cpu", x_dtype=torch.float32):
    """Arguments of an ancestral step whose output is exactly its noise: x = 0, x0 model with
    output 0, learned log σ² = 0, no clipping -> x_{t-1} = 0 + 1·z (t != 0)."""
    d = make_diffusion(ModelMeanType.START_X, ModelVarType.LEARNED, steps=d_steps)
    B, C = shape[:2]
    x = torch.zeros(shape, device=device, dtype=x_dtype)
    mo = torch.zeros((B, 2 * C, *shape[2:]), device=device, dtype=x_dtype)
    t = torch.full((B,), t_value, device=device, dtype=torch.long)
    return d, x, mo, t
