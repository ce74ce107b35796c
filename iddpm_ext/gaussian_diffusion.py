"""Alias of :mod:`iddpm_ext.diffusion` under the reference's module name, so that
``from improved_diffusion.gaussian_diffusion import X`` becomes
``from iddpm_ext.gaussian_diffusion import X``."""

from .diffusion import (  # noqa: F401
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    _extract_into_tensor,
)
from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl  # noqa: F401
from .schedules import betas_for_alpha_bar, get_named_beta_schedule  # noqa: F401
