"""iddpm::qkv_attention and iddpm::qkv_attention_backward — fused QKV self-attention
(csrc/ops/attention.cpp; CPU kernels in csrc/cpu/attention*.cpp, CUDA in csrc/cuda/attention*.cu).

Layout: qkv [B, 3·H·C, T] with, for each head h, channels [3Ch, 3Ch + C) = q, the next C = k,
the next C = v (the reference's order); out [B, H·C, T] in qkv's dtype; lse [B, H, T] float32
(float64 for float64 qkv).
Autograd: the forward op saves (qkv, out, lse); its backward is the op
iddpm::qkv_attention_backward, so torch.compile traces both. lse is not differentiable.
"""

from __future__ import annotations

import torch

from .. import _ops


def qkv_attention_fused(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Fused attention [B, 3·H·C, T] -> [B, H·C, T] (differentiable w.r.t. qkv)."""
    _ops.require()
    out, _ = torch.ops.iddpm.qkv_attention(qkv, num_heads)
    return out


def qkv_attention_with_lse(qkv: torch.Tensor, num_heads: int):
    """The raw forward op: (out [B, H·C, T], lse [B, H, T] float32, float64 for float64 qkv)."""
    _ops.require()
    return torch.ops.iddpm.qkv_attention(qkv, num_heads)


def qkv_attention_backward(grad_out, qkv, out, lse, num_heads: int) -> torch.Tensor:
    """The raw backward op: grad_qkv [B, 3·H·C, T] in qkv's layout."""
    _ops.require()
    return torch.ops.iddpm.qkv_attention_backward(grad_out, qkv, out, lse, num_heads)


def _fake_dims(qkv, num_heads):
    torch._check(qkv.dim() == 3, lambda: f"qkv: expected a 3-D tensor [B, 3·H·C, T], got {qkv.dim()}-D")
    torch._check(num_heads >= 1, lambda: f"num_heads: expected a positive number, got {num_heads}")
    B, width, T = qkv.shape
    torch._check(
        width % (3 * num_heads) == 0,
        lambda: f"qkv: expected channels divisible by 3·num_heads = {3 * num_heads}, got {width}",
    )
    return B, width // 3, T


if _ops.available():

    @torch.library.register_fake("iddpm::qkv_attention")
    def _qkv_attention_fake(qkv, num_heads):
        B, hc, T = _fake_dims(qkv, num_heads)
        out = qkv.new_empty((B, hc, T))
        lse_dtype = torch.float64 if qkv.dtype == torch.float64 else torch.float32
        lse = qkv.new_empty((B, num_heads, T), dtype=lse_dtype)
        return out, lse

    @torch.library.register_fake("iddpm::qkv_attention_backward")
    def _qkv_attention_backward_fake(grad_out, qkv, out, lse, num_heads):
        _fake_dims(qkv, num_heads)
        return torch.empty_like(qkv, memory_format=torch.contiguous_format)

    def _setup_context(ctx, inputs, output):
        qkv, num_heads = inputs
        out, lse = output
        ctx.save_for_backward(qkv, out, lse)
        ctx.num_heads = num_heads
        ctx.mark_non_differentiable(lse)

    def _backward(ctx, grad_out, grad_lse):
        qkv, out, lse = ctx.saved_tensors
        if grad_out is None:
            return None, None
        grad_qkv = torch.ops.iddpm.qkv_attention_backward(grad_out, qkv, out, lse, ctx.num_heads)
        return grad_qkv, None

    torch.library.register_autograd(
        "iddpm::qkv_attention", _backward, setup_context=_setup_context
    )
