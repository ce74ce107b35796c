"""QKV self-attention of the UNet, in the reference's layout.

qkv: [B, 3·H·C, T] where, for each head h, channels [3Ch, 3Ch + C) are q, the next C
are k and the next C are v (the reference reshapes to [B·H, 3C, T] and splits).
Output: [B, H·C, T]. Logits are scaled by 1/√C; softmax is accumulated in fp32.
"""

from __future__ import annotations

import math

import torch


def qkv_attention_reference(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The reference's einsum attention (improved-diffusion's QKVAttention), readable path.

    qkv: [B, 3·H·C, T] -> [B, H·C, T].
    """
    B, width, T = qkv.shape
    if width % (3 * num_heads) != 0:
        raise ValueError(
            f"qkv: expected channels divisible by 3·num_heads = {3 * num_heads}, got {width}"
        )
    qkv = qkv.reshape(B * num_heads, width // num_heads, T)
    ch = qkv.shape[1] // 3
    q, k, v = torch.split(qkv, ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)  # more stable in fp16
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    out = torch.einsum("bts,bcs->bct", weight, v)
    return out.reshape(B, -1, T)


def qkv_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """QKV attention: [B, 3·H·C, T] -> [B, H·C, T] (currently the einsum path)."""
    return qkv_attention_reference(qkv, num_heads)


# ---------------------------------------------------------------------------------
# Which implementation qkv_attention uses: "auto" (the fused op where _C has a kernel
# for the device, else einsum), "fused" (the op, error if unavailable) or "einsum".
# ---------------------------------------------------------------------------------
_IMPLS = ("auto", "fused", "einsum")
_impl = "auto"


def set_attention_impl(impl: str) -> str:
    """Choose the attention implementation globally; returns the previous choice."""
    global _impl
    if impl not in _IMPLS:
        raise ValueError(f"impl: expected one of {list(_IMPLS)}, got {impl!r}")
    previous, _impl = _impl, impl
    return previous


def get_attention_impl() -> str:
    return _impl


class attention_impl:
    """Context manager: ``with attention_impl("einsum"): ...``."""

    def __init__(self, impl: str):
        self.impl = impl

    def __enter__(self):
        self.previous = set_attention_impl(self.impl)
        return self

    def __exit__(self, *exc):
        set_attention_impl(self.previous)
        return False
