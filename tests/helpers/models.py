"""Small models for the tests: a tiny UNet configuration and random weights."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter random values (a fresh UNet outputs zeros: its output convs
    are zero-initialised). Weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1²), norm scales
    ~ 1 + N(0, 0.1²), embeddings ~ N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)

    def normal(p, std, mean=0.0):
        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std + mean)

    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            normal(m.weight, 1.0 / math.sqrt(m.weight[0].numel()))
            if m.bias is not None:
                normal(m.bias, 0.1)
        elif isinstance(m, nn.GroupNorm):
            normal(m.weight, 0.1, 1.0)
            normal(m.bias, 0.1)
        elif isinstance(m, nn.Embedding):
            normal(m.weight, 1.0)
    return model


def tiny_kwargs(**overrides) -> dict:
    """A small UNet: 32 channels, 1 res block, two levels, attention at ds 2."""
    kw = dict(
        in_channels=3,
        model_channels=32,
        out_channels=3,
        num_res_blocks=1,
        attention_resolutions=(2,),
        channel_mult=(1, 2),
        num_heads=2,
    )
    kw.update(overrides)
    return kw
