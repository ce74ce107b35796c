"""GaussianDiffusion.step: the one per-step API behind p_sample, ddim_sample,
ddim_reverse_sample, the loops, the sampling engine and the diffusers-style scheduler."""

import pytest
import torch

from iddpm_ext import create_gaussian_diffusion


def _diffusion(learn_sigma=True, **kw):
    return create_gaussian_diffusion(
        steps=50, learn_sigma=learn_sigma, noise_schedule="cosine", timestep_respacing="10", **kw
    )


class Linear(torch.nn.Module):
    def __init__(self, c, out):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(out, c, generator=g) * 0.3)

    def forward(self, x, t):
        return torch.tanh(torch.einsum("oc,nchw->nohw", self.w, x) + t.float().view(-1, 1, 1, 1) / 1000)


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=pytest.mark.kernels)])
@pytest.mark.parametrize("kind", ["ancestral", "ddim", "ddim_reverse"])
def test_step_is_what_the_reference_methods_run(kind, fused):
    d = _diffusion()
    d.use_fused = fused
    model = Linear(3, 6)
    x = torch.randn(2, 3, 4, 4)
    t = torch.tensor([7, 0])
    noise = torch.randn_like(x)
    with torch.no_grad():
        model_output = model(x, d.model_timesteps(t))
        if kind == "ancestral":
            ref = d.p_sample(model, x, t, noise=noise)
            out = d.step(kind, model_output, x, t, noise=noise, fused=fused)
        elif kind == "ddim":
            ref = d.ddim_sample(model, x, t, eta=0.5, noise=noise)
            out = d.step(kind, model_output, x, t, eta=0.5, noise=noise, fused=fused)
        else:
            ref = d.ddim_reverse_sample(model, x, t)
            out = d.step(kind, model_output, x, t, fused=fused)
    assert torch.equal(out["sample"], ref["sample"]) and torch.equal(out["pred_xstart"], ref["pred_xstart"])


@pytest.mark.kernels
def test_fused_and_eager_agree_and_pred_xstart_can_be_skipped():
    d = _diffusion()
    x = torch.randn(3, 3, 4, 4)
    mo = torch.rand(3, 6, 4, 4) * 2 - 1
    t = torch.tensor([9, 4, 0])
    noise = torch.randn_like(x)
    a = d.step("ancestral", mo, x, t, noise=noise, fused=True)
    b = d.step("ancestral", mo, x, t, noise=noise, fused=False)
    torch.testing.assert_close(a["sample"], b["sample"], rtol=1e-5, atol=1e-6)
    c = d.step("ancestral", mo, x, t, noise=noise, fused=True, pred_xstart=False)
    assert c["pred_xstart"] is None and torch.equal(c["sample"], a["sample"])


@pytest.mark.kernels
def test_per_sample_streams_do_not_depend_on_the_batch():
    d = _diffusion()
    x = torch.randn(4, 3, 4, 4)
    mo = torch.rand(4, 6, 4, 4) * 2 - 1
    t = torch.full((4,), 5)
    torch.manual_seed(3)
    whole = d.step("ancestral", mo, x, t, sample_index=torch.arange(4))["sample"]
    torch.manual_seed(3)
    part = d.step("ancestral", mo[2:], x[2:], t[2:], sample_index=2)["sample"]
    assert torch.equal(whole[2:], part)


def test_step_errors():
    d = _diffusion()
    x = torch.randn(2, 3, 4, 4)
    mo = torch.zeros(2, 6, 4, 4)
    t = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="kind: expected one of"):
        d.step("euler", mo, x, t)
    with pytest.raises(ValueError, match=r"model_output: expected shape \(2, 6, 4, 4\)"):
        d.step("ancestral", mo[:, :3], x, t)
    with pytest.raises(ValueError, match=r"t: expected timesteps in \[0, 10\), got 10"):
        d.step("ancestral", mo, x, torch.tensor([1, 10]))
    with pytest.raises(ValueError, match="eta: the reverse DDIM ODE is deterministic"):
        d.step("ddim_reverse", mo, x, t, eta=0.5)
    with pytest.raises(ValueError, match="fused: the fused step cannot run here: denoised_fn"):
        d.step("ancestral", mo, x, t, denoised_fn=lambda v: v, fused=True)
    with pytest.raises(ValueError, match="sample_index: per-sample noise streams"):
        d.step("ancestral", mo, x, t, sample_index=0, fused=False)


@pytest.mark.kernels
def test_channels_last_results_keep_the_layout_without_a_prediction():
    d = _diffusion()
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    mo = (torch.rand(2, 6, 4, 5) * 2 - 1).to(memory_format=torch.channels_last)
    noise = torch.randn_like(x)
    t = torch.tensor([6, 0])
    for kind in ("ancestral", "ddim", "ddim_reverse"):
        n = None if kind == "ddim_reverse" else noise
        a = d.step(kind, mo, x, t, noise=n, fused=True)
        b = d.step(kind, mo, x, t, noise=n, fused=False)
        assert a["sample"].stride() == b["sample"].stride() == x.stride()
        assert a["pred_xstart"].stride() == b["pred_xstart"].stride()
        torch.testing.assert_close(a["sample"], b["sample"], rtol=1e-5, atol=1e-6)
    assert d._layout_cache == {}  # the kernel's layout was known to be the eager one


def test_loops_take_step_noise_as_a_callable():
    d = _diffusion(learn_sigma=False)
    model = Linear(3, 3)
    shape = (2, 3, 4, 4)
    x_T = torch.randn(shape)
    table = torch.randn(d.num_timesteps, *shape)
    seen = []

    def noise_at(t):
        seen.append(t)
        return table[t]

    a = d.p_sample_loop(model, shape, noise=x_T, step_noise=table)
    b = d.p_sample_loop(model, shape, noise=x_T, step_noise=noise_at)
    assert torch.equal(a, b) and seen == list(range(d.num_timesteps))[::-1]
    with pytest.raises(ValueError, match="step_noise: expected shape"):
        d.p_sample_loop(model, shape, step_noise=table[1:])


def test_model_timesteps_are_what_the_model_sees():
    d = create_gaussian_diffusion(steps=40, timestep_respacing="5", rescale_timesteps=True)
    seen = []

    def model(x, ts):
        seen.append(ts)
        return torch.zeros_like(x)

    t = torch.arange(5)
    d.p_mean_variance(model, torch.zeros(5, 1, 2), t)
    assert torch.equal(seen[0], d.model_timesteps(t))
    assert d.model_timesteps(t).tolist() == [v * 1000.0 / 40 for v in d.timestep_map]
