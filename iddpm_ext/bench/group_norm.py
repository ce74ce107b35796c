"""``iddpm bench group_norm`` (alias ``groupnorm``): the ResBlock's GroupNorm → scale-shift →
SiLU, the fused op iddpm::group_norm_act against the reference's eager composition.

Impls, on the same x [B, C, H, W], weight/bias [C] (fp32) and scale/shift [B, C] (x's dtype):
  eager (reference)   GroupNorm32 (fp32 copy, normalise, cast back), ·(1 + scale) + shift, SiLU
                      (iddpm_ext.ops.group_norm.group_norm_act_reference)
  torch mixed         bf16/fp16 only: one call of torch's mixed-dtype group_norm (low-precision x,
                      fp32 weight/bias, no fp32 copy; groupnorm impl "auto" before the fused op),
                      then the scale-shift and SiLU in x's dtype
  iddpm (fused)       iddpm::group_norm_act (and its backward op)
Layouts: NCHW and channels-last; passes `fwd` and `fwd+bwd` (torch.autograd.grad w.r.t. x,
weight, bias, scale, shift). Bytes: the minimum, read x + write out forward, and read x, grad_out
+ write grad_x backward. `speedup` is the eager time over the row's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import group_norm as gn
from . import common

# (B, C, H, W): the CIFAR-10 UNet's norm sites (128 channels at 32×32, 256 at 16×16 and 8×8)
CASES = [(2, 128, 32, 32), (2, 256, 16, 16), (2, 256, 8, 8), (64, 128, 32, 32)]
QUICK_CASES = [(2, 128, 32, 32), (2, 256, 8, 8)]
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_LAYOUTS = ("nchw", "channels_last")


def add_arguments(parser):
    parser.add_argument("--dtype", default="float32,bfloat16", help="comma-separated dtypes")
    parser.add_argument("--cases", default=None, help="cases as BxCxHxW, comma-separated")
    parser.add_argument("--layouts", default="nchw,channels_last", help="nchw, channels_last or both")
    parser.add_argument("--passes", default="fwd,fwd+bwd", help="fwd, fwd+bwd or both")


def run(args) -> list:
    device = torch.device(args.device)
    dtypes = [_DTYPES[d] for d in common.parse_names(args.dtype, _DTYPES, "dtype")]
    layouts = common.parse_names(args.layouts, _LAYOUTS, "layouts")
    passes = common.parse_names(args.passes.replace("both", "fwd,fwd+bwd"), ("fwd", "fwd+bwd"), "passes")
    if args.cases:
        cases = common.parse_shapes(args.cases, "--cases", 4, "2x128x32x32")
    else:
        cases = QUICK_CASES if args.quick else CASES
    records = []
    for dtype in dtypes:
        for B, C, H, W in cases:
            gen = torch.Generator(device=device).manual_seed(0)
            x0 = torch.randn(B, C, H, W, device=device, generator=gen).to(dtype)
            w = 1 + 0.1 * torch.randn(C, device=device, generator=gen)
            b = 0.1 * torch.randn(C, device=device, generator=gen)
            sc = (0.1 * torch.randn(B, C, device=device, generator=gen)).to(dtype)
            sh = (0.1 * torch.randn(B, C, device=device, generator=gen)).to(dtype)
            for layout in layouts:
                x = x0.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x0
                impls = {"eager (reference)": gn.group_norm_act_reference}
                if dtype != torch.float32:
                    impls["torch mixed"] = _torch_mixed
                if gn.fused_supported(x):
                    impls["iddpm (fused)"] = gn.group_norm_act
                for pss in passes:
                    bwd = pss == "fwd+bwd"
                    moved = (5 if bwd else 2) * x.numel() * x.element_size()
                    base = None
                    for impl, f in impls.items():
                        fn = _make_fn(f, x, w, b, sc, sh, bwd)
                        ms = common.time_ms(fn, device, args.warmup, args.iters)
                        base = base or ms
                        rec = common.record(
                            f"group_norm_act {pss}",
                            f"{impl} {layout}",
                            [B, C, H, W],
                            dtype,
                            device,
                            ms,
                            bytes_moved=moved,
                            speedup=round(base / ms, 2),
                        )
                        records.append(common.emit(args, rec))
    return records


def _torch_mixed(x, G, w, b, sc, sh):
    view = (x.shape[0], x.shape[1], 1, 1)
    h = F.group_norm(x, G, w.float(), b.float())
    return F.silu(h * (1 + sc.reshape(view)) + sh.reshape(view))


def _make_fn(f, x, w, b, sc, sh, bwd):
    ins = [t.detach().requires_grad_(bwd) for t in (x, w, b, sc, sh)]
    if not bwd:
        return lambda: f(ins[0], 32, *ins[1:])
    go = torch.randn_like(x)
    return lambda: torch.autograd.grad(f(ins[0], 32, *ins[1:]), ins, go)
