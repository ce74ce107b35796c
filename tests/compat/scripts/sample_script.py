"""A sampling script that uses the library the way improved-diffusion's scripts/image_sample.py
uses its own (written here, not copied): setup_dist and logger.configure, weights through
dist_util.load_state_dict(map_location="cpu"), p_sample_loop / ddim_sample_loop in batches of
[batch_size, 3, H, W], uint8 NHWC images gathered from every process with
torch.distributed.all_gather (a group always exists, one process included), and rank 0 writing
samples_{N}x{H}x{W}x3.npz into the log folder with np.savez (arr_0 images, arr_1 labels with
class_cond), then a barrier."""

import argparse
import os

import numpy as np
import torch
import torch.distributed as dist

from iddpm_ext import dist_util, logger
from iddpm_ext.cli.flags import SAMPLE_DEFAULTS  # the reference script's flags and defaults
from iddpm_ext.script_util import (
    NUM_CLASSES,
    add_dict_to_argparser,
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    add_dict_to_argparser(parser, {**SAMPLE_DEFAULTS, **model_and_diffusion_defaults()})
    return parser.parse_args(argv)


def gather(t):
    """Every process's tensor of the same shape, in rank order."""
    parts = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return [p.cpu().numpy() for p in parts]


def main(argv=None):
    args = parse(argv)
    dist_util.setup_dist()
    logger.configure()

    model, diffusion = create_model_and_diffusion(**args_to_dict(args, model_and_diffusion_defaults()))
    model.load_state_dict(dist_util.load_state_dict(args.model_path, map_location="cpu"))
    model.to(dist_util.dev())
    model.eval()

    loop = diffusion.ddim_sample_loop if args.use_ddim else diffusion.p_sample_loop
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    images, labels = [], []
    while len(images) * args.batch_size < args.num_samples:  # every round adds world batches
        kwargs = {}
        if args.class_cond:
            kwargs["y"] = torch.randint(0, NUM_CLASSES, (args.batch_size,), device=dist_util.dev())
        x = loop(model, shape, clip_denoised=args.clip_denoised, model_kwargs=kwargs)  # [B, 3, H, W]
        x = ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        images += gather(x)
        if args.class_cond:
            labels += gather(kwargs["y"])
        logger.log(f"{len(images) * args.batch_size} samples")

    arr = np.concatenate(images)[: args.num_samples]  # [N, H, W, 3] uint8
    if dist.get_rank() == 0:
        path = os.path.join(logger.get_dir(), "samples_" + "x".join(str(n) for n in arr.shape) + ".npz")
        logger.log(f"writing {path}")
        if args.class_cond:
            np.savez(path, arr, np.concatenate(labels)[: args.num_samples])
        else:
            np.savez(path, arr)
    dist.barrier()
    logger.log("done")


if __name__ == "__main__":
    main()
