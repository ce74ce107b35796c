"""``iddpm bench sample``: whole sampling loops, images/s and ms per step, side by side.

Impls (ancestral sampling, respaced process, same x_T for every run):
  reference  a reference-style eager loop written here from the reference's semantics: per
             step a new ``torch.tensor([i] * B)`` and the timestep map rebuilt as a tensor
             (host-to-device copies), the model with einsum attention, every coefficient taken
             from a float64 numpy array with ``_extract_into_tensor`` (a copy each), noise from
             randn_like, separate elementwise ops: 8 host-to-device copies per step.
  reference-code  openai/improved-diffusion's own code, when IDDPM_REF_PATH names a checkout of it:
             its ``create_gaussian_diffusion`` (the same respaced process) and its
             ``p_sample_loop`` on its own UNetModel holding our model's weights (bf16: under
             autocast, the output read as float32). In the default grids wherever "reference"
             is; ``speedup_vs_ref_code`` = its ms per step / the row's.
  eager      our loop, ``GaussianDiffusion.p_sample_loop``: device tables, the fused step
             (one kernel), the attention op where it has a kernel.
  inference  the same loop on a copy of the model switched by ``to_inference()`` (what
             ``iddpm sample --inference [--amp bf16]`` runs; on the CPU: channels-last, packed
             and Winograd convolutions, batched time embeddings).
  graph      :class:`iddpm_ext.engine.SamplingEngine` mode "graph": the whole step (UNet + fused
             step) replayed from one CUDA graph per timestep (on the CPU from one op graph,
             iddpm_ext.engine.op_graph: the step's op calls without the Python around them).
  compile    SamplingEngine mode "compile": the step function under torch.compile
             (inductor; ``--compile-mode`` passes a torch.compile mode).
  compile-graph  SamplingEngine mode "compile-graph": the compiled step captured in one CUDA
             graph and replayed (CUDA only; with the compile rows, last).
  engine-eager  SamplingEngine mode "eager" (CPU: the engine's step without capture).
  inference-capture  the ``inference`` loop with the network replayed from op graphs
             (``iddpm sample --inference --capture True``; CPU only): the same samples.
  inference-graph  SamplingEngine mode "graph" on a copy of the model switched by
             ``to_inference()`` (the CPU's fastest sampler: ``iddpm sample --inference --engine
             graph``).
fp32 and bf16 (``torch.autocast``; x and the step stay fp32). Records: ``ms`` = ms per
step (median run / steps), ``ms_per_run``, ``images_per_s``, ``speedup`` over the reference
loop in the same dtype and ``speedup_vs_ref_fp32`` (with a checkout, ``speedup_vs_ref_code``);
on CUDA graph rows also ``model_ms``
(the UNet forward alone, replayed from its own CUDA graph) and ``overhead_us`` = ms per step
minus model_ms (what a step costs beyond the model's kernels), and the engine's memory
(static buffers + graph pool). With profiling (CUDA, B = 1, fp32): ``kernels_per_step`` and
``h2d_per_step`` (host-to-device copies) seen by torch.profiler.

Model: the CIFAR-10 configuration (52.5M parameters, 4000-step cosine process, learned σ,
timesteps rescaled) on CUDA; a small one (image 16, 32 channels, 1 res block) on CPU;
``--config imagenet64``: the paper's ImageNet-64 UNet (channel_mult 1,2,3,4, 4 heads,
scale-shift norm; 4000-step cosine process). ``tflops`` (and on a known card ``pct_peak`` of
its dense bf16 tensor peak) counts the UNet forward's FLOPs (torch's FLOP counter, B = 1,
einsum attention) × B per step: the model is what a step computes.

Case grids (``--full`` for the whole CUDA grid; ``--batches/--steps/--impls/--dtypes`` to pick):
  CUDA default (what scripts/gpu_check.sh runs, trimmed to about a minute on an H100):
    50 steps, B in {1, 16, 256}: reference, eager, graph in fp32 and bf16;
    250 steps, B = 1: reference and graph in bf16; compile: 50 steps, B = 1, bf16 (last).
  CUDA --quick: 10 steps, B in {1, 16}: reference, eager, graph in fp32 and bf16 (no compile).
  CUDA --full: B in {1, 16, 256} x {50, 250} steps x all four impls x {fp32, bf16}.
  CPU: B in {1, 4}, 10 steps, reference / eager / inference / inference-capture / engine-eager /
    inference-graph
    (compile with --compile: its
    inductor build takes about a minute per configuration on 2 cores); --quick: B = 1, 5 steps.
"""

from __future__ import annotations

import contextlib
import copy
import itertools

import torch

from .. import ops
from ..core.precision import AutocastModel
from ..engine import SamplingEngine, capture_forward
from ..ops.attention import attention_impl
from ..script_util import create_gaussian_diffusion
from . import common
from .step import _reference_style_step
from .unet import CONFIGS, build_model

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_ALL_IMPLS = (
    "reference",
    "reference-code",
    "eager",
    "inference",
    "graph",
    "compile",
    "compile-graph",
    "engine-eager",
    "inference-graph",
    "inference-capture",
)
# The process every impl samples (ours and, for reference-code, the reference's own factory).
_PROCESS = dict(learn_sigma=True, noise_schedule="cosine", rescale_timesteps=True)
_COMPILED = ("compile", "compile-graph")  # rows that compile: last, and off with --no-compile
_AUTO = -1


def add_arguments(parser):
    parser.add_argument(
        "--config",
        choices=["cifar10", "imagenet64", "small"],
        default=None,
        help="model (default: cifar10 on CUDA, small on CPU)",
    )
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes")
    parser.add_argument("--steps", default=None, help="comma-separated respaced step counts")
    parser.add_argument("--impls", default=None, help=f"comma-separated, from {_ALL_IMPLS}")
    parser.add_argument("--dtypes", default=None, help="comma-separated: float32,bfloat16")
    parser.add_argument("--full", action="store_true", help="the whole CUDA grid (slow)")
    parser.add_argument("--compile", action="store_true", help="add the compile rows on CPU")
    parser.add_argument("--no-compile", action="store_true", help="skip the compile rows")
    parser.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode for the compile rows (default: inductor default)",
    )
    parser.add_argument(
        "--no-profile", action="store_true", help="skip the torch.profiler launch/copy counts (CUDA)"
    )
    parser.set_defaults(warmup=_AUTO, iters=_AUTO)


def _csv(text, cast=str):
    return [cast(v) for v in text.split(",") if v.strip()]


def cases(args, device) -> list:
    """(steps, batch, dtype name, impl) in run order; compile rows last."""
    cuda = device.type == "cuda"
    if args.batches or args.steps or args.impls or args.dtypes or args.full or not cuda:
        if cuda:
            batches, steps = [1, 16, 256], [50, 250]
            impls = ["reference", "eager", "graph", "compile"]
        else:
            batches, steps = ([1], [5]) if args.quick else ([1, 4], [10])
            impls = [
                "reference",
                "eager",
                "inference",
                "inference-capture",
                "engine-eager",
                "inference-graph",
            ] + (["compile"] if args.compile else [])
        batches = _csv(args.batches, int) if args.batches else batches
        steps = _csv(args.steps, int) if args.steps else steps
        impls = _csv(args.impls) if args.impls else impls
        dtypes = _csv(args.dtypes) if args.dtypes else ["float32", "bfloat16"]
        grid = [(s, b, dt, i) for s, b, dt, i in itertools.product(steps, batches, dtypes, impls)]
    elif args.quick:  # CUDA smoke test: 10 steps (a 50-step grid took over a minute on an H100)
        grid = [
            (10, b, dt, i)
            for b in (1, 16)
            for dt in ("float32", "bfloat16")
            for i in ("reference", "eager", "graph")
        ]
    else:  # the trimmed CUDA default
        grid = [
            (50, b, dt, i)
            for b in (1, 16, 256)
            for dt in ("float32", "bfloat16")
            for i in ("reference", "eager", "graph")
        ]
        grid += [(250, 1, "bfloat16", i) for i in ("reference", "graph")]
        grid += [(50, 1, "bfloat16", "compile"), (50, 1, "bfloat16", "compile-graph")]
    for *_, impl in grid:
        if impl not in _ALL_IMPLS:
            raise SystemExit(f"--impls: unknown impl {impl!r} (expected some of {_ALL_IMPLS})")
    for _, _, dt, _ in grid:
        if dt not in _DTYPES:
            raise SystemExit(f"--dtypes: unknown dtype {dt!r} (expected some of {list(_DTYPES)})")
    has_checkout = common.reference_module("script_util") is not None
    if "reference-code" in {c[3] for c in grid} and not has_checkout:
        raise SystemExit(
            "--impls: reference-code runs openai/improved-diffusion's own code: set IDDPM_REF_PATH "
            "to a checkout of it (the folder holding improved_diffusion/)"
        )
    if has_checkout and not args.impls:  # the reference's own loop beside each reference row
        grid = [
            c
            for case in grid
            for c in ([case, (*case[:3], "reference-code")] if case[3] == "reference" else [case])
        ]
    if args.no_compile:
        grid = [c for c in grid if c[3] not in _COMPILED]
    if not cuda:  # (on the CPU "graph" is an op graph)
        grid = [c for c in grid if c[3] != "compile-graph"]
    return sorted(grid, key=lambda c: c[3] in _COMPILED)  # stable: compile rows last


def _autocast(device, dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


def reference_loop(d, model, x_T, device, dtype):
    """The reference implementation's ancestral loop, written from its semantics (see the
    module docstring); fp32 model or bf16 autocast, einsum attention."""
    B = x_T.shape[0]
    img = x_T
    with torch.no_grad(), attention_impl("einsum"):
        for i in reversed(range(d.num_timesteps)):
            t = torch.tensor([i] * B, device=device)
            map_tensor = torch.tensor(d.timestep_map, device=device, dtype=t.dtype)
            model_t = map_tensor[t]
            if d.rescale_timesteps:
                model_t = model_t.float() * (1000.0 / d.original_num_steps)
            with _autocast(device, dtype):
                out = model(img, model_t)
            noise = torch.randn_like(img)
            img = _reference_style_step(d, out.float(), img, t, True, noise)
    return img


class _ReferenceCode:
    """openai/improved-diffusion's own sampling code (IDDPM_REF_PATH): its UNetModel with the
    bench model's weights (built once) and its respaced diffusion per step count."""

    def __init__(self, model, config):
        from .unet import reference_model

        self.model = reference_model(model, config)
        self.script_util = common.reference_module("script_util")
        self.diffusions = {}

    def loop(self, d, x_T, device, dtype):
        S = d.num_timesteps
        if S not in self.diffusions:
            self.diffusions[S] = self.script_util.create_gaussian_diffusion(
                steps=d.original_num_steps, timestep_respacing=str(S), **_PROCESS
            )
        ref_d = self.diffusions[S]
        model = self.model if dtype == torch.float32 else AutocastModel(self.model, device.type, dtype)
        shape = tuple(x_T.shape)
        return lambda: ref_d.p_sample_loop(model, shape, noise=x_T, device=device, progress=False)


def _model_only_ms(model, x, model_t, device, dtype, iters) -> float:
    """ms of one UNet forward replayed from its own CUDA graph (no step, no timestep work)."""
    static_x, static_t = x.clone(), model_t.clone()

    def fwd():
        with torch.no_grad(), _autocast(device, dtype):
            model(static_x, static_t)

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fwd()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        fwd()
    reps = 20

    def replay():
        for _ in range(reps):
            graph.replay()

    return common.time_ms(replay, device, 2, iters, flush_l2=False) / reps


def _profile_counts(fn, steps) -> dict:
    """Kernels and host-to-device copies per step of one run of ``fn`` (torch.profiler)."""
    fn()
    kernels, h2d = common.cuda_events(fn)
    if kernels == 0:
        return {}
    return {"kernels_per_step": round(kernels / steps, 1), "h2d_per_step": round(h2d / steps, 1)}


def _runs(args, device, batch) -> tuple:
    warmup, iters = args.warmup, args.iters
    if device.type == "cpu":
        return (0 if warmup == _AUTO else warmup), (2 if iters == _AUTO else iters)
    # Each case runs once untimed first (capture / compile / cuDNN autotuning), so no
    # further warm-up by default; a run is already `steps` steps long.
    big = batch >= 64
    return (
        (0 if warmup == _AUTO else warmup),
        ((2 if big or args.quick else 3) if iters == _AUTO else iters),
    )


def run(args) -> list:
    device = torch.device(args.device)
    config = args.config or ("cifar10" if device.type == "cuda" else "small")
    unet_config = "tiny" if config == "small" else config
    torch.manual_seed(0)
    model, size = build_model(unet_config, device=device)
    with torch.no_grad():  # a fresh UNet's last conv is zero: give it small weights
        torch.nn.init.normal_(model.out[-1].weight, std=1e-3)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    channels = CONFIGS[unet_config]["in_channels"]
    steps_total = 1000 if config == "small" else 4000
    flops_per_image = _forward_flops(model, channels, size, device)
    grid = cases(args, device)
    profile_steps = min(c[0] for c in grid) if grid else 0  # launch counts: the shortest runs only
    diffusions = {}
    engines = dict.fromkeys(("graph", "compile", "compile-graph", "engine-eager", "inference-graph"))
    ref_ms, ref_code_ms, records, notes = {}, {}, [], []
    ref_code = None
    previous_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        for S, B, dt_name, impl in grid:
            dtype = _DTYPES[dt_name]
            d = diffusions.get(S)
            if d is None:
                d = diffusions[S] = create_gaussian_diffusion(
                    steps=steps_total, timestep_respacing=str(S), **_PROCESS
                )
            shape = (B, channels, size, size)
            x_T = torch.randn(shape, device=device, generator=torch.Generator(device).manual_seed(1))
            if impl == "reference-code":
                ref_code = ref_code or _ReferenceCode(model, unet_config)
                fn = ref_code.loop(d, x_T, device, dtype)
            else:
                fn = _impl_fn(impl, engines, model, d, x_T, device, dtype, args)
            if fn is None:
                continue
            warmup, iters = _runs(args, device, B)
            try:
                fn()  # builds / captures / compiles outside the timing
                run_ms = common.time_ms(fn, device, warmup, iters, flush_l2=False)
            except Exception as exc:  # noqa: BLE001 - one failing impl must not end the run
                notes.append(f"{impl} S={S} B={B} {dt_name}: {type(exc).__name__}: {exc}"[:300])
                rec = common.record(f"sample {config} {S} steps", impl, shape, dtype, device, float("nan"),
                                    error=notes[-1])  # fmt: skip
                records.append(common.emit(args, rec))
                continue
            ms = run_ms / S
            if impl == "reference":
                ref_ms[(S, B, dt_name)] = ms
            if impl == "reference-code":
                ref_code_ms[(S, B, dt_name)] = ms
            extra = {
                "steps": S,
                "ms_per_run": round(run_ms, 3),
                "images_per_s": round(B / (run_ms * 1e-3), 2),
                "params": n_params,
            }
            for key, name in (((S, B, dt_name), "speedup"), ((S, B, "float32"), "speedup_vs_ref_fp32")):
                if key in ref_ms:
                    extra[name] = round(ref_ms[key] / ms, 3)
            if (S, B, dt_name) in ref_code_ms:
                extra["speedup_vs_ref_code"] = round(ref_code_ms[(S, B, dt_name)] / ms, 3)
            if device.type == "cuda" and impl == "graph":
                extra.update(_graph_extras(engines["graph"], model, d, shape, x_T, device, dtype, ms, iters))
            if (
                device.type == "cuda"
                and B == 1
                and S == profile_steps
                and dt_name == "float32"
                and not args.no_profile
                and impl in ("reference", "eager", "graph")
            ):
                try:
                    extra.update(_profile_counts(fn, S))
                except Exception as exc:  # noqa: BLE001 - profiling is best effort
                    notes.append(f"profile {impl}: {type(exc).__name__}: {exc}"[:200])
            rec = common.record(
                f"sample {config} {S} steps",
                impl,
                list(shape),
                dtype,
                device,
                ms,
                flops=flops_per_image * B,
                gflop_per_step=round(flops_per_image * B / 1e9, 4),
                **extra,
            )
            records.append(
                common.emit(args, rec)
            )  # printed now; with --json, partial results survive a limit
    finally:
        torch.backends.cudnn.benchmark = previous_benchmark
    _print_summary(config, n_params, records, engines, notes)
    return records


def _impl_fn(impl, engines, model, d, x_T, device, dtype, args):
    shape = tuple(x_T.shape)
    amp = None if dtype == torch.float32 else dtype
    if impl == "reference":
        return lambda: reference_loop(d, model, x_T, device, dtype)
    if impl in ("eager", "inference", "inference-capture"):
        if not ops.has_kernel(device):
            return None
        m = copy.deepcopy(model).to_inference() if impl != "eager" else model
        if impl == "inference-capture":
            if device.type != "cpu":
                return None
            m = capture_forward(m)
        # as `iddpm sample --amp`: the network under autocast, its output read in float32 by the
        # fused steps (a bf16 output as such would take the reference's bf16 variance arithmetic,
        # eagerly: docs/step.md)
        m = m if amp is None else AutocastModel(m, device.type, dtype)

        def eager():
            with attention_impl("auto"):
                return d.p_sample_loop(m, shape, noise=x_T)

        return eager
    mode = {
        "graph": "graph",
        "compile": "compile",
        "compile-graph": "compile-graph",
        "engine-eager": "eager",
        "inference-graph": "graph",
    }[impl]
    if engines[impl] is None:
        options = {"mode": args.compile_mode} if args.compile_mode else None
        m = copy.deepcopy(model).to_inference() if impl == "inference-graph" else model
        engines[impl] = SamplingEngine(m, d, mode=mode, compile_options=options, device=device)
    engine = engines[impl]

    def sample():
        with attention_impl("auto"):
            return engine.sample(shape, diffusion=d, noise=x_T, amp=amp)

    return sample


def _graph_extras(engine, model, d, shape, x_T, device, dtype, ms, iters) -> dict:
    extra = {}
    try:
        t = torch.full((shape[0],), d.num_timesteps // 2, device=device, dtype=torch.long)
        model_t = d.model_timesteps(t)
        with attention_impl("auto"):
            model_ms = _model_only_ms(model, x_T, model_t, device, dtype, iters)
        extra["model_ms"] = round(model_ms, 4)
        extra["overhead_us"] = round((ms - model_ms) * 1e3, 2)
    except Exception as exc:  # noqa: BLE001
        extra["model_ms_error"] = f"{type(exc).__name__}: {exc}"[:200]
    amp = None if dtype == torch.float32 else dtype
    key = engine.config_key(d, shape, amp=amp)
    for rec, k in zip(engine.memory_report()["entries"], engine.cache_keys()):
        if k == key:
            extra["static_mib"] = round(rec["static_bytes"] / 2**20, 3)
            extra["graph_pool_mib"] = round(rec.get("graph_pool_reserved_bytes", 0) / 2**20, 2)
    return extra


def _forward_flops(model, channels, size, device) -> int:
    """FLOPs of one image's UNet forward (what one sampling step computes, the step op aside)."""
    from .unet import count_flops

    x = torch.zeros(1, channels, size, size, device=device)
    return count_flops(model, x, torch.zeros(1, device=device), backward=False)


def _print_summary(config, n_params, records, engines, notes):
    print(f"\nsample {config}: {n_params:,} parameters; ms = ms per step")
    for r in records:
        if "error" in r:
            continue
        line = (
            f"  {r['steps']:>4} steps B={r['shape'][0]:<4} {r['dtype']:<9} {r['impl']:<12}"
            f" {r['ms']:9.4f} ms/step {r['images_per_s']:10.1f} img/s {r['tflops']:8.3f} TF/s"
            + (f" ({r['pct_peak']:.1f}% of peak)" if "pct_peak" in r else "")
        )
        if "speedup" in r:
            line += f"  x{r['speedup']:.2f} vs reference"
        if "speedup_vs_ref_fp32" in r and r["dtype"] != "float32":
            line += f" (x{r['speedup_vs_ref_fp32']:.2f} vs reference fp32)"
        if "speedup_vs_ref_code" in r and r["impl"] != "reference-code":
            line += f"  x{r['speedup_vs_ref_code']:.2f} vs reference-code"
        if "overhead_us" in r:
            line += f"  model {r['model_ms']:.4f} ms, overhead {r['overhead_us']:.1f} us/step"
        if "kernels_per_step" in r:
            line += f"  [{r['kernels_per_step']} kernels, {r['h2d_per_step']} H2D copies per step]"
        print(line)
    for mode, engine in engines.items():
        if engine is not None:
            report = engine.memory_report()
            print(
                f"  engine {mode}: {len(report['entries'])} configurations, "
                f"{report['total_bytes'] / 2**20:.1f} MiB (static buffers + graph pools)"
            )
    for note in notes:
        print("  note: " + note)
