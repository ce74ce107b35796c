"""The tests' oracles, independent of both implementations (eager and fused): the paper's
sampling step in float64, the attention math in float64, the in-kernel noise (Philox4x32-10
+ Box–Muller) in numpy, and the error measures and the low-precision rule."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from iddpm_ext import ModelMeanType, ModelVarType
from iddpm_ext.core.tables import COEF_INDEX

LEARNED = (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference, in float64 (0 for empty tensors)."""
    if a.numel() == 0:
        return 0.0
    return (a.double() - ref.double()).abs().max().item()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a - b‖ / ‖b‖ in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


# ---- the sampling step ----


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
        mean = (
            out
            if mt == ModelMeanType.PREVIOUS_X
            else (col("posterior_mean_coef1") * x0 + col("posterior_mean_coef2") * x)
        )
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
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & _MASK, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & _MASK]
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
        [
            zeros + np.uint64(step & 0xFFFFFFFF),
            zeros + np.uint64(step >> 32),
            groups & _MASK,
            groups >> np.uint64(32),
        ],
        seed & 0xFFFFFFFF,
        (seed >> 32) & 0xFFFFFFFF,
    )

    def box_muller(a, b):
        u1 = ((a >> np.uint64(8)) + np.uint64(1)).astype(np.float32) * np.float32(2.0**-24)
        angle = (b >> np.uint64(8)).astype(np.float32) * np.float32(2 * np.pi * 2.0**-24)
        angle = angle - np.float32(np.pi)
        r = np.sqrt(np.float32(-2.0) * np.log(u1))
        return r * np.cos(angle), r * np.sin(angle)

    z0, z1 = box_muller(bits[0], bits[1])
    z2, z3 = box_muller(bits[2], bits[3])
    return np.stack([z0, z1, z2, z3], axis=1).ravel()[first - 4 * g0 :][:n]


def cpu_generator_key(generator: torch.Generator) -> int:
    """The Philox key the CPU kernel takes from ``generator`` (its next random64 draw),
    read from a copy so that ``generator`` does not move."""
    copy = torch.Generator()
    copy.set_state(generator.get_state())
    value = torch.empty((), dtype=torch.int64).random_(-(2**63), None, generator=copy).item()
    return value & (2**64 - 1)


# ---- attention ----


def attention_math_f64(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """softmax(qᵀk / √C) v per head, all in float64 (unlike the reference's einsum, whose
    softmax runs in float32). qkv: [B, 3·H·C, T] -> [B, H·C, T] float64, differentiable."""
    B, width, T = qkv.shape
    C = width // (3 * num_heads)
    q, k, v = qkv.double().reshape(B * num_heads, 3 * C, T).split(C, dim=1)
    w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(C), dim=-1)
    return torch.einsum("bts,bcs->bct", w, v).reshape(B, num_heads * C, T)


def check_two_x_rule(ours, eager, ref, what: str, floor: float = 0.0):
    """The low-precision rule: our error against the float reference is at most twice the error
    of the same math done eagerly in that precision (plus `floor` for exact-zero cases)."""
    e_ours, e_eager = max_err(ours, ref), max_err(eager, ref)
    assert e_ours <= 2 * e_eager + floor, (
        f"{what}: error {e_ours:.3g} of the fused op exceeds 2x the eager error {e_eager:.3g}"
    )
    return e_ours, e_eager


@contextlib.contextmanager
def no_tf32():
    """Plain fp32 CUDA convolutions and matmuls inside (torch's cuDNN convolutions take TF32 by
    default, whose 10-bit operands amplify last-bit differences ~100× past fp32 bounds)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
