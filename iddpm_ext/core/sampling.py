"""How a sampling step runs: one fused op where it applies, else the eager math.

:meth:`iddpm_ext.gaussian_diffusion.GaussianDiffusion.step` is the one per-step API (behind
p_sample, ddim_sample, ddim_reverse_sample, the sampling loops, the sampling engine and the
diffusers-style scheduler); this module holds what it decides with:

- **Fused or eager.** The fused ops (iddpm::p_sample_step / ddim_step / ddim_reverse_step,
  docs/step.md) run when the extension has kernels for x's device, ``denoised_fn`` is None,
  x and the model output are float32/float16/bfloat16, explicit noise (if any) has x's
  dtype and device, and no gradient is being recorded (:func:`fused_blocker` says why not).
  ``diffusion.use_fused = False`` (or IDDPM_EXT_FUSED=0 in the environment before the
  diffusion is made) keeps the eager path; ``step(..., fused=True | False)`` forces one.
- **Dtypes.** Results are float32 either way, as in the reference: its float32 coefficient
  tables promote fp16/bf16 operands, so an fp16/bf16 x is upcast (exactly) before the fused
  op, which then computes from the same values as the eager math. (The ops themselves
  return x's dtype.)
- **Noise** (:func:`fused_noise`): explicit ``noise``; else, on CPU without a generator and
  without ``sample_index``, ``torch.randn_like(x)`` from torch's global RNG exactly as the
  reference draws it (seeded runs match the reference); otherwise Philox noise drawn in the
  kernel from ``generator`` or the device's default generator, item b taking the stream of
  global sample ``sample_index[b]`` (docs/step.md, "Per-sample streams"). The eager path
  draws ``randn_like(x)`` (or from ``generator``); per-sample streams exist only in-kernel.
  The reverse DDIM step draws no noise on either path (as the reference).
- **Layout** (:func:`eager_strides`): ``randn_like`` follows x's memory layout, so a fused
  result is returned in the layout the eager math would have produced (predicted once per
  layout on meta tensors), and the next step's noise lands where the reference's would.

Shapes: x [N, C, ...]; model_output [N, C, ...] or [N, 2C, ...]; t [N] int64/int32.
"""

from __future__ import annotations

import os

import torch

from .. import ops
from .tables import cached

KINDS = ("ancestral", "ddim", "ddim_reverse")
# x and model-output dtypes the fused step kernels take (asked of _C; the CPU and CUDA lists agree).
FUSED_DTYPES = (ops.loader.capabilities()["step"]["cpu"] or {"dtypes": ()})["dtypes"]
_FUSED_T_DTYPES = (torch.int64, torch.int32)
_FUSED_DEVICES: dict[str, bool] = {}


def fused_default() -> bool:
    """The default of ``GaussianDiffusion.use_fused``: environment variable
    IDDPM_EXT_FUSED, unset or 1 = on, 0 (or false/off/no) = off."""
    value = os.environ.get("IDDPM_EXT_FUSED", "1").strip().lower()
    return value not in ("0", "false", "off", "no")


def check_kind(kind) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    return kind


def fused_kernels_on(device: torch.device) -> bool:
    on = _FUSED_DEVICES.get(device.type)
    if on is None:
        on = ops.has_kernel(device)
        _FUSED_DEVICES[device.type] = on
    return on


def fused_blocker(x, model_output, t, denoised_fn, noise) -> str | None:
    """Why a step with these arguments cannot run as one fused op, or None when it can
    (noise and model output already checked for shape)."""
    if denoised_fn is not None:
        return "denoised_fn is given (the fused op has no hook between x_0 and the update)"
    device = x.device
    if not fused_kernels_on(device):
        return f"iddpm_ext._C has no kernels for {device}"
    if not isinstance(model_output, torch.Tensor) or model_output.device != device:
        return "the model output is not on x's device"
    if x.dtype not in FUSED_DTYPES or model_output.dtype not in FUSED_DTYPES:
        return f"x / model output dtypes {x.dtype} / {model_output.dtype} (fused: float32, float16, bfloat16)"
    if t.dtype not in _FUSED_T_DTYPES or t.device != device:
        return f"t ({t.dtype} on {t.device}) is not int64/int32 on x's device"
    if (x.requires_grad or model_output.requires_grad) and torch.is_grad_enabled():
        return "a gradient is being recorded (the fused ops are not differentiable)"
    if noise is not None and (noise.dtype != x.dtype or noise.device != device):
        return "noise does not have x's dtype and device"
    return None


def fused_noise(x, noise, generator, sample_index):
    """The noise argument of a fused op (see the module docstring): ``noise`` as given; on
    CPU without a generator and sample_index, ``torch.randn_like(x)`` as the reference draws
    it; otherwise None (in-kernel Philox noise)."""
    if noise is None and generator is None and sample_index is None and x.device.type == "cpu":
        return torch.randn_like(x)
    return noise


def eager_noise(x, generator):
    """Fresh N(0, I) noise like ``x`` for the eager math: from ``generator`` when given,
    else from torch's global RNG exactly as the reference draws it (``randn_like``)."""
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


# ---------------------------------------------------------------------------------
# the fused op, and the layout of its results
# ---------------------------------------------------------------------------------


def fused_update(kind, model_output, x, t, table, types, clip_denoised, eta, noise, generator, sample_index,
                 pred_xstart, layout_cache, eager_update) -> dict:  # fmt: skip
    """One step as the fused op of ``kind`` (``types``: the model's mean and variance type
    names, e.g. ("epsilon", "learned_range")) with the noise, dtype and layout rules of the
    module docstring: a dict with 'sample' and 'pred_xstart' (None when not ``pred_xstart``).
    ``eager_update(model_output, x, t, noise)`` is the same rule written eagerly, run on meta
    tensors when the layout of the eager result has to be found (:func:`eager_strides`)."""
    if kind != "ddim_reverse":  # the reverse ODE step uses no noise, and draws none (as the reference)
        noise = fused_noise(x, noise, generator, sample_index)
    x32 = x if x.dtype == torch.float32 else x.float()  # exact upcasts (module docstring)
    noise32 = noise if noise is None or noise.dtype == torch.float32 else noise.float()
    mean_type, var_type = types
    if kind == "ancestral":
        sample, pred = ops.p_sample_step(x32, model_output, t, table, mean_type, var_type, clip_denoised,
                                         noise32, generator, pred_xstart, sample_index)  # fmt: skip
    elif kind == "ddim":
        sample, pred = ops.ddim_step(x32, model_output, t, table, mean_type, var_type, clip_denoised,
                                     float(eta), noise32, generator, pred_xstart, sample_index)  # fmt: skip
    else:
        sample, pred = ops.ddim_reverse_step(x32, model_output, t, table, mean_type, var_type, clip_denoised,
                                             pred_xstart)  # fmt: skip
    strides = eager_strides(layout_cache, eager_update, kind, x, model_output, noise, clip_denoised, eta)
    if strides is None:
        return {"sample": sample, "pred_xstart": pred}
    return {"sample": relayout(sample, strides[0]), "pred_xstart": relayout(pred, strides[1])}


def dim_order(x: torch.Tensor) -> tuple:
    """Dims of x ordered from the largest stride to the smallest, size-1 dims ignored."""
    dims = [d for d in range(x.dim()) if x.shape[d] != 1]
    return tuple(sorted(dims, key=lambda d: -x.stride(d)))


def _dense(x: torch.Tensor) -> bool:
    """x is dense channels-first or channels-last: the fused op then writes x's layout."""
    if x.is_contiguous():
        return True
    if x.dim() in (4, 5):
        return x.is_contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return False


def eager_strides(cache: dict, eager_update, kind, x, model_output, noise, clip_denoised, eta):
    """(sample strides, pred_xstart strides) the eager math gives for these input layouts,
    or None in the common case where the fused kernel's layout (x's) is the eager one: x
    dense channels-first or channels-last and every operand in the same dim order.
    Otherwise the eager update ``eager_update(model_output, x, t, noise)`` runs once per
    layout on meta tensors and its strides are kept in ``cache``."""
    if x.is_contiguous() and model_output.is_contiguous() and (noise is None or noise.is_contiguous()):
        return None  # the common case, without sorting strides: every operand channels-first dense
    if (
        _dense(x)
        and dim_order(model_output) == dim_order(x)
        and (noise is None or dim_order(noise) == dim_order(x))
    ):
        return None
    key = (
        kind,
        tuple(x.shape),
        x.stride(),
        model_output.stride(),
        None if noise is None else noise.stride(),
        x.dtype,
        model_output.dtype,
        bool(clip_denoised),
        float(eta),
    )

    def strides():
        def meta(v):
            return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta")

        xm, mm = meta(x), meta(model_output)
        nm = torch.empty_like(xm) if noise is None else meta(noise)  # randn_like keeps x's layout
        tm = torch.zeros(x.shape[0], dtype=torch.long, device="meta")
        with torch.no_grad():
            out = eager_update(mm, xm, tm, nm)
        return out["sample"].stride(), out["pred_xstart"].stride()

    return cached(cache, key, strides)


def relayout(v, strides):
    """``v`` with ``strides`` (copied once when they differ)."""
    if strides is None or v is None or v.numel() == 0 or v.stride() == tuple(strides):
        return v
    return torch.empty_strided(v.shape, strides, dtype=v.dtype, device=v.device).copy_(v)


# ---------------------------------------------------------------------------------
# the timestep loop's pieces
# ---------------------------------------------------------------------------------


def nonzero_mask(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """1.0 where t != 0, as [N, 1, ..., 1] (no noise is added at the last step)."""
    return (t != 0).float().view(-1, *([1] * (ndim - 1)))


def default_device(model, noise):
    if noise is not None:
        return noise.device
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def initial_noise(shape, noise, device, generator) -> torch.Tensor:
    """x_T: ``noise`` (checked against ``shape``) or N(0, I) from ``generator`` / the global RNG."""
    if noise is not None:
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise: expected shape {shape} (the sample shape), got {tuple(noise.shape)}")
        return noise
    if generator is not None:
        return torch.randn(*shape, device=device, generator=generator)
    return torch.randn(*shape, device=device)


def step_noise_source(step_noise, num_timesteps: int, shape: tuple):
    """A function t -> the noise of timestep t (None: drawn per step) from ``step_noise``:
    a [T, *shape] tensor (entry t used at timestep t) or a callable t -> [*shape] tensor."""
    if step_noise is None:
        return lambda t: None
    if callable(step_noise) and not isinstance(step_noise, torch.Tensor):
        return step_noise
    if not isinstance(step_noise, torch.Tensor) or tuple(step_noise.shape) != (num_timesteps, *shape):
        got = tuple(step_noise.shape) if isinstance(step_noise, torch.Tensor) else type(step_noise).__name__
        raise ValueError(
            f"step_noise: expected shape {(num_timesteps, *shape)} ([T, *shape], entry t used at timestep t) "
            f"or a callable t -> noise, got {got}"
        )
    return step_noise.__getitem__


def descending(num_timesteps: int, progress: bool):
    """T-1, ..., 0, with a tqdm progress bar when ``progress``."""
    indices = list(range(num_timesteps))[::-1]
    if progress:
        from tqdm.auto import tqdm

        return tqdm(indices)
    return indices
