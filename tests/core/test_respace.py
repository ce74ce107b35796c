"""Respacing: the kept timesteps (Python's rounding), SpacedDiffusion, errors."""

import numpy as np
import pytest
import torch

from iddpm_ext import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    SpacedDiffusion,
    create_gaussian_diffusion,
    get_named_beta_schedule,
    space_timesteps,
)


def test_single_section_strides_and_rounding_half_to_even():
    # 10 steps into 3: positions 0, 4.5, 9 -> round(4.5) == 4 (half to even)
    assert space_timesteps(10, "3") == {0, 4, 9}
    # 11 steps into 5: stride 2.5 -> 0, 2.5->2, 5, 7.5->8, 10
    assert space_timesteps(11, "5") == {0, 2, 5, 8, 10}
    assert space_timesteps(1000, "1000") == set(range(1000))
    assert space_timesteps(1000, [1000]) == set(range(1000))


def test_sections_of_unequal_size():
    # 300 steps into 3 sections of 100 with 10, 15, 20 steps.
    steps = sorted(space_timesteps(300, "10,15,20"))
    assert len(steps) == 45
    assert steps[:10] == [round(i * 99 / 9) for i in range(10)]
    assert steps[10] == 100 and steps[24] == 199 and steps[25] == 200 and steps[-1] == 299
    # 7 steps into 2 sections: sizes 4 and 3 (the first takes the remainder)
    assert space_timesteps(7, "2,2") == {0, 3, 4, 6}


def test_single_step_sections_take_the_section_start():
    assert space_timesteps(100, "1") == {0}
    assert space_timesteps(100, "1,1") == {0, 50}


def test_ddim_striding():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    assert space_timesteps(10, "ddim3") == {0, 4, 8}
    with pytest.raises(ValueError, match=r"section_counts: cannot take exactly 7 of 10 steps"):
        space_timesteps(10, "ddim7")


@pytest.mark.parametrize(
    "T,spec,match",
    [
        (10, "11", r"section_counts: cannot divide section 0 of 10 steps into 11"),
        (10, "ddimX", r"section_counts: expected 'ddimN' with an integer N"),
        (10, "a,b", r"section_counts: expected comma-separated integers"),
        (10, "", r"section_counts: expected comma-separated integers"),
        (10, "-1", r"section_counts: expected non-negative counts"),
        (0, "1", r"num_timesteps: expected a positive int"),
    ],
)
def test_respacing_that_cannot_be_met(T, spec, match):
    with pytest.raises(ValueError, match=match):
        space_timesteps(T, spec)


def _diffusions(**kw):
    betas = get_named_beta_schedule("cosine", 40)
    args = dict(
        betas=betas,
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=ModelVarType.LEARNED_RANGE,
        loss_type=LossType.RESCALED_MSE,
        **kw,
    )
    return GaussianDiffusion(**args), SpacedDiffusion(use_timesteps=range(40), **args)


def _model(x, t):
    return torch.cat([torch.sin(x + t.float().view(-1, 1, 1, 1) / 40), torch.tanh(x)], dim=1)


@pytest.mark.parametrize("rescale", [False, True])
def test_spaced_equals_unspaced_when_all_steps_are_kept(rescale):
    base, spaced = _diffusions(rescale_timesteps=rescale)
    # The respaced βs are recomputed from ratios of ᾱ: equal up to float64 rounding.
    assert np.allclose(base.betas, spaced.betas, rtol=1e-12, atol=0)
    torch.manual_seed(0)
    x0 = torch.rand(3, 2, 4, 4) * 2 - 1
    t = torch.tensor([0, 39, 17])
    noise = torch.randn_like(x0)
    for key in ("loss", "mse", "vb"):
        torch.testing.assert_close(
            base.training_losses(_model, x0, t, noise=noise)[key],
            spaced.training_losses(_model, x0, t, noise=noise)[key],
            rtol=1e-6,
            atol=1e-7,
        )
    a = base.p_sample(_model, x0, t, noise=noise)
    b = spaced.p_sample(_model, x0, t, noise=noise)
    torch.testing.assert_close(a["sample"], b["sample"], rtol=1e-6, atol=1e-7)


def test_respaced_betas_keep_the_kept_alpha_bars():
    full = create_gaussian_diffusion(steps=100, noise_schedule="linear")
    spaced = create_gaussian_diffusion(steps=100, noise_schedule="linear", timestep_respacing="10")
    kept = sorted(space_timesteps(100, "10"))
    assert spaced.timestep_map == kept
    assert np.allclose(spaced.alphas_cumprod, full.alphas_cumprod[kept], rtol=1e-12)
    assert spaced.num_timesteps == 10 and spaced.original_num_steps == 100


def test_model_sees_original_timesteps_rescaled_when_asked():
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    d = create_gaussian_diffusion(steps=100, timestep_respacing="10", noise_schedule="cosine")
    d.p_mean_variance(model, torch.zeros(2, 1, 2), torch.tensor([0, 9]))
    assert seen[-1].tolist() == [0, 99]
    d = create_gaussian_diffusion(
        steps=100, timestep_respacing="10", noise_schedule="cosine", rescale_timesteps=True
    )
    d.p_mean_variance(model, torch.zeros(2, 1, 2), torch.tensor([0, 9]))
    assert seen[-1].dtype == torch.float32
    assert torch.allclose(seen[-1], torch.tensor([0.0, 990.0]))


def test_wrapped_model_takes_both_argument_forms():
    """respace._WrappedModel(model, diffusion), or the reference's (model, timestep_map,
    rescale_timesteps, original_num_steps): the model sees the same timesteps either way."""
    from iddpm_ext.respace import _WrappedModel

    def model(x, t):
        return t

    t = torch.tensor([0, 3, 9])
    for rescale in (False, True):
        d = create_gaussian_diffusion(steps=100, timestep_respacing="10", rescale_timesteps=rescale)
        ours = _WrappedModel(model, d)(None, t)
        theirs = _WrappedModel(model, d.timestep_map, rescale, d.original_num_steps)(None, t)
        assert torch.equal(ours, theirs) and ours.dtype == (torch.float32 if rescale else torch.int64)
        assert ours.tolist() == ([0.0, 330.0, 990.0] if rescale else [0, 33, 99])
    with pytest.raises(ValueError, match="_WrappedModel: expected"):
        _WrappedModel(model, [0, 1])


def test_spaced_diffusion_argument_errors():
    betas = get_named_beta_schedule("cosine", 10)
    kw = dict(
        betas=betas,
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=ModelVarType.FIXED_SMALL,
        loss_type=LossType.MSE,
    )
    with pytest.raises(ValueError, match=r"use_timesteps: expected timesteps in \[0, 10\), got \[10\]"):
        SpacedDiffusion(use_timesteps=[0, 10], **kw)
    with pytest.raises(ValueError, match="use_timesteps: expected at least one timestep"):
        SpacedDiffusion(use_timesteps=[], **kw)
