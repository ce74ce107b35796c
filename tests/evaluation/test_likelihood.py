"""The bound's estimator (evaluation.likelihood.estimate_bits_per_dim): its strata cover the
timesteps once, each image's estimate is unbiased for the full sum of terms, and it is exact
where every stratum holds one timestep."""

import numpy as np
import pytest
import torch

from iddpm_ext.evaluation.likelihood import estimate_bits_per_dim, mean_stderr, strata_edges
from iddpm_ext.training.data import ArraySource


@pytest.mark.parametrize(
    "T,exact,strata", [(1000, 10, 40), (1000, 0, 5), (20, 10, 40), (7, 7, 3), (50, 3, 1)]
)
def test_strata_cover_the_rest_once(T, exact, strata):
    edges = strata_edges(T, exact, strata)
    assert edges[0] == min(exact, T) and edges[-1] == T
    assert all(a < b for a, b in zip(edges[:-1], edges[1:]))  # no empty stratum
    widths = np.diff(edges)
    assert len(widths) <= strata + (exact == 0)
    if len(widths) > 2:  # geometric: later strata are at least as wide
        assert widths[-1] >= widths[0]


class KnownTerms:
    """A stand-in diffusion whose term at t is f(t) = 1/(t+1) for every image (prior 0):
    the full bound is then Σ_t f(t), and an estimator's error is its sampling error alone."""

    num_timesteps = 1000

    def __init__(self):
        self.calls = 0

    def bpd_terms(self, model, x, t, clip_denoised=True, model_kwargs=None):
        self.calls += 1
        return 1.0 / (t.double() + 1.0)

    def prior_bpd(self, x):
        return torch.zeros(x.shape[0])


def _images(n):
    return ArraySource(np.zeros((n, 4, 4, 1), dtype=np.uint8))


def test_each_estimate_is_unbiased_and_costs_exact_plus_strata_terms():
    d = KnownTerms()
    full = float(np.sum(1.0 / (np.arange(1000) + 1.0)))
    out = estimate_bits_per_dim(None, d, _images(2000), 2000, 500, exact=10, strata=40)
    est = out["total_bpd"].astype(np.float64)
    assert d.calls == 4 * 50  # 4 batches, 10 exact terms + 40 strata each
    assert np.allclose(out["exact_bpd"], np.sum(1.0 / (np.arange(10) + 1.0)))
    mean, err = mean_stderr(est)
    assert err > 0 and abs(mean - full) < 4 * err  # unbiased: the mean of 2000 draws within 4 std. errors
    assert abs(mean - full) / full < 5e-3
    # an image's estimate depends on its index and the seed, not on the batch it is in
    again = estimate_bits_per_dim(None, KnownTerms(), _images(2000), 7, 3, exact=10, strata=40)["total_bpd"]
    assert np.array_equal(again, out["total_bpd"][:7])
    other = estimate_bits_per_dim(None, KnownTerms(), _images(2000), 7, 7, exact=10, strata=40, seed=1)
    assert not np.array_equal(other["total_bpd"], again)


def test_exact_where_each_stratum_holds_one_timestep():
    d = KnownTerms()
    d.num_timesteps = 30
    out = estimate_bits_per_dim(None, d, _images(3), 3, 3, exact=10, strata=40)
    assert np.allclose(out["total_bpd"], np.sum(1.0 / (np.arange(30) + 1.0)), rtol=1e-6)
