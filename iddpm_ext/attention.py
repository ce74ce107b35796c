"""QKV self-attention of the UNet, in the reference's layout.

qkv: [B, 3·H·C, T] where, for each head h, channels [3Ch, 3Ch + C) are q, the next C
are k and the next C are v (the reference reshapes to [B·H, 3C, T] and splits).
Output: [B, H·C, T]. Logits are scaled by 1/√C; softmax is accumulated in fp32.
"""

from __future__ import annotations

import math

import torch

from . import _ops
from .ops import attention as _fused_ops


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
    """QKV attention: [B, 3·H·C, T] -> [B, H·C, T], differentiable w.r.t. qkv.

    Under the implementation switch (see :func:`set_attention_impl`): "auto" runs the fused
    op ``iddpm::qkv_attention`` when ``_C`` has a kernel for ``qkv``'s device, dtype and head
    dim and the dtype is one the fused op is preferred for (any on CPU; fp16/bf16 on CUDA,
    where fp32 stays on cuBLAS: the fused fp32 path has no tensor-core product), and falls
    back to :func:`qkv_attention_reference` otherwise; "fused" always runs the
    op (a clear error when it cannot); "einsum" always runs the reference.
    """
    impl = _impl
    if impl == "einsum":
        return qkv_attention_reference(qkv, num_heads)
    if impl == "fused":
        _require_fused_device(qkv)
        return _fused_ops.qkv_attention_fused(qkv, num_heads)
    if qkv.dtype in _AUTO_DTYPES.get(qkv.device.type, ()) and fused_supported(qkv, num_heads):
        return _fused_ops.qkv_attention_fused(qkv, num_heads)
    return qkv_attention_reference(qkv, num_heads)


# What the compiled kernels cover. Read once at import so that the dispatch above is plain
# Python over constants (torch.compile(fullgraph=True) traces it without a graph break).
_HAS_KERNEL = {"cpu": _ops.has_kernel("cpu"), "cuda": _ops.has_kernel("cuda")}
_FUSED_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}
_CUDA_HEAD_DIMS = (32, 64, 128)
# The dtypes "auto" sends to the fused op (see qkv_attention's docstring).
_AUTO_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "cuda": (torch.float16, torch.bfloat16),
}


def fused_supported(qkv: torch.Tensor, num_heads: int) -> bool:
    """True when the fused op has a kernel for this qkv (device, dtype, head dim)."""
    kind = qkv.device.type
    if not _HAS_KERNEL.get(kind, False) or qkv.dtype not in _FUSED_DTYPES[kind]:
        return False
    if qkv.dim() != 3 or num_heads < 1 or qkv.shape[1] % (3 * num_heads) != 0:
        return False
    head_dim = qkv.shape[1] // (3 * num_heads)
    if kind == "cuda":
        return head_dim in _CUDA_HEAD_DIMS
    return head_dim >= 1


def _require_fused_device(qkv: torch.Tensor):
    if not _ops.available():
        _ops.require()
    kind = qkv.device.type
    if not _HAS_KERNEL.get(kind, False):
        built = "with" if _HAS_KERNEL["cuda"] else "without"
        raise ValueError(
            f"qkv: the fused attention (attention impl 'fused') has no kernel for device "
            f"{qkv.device}; iddpm_ext._C was built {built} CUDA and has kernels for "
            f"{[k for k, v in _HAS_KERNEL.items() if v]}"
        )


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
