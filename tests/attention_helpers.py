"""Shared helpers of the attention tests (CPU and GPU): an independent float64 reference of
the paper's math and the low-precision error rule."""

from __future__ import annotations

import math

import torch


def attention_math_f64(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """softmax(qᵀk / √C) v per head, all in float64 (unlike the reference's einsum, whose
    softmax runs in float32). qkv: [B, 3·H·C, T] -> [B, H·C, T] float64, differentiable."""
    B, width, T = qkv.shape
    C = width // (3 * num_heads)
    q, k, v = qkv.double().reshape(B * num_heads, 3 * C, T).split(C, dim=1)
    w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(C), dim=-1)
    return torch.einsum("bts,bcs->bct", w, v).reshape(B, num_heads * C, T)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def check_two_x_rule(ours, eager, ref, what: str, floor: float = 0.0):
    """The low-precision rule: our error against the float reference is at most twice the error
    of the same math done eagerly in that precision (plus `floor` for exact-zero cases)."""
    e_ours, e_eager = max_err(ours, ref), max_err(eager, ref)
    assert e_ours <= 2 * e_eager + floor, (
        f"{what}: error {e_ours:.3g} of the fused op exceeds 2x the eager error {e_eager:.3g}"
    )
    return e_ours, e_eager
