"""iddpm::conv3x3_winograd — a CPU float32 / bfloat16 3×3 convolution (stride 1, padding 1, dilation 1, one
group) by Winograd's F(2×2, 3×3), or in float32 F(4×4, 3×3) (csrc/ops/winograd.cpp; transforms
csrc/cpu/winograd*).

The output is cut into 2×2 tiles; each tile's 4×4 input patch d and each 3×3 filter g are
transformed (``Bᵀ d B``, ``G g Gᵀ``), multiplied pointwise over the 16 points (16 GEMMs
[tiles, Cin] @ [Cin, Cout]) and transformed back (``Aᵀ M A``): 16 multiplies per output tile and
channel pair instead of 36. The transform matrices hold 0, ±1 and ±½, so in float32 the result is
as accurate as a direct fp32 convolution (tests/ops/test_winograd.py measures both against
float64). In bfloat16 the transformed input and weight and the GEMMs' products are rounded to bf16
(float32 arithmetic in between): 0.9–2.7× the max error of torch's direct bf16 convolution (which
rounds only its output) over the tests' cases, 1.4–2.5× at the UNet's shapes, within the UNet's
bf16 error budget (docs/unet.md).

- :func:`winograd_weight` — the transformed weight [16, Cin, Cout] of a [Cout, Cin, 3, 3] weight
  (computed in float64, rounded once), made once per weight (``iddpm_ext.nn`` caches it); with
  ``packed=True`` (bf16, even Cin, Cout a multiple of 32, a CPU with AVX512-BF16:
  :func:`packed_available`) packed as [16, Cout/32, Cin/2, 64] for the VDPBF16PS GEMMs of
  csrc/cpu/winograd_packed.cpp, which run per block of tiles whose transformed input stays in
  the L2 cache and keep the GEMMs' products in float32 (not rounded to bf16) for the output
  transform.
- :func:`conv3x3_winograd` — ``conv2d(x, weight, bias, 1, 1) + residual`` from that weight;
  x [N, Cin, H, W] (channels-last is read in place), output channels-last.
- :func:`available` — whether ``_C`` has the kernel (CPU, float32 and bfloat16).
- :func:`conv3x3_winograd_train` — the same convolution from the [Cout, Cin, 3, 3] weight itself,
  with gradients (training): the forward and the input gradient (a 3×3 convolution of grad_out
  with the flipped, channel-transposed filter) run the Winograd kernel on weights transformed
  afresh each call (one small GEMM each, in float32); the float32 weight gradient is
  :func:`conv3x3_winograd_weight_grad` (``weight_grad``: by default where Cin or Cout ≥ 64), the
  others torch's own (``aten::convolution_backward``, oneDNN on the CPU).
- :func:`conv3x3_winograd_weight_grad` — the weight gradient of that convolution from x and the
  output's gradient, by the same transforms (float32).

``tile=4`` (float32 only) runs Winograd's F(4×4, 3×3) instead: 4×4 output tiles from 6×6 patches,
36 GEMMs, 2.25 multiplies per output and channel pair instead of F(2×2)'s 4 (direct: 9), with
transform coefficients up to 8 (points 0, ±1, ½, -2): about 4× F(2×2)'s float32 rounding error
(~1e-6 relative to the output at the UNet's shapes, against ~3e-7 for F(2×2) and ~2e-7 for the
direct conv; tests/ops/test_winograd_f4.py). The transformed weight is then [36, Cin, Cout]; the
conv reads the variant from its first dimension.

The ops themselves have no autograd formula (differentiating through them raises); gradients
come only through :func:`conv3x3_winograd_train`.
"""

from __future__ import annotations

import functools

import torch

from . import checks, loader


def available() -> bool:
    """True when ``_C`` is loaded and has the CPU Winograd kernel."""
    return loader.available() and loader.capabilities()["winograd"]["cpu"] is not None


@functools.cache
def packed_available() -> bool:
    """True when this CPU runs the packed bf16 weight (``winograd_weight(w, packed=True)``);
    asked once (``iddpm_ext.nn`` asks per conv call)."""
    return available() and bool(loader.capabilities()["winograd"]["cpu"].get("packed"))


def packed_refusal(dtype: torch.dtype, cin: int, cout: int) -> str | None:
    """Why ``winograd_weight(w, packed=True)`` refuses a [cout, cin, 3, 3] weight of ``dtype`` here
    (csrc/ops/winograd.cpp's check_packable, in its order and words), or None where it takes it."""
    if dtype != torch.bfloat16:
        return f"the packed form is bf16 only, got {checks.dtype_name(dtype)}"
    if not (cin > 0 and cin % 2 == 0 and cout > 0 and cout % PACK_COLS == 0):
        return (
            f"the packed form needs an even Cin and a Cout that is a multiple of {PACK_COLS}, "
            f"got Cin = {cin}, Cout = {cout}"
        )
    if not packed_available():
        return (
            "the packed form needs a CPU with AVX512-BF16 (this one has none; "
            "capabilities()['winograd']['cpu']['packed'] is False)"
        )
    return None


def packable(weight: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """True when ``winograd_weight(weight.to(dtype), packed=True)`` takes this [Cout, Cin, 3, 3]
    weight here (dtype: the weight's own by default)."""
    return packed_refusal(dtype or weight.dtype, weight.shape[1], weight.shape[0]) is None


TILES = (2, 4)  # F(2×2, 3×3) and F(4×4, 3×3)


def winograd_weight(
    weight: torch.Tensor, packed: bool = False, tile: int = 2, flip: bool = False
) -> torch.Tensor:
    """[Cout, Cin, 3, 3] float32 or bfloat16 CPU weight (any strides) -> [16, Cin, Cout] of its
    dtype (``G g Gᵀ`` per filter, computed in float64 and rounded once); ``packed``: bf16 only,
    [16, Cout/32, Cin/2, 64] (:func:`packable`); ``tile=4``: F(4×4, 3×3)'s [36, Cin, Cout]
    (float32 only, not packed); ``flip``: of the filters rotated by 180° (``weight.flip(2, 3)``'s,
    without the copy; of ``weight.transpose(0, 1)``: the input gradient's transformed weight)."""
    loader.require()
    return torch.ops.iddpm.winograd_weight(weight, packed, tile, flip)


def _train_weight(
    weight: torch.Tensor, dtype: torch.dtype, for_input_grad: bool, tile: int = 2
) -> torch.Tensor:
    """The transformed weight of a [Cout, Cin, 3, 3] weight in ``dtype`` (iddpm::winograd_weight:
    float64, rounded once): [points, Cin, Cout] for the forward; for the input gradient, that of the
    flipped filter with Cin and Cout exchanged, [points, Cout, Cin] (conv2d(grad_out,
    weight.flip(2, 3).transpose(0, 1), padding=1), read in place); points = 16 (tile 2) or 36
    (tile 4)."""
    w = weight.detach().to(dtype)
    if for_input_grad:
        return torch.ops.iddpm.winograd_weight(w.transpose(0, 1), False, tile, True)
    return torch.ops.iddpm.winograd_weight(w, False, tile, False)


WEIGHT_GRAD_MODES = ("auto", "on", "off")
# "auto" takes the Winograd weight gradient where one of Cin, Cout is at least this (with 32 channels
# in and out it gains too little: iddpm bench conv --passes wgrad, docs/training.md).
_WEIGHT_GRAD_AUTO_MIN_CHANNELS = 64


def _winograd_weight_grad(mode: str, dtype: torch.dtype, cin: int, cout: int) -> bool:
    """Whether the weight gradient runs conv3x3_winograd_weight_grad (float32 only) in ``mode``."""
    if mode == "off" or dtype != torch.float32:
        return False
    return mode == "on" or max(cin, cout) >= _WEIGHT_GRAD_AUTO_MIN_CHANNELS


class _Conv3x3WinogradTrain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, weight_grad, tile):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.weight_grad = weight_grad
        ctx.tile = tile
        return torch.ops.iddpm.conv3x3_winograd(
            x, _train_weight(weight, x.dtype, False, tile), bias, residual
        )

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        need_b = need_b and ctx.has_bias
        bias_sizes = [weight.shape[0]] if ctx.has_bias else None
        # With create_graph (grad mode on here) every gradient comes from torch's own conv backward,
        # which has a derivative (gradient penalties, Hessian-vector products); else the input
        # gradient is a Winograd conv of grad_out with the flipped filter, and the weight gradient
        # one too where ctx.weight_grad takes it (then the bias gradient is grad_out's sum). No
        # autocast either way (a backward called inside an autocast region).
        create_graph = torch.is_grad_enabled()
        winograd_x = need_x and not create_graph
        winograd_w = (
            need_w
            and not create_graph
            and _winograd_weight_grad(ctx.weight_grad, x.dtype, weight.shape[1], weight.shape[0])
        )
        torch_grads = [need_x and not winograd_x, need_w and not winograd_w, need_b and not winograd_w]
        # both kernels read grad_out channels-last: converted once for them (torch's backward and the
        # residual's gradient take it as it came)
        grad_cl = to_layout(grad_out, True) if winograd_x or winograd_w else None
        with torch.autocast("cpu", enabled=False):
            grad_x = grad_w = grad_b = None
            if any(torch_grads):
                grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
                    grad_out, x, weight, bias_sizes, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, torch_grads
                )  # fmt: skip
            if winograd_w:
                grad_w = torch.ops.iddpm.conv3x3_winograd_weight_grad(x, grad_cl, ctx.tile)
                if need_b:
                    grad_b = grad_cl.sum((0, 2, 3))
            if winograd_x:
                grad_x = torch.ops.iddpm.conv3x3_winograd(
                    grad_cl, _train_weight(weight, grad_out.dtype, True, ctx.tile)
                )
                if not x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous():
                    grad_x = to_layout(grad_x, False)  # x's own layout (the kernel writes channels-last)
        return grad_x, grad_w, grad_b, grad_out if need_r else None, None, None


def _check_tile(tile, t, name):
    """tile 2 or 4; 4 only for float32 (csrc/ops/winograd.cpp's check_tile, its words)."""
    if tile not in TILES:
        raise ValueError(f"tile: expected 2 (F(2x2, 3x3)) or 4 (F(4x4, 3x3)), got {tile!r}")
    if tile == 4 and t.dtype != torch.float32:
        raise ValueError(f"{name}: tile=4 (F(4x4, 3x3)) is float32 only, got {checks.dtype_name(t.dtype)}")


def conv3x3_winograd_train(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    weight_grad: str = "auto",
    tile: int = 2,
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride=1, padding=1) (+ residual)`` with gradients for every
    argument, channels-last output (the kernel's).

    x: [N, Cin, H, W] CPU float32 or bfloat16; weight: [Cout, Cin, 3, 3]; bias: [Cout] or None;
    residual: [N, Cout, H, W] or None; all of x's dtype. In float32 the forward and the input
    gradient are as accurate as a direct convolution with tile=2 (F(4×4), tile=4: ~4× that error,
    ~1e-6 relative, see above); in bfloat16 they round the transformed
    input, weight and products to bf16 (~2× a direct bf16 convolution's error, see above).
    weight_grad: how the weight gradient is computed in float32, "on" by
    :func:`conv3x3_winograd_weight_grad`, "off" by torch, "auto" (default) by the former where
    Cin or Cout is at least 64 (bf16: always torch's); fixed by this call for its backward.
    tile: 2 (F(2×2, 3×3)) or 4 (F(4×4, 3×3), float32 only) for the forward, the input gradient and
    the Winograd weight gradient."""
    loader.require()
    if weight_grad not in WEIGHT_GRAD_MODES:
        raise ValueError(f"weight_grad: expected 'auto', 'on' or 'off', got {weight_grad!r}")
    checks.defined(x, "x")
    checks.defined(weight, "weight")
    _check_tensor(x, "x")
    _check_weight_shape(weight)
    _check_tensor(weight, "weight", x, "x")
    torch._check_value(
        x.dim() == 4 and x.shape[1] == weight.shape[1],
        lambda: (
            f"x: expected shape [N, {weight.shape[1]}, H, W] (Cin = dim 1 of weight), got {list(x.shape)}"
        ),
    )
    _check_bias_residual(x, bias, residual, weight.shape[0], "weight")
    _check_tile(tile, x, "x")
    return _Conv3x3WinogradTrain.apply(x, weight, bias, residual, weight_grad, tile)


def to_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """x in channels-last (True) or contiguous NCHW (False) memory format: x itself where it already
    is, else ``iddpm::convert_layout`` (4-D CPU float32/bf16 in the other layout: a blocked
    transpose, faster than torch's strided ``contiguous``; else torch's copy), with gradient
    (passed through unchanged, in whatever layout it comes)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if x.is_contiguous(memory_format=fmt):
        return x
    if x.dim() != 4 or x.device.type != "cpu" or not available():
        return x.contiguous(memory_format=fmt)
    return torch.ops.iddpm.convert_layout(x, channels_last)


def conv3x3_winograd_weight_grad(x: torch.Tensor, grad_y: torch.Tensor, tile: int = 2) -> torch.Tensor:
    """The weight gradient [Cout, Cin, 3, 3] of ``F.conv2d(x, weight, padding=1)`` given the output's
    gradient ``grad_y`` [N, Cout, H, W], by the Winograd transforms: per output tile (2×2, or 4×4
    with ``tile=4``), the input patch's ``Bᵀ d B`` and ``A dY Aᵀ`` (the output transform's
    adjoint), 16 (36) GEMMs reducing over the tiles, then ``Gᵀ dU G`` for every filter as one
    float32 GEMM. CPU float32 only (any layout; float32 also inside an autocast region). tile=2:
    as accurate as torch's weight gradient (within 3× its error, tests/ops/test_winograd_weight_grad.py);
    tile=4: 2.5–5× F(2×2)'s error (up to ~6× torch's at the UNet's shapes), faster from about 128
    tiles of 4×4 (iddpm bench conv --passes wgrad). Non-finite inputs give non-finite gradients,
    though not always torch's: an Inf becomes NaN where the transforms subtract it from itself,
    and values beyond ~FLT_MAX/4 (tile=4: ~FLT_MAX/64) overflow in the transforms' sums."""
    loader.require()
    return torch.ops.iddpm.conv3x3_winograd_weight_grad(x, grad_y, tile)


def conv3x3_winograd(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride=1, padding=1) (+ residual)``, channels-last output.

    x: [N, Cin, H, W] CPU, float32 or bfloat16; weight_t: :func:`winograd_weight` of the
    [Cout, Cin, 3, 3] weight (plain, or packed for bf16); bias: [Cout] or None; residual:
    [N, Cout, H, W] or None (added to the output); all of x's dtype, as is the output. A
    ``tile=4`` weight_t ([36, Cin, Cout], float32) runs F(4×4, 3×3)."""
    loader.require()
    return torch.ops.iddpm.conv3x3_winograd(x, weight_t, bias, residual)


# ---------------------------------------------------------------------------------
# fake (meta) implementations: csrc/ops/winograd.cpp's checks, in their order and words
# ---------------------------------------------------------------------------------


DTYPES = (torch.float32, torch.bfloat16)  # csrc/cpu/winograd.h's kWinogradDtypes
PACK_COLS = 32  # common/winograd_params.h's kWinogradPackCols


def _check_packable(t, cin, cout, name):
    refusal = packed_refusal(t.dtype, cin, cout)
    if refusal is not None:
        raise ValueError(f"{name}: {refusal}")


def _check_weight_shape(weight):
    torch._check_value(
        weight.dim() == 4 and weight.shape[2] == 3 and weight.shape[3] == 3,
        lambda: f"weight: expected shape [Cout, Cin, 3, 3], got {list(weight.shape)}",
    )


def _check_bias_residual(x, bias, residual, cout, weight_name):
    """bias [Cout] (Cout from ``weight_name``) and residual [N, Cout, H, W] of x's dtype and device."""
    N, _, H, W = x.shape
    if bias is not None:
        _check_tensor(bias, "bias", x, "x")
        cond = bias.dim() == 1 and bias.shape[0] == cout
        checks.shape(cond, "bias", (cout,), bias, f" ([Cout] of {weight_name})")
    if residual is not None:
        _check_tensor(residual, "residual", x, "x")
        out = (N, cout, H, W)
        checks.shape(
            residual.dim() == 4 and tuple(residual.shape) == out,
            "residual",
            out,
            residual,
            " (that of the output)",
        )


def _check_tensor(t, name, ref=None, ref_name=""):
    checks.defined(t, name)
    if ref is not None:
        checks.same_device(t, name, ref, ref_name)
    checks.cpu_only(t, name)
    if t.dtype not in DTYPES:
        raise ValueError(f"{name}: expected dtype float32 or bfloat16, got {checks.dtype_name(t.dtype)}")
    if ref is not None and t.dtype != ref.dtype:
        raise ValueError(
            f"{name}: expected dtype {checks.dtype_name(ref.dtype)} (that of {ref_name}), "
            f"got {checks.dtype_name(t.dtype)}"
        )


if loader.available():

    @torch.library.register_fake("iddpm::winograd_weight")
    def _winograd_weight_fake(weight, packed=False, tile=2, flip=False):
        checks.defined(weight, "weight")
        _check_weight_shape(weight)
        _check_tensor(weight, "weight")
        _check_tile(tile, weight, "weight")
        cout, cin = weight.shape[0], weight.shape[1]
        if packed and tile != 2:
            raise ValueError(f"packed: the packed form is F(2x2, 3x3) (tile=2) only, got tile={tile}")
        if packed:
            _check_packable(weight, cin, cout, "weight")
            return weight.new_empty((16, cout // PACK_COLS, cin // 2, 2 * PACK_COLS))
        return weight.new_empty(((tile + 2) ** 2, cin, cout))

    @torch.library.register_fake("iddpm::conv3x3_winograd")
    def _conv3x3_winograd_fake(x, weight_t, bias=None, residual=None):
        checks.defined(x, "x")
        checks.dim(x, "x", 4, "[N, Cin, H, W]")
        _check_tensor(x, "x")
        _check_tensor(weight_t, "weight_t", x, "x")
        N, Cin, H, W = x.shape
        if weight_t.dim() == 4:
            torch._check_value(
                weight_t.shape[0] == 16
                and weight_t.shape[2] * 2 == Cin
                and weight_t.shape[3] == 2 * PACK_COLS,
                lambda: (
                    f"weight_t: expected shape [16, Cout/32, {Cin // 2}, 64] (winograd_weight(weight, "
                    f"packed=True) of a [Cout, Cin, 3, 3] weight, Cin = dim 1 of x = {Cin}) or "
                    f"[16 or 36, {Cin}, Cout], got {list(weight_t.shape)}"
                ),
            )
            Cout = weight_t.shape[1] * PACK_COLS
            _check_packable(weight_t, Cin, Cout, "weight_t")
        else:
            torch._check_value(
                weight_t.dim() == 3 and weight_t.shape[0] in (16, 36) and weight_t.shape[1] == Cin,
                lambda: (
                    f"weight_t: expected shape [16, {Cin}, Cout] or [36, {Cin}, Cout] (winograd_weight of "
                    f"a [Cout, Cin, 3, 3] weight with tile=2 or 4, Cin = dim 1 of x), "
                    f"got {list(weight_t.shape)}"
                ),
            )
            _check_tile(2 if weight_t.shape[0] == 16 else 4, weight_t, "weight_t")
            Cout = weight_t.shape[2]
        _check_bias_residual(x, bias, residual, Cout, "weight_t")
        return x.new_empty((N, Cout, H, W)).contiguous(memory_format=torch.channels_last)

    @torch.library.register_fake("iddpm::conv3x3_winograd_weight_grad")
    def _conv3x3_winograd_weight_grad_fake(x, grad_y, tile=2):
        checks.defined(x, "x")
        checks.dim(x, "x", 4, "[N, Cin, H, W]")
        checks.cpu_only(x, "x")
        if x.dtype != torch.float32:
            raise ValueError(
                f"x: expected dtype float32 (the weight gradient op is float32 only), "
                f"got {checks.dtype_name(x.dtype)}"
            )
        checks.defined(grad_y, "grad_y")
        checks.same_device(grad_y, "grad_y", x, "x")
        if grad_y.dtype != x.dtype:
            raise ValueError(
                f"grad_y: expected dtype float32 (that of x), got {checks.dtype_name(grad_y.dtype)}"
            )
        N, Cin, H, W = x.shape
        torch._check_value(
            grad_y.dim() == 4 and grad_y.shape[0] == N and grad_y.shape[2] == H and grad_y.shape[3] == W,
            lambda: (
                f"grad_y: expected shape [{N}, Cout, {H}, {W}] (N, H and W of x), got {list(grad_y.shape)}"
            ),
        )
        _check_tile(tile, x, "x")
        return x.new_empty((grad_y.shape[1], Cin, 3, 3))

    @torch.library.register_fake("iddpm::convert_layout")
    def _convert_layout_fake(x, channels_last):
        checks.defined(x, "x")
        checks.dim(x, "x", 4, "[N, C, H, W]")
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return torch.empty_like(x, memory_format=fmt)

    def _convert_layout_backward(ctx, grad):
        return grad, None  # the same values: the gradient passes through

    torch.library.register_autograd("iddpm::convert_layout", _convert_layout_backward)

    def _no_backward(ctx, grad):
        raise RuntimeError(
            "iddpm::conv3x3_winograd, winograd_weight and conv3x3_winograd_weight_grad have no gradient "
            "formula: "
            "differentiate through F.conv2d or conv3x3_winograd_train instead"
        )

    torch.library.register_autograd("iddpm::conv3x3_winograd", _no_backward)
    torch.library.register_autograd("iddpm::winograd_weight", _no_backward)
    torch.library.register_autograd("iddpm::conv3x3_winograd_weight_grad", _no_backward)
