"""Bad input to the diffusion core: ValueErrors naming the argument, expected and received."""

import numpy as np
import pytest
import torch

from iddpm_ext import GaussianDiffusion, LossType, ModelMeanType, ModelVarType, create_gaussian_diffusion


@pytest.fixture
def d():
    return create_gaussian_diffusion(steps=10, learn_sigma=True, noise_schedule="cosine")


def zeros(c):
    return lambda x, t: torch.zeros(x.shape[0], c, *x.shape[2:])


def test_model_output_with_wrong_channel_count(d):
    x = torch.zeros(2, 3, 4, 4)
    t = torch.tensor([1, 2])
    msg = (
        r"model_output: expected shape \(2, 6, 4, 4\) \(6 channels: mean and variance for LEARNED_RANGE\), "
        r"got \(2, 3, 4, 4\)"
    )
    with pytest.raises(ValueError, match=msg):
        d.p_sample(zeros(3), x, t)
    with pytest.raises(ValueError, match=msg):
        d.training_losses(zeros(3), x, t)
    fixed = create_gaussian_diffusion(steps=10, noise_schedule="cosine")
    with pytest.raises(
        ValueError, match=r"expected shape \(2, 3, 4, 4\) \(3 channels for FIXED_LARGE\), got \(2, 6, 4, 4\)"
    ):
        fixed.ddim_sample(zeros(6), x, t)


@pytest.mark.parametrize(
    "t,match",
    [
        (torch.tensor([1]), r"t: expected shape \(2,\) \(one timestep per batch item\), got \(1,\)"),
        (torch.tensor([[1, 2]]), r"t: expected shape \(2,\)"),
        (torch.tensor([1.0, 2.0]), r"t: expected an integer tensor \(e.g. int64\), got dtype torch.float32"),
        (torch.tensor([0, 10]), r"t: expected timesteps in \[0, 10\), got 10"),
        (torch.tensor([-1, 3]), r"t: expected timesteps in \[0, 10\), got -1"),
        ([1, 2], r"t: expected an integer tensor of shape \(2,\), got list"),
    ],
)
def test_bad_timesteps(d, t, match):
    x = torch.zeros(2, 3, 4)
    one = isinstance(t, torch.Tensor) and t.dim() <= 1 and t.numel() == 1  # q_sample broadcasts it
    for call in (
        lambda: d.p_sample(zeros(6), x, t),
        *(() if one else (lambda: d.q_sample(x, t),)),
        lambda: d.training_losses(zeros(6), x, t),
        lambda: d.p_mean_variance(zeros(6), x, t),
    ):
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.parametrize("t", [torch.tensor(3), torch.tensor([3])])
def test_forward_process_takes_one_timestep_for_the_batch(d, t):
    # As the reference's _extract_into_tensor: q_mean_variance, q_sample and
    # q_posterior_mean_variance broadcast a single timestep over the batch (the reverse process,
    # which hands t to the model, wants one per item).
    g = torch.Generator().manual_seed(0)
    x0, xt, noise = (torch.randn(3, 2, 4, generator=g) for _ in range(3))
    full = torch.tensor([3, 3, 3])
    torch.testing.assert_close(d.q_sample(x0, t, noise), d.q_sample(x0, full, noise), rtol=0, atol=0)
    for a, b in zip(d.q_mean_variance(x0, t), d.q_mean_variance(x0, full)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(d.q_posterior_mean_variance(x0, xt, t), d.q_posterior_mean_variance(x0, xt, full)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"t: expected timesteps in \[0, 10\), got 10"):
        d.q_sample(x0, t + 7)
    with pytest.raises(ValueError, match=r"t: expected shape \(3,\)"):
        d.p_sample(zeros(6), x0, t)


def test_mismatched_noise_and_shapes(d):
    x = torch.zeros(2, 3, 4)
    t = torch.tensor([1, 2])
    with pytest.raises(
        ValueError, match=r"noise: expected shape \(2, 3, 4\) \(the shape of x_start\), got \(2, 3, 5\)"
    ):
        d.q_sample(x, t, noise=torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match=r"noise: expected shape \(2, 3, 4\) \(the shape of x_start\)"):
        d.training_losses(zeros(6), x, t, noise=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"noise: expected shape \(2, 3, 4\) \(the shape of x\)"):
        d.p_sample(zeros(6), x, t, noise=torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match=r"x_start: expected shape \(2, 3, 4\) \(the shape of x_t\)"):
        d.q_posterior_mean_variance(torch.zeros(2, 3, 5), x, t)
    with pytest.raises(ValueError, match=r"noise: expected shape \(2, 3, 4\) \(the sample shape\)"):
        d.p_sample_loop(zeros(6), (2, 3, 4), noise=torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match=r"step_noise: expected shape \(10, 2, 3, 4\)"):
        d.p_sample_loop(zeros(6), (2, 3, 4), step_noise=torch.zeros(9, 2, 3, 4))
    with pytest.raises(ValueError, match=r"shape: expected a tuple \(B, C, \.\.\.\) of positive ints"):
        d.p_sample_loop(zeros(6), torch.Size([2]))
    with pytest.raises(ValueError, match=r"x: expected a tensor \[N, C, ...\], got shape \(4,\)"):
        d.p_sample(zeros(6), torch.zeros(4), torch.tensor([1, 1, 1, 1]))


@pytest.mark.parametrize(
    "betas,match",
    [
        (np.array([0.1, 0.0]), r"betas: expected every value in \(0, 1\], got betas\[1\] = "),
        (np.array([0.1, 1.5]), r"betas: expected every value in \(0, 1\], got betas\[1\] = "),
        (np.array([0.1, np.nan]), r"betas: expected every value in \(0, 1\]"),
        (np.zeros((2, 2)) + 0.1, r"betas: expected a non-empty 1-D array, got shape \(2, 2\)"),
        (np.array([]), r"betas: expected a non-empty 1-D array, got shape \(0,\)"),
    ],
)
def test_bad_betas(betas, match):
    with pytest.raises(ValueError, match=match):
        GaussianDiffusion(
            betas=betas,
            model_mean_type=ModelMeanType.EPSILON,
            model_var_type=ModelVarType.FIXED_SMALL,
            loss_type=LossType.MSE,
        )


def test_bad_enum():
    with pytest.raises(ValueError, match="model_var_type: expected a ModelVarType, got 'learned'"):
        GaussianDiffusion(
            betas=np.array([0.1]),
            model_mean_type=ModelMeanType.EPSILON,
            model_var_type="learned",
            loss_type=LossType.MSE,
        )


def test_timestep_check_can_be_disabled_but_shape_check_stays(d):
    d.check_timesteps = False
    x = torch.zeros(1, 3, 4)
    with pytest.raises(ValueError, match=r"t: expected shape \(1,\)"):
        d.q_sample(x, torch.tensor([1, 2]))
    assert d.q_sample(x, torch.tensor([5])).shape == x.shape


def test_one_step_process_works():
    d = GaussianDiffusion(
        betas=np.array([0.5]),
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=ModelVarType.LEARNED_RANGE,
        loss_type=LossType.RESCALED_MSE,
    )
    x0 = torch.rand(2, 1, 3) * 2 - 1
    terms = d.training_losses(zeros(2), x0, torch.tensor([0, 0]))
    assert torch.isfinite(terms["loss"]).all()
    assert torch.isfinite(d.calc_bpd_loop(zeros(2), x0)["total_bpd"]).all()


def test_bad_arguments_are_also_assertion_errors_as_in_the_reference(d):
    """Where openai/improved-diffusion checks with assert, the error is also an AssertionError
    (and a timestep out of range also the IndexError its table lookup raises), so code and
    tests written against it keep working; each is still a ValueError naming the argument."""
    from iddpm_ext import UNetModel, losses
    from iddpm_ext.errors import ArgumentError, TimestepRangeError

    x, t = torch.zeros(2, 3, 4, 4), torch.tensor([1, 2])
    cases = {
        "betas": lambda: create_gaussian_diffusion(steps=10),  # linear at 10 steps: beta > 1
        "t": lambda: d.p_mean_variance(zeros(6), x, torch.tensor([1])),
        "model_output": lambda: d.training_losses(zeros(3), x, t),
        "noise": lambda: d.q_sample(x, t, noise=torch.zeros(2, 3, 4, 5)),
        "x_t": lambda: d.q_posterior_mean_variance(x, torch.zeros(2, 3, 4, 5), t),
        "eta": lambda: d.ddim_reverse_sample(zeros(6), x, t, eta=0.5),
        "discretized_gaussian_log_likelihood": lambda: losses.discretized_gaussian_log_likelihood(
            x, means=x[:1], log_scales=x
        ),
        "normal_kl": lambda: losses.normal_kl(0.0, 0.0, 0.0, 0.0),
    }
    model = UNetModel(3, 32, 3, 1, (2,), channel_mult=(1, 2))
    cases["y"] = lambda: model(x, t, y=torch.tensor([0, 1]))
    for name, call in cases.items():
        with pytest.raises(AssertionError) as info:
            call()
        assert isinstance(info.value, ArgumentError) and isinstance(info.value, ValueError), name
        assert name in str(info.value), (name, str(info.value))
    with pytest.raises(IndexError) as info:
        d.q_sample(x, torch.tensor([1, 10]))
    assert isinstance(info.value, TimestepRangeError) and isinstance(info.value, AssertionError)
