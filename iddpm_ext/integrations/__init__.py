"""Bridges to other libraries (optional dependencies, imported on first use).

- :mod:`.diffusers_unet` — :class:`IDDPMUNet2DModel`, our ``UNetModel`` as a diffusers
  ``ModelMixin`` (``DDPMPipeline(unet=..., scheduler=IDDPMScheduler(...))``,
  ``save_pretrained`` / ``from_pretrained``, improved-diffusion checkpoints through
  ``from_improved_diffusion``) and :func:`pipeline_from_improved_diffusion`. Needs
  ``pip install diffusers`` (the ``iddpm-ext[diffusers]`` extra).
"""

_LAZY = {
    "IDDPMUNet2DModel": ".diffusers_unet",
    "pipeline_from_improved_diffusion": ".diffusers_unet",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
