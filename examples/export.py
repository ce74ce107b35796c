"""Deploy a trained model without its Python code: one denoising step (the UNet and the fused
sampling step) exported with torch.export, saved, loaded back and run as a whole sampling loop,
compared with the library's loop on the same noise; with --aoti also compiled by AOTInductor.

    python examples/export.py --model_path runs/example --out runs/example_step.pt2 [--aoti]

The exported program holds the iddpm ops (fused attention, GroupNorm, step) as ops of its graph,
so the process that loads it must `import iddpm_ext` (which loads their kernels); the batch size
is dynamic. Unconditional models (a class-conditional one would take y as a third input).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sample import load_model  # noqa: E402  (the example beside this one)


class DenoisingStep(torch.nn.Module):
    """x_t, t (this process's timesteps, [N]), noise -> x_{t-1}: one ancestral step."""

    def __init__(self, model, diffusion):
        super().__init__()
        self.model, self.diffusion = model, diffusion

    def forward(self, x, t, noise):
        out = self.model(x, self.diffusion.model_timesteps(t))
        return self.diffusion.step("ancestral", out, x, t, noise=noise, fused=True)["sample"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_path", required=True)
    p.add_argument("--out", default="runs/example_step.pt2", help="where the exported program goes")
    p.add_argument("--timestep_respacing", default="25")
    p.add_argument("--num_samples", type=int, default=4)
    p.add_argument("--aoti", action="store_true", help="also compile an AOTInductor package (slow)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    model, diffusion, config = load_model(args.model_path, args.timestep_respacing)
    if config.get("class_cond"):
        raise SystemExit("this example exports unconditional models only")
    step = DenoisingStep(model, diffusion).eval()
    shape = (args.num_samples, config["image_channels"], config["image_size"], config["image_size"])
    T = diffusion.num_timesteps
    g = torch.Generator().manual_seed(args.seed)
    x_T, noises = torch.randn(shape, generator=g), torch.randn((T, *shape), generator=g)

    batch = torch.export.Dim("batch", min=1, max=1024)
    example = (x_T, torch.full((shape[0],), T - 1), noises[0])
    with torch.no_grad():  # the fused step op has no gradient
        exported = torch.export.export(step, example, dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.export.save(exported, args.out)
    runners = {"exported": torch.export.load(args.out).module()}
    if args.aoti:
        package = torch._inductor.aoti_compile_and_package(exported, package_path=args.out + ".aoti.pt2")
        runners["aoti"] = torch._inductor.aoti_load_package(package)

    with torch.no_grad():
        # The library's loop on the same noise: x_T, then noises[t] at timestep t (T-1 down to 0).
        expected = diffusion.p_sample_loop(model, shape, noise=x_T, step_noise=noises, progress=False)
        result = {"out": args.out, "steps": T, "moved": (expected - x_T).abs().max().item()}
        for name, run in runners.items():
            x = x_T
            for t in range(T - 1, -1, -1):
                x = run(x, torch.full((shape[0],), t), noises[t])
            result[f"{name}_max_abs_diff"] = (x - expected).abs().max().item()
    print(", ".join(f"{k} {v:.2e}" for k, v in result.items() if k.endswith("diff")), f"({T} steps)")
    return result


if __name__ == "__main__":
    main()
