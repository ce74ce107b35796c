"""Argument checks of the diffusion's public methods.

Every failure is an ArgumentError naming the argument, what was expected and what came: a
ValueError, and an AssertionError as the reference's asserts (a timestep out of range also an
IndexError, as the reference's table lookup).
Shapes: x [N, C, ...]; t [N] integer timesteps; model output [N, C, ...] or [N, 2C, ...].
"""

from __future__ import annotations

import torch

from ..errors import ArgumentError, TimestepRangeError

INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
# Up to this many CPU values (timesteps, labels) are read as Python ints (faster than a reduction).
_HOST_READ_MAX = 32


def cannot_sync(t: torch.Tensor) -> bool:
    """True where reading t's values on the host is impossible or unwanted: during CUDA
    graph capture and while torch.compile traces."""
    if torch.compiler.is_compiling():
        return True
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def check_x(x, name: str = "x"):
    if not isinstance(x, torch.Tensor):
        raise ArgumentError(f"{name}: expected a tensor [N, C, ...], got {type(x).__name__}")
    if x.dim() < 2:
        raise ArgumentError(f"{name}: expected a tensor [N, C, ...], got shape {tuple(x.shape)}")


def check_same_shape(tensor, name: str, ref: torch.Tensor, ref_name: str):
    if not isinstance(tensor, torch.Tensor):
        raise ArgumentError(f"{name}: expected a tensor, got {type(tensor).__name__}")
    if tensor.shape != ref.shape:
        raise ArgumentError(
            f"{name}: expected shape {tuple(ref.shape)} (the shape of {ref_name}), got {tuple(tensor.shape)}"
        )


def check_timesteps(t, batch: int, num_timesteps: int, name: str = "t", read_values: bool = True):
    """t: an integer tensor of shape (batch,); with ``read_values`` its values are also
    checked to lie in [0, num_timesteps) (a host read: a sync on CUDA, skipped during graph
    capture and compilation)."""
    if not isinstance(t, torch.Tensor):
        raise ArgumentError(f"{name}: expected an integer tensor of shape ({batch},), got {type(t).__name__}")
    if t.dtype not in INT_DTYPES:
        raise ArgumentError(f"{name}: expected an integer tensor (e.g. int64), got dtype {t.dtype}")
    if tuple(t.shape) != (batch,):
        raise ArgumentError(
            f"{name}: expected shape ({batch},) (one timestep per batch item), got {tuple(t.shape)}"
        )
    if batch == 0 or not read_values or cannot_sync(t):
        return
    lo, hi = int_range(t)
    if lo < 0 or hi >= num_timesteps:
        bad = lo if lo < 0 else hi
        raise TimestepRangeError(f"{name}: expected timesteps in [0, {num_timesteps}), got {bad}")


def int_range(t: torch.Tensor) -> tuple:
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
    raise ArgumentError(f"model_output: expected shape {expected} ({why}), got {got}")


# The DDIM η rule. σ_t = η·√((1-ᾱ_prev)/(1-ᾱ_t))·√(1-ᾱ_t/ᾱ_prev) and the update's ε
# coefficient is √(1-ᾱ_prev-σ_t²) = √((1-ᾱ_prev)·(1 - η²·r)) with r = (ᾱ_prev-ᾱ_t)/(ᾱ_prev·(1-ᾱ_t)),
# and 0 <= r <= 1 for every schedule and step (ᾱ_t <= ᾱ_prev <= 1), with r -> 1 as ᾱ_t -> 0:
# real for every schedule and step exactly when η <= 1 (docs/step.md, "DDIM η").
ETA_RANGE = (0.0, 1.0)


def check_eta(eta, name: str = "eta") -> float:
    """DDIM's η as a float in [0, 1], else a ValueError naming it, the range and the value."""
    if isinstance(eta, bool) or (isinstance(eta, torch.Tensor) and eta.numel() != 1):
        value = None
    else:
        try:
            value = float(eta)
        except (TypeError, ValueError, RuntimeError):
            value = None
    if value is None:
        raise ArgumentError(f"{name}: expected a number in [0, 1] (DDIM's η), got {eta!r}")
    lo, hi = ETA_RANGE
    if not lo <= value <= hi:  # NaN fails too
        raise ArgumentError(
            f"{name}: expected a number in [0, 1] (DDIM's η; above 1 the coefficient "
            f"√(1 − ᾱ_prev − σ²) is not real at some steps), got {value}"
        )
    return value


def check_sample_shape(shape) -> tuple:
    """A sample shape (B, C, ...) of positive ints, as a tuple."""
    ok = isinstance(shape, (tuple, list, torch.Size)) and len(shape) >= 2
    if ok:
        try:
            shape = tuple(int(s) for s in shape)
        except (TypeError, ValueError):
            ok = False
    if not ok or min(shape) < 1:
        raise ArgumentError(f"shape: expected a tuple (B, C, ...) of positive ints, got {shape!r}")
    return shape


def model_num_classes(model):
    """The number of classes of a class-conditional model (a DDP wrapper's module too), else None."""
    inner = getattr(model, "module", model)
    return getattr(inner, "num_classes", None)


def check_class_labels(model, model_kwargs, batch: int):
    """For a class-conditional model (``num_classes`` set): ``model_kwargs["y"]`` must be
    integer labels [batch] in [0, num_classes) (a host read, skipped where reading is
    impossible: graph capture, compilation)."""
    num_classes = model_num_classes(model)
    if num_classes is None:
        return
    labels = (model_kwargs or {}).get("y")
    if labels is None:
        raise ArgumentError(
            f"y: the model is class-conditional ({num_classes} classes); pass labels [B] as y="
        )
    if not isinstance(labels, torch.Tensor):
        raise ArgumentError(f"y: expected a tensor of integer class labels, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ArgumentError(f"y: expected integer class labels, got dtype {labels.dtype}")
    if tuple(labels.shape) != (batch,):
        raise ArgumentError(f"y: expected shape ({batch},) (one label per sample), got {tuple(labels.shape)}")
    if cannot_sync(labels):
        return
    lo, hi = int_range(labels)
    if lo < 0 or hi >= num_classes:
        raise ArgumentError(f"y: expected labels in [0, {num_classes}), got {lo if lo < 0 else hi}")
