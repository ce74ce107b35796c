"""A small digits classifier and the Fréchet distance in its feature space.

For the small-scale reproduction (``iddpm reproduce``) the sample quality of digit models
is measured like FID, but in the feature space of a small CNN trained here on the digits
train split (at the diffusion model's resolution, with the same preprocessing) instead of
Inception-v3. This is *not* Inception FID: its values are not comparable with published
FIDs, only between the models evaluated with the same classifier.

Features are the classifier's penultimate layer (``feature_dim`` values after a ReLU).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .fid import feature_statistics, frechet_distance


class DigitsClassifier(nn.Module):
    """conv-conv-pool-conv-pool, a hidden layer of ``feature_dim`` (the features), and a
    linear layer to the classes. Input: [N, C, S, S] in [-1, 1] (S divisible by 4)."""

    def __init__(
        self,
        image_size: int = 8,
        channels: int = 1,
        width: int = 32,
        feature_dim: int = 64,
        num_classes: int = 10,
        dropout: float = 0.3,
    ):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size: expected a multiple of 4, got {image_size}")
        self.config = dict(
            image_size=image_size,
            channels=channels,
            width=width,
            feature_dim=feature_dim,
            num_classes=num_classes,
            dropout=dropout,
        )
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.hidden = nn.Linear(2 * width * (image_size // 4) ** 2, feature_dim)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(feature_dim, num_classes)

    def features(self, x):  # x: [N, C, S, S] -> [N, feature_dim]
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        h = F.max_pool2d(h, 2)  # [N, w, S/2, S/2]
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)  # [N, 2w, S/4, S/4]
        return F.relu(self.hidden(h.flatten(1)))

    def forward(self, x):  # -> logits [N, num_classes]
        return self.out(self.drop(self.features(x)))


def _as_input(images) -> torch.Tensor:
    """uint8 [N, H, W, C] numpy (or a float [N, C, H, W] tensor in [-1, 1]) -> float tensor."""
    if isinstance(images, torch.Tensor):
        return images.float()
    from ..training.data import to_model_input

    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images: expected uint8 [N, H, W, C], got {images.dtype} {list(images.shape)}")
    return to_model_input(images)


def _check_size(model: DigitsClassifier, x: torch.Tensor):
    c, s = model.config["channels"], model.config["image_size"]
    if tuple(x.shape[1:]) != (c, s, s):
        raise ValueError(
            f"images: the classifier takes {s}x{s} images with {c} channel(s), "
            f"got [N, C, H, W] = {list(x.shape)}"
        )


@torch.no_grad()
def predict_logits(model: DigitsClassifier, images, batch_size: int = 512) -> np.ndarray:
    x = _as_input(images)
    _check_size(model, x)
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).numpy()


@torch.no_grad()
def classifier_features(model: DigitsClassifier, images, batch_size: int = 512) -> np.ndarray:
    """Penultimate-layer features [N, feature_dim] (float64) of uint8 NHWC images."""
    x = _as_input(images)
    _check_size(model, x)
    model.eval()
    feats = [model.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return torch.cat(feats).double().numpy()


def accuracy(model: DigitsClassifier, images, labels) -> float:
    pred = predict_logits(model, images).argmax(axis=1)
    return float((pred == np.asarray(labels)).mean())


def train_classifier(
    train_images,
    train_labels,
    test_images,
    test_labels,
    *,
    epochs: int = 40,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    width: int = 32,
    feature_dim: int = 64,
    log=None,
) -> tuple:
    """Train a :class:`DigitsClassifier` on uint8 NHWC images (AdamW, cosine-annealed lr,
    random ±1-pixel shifts as augmentation); returns (model in eval mode, info dict with
    test accuracy, train accuracy, seconds)."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        x = _as_input(train_images)
        y = torch.as_tensor(np.asarray(train_labels), dtype=torch.long)
        n, c, s, _ = x.shape
        model = DigitsClassifier(
            image_size=s, channels=c, width=width, feature_dim=feature_dim, num_classes=int(y.max()) + 1
        )
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        steps = epochs * max(1, n // batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n - batch_size + 1, batch_size):
                idx = perm[i : i + batch_size]
                xb = x[idx]
                dy, dx = torch.randint(-1, 2, (2,), generator=gen).tolist()  # a small shift per batch
                if dy or dx:
                    xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
                loss = F.cross_entropy(model(xb), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    model.eval()
    info = {
        "test_accuracy": accuracy(model, test_images, test_labels),
        "train_accuracy": accuracy(model, train_images, train_labels),
        "epochs": epochs,
        "seconds": time.perf_counter() - t0,
        "parameters": sum(p.numel() for p in model.parameters()),
        **model.config,
    }
    if log:
        log(
            f"digits classifier: test accuracy {info['test_accuracy']:.4f} "
            f"(train {info['train_accuracy']:.4f}), {info['parameters']:,} parameters, "
            f"{info['seconds']:.1f} s"
        )
    return model, info


def save_classifier(path: str, model: DigitsClassifier, info: dict | None = None):
    torch.save({"config": model.config, "state": model.state_dict(), "info": dict(info or {})}, path)


def load_classifier(path: str) -> DigitsClassifier:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = DigitsClassifier(**blob["config"])
    model.load_state_dict(blob["state"])
    return model.eval().requires_grad_(False)


class FeatureFD:
    """Fréchet distance to fixed reference images in a classifier's feature space."""

    def __init__(self, model: DigitsClassifier, reference_images):
        self.model = model
        self.reference_features = classifier_features(model, reference_images)
        self.mu, self.sigma = feature_statistics(self.reference_features)

    def features(self, images) -> np.ndarray:
        return classifier_features(self.model, images)

    def __call__(self, images) -> float:
        return self.from_features(self.features(images))

    def from_features(self, feats) -> float:
        mu, sigma = feature_statistics(feats)
        return max(0.0, frechet_distance(mu, sigma, self.mu, self.sigma))

    def bootstrap_std(self, feats, rounds: int = 30, seed: int = 0) -> float:
        """Standard deviation of the FD over resamplings (with replacement) of ``feats``:
        a scale for the sampling noise of one FD value."""
        rng = np.random.default_rng(seed)
        vals = [self.from_features(feats[rng.integers(0, len(feats), len(feats))]) for _ in range(rounds)]
        return float(np.std(vals, ddof=1))
