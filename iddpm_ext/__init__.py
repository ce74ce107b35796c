"""iddpm_ext — Improved DDPM (Nichol & Dhariwal, 2021) as a PyTorch extension.

The public API keeps openai/improved-diffusion's names. The diffusion core is pure
PyTorch and works without the compiled extension; the fused kernels live in
``iddpm_ext._C`` and are used when it is built (see :func:`build_info`).
"""

from .core.lazy import lazy_attributes
from .core.schedules import betas_for_alpha_bar, get_named_beta_schedule
from .errors import ExtensionUnavailableError, UnknownNameError
from .gaussian_diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType
from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .ops import attention_impl, build_info, get_attention_impl, set_attention_impl
from .ops import available as extension_available
from .resample import (
    LossAwareSampler,
    LossSecondMomentResampler,
    ScheduleSampler,
    UniformSampler,
    create_named_schedule_sampler,
)
from .respace import SpacedDiffusion, space_timesteps
from .script_util import (
    create_gaussian_diffusion,
    create_model,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from .unet import SuperResModel, UNetModel
from .version import __version__

# Imported on first use (PEP 562): the low-latency sampling layer is not needed to import the
# library, and leaving it out keeps `import iddpm_ext` short.
_LAZY = {"SamplingEngine": ".engine", "IDDPMScheduler": ".engine", "IDDPMSchedulerOutput": ".engine"}
__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)


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
    "__version__",
    "attention_impl",
    "betas_for_alpha_bar",
    "build_info",
    "create_gaussian_diffusion",
    "create_model",
    "create_model_and_diffusion",
    "create_named_schedule_sampler",
    "discretized_gaussian_log_likelihood",
    "extension_available",
    "get_attention_impl",
    "get_named_beta_schedule",
    "mean_flat",
    "model_and_diffusion_defaults",
    "normal_kl",
    "set_attention_impl",
    "space_timesteps",
]
