"""Schedule quantities of a Gaussian diffusion, computed once in float64.

``schedule_arrays`` follows the reference's formulas exactly (same operations, same
order), so that the float32 values the library uses are the reference's values.
``stack_coef_table`` lays them out as one [T, K] table, a row per timestep, for the
single-gather lookups of the eager path and the fused kernels (columns in COEF_NAMES);
``step_coefs`` gathers the rows of a batch of timesteps as a :class:`StepCoefs`.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import ops
from ..errors import ArgumentError

# Column order of the [T, K] coefficient table. Append only: kernels index by position.
COEF_NAMES = (
    "sqrt_alphas_cumprod",  # √ᾱ_t
    "sqrt_one_minus_alphas_cumprod",  # √(1-ᾱ_t)
    "log_one_minus_alphas_cumprod",  # log(1-ᾱ_t)
    "sqrt_recip_alphas_cumprod",  # 1/√ᾱ_t
    "sqrt_recipm1_alphas_cumprod",  # √(1/ᾱ_t - 1)
    "posterior_variance",  # β̃_t = β_t(1-ᾱ_{t-1})/(1-ᾱ_t)
    "posterior_log_variance_clipped",  # log β̃_t, with β̃_1 at t = 0
    "posterior_mean_coef1",  # β_t√ᾱ_{t-1}/(1-ᾱ_t)
    "posterior_mean_coef2",  # (1-ᾱ_{t-1})√α_t/(1-ᾱ_t)
    "log_betas",  # log β_t
    "fixed_large_variance",  # β_t, with β̃_1 at t = 0
    "fixed_large_log_variance",  # its log
    "alphas_cumprod",  # ᾱ_t
    "alphas_cumprod_prev",  # ᾱ_{t-1} (1 at t = 0)
    "alphas_cumprod_next",  # ᾱ_{t+1} (0 at t = T-1)
    "one_minus_alphas_cumprod",  # 1-ᾱ_t
    "recip_posterior_mean_coef1",  # 1/coef1
    "posterior_mean_coef2_over_coef1",  # coef2/coef1
    "betas",  # β_t
)
COEF_INDEX = {name: i for i, name in enumerate(COEF_NAMES)}


def cached(cache: dict, key, make):
    """``cache[key]``, made by ``make()`` on first use and kept — except while torch.export
    traces: a value made then is a FakeTensor, which later eager calls must not read, so it is
    returned without being kept (a value cached before is used as a constant). Under
    torch.compile (dynamo) the store is kept: dynamo replays it after the graph with the real
    value, and the table is then a constant of later compiled calls instead of being rebuilt
    (a host-to-device copy per call) in every one."""
    value = cache.get(key)
    if value is None:
        value = make()
        if not _exporting():
            cache[key] = value
    return value


def _exporting() -> bool:
    """Whether torch.export traces. Read from torch's flag itself where it has one: torch 2.11's dynamo
    (the GPU machines' torch) answers ``torch.compiler.is_exporting()`` with True under
    torch.compile as well, and every compiled call would then rebuild the tables."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return flag if isinstance(flag, bool) else torch.compiler.is_exporting()


def check_betas(betas) -> np.ndarray:
    """betas as a float64 [T] array with 0 < β <= 1, or an ArgumentError saying what is wrong."""
    try:
        arr = np.array(betas, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ArgumentError(
            f"betas: expected a 1-D array of floats, got {type(betas).__name__} ({exc})"
        ) from None
    if arr.ndim != 1 or arr.shape[0] < 1:
        raise ArgumentError(f"betas: expected a non-empty 1-D array, got shape {arr.shape}")
    bad = ~(np.isfinite(arr) & (arr > 0) & (arr <= 1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ArgumentError(f"betas: expected every value in (0, 1], got betas[{i}] = {arr[i]!r}")
    return arr


def schedule_arrays(betas) -> dict:
    """Every per-timestep quantity, float64 [T], named as the reference names them."""
    betas = check_betas(betas)
    T = betas.shape[0]
    a = {"betas": betas}
    alphas = 1.0 - betas
    a["alphas_cumprod"] = np.cumprod(alphas, axis=0)
    a["alphas_cumprod_prev"] = np.append(1.0, a["alphas_cumprod"][:-1])
    a["alphas_cumprod_next"] = np.append(a["alphas_cumprod"][1:], 0.0)

    ac = a["alphas_cumprod"]
    a["sqrt_alphas_cumprod"] = np.sqrt(ac)
    a["sqrt_one_minus_alphas_cumprod"] = np.sqrt(1.0 - ac)
    a["log_one_minus_alphas_cumprod"] = np.log(1.0 - ac)
    a["sqrt_recip_alphas_cumprod"] = np.sqrt(1.0 / ac)
    a["sqrt_recipm1_alphas_cumprod"] = np.sqrt(1.0 / ac - 1)
    a["one_minus_alphas_cumprod"] = 1.0 - ac

    # Posterior q(x_{t-1} | x_t, x_0).
    a["posterior_variance"] = betas * (1.0 - a["alphas_cumprod_prev"]) / (1.0 - ac)
    # β̃_0 = 0: the log is clipped by using β̃_1 at t = 0. A one-step process has no
    # β̃_1 (the reference fails there); it uses β_0.
    first = a["posterior_variance"][1] if T > 1 else betas[0]
    a["posterior_log_variance_clipped"] = np.log(np.append(first, a["posterior_variance"][1:]))
    a["posterior_mean_coef1"] = betas * np.sqrt(a["alphas_cumprod_prev"]) / (1.0 - ac)
    a["posterior_mean_coef2"] = (1.0 - a["alphas_cumprod_prev"]) * np.sqrt(alphas) / (1.0 - ac)
    a["recip_posterior_mean_coef1"] = 1.0 / a["posterior_mean_coef1"]
    a["posterior_mean_coef2_over_coef1"] = a["posterior_mean_coef2"] / a["posterior_mean_coef1"]

    # Variances of the reverse process.
    a["log_betas"] = np.log(betas)
    a["fixed_large_variance"] = np.append(first, betas[1:])
    a["fixed_large_log_variance"] = np.log(np.append(first, betas[1:]))
    return a


def stack_coef_table(arrays: dict) -> np.ndarray:
    """The [T, K] float64 table whose column k is ``arrays[COEF_NAMES[k]]``."""
    return np.stack([np.asarray(arrays[n], dtype=np.float64) for n in COEF_NAMES], axis=1)


def _broadcast_shape(batch: int, ndim: int) -> tuple:
    return (batch,) + (1,) * (ndim - 1)


class StepCoefs:
    """The schedule coefficients of one batch of timesteps, each as [N, 1, ..., 1].
    One read-only property per column of the coefficient table (COEF_NAMES)."""

    __slots__ = ("_rows", "_shape")

    def __init__(self, rows: torch.Tensor, ndim: int):
        self._rows = rows  # [N, K] float32
        self._shape = _broadcast_shape(rows.shape[0], ndim)

    def column(self, k: int) -> torch.Tensor:
        return self._rows[:, k].view(self._shape)


def _coef_property(k: int, name: str):
    return property(lambda self: self.column(k), doc=f"column {k} of the table: {name}")


for _name, _k in COEF_INDEX.items():
    setattr(StepCoefs, _name, _coef_property(_k, _name))
del _name, _k


def step_coefs(table: torch.Tensor, t: torch.Tensor, ndim: int) -> StepCoefs:
    """The rows of ``table`` [T, K] for timesteps ``t`` [N], broadcastable against [N, ...]
    tensors of ``ndim`` dims: one gather (``iddpm::gather_coefs`` where the extension has a
    kernel for t's device), no host sync."""
    if ops.has_kernel(t.device) and t.dtype in (torch.int64, torch.int32):
        rows = ops.gather_coefs(table, t)
    else:
        rows = table[t.long()]
    return StepCoefs(rows, ndim)
