"""iddpm::p_sample_step, iddpm::ddim_step, iddpm::ddim_reverse_step — fused reverse-diffusion
steps (csrc/ops/step.cpp; docs/step.md).

Each op reads x_t, the model output, the timesteps and the diffusion's coefficient table
once and writes x_{t-1} (x_{t+1} for the reverse DDIM step) and, optionally, pred_x0
once, with all arithmetic in float32 (the formulas of csrc/common/step_math.h, the same
operations in the same order as the eager path of :mod:`iddpm_ext.gaussian_diffusion`).

Shapes: x [B, C, ...] float32/float16/bfloat16; model_output [B, C, ...] or [B, 2C, ...]
(learned variances) in any of those dtypes; t [B] int64/int32; table [T, K] float32
(``GaussianDiffusion.coef_table(device)``). Outputs have x's dtype and layout (channels-
first contiguous, or channels-last when x is channels-last dense; other strides are
made contiguous once).

Noise: ``noise`` (x's shape and dtype) when given; otherwise Philox4x32-10 noise drawn in
the kernel from ``generator`` or the default generator of x's device (on CUDA from the
generator's Philox state, so seeds reproduce and CUDA graph capture works). The in-kernel
noise is numbered per sample: batch item b draws the stream of global sample
``sample_index[b]`` (default b), so with the same generator state a sample's noise does not
depend on the batch it is computed in (docs/step.md, "Per-sample streams").

Timesteps out of [0, T): ValueError on CPU; NaN outputs for that item on CUDA (raising
would need a host sync).
"""

from __future__ import annotations

import torch

from . import checks, loader

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# K of the [T, K] coefficient table the kernels need at least (csrc/common/step_math.h).
MIN_TABLE_COLUMNS = (loader.capabilities()["step"]["cpu"] or {}).get("min_table_columns", 18)
MEAN_TYPES = ("epsilon", "start_x", "previous_x")
VAR_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")


def _type_name(value, arg: str, names: tuple) -> str:
    """An improved-diffusion enum member (ModelMeanType.EPSILON) or its name, lower-case."""
    if value in names:  # the fast path: already one of the op's names
        return value
    name = value if isinstance(value, str) else getattr(value, "name", None)
    if not isinstance(name, str) or name.lower() not in names:
        raise ValueError(f"{arg}: expected one of {names} or the enum member, got {value!r}")
    return name.lower()


def _sample_index(sample_index, x):
    """None, a [B] integer tensor (passed as it is), or an int k: samples k .. k+B-1."""
    if sample_index is None or isinstance(sample_index, torch.Tensor):
        return sample_index
    if isinstance(sample_index, bool) or not isinstance(sample_index, int):
        raise ValueError(
            "sample_index: expected None, an int (the first sample's global index) "
            f"or a [B] integer tensor, got {type(sample_index).__name__}"
        )
    return torch.arange(sample_index, sample_index + x.shape[0], device=x.device)


def _args(x, model_output, t, table, model_mean_type, model_var_type, clip_denoised) -> tuple:
    """The leading arguments every step op takes, type names checked (after _C is known usable)."""
    loader.require()
    mean = _type_name(model_mean_type, "model_mean_type", MEAN_TYPES)
    var = _type_name(model_var_type, "model_var_type", VAR_TYPES)
    return x, model_output, t, table, mean, var, bool(clip_denoised)


def p_sample_step(x, model_output, t, table, model_mean_type, model_var_type, clip_denoised=True, noise=None,
                  generator=None, return_pred_xstart=True, sample_index=None):  # fmt: skip
    """Ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t) (no noise where t == 0).

    :param sample_index: the global sample index of each batch item, which keys its
        in-kernel noise: a [B] int64/int32 tensor on x's device, an int k (items are samples
        k .. k+B-1), or None (item b is sample b). Unused with explicit ``noise``.
    :return: (x_{t-1}, pred_x0 or None), both in x's dtype.
    """
    args = _args(x, model_output, t, table, model_mean_type, model_var_type, clip_denoised)
    index = _sample_index(sample_index, x)
    sample, pred = torch.ops.iddpm.p_sample_step(*args, noise, generator, bool(return_pred_xstart), index)
    return sample, (pred if return_pred_xstart else None)


def ddim_step(x, model_output, t, table, model_mean_type, model_var_type, clip_denoised=True, eta=0.0,
              noise=None, generator=None, return_pred_xstart=True, sample_index=None):  # fmt: skip
    """DDIM step x_t -> x_{t-1} with stochasticity ``eta`` in [0, 1] (0: deterministic, no
    noise used; above 1 the update's ε coefficient is not real at some steps: ValueError).

    :param sample_index: as :func:`p_sample_step`.
    :return: (x_{t-1}, pred_x0 or None), both in x's dtype.
    """
    args = _args(x, model_output, t, table, model_mean_type, model_var_type, clip_denoised)
    index = _sample_index(sample_index, x)
    try:
        eta = float(eta)  # its range, [0, 1], is checked by the op
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"eta: expected a number in [0, 1] (DDIM's η), got {eta!r}") from None
    sample, pred = torch.ops.iddpm.ddim_step(*args, eta, noise, generator, bool(return_pred_xstart), index)
    return sample, (pred if return_pred_xstart else None)


def ddim_reverse_step(x, model_output, t, table, model_mean_type, model_var_type, clip_denoised=True,
                      return_pred_xstart=True):  # fmt: skip
    """Deterministic reverse DDIM step x_t -> x_{t+1} (the DDIM ODE run forward).

    :return: (x_{t+1}, pred_x0 or None), both in x's dtype.
    """
    args = _args(x, model_output, t, table, model_mean_type, model_var_type, clip_denoised)
    sample, pred = torch.ops.iddpm.ddim_reverse_step(*args, bool(return_pred_xstart))
    return sample, (pred if return_pred_xstart else None)


def output_strides(x: torch.Tensor) -> tuple:
    """Strides of the step's outputs: x's layout when x is channels-first contiguous or
    channels-last dense ([B, *spatial, C] in memory), else contiguous (as csrc/ops/step.cpp)."""
    sizes = tuple(x.shape)
    contiguous = []
    acc = 1
    for s in reversed(sizes):
        contiguous.append(acc)
        acc *= max(s, 1)
    contiguous = tuple(reversed(contiguous))
    if x.is_contiguous() or x.dim() < 3:
        return contiguous
    last = [0] * len(sizes)
    acc = 1
    last[1] = acc
    acc *= max(sizes[1], 1)
    for d in range(len(sizes) - 1, 1, -1):
        last[d] = acc
        acc *= max(sizes[d], 1)
    last[0] = acc
    dense_last = all(sizes[d] <= 1 or x.stride(d) == last[d] for d in range(len(sizes)))
    return tuple(last) if dense_last else contiguous


def _fake_checks(x, model_output, t, table, model_mean_type, model_var_type, eta, noise, sample_index):
    """The argument checks of csrc/ops/step.cpp's prepare(), in its order and with its messages
    (ValueError), for the fake implementations: a meta tensor among real ones is refused here."""
    _type_name(model_mean_type, "model_mean_type", MEAN_TYPES)
    _type_name(model_var_type, "model_var_type", VAR_TYPES)
    checks.eta(eta)
    checks.defined(x, "x")
    if x.dim() < 2:
        raise ValueError(f"x: expected a tensor [B, C, ...] with at least 2 dims, got shape {list(x.shape)}")
    checks.dtype_in(x, "x", SUPPORTED_DTYPES)
    checks.defined(model_output, "model_output")
    checks.same_device(model_output, "model_output", x, "x")
    checks.dtype_in(model_output, "model_output", SUPPORTED_DTYPES)
    learned = model_var_type in ("learned", "learned_range")
    expected = (x.shape[0], 2 * x.shape[1] if learned else x.shape[1], *x.shape[2:])
    checks.shape(tuple(model_output.shape) == expected, "model_output", expected, model_output)
    checks.defined(t, "t")
    checks.same_device(t, "t", x, "x")
    checks.index_dtype(t, "t")
    checks.shape(
        tuple(t.shape) == (x.shape[0],), "t", (x.shape[0],), t, " (one timestep per batch item of x)"
    )
    checks.defined(table, "table")
    checks.same_device(table, "table", x, "x")
    checks.dtype_in(table, "table", (torch.float32,))
    checks.dim(table, "table", 2, "[T, K]")
    torch._check_value(
        table.shape[0] >= 1 and table.shape[1] >= MIN_TABLE_COLUMNS,
        lambda: (
            f"table: expected a [T, K] coefficient table with T >= 1 and K >= {MIN_TABLE_COLUMNS} "
            f"columns (GaussianDiffusion.coef_table), got shape {list(table.shape)}"
        ),
    )
    if noise is not None:
        checks.same_device(noise, "noise", x, "x")
        checks.shape(tuple(noise.shape) == tuple(x.shape), "noise", x.shape, noise, " (the shape of x)")
        if noise.dtype != x.dtype:
            raise ValueError(f"noise: expected dtype {x.dtype} (the dtype of x), got {noise.dtype}")
    if sample_index is not None:
        checks.same_device(sample_index, "sample_index", x, "x")
        checks.index_dtype(sample_index, "sample_index")
        checks.shape(tuple(sample_index.shape) == (x.shape[0],), "sample_index", (x.shape[0],), sample_index)


def _fake_outputs(x, model_output, t, table, model_mean_type, model_var_type, return_pred_xstart, eta=0.0,
                  noise=None, sample_index=None):  # fmt: skip
    _fake_checks(x, model_output, t, table, model_mean_type, model_var_type, eta, noise, sample_index)
    strides = output_strides(x)
    out = x.new_empty_strided(tuple(x.shape), strides)
    pred = x.new_empty_strided(tuple(x.shape), strides) if return_pred_xstart else x.new_empty((0,))
    return out, pred


if loader.available():

    @torch.library.register_fake("iddpm::p_sample_step")
    def _p_sample_step_fake(x, model_output, t, table, model_mean_type, model_var_type, clip_denoised,
                            noise=None, generator=None, return_pred_xstart=True,
                            sample_index=None):  # fmt: skip
        return _fake_outputs(x, model_output, t, table, model_mean_type, model_var_type, return_pred_xstart,
                             noise=noise, sample_index=sample_index)  # fmt: skip

    @torch.library.register_fake("iddpm::ddim_step")
    def _ddim_step_fake(x, model_output, t, table, model_mean_type, model_var_type, clip_denoised, eta,
                        noise=None, generator=None, return_pred_xstart=True, sample_index=None):  # fmt: skip
        return _fake_outputs(x, model_output, t, table, model_mean_type, model_var_type, return_pred_xstart,
                             eta, noise, sample_index)  # fmt: skip

    @torch.library.register_fake("iddpm::ddim_reverse_step")
    def _ddim_reverse_step_fake(x, model_output, t, table, model_mean_type, model_var_type, clip_denoised,
                                return_pred_xstart=True):  # fmt: skip
        return _fake_outputs(x, model_output, t, table, model_mean_type, model_var_type, return_pred_xstart)
