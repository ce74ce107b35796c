"""DDIM η's valid range, [0, 1], derived from the update's ε coefficient √(1 − ᾱ_prev − σ²)
and the same on every path (eager, fused, the loops, engine, scheduler); the sampling loops
check their shape, η and class labels with the engine's checks."""

import math

import numpy as np
import pytest
import torch

from iddpm_ext import IDDPMScheduler, SamplingEngine
from iddpm_ext.core.checks import check_eta
from iddpm_ext.script_util import create_gaussian_diffusion

ETA_ERROR = r"^eta: expected a number in \[0, 1\]"
BAD_ETAS = [-0.1, 1.0 + 1e-6, 1.5, float("nan"), float("inf"), "a", None, True, torch.ones(2)]


# Schedules in use, and the 2-step respacing whose jump from ᾱ ≈ 1 to ᾱ_T ≈ 0 has r_t ≈ 1.
SCHEDULES = [
    (name, T, respacing)
    for name in ("linear", "cosine")
    for T in (1000, 4000)
    for respacing in ("", "ddim50", "ddim10", "25", "2")
]


def _max_eta(d) -> float:
    """The largest η for which 1 − ᾱ_prev − σ_t² ≥ 0 at every step of ``d`` (float64):
    1/√(max r_t), r_t = (ᾱ_prev − ᾱ_t)/(ᾱ_prev(1 − ᾱ_t)) over the steps with ᾱ_prev < 1."""
    ab, abp = np.asarray(d.alphas_cumprod, np.float64), np.asarray(d.alphas_cumprod_prev, np.float64)
    r = (abp - ab) / (abp * (1 - ab))
    return 1 / math.sqrt(r[abp < 1].max())


def test_eta_at_most_one_keeps_the_coefficient_real_on_every_schedule():
    """The rule's derivation on the schedules in use: 0 ≤ r_t ≤ 1, so every η ≤ 1 works on
    every schedule and step; above 1 it depends on the schedule, and a long jump from ᾱ ≈ 1
    to ᾱ ≈ 0 leaves no room at all (max η → 1)."""
    limits = {}
    for name, T, respacing in SCHEDULES:
        d = create_gaussian_diffusion(steps=T, noise_schedule=name, timestep_respacing=respacing)
        limits[name, T, respacing] = _max_eta(d)
    assert min(limits.values()) >= 1.0
    assert limits["cosine", 1000, "2"] < 1.0001 and limits["linear", 4000, "2"] < 1.0001
    assert limits["cosine", 1000, ""] < 1.001  # the cosine schedule's last step: β = 0.999


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=pytest.mark.kernels)])
def test_eta_one_is_finite_on_every_step_of_both_paths(fused):
    torch.manual_seed(0)
    # cosine 1000 "2": at η = 1 the float32 radicand of the second step rounds below 0 (the
    # reference's NaN); both paths clamp it
    for name, T, respacing in [("cosine", 4000, "ddim10"), ("cosine", 1000, "2"), ("cosine", 1000, "")]:
        d = create_gaussian_diffusion(
            steps=T, noise_schedule=name, timestep_respacing=respacing, learn_sigma=True
        )
        x = torch.randn(2, 3, 4, 4)
        mo = torch.randn(2, 6, 4, 4)
        for i in range(d.num_timesteps):
            t = torch.full((2,), i, dtype=torch.long)
            out = d.step("ddim", mo, x, t, eta=1.0, noise=torch.randn_like(x), fused=fused)
            assert torch.isfinite(out["sample"]).all(), (name, T, respacing, i)


@pytest.mark.kernels
def test_at_eta_one_the_rounded_radicand_is_clamped_on_both_paths_alike():
    d = create_gaussian_diffusion(
        steps=1000, noise_schedule="cosine", timestep_respacing="2", learn_sigma=True
    )
    ab = torch.tensor(d.alphas_cumprod).float()
    abp = torch.tensor(d.alphas_cumprod_prev).float()
    sigma = torch.sqrt((1 - abp) / (1 - ab)) * torch.sqrt(1 - ab / abp)
    assert (1 - abp - sigma**2)[1] < 0  # the reference's float32 formula: NaN at this step
    torch.manual_seed(1)
    x, mo, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 6, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.tensor([1, 1])
    eager = d.step("ddim", mo, x, t, eta=1.0, noise=noise, fused=False)["sample"]
    fused = d.step("ddim", mo, x, t, eta=1.0, noise=noise, fused=True)["sample"]
    assert torch.isfinite(eager).all() and torch.allclose(eager, fused, atol=1e-5)


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=pytest.mark.kernels)])
def test_eta_outside_zero_one_is_refused_by_both_paths(fused):
    d = create_gaussian_diffusion(steps=10, noise_schedule="cosine", learn_sigma=True)
    x, mo, t = torch.randn(2, 3, 4, 4), torch.randn(2, 6, 4, 4), torch.tensor([9, 3])
    for eta in BAD_ETAS:
        with pytest.raises(ValueError, match=ETA_ERROR):
            d.step("ddim", mo, x, t, eta=eta, fused=fused)
    d.use_fused = fused

    def model(x, t):
        raise AssertionError("the model ran before eta was checked")

    for eta in BAD_ETAS:
        with pytest.raises(ValueError, match=ETA_ERROR):
            d.ddim_sample(model, x, t, eta=eta)
        with pytest.raises(ValueError, match=ETA_ERROR):
            d.ddim_sample_loop(model, (2, 3, 4, 4), eta=eta)
    with pytest.raises(ValueError, match=r"got 1\.5$"):
        d.step("ddim", mo, x, t, eta=1.5, fused=fused)


def test_check_eta_message_and_accepted_values():
    assert check_eta(0) == 0.0 and check_eta(1) == 1.0 and check_eta(np.float32(0.5)) == 0.5
    assert check_eta(torch.tensor(0.25)) == 0.25
    with pytest.raises(ValueError) as err:
        check_eta(1.5)
    assert str(err.value) == (
        "eta: expected a number in [0, 1] (DDIM's η; above 1 the coefficient √(1 − ᾱ_prev − σ²) is not "
        "real at some steps), got 1.5"
    )


def test_engine_and_scheduler_apply_the_same_rule():
    d = create_gaussian_diffusion(steps=10, noise_schedule="cosine", learn_sigma=True)

    def model(x, t):
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    engine = SamplingEngine(model, d, mode="eager")
    for eta in (-0.5, 1.25, float("nan")):
        with pytest.raises(ValueError, match=ETA_ERROR):
            engine.sample((1, 3, 4, 4), sampler="ddim", eta=eta)
        with pytest.raises(ValueError, match=ETA_ERROR):
            IDDPMScheduler(10, beta_schedule="cosine", sampler="ddim", eta=eta)
    sched = IDDPMScheduler(10, beta_schedule="cosine", sampler="ddim", eta=1.0, variance_type="learned_range")
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match=ETA_ERROR):
        sched.step(model(x, None), int(sched.timesteps[0]), x, eta=2.0)
    assert math.isfinite(float(sched.step(model(x, None), int(sched.timesteps[0]), x).prev_sample.sum()))


class _CondModel(torch.nn.Module):
    num_classes = 3

    def forward(self, x, t, y=None):
        raise AssertionError("the model ran before its arguments were checked")


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop"])
def test_the_loops_check_shape_eta_and_labels_as_the_engine(loop):
    d = create_gaussian_diffusion(steps=10, noise_schedule="cosine")
    model = _CondModel()
    run = getattr(d, loop)
    y = {"y": torch.tensor([0, 1])}
    cases = [
        (
            dict(shape=(0, 3, 4, 4), model_kwargs=y),
            r"^shape: expected a tuple \(B, C, \.\.\.\) of positive ints",
        ),
        (dict(shape=(2,), model_kwargs=y), r"^shape: expected a tuple \(B, C, \.\.\.\)"),
        (dict(model_kwargs=None), r"^y: the model is class-conditional \(3 classes\); pass labels"),
        (dict(model_kwargs={"y": torch.tensor([0, 3])}), r"^y: expected labels in \[0, 3\), got 3$"),
        (dict(model_kwargs={"y": torch.tensor([-1, 0])}), r"^y: expected labels in \[0, 3\), got -1$"),
        (dict(model_kwargs={"y": torch.tensor([0.0, 1.0])}), r"^y: expected integer class labels"),
        (dict(model_kwargs={"y": torch.tensor([0])}), r"^y: expected shape \(2,\)"),
    ]
    if loop == "ddim_sample_loop":
        cases.append((dict(eta="a", model_kwargs=y), ETA_ERROR))
    for kwargs, pattern in cases:
        shape = kwargs.pop("shape", (2, 3, 4, 4))
        with pytest.raises(ValueError, match=pattern):
            run(model, shape, **kwargs)
    engine = SamplingEngine(model, d, mode="eager")  # the same messages from the engine
    with pytest.raises(ValueError, match=r"^y: expected labels in \[0, 3\), got 3$"):
        engine.sample((2, 3, 4, 4), y=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"^shape: expected a tuple \(B, C, \.\.\.\) of positive ints"):
        engine.sample((0, 3, 4, 4))
