"""``iddpm bench step``: one reverse-diffusion step (after the model call), fused vs eager.

Impls, side by side in one run (same inputs, t spread over the schedule):
  fused (explicit noise)   iddpm::p_sample_step / ddim_step reading a noise tensor drawn
                           beforehand (not timed, as for the two eager rows below)
  fused (in-kernel noise)  the fused op drawing its Philox noise itself (timed)
  eager                    GaussianDiffusion's eager path with the same noise tensor (one
                           gather of the coefficient rows, separate elementwise ops)
  eager (reference-style)  the reference implementation's step with the same noise tensor:
                           every coefficient taken from a numpy array per step
                           (_extract_into_tensor), separate elementwise ops (ancestral only)
  eager (torch.compile)    the eager ε-model step over the coefficient table (plain tensor
                           ops) compiled by inductor, drawing its noise inside (the
                           counterpart of in-kernel noise)
`speedup` is relative to the reference-style eager step (to the eager row for DDIM); fused
rows also carry `vs_compile`, the compiled eager step's time over theirs. `gbps` counts the
bytes a step has to move: x, the model output and x_{t-1} once each, plus the noise tensor
once where a row reads one (pred_x0 is not written). With explicit noise the noise is also
written once by whoever draws it (randn), so a full explicit-noise step moves 24 B per fp32
element against 16 B with in-kernel noise (learned variances: 2C model-output channels).
Eager rows move more than they are credited with, so their figure is an effective bandwidth.

Every row also carries ``host_us`` (host microseconds per call: on CUDA the time to issue it,
launches not waited for; on the CPU the whole call) and what one call dispatches:
``ops_per_call`` (torch ops, aten and custom, counted by a dispatch mode) and on CUDA
``kernels_per_call`` / ``h2d_per_call`` (torch.profiler).

Call rows (first; case 1x3x8x8, plus the cases with B <= 16 outside --quick, or the --sizes):
one public call with a constant model, ``GaussianDiffusion.p_sample(model, x, t)`` (``--rule
ddim``: ``ddim_sample``) with the timestep check on, as a user's loop calls it, against
openai/improved-diffusion's own method when IDDPM_REF_PATH names a checkout of it (the folder
holding ``improved_diffusion/``; nothing of it is part of this project), else against the
reference-style step above after the same model call. ``speedup`` is the reference's host
time over the row's.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import ops
from ..core.schedules import get_named_beta_schedule
from ..core.tables import COEF_INDEX
from ..gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    _extract_into_tensor,
)
from . import common

CASES = [
    (1, 3, 32, 32),
    (16, 3, 32, 32),
    (64, 3, 32, 32),
    (256, 3, 32, 32),
    (64, 3, 64, 64),
    (64, 3, 256, 256),
]
QUICK_CASES = [(16, 3, 32, 32), (64, 3, 32, 32)]
CALL_CASE = (1, 3, 8, 8)  # the per-call target's case: a p_sample call against the reference's
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_arguments(parser):
    parser.add_argument("--rule", choices=["ancestral", "ddim"], default="ancestral")
    parser.add_argument("--var-type", default="learned_range", choices=[v.name.lower() for v in ModelVarType])
    parser.add_argument("--mean-type", default="epsilon", choices=[m.name.lower() for m in ModelMeanType])
    parser.add_argument(
        "--dtype", default="float32", choices=list(_DTYPES), help="dtype of x and of the model output"
    )
    parser.add_argument("--eta", type=float, default=0.5, help="DDIM eta (--rule ddim)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument(
        "--sizes", default=None, help="cases as BxCxHxW, comma-separated (default: the standard six)"
    )


def _reference_style_step(d, model_output, x, t, clip, noise):
    """The reference implementation's ancestral step: numpy tables indexed per step."""
    C = x.shape[1]
    if d.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
        model_output, var_values = torch.split(model_output, C, dim=1)
        if d.model_var_type == ModelVarType.LEARNED:
            log_var = var_values
        else:
            min_log = _extract_into_tensor(d.posterior_log_variance_clipped, t, x.shape)
            max_log = _extract_into_tensor(np.log(d.betas), t, x.shape)
            frac = (var_values + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
    elif d.model_var_type == ModelVarType.FIXED_LARGE:
        arr = np.log(np.append(d.posterior_variance[1], d.betas[1:]))
        log_var = _extract_into_tensor(arr, t, x.shape)
    else:
        log_var = _extract_into_tensor(d.posterior_log_variance_clipped, t, x.shape)
    x0 = (
        _extract_into_tensor(d.sqrt_recip_alphas_cumprod, t, x.shape) * x
        - _extract_into_tensor(d.sqrt_recipm1_alphas_cumprod, t, x.shape) * model_output
    )
    if clip:
        x0 = x0.clamp(-1, 1)
    mean = (
        _extract_into_tensor(d.posterior_mean_coef1, t, x.shape) * x0
        + _extract_into_tensor(d.posterior_mean_coef2, t, x.shape) * x
    )
    mask = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))
    return mean + mask * torch.exp(0.5 * log_var) * noise


def _table_step(table, x, mo, t, var_type, ddim, eta, clip=True):
    """The eager ε-model step written with plain tensor ops over the device coefficient
    table (what torch.compile gets to fuse; GaussianDiffusion's own eager path holds its
    coefficients in a helper class that dynamo does not trace). Noise: randn_like(x)."""
    rows = table[t]
    shape = (-1,) + (1,) * (x.dim() - 1)

    def col(name):
        return rows[:, COEF_INDEX[name]].view(shape)

    C = x.shape[1]
    eps, v = (mo[:, :C], mo[:, C:]) if mo.shape[1] == 2 * C else (mo, None)
    x0 = col("sqrt_recip_alphas_cumprod") * x - col("sqrt_recipm1_alphas_cumprod") * eps
    if clip:
        x0 = x0.clamp(-1, 1)
    noise = torch.randn_like(x)
    mask = (t != 0).float().view(shape)
    if ddim:
        eps = (col("sqrt_recip_alphas_cumprod") * x - x0) / col("sqrt_recipm1_alphas_cumprod")
        ab, abp = col("alphas_cumprod"), col("alphas_cumprod_prev")
        sigma = eta * torch.sqrt((1 - abp) / (1 - ab)) * torch.sqrt(1 - ab / abp)
        mean = x0 * torch.sqrt(abp) + torch.sqrt(1 - abp - sigma**2) * eps
        return mean + mask * sigma * noise
    mean = col("posterior_mean_coef1") * x0 + col("posterior_mean_coef2") * x
    if var_type == ModelVarType.LEARNED:
        log_var = v
    elif var_type == ModelVarType.LEARNED_RANGE:
        frac = (v + 1) / 2
        log_var = frac * col("log_betas") + (1 - frac) * col("posterior_log_variance_clipped")
    elif var_type == ModelVarType.FIXED_LARGE:
        log_var = col("fixed_large_log_variance")
    else:
        log_var = col("posterior_log_variance_clipped")
    return mean + mask * torch.exp(0.5 * log_var) * noise


def _parse_sizes(text):
    return common.parse_shapes(text, "--sizes", 4, "64x3x32x32")


def _reference_diffusion(gd_module, d):
    """The reference's GaussianDiffusion with ``d``'s betas and types (None without a checkout)."""
    if gd_module is None:
        return None
    return gd_module.GaussianDiffusion(
        betas=d.betas,
        model_mean_type=gd_module.ModelMeanType[d.model_mean_type.name],
        model_var_type=gd_module.ModelVarType[d.model_var_type.name],
        loss_type=gd_module.LossType[d.loss_type.name],
    )


def _call_rows(args, d, ref_d, shape, device, dtype, learned) -> list:
    """One public call with a constant model (its output precomputed): ours
    (GaussianDiffusion.p_sample / ddim_sample, timestep check on) against openai/improved-
    diffusion's (IDDPM_REF_PATH) or, without a checkout, the reference-style step after the
    same model call. Host µs per call, and the ops (CUDA: kernels) each call dispatches."""
    ddim = args.rule == "ddim"
    B, C = shape[:2]
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, device=device, generator=gen).to(dtype)
    mo_shape = (B, 2 * C if learned else C, *shape[2:])
    out = torch.randn(mo_shape, device=device, generator=gen).clamp(-1, 1).to(dtype)
    t = torch.full((B,), d.num_timesteps // 2, device=device, dtype=torch.long)

    def model(*_args, **_kwargs):
        return out

    eta = args.eta if ddim else 0.0
    name = "ddim_sample" if ddim else "p_sample"
    impls = {
        f"GaussianDiffusion.{name}": lambda: getattr(d, name)(model, x, t, **({"eta": eta} if ddim else {}))
    }
    if ref_d is not None:
        impls[f"improved-diffusion {name}"] = lambda: getattr(ref_d, name)(
            model, x, t, **({"eta": eta} if ddim else {})
        )
    elif not ddim and d.model_mean_type == ModelMeanType.EPSILON:

        def reference_style():
            mo = model(x, t)
            return _reference_style_step(d, mo, x, t, True, torch.randn_like(x))

        impls["reference-style p_sample"] = reference_style
    # Calls take microseconds: time many more of them than the kernel rows (--quick included).
    warmup, iters = max(args.warmup, 50), max(args.iters, 500)
    d.check_timesteps = True  # as a user's call runs
    try:
        rows = {}
        with torch.no_grad():
            for impl, fn in impls.items():
                ms = common.time_ms(fn, device, warmup, iters, flush_l2=False)
                us = ms * 1e3 if device.type == "cpu" else common.host_us(fn, device, warmup, iters // 20)
                rows[impl] = (ms, us, common.launches(fn, device))
    finally:
        d.check_timesteps = False
    base_us = rows[list(rows)[-1]][1]  # the reference's call (or ours when there is none)
    records = []
    for impl, (ms, us, counts) in rows.items():
        rec = common.record(f"{name} call", impl, list(shape), dtype, device, ms, host_us=round(us, 2),
                            speedup=round(base_us / us, 2), rule=args.rule, **counts)  # fmt: skip
        records.append(common.emit(args, rec))
    return records


def run(args) -> list:
    device = torch.device(args.device)
    dtype = _DTYPES[args.dtype]
    mean_type = ModelMeanType[args.mean_type.upper()]
    var_type = ModelVarType[args.var_type.upper()]
    d = GaussianDiffusion(
        betas=get_named_beta_schedule("linear", 1000),
        model_mean_type=mean_type,
        model_var_type=var_type,
        loss_type=LossType.MSE,
    )
    d.check_timesteps = False  # the eager rows time the update alone (t is valid by construction)
    learned = var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)
    table = d.coef_table(device)
    cases = _parse_sizes(args.sizes) if args.sizes else (QUICK_CASES if args.quick else CASES)
    # Compiled rows take an inductor build per case (tens of seconds): never in --quick.
    can_compile = not args.no_compile and not args.quick
    ddim = args.rule == "ddim"
    op_name = "ddim_step" if ddim else "p_sample_step"
    ref_d = _reference_diffusion(common.reference_module("gaussian_diffusion"), d)
    records = []
    call_cases = cases if args.sizes else [CALL_CASE] + [c for c in cases if c[0] <= 16 and not args.quick]
    for shape in call_cases:
        records += _call_rows(args, d, ref_d, shape, device, dtype, learned)
    for shape in cases:
        B, C = shape[:2]
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(shape, device=device, generator=gen).to(dtype)
        mo_shape = (B, 2 * C if learned else C, *shape[2:])
        mo = torch.randn(mo_shape, device=device, generator=gen).clamp(-1, 1).to(dtype)
        t = torch.randint(0, d.num_timesteps, (B,), device=device, generator=gen)

        def fused(noise_fn):
            if ddim:
                return lambda: ops.ddim_step(
                    x,
                    mo,
                    t,
                    table,
                    mean_type,
                    var_type,
                    True,
                    eta=args.eta,
                    noise=noise_fn(),
                    return_pred_xstart=False,
                )
            return lambda: ops.p_sample_step(
                x, mo, t, table, mean_type, var_type, True, noise=noise_fn(), return_pred_xstart=False
            )

        def eager():  # the fused rows call the ops directly
            return d.step(args.rule, mo, x, t, eta=args.eta if ddim else 0.0, noise=noise, fused=False)

        noise = torch.randn(shape, device=device, generator=gen).to(dtype)
        impls = {}
        if ops.has_kernel(device):
            impls["fused (explicit noise)"] = (fused(lambda: noise), True)
            impls["fused (in-kernel noise)"] = (fused(lambda: None), False)
        impls["eager"] = (eager, True)
        if not ddim and mean_type == ModelMeanType.EPSILON:
            impls["eager (reference-style)"] = (lambda: _reference_style_step(d, mo, x, t, True, noise), True)
        if can_compile and mean_type == ModelMeanType.EPSILON:
            compiled = torch.compile(_table_step)
            impls["eager (torch.compile)"] = (
                lambda: compiled(table, x, mo, t, var_type, ddim, args.eta),
                False,
            )

        n = x.numel()
        base_bytes = n * x.element_size() * 2 + mo.numel() * mo.element_size()
        noise_bytes = n * x.element_size()
        times, hosts, counts = {}, {}, {}
        for impl, (fn, _) in impls.items():
            with torch.no_grad():
                times[impl] = common.time_ms(fn, device, args.warmup, args.iters)
                hosts[impl] = (
                    times[impl] * 1e3
                    if device.type == "cpu"
                    else common.host_us(fn, device, args.warmup, args.iters)
                )
                counts[impl] = common.launches(fn, device)
        ref_ms = times.get("eager (reference-style)", times["eager"])
        compile_ms = times.get("eager (torch.compile)")
        for impl, (_, reads_noise) in impls.items():
            ms = times[impl]
            extra = {
                "host_us": round(hosts[impl], 2),
                **counts[impl],
                "speedup": round(ref_ms / ms, 2),
                "rule": args.rule,
                "var_type": var_type.name.lower(),
                "model_output_dtype": str(mo.dtype),
            }
            if compile_ms and impl.startswith("fused"):
                extra["vs_compile"] = round(compile_ms / ms, 2)
            moved = base_bytes + (noise_bytes if reads_noise else 0)
            rec = common.record(op_name, impl, list(shape), dtype, device, ms, bytes_moved=moved, **extra)
            records.append(common.emit(args, rec))
    return records
