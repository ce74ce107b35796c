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
