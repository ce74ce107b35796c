"""iddpm_ext — Improved DDPM (Nichol & Dhariwal, 2021) as a PyTorch extension.

The public API keeps openai/improved-diffusion's names. The diffusion core is pure
PyTorch and works without the compiled extension; the fused kernels live in
``iddpm_ext._C`` and are used when it is built (see :func:`build_info`).
"""

from ._ops import ExtensionUnavailableError, build_info
from ._ops import available as extension_available
from .diffusers_adapter import IDDPMScheduler, IDDPMSchedulerOutput
from .gaussian_diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType
from .engine import SamplingEngine
from .errors import UnknownNameError
from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .resample import (
    LossAwareSampler,
    LossSecondMomentResampler,
    ScheduleSampler,
    UniformSampler,
    create_named_schedule_sampler,
)
from .respace import SpacedDiffusion, space_timesteps
from .core.schedules import betas_for_alpha_bar, get_named_beta_schedule
from .script_util import (
    create_gaussian_diffusion,
    create_model,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from .unet import SuperResModel, UNetModel

__version__ = "0.1.0"

__all__ = [
    "ExtensionUnavailableError",
    "GaussianDiffusion",
    "IDDPMScheduler",
    "IDDPMSchedulerOutput",
    "LossAwareSampler",
    "LossSecondMomentResampler",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "SamplingEngine",
    "ScheduleSampler",
    "SpacedDiffusion",
    "SuperResModel",
    "UNetModel",
    "UniformSampler",
    "UnknownNameError",
    "betas_for_alpha_bar",
    "build_info",
    "create_gaussian_diffusion",
    "create_model",
    "create_model_and_diffusion",
    "create_named_schedule_sampler",
    "discretized_gaussian_log_likelihood",
    "extension_available",
    "get_named_beta_schedule",
    "mean_flat",
    "model_and_diffusion_defaults",
    "normal_kl",
    "space_timesteps",
]
