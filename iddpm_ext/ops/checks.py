"""Argument checks of the ops' fake (meta) implementations, with the messages of the C++ checks
(csrc/ops/checks.h), so that a call refused by a kernel is refused in the same words when it
reaches a fake implementation instead.

The dispatcher sends a call to the fake implementation whenever one argument is a meta tensor
(Meta outranks CPU and CUDA), so meta tensors mixed with real ones land here, not in a kernel:
:func:`same_device` refuses them, as torch's own ops do, instead of returning uninitialised
tensors. Under torch.compile the arguments are FakeTensors on their real devices and the same
checks apply. Shape conditions go through ``torch._check_value`` (ValueError) so that symbolic
sizes are constrained rather than specialised.
"""

from __future__ import annotations

import torch


def dtype_name(dtype: torch.dtype) -> str:
    """torch's name of a dtype without the prefix ("float32"), as the C++ checks print it."""
    return str(dtype).removeprefix("torch.")


def defined(x, name: str):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(x).__name__}")


def same_device(x: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str):
    """``x`` on ``ref``'s device (the device the op's output is allocated on)."""
    if x.device != ref.device:
        raise ValueError(
            f"{name}: expected a tensor on {ref.device} (the device of {ref_name}), got {x.device}"
        )


def cpu_only(x: torch.Tensor, name: str, op: str = "the op"):
    """x on the CPU (or meta, which stands for any device): csrc/ops/checks.h's check_cpu_only."""
    if x.device.type not in ("cpu", "meta"):
        raise ValueError(f"{name}: expected a CPU tensor ({op} has a CPU kernel only), got one on {x.device}")


def dtype_in(x: torch.Tensor, name: str, dtypes, where: str = ""):
    if x.dtype not in dtypes:
        names = ", ".join(dtype_name(d) for d in dtypes)
        raise ValueError(f"{name}: expected dtype {names}{where}, got {x.dtype}")


def index_dtype(x: torch.Tensor, name: str):
    if x.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: expected an integer tensor (int64 or int32), got {x.dtype}")


def dim(x: torch.Tensor, name: str, n: int, layout: str):
    if x.dim() != n:
        raise ValueError(f"{name}: expected a {n}-D tensor {layout}, got shape {list(x.shape)}")


def shape(cond, name: str, expected, x: torch.Tensor, why: str = ""):
    """``cond`` (a bool or symbolic bool) or a ValueError naming ``name``."""
    torch._check_value(cond, lambda: f"{name}: expected shape {list(expected)}{why}, got {list(x.shape)}")


def eta(value: float):
    """DDIM's eta in [0, 1] (csrc/ops/step.cpp; NaN fails too)."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            "eta: expected a number in [0, 1] (DDIM's eta; above 1 the coefficient "
            f"sqrt(1 - abar_prev - sigma^2) is not real at some steps), got {value}"
        )
