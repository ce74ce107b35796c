"""Constructors with the reference's argument names (``script_util.py``)."""

from __future__ import annotations

import argparse
import inspect
import warnings

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
    # A table of defaults, laid out by hand.
    # fmt: off
    return dict(
        image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
        attention_resolutions="16,8", dropout=0.0, learn_sigma=False, sigma_small=False, class_cond=False,
        diffusion_steps=1000, noise_schedule="linear", timestep_respacing="", use_kl=False,
        predict_xstart=False, rescale_timesteps=True, rescale_learned_sigmas=True, use_checkpoint=False,
        use_scale_shift_norm=True, channel_mult="", num_classes=NUM_CLASSES, image_channels=3,
    )
    # fmt: on


def _call(fn, values: dict, **renamed):
    """fn(**the entries of ``values`` that are parameters of fn); ``renamed``: parameter of fn
    -> key of values where the names differ (create_gaussian_diffusion's steps = diffusion_steps)."""
    names = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in values.items() if k in names}
    kwargs.update({k: values[key] for k, key in renamed.items() if key in values})
    return fn(**kwargs)


# The reference's flat signatures, laid out by hand: one argument set, split between the model
# and the diffusion by name.
def create_model_and_diffusion(
    image_size, class_cond, learn_sigma, sigma_small, num_channels, num_res_blocks, num_heads,
    num_heads_upsample, attention_resolutions, dropout, diffusion_steps, noise_schedule, timestep_respacing,
    use_kl, predict_xstart, rescale_timesteps, rescale_learned_sigmas, use_checkpoint, use_scale_shift_norm,
    channel_mult="", num_classes=NUM_CLASSES, image_channels=3,
):  # fmt: skip
    """(UNetModel, SpacedDiffusion) from the flat argument set of
    :func:`model_and_diffusion_defaults`. The arguments are recorded on the model as
    ``model.iddpm_config`` (a dict), which the trainer stores in every checkpoint, so
    ``iddpm sample --model_path`` rebuilds the model without repeating its flags."""
    args = dict(locals())
    model = _call(create_model, args)
    model.iddpm_config = args
    return model, _call(create_gaussian_diffusion, args, steps="diffusion_steps")


def create_model(
    image_size, num_channels, num_res_blocks, learn_sigma, class_cond, use_checkpoint, attention_resolutions,
    num_heads, num_heads_upsample, use_scale_shift_norm, dropout, channel_mult="", num_classes=NUM_CLASSES,
    image_channels=3,
):  # fmt: skip
    """A UNetModel for images of ``image_size`` with ``image_channels`` channels (3: RGB,
    as the reference; 1: grayscale); outputs twice as many channels with learn_sigma.

    ``attention_resolutions`` ("16,8" or a sequence of ints) are feature-map sizes, turned
    into downsample rates image_size // res. ``channel_mult`` ("" = by image size, or
    "1,2,2,2", or a tuple) overrides the table; sizes other than 32, 64, 128, 256 need it.
    """
    from .unet import UNetModel

    if isinstance(image_channels, bool) or not isinstance(image_channels, int) or image_channels < 1:
        raise ValueError(f"image_channels: expected a positive int, got {image_channels!r}")
    return UNetModel(**_unet_kwargs(locals(), image_size, "image_size", image_channels))


def sr_model_and_diffusion_defaults():
    """Defaults for super-resolution: the image defaults with large_size/small_size in
    place of image_size, restricted to :func:`sr_create_model_and_diffusion`'s arguments."""
    res = model_and_diffusion_defaults()
    res["large_size"] = 256
    res["small_size"] = 64
    names = inspect.signature(sr_create_model_and_diffusion).parameters
    return {k: v for k, v in res.items() if k in names}


def sr_create_model_and_diffusion(
    large_size, small_size, class_cond, learn_sigma, num_channels, num_res_blocks, num_heads,
    num_heads_upsample, attention_resolutions, dropout, diffusion_steps, noise_schedule, timestep_respacing,
    use_kl, predict_xstart, rescale_timesteps, rescale_learned_sigmas, use_checkpoint, use_scale_shift_norm,
    channel_mult="", num_classes=NUM_CLASSES,
):  # fmt: skip
    """(SuperResModel, SpacedDiffusion) for small_size -> large_size upsampling. The
    arguments are recorded on the model as ``model.iddpm_config``, which the trainer stores
    in every checkpoint (as for :func:`create_model_and_diffusion`)."""
    args = dict(locals())
    model = _call(sr_create_model, args)
    model.iddpm_config = args
    return model, _call(create_gaussian_diffusion, args, steps="diffusion_steps")


def sr_create_model(
    large_size, small_size, num_channels, num_res_blocks, learn_sigma, class_cond, use_checkpoint,
    attention_resolutions, num_heads, num_heads_upsample, use_scale_shift_norm, dropout, channel_mult="",
    num_classes=NUM_CLASSES,
):  # fmt: skip
    """A SuperResModel producing ``large_size`` images (``small_size`` is not used by the
    architecture; the low-resolution input is upsampled to x's size in forward)."""
    from .unet import SuperResModel

    return SuperResModel(**_unet_kwargs(locals(), large_size, "large_size", 3))


def _unet_kwargs(args: dict, size: int, size_name: str, channels: int) -> dict:
    """The UNetModel arguments of create_model / sr_create_model's argument set ``args``."""
    channel_mult = _channel_mult(args["channel_mult"], size, size_name)  # checked first, as the reference
    return dict(
        in_channels=channels,
        model_channels=args["num_channels"],
        out_channels=2 * channels if args["learn_sigma"] else channels,
        num_res_blocks=args["num_res_blocks"],
        attention_resolutions=_attention_ds(args["attention_resolutions"], size),
        dropout=args["dropout"],
        channel_mult=channel_mult,
        num_classes=_num_classes(args["num_classes"]) if args["class_cond"] else None,
        use_checkpoint=args["use_checkpoint"],
        num_heads=args["num_heads"],
        num_heads_upsample=args["num_heads_upsample"],
        use_scale_shift_norm=args["use_scale_shift_norm"],
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
        if res < 1:
            raise ValueError(f"attention_resolutions: expected positive feature-map sizes, got {res}")
        if image_size % res:  # the reference takes image_size // res all the same; so do we
            ds = image_size // res  # 0 for res > image_size: no level has it
            side = image_size // ds if ds else 0
            where = f"at {side}x{side} if the model gets there" if ds and ds & (ds - 1) == 0 else "nowhere"
            warnings.warn(
                f"attention_resolutions: {res} does not divide the image size {image_size}; as the "
                f"reference, it means downsample rate {image_size} // {res} = {ds}: attention {where}",
                stacklevel=3,
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
