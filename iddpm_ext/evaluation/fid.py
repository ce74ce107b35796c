"""Sample-quality metrics in the feature space of the FID Inception-v3: Fréchet Inception
Distance (Heusel et al. 2017), Inception Score (Salimans et al. 2016), and improved
precision / recall (Kynkäänniemi et al. 2019, k = 3).

Inputs are ``.npz`` files as ``iddpm sample`` writes them: ``arr_0`` uint8 [N, H, W, C]
(C = 1 or 3). Statistics of a reference file are cached (keyed by the file's content hash
and the Inception weights), so repeated evaluations against one reference set read it once.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

from .inception import InceptionV3, load_inception

# ---------------------------------------------------------------------------------
# the math (float64, numpy)
# ---------------------------------------------------------------------------------


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2, *, features1=None) -> float:
    """||μ1 - μ2||² + Tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^½) between N(μ1, Σ1) and N(μ2, Σ2).

    Tr((Σ1 Σ2)^½) is computed as Σ √λ of Σ1^½ Σ2 Σ1^½ (similar to Σ1 Σ2, symmetric and
    positive semi-definite), which stays real and stable for singular covariances.

    ``features1``: the [N, D] features that (μ1, Σ1) are the statistics of
    (:func:`feature_statistics`). With N ≤ D, Σ1 = XᵀX for the centred features X / √(N - 1),
    and the non-zero eigenvalues of Σ1 Σ2 are those of the N × N matrix X Σ2 Xᵀ (symmetric,
    positive semi-definite): the same trace without the D × D eigendecomposition (2048² for
    Inception features: seconds on a CPU, for a handful of samples).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"mu/sigma: expected matching shapes [D] and [D, D], got {mu1.shape}, {s1.shape}, "
            f"{mu2.shape}, {s2.shape}"
        )
    if features1 is not None and len(features1) <= mu1.size:
        f1 = np.asarray(features1, np.float64)
        if f1.ndim != 2 or f1.shape[1] != mu1.size or f1.shape[0] < 2:
            raise ValueError(f"features1: expected [N, {mu1.size}] with N >= 2, got shape {f1.shape}")
        x = (f1 - f1.mean(axis=0)) / np.sqrt(f1.shape[0] - 1)
        m = x @ s2 @ x.T
    else:
        r1 = _sqrt_psd(s1)
        m = r1 @ s2 @ r1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def feature_statistics(features: np.ndarray):
    """(mean [D], covariance [D, D]) of [N, D] features, unbiased covariance (N - 1)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features: expected [N, D] with N >= 2, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def inception_score(logits, splits: int = 10):
    """(mean, std) over ``splits`` groups of exp(E_x KL(p(y|x) || p(y))), p(y|x) = softmax(logits)."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if logits.dim() != 2 or logits.shape[0] < splits:
        raise ValueError(f"logits: expected [N, K] with N >= splits = {splits}, got {tuple(logits.shape)}")
    p = torch.softmax(logits, dim=1)
    scores = []
    for part in torch.chunk(p, splits, dim=0):
        py = part.mean(dim=0, keepdim=True)
        kl = (part * (torch.log(part.clamp_min(1e-30)) - torch.log(py.clamp_min(1e-30)))).sum(dim=1)
        scores.append(torch.exp(kl.mean()).item())
    return float(np.mean(scores)), float(np.std(scores))


def _knn_radii(feats: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance of each row to its k-th nearest other row."""
    radii = []
    for i in range(0, feats.shape[0], chunk):
        d = torch.cdist(feats[i : i + chunk], feats)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # +1: the row itself is at distance 0
    return torch.cat(radii)


def _coverage(points: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> float:
    """Fraction of ``points`` inside at least one ball (center, radius)."""
    inside = []
    for i in range(0, points.shape[0], chunk):
        d = torch.cdist(points[i : i + chunk], centers)
        inside.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(inside).double().mean().item()


def precision_recall(real_features, fake_features, k: int = 3):
    """Improved precision (fake samples inside the real manifold) and recall (real samples
    inside the fake manifold); each manifold is the union of k-NN balls of its points."""
    real = torch.as_tensor(np.asarray(real_features), dtype=torch.float64)
    fake = torch.as_tensor(np.asarray(fake_features), dtype=torch.float64)
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(
            f"features: expected more than k = {k} real and fake feature rows, "
            f"got {real.shape[0]} and {fake.shape[0]}"
        )
    precision = _coverage(fake, real, _knn_radii(real, k))
    recall = _coverage(real, fake, _knn_radii(fake, k))
    return precision, recall


# ---------------------------------------------------------------------------------
# images -> features
# ---------------------------------------------------------------------------------


def load_npz_images(path: str) -> np.ndarray:
    """``arr_0`` of an .npz file as uint8 [N, H, W, C] with C in {1, 3} (clear errors)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with np.load(path) as data:
            keys = list(data.keys())
            arr = data["arr_0"] if "arr_0" in keys else None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(f"{path}: not a readable .npz file ({exc})") from None
    if arr is None:
        raise ValueError(f"{path}: expected an array 'arr_0' (uint8 [N, H, W, C]), found {keys}")
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(
            f"{path}: expected arr_0 as uint8 [N, H, W, C] with C = 1 or 3, got {arr.dtype} {arr.shape}"
        )
    return arr


@torch.no_grad()
def inception_outputs(
    images: np.ndarray,
    model: InceptionV3,
    batch_size: int = 50,
    device="cpu",
    progress=False,
    desc="inception",
):
    """(pool features [N, 2048] float64, logits [N, 1008] float64) of uint8 NHWC images;
    ``progress``: a bar over the images (stderr)."""
    from ..training.progress import progress_bar

    feats, logits = [], []
    bar = progress_bar(progress, images.shape[0], desc, "img")
    for i in range(0, images.shape[0], batch_size):
        x = torch.from_numpy(images[i : i + batch_size]).to(device).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        f, lg = model(x)
        feats.append(f.double().cpu())
        logits.append(lg.double().cpu())
        bar.update(x.shape[0])
    bar.close()
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:24]


def default_cache_dir() -> str:
    return os.environ.get("IDDPM_EXT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "iddpm_ext"))


def reference_features(
    ref_path: str,
    model: InceptionV3,
    weights_key: str,
    cache_dir: str | None,
    batch_size: int,
    device,
    progress: bool = False,
) -> dict:
    """Features and logits of a reference .npz, read from / written to the cache."""
    cache_file = None
    if cache_dir:
        key = f"{_file_digest(ref_path)}-{weights_key}"
        cache_file = os.path.join(cache_dir, f"ref-{key}.npz")
        if os.path.isfile(cache_file):
            with np.load(cache_file) as data:
                return {"features": data["features"], "logits": data["logits"], "cached": True}
    feats, logits = inception_outputs(
        load_npz_images(ref_path), model, batch_size, device, progress=progress, desc="inception (reference)"
    )
    if cache_file:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = cache_file + f".tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(f, features=feats, logits=logits)
        os.replace(tmp, cache_file)
    return {"features": feats, "logits": logits, "cached": False}


def evaluate(
    ref_path: str,
    samples_path: str,
    inception_path: str,
    batch_size: int = 50,
    device="cpu",
    cache_dir: str | None = "",
    is_splits: int = 10,
    k: int = 3,
    progress: bool = False,
) -> dict:
    """FID, IS, precision and recall of ``samples_path`` against ``ref_path``.

    :param cache_dir: where reference statistics are cached ("" = the default
        ~/.cache/iddpm_ext or $IDDPM_EXT_CACHE; None = no cache).
    :param progress: progress bars (stderr) over the Inception passes.
    """
    if cache_dir == "":
        cache_dir = default_cache_dir()
    samples = load_npz_images(samples_path)  # fail early on a bad samples file
    model = load_inception(inception_path, device)
    ref = reference_features(
        ref_path, model, _file_digest(inception_path), cache_dir, batch_size, device, progress=progress
    )
    feats, logits = inception_outputs(
        samples, model, batch_size, device, progress=progress, desc="inception (samples)"
    )
    mu_r, sigma_r = feature_statistics(ref["features"])
    mu_s, sigma_s = feature_statistics(feats)
    is_mean, is_std = inception_score(logits, splits=min(is_splits, len(logits)))
    precision, recall = precision_recall(ref["features"], feats, k=k)
    return {
        "fid": frechet_distance(mu_s, sigma_s, mu_r, sigma_r, features1=feats),
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "precision": precision,
        "recall": recall,
        "num_reference": int(ref["features"].shape[0]),
        "num_samples": int(feats.shape[0]),
        "reference_cached": bool(ref["cached"]),
    }
