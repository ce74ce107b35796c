"""use_checkpoint: same values and gradients, fewer activation bytes kept for backward."""

from __future__ import annotations

import pytest
import torch

from helpers.models import randomize_, tiny_kwargs
from iddpm_ext.bench.unet import activation_bytes
from iddpm_ext.unet import UNetModel


def _pair(**overrides):
    kw = tiny_kwargs(num_res_blocks=2, use_scale_shift_norm=True, num_classes=3, **overrides)
    plain = randomize_(UNetModel(**kw, use_checkpoint=False), seed=1)
    ckpt = UNetModel(**kw, use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    return plain, ckpt


def _grads(model, x, t, y, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # dropout masks
    out = model(x, t, y)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_checkpoint_same_outputs_and_gradients(dropout):
    plain, ckpt = _pair(dropout=dropout)
    plain.train(), ckpt.train()
    x = torch.randn(2, 3, 16, 16)
    t, y = torch.tensor([3, 800]), torch.tensor([0, 2])
    out_a, grads_a = _grads(plain, x, t, y, seed=7)
    out_b, grads_b = _grads(ckpt, x, t, y, seed=7)
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:  # recomputation repeats the same ops (and dropout masks)
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-6, atol=1e-7, msg=name)
    assert any(g.abs().sum() > 0 for g in grads_a.values())


def test_checkpoint_keeps_fewer_activation_bytes():
    plain, ckpt = _pair()
    x = torch.randn(4, 3, 16, 16)
    t, y = torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2, 0])
    kept_plain = activation_bytes(plain, x, t, y)
    kept_ckpt = activation_bytes(ckpt, x, t, y)
    # Without checkpointing every block keeps its internal activations; with it only the
    # block inputs (and the few tensors outside blocks) stay.
    assert kept_plain > 0 and kept_ckpt > 0
    assert kept_ckpt < 0.5 * kept_plain
    # The measure counts real tensors: the input image alone is part of what the stem keeps.
    assert kept_plain >= x.numel() * 4


def test_checkpoint_inactive_without_grad_and_under_autocast():
    plain, ckpt = _pair()
    plain.eval(), ckpt.eval()
    x = torch.randn(2, 3, 16, 16)
    t, y = torch.tensor([3, 8]), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(ckpt(x, t, y), plain(x, t, y), rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = plain(x, t, y)
        b = ckpt(x, t, y)
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    b.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in ckpt.parameters())
