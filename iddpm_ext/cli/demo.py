"""``iddpm demo`` (``make demo``): handwritten digits in under a minute on a 2-core CPU.

Uses the small checkpoint shipped in ``iddpm_ext/assets`` (the EMA weights of a run of
``iddpm train --preset digits``; its command and log are in docs/training.md and
``assets/digits_train_log.jsonl``), or trains one first with ``--train_steps N``. Then:

1. samples a grid of digits with 100 respaced steps (the fused sampling step; on a GPU the
   CUDA-graph engine, timed against a reference-style loop); on the CPU the first 8 samples
   are made again with the eager step and compared, and the step alone is timed both ways;
2. draws the training loss curves from the run's JSONL log;
3. estimates the full 1000-step variational bound in bits/dim of held-out digits (the first
   120 of the fixed 297-image test split): per digit, without bias, from 50 of its 1000
   terms (iddpm_ext.evaluation.likelihood.estimate_bits_per_dim): mean ± standard error.
   ``iddpm nll`` computes every term.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from .. import dist_util

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
CHECKPOINT = os.path.join(ASSETS, "digits_ema.safetensors")
TRAIN_LOG = os.path.join(ASSETS, "digits_train_log.jsonl")
NLL_IMAGES = 120  # held-out digits for bits/dim
NLL_EXACT, NLL_STRATA = 10, 40  # the bound's terms t < 10 computed, one from each of 40 strata of the rest
CHECK_SAMPLES = 8  # samples made again with the eager step (CPU) to compare


def _train(out_dir, steps, seed, device, log, progress=True):
    from ..script_util import model_and_diffusion_defaults
    from ..training.data import BatchStream, open_source
    from .commands import annealed_run
    from .presets import preset_defaults

    p = preset_defaults("digits", "train")
    config = model_and_diffusion_defaults()
    config.update({k: v for k, v in p.items() if k in config})
    run_dir = os.path.join(out_dir, "train")
    if os.path.exists(os.path.join(run_dir, "latest.json")):
        import shutil

        shutil.rmtree(run_dir)  # the demo's own scratch run
    source = open_source("digits", image_size=config["image_size"], image_channels=config["image_channels"])
    data = BatchStream(source, p["batch_size"], seed=seed)
    log(f"[demo] training the digits model for {steps} steps (batch {p['batch_size']}) in {run_dir}")
    loop = annealed_run(config, data, steps, run_dir, device, seed=seed, batch_size=p["batch_size"],
                        lr=p["lr"], ema_rate=p["ema_rate"], progress=progress, log=log,
                        log_interval=min(p["log_interval"], max(1, steps // 10)))  # fmt: skip
    loop.run_loop()
    latest = json.load(open(os.path.join(run_dir, "latest.json")))
    return os.path.join(run_dir, next(iter(latest["ema"].values()))), os.path.join(run_dir, "progress.jsonl")


def _time_step_alone(model, diffusion, n, shape, device, repeats=50) -> dict:
    """Median ms of one p_sample update (the model's output precomputed), fused and eager."""
    x = torch.randn(n, *shape, device=device)
    t = torch.full((n,), diffusion.num_timesteps // 2, device=device, dtype=torch.long)
    with torch.no_grad():
        out = model(x, t)  # any realistic model output: only the update is timed

    def const(*_a, **_k):
        return out

    from ..bench.common import time_ms

    times = {}
    for fused in (True, False):
        diffusion.use_fused = fused
        times["step_ms_fused" if fused else "step_ms_eager"] = time_ms(
            lambda: diffusion.p_sample(const, x, t),
            device,
            warmup=repeats // 5,
            iters=repeats,
            flush_l2=False,
        )
    diffusion.use_fused = True
    return times


def _reference_speed(model, diffusion, shape, n, device) -> dict:
    """Seconds for n samples with the library's default sampler (CUDA: the graph engine) and
    with a reference-style loop (bench.sample.reference_loop), the same x_T, after a warm-up."""
    from ..bench.sample import reference_loop
    from . import generate as S

    x_T = torch.randn(n, *shape, device=device)
    sampler = S.Sampler("auto", model, diffusion, device)

    def ours():
        if sampler.engine is None:
            return diffusion.p_sample_loop(model, (n, *shape), noise=x_T)
        return sampler.engine.sample((n, *shape), noise=x_T)

    def reference():
        return reference_loop(diffusion, model, x_T, device, torch.float32)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = {}
    for name, fn in (("engine", ours), ("reference_loop", reference)):
        fn()  # warm-up (graph capture, cuDNN autotuning)
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times[f"{name}_seconds"] = round(time.perf_counter() - t0, 4)
    times["engine"] = sampler.name
    return times


def run(out_dir="out/demo", train_steps=0, seed=0, nll_images=None, num_samples=64, sample_steps=100,
        device=None, log=print, progress=False) -> dict:  # fmt: skip
    """The demo (module docstring); ``progress``: bars with the time left on stderr for the
    training, the sampling (per step) and the bits/dim estimate (per model call)."""
    from ..evaluation.likelihood import estimate_bits_per_dim, mean_stderr, strata_edges
    from ..training import checkpoint as ckpt
    from ..training.data import open_source
    from ..training.log import plot_curves, read_jsonl
    from ..training.progress import bar_safe
    from . import generate as S
    from . import images
    from .commands import build

    log = bar_safe(log)
    t_all = time.perf_counter()
    device = dist_util.resolve_device(device)
    os.makedirs(out_dir, exist_ok=True)
    if train_steps:
        weights, train_log = _train(out_dir, train_steps, seed, device, log, progress)
    else:
        weights, train_log = CHECKPOINT, TRAIN_LOG
        if not os.path.isfile(weights):
            raise FileNotFoundError(
                f"{weights}: the shipped digits checkpoint is missing; "
                "run `iddpm demo --train_steps 3000` to train one"
            )
    state, config, meta = ckpt.load_weights(weights)
    if config is None:
        raise ValueError(f"{weights}: expected a checkpoint with its config")
    results = {"checkpoint": weights, "checkpoint_step": int(meta.get("step", 0)), "device": str(device)}
    log(
        f"[demo] digits model: {weights} (step {results['checkpoint_step']}, "
        f"{sum(v.numel() for v in state.values()):,} parameters, "
        f"{config['image_size']}x{config['image_size']} grayscale, "
        f"T={config['diffusion_steps']} {config['noise_schedule']}, learned σ)"
    )

    # 1. samples
    model, diffusion = build({**config, "timestep_respacing": str(sample_steps)}, device)
    ckpt.load_into(model, state, weights)
    model.eval()
    shape = (config["image_channels"], config["image_size"], config["image_size"])
    fused = bool(getattr(diffusion, "use_fused", False))
    with torch.no_grad():  # warm-up (allocator, kernels' first calls), so the timings compare
        model(torch.zeros(num_samples, *shape, device=device), torch.zeros(num_samples, device=device).long())
    res = S.generate(model, diffusion, num_samples, shape, batch_size=num_samples, seed=seed, device=device,
                     trajectory_steps=10, trajectory_samples=8, engine="auto", progress=progress)  # fmt: skip
    results.update(sample_seconds=round(res["seconds"], 3), sample_fused=fused, sample_engine=res["engine"])
    timing = f"{res['seconds']:.2f} s ({res['engine']}, {'fused' if fused else 'eager'} step)"
    if fused and device.type == "cpu":  # the first samples again through the eager step: the same pixels
        k = min(CHECK_SAMPLES, num_samples)
        diffusion.use_fused = False
        eager = S.generate(
            model, diffusion, k, shape, batch_size=k, seed=seed, device=device, progress=progress
        )
        diffusion.use_fused = True
        diff = int(np.abs(eager["images"].astype(int) - res["images"][:k]).max())
        results.update(max_pixel_diff_fused_vs_eager=diff, compared_samples=k)
        step = _time_step_alone(model, diffusion, num_samples, shape, device)
        results.update(step)
        timing += (
            f"; the first {k} again with the eager step: max pixel difference {diff}; the step alone: fused "
            f"{step['step_ms_fused']:.3f} ms vs eager {step['step_ms_eager']:.3f} ms "
            f"({step['step_ms_eager'] / step['step_ms_fused']:.1f}×; the UNet's time dominates whole runs)"
        )
    elif device.type == "cuda":
        speed = _reference_speed(model, diffusion, shape, num_samples, device)
        results.update(speed)
        timing += (
            f"; {num_samples} samples: {speed['engine']} engine {speed['engine_seconds']:.3f} s vs a "
            f"reference-style loop {speed['reference_loop_seconds']:.3f} s "
            f"({speed['reference_loop_seconds'] / speed['engine_seconds']:.1f}×)"
        )
    grid = os.path.join(out_dir, "samples.png")
    images.save_grid(grid, res["images"], ncol=8, overwrite=True)
    npz = os.path.join(out_dir, images.samples_filename(res["images"]))
    images.save_npz(npz, res["images"], overwrite=True)
    images.save_trajectory(
        os.path.join(out_dir, "trajectory.png"), res["trajectory"], overwrite=True, diffusion=diffusion
    )
    log(f"[demo] {num_samples} samples, {sample_steps} respaced steps: {timing} -> {grid}")

    # 2. loss curves of the training run
    records = read_jsonl(train_log)
    plot = os.path.join(out_dir, "loss.png")
    steps = records[-1]["step"] if records else 0
    plot_curves(
        records,
        plot,
        title=f"Digits training run ({os.path.basename(train_log)}), {steps} steps",
        num_timesteps=config["diffusion_steps"],
    )
    if records:
        last = records[-1]
        results["final_train_loss"] = last["loss"]
        log(
            f"[demo] training log: {len(records)} records to step {last['step']}, "
            f"final loss {last['loss']:.4f} (mse {last.get('mse', float('nan')):.4f}, "
            f"vb {last.get('vb', float('nan')):.4f}) -> {plot}"
        )

    # 3. held-out bits/dim: the full bound, each digit's estimated from 50 of its terms
    n = nll_images or NLL_IMAGES
    full_model, full_diffusion = build({**config, "timestep_respacing": ""}, device)
    ckpt.load_into(full_model, state, weights)
    full_model.eval()
    test = open_source("digits", image_size=config["image_size"], image_channels=config["image_channels"],
                       split="test")  # fmt: skip
    t0 = time.perf_counter()
    bpd = estimate_bits_per_dim(full_model, full_diffusion, test, n, n, exact=NLL_EXACT, strata=NLL_STRATA,
                                seed=seed, device=device, progress=progress)  # fmt: skip
    mean, err = mean_stderr(bpd["total_bpd"])
    T = full_diffusion.num_timesteps
    terms = min(NLL_EXACT, T) + len(strata_edges(T, NLL_EXACT, NLL_STRATA)) - 1
    results.update(bits_per_dim=mean, bits_per_dim_stderr=err, nll_images=int(len(bpd["total_bpd"])),
                   nll_seconds=round(time.perf_counter() - t0, 2), nll_terms_per_image=terms,
                   nll_estimator=f"unbiased: terms t < {NLL_EXACT} computed, one from each of "
                                 f"{NLL_STRATA} geometric strata of the rest")  # fmt: skip
    log(
        f"[demo] held-out digits: {mean:.3f} ± {err:.3f} bits/dim (mean ± standard error over the first "
        f"{results['nll_images']} of the {len(test)} test digits; each digit's full {T}-step bound estimated "
        f"without bias from {terms} of its terms: t < {NLL_EXACT} exactly, one from each of {NLL_STRATA} "
        f"strata of the rest; {results['nll_seconds']:.1f} s)"
    )

    results["total_seconds"] = round(time.perf_counter() - t_all, 2)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    log(
        f"[demo] done in {results['total_seconds']:.1f} s; results.json, samples.png, trajectory.png, "
        f"loss.png in {out_dir}"
    )
    return results
