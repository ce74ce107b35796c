"""Train a small diffusion model on a folder of images, the way improved-diffusion's
scripts/image_train.py does, with this library's modules (only the import prefix differs).

    python examples/train_on_folder.py --data_dir my_images/ --out_dir runs/example
    python examples/train_on_folder.py          # writes a folder of synthetic images first

Images are found recursively (.png, .jpg, .jpeg), scaled and centre-cropped to --image_size.
The run folder gets the checkpoints (model and EMA weights with their config, safetensors),
progress.jsonl and loss.png; examples/sample.py, nll.py and sampling_engine.py read it, and
so do `iddpm sample --model_path RUN` and `iddpm nll`. The defaults take a few minutes on a
laptop CPU; a useful model needs far more steps (`iddpm train --preset ...`).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch


def make_images(folder: str, n: int, size: int, seed: int = 0):
    """``n`` synthetic RGB images of ``size``² pixels: a bright disc on a dark background."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cy, cx = rng.uniform(0.3 * size, 0.7 * size, 2)
        r = rng.uniform(0.15 * size, 0.3 * size)
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)[..., None]
        img = np.where(disc, rng.integers(150, 256, 3), rng.integers(0, 80, 3)).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(folder, f"disc_{i:04d}.png"))


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", default="", help="a folder of images (default: make synthetic ones)")
    p.add_argument("--out_dir", default="runs/example", help="the run folder (must not hold another run)")
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--num_channels", type=int, default=32, help="the UNet's base channels")
    p.add_argument("--channel_mult", default="", help="per level, e.g. 1,2 (default: by image size)")
    p.add_argument("--attention_resolutions", default="16,8")
    p.add_argument("--diffusion_steps", type=int, default=1000)
    p.add_argument("--steps", type=int, default=500, help="training steps (the learning rate anneals to 0)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--num_images", type=int, default=256, help="synthetic images to make without --data_dir")
    p.add_argument("--progress", type=int, default=1, help="1: a progress bar, 0: none")
    args = p.parse_args(argv)

    from iddpm_ext.image_datasets import load_data
    from iddpm_ext.resample import create_named_schedule_sampler
    from iddpm_ext.script_util import create_model_and_diffusion, model_and_diffusion_defaults
    from iddpm_ext.train_util import TrainLoop

    data_dir = args.data_dir
    if not data_dir:
        data_dir = args.out_dir.rstrip("/") + "_images"
        make_images(data_dir, args.num_images, args.image_size)
        print(f"wrote {args.num_images} synthetic images to {data_dir}")

    config = model_and_diffusion_defaults()  # the reference's flags; L_hybrid (learned σ), cosine schedule
    config.update(
        image_size=args.image_size,
        num_channels=args.num_channels,
        num_res_blocks=1,
        channel_mult=args.channel_mult,
        attention_resolutions=args.attention_resolutions,
        learn_sigma=True,
        noise_schedule="cosine",
        diffusion_steps=args.diffusion_steps,
        dropout=0.0,
    )
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**config)
    data = load_data(
        data_dir=data_dir, batch_size=args.batch_size, image_size=args.image_size, random_flip=True
    )
    TrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        batch_size=args.batch_size,
        microbatch=-1,
        lr=2e-4,
        ema_rate="0.999",
        log_interval=min(10, args.steps),
        save_interval=args.steps,
        resume_checkpoint="",
        schedule_sampler=create_named_schedule_sampler("uniform", diffusion),
        lr_anneal_steps=args.steps,
        config=config,  # stored in every checkpoint: sample.py and nll.py rebuild the model from it
        out_dir=args.out_dir,
        progress=bool(args.progress),
    ).run_loop()
    print(f"trained {args.steps} steps: checkpoints, progress.jsonl and loss.png in {args.out_dir}")
    return args.out_dir


if __name__ == "__main__":
    main()
