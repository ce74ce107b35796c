"""``improved_diffusion.fp16_util`` under its own name: the helpers of the reference's
manual fp16 training (fp16 convolutions, one flat fp32 master copy of the parameters).

The trainer here uses ``torch.autocast`` + ``GradScaler`` instead (``--amp fp16|bf16``); these
functions are for code written against the reference that calls them directly.
"""

from __future__ import annotations

import torch
from torch import nn

from .unet import convert_module_to_f16, convert_module_to_f32

__all__ = [
    "convert_module_to_f16",
    "convert_module_to_f32",
    "make_master_params",
    "model_grads_to_master_grads",
    "master_params_to_model_params",
    "unflatten_master_params",
    "zero_grad",
]


def make_master_params(model_params):
    """One float32 ``nn.Parameter`` holding every parameter, flattened and concatenated in
    order; returned as a one-element list."""
    flat = torch.cat([p.detach().float().reshape(-1) for p in model_params])
    return [nn.Parameter(flat, requires_grad=True)]


def model_grads_to_master_grads(model_params, master_params):
    """Set the master parameter's gradient to the model gradients (float32, flattened).
    Every model parameter must have a gradient."""
    grads = []
    for i, p in enumerate(model_params):
        if p.grad is None:
            raise ValueError(f"model_params: parameter {i} (shape {list(p.shape)}) has no gradient")
        grads.append(p.grad.detach().float().reshape(-1))
    master_params[0].grad = torch.cat(grads)


def unflatten_master_params(model_params, master_params):
    """Views of the master parameter shaped like each model parameter (float32), as a tuple
    (the reference's type)."""
    flat = master_params[0].detach()
    out, offset = [], 0
    for p in model_params:
        n = p.numel()
        out.append(flat[offset : offset + n].view_as(p))
        offset += n
    if offset != flat.numel():
        raise ValueError(f"master_params: {flat.numel()} values for model parameters of {offset} values")
    return tuple(out)


def master_params_to_model_params(model_params, master_params):
    """Copy the master values back into the model parameters (cast to their dtype)."""
    model_params = list(model_params)  # a generator would be consumed twice
    for p, m in zip(model_params, unflatten_master_params(model_params, master_params)):
        p.detach().copy_(m)


def zero_grad(model_params):
    """Zero (and detach) every existing gradient in place."""
    for p in model_params:
        if p.grad is not None:
            p.grad.detach_()
            p.grad.zero_()
