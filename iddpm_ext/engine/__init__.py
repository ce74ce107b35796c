"""Low-latency sampling on top of the diffusion's per-step API:

- :mod:`.sampling_engine` — :class:`SamplingEngine`, one whole denoising step (UNet + fused
  step with in-kernel noise) on static buffers, captured in a CUDA graph (or compiled, or
  run eagerly) and replayed per timestep (docs/sampling_engine.md);
- :mod:`.op_graph` — op graphs, the CPU's graph capture: :func:`capture_forward` (a model's
  forward replayed without the Python around its kernels) and the engine's CPU "graph" mode;
- :mod:`.scheduler` — :class:`IDDPMScheduler`, diffusers' scheduler interface (a
  ``diffusers.SchedulerMixin`` when diffusers is installed) over the same steps; loaded on
  first use, so that importing the engine does not import diffusers.
"""

from ..core.lazy import lazy_attributes
from .op_graph import CapturedForward, OpGraph, capture_forward  # noqa: F401
from .sampling_engine import SamplingEngine, default_mode, diffusion_signature  # noqa: F401

_LAZY = {"IDDPMScheduler": ".scheduler", "IDDPMSchedulerOutput": ".scheduler"}
__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
