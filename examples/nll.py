"""Bits per dimension of images under a trained model: the full variational bound, every
term computed (improved-diffusion's scripts/image_nll.py, ``calc_bpd_loop``).

    python examples/nll.py --model_path runs/example --data_dir my_images/ --num_images 16

Prints the mean ± standard error over the images and the bound's parts (the prior term,
the decoder term at t = 0). ``--data_dir``: an image folder, an .npz, or ``digits``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sample import load_model  # noqa: E402  (the example beside this one)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_path", required=True)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--num_images", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--progress", type=int, default=1, help="1: a progress bar per timestep, 0: none")
    args = p.parse_args(argv)

    from iddpm_ext.image_datasets import load_data

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, diffusion, config = load_model(args.model_path, "", device)  # the bound needs every step
    c, h = config["image_channels"], config["image_size"]
    data = load_data(
        data_dir=args.data_dir, batch_size=args.batch_size, image_size=h, image_channels=c, deterministic=True
    )
    torch.manual_seed(0)
    total, prior, decoder, seen = [], [], [], 0
    while seen < args.num_images:
        x, _ = next(data)
        x = x[: args.num_images - seen].to(device)
        out = diffusion.calc_bpd_loop(model, x, progress=bool(args.progress))
        total.append(out["total_bpd"])
        prior.append(out["prior_bpd"])
        decoder.append(out["vb"][:, -1])  # column j holds timestep T-1-j: the last is t = 0
        seen += len(x)
    total = torch.cat(total).double()
    mean = total.mean().item()
    err = total.std().item() / math.sqrt(len(total)) if len(total) > 1 else math.nan  # standard error
    print(
        f"{mean:.4f} ± {err:.4f} bits/dim over {len(total)} images ({diffusion.num_timesteps}-step bound; "
        f"prior term {torch.cat(prior).mean():.2e}, decoder term {torch.cat(decoder).mean():.4f})"
    )
    return {"bits_per_dim": mean, "stderr": err, "images": len(total)}


if __name__ == "__main__":
    main()
