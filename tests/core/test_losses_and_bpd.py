"""Training-loss composition per loss type, the stop-gradient of the hybrid loss, and calc_bpd_loop."""

import math

import numpy as np
import pytest
import torch

from iddpm_ext import GaussianDiffusion, LossType, ModelMeanType, ModelVarType, get_named_beta_schedule

T = 30
BETAS = get_named_beta_schedule("cosine", T)


def make(loss, var=ModelVarType.LEARNED_RANGE, mean=ModelMeanType.EPSILON):
    return GaussianDiffusion(betas=BETAS, model_mean_type=mean, model_var_type=var, loss_type=loss)


class Net(torch.nn.Module):
    def __init__(self, out_ch):
        super().__init__()
        self.conv = torch.nn.Conv1d(2, out_ch, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x) + 0.01 * t.float().view(-1, 1, 1)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 2, 8, generator=g) * 2 - 1
    noise = torch.randn(4, 2, 8, generator=g)
    t = torch.tensor([0, 1, 15, 29])
    return x0, noise, t


def test_loss_composition_per_type(batch):
    x0, noise, t = batch
    torch.manual_seed(0)
    net = Net(4)
    mse = make(LossType.MSE).training_losses(net, x0, t, noise=noise)
    rescaled = make(LossType.RESCALED_MSE).training_losses(net, x0, t, noise=noise)
    kl = make(LossType.KL).training_losses(net, x0, t, noise=noise)
    rkl = make(LossType.RESCALED_KL).training_losses(net, x0, t, noise=noise)
    assert set(mse) == {"loss", "mse", "vb"} and set(kl) == {"loss"}
    torch.testing.assert_close(mse["loss"], mse["mse"] + mse["vb"])
    torch.testing.assert_close(rescaled["vb"], mse["vb"] * T / 1000.0)
    torch.testing.assert_close(rescaled["mse"], mse["mse"])
    torch.testing.assert_close(rkl["loss"], kl["loss"] * T)
    # the vb term of the hybrid loss is the bound term itself (same as L_vlb's)
    torch.testing.assert_close(mse["vb"], kl["loss"])
    # mse is the ε-prediction error, averaged over non-batch dims
    d = make(LossType.MSE)
    out = net(d.q_sample(x0, t, noise), t)[:, :2]
    torch.testing.assert_close(mse["mse"], ((noise - out) ** 2).mean(dim=(1, 2)))
    fixed = make(LossType.MSE, var=ModelVarType.FIXED_LARGE).training_losses(Net(2), x0, t, noise=noise)
    assert set(fixed) == {"loss", "mse"} and torch.equal(fixed["loss"], fixed["mse"])


def test_vb_term_gives_no_gradient_to_the_mean(batch):
    x0, noise, t = batch
    d = make(LossType.RESCALED_MSE)
    out = torch.randn(4, 4, 8, requires_grad=True)
    terms = d.training_losses(lambda x, t: out, x0, t, noise=noise)
    (g_vb,) = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
    assert torch.all(g_vb[:, :2] == 0) and torch.any(g_vb[:, 2:] != 0)
    (g_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert torch.all(g_mse[:, 2:] == 0) and torch.any(g_mse[:, :2] != 0)


def test_vb_term_is_decoder_nll_at_t0_and_kl_elsewhere_in_bits(batch):
    x0, noise, t = batch
    d = make(LossType.KL)
    net = Net(4)
    x_t = d.q_sample(x0, t, noise)
    terms = d._vb_terms_bpd(net, x0, x_t, t, clip_denoised=False)["output"]
    out = d.p_mean_variance(net, x_t, t, clip_denoised=False)
    true_mean, _, true_logvar = d.q_posterior_mean_variance(x0, x_t, t)
    p = torch.distributions.Normal(true_mean.double(), torch.exp(0.5 * true_logvar.double()))
    q = torch.distributions.Normal(out["mean"].double(), torch.exp(0.5 * out["log_variance"].double()))
    kl_bits = torch.distributions.kl_divergence(p, q).mean(dim=(1, 2)) / math.log(2)
    torch.testing.assert_close(terms[1:].double(), kl_bits[1:], rtol=1e-4, atol=1e-6)
    # t = 0: -log of the Gaussian's mass on the 1/255-wide bin around each value (tanh-approximate CDF)
    mean0, logscale0 = out["mean"][0].double(), 0.5 * out["log_variance"][0].double()
    x = x0[0].double()
    cdf = lambda z: 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))  # noqa: E731
    inv = torch.exp(-logscale0)
    mass = cdf(inv * (x - mean0 + 1 / 255)) - cdf(inv * (x - mean0 - 1 / 255))
    assert terms[0].item() == pytest.approx(
        (-torch.log(mass.clamp(min=1e-12))).mean().item() / math.log(2), rel=1e-4
    )


def test_calc_bpd_loop_columns_and_total(batch):
    x0, _, _ = batch
    d = make(LossType.RESCALED_MSE)
    torch.manual_seed(0)
    net = Net(4)
    noise = torch.randn(T, *x0.shape)
    out = d.calc_bpd_loop(net, x0, noise=noise)
    for key in ("vb", "xstart_mse", "mse"):
        assert out[key].shape == (4, T)
    torch.testing.assert_close(out["total_bpd"], out["vb"].sum(dim=1) + out["prior_bpd"])
    # column j holds timestep T-1-j (the reference's order): check t = 0 and t = T-1
    for t_val, col in ((0, T - 1), (T - 1, 0)):
        t = torch.full((4,), t_val)
        x_t = d.q_sample(x0, t, noise[t_val])
        expected = d._vb_terms_bpd(net, x0, x_t, t, clip_denoised=True)["output"]
        torch.testing.assert_close(out["vb"][:, col], expected)
    again = d.calc_bpd_loop(net, x0, noise=noise)
    assert torch.equal(again["total_bpd"], out["total_bpd"])
    with pytest.raises(ValueError, match=r"noise: expected shape \(30, 4, 2, 8\)"):
        d.calc_bpd_loop(net, x0, noise=noise[1:])


def test_bits_are_nats_over_ln2_averaged_over_non_batch_dims():
    betas = np.linspace(0.01, 0.2, 10)
    d = GaussianDiffusion(
        betas=betas,
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=ModelVarType.FIXED_SMALL,
        loss_type=LossType.KL,
    )
    x0 = torch.zeros(2, 3, 4)
    x0[1, 0, 0] = 1.0  # one of 12 values differs: its KL is averaged over the 12 dims
    ab = np.cumprod(1 - betas)[-1]
    nats0 = 0.5 * (-1 - math.log(1 - ab) + (1 - ab))
    nats1 = nats0 + 0.5 * ab / 12
    prior = d._prior_bpd(x0)
    assert prior.tolist() == pytest.approx([nats0 / math.log(2), nats1 / math.log(2)], rel=1e-5)
