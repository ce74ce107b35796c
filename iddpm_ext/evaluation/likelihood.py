"""Likelihood helpers: the variational bound of a data set in bits/dim (the work behind
``iddpm nll``, the demo and the reproduction), and a mean with its standard error."""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import dist_util


def bits_per_dim(
    model,
    diffusion,
    source,
    num_samples,
    batch_size,
    *,
    clip_denoised=True,
    seed=0,
    device="cpu",
    class_cond=False,
    progress=False,
):
    """The variational bound in bits/dim of the first ``num_samples`` images of ``source``,
    split over the processes (contiguous blocks), gathered in order.

    :return: dict of numpy arrays: total_bpd [N], prior_bpd [N], vb / mse / xstart_mse [N, T].
    """
    from ..training.data import to_model_input

    n = min(num_samples, len(source))
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    mine = dist_util.rank_indices(n, rank, world)
    counts = dist_util.rank_counts(n, world)
    torch.manual_seed(seed * 1000 + rank)
    keys = ("total_bpd", "prior_bpd", "vb", "mse", "xstart_mse")
    parts = {k: [] for k in keys}
    starts = range(0, len(mine), batch_size)
    if progress and dist_util.is_main():
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="nll", dynamic_ncols=True)
    for s in starts:
        idx = mine[s : s + batch_size]
        x = to_model_input(source.get_batch(idx)).to(device)  # [B, C, H, W]
        kwargs = {}
        if class_cond:
            kwargs["y"] = torch.from_numpy(source.labels[np.asarray(idx)]).to(device)
        with torch.no_grad():
            out = diffusion.calc_bpd_loop(model, x, clip_denoised=clip_denoised, model_kwargs=kwargs)
        for k in keys:
            parts[k].append(out[k].float())
    T = diffusion.num_timesteps
    result = {}
    for k in keys:
        empty = torch.zeros((0,) if k.endswith("bpd") else (0, T), device=device)
        local = torch.cat(parts[k]) if parts[k] else empty
        result[k] = dist_util.all_gather_rows(local, counts).cpu().numpy()
    return result


def mean_stderr(values) -> tuple[float, float]:
    """(mean, standard error of the mean) of ``values``; the error is NaN for fewer than two."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))
