"""``iddpm bench conv``: the CPU 3×3 convolutions of the UNet, iddpm::conv3x3_winograd against
torch's own convolutions, one conv at a time at the CIFAR-10 UNet's shapes.

Impls, on the same channels-last x [B, Cin, H, W], weight [Cout, Cin, 3, 3] and bias [Cout], in
float32 and bfloat16 (all in that dtype; no autocast):
  torch conv          F.conv2d (channels-last: oneDNN, the weight reordered on every call)
  packed (oneDNN)     mkldnn::_convolution_pointwise on a weight reordered once
                      (what iddpm_ext.nn's prepacked inference convs run; absent where oneDNN
                      has no such conv for the dtype, e.g. bf16 without AVX-512)
  iddpm (winograd)    iddpm::conv3x3_winograd on a weight transformed once (F(2×2, 3×3))
  iddpm (winograd F4) the same by F(4×4, 3×3) (winograd_weight(w, tile=4); float32 only), what
                      iddpm_ext.nn runs for float32 maps of 8×8 and more with at least 32
                      4×4 tiles (set_conv_winograd_tile)
  iddpm (winograd, packed)
                      the same on the packed bf16 weight (winograd_weight(w, packed=True): bf16,
                      CPUs with AVX512-BF16, even Cin, Cout a multiple of 32), what iddpm_ext.nn
                      runs there; its per-forward sum takes the plain Winograd time for the
                      shapes it does not take, as the model does
Per record: ms, TFLOP/s of the direct convolution's 2·B·H·W·Cin·Cout·9 FLOPs (the Winograd conv
does 4/9 of the multiplies, so its figure is an effective rate), ``speedup`` over torch conv,
``vs_packed`` (packed ms over this row's), ``err`` (max error against float64 on the same inputs,
relative to the output's max) and ``per_forward`` (how many convs of this shape one forward of the
CIFAR-10 UNet runs; 0: not in the model). After each dtype one ``conv3x3 per forward`` record per
impl sums the model's convs weighted by that count: the time the UNet spends in them (with
``--quick``, in those of the quick cases); the F4 row's sum takes F(2×2)'s time for the shapes the
tile rule keeps on F(2×2) (iddpm_ext.nn.set_conv_winograd_tile; training's rule for the wgrad and
train passes), as the model does.
``--passes wgrad`` (float32) times the weight gradient instead, given the output's gradient
(channels-last, like x): torch's (``aten::convolution_backward``, oneDNN; row "torch conv")
against ``iddpm::conv3x3_winograd_weight_grad`` (row "iddpm (winograd)"; "iddpm (winograd F4)": by
F(4×4, 3×3), tile=4), records ``conv3x3 weight
grad`` (``err``: against float64, relative to the gradient's max) and ``conv3x3 weight grad per
backward`` (per_forward: the same count, one weight gradient per conv per backward).
CPU only (the op has no CUDA kernel): on another device it prints a line and times nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..nn import _winograd_tile, conv_nd, conv_winograd_tile, conv_winograd_train, winograd_train_takes
from ..ops import winograd
from . import common

# (B, Cin, Cout, H, W, convs per CIFAR-10 UNet forward): its 3×3 stride-1 convs at B = 2, then
# shapes it does not run (tiny maps, few channels), where "auto" leaves them to oneDNN
CASES = [
    (2, 128, 128, 32, 32, 10), (2, 256, 128, 32, 32, 3), (2, 384, 128, 32, 32, 1), (2, 256, 256, 32, 32, 1),
    (2, 256, 256, 16, 16, 10), (2, 512, 256, 16, 16, 3), (2, 384, 256, 16, 16, 1), (2, 128, 256, 16, 16, 1),
    (2, 256, 256, 8, 8, 11), (2, 512, 256, 8, 8, 4), (2, 256, 256, 4, 4, 14), (2, 512, 256, 4, 4, 4),
    (2, 3, 128, 32, 32, 1), (2, 128, 6, 32, 32, 1),
    (2, 256, 256, 2, 2, 0), (2, 64, 64, 32, 32, 0), (2, 16, 16, 32, 32, 0),
]  # fmt: skip
QUICK_CASES = [(2, 128, 128, 32, 32, 10), (2, 256, 256, 8, 8, 11)]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
IMPLS = (
    "torch conv",
    "packed (oneDNN)",
    "iddpm (winograd)",
    "iddpm (winograd, packed)",
    "iddpm (winograd F4)",
)


_PASSES = ("fwd", "wgrad", "train")
_LAYOUTS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}


def add_arguments(parser):
    parser.add_argument("--dtype", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    parser.add_argument(
        "--passes",
        default="fwd",
        help="comma-separated: fwd (the convolution), wgrad (its weight gradient, float32: torch's "
        "against iddpm::conv3x3_winograd_weight_grad), train (float32: one training call's forward "
        "and backward through iddpm_ext.nn.Conv2d, Winograd off against on, channels-last and NCHW)",
    )
    parser.add_argument(
        "--cases", default=None, help="cases as BxCinxCoutxHxW, comma-separated (default: the UNet's)"
    )


def _packed_available(dtype) -> bool:
    """Whether oneDNN's packed conv runs here in ``dtype`` (bf16 needs AVX-512 BW or newer)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")):
        return False
    return dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _impls(x, w, b):
    """{impl: fn} for one case (the weights prepared once, outside the timed calls); without
    oneDNN's packed conv for this dtype, no packed row."""
    one = [1, 1]
    weight_t = winograd.winograd_weight(w)
    impls = {"torch conv": lambda: F.conv2d(x, w, b, 1, 1)}
    if _packed_available(x.dtype):
        packed = torch.ops.mkldnn._reorder_convolution_weight(w, one, one, one, 1, list(x.shape))
        impls["packed (oneDNN)"] = lambda: torch.ops.mkldnn._convolution_pointwise(
            x, packed, b, one, one, one, 1, "none", [], ""
        )
    impls["iddpm (winograd)"] = lambda: winograd.conv3x3_winograd(x, weight_t, b)
    if x.dtype == torch.float32:
        weight_t4 = winograd.winograd_weight(w, tile=4)
        impls[IMPLS[4]] = lambda: winograd.conv3x3_winograd(x, weight_t4, b)
    if x.dtype == torch.bfloat16 and winograd.packable(w):
        weight_p = winograd.winograd_weight(w, packed=True)
        impls[IMPLS[3]] = lambda: winograd.conv3x3_winograd(x, weight_p, b)
    return impls


def _torch_wgrad(x, w, gy):
    """torch's weight gradient of conv2d(x, w, padding=1) given the output's gradient gy."""
    one = [1, 1]
    return torch.ops.aten.convolution_backward(
        gy, x, w, None, one, one, one, False, [0, 0], 1, [False, True, False]
    )[1]


def _wgrad_impls(x, w, gy):
    """{impl: fn} of that weight gradient."""
    return {
        "torch conv": lambda: _torch_wgrad(x, w, gy),
        "iddpm (winograd)": lambda: winograd.conv3x3_winograd_weight_grad(x, gy),
        IMPLS[4]: lambda: winograd.conv3x3_winograd_weight_grad(x, gy, tile=4),
    }


def _train_impls(x, w, b, gy):
    """{impl: fn} of one training call of iddpm_ext.nn's conv with weight w and bias b: forward of x
    (which needs a gradient, as inside the UNet) and backward of gy, by torch's convs ("torch conv")
    or the Winograd training conv ("iddpm (winograd)", conv_winograd_train("on") with F(2×2, 3×3);
    "iddpm (winograd F4)": F(4×4, 3×3) for the forward and the input gradient); fn returns the
    weight gradient. Also whether "auto" takes the call."""
    conv = conv_nd(2, w.shape[1], w.shape[0], 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(w)
        conv.bias.copy_(b)
    x = x.detach().requires_grad_()

    def step(mode, tile=2):
        conv.weight.grad = conv.bias.grad = x.grad = None
        with conv_winograd_train(mode), conv_winograd_tile(tile):
            conv(x).backward(gy)
        return conv.weight.grad

    with conv_winograd_train("auto"):
        auto = winograd_train_takes(conv, x)
    impls = {"torch conv": lambda: step("off"), "iddpm (winograd)": lambda: step("on")}
    impls[IMPLS[4]] = lambda: step("on", 4)
    return impls, auto


def _vs_packed(times, impl):
    packed = times.get(IMPLS[1])
    return None if packed is None or impl == IMPLS[0] else round(packed / times[impl], 2)


def run(args) -> list:
    device = torch.device(args.device)
    if device.type != "cpu":
        print(f"iddpm bench conv: the Winograd conv is a CPU op; nothing to time on {device.type}")
        return []
    if not winograd.available():
        print("iddpm bench conv: iddpm_ext._C has no Winograd kernel (not built); nothing to time")
        return []
    dtypes = [_DTYPES[n] for n in common.parse_names(args.dtype, _DTYPES, "dtype")]
    passes = common.parse_names(args.passes, _PASSES, "passes")
    if args.cases:
        cases = [(*c, 0) for c in common.parse_shapes(args.cases, "--cases", 5, "2x128x128x32x32")]
    else:
        cases = QUICK_CASES if args.quick else CASES
    records = []
    runs = [(p, d, lay) for p in passes for d in dtypes for lay in (_LAYOUTS if p == "train" else [None])]
    for pass_, dtype, layout in runs:
        if pass_ != "fwd" and dtype != torch.float32:
            if layout in (None, "channels_last"):
                print(f"iddpm bench conv: the {pass_} pass is float32 only; no {pass_} rows in {dtype}")
            continue
        op = {"fwd": "conv3x3", "wgrad": "conv3x3 weight grad", "train": "conv3x3 train"}[pass_]
        totals = dict.fromkeys(IMPLS, 0.0)
        packed_run = dtype == torch.bfloat16 and winograd.packed_available()
        for B, cin, cout, H, W, count in cases:
            gen = torch.Generator().manual_seed(0)
            fmt = _LAYOUTS[layout or "channels_last"]
            x = torch.randn(B, cin, H, W, generator=gen).to(dtype).contiguous(memory_format=fmt)
            w = (torch.randn(cout, cin, 3, 3, generator=gen) / (9 * cin) ** 0.5).to(dtype)
            w = w.contiguous(memory_format=torch.channels_last if layout is None else fmt)
            b = torch.randn(cout, generator=gen).to(dtype)
            extra = {}
            if pass_ == "fwd":
                ref = F.conv2d(x.double(), w.double(), b.double(), 1, 1)
                impls = _impls(x, w, b)
            else:
                gy = torch.randn(B, cout, H, W, generator=gen).to(dtype).contiguous(memory_format=fmt)
                ref = _torch_wgrad(x.double(), w.double(), gy.double())
                if pass_ == "wgrad":
                    impls = _wgrad_impls(x, w, gy)
                else:
                    impls, auto = _train_impls(x, w, b, gy)
                    extra = {"layout": layout, "auto": auto}
            scale = max(ref.abs().max().item(), 1e-30)
            flops = 2 * B * H * W * cin * cout * 9 * (3 if pass_ == "train" else 1)
            times = {}
            with torch.set_grad_enabled(pass_ == "train"):
                for impl, fn in impls.items():
                    times[impl] = common.time_ms(fn, device, args.warmup, args.iters)
                    err = (fn().double() - ref).abs().max().item() / scale
                    totals[impl] += times[impl] * count
                    rec = common.record(
                        op,
                        impl,
                        [B, cin, cout, H, W],
                        dtype,
                        device,
                        times[impl],
                        flops=flops,
                        speedup=round(times["torch conv"] / times[impl], 2),
                        vs_packed=_vs_packed(times, impl),
                        err=float(f"{err:.3g}"),
                        per_forward=count,
                        **extra,
                    )
                    records.append(common.emit(args, rec))
            if packed_run and IMPLS[3] not in times:  # the model runs the plain weight there
                totals[IMPLS[3]] += times[IMPLS[2]] * count
            if IMPLS[4] in times and _winograd_tile(dtype, x, training=pass_ != "fwd") == 2:
                # set_conv_winograd_tile's rule keeps this shape on F(2×2): the sum takes that time
                totals[IMPLS[4]] += (times[IMPLS[2]] - times[IMPLS[4]]) * count
        if any(c[-1] for c in cases):
            timed = {impl: t for impl, t in totals.items() if t > 0}
            for impl, total in timed.items():
                rec = common.record(
                    op + {"fwd": " per forward", "wgrad": " per backward", "train": " per step"}[pass_],
                    impl,
                    "cifar10" if cases == CASES else "cifar10 (these cases)",
                    dtype,
                    device,
                    total,
                    speedup=round(timed["torch conv"] / total, 2),
                    vs_packed=_vs_packed(timed, impl),
                    **({"layout": layout} if layout else {}),
                )
                records.append(common.emit(args, rec))
    return records
