"""Timestep samplers: uniform and the loss-second-moment importance sampler."""

import numpy as np
import pytest
import torch

from iddpm_ext import (
    LossSecondMomentResampler,
    UniformSampler,
    UnknownNameError,
    create_gaussian_diffusion,
    create_named_schedule_sampler,
)


@pytest.fixture
def diffusion():
    return create_gaussian_diffusion(steps=20, noise_schedule="cosine")


def test_uniform_sampler_has_unit_weights(diffusion):
    s = create_named_schedule_sampler("uniform", diffusion)
    assert isinstance(s, UniformSampler)
    np.random.seed(0)
    t, w = s.sample(500, "cpu")
    assert t.dtype == torch.int64 and w.dtype == torch.float32
    assert t.min() >= 0 and t.max() < 20 and len(set(t.tolist())) == 20
    assert torch.equal(w, torch.ones(500))


def test_second_moment_sampler_warmup_history_and_weights(diffusion):
    s = create_named_schedule_sampler("loss-second-moment", diffusion)
    assert isinstance(s, LossSecondMomentResampler)
    assert np.array_equal(s.weights(), np.ones(20))
    rng = np.random.RandomState(0)
    hist = {t: [] for t in range(20)}
    while not s._warmed_up():
        ts = rng.randint(0, 20, size=16)
        losses = rng.rand(16) * (ts + 1)
        s.update_with_local_losses(torch.tensor(ts), torch.tensor(losses))
        for t, loss in zip(ts, losses):
            hist[t].append(loss)
    # more updates: only the last 10 losses per t count
    ts = np.arange(20)
    losses = rng.rand(20) * 5
    s.update_with_all_losses(ts.tolist(), losses.tolist())
    for t, loss in zip(ts, losses):
        hist[t].append(loss)
    rms = np.array([np.sqrt(np.mean(np.square(hist[t][-10:]))) for t in range(20)])
    expected = rms / rms.sum() * (1 - 0.001) + 0.001 / 20
    np.testing.assert_allclose(s.weights(), expected, rtol=1e-12)
    np.random.seed(3)
    t, w = s.sample(1000, "cpu")
    p = expected / expected.sum()
    np.testing.assert_allclose(w.numpy(), 1 / (20 * p[t.numpy()]), rtol=1e-6)
    # unbiased: E_p[w · f(t)] = mean_t f(t)
    f = np.arange(20, dtype=np.float64)
    np.testing.assert_allclose((p * (1 / (20 * p)) * f).sum(), f.mean())


def test_sampler_state_round_trip(diffusion):
    s = LossSecondMomentResampler(diffusion)
    s.update_with_all_losses([1, 2, 3], [0.5, 0.25, 1.0])
    s2 = LossSecondMomentResampler(diffusion)
    s2.load_state_dict(s.state_dict())
    assert np.array_equal(s2._loss_history, s._loss_history)
    assert np.array_equal(s2._loss_counts, s._loss_counts)
    with pytest.raises(ValueError, match="state: expected loss_history"):
        s2.load_state_dict({"loss_history": np.zeros((3, 10)), "loss_counts": np.zeros(3)})


def test_errors(diffusion):
    with pytest.raises(UnknownNameError, match=r"name: expected one of \['uniform', 'loss-second-moment'\]"):
        create_named_schedule_sampler("second-moment", diffusion)
    s = LossSecondMomentResampler(diffusion)
    with pytest.raises(ValueError, match=r"ts: expected timesteps in \[0, 20\), got 20"):
        s.update_with_all_losses([20], [1.0])
    with pytest.raises(ValueError, match="local_losses: expected a 1-D tensor"):
        s.update_with_local_losses(torch.tensor([1, 2]), torch.tensor([1.0]))
