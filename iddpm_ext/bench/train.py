"""``iddpm bench train``: training iterations/s and peak memory, ours vs einsum attention.

One iteration is a full :class:`iddpm_ext.training.loop.TrainLoop` step on a synthetic batch:
timestep sampling, ``training_losses`` (L_hybrid: learned σ, cosine schedule), backward,
gradient norm, AdamW and an EMA update. Cases: fp32 and bf16 autocast, with and without
``use_checkpoint``, attention ``auto`` (the fused kernel where the extension has one for
the device) and ``einsum`` (the reference's math), and without checkpointing ``auto`` with the
torso channels-last (``TrainLoop(channels_last=True)``, impl "auto channels-last"); on the CPU
also both of those with the 3×3 stride-1 convs' forward and input gradient by Winograd
(``iddpm_ext.nn.conv_winograd_train``, impl "... winograd": fp32 in the default mode "auto", which
takes the calls its rule measured faster, so these rows are the library's default CPU path; bf16,
which "auto" leaves to torch, "on": every call; the other rows run it "off"; record field
``conv_winograd_train``: the mode), their fp32 weight gradients by Winograd too where
``conv_winograd_weight_grad("auto")`` takes them (Cin or Cout ≥ 64), and once more, fp32
channels-last, with torch's weight gradients (impl "... winograd torch-dW"), and fp32 NCHW with every
Winograd conv F(2×2, 3×3) (impl "auto winograd F(2x2)"; the other rows run the default tile rule,
``iddpm_ext.nn.set_conv_winograd_tile``: F(4×4, 3×3) for maps of 8×8 and more; record field
``conv_winograd_tile``). Every row runs
TrainLoop's default fused AdamW but one, fp32 ``auto`` with the reference's per-tensor AdamW (impl
"auto per-tensor-adamw", record field ``fused_optimizer``). The
baseline for ``speedup`` is einsum / fp32 / no checkpointing; the GPU target is ≥ 2× its it/s.

When IDDPM_REF_PATH names a checkout of openai/improved-diffusion, the reference's UNetModel
with the same weights runs in the same loop, fp32 and bf16 without checkpointing (impl
"reference"), after our cases; our rows without checkpointing then carry
``speedup_vs_reference`` (the reference's ms of the same precision / ours).
``--compile MODE`` adds, fp32 and bf16 without checkpointing, our model with the network's
forward and backward compiled (``TrainLoop(compile=MODE)``, impl "auto compile(MODE)") and,
with IDDPM_REF_PATH, the reference model compiled ("reference compile(MODE)": the baseline a
user gets in one line); our rows then carry ``speedup_vs_compiled_reference`` (issue 12's
training target: ≥ 1.3× at B = 128 bf16). Compiling takes minutes (inductor), so these cases
come last.

``--breakdown`` adds each case's time per kind of work, from the torch profiler over one more
step: conv, norm, elementwise, attention (the ops' kinds as ``iddpm bench unet --breakdown``
counts them, forward and backward), optimizer (everything inside AdamW's step and zero_grad, the
gradient norm and the EMA update) and other (the losses' arithmetic, linear layers, ...).

Configurations: ``cifar10`` is improved-diffusion's CIFAR-10 run (--preset cifar10: 128
channels, 3 res blocks, dropout 0.3, T = 4000; batch 128 on CUDA); ``imagenet64`` the paper's
ImageNet-64 model (128 channels, channel_mult 1,2,3,4, 3 res blocks, attention at 16 and 8
with 4 heads, scale-shift norm, T = 4000; batch 32); ``digits`` is ``--preset digits`` (the
model ``iddpm train`` trains on a CPU for the demo: 1.08 M parameters, 16x16 grayscale, dropout
0.1, T = 1000; batch 64); ``tiny`` (CPU default and --quick) is 32 channels, 1 res block,
channel_mult 1,2, attention at 8x8, 16x16 RGB images, T = 1000, batch 8. ``tflops`` (and on a
known card ``pct_peak`` of its dense bf16 tensor peak) counts the network's forward + backward
FLOPs (torch's FLOP counter, einsum attention) × batch per step; the losses, optimizer and EMA
are not counted. Peak memory is
torch.cuda.max_memory_allocated over the timed steps (parameters, optimizer state and EMA
included); not measured on CPU.
"""

from __future__ import annotations

import functools
import tempfile

import torch

from ..nn import conv_winograd_tile, conv_winograd_train, conv_winograd_weight_grad
from ..ops.attention import attention_impl
from . import common
from .unet import COMPILE_MODES, KINDS, _event_kind, breakdown_ms

# Model configurations, laid out by hand.
# fmt: off
CONFIGS = {
    "cifar10": dict(image_size=32, num_channels=128, num_res_blocks=3, learn_sigma=True, dropout=0.3,
                    diffusion_steps=4000, noise_schedule="cosine"),
    "imagenet64": dict(image_size=64, num_channels=128, num_res_blocks=3, channel_mult="1,2,3,4",
                       attention_resolutions="16,8", num_heads=4, use_scale_shift_norm=True,
                       learn_sigma=True, dropout=0.0, diffusion_steps=4000, noise_schedule="cosine"),
    "tiny": dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                 attention_resolutions="8", num_heads=4, learn_sigma=True, diffusion_steps=1000,
                 noise_schedule="cosine"),
    # --preset digits' model (iddpm_ext.cli.presets, a layer above: tests/bench checks they agree)
    "digits": dict(image_size=16, image_channels=1, num_channels=32, num_res_blocks=2, channel_mult="1,2",
                   attention_resolutions="8", num_heads=4, learn_sigma=True, dropout=0.1,
                   diffusion_steps=1000, noise_schedule="cosine"),
}
BATCH = {"cifar10": 128, "imagenet64": 32, "digits": 64, "tiny": 8}
# fmt: on
# --breakdown's kinds: the UNet's layer kinds, then the optimizer's share of a training step.
TRAIN_KINDS = KINDS[:-1] + ("optimizer", "other")
_OPTIMIZER_SCOPES = ("Optimizer.step", "Optimizer.zero_grad", "iddpm.grad_norm", "iddpm.ema")


def add_arguments(parser):
    parser.add_argument(
        "--config",
        choices=sorted(CONFIGS),
        default=None,
        help="model configuration (default: cifar10 on CUDA, tiny on CPU or with --quick)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="batch size (default: " + ", ".join(f"{b} {c}" for c, b in BATCH.items()) + ")",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="each case's time per kind of work (" + ", ".join(TRAIN_KINDS) + "), profiled over one step",
    )
    parser.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        default=None,
        metavar="MODE",
        help="also time the training step with the network under torch.compile(mode=MODE), ours and "
        "(with IDDPM_REF_PATH) the reference model: " + ", ".join(COMPILE_MODES),
    )
    parser.set_defaults(warmup=-1, iters=-1)


def _reference_model(cfg, ours):
    """openai/improved-diffusion's UNetModel (IDDPM_REF_PATH) built like ``ours`` from ``cfg``,
    with its weights; None without IDDPM_REF_PATH."""
    import inspect

    from ..script_util import _unet_kwargs, create_model
    from .unet import reference_unet_class

    cls = reference_unet_class()
    if cls is None:
        return None
    args = {k: cfg.get(k, p.default) for k, p in inspect.signature(create_model).parameters.items()}
    ref = cls(**_unet_kwargs(args, args["image_size"], "image_size", args["image_channels"]))
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ref


def _loop(config, use_checkpoint, amp, device, batch, out_dir, channels_last=False, compile="none",
          reference=False, fused_optimizer=True):  # fmt: skip
    from ..resample import UniformSampler
    from ..script_util import create_model_and_diffusion, model_and_diffusion_defaults
    from ..training.loop import TrainLoop

    cfg = model_and_diffusion_defaults()
    cfg.update(CONFIGS[config])
    cfg["use_checkpoint"] = use_checkpoint
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**cfg)
    if reference:
        model = _reference_model(cfg, model)
    model.to(device)
    loop = TrainLoop(
        model=model,
        diffusion=diffusion,
        data=iter(()),
        batch_size=batch,
        microbatch=-1,
        lr=1e-4,
        ema_rate="0.9999",
        log_interval=10**9,
        save_interval=10**9,
        resume_checkpoint="",
        schedule_sampler=UniformSampler(diffusion),
        config=cfg,
        out_dir=out_dir,
        amp=amp,
        channels_last=channels_last,
        compile=compile,
        fused_optimizer=fused_optimizer,
        progress=False,
        log=lambda *a, **k: None,
    )
    size, channels = cfg["image_size"], cfg["image_channels"]
    x = torch.rand(batch, channels, size, size, device=device) * 2 - 1
    return loop, x, sum(p.numel() for p in model.parameters())


def _step_flops(loop, x) -> int:
    """FLOPs of the network's forward + backward for the batch ``x`` (one training step's model work)."""
    from .unet import count_flops

    t = torch.zeros(x.shape[0], device=x.device, dtype=torch.long)
    return x.shape[0] * count_flops(loop.model, x, t, backward=True)


def _cases(compile_mode, with_reference, cpu=False) -> list:
    """(use_checkpoint, amp, attention impl, channels_last, compile mode, reference model, Winograd
    training convs: None, or their weight-gradient mode, fused AdamW, Winograd tile mode) of each
    case, in the order they run (the first is the speedup baseline)."""

    def case(
        use_ckpt, amp, impl="auto", cl=False, comp="none", ref=False, wino=None, fused=True, tile="auto"
    ):
        return (use_ckpt, amp, impl, cl, comp, ref, wino, fused, tile)

    cases = []
    for use_ckpt in (False, True):
        for amp in ("none", "bf16"):
            for impl in ("einsum", "auto"):
                cases.append(case(use_ckpt, amp, impl))
            if not use_ckpt:  # the torso channels-last, fused attention
                cases.append(case(use_ckpt, amp, cl=True))
            if not use_ckpt and cpu:  # the 3×3 convs by Winograd, NCHW and channels-last
                cases += [case(use_ckpt, amp, cl=cl, wino="auto") for cl in (False, True)]
                if amp == "none":  # and with torch's weight gradients (bf16 has only those)
                    cases.append(case(use_ckpt, amp, cl=True, wino="off"))
                    cases.append(case(use_ckpt, amp, wino="auto", tile="2"))  # F(2×2) only
    cases.append(case(False, "none", fused=False))  # the reference's per-tensor AdamW
    if with_reference:  # the reference model eager, in the same loop
        cases += [case(False, amp, ref=True) for amp in ("none", "bf16")]
    if compile_mode:
        for amp in ("none", "bf16"):
            if with_reference:
                cases.append(case(False, amp, comp=compile_mode, ref=True))
            cases.append(case(False, amp, comp=compile_mode))
    return cases


def _step_kind(ev) -> str:
    """--breakdown's kind of a profiled op: "optimizer" inside AdamW's step / zero_grad or the
    loop's gradient norm and EMA update (their record_function scopes), else its layer kind."""
    node = ev.cpu_parent
    while node is not None:
        if node.name.startswith(_OPTIMIZER_SCOPES):
            return "optimizer"
        node = node.cpu_parent
    return _event_kind(ev)


def _impl_name(impl, channels_last, compile_mode, reference, winograd=None, fused=True, tile="auto") -> str:
    name = "reference" if reference else impl + (" channels-last" if channels_last else "")
    name += " winograd" if winograd else ""  # (conv_winograd_train: fp32 "auto", bf16 "on")
    name += " torch-dW" if winograd == "off" else ""  # (conv_winograd_weight_grad("off"))
    name += " F(2x2)" if tile == "2" else ""  # (conv_winograd_tile(2))
    name += "" if fused else " per-tensor-adamw"  # (TrainLoop(fused_optimizer=False))
    return name + (f" compile({compile_mode})" if compile_mode != "none" else "")


def run(args) -> list:
    from .unet import reference_unet_class

    device = torch.device(args.device)
    config = args.config or ("cifar10" if device.type == "cuda" and not args.quick else "tiny")
    batch = args.batch or BATCH[config]
    cpu = device.type == "cpu"
    warmup = args.warmup if args.warmup >= 0 else (1 if cpu else 3)
    iters = args.iters if args.iters >= 0 else ((2 if args.quick else 5) if cpu else 10)
    cases = _cases(args.compile, reference_unet_class() is not None, cpu=cpu)
    records, rows = [], []
    baseline_ms = None
    reference_ms, compiled_reference_ms = {}, {}  # amp -> ms of the reference eager / compiled
    flops = None  # per step, counted once (the same network in every case)
    with tempfile.TemporaryDirectory() as tmp:
        for use_ckpt, amp, impl, cl, comp, ref, wino, fused, tile in cases:
            loop, x, n_params = _loop(
                config, use_ckpt, amp, device, batch, tmp, cl, comp, reference=ref, fused_optimizer=fused
            )
            step = functools.partial(loop.run_step, x, {})
            if flops is None:
                flops = _step_flops(loop, x)
            peak = None
            # the Winograd rows: fp32 by the default rule ("auto"), bf16 (which it leaves to torch) "on"
            wino_mode = "off" if wino is None else ("on" if amp == "bf16" else "auto")
            with (
                attention_impl(impl),
                conv_winograd_train(wino_mode),
                conv_winograd_weight_grad(wino or "auto"),
                conv_winograd_tile(tile),
            ):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                ms = common.time_ms(step, device, warmup, iters, flush_l2=False)
                if device.type == "cuda":
                    peak = torch.cuda.max_memory_allocated(device) / 2**20
                # (after the peak memory: the profiled step is not counted in it)
                extra = (
                    {"breakdown_ms": breakdown_ms(step, device, _step_kind, TRAIN_KINDS)}
                    if args.breakdown
                    else {}
                )
            if baseline_ms is None:
                baseline_ms = ms  # einsum, fp32, no checkpointing: the first case
            if ref:
                (reference_ms if comp == "none" else compiled_reference_ms)[amp] = ms
            elif amp in compiled_reference_ms:
                extra["speedup_vs_compiled_reference"] = round(compiled_reference_ms[amp] / ms, 3)
            name = _impl_name(impl, cl, comp, ref, wino, fused, tile)
            rec = common.record(
                f"train step {config}" + (" +ckpt" if use_ckpt else ""),
                name,
                list(x.shape),
                torch.bfloat16 if amp == "bf16" else torch.float32,
                device,
                ms,
                flops=flops,
                gflop_per_step=round(flops / 1e9, 4),
                it_per_s=round(1000 / ms, 3),
                images_per_s=round(batch * 1000 / ms, 1),
                use_checkpoint=use_ckpt,
                channels_last=cl,
                conv_winograd_train=wino_mode,
                conv_winograd_weight_grad=wino,
                conv_winograd_tile=tile,
                fused_optimizer=fused,
                compile=comp,
                reference=ref,
                peak_mib=None if peak is None else round(peak, 1),
                speedup=round(baseline_ms / ms, 3),
                params=n_params,
                **extra,
            )
            records.append(common.emit(args, rec))
            mem = f"{peak:8.0f} MiB" if peak is not None else "     n/a"
            short = name.replace(" channels-last", " NHWC")
            rows.append(
                (
                    rec,
                    f"{short:<28} {amp:<5} ckpt={str(use_ckpt):<5} {1000 / ms:8.2f} it/s "
                    f"{batch * 1000 / ms:9.1f} img/s {rec['tflops']:8.3f} TF/s  peak {mem}  "
                    f"x{baseline_ms / ms:.2f}",
                )
            )
            loop.close()  # the run folder's lock: the next case's TrainLoop takes it
            del loop, x, step
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(
        f"\ntrain step {config}: {records[0]['params']:,} parameters, batch {batch}, "
        f"on {common.device_name(device)} (speedup vs einsum/fp32/no checkpointing)"
    )
    for rec, line in rows:
        # ours without checkpointing against the reference eager in the same precision (it ran later)
        ref_ms = reference_ms.get("bf16" if rec["dtype"] == "bfloat16" else "none")
        eager_ours = not rec["reference"] and not rec["use_checkpoint"] and rec["compile"] == "none"
        if ref_ms is not None and eager_ours:
            rec["speedup_vs_reference"] = round(ref_ms / rec["ms"], 3)
            line += f"  vs reference x{rec['speedup_vs_reference']:.2f}"
        if "speedup_vs_compiled_reference" in rec:
            line += f"  vs compiled reference x{rec['speedup_vs_compiled_reference']:.2f}"
        print("  " + line)
        if "breakdown_ms" in rec:
            print("      " + ", ".join(f"{k} {rec['breakdown_ms'][k]:.1f}" for k in TRAIN_KINDS) + " ms")
    best = max(r["speedup"] for r in records if r["impl"].startswith("auto"))
    print(
        f"  best 'auto' case: x{best:.2f} the einsum/fp32 baseline's it/s"
        + (f" (GPU target >= 2x: {'met' if best >= 2 else 'NOT met'})" if device.type == "cuda" else "")
    )
    return records
