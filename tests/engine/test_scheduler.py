"""IDDPMScheduler (diffusers conventions) on CPU: a diffusers-style loop gives our sampler's
samples with the same model, x_T and noise; timesteps, add_noise, from_diffusion, errors."""

import numpy as np
import pytest
import torch

import iddpm_ext.core.sampling as sampling_mod
from helpers.engine_cases import tiny_model
from iddpm_ext import create_gaussian_diffusion, ops, space_timesteps
from iddpm_ext.engine.scheduler import IDDPMScheduler, IDDPMSchedulerOutput

pytestmark = pytest.mark.kernels

SHAPE = (2, 3, 8, 8)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=5)


def _diffusers_loop(sched, model, x, generator=None, **step_kwargs):
    """The loop a diffusers user writes."""
    x = x * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            out = model(sched.scale_model_input(x, t), sched.model_timesteps(t))
            x = sched.step(out, t, x, generator=generator, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_diffusers_loop_matches_p_sample_loop(model, schedule, rescale):
    d = create_gaussian_diffusion(
        steps=100,
        learn_sigma=True,
        noise_schedule=schedule,
        rescale_timesteps=rescale,
        timestep_respacing="10",
    )
    sched = IDDPMScheduler(
        num_train_timesteps=100,
        beta_schedule=schedule,
        variance_type="learned_range",
        rescale_timesteps=rescale,
    )
    sched.set_timesteps(10)
    x_T = torch.randn(SHAPE)
    ours = _diffusers_loop(sched, model, x_T, generator=torch.Generator().manual_seed(1))
    ref = d.p_sample_loop(model, SHAPE, noise=x_T, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ours, ref)


def test_global_rng_noise_matches_loop_without_generator(model):
    d = create_gaussian_diffusion(steps=100, learn_sigma=True, timestep_respacing="8")
    sched = IDDPMScheduler(100, variance_type="learned_range")
    sched.set_timesteps(8)
    torch.manual_seed(21)
    ours = _diffusers_loop(sched, model, torch.randn(SHAPE))
    torch.manual_seed(21)
    ref = d.p_sample_loop(model, SHAPE)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_matches_ddim_sample_loop(model, eta):
    d = create_gaussian_diffusion(steps=100, learn_sigma=True, timestep_respacing="ddim10")
    sched = IDDPMScheduler(100, variance_type="learned_range", sampler="ddim", eta=eta)
    sched.set_timesteps("ddim10")
    x_T = torch.randn(SHAPE)
    ours = _diffusers_loop(sched, model, x_T, generator=torch.Generator().manual_seed(2))
    ref = d.ddim_sample_loop(model, SHAPE, noise=x_T, eta=eta, generator=torch.Generator().manual_seed(2))
    assert torch.equal(ours, ref)
    # eta given to step() overrides the constructor's
    other = _diffusers_loop(sched, model, x_T, generator=torch.Generator().manual_seed(2), eta=eta + 0.3)
    assert not torch.equal(other, ours)


def test_step_runs_the_fused_op_and_returns_both_fields(model, monkeypatch):
    d = create_gaussian_diffusion(steps=50, learn_sigma=True, timestep_respacing="5")
    sched = IDDPMScheduler(50, variance_type="learned_range")
    sched.set_timesteps(5)
    calls = []
    real = ops.p_sample_step

    def counting(*args, **kwargs):
        calls.append(kwargs.get("return_pred_xstart", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling_mod.ops, "p_sample_step", counting)
    x = torch.randn(SHAPE)
    t = sched.timesteps[1]
    noise = torch.randn(SHAPE)
    with torch.no_grad():
        out = model(x, t)
        res = sched.step(out, t, x, variance_noise=noise)
        prev, pred = sched.step(out, int(t), x, variance_noise=noise, return_dict=False)
        assert calls == [True, True]  # each step is one fused op, writing pred_x0 too
        ref = d.p_sample(model, x, torch.full((2,), 3), noise=noise)
    assert isinstance(res, IDDPMSchedulerOutput)
    assert torch.equal(res.prev_sample, ref["sample"]) and torch.equal(prev, ref["sample"])
    assert torch.equal(res.pred_original_sample, ref["pred_xstart"])
    assert torch.equal(pred, ref["pred_xstart"]) and pred.abs().max() <= 1.0


def test_timesteps_follow_our_respacing():
    sched = IDDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    assert sched.timesteps.tolist() == list(range(999, -1, -1)) and len(sched) == 1000
    sched.set_timesteps(50)
    expected = sorted(space_timesteps(1000, "50"), reverse=True)
    assert sched.timesteps.tolist() == expected and sched.timesteps.dtype == torch.long
    assert sched.num_inference_steps == 50
    sched.set_timesteps("ddim25", device="cpu")
    assert sched.timesteps.tolist() == sorted(space_timesteps(1000, "ddim25"), reverse=True)
    sched.set_timesteps(timesteps=[999, 500, 0])
    assert sched.timesteps.tolist() == [999, 500, 0]
    assert sched.config.num_train_timesteps == 1000 and sched.config.variance_type == "learned_range"
    assert sched.order == 1 and sched.init_noise_sigma == 1.0
    x = torch.randn(SHAPE)
    assert sched.scale_model_input(x, 5) is x


def test_model_timesteps_rescaling():
    sched = IDDPMScheduler(4000, beta_schedule="cosine", rescale_timesteps=True)
    assert sched.model_timesteps(torch.tensor(2000)).item() == 500.0
    plain = IDDPMScheduler(4000, beta_schedule="cosine")
    t = torch.tensor(2000)
    assert plain.model_timesteps(t) is t


def test_add_noise_is_q_sample():
    d = create_gaussian_diffusion(steps=100, noise_schedule="cosine")
    sched = IDDPMScheduler(100, beta_schedule="cosine")
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    t = torch.tensor([0, 99])
    assert torch.equal(sched.add_noise(x0, noise, t), d.q_sample(x0, t, noise))
    assert torch.equal(sched.add_noise(x0, noise, 40), d.q_sample(x0, torch.tensor([40, 40]), noise))


def test_from_diffusion(model):
    full = create_gaussian_diffusion(steps=60, learn_sigma=True, noise_schedule="linear")
    sched = IDDPMScheduler.from_diffusion(full)
    assert sched.config.variance_type == "learned_range" and sched.config.prediction_type == "epsilon"
    np.testing.assert_allclose(sched.base.betas, full.betas, rtol=1e-12)
    sched.set_timesteps(6)
    d = create_gaussian_diffusion(steps=60, learn_sigma=True, timestep_respacing="6")
    x_T = torch.randn(SHAPE)
    ours = _diffusers_loop(sched, model, x_T, generator=torch.Generator().manual_seed(3))
    ref = d.p_sample_loop(model, SHAPE, noise=x_T, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"diffusion: a respaced diffusion"):
        IDDPMScheduler.from_diffusion(d)


def test_errors(model):
    with pytest.raises(ValueError, match=r"variance_type: expected one of"):
        IDDPMScheduler(100, variance_type="fixed_small_log")
    with pytest.raises(ValueError, match=r"prediction_type: expected one of"):
        IDDPMScheduler(100, prediction_type="v_prediction")
    with pytest.raises(ValueError, match=r"sampler: expected one of"):
        IDDPMScheduler(100, sampler="euler")
    with pytest.raises(ValueError, match=r"trained_betas: expected 100 values"):
        IDDPMScheduler(100, trained_betas=[0.1] * 10)
    sched = IDDPMScheduler(100, variance_type="learned_range")
    sched.set_timesteps(10)
    x = torch.randn(SHAPE)
    out = torch.randn(2, 6, 8, 8)
    with pytest.raises(ValueError, match=r"timestep: expected one of the scheduler's timesteps"):
        sched.step(out, 50, x)  # 50 is not one of the 10 kept timesteps
    with pytest.raises(ValueError, match=r"eta: ancestral sampling has no eta"):
        sched.step(out, int(sched.timesteps[0]), x, eta=0.3)
    with pytest.raises(ValueError, match=r"model_output: expected shape \(2, 6, 8, 8\)"):
        sched.step(torch.randn(2, 3, 8, 8), int(sched.timesteps[0]), x)
    with pytest.raises(ValueError, match=r"timestep: expected a scalar or 2 values"):
        sched.step(out, sched.timesteps[:3], x)
    with pytest.raises(ValueError, match=r"sample: expected a tensor"):
        sched.step(out, 0, torch.randn(3))


def test_device_lookup_matches_host_lookup():
    """The no-sync lookup used for CUDA timesteps gives the host lookup's indices."""
    sched = IDDPMScheduler(1000)
    sched.set_timesteps(37)
    ts = sched.timesteps
    on_device = sched._device_index(ts, torch.device("cpu"))
    assert on_device.tolist() == [sched._index[int(t)] for t in ts]
    assert on_device.tolist() == list(range(36, -1, -1))
