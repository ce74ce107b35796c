"""GPU checks of the CIFAR-10 UNet: autocast bf16/fp16 vs fp32, fused vs einsum attention,
activation checkpointing memory. Skipped without CUDA (run by scripts/gpu_check.sh).

Tolerance rule: the fp32 reference runs with TF32 off. Under autocast the error of the
model with ``attention_impl("auto")`` (fused attention where available) against that
reference must be at most 2× the error of the same model with einsum attention in the
same precision (+1e-3 slack), and the einsum error itself must be at the level bf16/fp16
rounding gives (bf16 ≤ 3e-2, fp16 ≤ 4e-3 relative L2; measured on CPU with this
initialisation: 1.0e-2 and 1.3e-3).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from helpers.models import randomize_
from helpers.oracles import no_tf32, rel_err
from iddpm_ext import attention_impl
from iddpm_ext.bench.unet import build_model

pytestmark = pytest.mark.gpu
BOUND = {torch.bfloat16: 3e-2, torch.float16: 4e-3}


@pytest.fixture(scope="module")
def cifar():
    model, size = build_model("cifar10")
    randomize_(model, seed=0)
    model = model.cuda().eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, size, size, generator=gen).cuda()
    t = torch.randint(0, 1000, (16,), generator=gen).cuda()
    with torch.no_grad(), no_tf32(), attention_impl("einsum"):
        ref = model(x, t)
    return model, x, t, ref


def _forward(model, x, t, impl, dtype=None):
    ctx = torch.autocast("cuda", dtype=dtype) if dtype else contextlib.nullcontext()
    with torch.no_grad(), no_tf32(), attention_impl(impl), ctx:
        return model(x, t)


def test_fp32_fused_matches_einsum(cifar):
    model, x, t, ref = cifar
    out = _forward(model, x, t, "fused")
    assert out.dtype == torch.float32
    err = rel_err(out, ref)
    print(f"\nfp32 fused vs fp32 einsum: rel err {err:.3g}")
    assert err <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_vs_fp32(cifar, dtype):
    model, x, t, ref = cifar
    out_auto = _forward(model, x, t, "auto", dtype)
    out_einsum = _forward(model, x, t, "einsum", dtype)
    assert out_auto.dtype == dtype and torch.isfinite(out_auto).all()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    err_auto, err_einsum = rel_err(out_auto.float(), ref), rel_err(out_einsum.float(), ref)
    print(f"\n{dtype}: rel err vs fp32 — auto {err_auto:.3g}, einsum {err_einsum:.3g}")
    assert 0 < err_einsum <= BOUND[dtype]
    assert err_auto <= 2 * err_einsum + 1e-3


def test_autocast_bf16_training_gradients(cifar):
    model, x, t, _ = cifar  # eval mode: dropout off, so both runs see the same network
    grads = {}
    for dtype in (None, torch.bfloat16):
        model.zero_grad(set_to_none=True)
        ctx = torch.autocast("cuda", dtype=dtype) if dtype else contextlib.nullcontext()
        with no_tf32(), attention_impl("auto"), ctx:
            loss = model(x[:8], t[:8]).float().square().mean()
        loss.backward()
        grads[dtype] = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    assert grads[torch.bfloat16].dtype == torch.float32
    assert torch.isfinite(grads[torch.bfloat16]).all()
    err = rel_err(grads[torch.bfloat16], grads[None])
    print(f"\nbf16 autocast gradients vs fp32: rel err {err:.3g}")
    assert err <= 3e-2


def test_use_checkpoint_cuts_training_memory():
    peaks = {}
    x = torch.randn(32, 3, 32, 32, device="cuda")
    t = torch.randint(0, 1000, (32,), device="cuda")
    for ckpt in (False, True):
        model, _ = build_model("cifar10", use_checkpoint=ckpt, device="cuda")
        model.train()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with attention_impl("auto"):
            model(x, t).float().square().mean().backward()
        torch.cuda.synchronize()
        peaks[ckpt] = torch.cuda.max_memory_allocated() - base
        del model
        torch.cuda.empty_cache()
    print(
        f"\ntraining step peak above parameters, batch 32 fp32: {peaks[False] / 2**20:.0f} MiB, "
        f"use_checkpoint {peaks[True] / 2**20:.0f} MiB"
    )
    assert peaks[True] < 0.6 * peaks[False]
