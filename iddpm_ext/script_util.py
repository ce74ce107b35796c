"""Constructors with the reference's argument names (``script_util.py``)."""

from __future__ import annotations

import argparse
import inspect

from . import gaussian_diffusion as gd
from .core.schedules import get_named_beta_schedule
from .respace import SpacedDiffusion, space_timesteps


def create_gaussian_diffusion(
    *,
    steps=1000,
    learn_sigma=False,
    sigma_small=False,
    noise_schedule="linear",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
    timestep_respacing="",
):
    """A SpacedDiffusion configured as the reference configures it.

    loss: RESCALED_KL if use_kl, else RESCALED_MSE if rescale_learned_sigmas, else MSE;
    mean: START_X if predict_xstart else EPSILON; variance: LEARNED_RANGE if learn_sigma,
    else FIXED_SMALL if sigma_small else FIXED_LARGE. An empty ``timestep_respacing``
    keeps all ``steps``.
    """
    betas = get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if not timestep_respacing:
        timestep_respacing = [steps]
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing),
        betas=betas,
        model_mean_type=(gd.ModelMeanType.EPSILON if not predict_xstart else gd.ModelMeanType.START_X),
        model_var_type=(
            (gd.ModelVarType.FIXED_LARGE if not sigma_small else gd.ModelVarType.FIXED_SMALL)
            if not learn_sigma
            else gd.ModelVarType.LEARNED_RANGE
        ),
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
    )


# ---------------------------------------------------------------------------------
# Model constructors (the reference's argument names and defaults).
# Extras beyond the reference, keyword-only with defaults: ``channel_mult`` (override
# the per-size table) and ``num_classes`` (used when ``class_cond``; reference: 1000).
# ---------------------------------------------------------------------------------

NUM_CLASSES = 1000

# image size -> channel multipliers. 32, 64 and 256 are the reference's; 128 is not in
# improved-diffusion and follows OpenAI's later guided-diffusion: (1, 1, 2, 3, 4).
CHANNEL_MULT_BY_SIZE = {
    32: (1, 2, 2, 2),
    64: (1, 2, 3, 4),
    128: (1, 1, 2, 3, 4),
    256: (1, 1, 2, 2, 4, 4),
}


def model_and_diffusion_defaults():
    """Defaults for image training: the reference's keys and values, plus the extras
    ``channel_mult=""`` (by image size), ``num_classes=1000`` and ``image_channels=3``."""
    return dict(
        image_size=64,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        attention_resolutions="16,8",
        dropout=0.0,
        learn_sigma=False,
        sigma_small=False,
        class_cond=False,
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=True,
        rescale_learned_sigmas=True,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        channel_mult="",
        num_classes=NUM_CLASSES,
        image_channels=3,
    )


def create_model_and_diffusion(
    image_size,
    class_cond,
    learn_sigma,
    sigma_small,
    num_channels,
    num_res_blocks,
    num_heads,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    channel_mult="",
    num_classes=NUM_CLASSES,
    image_channels=3,
):
    """(UNetModel, SpacedDiffusion) from the flat argument set of
    :func:`model_and_diffusion_defaults`."""
    model = create_model(
        image_size,
        num_channels,
        num_res_blocks,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        channel_mult=channel_mult,
        num_classes=num_classes,
        image_channels=image_channels,
    )
    diffusion = create_gaussian_diffusion(
        steps=diffusion_steps,
        learn_sigma=learn_sigma,
        sigma_small=sigma_small,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing,
    )
    return model, diffusion


def create_model(
    image_size,
    num_channels,
    num_res_blocks,
    learn_sigma,
    class_cond,
    use_checkpoint,
    attention_resolutions,
    num_heads,
    num_heads_upsample,
    use_scale_shift_norm,
    dropout,
    channel_mult="",
    num_classes=NUM_CLASSES,
    image_channels=3,
):
    """A UNetModel for images of ``image_size`` with ``image_channels`` channels (3: RGB,
    as the reference; 1: grayscale); outputs twice as many channels with learn_sigma.

    ``attention_resolutions`` ("16,8" or a sequence of ints) are feature-map sizes, turned
    into downsample rates image_size // res. ``channel_mult`` ("" = by image size, or
    "1,2,2,2", or a tuple) overrides the table; sizes other than 32, 64, 128, 256 need it.
    """
    from .unet import UNetModel

    mult = _channel_mult(channel_mult, image_size, "image_size")
    if isinstance(image_channels, bool) or not isinstance(image_channels, int) or image_channels < 1:
        raise ValueError(f"image_channels: expected a positive int, got {image_channels!r}")
    return UNetModel(
        in_channels=image_channels,
        model_channels=num_channels,
        out_channels=(image_channels if not learn_sigma else 2 * image_channels),
        num_res_blocks=num_res_blocks,
        attention_resolutions=_attention_ds(attention_resolutions, image_size),
        dropout=dropout,
        channel_mult=mult,
        num_classes=(_num_classes(num_classes) if class_cond else None),
        use_checkpoint=use_checkpoint,
        num_heads=num_heads,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
    )


def sr_model_and_diffusion_defaults():
    """Defaults for super-resolution: the image defaults with large_size/small_size in
    place of image_size, restricted to :func:`sr_create_model_and_diffusion`'s arguments."""
    res = model_and_diffusion_defaults()
    res["large_size"] = 256
    res["small_size"] = 64
    names = inspect.signature(sr_create_model_and_diffusion).parameters
    return {k: v for k, v in res.items() if k in names}


def sr_create_model_and_diffusion(
    large_size,
    small_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    num_heads,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    channel_mult="",
    num_classes=NUM_CLASSES,
):
    """(SuperResModel, SpacedDiffusion) for small_size -> large_size upsampling."""
    model = sr_create_model(
        large_size,
        small_size,
        num_channels,
        num_res_blocks,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        channel_mult=channel_mult,
        num_classes=num_classes,
    )
    diffusion = create_gaussian_diffusion(
        steps=diffusion_steps,
        learn_sigma=learn_sigma,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing,
    )
    return model, diffusion


def sr_create_model(
    large_size,
    small_size,
    num_channels,
    num_res_blocks,
    learn_sigma,
    class_cond,
    use_checkpoint,
    attention_resolutions,
    num_heads,
    num_heads_upsample,
    use_scale_shift_norm,
    dropout,
    channel_mult="",
    num_classes=NUM_CLASSES,
):
    """A SuperResModel producing ``large_size`` images (``small_size`` is not used by the
    architecture; the low-resolution input is upsampled to x's size in forward)."""
    from .unet import SuperResModel

    del small_size
    mult = _channel_mult(channel_mult, large_size, "large_size")
    return SuperResModel(
        in_channels=3,
        model_channels=num_channels,
        out_channels=(3 if not learn_sigma else 6),
        num_res_blocks=num_res_blocks,
        attention_resolutions=_attention_ds(attention_resolutions, large_size),
        dropout=dropout,
        channel_mult=mult,
        num_classes=(_num_classes(num_classes) if class_cond else None),
        use_checkpoint=use_checkpoint,
        num_heads=num_heads,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
    )


def _channel_mult(channel_mult, image_size, size_name):
    """The channel multipliers: parsed from ``channel_mult`` or looked up by size."""
    if isinstance(channel_mult, str):
        text = channel_mult.strip()
        if text:
            try:
                return tuple(int(part) for part in text.split(","))
            except ValueError:
                raise ValueError(
                    f"channel_mult: expected comma-separated integers like '1,2,2,2', got {channel_mult!r}"
                ) from None
    elif channel_mult:
        return tuple(int(m) for m in channel_mult)
    if image_size not in CHANNEL_MULT_BY_SIZE:
        raise ValueError(
            f"{size_name}: unsupported size {image_size!r} (known: {sorted(CHANNEL_MULT_BY_SIZE)}); "
            "pass channel_mult (e.g. '1,2,2') for other sizes"
        )
    return CHANNEL_MULT_BY_SIZE[image_size]


def _attention_ds(attention_resolutions, image_size):
    """Feature-map sizes ("16,8" or ints) -> downsample rates image_size // res."""
    if isinstance(attention_resolutions, str):
        parts = [p for p in attention_resolutions.split(",") if p.strip()]
        try:
            resolutions = [int(p) for p in parts]
        except ValueError:
            raise ValueError(
                f"attention_resolutions: expected comma-separated integers like '16,8', "
                f"got {attention_resolutions!r}"
            ) from None
    else:
        resolutions = [int(r) for r in attention_resolutions]
    for res in resolutions:
        if res < 1 or image_size % res:
            raise ValueError(
                f"attention_resolutions: each resolution must divide the image size {image_size}, got {res}"
            )
    return tuple(image_size // res for res in resolutions)


def _num_classes(num_classes):
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
    return num_classes


# ---------------------------------------------------------------------------------
# Command-line helpers.
# ---------------------------------------------------------------------------------


def add_dict_to_argparser(parser, default_dict):
    """Add ``--key`` options with the dict's defaults; the type follows the default
    (bools parse with :func:`str2bool`, None defaults as str)."""
    for key, value in default_dict.items():
        if value is None:
            value_type = str
        elif isinstance(value, bool):
            value_type = str2bool
        else:
            value_type = type(value)
        parser.add_argument(f"--{key}", default=value, type=value_type)


def args_to_dict(args, keys):
    """{key: getattr(args, key)} for the given keys."""
    return {k: getattr(args, k) for k in keys}


def str2bool(v):
    """Parse yes/no, true/false, t/f, y/n, 1/0 (any case); bools pass through."""
    if isinstance(v, bool):
        return v
    text = str(v).lower()
    if text in ("yes", "true", "t", "y", "1"):
        return True
    if text in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {v!r}")
