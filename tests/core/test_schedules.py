"""Noise schedules: closed forms and argument errors."""

import math

import numpy as np
import pytest

from iddpm_ext import UnknownNameError, betas_for_alpha_bar, get_named_beta_schedule


@pytest.mark.parametrize("T", [1000, 4000, 250])
def test_linear_schedule_endpoints_scale_with_T(T):
    betas = get_named_beta_schedule("linear", T)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    assert betas[0] == pytest.approx(1e-4 * 1000 / T, rel=1e-12)
    assert betas[-1] == pytest.approx(0.02 * 1000 / T, rel=1e-12)
    assert np.allclose(np.diff(betas), (betas[-1] - betas[0]) / (T - 1))


@pytest.mark.parametrize("T", [10, 1000, 4000])
def test_cosine_schedule_reproduces_alpha_bar(T):
    betas = get_named_beta_schedule("cosine", T)
    s = 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    alpha_bar = np.cumprod(1 - betas)
    expected = np.array([f(i + 1) / f(0) for i in range(T)])
    unclipped = betas < 0.999
    # Where no β was clipped, ᾱ_t is exactly the cosine curve (normalised by f(0)).
    k = np.argmin(unclipped) if not unclipped.all() else T
    assert np.allclose(alpha_bar[:k], expected[:k], rtol=1e-9)
    assert betas.max() <= 0.999
    assert betas[-1] == 0.999  # ᾱ(1) = cos²(π/2) ≈ 0: the last β is clipped


def test_betas_for_alpha_bar_clips_at_max_beta():
    betas = betas_for_alpha_bar(4, lambda t: 1 - t, max_beta=0.5)
    # 1 - ᾱ(t2)/ᾱ(t1) = 1 - (1-t2)/(1-t1): 0.25, 1/3, 0.5, 1 -> clipped to 0.5
    assert np.allclose(betas, [0.25, 1 / 3, 0.5, 0.5])


@pytest.mark.parametrize("name", ["cosin", "", "LINEAR", None])
def test_unknown_schedule_is_a_value_error_naming_the_argument(name):
    with pytest.raises(ValueError, match=r"schedule_name: expected one of \['linear', 'cosine'\]"):
        get_named_beta_schedule(name, 10)
    with pytest.raises(NotImplementedError):  # what the reference raised
        get_named_beta_schedule(name, 10)
    assert issubclass(UnknownNameError, ValueError)


@pytest.mark.parametrize("T", [0, -5, 2.5, "10", True])
def test_bad_number_of_steps(T):
    with pytest.raises(ValueError, match="num_diffusion_timesteps: expected a positive int"):
        get_named_beta_schedule("cosine", T)
