"""Sample from a trained model with the library's sampling loop (improved-diffusion's
``p_sample_loop`` / ``ddim_sample_loop``; the fused step kernel runs inside it where it applies).

    python examples/sample.py --model_path runs/example --num_samples 16 --timestep_respacing 50

Writes the samples as the reference's image_sample.py does (``arr_0``: uint8 [N, H, W, C]
in an .npz) and a PNG grid. ``--model_path``: a run folder (its latest EMA weights) or a
weights file with its config (.safetensors from this library's trainer).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch


def load_model(model_path: str, timestep_respacing: str = "", device="cpu"):
    """(model in eval mode, diffusion, config) from a run folder or weights file: the model
    and diffusion are rebuilt from the config stored with the weights."""
    from iddpm_ext.script_util import create_model_and_diffusion
    from iddpm_ext.training.checkpoint import load_into, load_weights, model_path_from

    path = model_path_from(model_path)  # a run folder: its latest EMA weights
    state, config, _ = load_weights(path)
    if not config:
        raise ValueError(f"{path}: no config stored with the weights; build the model with its flags instead")
    model, diffusion = create_model_and_diffusion(**{**config, "timestep_respacing": timestep_respacing})
    load_into(model, state, path)
    return model.to(device).eval(), diffusion, config


def main(argv=None) -> np.ndarray:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_path", required=True)
    p.add_argument("--num_samples", type=int, default=16)
    p.add_argument("--timestep_respacing", default="50", help="sampling steps, e.g. 50 or ddim25 ('': all T)")
    p.add_argument("--use_ddim", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out_dir", default="runs/example_samples")
    p.add_argument("--progress", type=int, default=1, help="1: a progress bar per step, 0: none")
    args = p.parse_args(argv)

    from iddpm_ext.cli.images import save_grid, to_uint8

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, diffusion, config = load_model(args.model_path, args.timestep_respacing, device)
    c, h = config["image_channels"], config["image_size"]
    loop = diffusion.ddim_sample_loop if args.use_ddim else diffusion.p_sample_loop
    generator = torch.Generator(device).manual_seed(args.seed)
    with torch.no_grad():
        x = loop(model, (args.num_samples, c, h, h), generator=generator, progress=bool(args.progress))
    images = to_uint8(x).cpu().numpy()  # [N, H, W, C]
    os.makedirs(args.out_dir, exist_ok=True)
    npz = os.path.join(args.out_dir, f"samples_{'x'.join(map(str, images.shape))}.npz")
    np.savez(npz, images)
    save_grid(os.path.join(args.out_dir, "samples.png"), images, overwrite=True)
    print(f"{len(images)} samples ({diffusion.num_timesteps} steps) -> {npz} and samples.png")
    return images


if __name__ == "__main__":
    main()
