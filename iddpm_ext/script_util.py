"""Constructors with the reference's argument names (``script_util.py``)."""

from __future__ import annotations

from . import diffusion as gd
from .respace import SpacedDiffusion, space_timesteps
from .schedules import get_named_beta_schedule


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
