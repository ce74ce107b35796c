"""``iddpm bench attention``: the UNet's QKV self-attention, fused op vs einsum vs SDPA.

Impls, side by side on the same qkv [B, 3·H·C, T] (the model's layout):
  einsum (reference)        the reference's QKVAttention (iddpm_ext.ops.attention.qkv_attention_reference)
  sdpa:<backend> +copies    torch's scaled_dot_product_attention restricted to one backend,
                            including the layout copies the model's layout needs: qkv is
                            rearranged once into contiguous q, k, v [B, H, T, C] and the
                            output [B, H, T, C] back into [B, H·C, T]
  sdpa:<backend> kernel     the same backend on pre-arranged contiguous q, k, v (kernel only)
  iddpm (fused)             iddpm::qkv_attention (and its backward op), no copies
  iddpm (fused, tile-major) the same op with its sm_80 kernels launched tile-major
                            (IDDPM_ATTENTION_TILE_MAJOR=1: a head's tiles adjacent in the grid;
                            CUDA only)
  iddpm (fused, sm90)       the same op with its sm_90a kernels (IDDPM_ATTENTION_SM90=1; forward,
                            and in `fwd+bwd` the backward too; only on CUDA with a
                            compute-capability 9.0 card and those kernels built)
  iddpm (fused, sm90 pipelined)  the same with the sm_90a forward's pipelined consumers
                            (IDDPM_ATTENTION_SM90_PIPELINED=1 as well; the backward as in the
                            row above)
  iddpm (fused, sm90 bulk dq)  `fwd+bwd` only: the sm90 row with the sm_90a backward adding dq
                            by TMA bulk reductions (IDDPM_ATTENTION_SM90_BULK_DQ=1 as well)
  iddpm (bf16 kernel)       CPU bf16 `fwd` only: iddpm::qkv_attention_bf16 (inference) on the
                            model's NCHW qkv, read at its strides (k copied per head)
  iddpm (bf16 kernel, channels-last qkv)  the same on a token-major qkv ([B, T, 3·H·C] in
                            memory, what the UNet's channels-last inference path gives), in place
  sdpa (channels-last qkv)  CPU bf16 `fwd` only: qkv_attention_sdpa on that token-major qkv (the
                            views SDPA reads in place; "auto"'s choice there before the bf16
                            kernel); the channels-last bf16 row carries `vs_sdpa_cl` (its time over ours)
Passes: `fwd` and `fwd+bwd` (backward through torch.autograd.grad w.r.t. the input).
Backends that refuse a case (e.g. cuDNN on fp32) are skipped for it.

fp32 runs twice on CUDA: dtype `float32` with TF32 off (torch's default,
torch.backends.cuda.matmul.allow_tf32 = False: cuBLAS in fp32, our fused op in split-TF32) and
`float32+tf32` with it on (cuBLAS and our fused op on TF32 tensor cores); every row carries
`tf32` (the setting it ran under), and `speedup` compares with einsum under the same setting.

FLOPs: 4·B·H·T²·C forward, 10·B·H·T²·C backward (the five T×T×C products of the backward,
FlashAttention's convention), so `tflops` of `fwd+bwd` uses 14·B·H·T²·C. Bytes: the minimum an
implementation must move, the same for all impls — forward reads qkv and writes out
(4·B·H·C·T elements), the backward reads qkv, out and grad_out and writes grad_qkv (8 more).
`pct_peak` is of HBM bandwidth, `pct_peak_tflops` of the card's dense fp16/bf16 tensor peak.
`speedup` is against the einsum reference; our rows also carry `vs_sdpa_copies` (the best SDPA
backend with its copies over ours) and `vs_sdpa_kernel` (the best kernel-only SDPA over ours);
the opt-in variants `vs_fused` (the default fused row over theirs) and the pipelined and bulk-dq
rows `vs_sm90` (the plain sm90 row over them): above 1, the variant is faster.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .. import ops
from ..ops import attention as attn
from . import common

# (B, H, C, T): the CIFAR-10 model's attention (16×16 and 8×8 maps), ImageNet-64 style T = 1024,
# and the FlashAttention paper's point (B·T = 16k, H·C = 2048).
CASES = [
    (1, 4, 64, 64),
    (64, 4, 64, 64),
    (256, 4, 64, 64),
    (1, 4, 64, 256),
    (64, 4, 64, 256),
    (256, 4, 64, 256),
    (16, 8, 64, 1024),
    (16, 32, 64, 1024),
]
QUICK_CASES = [(1, 4, 64, 64), (64, 4, 64, 64), (1, 4, 64, 256), (64, 4, 64, 256)]
# --dtype names: (dtype, torch.backends.cuda.matmul.allow_tf32 while it runs).
_DTYPES = {
    "float32": (torch.float32, False),
    "float32+tf32": (torch.float32, True),
    "float16": (torch.float16, False),
    "bfloat16": (torch.bfloat16, False),
}


def add_arguments(parser):
    parser.add_argument(
        "--dtype",
        default=None,
        help="comma-separated dtypes: float32 (TF32 off), float32+tf32 (TF32 allowed, CUDA), float16, "
        "bfloat16 (default: float16,bfloat16,float32,float32+tf32 on CUDA, float32 on CPU)",
    )
    parser.add_argument(
        "--cases", default=None, help="cases as BxHxCxT, comma-separated (default: the standard eight)"
    )
    parser.add_argument("--passes", default="fwd,fwd+bwd", help="fwd, fwd+bwd or both")


def _backends(device):
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:  # pragma: no cover - old torch
        return {}
    names = ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"]
    return {n.lower(): getattr(SDPBackend, n) for n in names if hasattr(SDPBackend, n)}


def _sdpa(q, k, v, backend):
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v)


def _split_heads(qkv, H):
    """qkv [B, 3HC, T] -> contiguous q, k, v [B, H, T, C] (one copy kernel)."""
    B, W, T = qkv.shape
    C = W // (3 * H)
    qkv5 = qkv.view(B, H, 3, C, T).permute(2, 0, 1, 4, 3).contiguous()
    return qkv5[0], qkv5[1], qkv5[2]


def _sdpa_with_copies(qkv, H, backend):
    B, W, T = qkv.shape
    q, k, v = _split_heads(qkv, H)
    o = _sdpa(q, k, v, backend)  # [B, H, T, C]
    return o.transpose(-1, -2).reshape(B, W // 3, T)


def _timed(fn, device, args):
    """Median ms; fewer runs for slow cases (large CPU einsum runs take seconds each)."""
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first = (time.perf_counter() - t0) * 1e3
    warmup, iters = args.warmup, args.iters
    if first > 200:
        warmup, iters = 0, 3
    elif first > 20:
        warmup, iters = 1, min(iters, 5)
    return common.time_ms(fn, device, warmup, iters)


def _pick(table: dict, name: str, what: str):
    key = name.strip()
    if key not in table:
        raise common.BenchArgumentError(f"--{what}: expected names from {sorted(table)}, got {key!r}")
    return table[key]


def _parse_passes(text: str) -> list:
    passes = []
    for p in text.split(","):
        p = p.strip()
        if p == "both":
            passes += ["fwd", "fwd+bwd"]
        elif p in ("fwd", "fwd+bwd"):
            passes.append(p)
        else:
            raise common.BenchArgumentError(f"--passes: expected fwd, fwd+bwd or both, got {p!r}")
    return list(dict.fromkeys(passes))


def run(args) -> list:
    device = torch.device(args.device)
    if args.dtype:
        dtypes = [_pick(_DTYPES, d, "dtype") for d in args.dtype.split(",")]
    elif device.type == "cuda":
        dtypes = [_DTYPES[d] for d in ("float16", "bfloat16", "float32", "float32+tf32")]
    else:
        dtypes = [_DTYPES["float32"]]
    if args.cases:
        cases = common.parse_shapes(args.cases, "--cases", 4, "64x4x64x256")
    else:
        cases = QUICK_CASES if args.quick else CASES
    passes = _parse_passes(args.passes)
    backends = _backends(device)
    peak_flops = common.peak_tensor_flops(device)
    records = []
    for dtype, tf32 in dtypes:
        with _allow_tf32(tf32):
            records += _run_dtype(args, device, dtype, tf32, cases, passes, backends, peak_flops)
    return records


class _allow_tf32:
    """torch.backends.cuda.matmul.allow_tf32 = allow inside, restored after."""

    def __init__(self, allow: bool):
        self.allow = allow

    def __enter__(self):
        self.previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.allow

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.previous
        return False


def _run_dtype(args, device, dtype, tf32, cases, passes, backends, peak_flops) -> list:
    """The rows of one dtype (fp32: under one TF32 setting, already applied)."""
    records = []
    for B, H, C, T in cases:
        gen = torch.Generator(device=device).manual_seed(0)
        qkv = torch.randn(B, 3 * H * C, T, device=device, generator=gen).to(dtype)
        q, k, v = _split_heads(qkv, H)
        fused_ok = ops.has_kernel(device) and attn.fused_supported(qkv, H)
        elems = B * H * C * T * qkv.element_size()
        for pss in passes:
            bwd = pss == "fwd+bwd"
            impls = {"einsum (reference)": lambda x: attn.qkv_attention_reference(x, H)}
            for name, be in backends.items():
                impls[f"sdpa:{name} +copies"] = lambda x, be=be: _sdpa_with_copies(x, H, be)
                impls[f"sdpa:{name} kernel"] = ("kernel", be)
            if fused_ok:
                impls[FUSED_ROW] = lambda x: attn.qkv_attention_fused(x, H)
                if qkv.is_cuda and dtype in (torch.float16, torch.bfloat16):  # fp32: default grid
                    impls[TILE_MAJOR_ROW] = lambda x: attn.qkv_attention_fused(x, H)
            if not bwd and qkv.device.type == "cpu" and dtype == torch.bfloat16 and attn.bf16_isa():
                tokens = qkv.transpose(1, 2).contiguous().transpose(1, 2)  # [B, T, 3·H·C] in memory
                impls[BF16_ROW] = lambda x: attn.qkv_attention_bf16(x, H)
                impls[BF16_CL_ROW] = lambda x, tm=tokens: attn.qkv_attention_bf16(tm, H)
                impls[SDPA_CL_ROW] = lambda x, tm=tokens: attn.qkv_attention_sdpa(tm, H)
            if attn.sm90_supported(qkv, H):  # the sm_90a kernels: CUDA, built, cc 9.0 only
                impls[SM90_ROW] = lambda x: attn.qkv_attention_fused(x, H)
                impls[SM90_PIPELINED_ROW] = lambda x: attn.qkv_attention_fused(x, H)
                if bwd:  # the variant is the backward's; its forward is the sm90 row's
                    impls[SM90_BULK_DQ_ROW] = lambda x: attn.qkv_attention_fused(x, H)
            flops = (14 if bwd else 4) * B * H * T * T * C
            moved = (12 if bwd else 4) * elems
            rows = {}
            for impl, f in impls.items():
                fn = _make_fn(f, qkv, (q, k, v), bwd)
                if impl in SWITCHES:  # forward and backward under the row's switch
                    fn = _under(SWITCHES[impl], fn)
                try:
                    fn()
                except RuntimeError:  # backend refuses this case
                    if "kernel" in impl or "sdpa" in impl:
                        continue
                    raise
                ms = _timed(fn, device, args)
                rec = common.record(
                    f"qkv_attention {pss}",
                    impl,
                    [B, H, C, T],
                    dtype,
                    device,
                    ms,
                    bytes_moved=moved,
                    flops=flops,
                )
                if dtype == torch.float32:
                    rec["tf32"] = tf32
                    if tf32:
                        rec["dtype"] = "float32+tf32"
                if peak_flops and dtype != torch.float32:
                    rec["pct_peak_tflops"] = round(100 * rec["tflops"] * 1e12 / peak_flops, 1)
                rows[impl] = rec
                records.append(common.emit(args, rec))
            base = rows.get("einsum (reference)")
            for rec in rows.values():
                if base:
                    rec["speedup"] = round(base["ms"] / rec["ms"], 2)
            for ours in (rows.get(name) for name in (*SWITCHES, BF16_ROW, BF16_CL_ROW)):
                if not ours:
                    continue
                for tag, suffix in (("vs_sdpa_copies", "+copies"), ("vs_sdpa_kernel", "kernel")):
                    times = [r["ms"] for i, r in rows.items() if i.startswith("sdpa") and i.endswith(suffix)]
                    if times:
                        ours[tag] = round(min(times) / ours["ms"], 2)
            variant_ratios(rows)
            if BF16_CL_ROW in rows and SDPA_CL_ROW in rows:
                rows[BF16_CL_ROW]["vs_sdpa_cl"] = round(rows[SDPA_CL_ROW]["ms"] / rows[BF16_CL_ROW]["ms"], 2)
            del rows
    return records


def variant_ratios(rows: dict) -> None:
    """The opt-in variants against what they would replace, in place (> 1: the variant is
    faster): `vs_fused` on the tile-major and sm90 rows (the default fused row's time over
    theirs), `vs_sm90` on the pipelined and bulk-dq rows (the plain sm90 row's time over
    theirs)."""
    for name, ref, tag in (
        (TILE_MAJOR_ROW, FUSED_ROW, "vs_fused"),
        (SM90_ROW, FUSED_ROW, "vs_fused"),
        (SM90_PIPELINED_ROW, FUSED_ROW, "vs_fused"),
        (SM90_PIPELINED_ROW, SM90_ROW, "vs_sm90"),
        (SM90_BULK_DQ_ROW, FUSED_ROW, "vs_fused"),
        (SM90_BULK_DQ_ROW, SM90_ROW, "vs_sm90"),
    ):
        if name in rows and ref in rows:
            rows[name][tag] = round(rows[ref]["ms"] / rows[name]["ms"], 2)


FUSED_ROW = "iddpm (fused)"
SM90_ROW = "iddpm (fused, sm90)"
SM90_PIPELINED_ROW = "iddpm (fused, sm90 pipelined)"
SM90_BULK_DQ_ROW = "iddpm (fused, sm90 bulk dq)"
TILE_MAJOR_ROW = "iddpm (fused, tile-major)"
BF16_ROW = "iddpm (bf16 kernel)"
BF16_CL_ROW = "iddpm (bf16 kernel, channels-last qkv)"
SDPA_CL_ROW = "sdpa (channels-last qkv)"
# The fused op's rows and the settings of its opt-in switches each runs under (sm90, tile-major,
# sm90 pipelined, sm90 bulk dq), set for every call so that an IDDPM_ATTENTION_* variable in the
# environment cannot make two rows the same.
SWITCHES = {
    FUSED_ROW: (False, False, False, False),
    TILE_MAJOR_ROW: (False, True, False, False),
    SM90_ROW: (True, False, False, False),
    SM90_PIPELINED_ROW: (True, False, True, False),
    SM90_BULK_DQ_ROW: (True, False, False, True),
}


def _under(settings, fn):
    """fn run with the fused op's switches set to `settings` (sm90, tile-major, sm90 pipelined,
    sm90 bulk dq), backward included."""
    sm90, tile_major, pipelined, bulk_dq = settings

    def run():
        with (
            attn.attention_sm90(sm90),
            attn.attention_tile_major(tile_major),
            attn.attention_sm90_pipelined(pipelined),
            attn.attention_sm90_bulk_dq(bulk_dq),
        ):
            return fn()

    return run


def _make_fn(f, qkv, qkv_split, bwd):
    """A closure running one impl (forward, or forward + backward)."""
    if isinstance(f, tuple):  # SDPA on pre-arranged q, k, v
        be = f[1]
        q, k, v = (t.detach().requires_grad_(bwd) for t in qkv_split)
        if not bwd:
            return lambda: _sdpa(q, k, v, be)
        go = torch.randn_like(q)
        return lambda: torch.autograd.grad(_sdpa(q, k, v, be), (q, k, v), go)
    x = qkv.detach().requires_grad_(bwd)
    if not bwd:
        return lambda: f(x)
    B, W, T = qkv.shape
    go = torch.randn(B, W // 3, T, device=qkv.device, dtype=qkv.dtype)
    return lambda: torch.autograd.grad(f(x), x, go)
