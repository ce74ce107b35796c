"""Argument checks of the diffusion's public methods.

Every failure is a ValueError naming the argument, what was expected and what came.
Shapes: x [N, C, ...]; t [N] integer timesteps; model output [N, C, ...] or [N, 2C, ...].
"""

from __future__ import annotations

import torch

INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_HOST_READ_MAX = 32  # up to this many CPU timesteps are read as Python ints (faster than a reduction)


def cannot_sync(t: torch.Tensor) -> bool:
    """True where reading t's values on the host is impossible or unwanted: during CUDA
    graph capture and while torch.compile traces."""
    if torch.compiler.is_compiling():
        return True
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def check_x(x, name: str = "x"):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor [N, C, ...], got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{name}: expected a tensor [N, C, ...], got shape {tuple(x.shape)}")


def check_same_shape(tensor, name: str, ref: torch.Tensor, ref_name: str):
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(tensor).__name__}")
    if tensor.shape != ref.shape:
        raise ValueError(
            f"{name}: expected shape {tuple(ref.shape)} (the shape of {ref_name}), got {tuple(tensor.shape)}"
        )


def check_timesteps(t, batch: int, num_timesteps: int, name: str = "t", read_values: bool = True):
    """t: an integer tensor of shape (batch,); with ``read_values`` its values are also
    checked to lie in [0, num_timesteps) (a host read: a sync on CUDA, skipped during graph
    capture and compilation)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected an integer tensor of shape ({batch},), got {type(t).__name__}")
    if t.dtype not in INT_DTYPES:
        raise ValueError(f"{name}: expected an integer tensor (e.g. int64), got dtype {t.dtype}")
    if tuple(t.shape) != (batch,):
        raise ValueError(
            f"{name}: expected shape ({batch},) (one timestep per batch item), got {tuple(t.shape)}"
        )
    if batch == 0 or not read_values or cannot_sync(t):
        return
    lo, hi = timestep_range(t)
    if lo < 0 or hi >= num_timesteps:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name}: expected timesteps in [0, {num_timesteps}), got {bad}")


def timestep_range(t: torch.Tensor) -> tuple:
    """(min, max) of the values of a non-empty integer tensor, read on the host: for a few CPU
    values straight from memory (no op), else one reduction and one copy (a sync on CUDA)."""
    if t.is_cpu and t.numel() <= _HOST_READ_MAX:
        values = t.tolist()
        return min(values), max(values)
    return tuple(torch.stack(torch.aminmax(t)).tolist())


def check_model_output(model_output, x: torch.Tensor, learned: bool, var_type):
    """model_output: [N, 2C, ...] (mean and variance) when ``learned``, else [N, C, ...].
    ``var_type``: the variance type (a ModelVarType or its name), named in the error."""
    if isinstance(model_output, torch.Tensor):
        shape, xs = model_output.shape, x.shape
        if (
            len(shape) == len(xs) >= 2
            and shape[1] == (2 * xs[1] if learned else xs[1])
            and shape[0] == xs[0]
            and shape[2:] == xs[2:]
        ):
            return  # [N, C or 2C, *spatial]
    B, C = x.shape[:2]
    channels = 2 * C if learned else C
    expected = (B, channels, *x.shape[2:])
    got = tuple(model_output.shape) if isinstance(model_output, torch.Tensor) else type(model_output).__name__
    var_type_name = getattr(var_type, "name", var_type)
    why = (
        f"{channels} channels: mean and variance for {var_type_name}"
        if learned
        else f"{channels} channels for {var_type_name}"
    )
    raise ValueError(f"model_output: expected shape {expected} ({why}), got {got}")
