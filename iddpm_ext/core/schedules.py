"""Noise schedules: the β_t of the forward process q(x_t | x_{t-1}) = N(√(1-β_t) x_{t-1}, β_t I).

Same names, arguments and float64 values as openai/improved-diffusion.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ..errors import UnknownNameError

SCHEDULE_NAMES = ("linear", "cosine")


def _check_num_steps(num_diffusion_timesteps) -> int:
    if isinstance(num_diffusion_timesteps, bool) or not isinstance(
        num_diffusion_timesteps, (int, np.integer)
    ):
        raise ValueError(
            "num_diffusion_timesteps: expected a positive int, got "
            f"{num_diffusion_timesteps!r} ({type(num_diffusion_timesteps).__name__})"
        )
    if num_diffusion_timesteps < 1:
        raise ValueError(f"num_diffusion_timesteps: expected a positive int, got {num_diffusion_timesteps}")
    return int(num_diffusion_timesteps)


def cosine_alpha_bar(t: float) -> float:
    """ᾱ(t) of the cosine schedule (Improved DDPM eq. 17), s = 0.008, t in [0, 1]."""
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """β_1..β_T (float64, shape [T]) of a named schedule.

    - ``"linear"``: Ho et al.'s 1e-4 → 0.02 for T = 1000, both ends scaled by 1000/T so
      the schedule keeps its shape for any T.
    - ``"cosine"``: ᾱ_t = cos²(((t/T + s)/(1 + s))·π/2), s = 0.008, β clipped at 0.999.
    """
    T = _check_num_steps(num_diffusion_timesteps)
    if schedule_name == "linear":
        scale = 1000 / T
        beta_start = scale * 0.0001
        beta_end = scale * 0.02
        return np.linspace(beta_start, beta_end, T, dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(T, cosine_alpha_bar)
    raise UnknownNameError(f"schedule_name: expected one of {list(SCHEDULE_NAMES)}, got {schedule_name!r}")


def betas_for_alpha_bar(
    num_diffusion_timesteps: int,
    alpha_bar: Callable[[float], float],
    max_beta: float = 0.999,
) -> np.ndarray:
    """Discretize a continuous ᾱ(t), t in [0, 1], into T betas:
    β_i = min(1 - ᾱ((i+1)/T) / ᾱ(i/T), max_beta). Returns float64 [T]."""
    T = _check_num_steps(num_diffusion_timesteps)
    betas = []
    for i in range(T):
        t1 = i / T
        t2 = (i + 1) / T
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)
