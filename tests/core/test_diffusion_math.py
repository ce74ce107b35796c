"""The diffusion core against closed forms (the paper's equations), independent of the code."""

import math

import numpy as np
import pytest
import torch

from iddpm_ext import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    create_gaussian_diffusion,
    discretized_gaussian_log_likelihood,
    get_named_beta_schedule,
    normal_kl,
)

T = 50
BETAS = get_named_beta_schedule("cosine", T)


def make(mean=ModelMeanType.EPSILON, var=ModelVarType.LEARNED_RANGE, loss=LossType.MSE, betas=BETAS):
    return GaussianDiffusion(betas=betas, model_mean_type=mean, model_var_type=var, loss_type=loss)


def alpha_bar(betas=BETAS):
    return np.cumprod(1 - np.asarray(betas, dtype=np.float64))


def test_normal_kl_zero_for_identical_and_matches_torch_distributions():
    m = torch.randn(100, dtype=torch.float64)
    lv = torch.randn(100, dtype=torch.float64)
    assert torch.allclose(normal_kl(m, lv, m, lv), torch.zeros(100, dtype=torch.float64), atol=1e-15)
    m2, lv2 = torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    p = torch.distributions.Normal(m, torch.exp(0.5 * lv))
    q = torch.distributions.Normal(m2, torch.exp(0.5 * lv2))
    torch.testing.assert_close(normal_kl(m, lv, m2, lv2), torch.distributions.kl_divergence(p, q))
    # scalars broadcast
    torch.testing.assert_close(
        normal_kl(m, lv, 0.0, 0.0), torch.distributions.kl_divergence(p, torch.distributions.Normal(0.0, 1.0))
    )


def test_q_sample_moments():
    d = make()
    torch.manual_seed(0)
    n = 100_000
    x0 = torch.full((n, 1), 0.7)
    for t in (0, 10, 49):
        xt = d.q_sample(x0, torch.full((n,), t))
        ab = alpha_bar()[t]
        se_mean = math.sqrt((1 - ab) / n)
        assert abs(xt.mean().item() - math.sqrt(ab) * 0.7) < 5 * se_mean
        assert abs(xt.var().item() - (1 - ab)) < 5 * (1 - ab) * math.sqrt(2 / n)


def test_q_mean_variance_closed_form():
    d = make()
    x0 = torch.randn(3, 2, 4)
    t = torch.tensor([0, 25, 49])
    mean, var, logvar = d.q_mean_variance(x0, t)
    ab = torch.tensor(alpha_bar()[t.numpy()], dtype=torch.float64).view(-1, 1, 1)
    torch.testing.assert_close(mean.double(), ab.sqrt() * x0.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(var.double(), (1 - ab).expand(3, 2, 4), rtol=1e-6, atol=0)
    torch.testing.assert_close(logvar.double(), torch.log(1 - ab).expand(3, 2, 4), rtol=1e-6, atol=0)


def test_posterior_is_bayes_rule_for_gaussians():
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): precision-weighted combination."""
    d = make()
    ab = alpha_bar()
    x0 = torch.randn(4, 3, dtype=torch.float64)
    xt = torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor([1, 5, 30, 49])
    mean, var, logvar = d.q_posterior_mean_variance(x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        beta, ab_prev = BETAS[ti], ab[ti - 1]
        prec = 1 / (1 - ab_prev) + (1 - beta) / beta
        post_var = 1 / prec
        post_mean = post_var * (
            math.sqrt(ab_prev) * x0[i] / (1 - ab_prev) + math.sqrt(1 - beta) * xt[i] / beta
        )
        torch.testing.assert_close(mean[i], post_mean, rtol=1e-5, atol=1e-6)
        assert var[i, 0].item() == pytest.approx(post_var, rel=1e-6)
        assert logvar[i, 0].item() == pytest.approx(math.log(post_var), rel=1e-6)
    # t = 0: the posterior is a point mass at x_0, its log-variance clipped to log β̃_1.
    mean0, var0, logvar0 = d.q_posterior_mean_variance(x0, xt, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(mean0, x0, rtol=1e-6, atol=1e-7)
    assert (var0 == 0).all()
    beta1, ab0 = BETAS[1], ab[0]
    assert logvar0[0, 0].item() == pytest.approx(math.log(beta1 * (1 - ab0) / (1 - ab[1])), rel=1e-6)


def test_prior_bpd_closed_form():
    d = make()
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    ab = alpha_bar()[-1]
    m = math.sqrt(ab) * x0.double()
    kl = 0.5 * (-1 - math.log(1 - ab) + (1 - ab) + m**2)
    expected = kl.mean(dim=(1, 2, 3)) / math.log(2)
    torch.testing.assert_close(d._prior_bpd(x0).double(), expected, rtol=1e-5, atol=1e-9)


def test_discretized_likelihood_is_a_distribution_over_256_bins():
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in ((0.1, -1.0), (-0.9, -3.0), (0.999, -0.5)):
        means = torch.full_like(bins, mean)
        logp = discretized_gaussian_log_likelihood(
            bins, means=means, log_scales=torch.full_like(bins, log_scale)
        )
        assert torch.exp(logp).sum().item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        discretized_gaussian_log_likelihood(bins, means=bins[:3], log_scales=bins)


def test_learned_range_interpolates_between_clipped_posterior_and_beta():
    d = make(var=ModelVarType.LEARNED_RANGE)
    x = torch.zeros(3, 1, 2)
    t = torch.tensor([0, 20, 49])
    for v, expected in ((-1.0, d.posterior_log_variance_clipped), (1.0, np.log(d.betas))):
        out = d.p_mean_variance(lambda x, t, v=v: torch.cat([x, torch.full_like(x, v)], 1), x, t)
        assert torch.equal(
            out["log_variance"][:, 0, 0], torch.tensor(expected[t.numpy()], dtype=torch.float32)
        )
    out = d.p_mean_variance(lambda x, t: torch.cat([x, torch.zeros_like(x)], 1), x, t)
    mid = 0.5 * (d.posterior_log_variance_clipped + np.log(d.betas))[t.numpy()]
    torch.testing.assert_close(out["log_variance"][:, 0, 0].double(), torch.tensor(mid), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["variance"], torch.exp(out["log_variance"]))


def test_learned_range_uses_the_respaced_process_betas():
    d = create_gaussian_diffusion(
        steps=100, learn_sigma=True, noise_schedule="cosine", timestep_respacing="10"
    )
    t = torch.arange(10)
    out = d.p_mean_variance(lambda x, t: torch.cat([x, torch.ones_like(x)], 1), torch.zeros(10, 1, 1), t)
    assert torch.equal(out["log_variance"][:, 0, 0], torch.tensor(np.log(d.betas), dtype=torch.float32))
    full = create_gaussian_diffusion(steps=100, noise_schedule="cosine")
    assert not np.allclose(d.betas, full.betas[d.timestep_map])  # really different βs


def test_fixed_variances_and_their_first_entry():
    x = torch.zeros(2, 1, 3)
    t = torch.tensor([0, 7])
    large = make(var=ModelVarType.FIXED_LARGE).p_mean_variance(lambda x, t: x, x, t)
    small = make(var=ModelVarType.FIXED_SMALL).p_mean_variance(lambda x, t: x, x, t)
    d = make()
    assert large["variance"][0, 0, 0].item() == np.float32(d.posterior_variance[1])  # β̃_1 at t = 0
    assert large["variance"][1, 0, 0].item() == np.float32(BETAS[7])
    assert large["log_variance"][0, 0, 0].item() == np.float32(np.log(d.posterior_variance[1]))
    assert small["variance"][0, 0, 0].item() == 0.0
    assert small["log_variance"][0, 0, 0].item() == np.float32(np.log(d.posterior_variance[1]))
    assert small["variance"][1, 0, 0].item() == np.float32(d.posterior_variance[7])


@pytest.mark.parametrize("mean_type", list(ModelMeanType))
def test_each_mean_type_recovers_x0_from_a_perfect_model(mean_type):
    d = make(mean=mean_type, var=ModelVarType.FIXED_SMALL)
    torch.manual_seed(0)
    x0 = torch.rand(4, 2, 3, dtype=torch.float64) * 1.8 - 0.9
    t = torch.tensor([0, 1, 20, 49])
    noise = torch.randn_like(x0)
    xt = d.q_sample(x0, t, noise)
    perfect = {
        ModelMeanType.EPSILON: noise,
        ModelMeanType.START_X: x0,
        ModelMeanType.PREVIOUS_X: d.q_posterior_mean_variance(x0, xt, t)[0],
    }[mean_type]
    out = d.p_mean_variance(lambda x, t: perfect, xt, t, clip_denoised=False)
    torch.testing.assert_close(out["pred_xstart"], x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["mean"], d.q_posterior_mean_variance(x0, xt, t)[0], rtol=1e-4, atol=1e-4)
    assert torch.all(d.training_losses(lambda x, t: perfect, x0, t, noise=noise)["mse"] < 1e-10)


def test_clip_denoised_clamps_pred_xstart():
    d = make(mean=ModelMeanType.START_X, var=ModelVarType.FIXED_LARGE)
    x = torch.zeros(1, 1, 4)
    big = lambda x, t: torch.tensor([[[-3.0, -0.5, 0.5, 3.0]]])  # noqa: E731
    t = torch.tensor([10])
    assert d.p_mean_variance(big, x, t)["pred_xstart"].tolist() == [[[-1.0, -0.5, 0.5, 1.0]]]
    assert d.p_mean_variance(big, x, t, clip_denoised=False)["pred_xstart"].tolist() == [
        [[-3.0, -0.5, 0.5, 3.0]]
    ]
    doubled = d.p_mean_variance(big, x, t, denoised_fn=lambda x0: x0 / 4)["pred_xstart"]
    assert doubled.tolist() == [[[-0.75, -0.125, 0.125, 0.75]]]  # denoised_fn before the clip


def test_p_sample_adds_no_noise_at_t0_and_sigma_noise_elsewhere():
    d = make(var=ModelVarType.FIXED_LARGE)
    x = torch.randn(2, 3, 5)
    noise = torch.randn_like(x)
    t = torch.tensor([0, 30])
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    out = d.p_sample(model, x, t, noise=noise)
    mean = d.p_mean_variance(model, x, t)["mean"]
    assert torch.equal(out["sample"][0], mean[0])
    torch.testing.assert_close(out["sample"][1], mean[1] + math.sqrt(BETAS[30]) * noise[1])


def test_explicit_noise_and_generator_make_sampling_deterministic():
    d = create_gaussian_diffusion(steps=20, learn_sigma=True, noise_schedule="cosine")
    model = lambda x, t: torch.cat([torch.tanh(x), torch.zeros_like(x)], 1)  # noqa: E731
    x = torch.randn(3, 2, 4)
    t = torch.tensor([19, 5, 0])
    noise = torch.randn_like(x)
    torch.manual_seed(1)
    a = d.p_sample(model, x, t, noise=noise)["sample"]
    torch.manual_seed(2)
    b = d.p_sample(model, x, t, noise=noise)["sample"]
    assert torch.equal(a, b)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    s1 = d.p_sample_loop(model, (3, 2, 4), generator=g1)
    s2 = d.p_sample_loop(model, (3, 2, 4), generator=g2)
    assert torch.equal(s1, s2)
    step_noise = torch.randn(20, 3, 2, 4)
    x_T = torch.randn(3, 2, 4)
    assert torch.equal(
        d.ddim_sample_loop(model, (3, 2, 4), noise=x_T, eta=1.0, step_noise=step_noise),
        d.ddim_sample_loop(model, (3, 2, 4), noise=x_T, eta=1.0, step_noise=step_noise),
    )
    # DDIM with eta = 0 ignores the noise
    e0 = d.ddim_sample(model, x, t, eta=0.0, noise=noise)["sample"]
    assert torch.equal(e0, d.ddim_sample(model, x, t, eta=0.0, noise=2 * noise)["sample"])


def test_ddim_eta1_matches_ddpm_posterior_variance():
    """With eta = 1, DDIM's σ_t² equals the posterior variance β̃_t (Song et al.)."""
    d = make(var=ModelVarType.FIXED_SMALL)
    x = torch.randn(2, 1, 3, dtype=torch.float64)
    t = torch.tensor([10, 40])
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    noise = torch.randn_like(x)
    a = d.ddim_sample(model, x, t, eta=1.0, noise=noise)["sample"]
    b = d.ddim_sample(model, x, t, eta=1.0, noise=torch.zeros_like(x))["sample"]
    sigma = ((a - b) / noise)[:, 0, 0]
    torch.testing.assert_close(sigma**2, torch.tensor(d.posterior_variance[[10, 40]]), rtol=1e-5, atol=0)


def test_ddim_reverse_inverts_ddim_for_a_consistent_model():
    d = make(var=ModelVarType.FIXED_SMALL)
    x0 = torch.rand(2, 3, dtype=torch.float64) * 1.6 - 0.8
    eps = torch.randn_like(x0)
    model = lambda x, t: eps  # noqa: E731  (always predicts the same ε, so x_0 is the same)
    t = torch.tensor([10, 10])
    xt = d.q_sample(x0, t, eps)
    nxt = d.ddim_reverse_sample(model, xt, t, clip_denoised=False)["sample"]
    back = d.ddim_sample(model, nxt, t + 1, clip_denoised=False)["sample"]
    torch.testing.assert_close(back, xt, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="eta: the reverse DDIM ODE is deterministic"):
        d.ddim_reverse_sample(model, xt, t, eta=0.5)
