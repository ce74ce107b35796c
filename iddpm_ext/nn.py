"""Small building blocks of the UNet (the reference's ``nn.py`` names).

Everything here is plain PyTorch, except that the norm sites may run the fused op
iddpm::group_norm_act (:func:`norm_act`, :func:`set_groupnorm_impl`). Module classes add no
parameters beyond the torch layers they wrap, so state_dict keys follow the reference's module
tree exactly.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as torch_checkpoint

from .losses import mean_flat  # noqa: F401  (re-exported: the reference defines it here too)
from .ops import group_norm as _group_norm_ops

__all__ = [
    "GroupNorm32",
    "get_groupnorm_impl",
    "groupnorm_impl",
    "set_groupnorm_impl",
    "SiLU",
    "avg_pool_nd",
    "checkpoint",
    "conv_nd",
    "linear",
    "mean_flat",
    "norm_act",
    "normalization",
    "scale_module",
    "timestep_embedding",
    "update_ema",
    "use_fused_groupnorm",
    "zero_module",
]

# The reference wrote its own x·sigmoid(x) for torch 1.5; torch's SiLU is the same function.
SiLU = nn.SiLU


# How GroupNorm32 and the UNet's norm → (scale-shift →) SiLU sites run:
# "torch": the reference's way, cast the activation to fp32, normalise, cast back (two extra passes
#   over memory for bf16/fp16), then scale-shift and SiLU as separate ops in the activation's dtype;
# "fused": the op iddpm::group_norm_act (iddpm_ext.ops.group_norm): GroupNorm, the scale-shift and
#   SiLU in one pass in fp32, one rounding (an error if _C has no kernel for the tensor's device);
# "auto": "fused" where _AUTO_FUSED lists the device and dtype (measured faster: docs/unet.md), else
#   on the CPU one call of torch's mixed-dtype group_norm for bf16/fp16 (fp32 statistics and affine
#   map, one rounding: the same numbers as "torch"), else as "torch".
# Default from IDDPM_GROUPNORM_IMPL.
_GROUPNORM_IMPLS = ("auto", "torch", "fused")
# Where "auto" runs the fused op: device type -> dtypes. Not CUDA: its kernel has not run on a card.
_AUTO_FUSED: dict[str, tuple[torch.dtype, ...]] = {"cpu": (torch.float32, torch.bfloat16, torch.float16)}


def _groupnorm_impl_from_env() -> str:
    value = os.environ.get("IDDPM_GROUPNORM_IMPL", "auto").strip().lower() or "auto"
    if value not in _GROUPNORM_IMPLS:
        raise ValueError(f"IDDPM_GROUPNORM_IMPL: expected one of {list(_GROUPNORM_IMPLS)}, got {value!r}")
    return value


_groupnorm_impl = _groupnorm_impl_from_env()


def set_groupnorm_impl(impl: str) -> str:
    """Choose how GroupNorm32 and the UNet's norm → SiLU sites run ("auto", "torch" or "fused");
    returns the previous choice."""
    global _groupnorm_impl
    if impl not in _GROUPNORM_IMPLS:
        raise ValueError(f"impl: expected one of {list(_GROUPNORM_IMPLS)}, got {impl!r}")
    previous, _groupnorm_impl = _groupnorm_impl, impl
    return previous


def get_groupnorm_impl() -> str:
    return _groupnorm_impl


class groupnorm_impl:
    """Context manager: ``with groupnorm_impl("torch"): ...``."""

    def __init__(self, impl: str):
        self.impl = impl

    def __enter__(self):
        self.previous = set_groupnorm_impl(self.impl)
        return self

    def __exit__(self, *exc):
        set_groupnorm_impl(self.previous)
        return False


_LOW_PRECISION = (torch.bfloat16, torch.float16)


def use_fused_groupnorm(x: torch.Tensor) -> bool:
    """Whether the norm sites run the fused op iddpm::group_norm_act for activation ``x``
    (see :func:`set_groupnorm_impl`); "fused" with no kernel for x's device is a ValueError."""
    if _groupnorm_impl == "torch":
        return False
    if _groupnorm_impl == "fused":
        _group_norm_ops.require_kernel(x)
        return True
    return x.dtype in _AUTO_FUSED.get(x.device.type, ()) and _group_norm_ops.fused_supported(x)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics and affine map are computed in float32.

    The result is cast back to the input's dtype, so a bf16/fp16 activation stays in its
    dtype but is normalised in fp32. Under autocast this still holds: group_norm is never
    autocast to a lower precision, and its inputs here are fp32. The memory format of the
    input (e.g. channels-last) is kept. See :func:`set_groupnorm_impl` for how it runs.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, C, ...]
        if use_fused_groupnorm(x):
            return norm_act(self, x, silu=False)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        if _groupnorm_impl == "auto" and x.dtype in _LOW_PRECISION and x.device.type == "cpu":
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)  # fp32 inside
        y = F.group_norm(x.float(), self.num_groups, weight, bias, self.eps)
        return y.to(x.dtype)


def norm_act(
    norm: nn.GroupNorm,
    x: torch.Tensor,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    silu: bool = True,
) -> torch.Tensor:
    """``act(norm(x)·(1 + scale) + shift)`` by the fused op iddpm::group_norm_act, with
    ``norm``'s groups, parameters and eps; scale, shift: [N, C] or None; act = SiLU or identity.
    Computed in fp32 and rounded once to x's dtype (the reference rounds after each step)."""
    return _group_norm_ops.group_norm_act(
        x, norm.num_groups, norm.weight, norm.bias, scale, shift, norm.eps, silu
    )


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1-D, 2-D or 3-D convolution (``nn.Conv{dims}d``)."""
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"dims: expected 1, 2 or 3, got {dims!r}")


def linear(*args, **kwargs) -> nn.Linear:
    """A linear layer (``nn.Linear``)."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1-D, 2-D or 3-D average pooling layer (``nn.AvgPool{dims}d``)."""
    if dims == 1:
        return nn.AvgPool1d(*args, **kwargs)
    if dims == 2:
        return nn.AvgPool2d(*args, **kwargs)
    if dims == 3:
        return nn.AvgPool3d(*args, **kwargs)
    raise ValueError(f"dims: expected 1, 2 or 3, got {dims!r}")


@torch.no_grad()
def update_ema(target_params, source_params, rate: float = 0.99):
    """target ← rate·target + (1 - rate)·source, in place, for paired parameter sequences."""
    for targ, src in zip(target_params, source_params):
        targ.detach().mul_(rate).add_(src.detach().to(targ.dtype), alpha=1 - rate)


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero and return it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def scale_module(module: nn.Module, scale: float) -> nn.Module:
    """Multiply every parameter of ``module`` by ``scale`` and return it."""
    for p in module.parameters():
        p.detach().mul_(scale)
    return module


def normalization(channels: int) -> GroupNorm32:
    """The UNet's normalisation: GroupNorm with 32 groups, computed in fp32."""
    if channels % 32 != 0:
        raise ValueError(
            f"channels: GroupNorm(32) needs a multiple of 32 channels, got {channels} "
            "(model_channels × each channel_mult entry must be a multiple of 32)"
        )
    return GroupNorm32(32, channels)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
    """Sinusoidal embeddings of (possibly fractional) timesteps: [N] -> [N, dim], float32.

    With half = dim // 2 and f_i = max_period^(-i/half) for i < half, the row for t is
    [cos(t·f_0), …, cos(t·f_{half-1}), sin(t·f_0), …, sin(t·f_{half-1})], followed by one
    zero column when dim is odd. The frequencies are made on ``timesteps``' device.
    """
    if timesteps.dim() != 1:
        raise ValueError(f"timesteps: expected a 1-D tensor [N], got shape {tuple(timesteps.shape)}")
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)  # [half]
    args = timesteps[:, None].float() * freqs[None]  # [N, half]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def checkpoint(func, inputs, params=None, flag: bool = True):
    """``func(*inputs)``, recomputed in backward instead of keeping its activations.

    Uses ``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` when ``flag`` is true
    and gradients are enabled; otherwise calls ``func`` directly. ``params`` is accepted
    for the reference's signature only: the non-reentrant checkpoint finds the parameters
    ``func`` uses by itself.
    """
    del params
    if flag and torch.is_grad_enabled():
        return torch_checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)
