"""``iddpm bench unet``: UNet forward and forward+backward throughput, ours vs einsum attention.

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

import torch

from ..ops.attention import attention_impl
from ..unet import AttentionBlock, ResBlock, UNetModel
from . import common

# Model configurations, laid out by hand.
# fmt: off
CONFIGS = {
    # improved-diffusion's CIFAR-10 run: image 32, attention_resolutions "16,8" -> ds (2, 4).
    "cifar10": dict(image_size=32, in_channels=3, model_channels=128, out_channels=6,
                    num_res_blocks=3, attention_resolutions=(2, 4), dropout=0.3,
                    channel_mult=(1, 2, 2, 2), num_heads=4, use_scale_shift_norm=True),
    "tiny": dict(image_size=16, in_channels=3, model_channels=32, out_channels=6,
                 num_res_blocks=1, attention_resolutions=(2,), dropout=0.0,
                 channel_mult=(1, 2), num_heads=4, use_scale_shift_norm=True),
}
# fmt: on
_AUTO = -1  # "choose by device": see _runs()


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
        help="batch size (default: 128 on CUDA, 2 on CPU, 4 with --quick on CUDA)",
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


def _count_flops(model, x, t, backward: bool) -> int:
    """FLOPs of one image (einsum attention, so the attention matmuls are counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with attention_impl("einsum"), FlopCounterMode(display=False) as counter:
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


def run(args) -> list:
    device = torch.device(args.device)
    config = args.config or ("tiny" if args.quick else "cifar10")
    batch = args.batch or (
        128 if device.type == "cuda" and not args.quick else 2 if device.type == "cpu" else 4
    )
    warmup, iters = _runs(args, device)
    dtypes = [torch.float32, torch.bfloat16]

    torch.manual_seed(0)
    model, size = build_model(config, device=device)
    n_params = sum(p.numel() for p in model.parameters())
    x = torch.randn(batch, model.in_channels, size, size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    shape = [batch, model.in_channels, size, size]
    flops = {bwd: batch * _count_flops(model, x, t, bwd) for bwd in (False, True)}

    previous_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    records, summary = [], []
    try:
        for backward in (False, True):
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

    print(
        f"\nunet {config}: {n_params:,} parameters, batch {batch}, "
        f"{flops[False] / batch / 1e9:.2f} GFLOP/image forward, "
        f"{flops[True] / batch / 1e9:.2f} forward+backward"
    )
    for line in summary:
        print("  " + line)
    return records
