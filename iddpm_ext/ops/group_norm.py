"""iddpm::group_norm_act — GroupNorm, the ResBlock's scale-shift and SiLU in one pass
(csrc/ops/group_norm.cpp; CPU kernel csrc/cpu/group_norm*, CUDA csrc/cuda/group_norm.cu).

Per sample n and channel c of group g (statistics over the group's C/G channels × all positions,
biased variance, as torch's group_norm)::

    a = (x - mean_ng) / sqrt(var_ng + eps) · weight_c + bias_c
    h = a · (1 + scale_nc) + shift_nc          (scale / shift: None = 0)
    out = silu(h) if silu else h

computed in float32 (float64 for float64 x) and rounded once to x's dtype, in x's memory format
(NCHW-contiguous or channels-last). The reference rounds three times in a low-precision dtype
(GroupNorm32's cast back, the scale-shift, the SiLU): :func:`group_norm_act_reference` is that
readable composition, the fused op is at least as accurate (tests/ops/test_group_norm_act.py).

- :func:`group_norm_act` — the op, differentiable w.r.t. x, weight, bias, scale and shift.
- :func:`group_norm_act_reference` — the reference's eager composition (readable path).
- :func:`fused_supported` — whether ``_C`` has a kernel for a tensor's device and dtype.
The forward op also returns the statistics (mean, rstd [N, G]) that autograd saves; its backward
is the op iddpm::group_norm_act_backward, so torch.compile traces both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import checks, loader


def group_norm_act_reference(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    eps: float = 1e-5,
    silu: bool = True,
) -> torch.Tensor:
    """The reference's composition: GroupNorm32 (fp32, cast back to x's dtype), then
    ``·(1 + scale) + shift`` and SiLU in x's dtype. scale, shift: [N, C] or None."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    h = F.group_norm(x.float(), num_groups, w, b, eps).to(x.dtype)
    view = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    if scale is not None:
        h = h * (1 + scale.to(x.dtype).reshape(view))
    if shift is not None:
        h = h + shift.to(x.dtype).reshape(view)
    return F.silu(h) if silu else h


def group_norm_act(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    eps: float = 1e-5,
    silu: bool = True,
) -> torch.Tensor:
    """The fused op: ``act((GN(x)·weight + bias)·(1 + scale) + shift)`` in x's dtype and layout.

    x: [N, C, *]; weight, bias: [C]; scale, shift: [N, C] (any float dtype, None to leave out).
    """
    loader.require()
    out, _, _ = torch.ops.iddpm.group_norm_act(x, num_groups, weight, bias, scale, shift, eps, silu)
    return out


_KERNELS = {device: caps for device, caps in loader.capabilities()["group_norm"].items() if caps}


def fused_supported(x: torch.Tensor) -> bool:
    """True when ``_C`` has a group_norm_act kernel for x's device and dtype."""
    caps = _KERNELS.get(x.device.type)
    return caps is not None and x.dtype in caps["dtypes"] and x.dim() >= 2


def require_kernel(x: torch.Tensor):
    """A clear error when the fused op has no kernel for x (what group-norm impl 'fused' needs)."""
    loader.require()
    caps = _KERNELS.get(x.device.type)
    if caps is None:
        raise ValueError(
            f"x: the fused group norm (groupnorm impl 'fused') has no kernel for device {x.device}; "
            f"iddpm_ext._C has kernels for {sorted(_KERNELS)}"
        )


# ---------------------------------------------------------------------------------
# fake (meta) implementations and autograd
# ---------------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# csrc/cuda/group_norm.h's kGroupNormMaxItemGroups: the grid's blocks, one per (batch item, group).
_CUDA_MAX_ITEM_GROUPS = 2**31 - 1


def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _memory_format(x):
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _fake_check_x(x, num_groups):
    """csrc/ops/group_norm.cpp's check_x, in its order and words."""
    checks.defined(x, "x")
    if x.dim() < 2:
        raise ValueError(f"x: expected a tensor [N, C, *] of at least 2 dims, got shape {list(x.shape)}")
    kind = x.device.type
    caps = _KERNELS.get(kind, _KERNELS.get("cpu") if kind == "meta" else None)
    if caps is not None:
        checks.dtype_in(x, "x", caps["dtypes"], "" if kind == "meta" else f" on {kind.upper()}")
    C = x.shape[1]
    torch._check_value(
        num_groups >= 1 and C % num_groups == 0,
        lambda: (
            f"num_groups: expected a positive divisor of the channel count C = {C} (dim 1 of x, "
            f"shape {list(x.shape)}), got {num_groups}"
        ),
    )
    if kind == "cuda":  # one CUDA block per (batch item, group)
        torch._check_value(
            x.shape[0] * num_groups <= _CUDA_MAX_ITEM_GROUPS,
            lambda: (
                f"num_groups: expected at most {_CUDA_MAX_ITEM_GROUPS} batch items × groups on CUDA, "
                f"got {x.shape[0]} × {num_groups} (x of shape {list(x.shape)})"
            ),
        )


def _fake_check_param(t, name, x, per_sample):
    if t is None:
        return
    checks.same_device(t, name, x, "x")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"{name}: expected a floating-point dtype (float32, float64, float16 or bfloat16), got {t.dtype}"
        )
    N, C = x.shape[0], x.shape[1]
    if per_sample:
        checks.shape(t.dim() == 2 and t.shape[0] == N and t.shape[1] == C, name, (N, C), t, " ([N, C] of x)")
    else:
        checks.shape(t.dim() == 1 and t.shape[0] == C, name, (C,), t, " ([C] of x)")


def _fake_check_args(x, num_groups, weight, bias, scale, shift):
    _fake_check_x(x, num_groups)
    _fake_check_param(weight, "weight", x, False)
    _fake_check_param(bias, "bias", x, False)
    _fake_check_param(scale, "scale", x, True)
    _fake_check_param(shift, "shift", x, True)


def _check_eps(eps):
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps: expected a finite number > 0, got {eps}")


if loader.available():

    @torch.library.register_fake("iddpm::group_norm_act")
    def _group_norm_act_fake(x, num_groups, weight, bias, scale, shift, eps, silu):
        _fake_check_args(x, num_groups, weight, bias, scale, shift)
        _check_eps(eps)
        out = torch.empty_like(x, memory_format=_memory_format(x))
        mean = x.new_empty((x.shape[0], num_groups), dtype=_acc_dtype(x))
        return out, mean, torch.empty_like(mean)

    @torch.library.register_fake("iddpm::group_norm_act_backward")
    def _group_norm_act_backward_fake(grad_out, x, mean, rstd, num_groups, weight, bias, scale, shift, silu):
        _fake_check_args(x, num_groups, weight, bias, scale, shift)
        checks.defined(grad_out, "grad_out")
        checks.same_device(grad_out, "grad_out", x, "x")
        checks.shape(grad_out.shape == x.shape, "grad_out", x.shape, grad_out, " (that of x)")
        if grad_out.dtype != x.dtype:
            raise ValueError(
                f"grad_out: expected dtype {checks.dtype_name(x.dtype)} (that of x), "
                f"got {checks.dtype_name(grad_out.dtype)}"
            )
        N, C = x.shape[0], x.shape[1]
        for t, name in ((mean, "mean"), (rstd, "rstd")):
            checks.defined(t, name)
            checks.same_device(t, name, x, "x")
            checks.dtype_in(t, name, (_acc_dtype(x),))
            checks.shape(
                t.dim() == 2 and t.shape[0] == N and t.shape[1] == num_groups,
                name,
                (N, num_groups),
                t,
                " ([N, num_groups])",
            )
        acc = _acc_dtype(x)

        def grad(t, shape):
            return x.new_empty(shape, dtype=acc if t is None else t.dtype)

        dx = torch.empty_like(x, memory_format=_memory_format(x))
        return dx, grad(weight, (C,)), grad(bias, (C,)), grad(scale, (N, C)), grad(shift, (N, C))

    def _setup_context(ctx, inputs, output):
        x, num_groups, weight, bias, scale, shift, _eps, silu = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, mean, rstd, weight, bias, scale, shift)
        ctx.num_groups = num_groups
        ctx.silu = silu
        ctx.mark_non_differentiable(mean, rstd)

    def _backward(ctx, grad_out, _grad_mean, _grad_rstd):
        x, mean, rstd, weight, bias, scale, shift = ctx.saved_tensors
        if grad_out is None:
            return (None,) * 8
        dx, dw, db, dsc, dsh = torch.ops.iddpm.group_norm_act_backward(
            grad_out, x, mean, rstd, ctx.num_groups, weight, bias, scale, shift, ctx.silu
        )
        need = ctx.needs_input_grad
        return (
            dx if need[0] else None,
            None,
            dw if need[2] else None,
            db if need[3] else None,
            dsc if need[4] else None,
            dsh if need[5] else None,
            None,
            None,
        )

    torch.library.register_autograd("iddpm::group_norm_act", _backward, setup_context=_setup_context)
