"""``iddpm bench unet``: UNet forward and forward+backward throughput, ours vs the reference.

Forward (sampling) section, per batch size (``--batch-sizes``) and dtype, the variants are timed in
interleaved rounds (one call of each per round, median reported), so their ratios are side by side
even on a busy machine. The baseline ("reference") is openai/improved-diffusion's UNetModel loaded
from the checkout named by IDDPM_REF_PATH (the folder holding ``improved_diffusion``) with our
weights; without it, our model with every fast path off (einsum attention, GroupNorm through fp32
copies, NCHW, fp32 weights), and the impl column says which. bf16 rows run the baselines under
``torch.autocast`` and ours also as ``to_inference(torch.bfloat16)`` (bf16 weights and activations).
Each record has ms, images/s, TFLOP/s (FLOPs counted once with ``FlopCounterMode``), % of the card's
peak where it is known (GPU only), the speedup over the baseline of its dtype (``speedup_min``: the
same from the fastest run of each, steadier on a busy machine; on the CPU also ``cpu_ms`` /
``speedup_cpu``: the median process CPU time per call, which time spent waiting for a shared core
does not inflate) and ``rel_err``: the relative L2 error of the output against the fp32 baseline's.
On the CPU the rows include ``to_inference(..., prepack=True)`` (oneDNN-packed conv weights,
:func:`iddpm_ext.nn.set_conv_prepack`) next to the same without it, the fp32 and the bf16 one also
with their Winograd 3x3 convs off (:func:`iddpm_ext.nn.set_conv_winograd`; the other rows run the
process-wide mode, IDDPM_CONV_WINOGRAD), the bf16 one on CPUs with AVX512-BF16 also with its
Winograd convs on the plain instead of the packed weight
(:func:`iddpm_ext.nn.set_conv_winograd_packed`), the fp32-weight model with prepacked convs
under bf16 autocast, and the prepacked fp32 (also under bf16 autocast) and bf16 models' forwards
replayed from op graphs (``op graph`` rows: :func:`iddpm_ext.engine.capture_forward`, captured
in the untimed first call).
``--breakdown`` adds each variant's time per layer kind (conv, norm, elementwise, attention, other)
from one profiled call (torch.profiler, self times). ``--compile-reference MODE`` adds the baseline
under ``torch.compile(mode=MODE)`` after each dtype's baseline (fp32, and bf16 autocast), and to
each of our rows ``speedup_vs_compiled``: the compiled baseline's median over ours.

The fwd+bwd and memory sections below are unchanged:

The model is improved-diffusion's CIFAR-10 configuration (128 channels, 3 res blocks,
channel_mult (1, 2, 2, 2), attention at 16 and 8 with 4 heads, scale-shift norm, learned
σ, dropout 0.3: 52,546,438 parameters). Each case runs the same model with
``attention_impl("auto")`` (the fused kernel where one exists for the device) and with
``attention_impl("einsum")`` (the reference's math), in fp32 and under bf16 autocast.
``fwd`` is an eval-mode forward under no_grad (sampling); ``fwd+bwd`` a train-mode forward
plus backward of a mean-square loss. It also measures the training-step memory with and
without ``use_checkpoint``: on CUDA the peak allocated bytes above the parameters, on CPU
the activation bytes kept for backward (see :func:`activation_bytes`).

Defaults: CUDA batch 128; CPU batch 2 with 2 warm-up and 7 timed runs per case (``--quick``:
1 and 2; the memory cases are timed once on CPU); ``--quick`` a tiny model (32 channels, 1 res
block, 16×16 images).
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

from ..engine.op_graph import capture_forward
from ..ops.attention import attention_impl
from ..ops.winograd import packed_available
from ..training.loop import COMPILE_MODES as _TRAIN_COMPILE_MODES
from ..unet import AttentionBlock, ResBlock, UNetModel
from . import common

# Model configurations, laid out by hand.
# fmt: off
CONFIGS = {
    # improved-diffusion's CIFAR-10 run: image 32, attention_resolutions "16,8" -> ds (2, 4).
    "cifar10": dict(image_size=32, in_channels=3, model_channels=128, out_channels=6,
                    num_res_blocks=3, attention_resolutions=(2, 4), dropout=0.3,
                    channel_mult=(1, 2, 2, 2), num_heads=4, use_scale_shift_norm=True),
    # improved-diffusion's ImageNet-64 run: channel_mult (1, 2, 3, 4), attention at 16 and 8 -> ds (4, 8).
    "imagenet64": dict(image_size=64, in_channels=3, model_channels=128, out_channels=6,
                       num_res_blocks=3, attention_resolutions=(4, 8), dropout=0.0,
                       channel_mult=(1, 2, 3, 4), num_heads=4, use_scale_shift_norm=True),
    "tiny": dict(image_size=16, in_channels=3, model_channels=32, out_channels=6,
                 num_res_blocks=1, attention_resolutions=(2,), dropout=0.0,
                 channel_mult=(1, 2), num_heads=4, use_scale_shift_norm=True),
}
# fmt: on
_AUTO = -1  # "choose by device": see _runs()
# torch.compile's modes, for --compile-reference (and bench train --compile): TrainLoop's, less "none".
COMPILE_MODES = tuple(m for m in _TRAIN_COMPILE_MODES if m != "none")


def add_arguments(parser):
    parser.add_argument(
        "--config",
        choices=sorted(CONFIGS),
        default=None,
        help="model configuration (default: cifar10; tiny with --quick)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="batch size of the fwd+bwd and memory sections, and of the forward section when "
        "--batch-sizes is not given (default: 128 on CUDA, 2 on CPU, 4 with --quick on CUDA)",
    )
    parser.add_argument(
        "--batch-sizes",
        default=None,
        metavar="B1,B2,...",
        help="batch sizes of the forward section (default: --batch's; the issue's GPU set is 1,16,64,256)",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="per-layer-kind time of each forward variant (conv, norm, elementwise, attention, other)",
    )
    parser.add_argument(
        "--forward-only",
        action="store_true",
        help="only the forward section (skip fwd+bwd and the training-step memory)",
    )
    parser.add_argument(
        "--compile-reference",
        default=None,
        choices=COMPILE_MODES,
        metavar="MODE",
        help="also time torch.compile(baseline, mode=MODE) in the forward section, fp32 and under "
        "bf16 autocast (the baseline a user gets in one line; compiling takes minutes): "
        + ", ".join(COMPILE_MODES),
    )
    # Device-dependent defaults for the shared --warmup/--iters (resolved in _runs).
    parser.set_defaults(warmup=_AUTO, iters=_AUTO)


def build_model(config: str, use_checkpoint: bool = False, device="cpu") -> tuple[UNetModel, int]:
    """The benchmark's model (randomly initialised, fp32) and its image size."""
    kwargs = dict(CONFIGS[config])
    image_size = kwargs.pop("image_size")
    model = UNetModel(**kwargs, use_checkpoint=use_checkpoint)
    return model.to(device), image_size


def activation_bytes(model: torch.nn.Module, *inputs, loss_fn=None) -> int:
    """Bytes of activations a training forward keeps alive for backward (CPU-friendly).

    Counts the distinct storages autograd saves outside checkpointed regions (a
    saved-tensors hook) plus the inputs of every checkpointed ResBlock/AttentionBlock
    (the non-reentrant checkpoint keeps those to recompute from); parameters excluded.
    Runs forward and backward once (backward so the graph is freed).
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def note(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                storages[s.data_ptr()] = s.nbytes()

    def pack(t):
        note(t)
        return t

    def pre_hook(module, args):
        if module.use_checkpoint and torch.is_grad_enabled():
            for a in args:
                note(a)

    handles = [
        m.register_forward_pre_hook(pre_hook)
        for m in model.modules()
        if isinstance(m, (ResBlock, AttentionBlock))
    ]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(*inputs)
            loss = loss_fn(out) if loss_fn else out.float().square().mean()
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    return sum(storages.values())


def _runs(args, device) -> tuple[int, int]:
    warmup, iters = args.warmup, args.iters
    if device.type == "cpu":  # a few runs more than feel necessary: single runs here swing by 50%
        warmup = (1 if args.quick else 2) if warmup == _AUTO else warmup
        iters = (2 if args.quick else 7) if iters == _AUTO else iters
    else:
        warmup = (2 if args.quick else 5) if warmup == _AUTO else warmup
        iters = (3 if args.quick else 20) if iters == _AUTO else iters
    return warmup, iters


def _autocast(device, dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def count_flops(model, x, t, backward: bool) -> int:
    """FLOPs of one image (einsum attention and torch's convs, so the attention matmuls and the convs
    are counted: the counter knows no iddpm op)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..nn import conv_winograd_train

    with attention_impl("einsum"), conv_winograd_train("off"), FlopCounterMode(display=False) as counter:
        if backward:
            model(x[:1], t[:1]).float().square().mean().backward()
        else:
            with torch.no_grad():
                model(x[:1], t[:1])
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _step_fn(model, x, t, device, dtype, backward):
    def fwd():
        with torch.no_grad(), _autocast(device, dtype):
            model(x, t)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            loss = model(x, t).float().square().mean()
        loss.backward()

    return fwd_bwd if backward else fwd


def _peak_training_bytes(model, x, t, device, dtype) -> int:
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        _step_fn(model, x, t, device, dtype, True)()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        with _autocast(device, dtype):
            peak = activation_bytes(model, x, t)
    model.zero_grad(set_to_none=True)
    return peak


def parse_batch_sizes(text: str) -> list:
    """``"1,16,64"`` -> [1, 16, 64]; else a BenchArgumentError naming --batch-sizes."""
    sizes = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise common.BenchArgumentError(
                f"--batch-sizes: expected positive ints joined by ',' (e.g. 1,16,64), got {part!r}"
            )
        sizes.append(int(part))
    return sizes


def randomize_zero_layers_(model: torch.nn.Module, std: float = 0.02) -> torch.nn.Module:
    """Give the zero-initialised output convolutions small random weights (in place), so that
    every layer contributes to the output and an error comparison means something."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, std)
    return model


def reference_unet_class():
    """openai/improved-diffusion's UNetModel from the checkout named by IDDPM_REF_PATH, or None."""
    module = common.reference_module("unet")
    return None if module is None else module.UNetModel


def reference_model(model: UNetModel, config: str):
    """The reference's UNetModel built as ``CONFIGS[config]`` on ``model``'s device, with
    ``model``'s weights (strict load), in eval mode; None without IDDPM_REF_PATH."""
    cls = reference_unet_class()
    if cls is None:
        return None
    kwargs = dict(CONFIGS[config])
    kwargs.pop("image_size")
    ref = cls(**kwargs).to(next(model.parameters()).device)
    ref.load_state_dict(model.state_dict(), strict=True)
    return ref.eval()


_BASELINE_OFF = "ours, all fast paths off: einsum attention, torch GroupNorm, NCHW, fp32 weights"

# Which layer kind a profiled op belongs to: by substrings of its name after "::" (conv, norm,
# attention) or by its exact name (elementwise); anything else is "other" (e.g. addmm: linear).
_KIND_SUBSTRINGS = (
    ("attention", ("qkv_attention", "einsum", "bmm", "softmax", "scaled_dot_product")),
    ("conv", ("conv",)),
    ("norm", ("group_norm", "groupnorm", "layer_norm")),
)
_ELEMENTWISE = {
    "add", "add_", "mul", "mul_", "sub", "div", "silu", "silu_", "sigmoid", "copy_", "_to_copy",
    "cat", "clone", "contiguous", "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
    "avg_pool2d", "dropout",
}  # fmt: skip
KINDS = ("conv", "norm", "elementwise", "attention", "other")


def layer_kind(op_name: str) -> str:
    """The layer kind of a profiler event name, e.g. 'aten::mkldnn_convolution' -> 'conv'."""
    name = op_name.lower().rsplit("::", 1)[-1]
    for kind, patterns in _KIND_SUBSTRINGS:
        if any(p in name for p in patterns):
            return kind
    return "elementwise" if name in _ELEMENTWISE else "other"


_OPS = ("aten::", "iddpm::", "mkldnn::")


def _event_kind(ev) -> str:
    """An op's kind is that of its outermost enclosing op with a kind other than "other" (itself if
    none): the GEMMs inside iddpm::conv3x3_winograd count as conv, inside SDPA as attention, the
    copies inside iddpm::group_norm_act as norm."""
    kind, node = "other", ev
    while node is not None:
        if node.name.startswith(_OPS):
            k = layer_kind(node.name)
            kind = k if k != "other" else kind
        node = node.cpu_parent
    return kind


def breakdown_ms(fn, device, kind_of=_event_kind, kinds=KINDS) -> dict:
    """Milliseconds of ``fn()`` per layer kind: the ops' self times from one profiled call, each
    counted for the kind ``kind_of(event)`` gives it (default: that of its outermost op with one,
    :func:`_event_kind`), one of ``kinds``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    totals = dict.fromkeys(kinds, 0.0)
    for ev in prof.events():
        if device.type == "cuda":
            us = getattr(ev, "self_device_time_total", 0) or 0
        else:
            us = ev.self_cpu_time_total
        if ev.name.startswith(_OPS):
            totals[kind_of(ev)] += us / 1e3
    return {k: round(v, 3) for k, v in totals.items()}


def _forward_variants(model, config, device, compile_mode=None):
    """[(impl, dtype, module, input dtype, autocast dtype or None, attention impl, groupnorm impl[,
    winograd mode])]:
    the baseline first for each dtype, then (with ``compile_mode``) the baseline under
    ``torch.compile(mode=compile_mode)``. Every module has ``model``'s weights."""
    import copy

    from ..nn import groupnorm_impl  # noqa: F401  (the switch the variants set)

    base = reference_model(model, config)
    if base is not None:
        base_name, base_attn = "reference (openai/improved-diffusion)", "auto"
    else:
        base, base_name, base_attn = copy.deepcopy(model), f"baseline ({_BASELINE_OFF})", "einsum"
    base.eval()
    ours = copy.deepcopy(model).eval()
    cpu = device.type == "cpu"
    cl = cpu  # channels-last and prepacked convs: the defaults of to_inference on the CPU only
    f32, b16 = torch.float32, torch.bfloat16
    layout = "channels-last" if cl else "NCHW"
    fp32_fast = copy.deepcopy(model).to_inference(channels_last=True, prepack=False)
    bf16_nchw = copy.deepcopy(model).to_inference(b16, channels_last=False, prepack=False)
    bf16_fast = copy.deepcopy(model).to_inference(b16, channels_last=cl, prepack=False)
    compiled = []
    if compile_mode:
        base_c = torch.compile(base, mode=compile_mode)
        name_c = f"{base_name} torch.compile({compile_mode})"
        compiled = [(name_c, f32, base_c, f32, None, base_attn, "torch")]
    variants = [
        (base_name, f32, base, f32, None, base_attn, "torch"),
        *compiled,
        ("ours (fused attention)", f32, ours, f32, None, "auto", "auto"),
        ("ours to_inference(channels-last)", f32, fp32_fast, f32, None, "auto", "auto"),
    ]
    if cpu:
        fp32_packed = copy.deepcopy(model).to_inference(channels_last=True, prepack=True)
        variants.append(
            ("ours to_inference(channels-last, prepack)", f32, fp32_packed, f32, None, "auto", "auto")
        )
        # The same model with the Winograd 3x3 convs off (iddpm_ext.nn.set_conv_winograd), and with
        # every one F(2×2, 3×3) (no F(4×4): iddpm_ext.nn.set_conv_winograd_tile): the A/Bs.
        variants.append(
            ("ours to_inference(channels-last, prepack), winograd off", f32, fp32_packed, f32, None,
             "auto", "auto", "off")
        )  # fmt: skip
        variants.append(
            ("ours to_inference(channels-last, prepack), winograd F(2x2)", f32, fp32_packed, f32, None,
             "auto", "auto", "tile2")
        )  # fmt: skip
        # Its forward replayed from op graphs (iddpm_ext.engine.capture_forward; captured in the
        # first call, which is not timed).
        fp32_graph = capture_forward(fp32_packed)
        variants.append(("ours to_inference(channels-last, prepack), op graph", f32, fp32_graph, f32, None,
                         "auto", "auto"))  # fmt: skip
    variants += [
        (f"{base_name} + bf16 autocast", b16, base, f32, b16, base_attn, "torch"),
        *[(f"{name} + bf16 autocast", b16, m, f32, b16, a, gn) for name, _, m, _, _, a, gn in compiled],
        ("ours + bf16 autocast", b16, ours, f32, b16, "auto", "auto"),
    ]
    if cpu:  # fp32 weights under autocast, the convs from bf16 packed copies
        variants.append(
            ("ours to_inference(channels-last, prepack) + bf16 autocast", b16, fp32_packed, f32, b16,
             "auto", "auto")
        )  # fmt: skip
        variants.append(
            ("ours to_inference(channels-last, prepack) + bf16 autocast, op graph", b16, fp32_graph, f32,
             b16, "auto", "auto")
        )  # fmt: skip
    variants += [
        ("ours to_inference(bf16, NCHW)", b16, bf16_nchw, b16, None, "auto", "auto"),
        (f"ours to_inference(bf16, {layout})", b16, bf16_fast, b16, None, "auto", "auto"),
    ]
    if cpu:
        bf16_packed = copy.deepcopy(model).to_inference(b16, channels_last=True, prepack=True)
        variants.append(
            ("ours to_inference(bf16, channels-last, prepack)", b16, bf16_packed, b16, None, "auto", "auto")
        )
        variants.append(
            ("ours to_inference(bf16, channels-last, prepack), op graph", b16, capture_forward(bf16_packed),
             b16, None, "auto", "auto")
        )  # fmt: skip
        # Its A/B: the bf16 Winograd 3x3 convs off (oneDNN's packed bf16 convs instead).
        variants.append(
            ("ours to_inference(bf16, channels-last, prepack), winograd off", b16, bf16_packed, b16, None,
             "auto", "auto", "off")
        )  # fmt: skip
        if packed_available():  # and the Winograd convs on the plain weight (at::bmm GEMMs)
            variants.append(
                ("ours to_inference(bf16, channels-last, prepack), winograd unpacked", b16, bf16_packed,
                 b16, None, "auto", "auto", "unpacked")
            )  # fmt: skip
    return variants


def _forward_call(variant, x, t, device):
    import contextlib

    from ..nn import conv_winograd, conv_winograd_packed, conv_winograd_tile, groupnorm_impl

    _, _, module, in_dtype, ac_dtype, attn, gn = variant[:7]
    winograd = variant[7] if len(variant) > 7 else None  # None: the process-wide mode
    if winograd == "unpacked":  # the process-wide mode on the plain weight
        switch = lambda: conv_winograd_packed(False)  # noqa: E731
    elif winograd == "tile2":  # the process-wide mode, F(2×2, 3×3) only
        switch = lambda: conv_winograd_tile(2)  # noqa: E731
    elif winograd is not None:
        switch = lambda: conv_winograd(winograd)  # noqa: E731
    else:
        switch = contextlib.nullcontext
    xin = x.to(in_dtype)

    def fwd():
        with (
            torch.no_grad(),
            attention_impl(attn),
            groupnorm_impl(gn),
            switch(),
            _autocast(device, ac_dtype or torch.float32),
        ):
            return module(xin, t)

    return fwd


def forward_section(
    model,
    config,
    size,
    batch_sizes,
    device,
    warmup,
    iters,
    breakdown,
    flops_per_image,
    compile_mode=None,
    emit=None,
):
    """The forward records (see the module docstring) and their summary lines; ``emit(rec)``
    (e.g. common.emit: printed and written to --json at once) sees each record as it is made, so a
    run cut short by a time limit keeps the cases it finished."""
    variants = _forward_variants(model, config, device, compile_mode)
    n_params = sum(p.numel() for p in model.parameters())
    records, summary = [], []
    for batch in batch_sizes:
        gen = torch.Generator().manual_seed(batch)
        x = torch.randn(batch, model.in_channels, size, size, generator=gen).to(device)
        t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
        calls = [_forward_call(v, x, t, device) for v in variants]
        # (also the first warm-up run) copies: a variant run under CUDA graphs (torch.compile's
        # "max-autotune" / "reduce-overhead") returns memory of its graph pool, which its next
        # generation overwrites (torch then refuses to read it); .float() of fp32 is no copy
        outs = [c().detach().to(torch.float32, copy=True) for c in calls]
        for _ in range(max(warmup - 1, 0)):
            for c in calls:
                c()
        times = [[] for _ in calls]
        cpu_times = [[] for _ in calls]  # CPU only: process CPU time, steadier on a shared machine
        for _ in range(iters):  # interleaved: one call of each variant per round
            for i, c in enumerate(calls):
                cpu0 = time.process_time()
                times[i].append(common.time_ms(c, device, 0, 1, flush_l2=False))
                cpu_times[i].append((time.process_time() - cpu0) * 1e3)
        ref_out = outs[0]
        base_ms, base_min, base_cpu, compiled_ms = {}, {}, {}, {}
        for v, ts, cts, out in zip(variants, times, cpu_times, outs):
            impl, dtype = v[0], v[1]
            ms = statistics.median(ts)
            base_ms.setdefault(dtype, ms)  # the first variant of each dtype is its baseline
            base_min.setdefault(dtype, min(ts))
            err = ((out - ref_out).norm() / ref_out.norm().clamp_min(1e-30)).item()
            extra = {}
            if "torch.compile(" in impl:
                compiled_ms[dtype] = ms
            elif impl.startswith("ours") and dtype in compiled_ms:
                extra["speedup_vs_compiled"] = round(compiled_ms[dtype] / ms, 3)
            if device.type == "cpu":
                cpu_ms = statistics.median(cts)
                base_cpu.setdefault(dtype, cpu_ms)
                extra["cpu_ms"] = round(cpu_ms, 3)
                extra["speedup_cpu"] = round(base_cpu[dtype] / cpu_ms, 3)
            if breakdown:
                extra["breakdown_ms"] = breakdown_ms(_forward_call(v, x, t, device), device)
            rec = common.record(
                f"unet {config} fwd",
                impl,
                [batch, model.in_channels, size, size],
                dtype,
                device,
                ms,
                flops=flops_per_image * batch,
                images_per_s=round(batch / (ms * 1e-3), 2),
                speedup=round(base_ms[dtype] / ms, 3),
                ms_min=round(min(ts), 5),
                speedup_min=round(base_min[dtype] / min(ts), 3),
                rel_err=float(f"{err:.3g}"),
                params=n_params,
                **extra,
            )
            records.append(emit(rec) if emit is not None else rec)
            line = (
                f"fwd B={batch:<4} {rec['dtype']:<9} {impl[:58]:<58} {ms:9.2f} ms "
                f"{rec['images_per_s']:9.1f} img/s {rec['tflops']:7.3f} TF/s "
                f"x{rec['speedup']:.2f} (min x{rec['speedup_min']:.2f})  err {err:.2e}"
            )
            if "speedup_cpu" in extra:
                line += f"  cpu x{extra['speedup_cpu']:.2f}"
            if "speedup_vs_compiled" in extra:
                line += f"  vs compiled x{extra['speedup_vs_compiled']:.2f}"
            if "pct_peak" in rec:
                line += f"  {rec['pct_peak']}% of peak"
            summary.append(line)
            if breakdown:
                summary.append(
                    "      " + ", ".join(f"{k} {extra['breakdown_ms'][k]:.1f}" for k in KINDS) + " ms"
                )
    return records, summary


def run(args) -> list:
    device = torch.device(args.device)
    config = args.config or ("tiny" if args.quick else "cifar10")
    batch = args.batch or (
        128 if device.type == "cuda" and not args.quick else 2 if device.type == "cpu" else 4
    )
    warmup, iters = _runs(args, device)
    dtypes = [torch.float32, torch.bfloat16]
    batch_sizes = parse_batch_sizes(args.batch_sizes) if args.batch_sizes else [batch]
    reference_unet_class()  # a bad IDDPM_REF_PATH is reported before any work

    torch.manual_seed(0)
    model, size = build_model(config, device=device)
    n_params = sum(p.numel() for p in model.parameters())
    x = torch.randn(batch, model.in_channels, size, size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    shape = [batch, model.in_channels, size, size]
    flops = {bwd: batch * count_flops(model, x, t, bwd) for bwd in (False, True)}

    fwd_model, _ = build_model(config, device=device)
    fwd_model.load_state_dict(model.state_dict())
    randomize_zero_layers_(fwd_model)

    previous_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    records, summary = [], []
    try:
        recs, lines = forward_section(
            fwd_model,
            config,
            size,
            batch_sizes,
            device,
            warmup,
            iters,
            args.breakdown,
            flops[False] // batch,
            args.compile_reference,
            emit=lambda rec: common.emit(args, rec),
        )
        records += recs
        summary += lines
        del fwd_model
        if args.forward_only:
            return _finish(config, n_params, batch, flops, records, summary)
        for backward in (True,):
            model.train(backward)
            op = f"unet {config} fwd+bwd" if backward else f"unet {config} fwd"
            for dtype in dtypes:
                ms = {}
                for impl in ("einsum", "auto"):
                    with attention_impl(impl):
                        ms[impl] = common.time_ms(
                            _step_fn(model, x, t, device, dtype, backward),
                            device,
                            warmup,
                            iters,
                            flush_l2=False,
                        )
                for impl in ("auto", "einsum"):
                    rec = common.record(
                        op,
                        impl,
                        shape,
                        dtype,
                        device,
                        ms[impl],
                        flops=flops[backward],
                        images_per_s=round(batch / (ms[impl] * 1e-3), 2),
                        speedup=round(ms["einsum"] / ms[impl], 3),
                        params=n_params,
                    )
                    records.append(common.emit(args, rec))
                    summary.append(
                        f"{op:<24} {impl:<7} {rec['dtype']:<9} "
                        f"{rec['images_per_s']:>10.1f} img/s  x{rec['speedup']:.2f} vs einsum"
                    )

        # Training-step memory with and without activation checkpointing.
        model.train()
        state = model.state_dict()
        for dtype in dtypes:
            peaks = {}
            for ckpt in (False, True):
                m, _ = build_model(config, use_checkpoint=ckpt, device=device)
                m.load_state_dict(state)
                m.train()
                with attention_impl("auto"):
                    peaks[ckpt] = _peak_training_bytes(m, x, t, device, dtype)
                    step_ms = common.time_ms(
                        _step_fn(m, x, t, device, dtype, True),
                        device,
                        *((0, 1) if device.type == "cpu" else (1, 3)),
                        flush_l2=False,
                    )
                del m
                measure = (
                    "cuda max_memory_allocated above parameters"
                    if device.type == "cuda"
                    else "activation bytes kept for backward"
                )
                rec = common.record(
                    f"unet {config} train step",
                    f"use_checkpoint={ckpt}",
                    shape,
                    dtype,
                    device,
                    step_ms,
                    peak_mib=round(peaks[ckpt] / 2**20, 1),
                    memory_measure=measure,
                    params=n_params,
                )
                records.append(common.emit(args, rec))
            ratio = peaks[True] / max(peaks[False], 1)
            summary.append(
                f"{'train step memory':<24} {str(dtype).replace('torch.', ''):<17}"
                f" {peaks[False] / 2**20:.1f} MiB -> {peaks[True] / 2**20:.1f} MiB with "
                f"use_checkpoint ({100 * ratio:.0f}%)"
            )
    finally:
        torch.backends.cudnn.benchmark = previous_benchmark
    return _finish(config, n_params, batch, flops, records, summary)


def _finish(config, n_params, batch, flops, records, summary) -> list:
    print(
        f"\nunet {config}: {n_params:,} parameters, batch {batch}, "
        f"{flops[False] / batch / 1e9:.2f} GFLOP/image forward, "
        f"{flops[True] / batch / 1e9:.2f} forward+backward"
    )
    for line in summary:
        print("  " + line)
    return records
