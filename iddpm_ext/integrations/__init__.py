"""Bridges to other libraries (optional dependencies, imported on first use).

- :mod:`.diffusers_unet` — :class:`IDDPMUNet2DModel`, our ``UNetModel`` as a diffusers
  ``ModelMixin`` (``DDPMPipeline(unet=..., scheduler=IDDPMScheduler(...))``,
  ``save_pretrained`` / ``from_pretrained``, improved-diffusion checkpoints through
  ``from_improved_diffusion``) and :func:`pipeline_from_improved_diffusion`. Needs
  ``pip install diffusers`` (the ``iddpm-ext[diffusers]`` extra).
"""

from ..core.lazy import lazy_attributes

_LAZY = {
    "IDDPMUNet2DModel": ".diffusers_unet",
    "pipeline_from_improved_diffusion": ".diffusers_unet",
}
__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
