"""Run by tests/training/test_distributed.py under torchrun (2 CPU processes, gloo): trains a few
steps with DDP and distributed sampling, and checks what must agree across ranks."""

import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

from helpers.models import randomize_  # noqa: E402
from helpers.training import blob_images, tiny_config  # noqa: E402
from iddpm_ext import dist_util  # noqa: E402
from iddpm_ext.cli import generate as S  # noqa: E402
from iddpm_ext.resample import create_named_schedule_sampler  # noqa: E402
from iddpm_ext.script_util import create_model_and_diffusion  # noqa: E402
from iddpm_ext.training.data import ArraySource, BatchStream  # noqa: E402
from iddpm_ext.training.loop import TrainLoop  # noqa: E402


def gather_flat(tensors):
    flat = torch.cat([t.detach().flatten().float() for t in tensors])
    parts = [torch.empty_like(flat) for _ in range(dist_util.get_world_size())]
    torch.distributed.all_gather(parts, flat)
    return parts


def main(out_dir):
    dist_util.setup_dist("cpu")
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    result = {"world": world}

    # --- training: every rank starts from its own seed; rank 0's weights are broadcast
    cfg = tiny_config(dropout=0.1, diffusion_steps=4)
    torch.manual_seed(100 + rank)
    model, diffusion = create_model_and_diffusion(**cfg)
    images, labels = blob_images(64, 8, 1)
    data = BatchStream(ArraySource(images, labels), 4, rank=rank, world=world, seed=0)
    loop = TrainLoop(model=model, diffusion=diffusion, data=data, batch_size=4, microbatch=2, lr=1e-3,
                     ema_rate="0.9", log_interval=2, save_interval=3, resume_checkpoint="",
                     schedule_sampler=create_named_schedule_sampler("loss-second-moment", diffusion),
                     config=cfg, out_dir=os.path.join(out_dir, "run"), max_steps=6,
                     progress=False)  # fmt: skip
    start = [p.detach().clone() for p in loop.params]
    loop.run_loop()
    params = gather_flat(loop.params)
    ema = gather_flat(loop.ema_params[0])
    hist = gather_flat([torch.from_numpy(loop.schedule_sampler._loss_history)])
    moved = sum(float((p - s).abs().sum()) for p, s in zip(loop.params, start))
    # each rank saw different data: its gradient alone would differ across ranks
    result.update(
        params_max_diff=float((params[0] - params[1]).abs().max()),
        ema_max_diff=float((ema[0] - ema[1]).abs().max()),
        history_max_diff=float((hist[0] - hist[1]).abs().max()),
        history_filled=int((loop.schedule_sampler._loss_counts > 0).sum()),
        params_moved=moved,
        step=loop.step,
    )

    # --- sampling: 7 samples over 2 ranks (4 + 3), batch 2
    torch.manual_seed(0)
    smodel, sdiff = create_model_and_diffusion(**tiny_config(timestep_respacing="5"))
    randomize_(smodel)
    smodel.eval()
    res = S.generate(smodel, sdiff, 7, (1, 8, 8), batch_size=2, seed=11)
    if rank == 0:
        np.savez(os.path.join(out_dir, "dist_samples.npz"), res["images"])
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(result, f)
    dist_util.barrier()
    dist_util.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
