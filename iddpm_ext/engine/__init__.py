"""Low-latency sampling on top of the diffusion's per-step API:

- :mod:`.sampling_engine` — :class:`SamplingEngine`, one whole denoising step (UNet + fused
  step with in-kernel noise) on static buffers, captured in a CUDA graph (or compiled, or
  run eagerly) and replayed per timestep (docs/sampling_engine.md);
- :mod:`.scheduler` — :class:`IDDPMScheduler`, diffusers-style loops (``set_timesteps``,
  ``timesteps``, ``step(...).prev_sample``) over the same steps.
"""

from .sampling_engine import SamplingEngine, default_mode, diffusion_signature  # noqa: F401
from .scheduler import IDDPMScheduler, IDDPMSchedulerOutput  # noqa: F401
