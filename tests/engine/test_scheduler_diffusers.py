"""IDDPMScheduler against diffusers' DDPMScheduler (skipped without diffusers): the same config
keys, timesteps and previous timesteps for every spacing, the same steps to float32 rounding
for every variance and prediction type, config and save_pretrained round trips."""

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
ddpm_module = pytest.importorskip("diffusers.schedulers.scheduling_ddpm")

from diffusers import ConfigMixin, DDPMScheduler, SchedulerMixin  # noqa: E402

from iddpm_ext.engine.scheduler import IDDPMScheduler, IDDPMSchedulerOutput  # noqa: E402

pytestmark = pytest.mark.kernels

SHAPE = (2, 3, 4, 4)
# Against DDPMScheduler's arithmetic in float64: our float32 results' own rounding. Against
# DDPMScheduler in float32, whose ᾱ and coefficients are rounded to float32 (1/√ᾱ_t amplifies
# that at large t): a looser bound.
TOL = dict(rtol=1e-6, atol=1e-6)
TOL32 = dict(rtol=1e-4, atol=2e-5)


def test_is_a_diffusers_scheduler_and_takes_ddpm_configs():
    ref = DDPMScheduler()
    for sched in (IDDPMScheduler(**ref.config), IDDPMScheduler.from_config(ref.config)):
        assert isinstance(sched, SchedulerMixin) and isinstance(sched, ConfigMixin)
        for key, value in ref.config.items():
            if not key.startswith("_"):
                assert sched.config[key] == value, key
        torch.testing.assert_close(sched.betas, ref.betas)
        torch.testing.assert_close(sched.alphas, ref.alphas)
        torch.testing.assert_close(sched.alphas_cumprod, ref.alphas_cumprod)
        assert torch.equal(sched.timesteps, ref.timesteps) and sched.init_noise_sigma == ref.init_noise_sigma
    cos = DDPMScheduler(
        num_train_timesteps=300, beta_schedule="squaredcos_cap_v2", variance_type="learned_range"
    )
    ours = IDDPMScheduler.from_config(cos.config)
    assert ours.config.variance_type == "learned_range" and ours.config.num_train_timesteps == 300
    torch.testing.assert_close(ours.alphas_cumprod, cos.alphas_cumprod)
    for schedule in ("linear", "scaled_linear", "sigmoid"):
        ref = DDPMScheduler(num_train_timesteps=200, beta_start=1e-3, beta_end=0.03, beta_schedule=schedule)
        torch.testing.assert_close(IDDPMScheduler.from_config(ref.config).betas, ref.betas)


def test_save_and_from_pretrained_round_trip(tmp_path):
    sched = IDDPMScheduler(
        num_train_timesteps=400,
        beta_schedule="squaredcos_cap_v2",
        variance_type="learned_range",
        timestep_spacing="respace",
        sampler="ddim",
        eta=0.5,
    )
    sched.save_pretrained(tmp_path)
    assert (tmp_path / "scheduler_config.json").is_file()
    back = IDDPMScheduler.from_pretrained(tmp_path)
    assert {k: v for k, v in back.config.items() if not k.startswith("_")} == {
        k: v for k, v in sched.config.items() if not k.startswith("_")
    }
    back.set_timesteps(25)
    sched.set_timesteps(25)
    assert torch.equal(back.timesteps, sched.timesteps)
    # diffusers' own scheduler reads the shared keys of our config (the extra ones are ignored)
    theirs = DDPMScheduler.from_pretrained(tmp_path)
    assert theirs.config.variance_type == "learned_range"
    torch.testing.assert_close(theirs.alphas_cumprod, sched.alphas_cumprod)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_and_previous_timesteps_are_diffusers(spacing):
    cases = [(1000, 20, 0), (1000, 7, 1), (1000, 1000, 0), (100, 1, 0), (997, 11, 0), (999, 13, 0)]
    for T, n, offset in cases:
        if offset and spacing != "leading":
            continue
        ref = DDPMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
        ours = IDDPMScheduler.from_config(ref.config)
        ref.set_timesteps(n)
        if ref.timesteps.min() < 0:  # diffusers' trailing arithmetic at T = 999, n = 13
            with pytest.raises(ValueError, match=r"gives 14 timesteps from -1 to 998"):
                ours.set_timesteps(n)
            continue
        ours.set_timesteps(n)
        assert ours.timesteps.tolist() == ref.timesteps.tolist(), (T, n, offset)
        assert ours.num_inference_steps == ref.num_inference_steps
        for t in ref.timesteps[:: max(1, n // 10)].tolist() + [int(ref.timesteps[-1])]:
            assert int(ours.previous_timestep(torch.tensor(t))) == int(ref.previous_timestep(torch.tensor(t)))
    ref.set_timesteps(timesteps=[90, 40, 3])
    ours.set_timesteps(timesteps=[90, 40, 3])
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    assert [ours.previous_timestep(t) for t in (90, 40, 3)] == [40, 3, -1]


def _patched_noise(monkeypatch, noises):
    """DDPMScheduler's step draws its noise with randn_tensor: hand it ours, in order."""
    queue = list(noises)

    def fake(shape, generator=None, device=None, dtype=None, **kwargs):
        noise = queue.pop(0)
        assert tuple(noise.shape) == tuple(shape)
        return noise.to(device=device, dtype=dtype)

    monkeypatch.setattr(ddpm_module, "randn_tensor", fake)


def _in_float64(ref, ours):
    """DDPMScheduler computing in float64 from our float64 betas: its step arithmetic without
    float32 rounding, the reference our float32 results are held to."""
    ref.betas = torch.tensor(ours.base.betas, dtype=torch.float64)
    ref.alphas = 1.0 - ref.betas
    ref.alphas_cumprod = torch.cumprod(ref.alphas, dim=0)
    ref.one = torch.tensor(1.0, dtype=torch.float64)
    return ref


CASES = [
    # (variance_type, prediction_type, beta_schedule, clip_sample)
    ("learned_range", "epsilon", "squaredcos_cap_v2", True),
    ("learned_range", "sample", "linear", True),
    ("learned_range", "epsilon", "linear", False),
    ("fixed_small", "epsilon", "linear", True),
    ("fixed_small_log", "epsilon", "squaredcos_cap_v2", True),
    ("fixed_large", "sample", "scaled_linear", False),
    ("learned", "epsilon", "linear", True),
]


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("variance,prediction,schedule,clip", CASES)
def test_steps_match_ddpm_scheduler(monkeypatch, spacing, variance, prediction, schedule, clip):
    """Every step of a 10-step schedule: prev_sample and pred_original_sample from the same
    model output, x_t and noise. At a last timestep > 0 (trailing) DDPMScheduler adds noise
    and improved-diffusion does not: there the mean is compared (DDPMScheduler given zero noise)."""
    T, n = 500, 10
    ref = DDPMScheduler(
        num_train_timesteps=T,
        beta_schedule=schedule,
        variance_type=variance,
        prediction_type=prediction,
        clip_sample=clip,
        timestep_spacing=spacing,
    )
    ours = IDDPMScheduler.from_config(ref.config)
    ref64 = _in_float64(DDPMScheduler.from_config(ref.config), ours)
    for s in (ref, ref64, ours):
        s.set_timesteps(n)
    gen = torch.Generator().manual_seed(7)
    learned = variance in ("learned", "learned_range")
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        last = i == n - 1
        x = torch.randn(SHAPE, generator=gen)
        out = torch.randn((SHAPE[0], 2 * SHAPE[1], *SHAPE[2:]) if learned else SHAPE, generator=gen)
        if variance == "learned_range":
            out[:, SHAPE[1] :] = torch.rand(SHAPE, generator=gen) * 2 - 1  # the model's v in [-1, 1]
        elif variance == "learned":
            out[:, SHAPE[1] :] = torch.rand(SHAPE, generator=gen) * 0.02 + 1e-4  # σ² > 0
        noise = torch.randn(SHAPE, generator=gen)
        step_noise = torch.zeros(SHAPE) if last else noise
        _patched_noise(monkeypatch, [step_noise, step_noise.double()])
        want32 = ref.step(out, t, x)
        want = ref64.step(out.double(), t, x.double())
        got = ours.step(out, t, x, variance_noise=noise)
        assert isinstance(got, IDDPMSchedulerOutput) and got.prev_sample.dtype == torch.float32
        torch.testing.assert_close(got.prev_sample.double(), want.prev_sample, **TOL)
        torch.testing.assert_close(got.pred_original_sample.double(), want.pred_original_sample, **TOL)
        # diffusers in float32 rounds its ᾱ: within its own rounding of ours
        torch.testing.assert_close(got.prev_sample, want32.prev_sample, **TOL32)
        torch.testing.assert_close(got.pred_original_sample, want32.pred_original_sample, **TOL32)
        worst = max(worst, (got.prev_sample - want32.prev_sample).abs().max().item())
        if last:  # improved-diffusion's last step adds no noise, whatever the noise given
            again = ours.step(out, t, x, variance_noise=noise * 3)
            assert torch.equal(again.prev_sample, got.prev_sample)
        prev, pred = ours.step(out, t, x, variance_noise=noise, return_dict=False)
        assert torch.equal(prev, got.prev_sample) and torch.equal(pred, got.pred_original_sample)
    assert worst > 0 or variance != "learned_range"  # float64 vs float32 tables: not the same code


def test_a_cpu_generator_drives_the_noise_as_in_ddpm_scheduler():
    """With the same CPU generator, DDPMScheduler draws randn(shape) per step; so do we when
    the generator's device differs from the sample's, and otherwise the fused step's noise
    comes from that generator (reproducible, different numbers)."""
    ref = DDPMScheduler(num_train_timesteps=100, variance_type="learned_range")
    ours = IDDPMScheduler.from_config(ref.config)
    ref.set_timesteps(5)
    ours.set_timesteps(5)
    t = ref.timesteps[1]
    x, out = torch.randn(SHAPE), torch.randn(SHAPE[0], 6, *SHAPE[2:])
    out[:, 3:] = out[:, 3:].clamp(-1, 1)
    want = ref.step(out, t, x, generator=torch.Generator().manual_seed(4)).prev_sample
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    got = ours.step(out, t, x, variance_noise=noise).prev_sample
    torch.testing.assert_close(got, want, **TOL)
    a = ours.step(out, t, x, generator=torch.Generator().manual_seed(4)).prev_sample
    b = ours.step(out, t, x, generator=torch.Generator().manual_seed(4)).prev_sample
    assert torch.equal(a, b)
    np.testing.assert_array_less(0, (a - got).abs().max().item())
