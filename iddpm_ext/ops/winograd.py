"""iddpm::conv3x3_winograd — a CPU float32 / bfloat16 3×3 convolution (stride 1, padding 1, dilation 1, one
group) by Winograd's F(2×2, 3×3) (csrc/ops/winograd.cpp; transforms csrc/cpu/winograd*).

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

Inference only: the op has no autograd formula (differentiating through it raises).
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


def winograd_weight(weight: torch.Tensor, packed: bool = False) -> torch.Tensor:
    """[Cout, Cin, 3, 3] float32 or bfloat16 CPU weight -> [16, Cin, Cout] of its dtype (``G g Gᵀ``
    per filter, computed in float64 and rounded once); ``packed``: bf16 only, [16, Cout/32, Cin/2,
    64] (:func:`packable`)."""
    loader.require()
    return torch.ops.iddpm.winograd_weight(weight, packed)


def conv3x3_winograd(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride=1, padding=1) (+ residual)``, channels-last output.

    x: [N, Cin, H, W] CPU, float32 or bfloat16; weight_t: :func:`winograd_weight` of the
    [Cout, Cin, 3, 3] weight (plain, or packed for bf16); bias: [Cout] or None; residual:
    [N, Cout, H, W] or None (added to the output); all of x's dtype, as is the output."""
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
    def _winograd_weight_fake(weight, packed=False):
        checks.defined(weight, "weight")
        torch._check_value(
            weight.dim() == 4 and weight.shape[2] == 3 and weight.shape[3] == 3,
            lambda: f"weight: expected shape [Cout, Cin, 3, 3], got {list(weight.shape)}",
        )
        _check_tensor(weight, "weight")
        cout, cin = weight.shape[0], weight.shape[1]
        if packed:
            _check_packable(weight, cin, cout, "weight")
            return weight.new_empty((16, cout // PACK_COLS, cin // 2, 2 * PACK_COLS))
        return weight.new_empty((16, cin, cout))

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
                    f"[16, {Cin}, Cout], got {list(weight_t.shape)}"
                ),
            )
            Cout = weight_t.shape[1] * PACK_COLS
            _check_packable(weight_t, Cin, Cout, "weight_t")
        else:
            torch._check_value(
                weight_t.dim() == 3 and weight_t.shape[0] == 16 and weight_t.shape[1] == Cin,
                lambda: (
                    f"weight_t: expected shape [16, {Cin}, Cout] (winograd_weight of a [Cout, Cin, 3, 3] "
                    f"weight, Cin = dim 1 of x), got {list(weight_t.shape)}"
                ),
            )
            Cout = weight_t.shape[2]
        if bias is not None:
            _check_tensor(bias, "bias", x, "x")
            cond = bias.dim() == 1 and bias.shape[0] == Cout
            checks.shape(cond, "bias", (Cout,), bias, " ([Cout] of weight_t)")
        if residual is not None:
            _check_tensor(residual, "residual", x, "x")
            checks.shape(
                residual.dim() == 4 and tuple(residual.shape) == (N, Cout, H, W),
                "residual",
                (N, Cout, H, W),
                residual,
                " (that of the output)",
            )
        return x.new_empty((N, Cout, H, W)).contiguous(memory_format=torch.channels_last)

    def _no_backward(ctx, grad):
        raise RuntimeError(
            "iddpm::conv3x3_winograd / winograd_weight have no gradient (inference only): "
            "differentiate through F.conv2d instead (iddpm_ext.nn runs them for no-grad calls only)"
        )

    torch.library.register_autograd("iddpm::conv3x3_winograd", _no_backward)
    torch.library.register_autograd("iddpm::winograd_weight", _no_backward)
