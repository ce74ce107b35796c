"""Likelihood helpers: the variational bound of a data set in bits/dim (the work behind
``iddpm nll``, the demo and the reproduction), an unbiased estimate of it from a few of its
terms, and a mean with its standard error.

The bound of an image x_0 in bits/dim is L = Σ_{t=0}^{T-1} L_t + L_prior (``calc_bpd_loop``): the
decoder term L_0, the KL terms L_t, and the prior term. :func:`bits_per_dim` computes every term
(T model evaluations per image). :func:`estimate_bits_per_dim` computes the first ``exact``
terms (where most of the bound lies: L_0 alone is about half of it for the digits model) and
one term drawn uniformly from each of ``strata`` geometric strata of the rest, weighted by the
stratum's width: an unbiased estimate of L per image, from exact + strata model evaluations.
Its sampling noise is part of the spread between images, so mean ± standard error over images
stays an honest interval for the mean bound.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import dist_util
from ..training.progress import progress_bar


class _Ticking:
    """The model, ticking a progress bar at each call (one call: one term of the bound, for a batch)."""

    def __init__(self, model, bar):
        self.model, self.bar = model, bar

    def __call__(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        self.bar.update(1)
        return out


def _per_image(fn, model, source, num_images, batch_size, keys, widths, *, device, class_cond, bar_spec):
    """``fn(model, x [B, C, H, W], model_kwargs, indices)`` -> {key: [B, ...]} over the first
    ``num_images`` images of ``source``, split over the processes (contiguous blocks) and
    gathered in order as numpy arrays; ``widths[key]``: the trailing shape of key's rows.
    ``bar_spec``: None, or (description, unit, model calls per batch) for a progress bar
    ticking at each model call."""
    from ..training.data import to_model_input

    n = min(num_images, len(source))
    mine = dist_util.rank_indices(n, dist_util.get_rank(), dist_util.get_world_size())
    counts = dist_util.rank_counts(n, dist_util.get_world_size())
    parts = {k: [] for k in keys}
    starts = range(0, len(mine), batch_size)
    desc, unit, calls = bar_spec or ("", "it", 0)
    bar = progress_bar(bar_spec is not None, len(starts) * calls, desc, unit)
    ticking = model if bar.disable else _Ticking(model, bar)
    for b, s in enumerate(starts):
        bar.set_postfix_str(f"batch {b + 1}/{len(starts)}", refresh=False)
        idx = mine[s : s + batch_size]
        x = to_model_input(source.get_batch(idx)).to(device)  # [B, C, H, W]
        kwargs = {}
        if class_cond:
            kwargs["y"] = torch.from_numpy(source.labels[np.asarray(idx)]).to(device)
        with torch.no_grad():
            out = fn(ticking, x, kwargs, idx)
        for k in keys:
            parts[k].append(out[k].float())
    bar.close()
    result = {}
    for k in keys:
        local = torch.cat(parts[k]) if parts[k] else torch.zeros((0, *widths[k]), device=device)
        result[k] = dist_util.all_gather_rows(local, counts).cpu().numpy()
    return result


def bits_per_dim(model, diffusion, source, num_samples, batch_size, *, clip_denoised=True, seed=0,
                 device="cpu", class_cond=False, progress=False):  # fmt: skip
    """The variational bound in bits/dim of the first ``num_samples`` images of ``source``,
    every term computed, split over the processes (contiguous blocks), gathered in order.

    :return: dict of numpy arrays: total_bpd [N], prior_bpd [N], vb / mse / xstart_mse [N, T].
    """
    torch.manual_seed(seed * 1000 + dist_util.get_rank())
    T = diffusion.num_timesteps
    keys = ("total_bpd", "prior_bpd", "vb", "mse", "xstart_mse")
    widths = {"total_bpd": (), "prior_bpd": (), "vb": (T,), "mse": (T,), "xstart_mse": (T,)}

    def bound(model, x, kwargs, idx):
        return diffusion.calc_bpd_loop(model, x, clip_denoised=clip_denoised, model_kwargs=kwargs)

    bar_spec = ("nll", "timestep", T) if progress else None
    return _per_image(bound, model, source, num_samples, batch_size, keys, widths, device=device,
                      class_cond=class_cond, bar_spec=bar_spec)  # fmt: skip


def strata_edges(num_timesteps: int, exact: int, strata: int) -> list:
    """The boundaries of ``strata`` geometric strata of the timesteps [exact, T) (fewer where
    they would be empty): [exact, e_1, ..., T]."""
    if exact >= num_timesteps:
        return [num_timesteps]
    edges = np.unique(np.round(np.geomspace(max(exact, 1), num_timesteps, strata + 1)).astype(np.int64))
    return [exact] + [int(e) for e in edges if exact < e < num_timesteps] + [num_timesteps]


def estimate_bits_per_dim(model, diffusion, source, num_images, batch_size, *, exact=10, strata=40,
                          clip_denoised=True, seed=0, device="cpu", class_cond=False,
                          progress=False):  # fmt: skip
    """An unbiased estimate of each image's variational bound in bits/dim (module docstring):
    the terms t < ``exact`` computed, one term from each of ``strata`` geometric strata of the
    rest; exact + strata model evaluations per image instead of T. Image i draws its timesteps
    from a generator of its own (seed, i), so its estimate does not depend on the batch.

    :return: dict of numpy arrays: total_bpd [N] (the estimates), prior_bpd [N], and
        exact_bpd [N] (the sum of the computed terms t < exact).
    """
    T = diffusion.num_timesteps
    exact = min(int(exact), T)
    edges = strata_edges(T, exact, int(strata))
    torch.manual_seed(seed * 1000 + dist_util.get_rank())

    def estimate(model, x, kwargs, idx):
        B = x.shape[0]
        head = torch.zeros(B, device=x.device)
        for t in range(exact):
            ts = torch.full((B,), t, device=x.device, dtype=torch.long)
            head += diffusion.bpd_terms(model, x, ts, clip_denoised=clip_denoised, model_kwargs=kwargs)
        rest = torch.zeros(B, device=x.device)
        u = np.stack([np.random.default_rng([seed, i]).random(len(edges) - 1) for i in idx])  # [B, K]
        for k, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
            ts = torch.from_numpy(a + np.floor(u[:, k] * (b - a)).astype(np.int64)).to(x.device)
            rest += (b - a) * diffusion.bpd_terms(
                model, x, ts, clip_denoised=clip_denoised, model_kwargs=kwargs
            )
        prior = diffusion.prior_bpd(x)
        return {"total_bpd": head + rest + prior, "prior_bpd": prior, "exact_bpd": head}

    keys = ("total_bpd", "prior_bpd", "exact_bpd")
    bar_spec = ("nll estimate", "term", exact + len(edges) - 1) if progress else None
    return _per_image(estimate, model, source, num_images, batch_size, keys, {k: () for k in keys},
                      device=device, class_cond=class_cond, bar_spec=bar_spec)  # fmt: skip


def mean_stderr(values) -> tuple[float, float]:
    """(mean, standard error of the mean) of ``values``; the error is NaN for fewer than two."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))
