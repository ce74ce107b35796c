"""The low-latency sampling engine: one whole denoising step (the UNet and the fused step with
in-kernel noise) on static buffers, captured in a CUDA graph on a GPU and replayed for every
timestep (on the CPU: "eager" by default, or "graph", an op graph: the step's operator calls
replayed without the Python around them), compared here with the library's loop.

    python examples/sampling_engine.py --model_path runs/example --num_samples 16

With the same generator the engine gives the loop's samples (docs/sampling_engine.md); the
first run of a configuration builds (and on a GPU captures) it, later runs replay it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sample import load_model  # noqa: E402  (the example beside this one)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_path", required=True)
    p.add_argument("--num_samples", type=int, default=16)
    p.add_argument("--timestep_respacing", default="50")
    p.add_argument(
        "--mode",
        default="",
        help="graph (CPU: op graph), compile or eager (default: graph on CUDA, else eager)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from iddpm_ext import SamplingEngine

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, diffusion, config = load_model(args.model_path, args.timestep_respacing, device)
    engine = SamplingEngine(model, diffusion, mode=args.mode or None, device=device)
    shape = (args.num_samples, config["image_channels"], config["image_size"], config["image_size"])

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(torch.Generator(device).manual_seed(args.seed))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    engine.p_sample_loop(shape, generator=torch.Generator(device).manual_seed(args.seed))  # build / capture
    ours, t_engine = timed(lambda g: engine.p_sample_loop(shape, generator=g))
    with torch.no_grad():
        ref, t_loop = timed(lambda g: diffusion.p_sample_loop(model, shape, generator=g))
    diff = (ours - ref).abs().max().item()
    print(
        f"{args.num_samples} samples, {diffusion.num_timesteps} steps on {device}: engine ({engine.mode}) "
        f"{t_engine:.3f} s, library loop {t_loop:.3f} s; max |difference| {diff:.2e}"
    )
    return {"engine_seconds": t_engine, "loop_seconds": t_loop, "max_abs_diff": diff, "mode": engine.mode}


if __name__ == "__main__":
    main()
