"""Small building blocks of the UNet (the reference's ``nn.py`` names).

Everything here is plain PyTorch, except that the norm sites may run the fused op
iddpm::group_norm_act (:func:`norm_act`, :func:`set_groupnorm_impl`) and the inference conv
forward may run fp32 and bf16 3×3 convs as iddpm::conv3x3_winograd (:func:`set_conv_winograd`), as may
the training forward and backward of a :class:`Conv2d` (:func:`set_conv_winograd_train`). Module
classes add no parameters beyond the torch layers they wrap, so state_dict keys follow the
reference's module tree exactly.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as torch_checkpoint

from .losses import mean_flat  # noqa: F401  (re-exported: the reference defines it here too)
from .ops import group_norm as _group_norm_ops
from .ops import loader as _loader
from .ops import winograd as _winograd_ops

__all__ = [
    "Conv2d",
    "GroupNorm32",
    "clear_conv_prepack",
    "conv_add",
    "conv_prepack_enabled",
    "conv_winograd",
    "default_conv_prepack",
    "set_conv_prepack",
    "set_conv_winograd",
    "set_conv_winograd_packed",
    "conv_winograd_packed",
    "conv_winograd_train",
    "get_conv_winograd",
    "get_conv_winograd_train",
    "set_conv_winograd_train",
    "conv_winograd_weight_grad",
    "get_conv_winograd_weight_grad",
    "set_conv_winograd_weight_grad",
    "conv_winograd_tile",
    "get_conv_winograd_tile",
    "set_conv_winograd_tile",
    "winograd_train_takes",
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
    """A 1-D, 2-D or 3-D convolution (``nn.Conv{dims}d``; 2-D: :class:`Conv2d`, an ``nn.Conv2d``)."""
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"dims: expected 1, 2 or 3, got {dims!r}")


# -- prepacked convolutions (CPU inference) ----------------------------------------------------
# torch's eager conv on the CPU (oneDNN) reorders the weight into oneDNN's blocked layout on every
# call (under autocast it also casts it first). Measured at batch 2 (docs/unet.md) that matters for
# bf16 and for small feature maps, not for fp32 convs at 16x16-32x32. A prepacked conv keeps the
# reordered copy (made once per weight version, dtype and input shape) and calls torch's own
# packed-conv op, mkldnn::_convolution_pointwise, which torch's inductor uses after freezing. The
# nn.Conv module, its parameters and state_dict stay as they are;
# the packed copy lives outside the state_dict and is rebuilt whenever the weight or bias tensor is
# replaced or changed in place (version counter), the dtype changes (model.to / autocast) or the
# input shape changes. Only eval-style calls use it: grad mode off, CPU tensors, fp32 or bf16 (also
# under CPU autocast to bf16), not while torch.compile traces; anything else runs the module's own
# forward. In-place writes through ``.data`` bypass the version counter: call
# ``set_conv_prepack(module, True)`` (or ``to_inference``) again after such a write.


def _mkldnn_conv_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def default_conv_prepack(device) -> bool | str:
    """What ``to_inference`` sets for prepacked convolutions on ``device`` by default.

    IDDPM_CONV_PREPACK=1 (fp32 and bf16 calls), =bf16 (bf16 calls only) or =0 (off); unset:
    "bf16" on the CPU when torch has oneDNN, off elsewhere. bf16 is the default because that is
    where it wins on this project's CPU (docs/unet.md); fp32 convs measured no faster packed.
    """
    value = os.environ.get("IDDPM_CONV_PREPACK", "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    if value == "bf16":
        return "bf16"
    if value:
        raise ValueError(f"IDDPM_CONV_PREPACK: expected 1, bf16 or 0 (or unset), got {value!r}")
    return "bf16" if torch.device(device).type == "cpu" and _mkldnn_conv_available() else False


def _conv_geometry(conv: nn.Module):
    """(padding, stride, dilation) as 2-D lists (1-D convs run as [N, C, 1, T]), or None when the
    conv cannot be prepacked (3-D, string padding, non-zero padding mode)."""
    if not isinstance(conv, (nn.Conv1d, nn.Conv2d)) or isinstance(conv.padding, str):
        return None
    if conv.padding_mode != "zeros":
        return None
    if isinstance(conv, nn.Conv1d):
        return [0, conv.padding[0]], [1, conv.stride[0]], [1, conv.dilation[0]]
    return list(conv.padding), list(conv.stride), list(conv.dilation)


# -- Winograd 3×3 convolutions (CPU fp32 and bf16 inference) -------------------------------------
# Inside the inference conv forward (_PrepackedForward below, installed by to_inference /
# set_conv_prepack), a no-grad CPU float32 or bfloat16 call of a 3×3 conv with stride 1, padding 1,
# dilation 1 and one group may run iddpm::conv3x3_winograd (iddpm_ext.ops.winograd: F(2×2, 3×3),
# 16 instead of 36 multiplies per output tile and channel pair; in float32 F(4×4, 3×3) where
# set_conv_winograd_tile's rule takes it, below) on a transformed copy of the weight,
# made once per weight version and compute dtype and kept with the packed weights (same cache,
# same invalidation: address + version counter; freed by train(); not in the state_dict). The
# compute dtype is torch's: the input's (= the weight's) dtype, or bf16 under CPU bf16 autocast
# (weight, bias and input cast to bf16 as autocast's conv does). Modes:
#   "off": never; "on": every such call; "auto": where it measured faster on this project's CPUs at
#   one thread (docs/unet.md): float32 with Cin and Cout >= 32 and H, W >= 4 (it loses for the
#   3-channel stem conv and at 1×1 maps); bfloat16 with Cin and Cout >= 32, H, W >= 2 and at least
#   32 output tiles (N · ⌈H/2⌉ · ⌈W/2⌉: the GEMMs' rows; alone 0.64× / 0.81× oneDNN at 4 / 8 tiles,
#   1.0–1.3× at 16, 1.2–1.6× from 32; inside the CIFAR-10 model, where the transformed weight, 16/9
#   of the weight's bytes, comes from memory, the 16-tile convs lost: the forward 3–4% slower at
#   B = 1 and 4 than with them on oneDNN, equal at 32 tiles) on CPUs without AMX (measured
#   1.4–1.7× oneDNN's packed bf16 conv at the model's shapes on an AVX-512-BF16 CPU; with AMX
#   tiles oneDNN's bf16 GEMMs and convs change and the comparison has not been made);
#   "fp32": the float32 rules of "auto", never bf16 (bf16 Winograd rounds the transformed input,
#   weight and products to bf16: ~2× a direct bf16 conv's error, docs/unet.md). Not while
#   torch.compile traces. Default from IDDPM_CONV_WINOGRAD=auto/fp32/1/0 (unset: auto).
_WINOGRAD_MODES = ("auto", "fp32", "on", "off")
_WINOGRAD_ALIASES = {"1": "on", "true": "on", "yes": "on", "0": "off", "false": "off", "no": "off"}
_WINOGRAD_AUTO_MIN_CHANNELS = 32
_WINOGRAD_AUTO_MIN_SIZE = {torch.float32: 4, torch.bfloat16: 2}  # min(H, W)
_WINOGRAD_AUTO_MIN_TILES = {torch.float32: 1, torch.bfloat16: 32}  # N · ⌈H/2⌉ · ⌈W/2⌉


def _env_mode(variable: str, modes: tuple, expected: str) -> str:
    """A Winograd mode from the environment variable (unset or empty: "auto"; 1/0 and the like for
    on/off), or a ValueError naming the variable."""
    raw = os.environ.get(variable, "auto").strip().lower() or "auto"
    value = _WINOGRAD_ALIASES.get(raw, raw)
    if value not in modes:
        raise ValueError(f"{variable}: expected {expected} (or unset), got {raw!r}")
    return value


def _checked_mode(mode: str | bool, modes: tuple) -> str:
    """``mode`` (True / False: "on" / "off") if it is one of ``modes``, else a ValueError."""
    value = {True: "on", False: "off"}.get(mode, mode) if isinstance(mode, bool) else mode
    if value not in modes:
        raise ValueError(f"mode: expected {', '.join(repr(m) for m in modes)}, True or False, got {mode!r}")
    return value


def _winograd_mode_from_env() -> str:
    return _env_mode("IDDPM_CONV_WINOGRAD", _WINOGRAD_MODES, "auto, fp32, 1 or 0")


_conv_winograd = _winograd_mode_from_env()


def set_conv_winograd(mode: str | bool) -> str:
    """Choose when the inference conv forward runs the Winograd 3×3 conv: "auto", "fp32" (the
    float32 calls "auto" takes, no bf16), "on" (True) or "off" (False); returns the previous
    mode."""
    global _conv_winograd
    previous, _conv_winograd = _conv_winograd, _checked_mode(mode, _WINOGRAD_MODES)
    return previous


def get_conv_winograd() -> str:
    return _conv_winograd


class conv_winograd:
    """Context manager: ``with conv_winograd("off"): ...``."""

    def __init__(self, mode: str | bool):
        self.mode = mode

    def __enter__(self):
        self.previous = set_conv_winograd(self.mode)
        return self

    def __exit__(self, *exc):
        set_conv_winograd(self.previous)
        return False


# The Winograd variant of the float32 convs above and of the training convs below (their forward,
# input gradient and weight gradient): F(2×2, 3×3) ("2") or F(4×4, 3×3) ("4": 4×4 output tiles, 36
# GEMMs with 2.25 instead of 4 multiplies per output and channel pair; ~4× F(2×2)'s float32 error,
# ~1e-6 of the output, iddpm_ext.ops.winograd). "auto": F(4×4) for float32 calls with maps of at
# least _WINOGRAD_TILE4_MIN_SIZE and at least _WINOGRAD_TILE4_MIN_TILES 4×4 output tiles (N·⌈H/4⌉·⌈W/4⌉:
# the GEMMs' rows), else F(2×2). Alone, one conv at B = 2 ran 1.3-1.7× as fast as F(2×2) at 8×8 to
# 32×32 maps (512 -> 256 channels at 8×8: 0.99×) and 0.46-1.03× at 4×4 and 2×2 (iddpm bench
# conv); inside the model, where each conv's transformed weight (36/9 of the weight's bytes,
# F(2×2)'s 16/9) comes from memory, the 8×8 maps lost at B = 1 and 2 (8 or fewer tiles) and
# 16×16 at B = 1 (16 tiles) was even (a reviewer's in-model timing; docs/unet.md). A training
# call transforms its weight twice per step (forward, input gradient), 2.25× the work of F(2×2)'s:
# it needs more tiles to gain (one training call, its
# weight gradient by the same tile, at 8×256×256×8×8, 32 tiles, 0.95× F(2×2)'s; from 128 tiles
# 1.08-1.38×: iddpm bench conv --passes train, docs/perf/unet-cpu-winograd-f4-2026-11-29).
# bfloat16 calls always F(2×2) (F(4×4) would round its larger transformed values to bf16: ~4× the
# error). Default from IDDPM_CONV_WINOGRAD_TILE=auto/2/4 (unset: auto).
_WINOGRAD_TILE_MODES = ("auto", "2", "4")
_WINOGRAD_TILE4_MIN_SIZE = 8  # min(H, W)
_WINOGRAD_TILE4_MIN_TILES = {False: 32, True: 128}  # N · ⌈H/4⌉ · ⌈W/4⌉, by "a training call"


def _winograd_tile_from_env() -> str:
    return _env_mode("IDDPM_CONV_WINOGRAD_TILE", _WINOGRAD_TILE_MODES, "auto, 2 or 4")


_conv_winograd_tile = _winograd_tile_from_env()


def set_conv_winograd_tile(tile: int | str) -> str:
    """Choose the Winograd variant of the float32 convs: 2 (F(2×2, 3×3)), 4 (F(4×4, 3×3)) or "auto"
    (see above); returns the previous setting ("2", "4" or "auto")."""
    global _conv_winograd_tile
    value = str(tile).strip().lower() if isinstance(tile, (int, str)) and not isinstance(tile, bool) else None
    if value not in _WINOGRAD_TILE_MODES:
        raise ValueError(f"tile: expected 2, 4 or 'auto', got {tile!r}")
    previous, _conv_winograd_tile = _conv_winograd_tile, value
    return previous


def get_conv_winograd_tile() -> str:
    return _conv_winograd_tile


def conv_winograd_tile(tile: int | str):
    """Context manager: ``with conv_winograd_tile(2): ...`` (read by each conv call's forward; a
    training call's input and weight gradients follow the tile its forward took)."""
    return _scoped(set_conv_winograd_tile, tile)


def _winograd_tile(dtype: torch.dtype, x: torch.Tensor, training: bool = False) -> int:
    """The Winograd variant (output tile edge, 2 or 4) of a conv call on ``x`` computed in ``dtype``
    (``training``: a Winograd training conv, whose weight is transformed on every call)."""
    mode = _conv_winograd_tile
    if dtype != torch.float32 or mode == "2":
        return 2
    if mode == "4":
        return 4
    N, _, H, W = x.shape
    tiles = N * ((H + 3) // 4) * ((W + 3) // 4)
    return 4 if min(H, W) >= _WINOGRAD_TILE4_MIN_SIZE and tiles >= _WINOGRAD_TILE4_MIN_TILES[training] else 2


# bf16 Winograd convs run on the packed weight (iddpm_ext.ops.winograd.packable: a CPU with
# AVX512-BF16, even Cin, Cout a multiple of 32; VDPBF16PS GEMMs per L2-sized block of tiles, the
# products kept in float32: faster and slightly more accurate than the plain weight's at::bmm path,
# docs/unet.md) unless IDDPM_WINOGRAD_PACKED=0 or set_conv_winograd_packed(False).
def _winograd_packed_from_env() -> bool:
    raw = os.environ.get("IDDPM_WINOGRAD_PACKED", "1").strip().lower() or "1"
    value = raw if raw in ("on", "off") else _WINOGRAD_ALIASES.get(raw)
    if value is None:
        raise ValueError(f"IDDPM_WINOGRAD_PACKED: expected 1 or 0 (or unset), got {raw!r}")
    return value == "on"


_winograd_packed = _winograd_packed_from_env()


def set_conv_winograd_packed(enabled: bool) -> bool:
    """Let bf16 Winograd convs use the packed weight where the CPU runs it (True, the default) or
    not (False); returns the previous setting. The two forms are cached under separate keys, so
    switching back and forth transforms each weight once per form."""
    global _winograd_packed
    if not isinstance(enabled, bool):
        raise ValueError(f"enabled: expected True or False, got {enabled!r}")
    previous, _winograd_packed = _winograd_packed, enabled
    return previous


@contextlib.contextmanager
def _scoped(setter, value):
    """``setter(value)`` for the body of a with statement, then the previous value again (setter
    returns the previous value)."""
    previous = setter(value)
    try:
        yield
    finally:
        setter(previous)


def conv_winograd_packed(enabled: bool):
    """Context manager: ``with conv_winograd_packed(False): ...`` (one use per call)."""
    return _scoped(set_conv_winograd_packed, enabled)


_winograd_available = None


def _winograd_kernel() -> bool:
    global _winograd_available
    if _winograd_available is None:
        _winograd_available = _winograd_ops.available()
    return _winograd_available


def _winograd_geometry(conv: nn.Module) -> bool:
    """Whether ``conv`` is a convolution the Winograd kernel computes: 2-D, 3×3, stride 1, zero
    padding 1, dilation 1, one group (and ``_C`` has the kernel)."""
    return (
        isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.padding_mode == "zeros"
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and _winograd_kernel()
    )


def _foldable(residual, dtype: torch.dtype, out_shape: tuple) -> bool:
    """Whether the Winograd kernel can add ``residual`` to its output itself: a plain CPU tensor of
    the compute dtype and the output's shape."""
    return (
        residual is not None
        and type(residual) is torch.Tensor
        and residual.dtype == dtype
        and residual.device.type == "cpu"
        and tuple(residual.shape) == tuple(out_shape)
    )


def _amx() -> bool:
    return _loader.cpu_has_amx()


class _PrepackedForward:
    """A conv module's forward that runs oneDNN's packed conv when it can (see above).

    Installed as the module's instance attribute ``forward``; holds the packed weights (never part
    of the state_dict; dropped on copy and pickling, rebuilt lazily on the next call).
    """

    _MAX_ENTRIES = 4  # per module: (dtype, input shape) pairs kept

    def __init__(self, conv: nn.Module, dtypes=(torch.float32, torch.bfloat16)):
        self.conv = conv  # geometry read lazily: copy/unpickle builds this before conv's attributes
        self.dtypes = tuple(dtypes)  # the compute dtypes that take the packed path
        self._geometry = False
        self.entries: dict = {}

    @property
    def geometry(self):
        if self._geometry is False:
            self._geometry = _conv_geometry(self.conv)
        return self._geometry

    def __deepcopy__(self, memo):
        return _PrepackedForward(copy.deepcopy(self.conv, memo), self.dtypes)

    def __reduce__(self):
        return (_PrepackedForward, (self.conv, self.dtypes))

    def clear(self):
        self.entries.clear()

    def _torch_dtype(self, x):
        """The dtype torch's conv computes this call in, or None where only the plain path may run:
        grad recorded, tracing, not a plain CPU tensor, unprepackable geometry; under CPU autocast
        bf16 for fp32 / bf16 input (other autocast dtypes as torch runs them); else x's dtype where
        weight and bias have it (a mismatch is torch's own error, raised by the plain path)."""
        conv = self.conv
        if (
            self.geometry is None
            or torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            or type(x) is not torch.Tensor
            or x.device.type != "cpu"
            or conv.weight.device.type != "cpu"
            or x.dim() != conv.weight.dim()
        ):
            return None
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
            ok = dtype == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16)
            return dtype if ok else None
        b = conv.bias
        if conv.weight.dtype != x.dtype or (b is not None and b.dtype != x.dtype):
            return None
        return x.dtype

    def _compute_dtype(self, x):
        """The dtype the packed conv would run in, or None if this call must take the plain path."""
        dtype = self._torch_dtype(x)
        if dtype is None or dtype not in self.dtypes:
            return None
        if dtype == torch.float32:
            return dtype
        if dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return dtype
        return None

    def _winograd_dtype(self, x):
        """The dtype this call runs the Winograd conv in (see above), or None for the other paths."""
        mode = _conv_winograd
        if mode == "off":
            return None
        conv = self.conv
        if not _winograd_geometry(conv):
            return None
        dtype = self._torch_dtype(x)
        if (
            dtype not in (torch.float32, torch.bfloat16)
            or conv.weight.dtype not in (torch.float32, torch.bfloat16)  # (autocast casts others)
        ):
            return None
        if dtype == torch.bfloat16 and mode == "fp32":
            return None
        if min(x.shape[2], x.shape[3]) < 1:
            return None  # an empty map: torch's conv raises its own error
        if mode in ("auto", "fp32"):
            if dtype == torch.bfloat16 and _amx():
                return None
            channels = min(conv.in_channels, conv.out_channels)
            size = min(x.shape[2], x.shape[3])
            tiles = x.shape[0] * ((x.shape[2] + 1) // 2) * ((x.shape[3] + 1) // 2)
            if (
                channels < _WINOGRAD_AUTO_MIN_CHANNELS
                or size < _WINOGRAD_AUTO_MIN_SIZE[dtype]
                or tiles < _WINOGRAD_AUTO_MIN_TILES[dtype]
            ):
                return None
        if x.shape[1] != conv.in_channels:
            return None  # the plain path raises torch's own shape error
        return dtype

    def _winograd_weight(self, dtype, tile=2):
        """(transformed weight, bias) in ``dtype`` for F(tile×tile, 3×3), made once per weight
        version (cached)."""
        conv = self.conv
        w, b = conv.weight, conv.bias
        stamp = (w.data_ptr(), w._version, w.dtype, None if b is None else (b.data_ptr(), b._version))
        packed = dtype == torch.bfloat16 and _winograd_packed and _winograd_ops.packable(w, dtype)
        key = ("winograd", dtype, "packed") if packed else ("winograd", dtype, tile)
        entry = self.entries.get(key)
        if entry is None or entry[0] != stamp:
            weight_t = _winograd_ops.winograd_weight(
                w.detach().to(dtype), packed, tile
            )  # (packed: bf16, tile 2)
            if key not in self.entries and len(self.entries) >= self._MAX_ENTRIES:
                self.entries.clear()  # (a stale entry of this key is replaced, the others kept)
            bias = None if b is None else b.detach().to(dtype)
            entry = (stamp, weight_t, bias, w.detach())  # w.detach(): keeps the address taken
            self.entries[key] = entry
        return entry[1], entry[2]

    def _run_winograd(self, x, dtype, residual):
        weight_t, bias = self._winograd_weight(dtype, _winograd_tile(dtype, x))
        x2 = x.to(dtype)
        fold = _foldable(residual, dtype, self._out_shape(x))
        y = _winograd_ops.conv3x3_winograd(x2, weight_t, bias, residual if fold else None)
        if not self._channels_last_out(x2):
            y = y.contiguous()  # torch's conv gives NCHW for NCHW input and weight
        if residual is not None and not fold:
            y = residual + y
        return y

    def _packed(self, x2, dtype):
        conv = self.conv
        w, b = conv.weight, conv.bias
        stamp = (w.data_ptr(), w._version, w.dtype, None if b is None else (b.data_ptr(), b._version))
        key = (dtype, tuple(x2.shape))
        entry = self.entries.get(key)
        if entry is None or entry[0] != stamp:
            padding, stride, dilation = self.geometry
            weight = w.detach().to(dtype)
            if weight.dim() == 3:
                weight = weight.unsqueeze(2)
            packed = torch.ops.mkldnn._reorder_convolution_weight(
                weight, padding, stride, dilation, conv.groups, list(x2.shape)
            )
            bias = None if b is None else b.detach().to(dtype)
            if len(self.entries) >= self._MAX_ENTRIES:
                self.entries.clear()
            # w.detach() keeps the source storage alive, so its address cannot be reused by a new
            # weight while this entry exists (the stamp compares addresses).
            entry = (stamp, packed, bias, w.detach())
            self.entries[key] = entry
        return entry[1], entry[2]

    def run(self, x, residual=None, keep_channels_last=False):
        """conv(x), or residual + conv(x) (one fused oneDNN call where possible).

        ``keep_channels_last``: a 1-D output stays channels-innermost ([N, T, C] in memory, as the
        packed op writes it) instead of being made a contiguous [N, C, T]. No-grad fp32 and bf16
        3×3 calls may run the Winograd conv instead (:func:`set_conv_winograd`)."""
        winograd = self._winograd_dtype(x)
        if winograd is not None:
            return self._run_winograd(x, winograd, residual)
        dtype = self._compute_dtype(x)
        if dtype is None:
            y = self.conv._conv_forward(x, self.conv.weight, self.conv.bias)
            return y if residual is None else residual + y
        one_d = x.dim() == 3
        x2 = x.to(dtype)
        x2 = x2.unsqueeze(2) if one_d else x2
        packed, bias = self._packed(x2, dtype)
        padding, stride, dilation = self.geometry
        groups = self.conv.groups
        fold = (
            residual is not None
            and type(residual) is torch.Tensor
            and residual.dtype == dtype
            and tuple(residual.shape) == self._out_shape(x)
        )
        if fold:
            other = residual.unsqueeze(2) if one_d else residual
            y = torch.ops.mkldnn._convolution_pointwise.binary(
                x2, other, packed, bias, padding, stride, dilation, groups, "add", None, None, [], None
            )
        else:
            y = torch.ops.mkldnn._convolution_pointwise(
                x2, packed, bias, padding, stride, dilation, groups, "none", [], ""
            )
        # The packed op always writes channels-last; give the layout torch's conv would give:
        # 2-D: channels-last iff the input or the weight is; 1-D: contiguous [N, C, T].
        if one_d and keep_channels_last:
            pass
        elif not y.is_contiguous() and (one_d or not self._channels_last_out(x2)):
            y = y.contiguous()
        y = y.squeeze(2) if one_d else y
        if residual is not None and not fold:
            y = residual + y
        return y

    def _out_shape(self, x):
        conv = self.conv
        spatial = [
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, p, d, k, s in zip(
                x.shape[2:], conv.padding, conv.dilation, conv.kernel_size, conv.stride
            )
        ]
        return (x.shape[0], conv.out_channels, *spatial)

    def _channels_last_out(self, x2):
        return _torch_conv_channels_last(x2, self.conv.weight)

    def __call__(self, x):
        return self.run(x)


def _torch_conv_channels_last(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch's 2-D conv of ``x`` and ``weight`` gives a channels-last output: iff either is
    channels-last (and not also contiguous, as tensors with size-1 dimensions can be)."""
    cl = torch.channels_last
    x_cl = x.is_contiguous(memory_format=cl) and not x.is_contiguous()
    return x_cl or (
        weight.dim() == 4 and weight.is_contiguous(memory_format=cl) and not weight.is_contiguous()
    )


# -- Winograd 3×3 convolutions in training (CPU) ------------------------------------------------
# With grad recorded, a CPU call of a Conv2d below (conv_nd's 2-D conv: the UNet's) with a 3×3
# kernel, stride 1, padding 1, dilation 1, one group and zero padding may run
# iddpm_ext.ops.winograd.conv3x3_winograd_train: the forward and the input gradient as Winograd
# F(2×2, 3×3) convolutions (float32: F(4×4, 3×3) where set_conv_winograd_tile's rule takes it) on
# weights transformed afresh each call (they change every step), the
# float32 weight gradient by the Winograd transforms too (below), the other gradients as torch
# computes them. The compute dtype is torch's (the input's = the
# weight's, or bf16 under CPU bf16 autocast, casting as autocast's conv does); the output has the
# layout torch's conv gives; conv_add folds the residual into the kernel. Modes:
#   "off": never;
#   "auto": float32 calls within _WINOGRAD_TRAIN_AUTO's bounds (below; channels-last or NCHW input):
#   as accurate as the direct conv with F(2×2) (tests/ops/test_winograd_train.py; F(4×4), which
#   set_conv_winograd_tile's rule takes for large maps, ~4× that error) and measured faster here
#   (iddpm bench train, docs/training.md);
#   "on": every such call, float32 and bfloat16, either layout (bf16 rounds the transformed input,
#   weight and products: about 2× a direct bf16 conv's error in the forward and the input
#   gradient; the channels-last bf16 step measured 0.98-1.03x / 1.00-1.07x for those two models).
# Not while torch.compile or torch.jit.trace traces, nor under torch.func transforms or forward-mode
# AD; a backward with create_graph computes every gradient by torch's differentiable conv backward.
# Models switched to_inference() keep their prepacked forward (torch's conv) when trained.
# Default from IDDPM_CONV_WINOGRAD_TRAIN=auto/1/0 (unset: auto).
# The float32 weight gradient of those calls (set_conv_winograd_weight_grad, default from
# IDDPM_CONV_WINOGRAD_WEIGHT_GRAD=auto/1/0): "auto" by conv3x3_winograd_weight_grad where Cin or
# Cout >= 64 (iddpm bench conv --passes wgrad), "on" always, "off" torch's.
_WINOGRAD_TRAIN_MODES = ("auto", "on", "off")
# "auto"'s float32 calls per input layout: (min(Cin, Cout), max(Cin, Cout), min(H, W), N·H·W) at
# least: where one conv's forward + backward measured faster than torch's (iddpm bench conv --passes
# train, docs/training.md). Below them the per-call weight transforms outweigh a small map's work
# (e.g. 8×256×4×4), or 32-channel GEMMs gain too little; NCHW pays the kernel's layout copies: its
# 64-channel convs gained 1.14-1.33x alone but the digits model's NCHW step none (0.93-0.97x,
# iddpm bench train), so NCHW needs 128 channels (the CIFAR-10 and ImageNet-64 models' convs). NCHW
# from 512 pixels since the weight gradient's Gᵀ dU G became one GEMM (8×256×256×8×8, 512 pixels:
# 1.14× torch's training call, docs/perf/unet-cpu-winograd-f4-2026-11-29; it was 1024).
_WINOGRAD_TRAIN_AUTO = {"channels_last": (32, 64, 4, 256), "nchw": (128, 128, 4, 512)}


def _winograd_train_mode_from_env() -> str:
    return _env_mode("IDDPM_CONV_WINOGRAD_TRAIN", _WINOGRAD_TRAIN_MODES, "auto, 1 or 0")


_conv_winograd_train = _winograd_train_mode_from_env()


def _winograd_weight_grad_mode_from_env() -> str:
    return _env_mode("IDDPM_CONV_WINOGRAD_WEIGHT_GRAD", _winograd_ops.WEIGHT_GRAD_MODES, "auto, 1 or 0")


_conv_winograd_weight_grad = _winograd_weight_grad_mode_from_env()


def set_conv_winograd_train(mode: str | bool) -> str:
    """Set how training calls of :class:`Conv2d` run 3×3 convs ("auto", "on", "off"; True / False
    for on / off); returns the previous mode."""
    global _conv_winograd_train
    previous, _conv_winograd_train = _conv_winograd_train, _checked_mode(mode, _WINOGRAD_TRAIN_MODES)
    return previous


def get_conv_winograd_train() -> str:
    return _conv_winograd_train


def set_conv_winograd_weight_grad(mode: str | bool) -> str:
    """Set how the Winograd training convs compute float32 weight gradients ("auto", "on": by
    iddpm::conv3x3_winograd_weight_grad, "off": by torch; True / False for on / off); returns the
    previous mode."""
    global _conv_winograd_weight_grad
    previous = _conv_winograd_weight_grad
    _conv_winograd_weight_grad = _checked_mode(mode, _winograd_ops.WEIGHT_GRAD_MODES)
    return previous


def get_conv_winograd_weight_grad() -> str:
    return _conv_winograd_weight_grad


def conv_winograd_weight_grad(mode: str | bool):
    """Context manager: ``with conv_winograd_weight_grad("off"): loss = ...; loss.backward()``. The
    mode is read by each conv's forward (the backward of a call follows the mode its forward ran
    in), so the forward must run inside."""
    return _scoped(set_conv_winograd_weight_grad, mode)


def conv_winograd_train(mode: str | bool):
    """Context manager: ``with conv_winograd_train("auto"): loss = ...; loss.backward()``. The mode
    is read by each conv's forward (its backward follows), so the forward must run inside."""
    return _scoped(set_conv_winograd_train, mode)


def _forward_ad_level() -> int:
    """The innermost ``torch.autograd.forward_ad.dual_level`` entered (-1: none)."""
    import torch.autograd.forward_ad as forward_ad

    return getattr(forward_ad, "_current_level", -1)


def _functorch_wrapped(x: torch.Tensor | None) -> bool:
    """Whether ``x`` is a torch.func transform's wrapper (grad, vmap, jvp: plain Tensor type)."""
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(x is not None and wrapped is not None and wrapped(x))


def _winograd_train_dtype(conv: nn.Conv2d, x) -> torch.dtype | None:
    """The dtype a training call ``conv(x)`` runs the Winograd conv in (see above), or None."""
    mode = _conv_winograd_train
    if (
        mode == "off"
        or not torch.is_grad_enabled()
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
    ):
        return None
    w, b = conv.weight, conv.bias
    if (
        type(x) is not torch.Tensor
        or any(_functorch_wrapped(t) for t in (x, w, b))  # torch.func: the kernel has no batching rule
        or _forward_ad_level() >= 0  # forward-mode AD (dual tensors): the Function has no jvp
        or x.device.type != "cpu"
        or w.device.type != "cpu"
        or x.dim() != 4
        or x.shape[1] != conv.in_channels
        or min(x.shape[2], x.shape[3]) < 1  # (torch's conv raises its error for an empty map)
        or not _winograd_geometry(conv)
    ):
        return None
    floats = (torch.float32, torch.bfloat16)
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        if dtype != torch.bfloat16 or x.dtype not in floats or w.dtype not in floats:
            return None
    else:
        dtype = x.dtype
        if dtype not in floats or w.dtype != dtype or (b is not None and b.dtype != dtype):
            return None
    if mode == "auto":
        if x.is_contiguous():
            layout = "nchw"
        elif x.is_contiguous(memory_format=torch.channels_last):
            layout = "channels_last"
        else:
            return None
        min_c, max_c, min_size, min_pixels = _WINOGRAD_TRAIN_AUTO[layout]
        cin, cout = conv.in_channels, conv.out_channels
        N, _, H, W = x.shape
        if (
            dtype != torch.float32
            or min(cin, cout) < min_c
            or max(cin, cout) < max_c
            or min(H, W) < min_size
            or N * H * W < min_pixels
        ):
            return None
    return dtype


def winograd_train_takes(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether a training call ``conv(x)`` (grad enabled) runs the Winograd conv in the current mode."""
    with torch.enable_grad():
        return _winograd_train_dtype(conv, x) is not None


def _run_winograd_train(conv: nn.Conv2d, x: torch.Tensor, dtype: torch.dtype, residual=None) -> torch.Tensor:
    """``conv(x)`` (or ``residual + conv(x)``) by conv3x3_winograd_train in ``dtype``."""
    x2 = x.to(dtype)
    weight = conv.weight.to(dtype)
    bias = None if conv.bias is None else conv.bias.to(dtype)
    out_cl = _torch_conv_channels_last(x2, conv.weight)
    fold = _foldable(residual, dtype, (x.shape[0], conv.out_channels, x.shape[2], x.shape[3])) and (
        residual.is_contiguous(memory_format=torch.channels_last if out_cl else torch.contiguous_format)
    )  # (a residual in the other layout: torch's add decides the sum's layout)
    y = _winograd_ops.conv3x3_winograd_train(
        x2,
        weight,
        bias,
        residual if fold else None,
        _conv_winograd_weight_grad,
        _winograd_tile(dtype, x, True),
    )
    if not out_cl:
        y = _winograd_ops.to_layout(y, False)  # torch's conv gives NCHW for NCHW input and weight
    if residual is not None and not fold:
        y = residual + y
    return y


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` whose training calls may run the Winograd conv (:func:`set_conv_winograd_train`:
    by default the fp32 calls of the "auto" rule, channels-last or NCHW): the same parameters,
    state_dict and results up to float rounding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # (TorchScript compiles only nn.Conv2d's own call)
            dtype = _winograd_train_dtype(self, x)
            if dtype is not None:
                return _run_winograd_train(self, x, dtype)
        return self._conv_forward(x, self.weight, self.bias)


def set_conv_prepack(module: nn.Module, enabled: bool | str) -> nn.Module:
    """Turn prepacked convolutions on or off for every Conv1d/Conv2d in ``module`` (in place).

    True: each such conv's forward runs oneDNN's packed conv for eval-style fp32 and bf16 CPU calls
    (see above); "bf16": for bf16 calls only (bf16 weights, or fp32 weights under bf16 autocast);
    False: the module's own forward again, packed copies freed. Returns ``module``.
    """
    if enabled not in (True, False, "bf16"):
        raise ValueError(f"prepack: expected True, False, 'bf16' or None, got {enabled!r}")
    dtypes = (torch.bfloat16,) if enabled == "bf16" else (torch.float32, torch.bfloat16)
    for m in module.modules():
        if not isinstance(m, (nn.Conv1d, nn.Conv2d)):
            continue
        if enabled and _conv_geometry(m) is not None:
            m.forward = _PrepackedForward(m, dtypes)  # a fresh one: no stale packed weights
        elif isinstance(m.__dict__.get("forward"), _PrepackedForward):
            del m.forward
    return module


def conv_prepack_enabled(conv: nn.Module) -> bool:
    """Whether ``conv`` has prepacking on (:func:`set_conv_prepack`)."""
    return isinstance(conv.__dict__.get("forward"), _PrepackedForward)


def clear_conv_prepack(module: nn.Module) -> None:
    """Free the packed weight copies in ``module`` (they are rebuilt on the next eval-style call)."""
    for m in module.modules():
        fwd = m.__dict__.get("forward")
        if isinstance(fwd, _PrepackedForward):
            fwd.clear()


def conv_add(conv: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + conv(x)``; with prepacking on (or a training call that runs the Winograd conv,
    :func:`set_conv_winograd_train`), the add is folded into the conv."""
    hooked = conv._forward_hooks or conv._forward_pre_hooks
    fwd = conv.__dict__.get("forward")
    if isinstance(fwd, _PrepackedForward) and not hooked:
        return fwd.run(x, residual)
    if isinstance(conv, Conv2d) and fwd is None and not hooked:
        dtype = _winograd_train_dtype(conv, x)
        if dtype is not None:
            return _run_winograd_train(conv, x, dtype, residual)
    return residual + conv(x)


def channels_innermost(x: torch.Tensor) -> bool:
    """Whether a [N, C, T] tensor has its channels innermost in memory ([N, T, C], stride 1 on C):
    what a channels-last [N, C, H, W] activation gives when flattened to [N, C, H·W]."""
    if x.dim() != 3 or x.shape[1] < 2 or x.shape[2] < 2:
        return False
    return x.stride(1) == 1 and x.stride(2) == x.shape[1]


def canonical_channels_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or for a 4-D channels-last tensor whose size-1 dimensions carry strides other
    than the canonical (H·W·C, 1, W·C, C) the same elements viewed with those: a view of an
    [1, C, T] tensor as [1, C, H, W] gets batch stride C, and ``torch.cat`` then reads it as NCHW
    (its output, and every conv after it, left channels-last). Addresses are unchanged: a
    size-1 dimension's stride is never used."""
    if t.dim() != 4 or not t.is_contiguous(memory_format=torch.channels_last):
        return t
    _, c, h, w = t.shape
    want = (h * w * c, 1, w * c, c)
    return t if t.stride() == want else t.as_strided(t.shape, want, t.storage_offset())


def conv1x1_channels_innermost(
    conv: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """``conv(x)`` (or ``residual + conv(x)``) for a 1×1 ``nn.Conv1d`` and an [N, C, T] ``x`` with
    channels innermost (:func:`channels_innermost`), the output in that layout too, where torch's
    conv1d would return a contiguous [N, C', T] (a copy). The packed conv when prepacking is on
    (residual add fused), else torch's conv2d on the [N, C, 1, T] channels-last view; the module's
    own forward for anything else (other kernels, hooks, contiguous x). Same values, autograd and
    autocast as ``conv(x)``."""
    plain = (
        not isinstance(conv, nn.Conv1d)
        or conv.kernel_size != (1,)
        or conv.stride != (1,)
        or conv.padding not in ((0,), "valid")
        or conv.dilation != (1,)
        or conv._forward_hooks
        or conv._forward_pre_hooks
        or not channels_innermost(x)
    )
    if plain:
        return conv(x) if residual is None else residual + conv(x)
    fwd = conv.__dict__.get("forward")
    if isinstance(fwd, _PrepackedForward) and fwd._compute_dtype(x) is not None:
        return fwd.run(x, residual, keep_channels_last=True)
    weight = conv.weight.unsqueeze(2)  # [C', C/groups, 1, 1]
    y = F.conv2d(x.unsqueeze(2), weight, conv.bias, 1, 0, 1, conv.groups).squeeze(2)
    return y if residual is None else residual + y


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
    # In the reference's order, -log(P)·i first, then / half, so the float32 rounding (and the
    # embedding, bit for bit on the CPU) is the same for every dim, not only powers of two.
    i = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(-math.log(max_period) * i / half)  # [half]
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


class CheckpointFunction:
    """The reference's checkpointing Function, for code that calls
    ``CheckpointFunction.apply(func, len(inputs), *inputs, *params)`` itself: the same as
    ``checkpoint(func, inputs, params)`` (recomputed in backward, through torch's
    non-reentrant checkpoint)."""

    @staticmethod
    def apply(run_function, length, *args):
        return checkpoint(run_function, tuple(args[:length]), tuple(args[length:]), True)
