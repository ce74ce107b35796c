"""FID / IS / precision-recall: closed forms, scipy's sqrtm, and the whole pipeline with a
randomly initialised Inception-v3 of the right architecture."""

import os

import numpy as np
import pytest
import torch

from iddpm_ext.evaluation import (
    evaluate,
    feature_statistics,
    frechet_distance,
    inception_score,
    load_inception,
    load_npz_images,
    precision_recall,
)


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 2, size=6), rng.uniform(0.1, 2, size=6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0.0, abs=1e-10)


def test_frechet_distance_matches_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(200, 12)), rng.normal(size=(150, 12)) @ rng.normal(size=(12, 12)) + 0.3
    mu1, s1 = feature_statistics(x)
    mu2, s2 = feature_statistics(y)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    # singular covariances (fewer samples than dimensions) stay finite and real
    lo = rng.normal(size=(5, 12))
    assert np.isfinite(frechet_distance(*feature_statistics(lo), mu2, s2))


def test_frechet_distance_from_fewer_samples_than_dimensions():
    """With the features of (μ1, Σ1) and N ≤ D, the trace comes from an N × N matrix: the same
    distance as the D × D path (both orders of the two sides), and bad features are an error."""
    rng = np.random.default_rng(2)
    for n in (2, 5, 12):
        x = rng.normal(size=(n, 12)) * rng.uniform(0.1, 3, size=12)
        y = rng.normal(size=(40, 12)) @ rng.normal(size=(12, 12)) + 0.5
        mu1, s1 = feature_statistics(x)
        mu2, s2 = feature_statistics(y)
        # The D × D path takes square roots of eigenvalues that are zero up to rounding (Σ1 has
        # rank n - 1): ~1e-8 relative noise, which the N × N path does not have.
        full = frechet_distance(mu1, s1, mu2, s2)
        assert frechet_distance(mu1, s1, mu2, s2, features1=x) == pytest.approx(full, rel=1e-6)
        assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(full, rel=1e-6)
    assert frechet_distance(mu1, s1, mu1, s1, features1=x) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match=r"features1: expected \[N, 12\]"):
        frechet_distance(mu1, s1, mu2, s2, features1=x[:, :5])


def test_frechet_distance_shape_errors():
    with pytest.raises(ValueError, match="mu/sigma: expected matching shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_closed_forms():
    k = 10
    confident = np.full((100, k), -50.0)
    confident[np.arange(100), np.arange(100) % k] = 50.0  # one-hot, classes equally used
    mean, std = inception_score(confident, splits=5)
    assert mean == pytest.approx(k, rel=1e-6) and std < 1e-6
    same = np.zeros((100, k))  # uniform p(y|x): no information
    assert inception_score(same, splits=5)[0] == pytest.approx(1.0, rel=1e-12)
    collapsed = np.tile(confident[:1], (100, 1))  # always the same confident class
    assert inception_score(collapsed, splits=5)[0] == pytest.approx(1.0, rel=1e-6)


def test_precision_recall_on_known_manifolds():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(300, 4))
    assert precision_recall(real, real[::-1].copy())[0] == 1.0
    far = real + 100.0
    assert precision_recall(real, far) == (0.0, 0.0)
    # fakes from half of the real distribution: precise but low recall
    half = real[real[:, 0] > 0]
    p, r = precision_recall(real, half)
    assert p > 0.95 and 0.3 < r < 0.8


def test_load_npz_images_errors(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="expected arr_0 as uint8"):
        load_npz_images(str(bad))
    np.savez(tmp_path / "nokey.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="expected an array 'arr_0'"):
        load_npz_images(str(tmp_path / "nokey.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_npz_images(str(tmp_path / "junk.npz"))
    with pytest.raises(FileNotFoundError):
        load_npz_images(str(tmp_path / "missing.npz"))


# The tests using the session fixture random_inception (an Inception-v3 saved to a file) run on
# one pytest-xdist worker (make test: --dist loadgroup), so it is built once.
@pytest.mark.xdist_group("inception")
def test_inception_weights_file_errors(tmp_path, random_inception):
    with pytest.raises(FileNotFoundError, match="inception: no such file"):
        load_inception(str(tmp_path / "nope.pth"))
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="is not an Inception-v3 FID weights file.*missing"):
        load_inception(str(tmp_path / "other.pth"))
    (tmp_path / "junk.pth").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable weights file"):
        load_inception(str(tmp_path / "junk.pth"))
    model = load_inception(random_inception)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


@pytest.mark.slow
@pytest.mark.xdist_group("inception")
def test_whole_pipeline_with_a_random_network(tmp_path, random_inception):
    rng = np.random.default_rng(3)
    ref = rng.integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
    similar = np.clip(ref.astype(np.int16) + rng.integers(-3, 4, size=ref.shape), 0, 255).astype(np.uint8)
    different = np.full((8, 32, 32, 1), 255, np.uint8)  # grayscale input is accepted too
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    np.savez(tmp_path / "similar.npz", arr_0=similar)
    np.savez(tmp_path / "different.npz", arr_0=different)
    cache = tmp_path / "cache"
    kw = dict(inception_path=random_inception, batch_size=4, cache_dir=str(cache), is_splits=2)
    near = evaluate(str(tmp_path / "ref.npz"), str(tmp_path / "similar.npz"), **kw)
    far = evaluate(str(tmp_path / "ref.npz"), str(tmp_path / "different.npz"), **kw)
    assert not near["reference_cached"] and far["reference_cached"]  # second run read the cache
    assert len(os.listdir(cache)) == 1
    assert 0 <= near["fid"] < far["fid"]
    assert near["num_reference"] == near["num_samples"] == 8
    for key in ("inception_score", "precision", "recall"):
        assert np.isfinite(near[key])
    assert near["precision"] > far["precision"]
