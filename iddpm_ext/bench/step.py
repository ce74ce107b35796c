"""``iddpm bench step``: one reverse-diffusion step (after the model call), fused vs eager.

Impls, side by side in one run (same inputs, t mixed over the schedule):
  fused (explicit noise)   torch.randn_like(x) + iddpm::p_sample_step/ddim_step reading it
  fused (in-kernel noise)  the fused op drawing Philox noise itself
  eager                    GaussianDiffusion's eager path (one gather of the coefficient rows,
                           separate elementwise ops, randn_like)
  eager (reference-style)  the reference's step: each coefficient taken from a numpy array
                           per step (_extract_into_tensor), separate elementwise ops
  eager (torch.compile)    the eager path compiled by inductor (noise drawn inside it)
`speedup` is relative to the reference-style eager step; `vs_compile` relates the fused rows
to the compiled eager step. `gbps` counts the bytes the step has to move: x, the model output
and x_{t-1} once each, plus the noise tensor written and read again where an impl
materialises it (explicit noise, eager, reference-style); eager rows move more than that, so
their figure is an effective bandwidth. pred_x0 is not written by the fused rows.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import ops
from ..diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType
from ..diffusion import _extract_into_tensor
from ..schedules import get_named_beta_schedule
from . import common

CASES = [(1, 3, 32, 32), (16, 3, 32, 32), (64, 3, 32, 32), (256, 3, 32, 32), (64, 3, 64, 64),
         (64, 3, 256, 256)]
QUICK_CASES = [(16, 3, 32, 32), (64, 3, 32, 32)]
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_arguments(parser):
    parser.add_argument("--rule", choices=["ancestral", "ddim"], default="ancestral")
    parser.add_argument("--var-type", default="learned_range",
                        choices=[v.name.lower() for v in ModelVarType])
    parser.add_argument("--mean-type", default="epsilon",
                        choices=[m.name.lower() for m in ModelMeanType])
    parser.add_argument("--dtype", default="float32", choices=list(_DTYPES),
                        help="dtype of x and of the model output")
    parser.add_argument("--eta", type=float, default=0.5, help="DDIM eta (--rule ddim)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--sizes", default=None,
                        help="cases as BxCxHxW, comma-separated (default: the standard six)")


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
    x0 = (_extract_into_tensor(d.sqrt_recip_alphas_cumprod, t, x.shape) * x
          - _extract_into_tensor(d.sqrt_recipm1_alphas_cumprod, t, x.shape) * model_output)
    if clip:
        x0 = x0.clamp(-1, 1)
    mean = (_extract_into_tensor(d.posterior_mean_coef1, t, x.shape) * x0
            + _extract_into_tensor(d.posterior_mean_coef2, t, x.shape) * x)
    mask = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))
    return mean + mask * torch.exp(0.5 * log_var) * noise


def _parse_sizes(text):
    return [tuple(int(v) for v in part.lower().split("x")) for part in text.split(",") if part]


def run(args) -> list:
    device = torch.device(args.device)
    dtype = _DTYPES[args.dtype]
    mean_type = ModelMeanType[args.mean_type.upper()]
    var_type = ModelVarType[args.var_type.upper()]
    d = GaussianDiffusion(betas=get_named_beta_schedule("linear", 1000), model_mean_type=mean_type,
                          model_var_type=var_type, loss_type=LossType.MSE)
    d.use_fused = False  # the eager rows; the fused rows call the ops directly
    learned = var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)
    table = d.coef_table(device)
    cases = _parse_sizes(args.sizes) if args.sizes else (QUICK_CASES if args.quick else CASES)
    can_compile = not args.no_compile and not (args.quick and device.type == "cpu")
    ddim = args.rule == "ddim"
    op_name = "ddim_step" if ddim else "p_sample_step"
    records = []
    for shape in cases:
        B, C = shape[:2]
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(shape, device=device, generator=gen).to(dtype)
        mo_shape = (B, 2 * C if learned else C, *shape[2:])
        mo = torch.randn(mo_shape, device=device, generator=gen).clamp(-1, 1).to(dtype)
        t = torch.randint(0, d.num_timesteps, (B,), device=device, generator=gen)

        def model(*_args, **_kwargs):
            return mo

        def fused(noise_fn):
            if ddim:
                return lambda: ops.ddim_step(x, mo, t, table, mean_type, var_type, True,
                                             eta=args.eta, noise=noise_fn(),
                                             return_pred_xstart=False)
            return lambda: ops.p_sample_step(x, mo, t, table, mean_type, var_type, True,
                                             noise=noise_fn(), return_pred_xstart=False)

        def eager():
            if ddim:
                return d._ddim_sample(model, x, t, True, None, None, args.eta, None, None)
            return d._p_sample(model, x, t, True, None, None, None, None)

        impls = {}
        if ops.has_kernel(device):
            impls["fused (explicit noise)"] = (fused(lambda: torch.randn_like(x)), True)
            impls["fused (in-kernel noise)"] = (fused(lambda: None), False)
        impls["eager"] = (eager, True)
        if not ddim and mean_type == ModelMeanType.EPSILON:
            impls["eager (reference-style)"] = (
                lambda: _reference_style_step(d, mo, x, t, True, torch.randn_like(x)), True)
        if can_compile:
            compiled = torch.compile(lambda xx, mm, tt: (
                d._ddim_sample(lambda *a, **k: mm, xx, tt, True, None, None, args.eta, None, None)
                if ddim else d._p_sample(lambda *a, **k: mm, xx, tt, True, None, None, None, None)
            )["sample"])
            impls["eager (torch.compile)"] = (lambda: compiled(x, mo, t), False)

        n = x.numel()
        base_bytes = n * x.element_size() * 2 + mo.numel() * mo.element_size()
        noise_bytes = 2 * n * x.element_size()
        times = {}
        for impl, (fn, materialises_noise) in impls.items():
            with torch.no_grad():
                times[impl] = common.time_ms(fn, device, args.warmup, args.iters)
        ref_ms = times.get("eager (reference-style)", times["eager"])
        compile_ms = times.get("eager (torch.compile)")
        for impl, (_, materialises_noise) in impls.items():
            ms = times[impl]
            extra = {"speedup": round(ref_ms / ms, 2), "rule": args.rule,
                     "var_type": var_type.name.lower(), "model_output_dtype": str(mo.dtype)}
            if compile_ms and impl.startswith("fused"):
                extra["vs_compile"] = round(compile_ms / ms, 2)
            moved = base_bytes + (noise_bytes if materialises_noise else 0)
            records.append(common.record(op_name, impl, list(shape), dtype, device, ms,
                                         bytes_moved=moved, **extra))
    return records
