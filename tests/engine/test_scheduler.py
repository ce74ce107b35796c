"""IDDPMScheduler (diffusers conventions) on CPU, with or without diffusers installed: a
diffusers-style loop gives our sampler's samples with the same model, x_T and noise; timesteps,
add_noise, from_diffusion, from_improved_diffusion, errors. (Parity with diffusers'
DDPMScheduler and its config/save machinery: test_scheduler_diffusers.py.)"""

import numpy as np
import pytest
import torch

import iddpm_ext.core.sampling as sampling_mod
from helpers.engine_cases import tiny_model
from iddpm_ext import create_gaussian_diffusion, get_named_beta_schedule, ops, space_timesteps
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
    sched = IDDPMScheduler.from_improved_diffusion(
        diffusion_steps=100,
        noise_schedule=schedule,
        learn_sigma=True,
        rescale_timesteps=rescale,
        timestep_spacing="respace",
    )
    sched.set_timesteps(10)
    x_T = torch.randn(SHAPE)
    ours = _diffusers_loop(sched, model, x_T, generator=torch.Generator().manual_seed(1))
    ref = d.p_sample_loop(model, SHAPE, noise=x_T, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ours, ref)


def test_global_rng_noise_matches_loop_without_generator(model):
    d = create_gaussian_diffusion(steps=100, learn_sigma=True, timestep_respacing="8")
    sched = IDDPMScheduler.from_improved_diffusion(
        diffusion_steps=100, learn_sigma=True, rescale_timesteps=False
    )
    sched.set_timesteps("8")  # a string: the reference's section counts, whatever the spacing
    torch.manual_seed(21)
    ours = _diffusers_loop(sched, model, torch.randn(SHAPE))
    torch.manual_seed(21)
    ref = d.p_sample_loop(model, SHAPE)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_matches_ddim_sample_loop(model, eta):
    d = create_gaussian_diffusion(steps=100, learn_sigma=True, timestep_respacing="ddim10")
    sched = IDDPMScheduler.from_improved_diffusion(
        diffusion_steps=100, learn_sigma=True, rescale_timesteps=False, sampler="ddim", eta=eta
    )
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
    sched = IDDPMScheduler.from_improved_diffusion(
        diffusion_steps=50, learn_sigma=True, rescale_timesteps=False, timestep_spacing="respace"
    )
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
    sched = IDDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", timestep_spacing="respace"
    )
    assert sched.timesteps.tolist() == list(range(999, -1, -1)) and len(sched) == 1000
    assert sched.num_inference_steps is None
    sched.set_timesteps(50)
    expected = sorted(space_timesteps(1000, "50"), reverse=True)
    assert sched.timesteps.tolist() == expected and sched.timesteps.dtype == torch.long
    assert sched.num_inference_steps == 50
    sched.set_timesteps("ddim25", device="cpu")
    assert sched.timesteps.tolist() == sorted(space_timesteps(1000, "ddim25"), reverse=True)
    sched.set_timesteps(timesteps=[999, 500, 0])
    assert sched.timesteps.tolist() == [999, 500, 0]
    assert sched.config.num_train_timesteps == 1000 and sched.config.variance_type == "fixed_small"
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
    sched = IDDPMScheduler.from_diffusion(full, timestep_spacing="respace")
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
        IDDPMScheduler(100, variance_type="fixed_medium")
    with pytest.raises(ValueError, match=r"prediction_type: expected one of"):
        IDDPMScheduler(100, prediction_type="v_prediction")
    with pytest.raises(ValueError, match=r"sampler: expected one of"):
        IDDPMScheduler(100, sampler="euler")
    with pytest.raises(ValueError, match=r"trained_betas: expected 100 values"):
        IDDPMScheduler(100, trained_betas=[0.1] * 10)
    with pytest.raises(ValueError, match=r"beta_schedule: expected one of"):
        IDDPMScheduler(100, beta_schedule="laplace")
    with pytest.raises(ValueError, match=r"num_train_timesteps: expected a positive int"):
        IDDPMScheduler(0)
    # DDPMScheduler options this scheduler cannot honour are refused by name
    refused = {
        "thresholding": True,
        "clip_sample_range": 2.0,
        "rescale_betas_zero_snr": True,
        "variance_type": "fixed_large_log",
    }
    for name, value in refused.items():
        with pytest.raises(ValueError, match=rf"{name}: .*got {value!r}"):
            IDDPMScheduler(100, **{name: value})
    IDDPMScheduler(100, clip_sample=False, clip_sample_range=2.0)  # the range is unused then
    IDDPMScheduler(100, dynamic_thresholding_ratio=0.9, sample_max_value=3.0)  # used only with thresholding
    with pytest.raises(ValueError, match=r"timestep_spacing: expected one of"):
        IDDPMScheduler(100, timestep_spacing="karras")
    with pytest.raises(ValueError, match=r"steps_offset: expected an int >= 0"):
        IDDPMScheduler(100, steps_offset=-1)
    sched = IDDPMScheduler(100, variance_type="learned_range")
    with pytest.raises(ValueError, match=r"num_inference_steps: expected an int in \[1, 100\], got 101"):
        sched.set_timesteps(101)
    with pytest.raises(ValueError, match=r"give num_inference_steps or timesteps, not both"):
        sched.set_timesteps(10, timesteps=[5, 0])
    with pytest.raises(ValueError, match=r"timesteps: expected strictly descending values in \[0, 100\)"):
        sched.set_timesteps(timesteps=[0, 5])
    with pytest.raises(ValueError, match=r"timesteps: expected strictly descending"):
        sched.set_timesteps(timesteps=[100, 5])
    with pytest.raises(
        ValueError,
        match=r"steps_offset=1 gives 100 timesteps from 1 to 100",
    ):
        IDDPMScheduler(100, steps_offset=1).set_timesteps(100)
    with pytest.raises(ValueError, match=r"generator: expected one generator or a list of 2, got 3"):
        sched.set_timesteps(10)
        sched.step(torch.randn(2, 6, 8, 8), int(sched.timesteps[0]), torch.randn(SHAPE), generator=[None] * 3)
    sched = IDDPMScheduler(100, variance_type="learned_range")
    sched.set_timesteps(10)
    x = torch.randn(SHAPE)
    out = torch.randn(2, 6, 8, 8)
    with pytest.raises(ValueError, match=r"timestep: expected one of the scheduler's timesteps"):
        sched.step(out, 55, x)  # 55 is not one of the 10 kept timesteps
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


def test_from_improved_diffusion_is_the_flags_diffusion():
    for T, schedule in [(4000, "linear"), (100, "linear"), (4000, "cosine")]:
        sched = IDDPMScheduler.from_improved_diffusion(diffusion_steps=T, noise_schedule=schedule)
        np.testing.assert_array_equal(sched.base.betas, get_named_beta_schedule(schedule, T))  # bit for bit
        assert sched.config.variance_type == "fixed_large" and sched.config.rescale_timesteps
    kinds = [
        (dict(learn_sigma=True), "learned_range", "epsilon"),
        (dict(sigma_small=True), "fixed_small", "epsilon"),
        (dict(predict_xstart=True), "fixed_large", "sample"),
    ]
    for flags, variance, prediction in kinds:
        sched = IDDPMScheduler.from_improved_diffusion(**flags)
        assert (sched.config.variance_type, sched.config.prediction_type) == (variance, prediction)
    with pytest.raises(ValueError, match=r"flags: unknown names \['diffusion_step'\]"):
        IDDPMScheduler.from_improved_diffusion(diffusion_step=10)
    with pytest.raises(ValueError, match=r"noise_schedule: expected 'linear' or 'cosine'"):
        IDDPMScheduler.from_improved_diffusion(noise_schedule="sqrt")


def test_betas_alphas_and_schedules():
    sched = IDDPMScheduler(50, beta_start=0.001, beta_end=0.05)
    expected = np.linspace(0.001, 0.05, 50)
    np.testing.assert_array_equal(sched.base.betas, expected)
    assert sched.betas.dtype == torch.float32 and sched.alphas_cumprod.shape == (50,)
    torch.testing.assert_close(sched.alphas, torch.tensor(1 - expected, dtype=torch.float32))
    torch.testing.assert_close(
        sched.alphas_cumprod, torch.tensor(np.cumprod(1 - expected), dtype=torch.float32)
    )
    scaled = IDDPMScheduler(50, beta_start=0.001, beta_end=0.05, beta_schedule="scaled_linear")
    np.testing.assert_allclose(scaled.base.betas, np.linspace(0.001**0.5, 0.05**0.5, 50) ** 2, rtol=1e-15)
    sigmoid = IDDPMScheduler(50, beta_start=0.001, beta_end=0.05, beta_schedule="sigmoid")
    s = 1 / (1 + np.exp(-np.linspace(-6, 6, 50)))
    np.testing.assert_allclose(sigmoid.base.betas, s * 0.049 + 0.001, rtol=1e-12)
    cos = IDDPMScheduler(50, beta_schedule="cosine")
    np.testing.assert_array_equal(cos.base.betas, get_named_beta_schedule("cosine", 50))
    trained = IDDPMScheduler(3, trained_betas=np.array([0.1, 0.2, 0.3]))
    assert trained.config.trained_betas == [0.1, 0.2, 0.3]  # stored as a list (JSON)


def test_spacings_and_previous_timestep():
    sched = IDDPMScheduler(1000)
    sched.set_timesteps(20)  # "leading", as DDPMScheduler
    assert sched.timesteps.tolist() == list(range(950, -1, -50))
    assert sched.previous_timestep(950) == 900 and sched.previous_timestep(0) == -1
    prev = sched.previous_timestep(torch.tensor(50))
    assert torch.is_tensor(prev) and prev.item() == 0
    with pytest.raises(ValueError, match=r"timestep: expected one of the scheduler's timesteps"):
        sched.previous_timestep(949)
    with pytest.raises(ValueError, match=r"timestep: expected one timestep, got shape \(2,\)"):
        sched.previous_timestep(torch.tensor([950, 900]))
    trailing = IDDPMScheduler(1000, timestep_spacing="trailing")
    trailing.set_timesteps(20)
    assert trailing.timesteps.tolist() == list(range(999, 0, -50))
    linspace = IDDPMScheduler(1000, timestep_spacing="linspace")
    linspace.set_timesteps(4)
    assert linspace.timesteps.tolist() == [999, 666, 333, 0]
    offset = IDDPMScheduler(1000, steps_offset=1)
    offset.set_timesteps(4)
    assert offset.timesteps.tolist() == [751, 501, 251, 1]
    respace = IDDPMScheduler(1000, timestep_spacing="respace")
    respace.set_timesteps(20)
    assert respace.timesteps.tolist() == sorted(space_timesteps(1000, "20"), reverse=True)
    sched.set_timesteps(timesteps=torch.tensor([900, 20, 3]))
    assert sched.custom_timesteps and sched.num_inference_steps == 3
    assert sched.previous_timestep(20) == 3 and sched.previous_timestep(3) == -1


def test_learned_variance_types(model):
    """learned_log is improved-diffusion's LEARNED (log σ² output, from_diffusion's name);
    learned is diffusers' meaning (σ² output): the same step for exp of the same values."""
    from iddpm_ext import GaussianDiffusion, LossType, ModelMeanType, ModelVarType

    betas = create_gaussian_diffusion(steps=40, noise_schedule="cosine").betas
    d = GaussianDiffusion(
        betas=betas,
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=ModelVarType.LEARNED,
        loss_type=LossType.MSE,
    )
    sched = IDDPMScheduler.from_diffusion(d)
    assert sched.config.variance_type == "learned_log"
    x, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    eps, log_var = torch.randn(SHAPE), torch.rand(SHAPE) * -4.0
    out = torch.cat([eps, log_var], dim=1)
    ref = d.p_sample(lambda *_: out, x, torch.full((2,), 17), noise=noise)
    mine = sched.step(out, 17, x, variance_noise=noise)
    torch.testing.assert_close(mine.prev_sample, ref["sample"], rtol=1e-6, atol=1e-6)
    learned = IDDPMScheduler(40, beta_schedule="cosine", variance_type="learned")
    theirs = learned.step(torch.cat([eps, log_var.exp()], dim=1), 17, x, variance_noise=noise)
    torch.testing.assert_close(theirs.prev_sample, mine.prev_sample, rtol=1e-6, atol=1e-6)


def test_generator_lists_and_other_devices_draw_explicit_noise():
    sched = IDDPMScheduler(100, variance_type="learned_range")
    sched.set_timesteps(10)
    x, out = torch.randn(SHAPE), torch.randn(2, 6, 8, 8)
    t = int(sched.timesteps[2])
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    noise = torch.cat([torch.randn((1, 3, 8, 8), generator=torch.Generator().manual_seed(s)) for s in (1, 2)])
    listed = sched.step(out, t, x, generator=gens).prev_sample
    assert torch.equal(listed, sched.step(out, t, x, variance_noise=noise).prev_sample)
    # one generator on the sample's device: in-kernel noise, reproducible from its seed
    a = sched.step(out, t, x, generator=torch.Generator().manual_seed(3)).prev_sample
    b = sched.step(out, t, x, generator=torch.Generator().manual_seed(3)).prev_sample
    assert torch.equal(a, b) and not torch.equal(a, listed)


FALLBACK = """
import json, os, sys, tempfile
sys.modules["diffusers"] = None  # as if not installed: importing it raises ImportError
import torch
from iddpm_ext import IDDPMScheduler
from iddpm_ext.engine import scheduler as mod
assert not mod.HAVE_DIFFUSERS and "diffusers" not in type(IDDPMScheduler).__module__
config = json.loads(sys.argv[1])
a = IDDPMScheduler.from_config(config)
assert a.config.variance_type == "learned_range" and a.config["timestep_spacing"] == "trailing"
b = IDDPMScheduler(**config)
assert dict(b.config) == dict(a.config)
folder = tempfile.mkdtemp()
a.save_pretrained(folder)
c = IDDPMScheduler.from_pretrained(folder)
assert dict(c.config) == dict(a.config)
c.set_timesteps(5)
x = torch.randn(2, 3, 4, 4)
out = c.step(torch.randn(2, 6, 4, 4), c.timesteps[0], x, variance_noise=torch.zeros_like(x))
prev, pred = c.step(torch.randn(2, 6, 4, 4), c.timesteps[0], x, return_dict=False)
assert out[0] is out.prev_sample and prev.shape == pred.shape == x.shape
print(json.dumps(c.timesteps.tolist()))
"""


@pytest.mark.slow
def test_works_without_diffusers():
    """Without diffusers: the same class and API over a stand-in config (from_config of a
    DDPMScheduler-style config with diffusers' bookkeeping keys, save/from_pretrained)."""
    import json
    import subprocess
    import sys

    config = dict(
        num_train_timesteps=100,
        beta_start=0.0001,
        variance_type="learned_range",
        timestep_spacing="trailing",
        _class_name="DDPMScheduler",
        _use_default_values=["beta_start"],
    )
    run = subprocess.run(
        [sys.executable, "-c", FALLBACK, json.dumps(config)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    here = IDDPMScheduler(100, variance_type="learned_range", timestep_spacing="trailing")
    here.set_timesteps(5)
    assert json.loads(run.stdout.strip().splitlines()[-1]) == here.timesteps.tolist()
