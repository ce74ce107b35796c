"""A bits/dim script that uses the library the way improved-diffusion's scripts/image_nll.py uses
its own (written here, not copied): setup_dist, logger.configure, weights through
dist_util.load_state_dict, load_data(deterministic=True), then per batch
diffusion.calc_bpd_loop, its per-timestep vb / mse / xstart_mse means and its total_bpd
averaged over processes with torch.distributed.all_reduce, a "bpd=" log line per batch, and
rank 0 writing {vb,mse,xstart_mse}_terms.npz (arr_0: the per-timestep means) into the log
folder."""

import argparse
import os

import numpy as np
import torch.distributed as dist

from iddpm_ext import dist_util, logger
from iddpm_ext.cli.flags import NLL_DEFAULTS  # the reference script's flags and defaults
from iddpm_ext.image_datasets import load_data
from iddpm_ext.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)

TERMS = ("vb", "mse", "xstart_mse")


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    add_dict_to_argparser(parser, {**NLL_DEFAULTS, **model_and_diffusion_defaults()})
    return parser.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    dist_util.setup_dist()
    logger.configure()

    model, diffusion = create_model_and_diffusion(**args_to_dict(args, model_and_diffusion_defaults()))
    model.load_state_dict(dist_util.load_state_dict(args.model_path, map_location="cpu"))
    model.to(dist_util.dev())
    model.eval()
    data = load_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=args.image_size,
        class_cond=args.class_cond,
        deterministic=True,
    )
    evaluate(model, diffusion, data, args.num_samples, args.clip_denoised)


def evaluate(model, diffusion, data, num_samples, clip_denoised):
    world = dist.get_world_size()
    per_t = {k: [] for k in TERMS}  # per batch: [T] means over images and processes
    bpd = []
    done = 0
    while done < num_samples:
        x, kwargs = next(data)
        x = x.to(dist_util.dev())
        kwargs = {k: v.to(dist_util.dev()) for k, v in kwargs.items()}
        out = diffusion.calc_bpd_loop(model, x, clip_denoised=clip_denoised, model_kwargs=kwargs)
        for key in TERMS:
            mean = out[key].mean(dim=0) / world
            dist.all_reduce(mean)
            per_t[key].append(mean.cpu().numpy())
        total = out["total_bpd"].mean() / world
        dist.all_reduce(total)
        bpd.append(total.item())
        done += world * x.shape[0]
        logger.log(f"{done} images: bpd={np.mean(bpd)}")
    if dist.get_rank() == 0:
        for key in TERMS:
            path = os.path.join(logger.get_dir(), f"{key}_terms.npz")
            np.savez(path, np.mean(np.stack(per_t[key]), axis=0))
    dist.barrier()
    logger.log("done")


if __name__ == "__main__":
    main()
