"""Low-latency sampling on top of the diffusion's per-step API:

- :mod:`.sampling_engine` — :class:`SamplingEngine`, one whole denoising step (UNet + fused
  step with in-kernel noise) on static buffers, captured in a CUDA graph (or compiled, or
  run eagerly) and replayed per timestep (docs/sampling_engine.md);
- :mod:`.scheduler` — :class:`IDDPMScheduler`, diffusers' scheduler interface (a
  ``diffusers.SchedulerMixin`` when diffusers is installed) over the same steps; loaded on
  first use, so that importing the engine does not import diffusers.
"""

from .sampling_engine import SamplingEngine, default_mode, diffusion_signature  # noqa: F401

_LAZY = ("IDDPMScheduler", "IDDPMSchedulerOutput")


def __getattr__(name):
    if name in _LAZY:
        from . import scheduler

        value = getattr(scheduler, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
