"""Cases of iddpm::group_norm_act (tests/ops/test_group_norm_act.py on the CPU,
test_group_norm_act_gpu.py on CUDA): the float64 oracle and the inputs."""

from __future__ import annotations

import torch


def oracle(x, G, w=None, b=None, scale=None, shift=None, eps=1e-5, silu=True):
    """float64, written out: group statistics, normalise, affine, scale-shift, x·sigmoid(x)."""
    x = x.double()
    N, C = x.shape[:2]
    xg = x.reshape(N, G, -1)
    mean = xg.mean(-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(-1, keepdim=True)
    h = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    view = (N, C) + (1,) * (x.dim() - 2)
    if w is not None:
        h = h * w.double().reshape((1, C) + (1,) * (x.dim() - 2))
    if b is not None:
        h = h + b.double().reshape((1, C) + (1,) * (x.dim() - 2))
    if scale is not None:
        h = h * (1 + scale.double().reshape(view))
    if shift is not None:
        h = h + shift.double().reshape(view)
    return h * torch.sigmoid(h) if silu else h


def make(shape, G, dtype=torch.float32, params=True, film=True, channels_last=False, seed=0, offset=1.0):
    g = torch.Generator().manual_seed(seed)
    N, C = shape[:2]
    x = (2 * torch.randn(shape, generator=g, dtype=torch.float64) + offset).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = (1 + 0.3 * torch.randn(C, generator=g)) if params else None
    b = 0.3 * torch.randn(C, generator=g) if params else None
    sc = 0.5 * torch.randn(N, C, generator=g) if film else None
    sh = 0.5 * torch.randn(N, C, generator=g) if film else None
    return x, G, w, b, sc, sh
