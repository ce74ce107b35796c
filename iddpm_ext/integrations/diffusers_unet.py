"""Our UNetModel as a diffusers model, and improved-diffusion checkpoints as diffusers pipelines.

:class:`IDDPMUNet2DModel` is a ``diffusers.ModelMixin`` / ``ConfigMixin`` holding a
:class:`iddpm_ext.unet.UNetModel` (``.unet``); ``forward(sample, timestep, class_labels=None,
return_dict=True)`` returns ``UNet2DOutput(sample=...)`` as ``UNet2DModel`` does, so it is the
``unet`` of ``DDPMPipeline``::

    from diffusers import DDPMPipeline
    from iddpm_ext import IDDPMScheduler
    from iddpm_ext.integrations import IDDPMUNet2DModel

    unet = IDDPMUNet2DModel.from_improved_diffusion("ema_0.9999_500000.pt", image_size=32,
        num_channels=128, num_res_blocks=3, learn_sigma=True, diffusion_steps=4000,
        noise_schedule="cosine")                              # the reference's flags
    scheduler = IDDPMScheduler.from_improved_diffusion(learn_sigma=True, diffusion_steps=4000,
        noise_schedule="cosine")
    images = DDPMPipeline(unet=unet, scheduler=scheduler)(batch_size=4,
        num_inference_steps=100, generator=torch.Generator().manual_seed(0)).images

(:func:`pipeline_from_improved_diffusion` does those three steps.) A learned-σ model outputs
2C channels: ``IDDPMScheduler`` (``variance_type="learned_range"``) and diffusers'
``DDPMScheduler(variance_type="learned_range")`` both split them. The wrapper takes
original-process timesteps and applies improved-diffusion's ``rescale_timesteps`` itself
(config ``rescale_timesteps``, ``num_train_timesteps``), so a pipeline gives it what the
scheduler's ``timesteps`` hold. ``save_pretrained`` writes ``config.json`` and
``diffusion_pytorch_model.safetensors`` (keys: ``unet.`` + the reference's keys).
"""

from __future__ import annotations

import os

import torch
from diffusers import ConfigMixin, DDPMPipeline, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput

from .. import script_util
from ..engine.scheduler import IDDPMScheduler
from ..errors import CheckpointError
from ..training import checkpoint as ckpt
from ..unet import UNetModel

__all__ = ["IDDPMUNet2DModel", "pipeline_from_improved_diffusion"]


class IDDPMUNet2DModel(ModelMixin, ConfigMixin):
    """improved-diffusion's UNet behind diffusers' ``UNet2DModel`` interface.

    :param sample_size: image side (``DDPMPipeline`` draws [B, in_channels, size, size]).
    :param num_train_timesteps: T of the trained process, and
    :param rescale_timesteps: whether the model was trained on timesteps scaled to [0, 1000)
        (improved-diffusion's flag; the wrapper scales the timesteps it is given).
    The other arguments are :class:`UNetModel`'s (``attention_resolutions`` as downsample
    rates; ``out_channels`` defaults to ``in_channels``, 2× for a learned σ).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        out_channels: int | None = None,
        model_channels: int = 128,
        num_res_blocks: int = 2,
        attention_resolutions: tuple = (),
        dropout: float = 0.0,
        channel_mult: tuple = (1, 2, 2, 2),
        conv_resample: bool = True,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        num_heads: int = 1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        num_train_timesteps: int = 1000,
        rescale_timesteps: bool = False,
    ):
        super().__init__()
        if not isinstance(sample_size, int) or isinstance(sample_size, bool) or sample_size < 1:
            raise ValueError(f"sample_size: expected a positive int, got {sample_size!r}")
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps: expected a positive int, got {num_train_timesteps!r}")
        self.unet = UNetModel(
            in_channels=in_channels,
            model_channels=model_channels,
            out_channels=in_channels if out_channels is None else out_channels,
            num_res_blocks=num_res_blocks,
            attention_resolutions=tuple(attention_resolutions),
            dropout=dropout,
            channel_mult=tuple(channel_mult),
            conv_resample=conv_resample,
            dims=2,
            num_classes=num_classes,
            use_checkpoint=use_checkpoint,
            num_heads=num_heads,
            num_heads_upsample=num_heads_upsample,
            use_scale_shift_norm=use_scale_shift_norm,
        )

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        """sample: [B, in_channels, H, W]; timestep: original-process timestep(s), a number, a
        0-d tensor or [B] (any device); class_labels: [B] for a class-conditional model.
        Returns UNet2DOutput(sample=[B, out_channels, H, W]) or that tuple."""
        if not torch.is_tensor(sample):
            raise ValueError(f"sample: expected a tensor [B, C, H, W], got {type(sample).__name__}")
        t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
        t = t.to(sample.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(sample.shape[0])
        if self.config.rescale_timesteps:
            t = t.float() * (1000.0 / self.config.num_train_timesteps)
        out = self.unet(sample, t, y=class_labels)
        return UNet2DOutput(sample=out) if return_dict else (out,)

    @classmethod
    def from_improved_diffusion(cls, checkpoint, **flags) -> IDDPMUNet2DModel:
        """The model of an improved-diffusion checkpoint: ``checkpoint`` is a state dict with
        the reference's keys, a reference ``.pt`` or one of our ``.safetensors`` (whose stored
        config is used; flags that contradict it raise CheckpointError); ``flags`` are
        :func:`model_and_diffusion_defaults`' keys (missing ones take those defaults).
        Loading is strict: missing, unexpected or misshapen tensors raise CheckpointError."""
        state, args, name = _resolve(checkpoint, flags)
        model = cls.from_flags(**args)
        ckpt.load_into(model.unet, state, name)
        return model.eval()

    @classmethod
    def from_flags(cls, **flags) -> IDDPMUNet2DModel:
        """A freshly initialised model from improved-diffusion's flags (as ``create_model``)."""
        args = _with_defaults(flags)
        channels = args["image_channels"]
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"image_channels: expected a positive int, got {channels!r}")
        kwargs = script_util._unet_kwargs(args, args["image_size"], "image_size", channels)
        return cls(
            sample_size=int(args["image_size"]),
            **{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
            num_train_timesteps=int(args["diffusion_steps"]),
            rescale_timesteps=bool(args["rescale_timesteps"]),
        )


def pipeline_from_improved_diffusion(checkpoint, timestep_spacing="leading", **flags) -> DDPMPipeline:
    """``DDPMPipeline(unet=IDDPMUNet2DModel, scheduler=IDDPMScheduler)`` for an improved-diffusion
    checkpoint and its flags (as :meth:`IDDPMUNet2DModel.from_improved_diffusion`); the
    scheduler follows the flags' diffusion (``diffusion_steps``, ``noise_schedule``,
    ``learn_sigma``, ``sigma_small``, ``predict_xstart``) with ``timestep_spacing`` ("leading"
    as diffusers, "respace" for improved-diffusion's respacing)."""
    state, args, name = _resolve(checkpoint, flags)
    unet = IDDPMUNet2DModel.from_flags(**args)
    ckpt.load_into(unet.unet, state, name)
    # The wrapper applies rescale_timesteps itself: the scheduler hands it original timesteps.
    scheduler = IDDPMScheduler.from_improved_diffusion(
        timestep_spacing=timestep_spacing, **{**args, "rescale_timesteps": False}
    )
    return DDPMPipeline(unet=unet.eval(), scheduler=scheduler)


def _with_defaults(flags: dict) -> dict:
    args = script_util.model_and_diffusion_defaults()
    unknown = sorted(set(flags) - set(args))
    if unknown:
        raise ValueError(f"flags: unknown names {unknown} (expected model_and_diffusion_defaults() keys)")
    args.update(flags)
    return args


def _resolve(checkpoint, flags):
    """(state dict, the full flag set, a name for errors) of a checkpoint and explicit flags."""
    _with_defaults(flags)  # unknown names first
    stored = None
    if isinstance(checkpoint, (str, os.PathLike)):
        name = os.fspath(checkpoint)
        state, stored, _ = ckpt.load_weights(name)
    elif isinstance(checkpoint, dict):
        name = "checkpoint"
        bad = [k for k, v in checkpoint.items() if not torch.is_tensor(v)]
        if bad:
            raise CheckpointError(f"checkpoint: expected a state dict of tensors, non-tensors at {bad[:3]}")
        state = checkpoint
    else:
        raise ValueError(
            f"checkpoint: expected a path or a state dict of tensors, got {type(checkpoint).__name__}"
        )
    if stored:
        stored = {k: v for k, v in stored.items() if k in script_util.model_and_diffusion_defaults()}
        ckpt.check_config(name, stored, {**stored, **flags}, explicit=set(flags))
    return state, _with_defaults({**(stored or {}), **flags}), name
