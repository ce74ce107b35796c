"""Cases of the sampling-engine tests: a tiny model and diffusion, the library loop to compare
with, wrappers, and a stand-in graph backend that runs on CPU."""

from __future__ import annotations

import contextlib

import torch

from helpers.models import randomize_, tiny_kwargs
from iddpm_ext import create_gaussian_diffusion
from iddpm_ext.unet import UNetModel


def tiny_model(num_classes=None, learn_sigma=True, seed=0, device="cpu") -> UNetModel:
    """A randomized tiny UNet (32 channels, 2 levels) in eval mode."""
    torch.manual_seed(seed)
    model = UNetModel(**tiny_kwargs(out_channels=6 if learn_sigma else 3, num_classes=num_classes))
    return randomize_(model, seed).to(device).eval()


def diffusion(
    respacing="10", steps=100, learn_sigma=True, rescale=True, schedule="cosine", predict_xstart=False
):
    return create_gaussian_diffusion(
        steps=steps,
        learn_sigma=learn_sigma,
        noise_schedule=schedule,
        rescale_timesteps=rescale,
        timestep_respacing=respacing,
        predict_xstart=predict_xstart,
    )


def reference_loop(d, model, shape, sampler="ancestral", eta=0.0, **kwargs):
    """The library's non-engine loop (GaussianDiffusion.p_sample_loop / ddim_sample_loop)."""
    if sampler == "ancestral":
        return d.p_sample_loop(model, shape, **kwargs)
    return d.ddim_sample_loop(model, shape, eta=eta, **kwargs)


class Autocast(torch.nn.Module):
    """``model`` run under torch.autocast (the non-engine counterpart of ``amp=``)."""

    def __init__(self, model, device_type, dtype):
        super().__init__()
        self.model, self.device_type, self.dtype = model, device_type, dtype
        self.num_classes = getattr(model, "num_classes", None)

    def forward(self, x, t, **kwargs):
        with torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=False):
            return self.model(x, t, **kwargs)


class PerSample(torch.nn.Module):
    """``model`` run on one batch item at a time: its output for a sample is then the same,
    bit for bit, in any batch (a batched forward may take other convolution algorithms per
    batch size, whose last-bit differences a sampling loop amplifies to ~1e-4)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.num_classes = getattr(model, "num_classes", None)
        self.train(model.training)

    def forward(self, x, t, **kwargs):
        return torch.cat(
            [
                self.model(x[i : i + 1], t[i : i + 1], **{k: v[i : i + 1] for k, v in kwargs.items()})
                for i in range(x.shape[0])
            ]
        )


class CallGraphBackend:
    """A stand-in for CUDAGraphBackend on CPU: warms up like it and "captures" by keeping
    the step function, so graph mode's build/warm-up/RNG handling runs without a GPU."""

    warmup_iters = 2

    def __init__(self, device):
        self.device = device
        self.warmups = 0
        self.captures = 0

    def build(self, warm, step):
        for _ in range(self.warmup_iters):
            warm()
            self.warmups += 1
        self.captures += 1
        return step, None, {"graph_pool_reserved_bytes": 0, "graph_allocated_bytes": 0}


@contextlib.contextmanager
def call_graph_backend(monkeypatch):
    import iddpm_ext.engine.capture as capture_mod

    backends = []

    def make(device):
        backends.append(CallGraphBackend(device))
        return backends[-1]

    monkeypatch.setattr(capture_mod, "graph_backend", make)
    yield backends
