"""Likelihood helpers for the variational bound (same names and math as the reference).

All results are in nats; callers divide by ln 2 for bits.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import ArgumentError


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions: [N, ...] -> [N]."""
    return tensor.mean(dim=list(range(1, len(tensor.shape))))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise with broadcasting.

    = ½(-1 + logvar2 - logvar1 + e^(logvar1-logvar2) + (mean1-mean2)² e^(-logvar2)).
    At least one argument must be a tensor; scalars are broadcast.
    """
    tensor = next((o for o in (mean1, logvar1, mean2, logvar2) if isinstance(o, torch.Tensor)), None)
    if tensor is None:
        raise ArgumentError("normal_kl: expected at least one argument to be a torch.Tensor, got none")
    logvar1, logvar2 = [
        x if isinstance(x, torch.Tensor) else torch.tensor(x).to(tensor) for x in (logvar1, logvar2)
    ]
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + ((mean1 - mean2) ** 2) * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Φ(x) ≈ ½(1 + tanh(√(2/π)(x + 0.044715 x³))), the approximation the reference uses."""
    return 0.5 * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales) -> torch.Tensor:
    """log P(x) for images quantized to 256 levels in [-1, 1] under N(means, e^(2·log_scales)).

    Each value owns the bin [x - 1/255, x + 1/255]; the edge bins extend to ∓∞ (x < -0.999,
    x > 0.999). Probabilities are clamped at 1e-12 before the log. Returns nats, x's shape.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ArgumentError(
            "discretized_gaussian_log_likelihood: expected x, means and log_scales of one shape, "
            f"got {tuple(x.shape)}, {tuple(means.shape)}, {tuple(log_scales.shape)}"
        )
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    plus_in = inv_stdv * (centered_x + 1.0 / 255.0)
    cdf_plus = approx_standard_normal_cdf(plus_in)
    min_in = inv_stdv * (centered_x - 1.0 / 255.0)
    cdf_min = approx_standard_normal_cdf(min_in)
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


LN2 = math.log(2.0)
