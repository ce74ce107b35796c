"""QKV self-attention of the UNet: the op iddpm::qkv_attention (+ its backward op), the
reference's einsum math, and the dispatch between them.

Layout (the reference's): qkv [B, 3·H·C, T] with, for each head h, channels [3Ch, 3Ch + C) =
q, the next C = k, the next C = v (the reference reshapes to [B·H, 3C, T] and splits).
Output [B, H·C, T] in qkv's dtype. Logits are scaled by 1/√C; softmax is accumulated in fp32.

- :func:`qkv_attention` — what the UNet calls: the fused op, SDPA or the einsum path, by the
  implementation switch (:func:`set_attention_impl`, :class:`attention_impl`).
- :func:`qkv_attention_reference` — improved-diffusion's QKVAttention math (readable path).
- :func:`qkv_attention_sdpa` — torch's scaled_dot_product_attention on q/k/v views of qkv
  ("auto" picks it for channels-last CPU inputs without autograd).
- :func:`qkv_attention_bf16` — the op iddpm::qkv_attention_bf16: CPU, bf16, inference only, its
  products bf16 pair dot products (AVX512-BF16 where the CPU has it), reading a channels-last
  qkv in place ("auto" picks it for bf16 CPU inputs without autograd on CPUs with AVX512-BF16
  and without AMX).
- :func:`qkv_attention_fused` / :func:`qkv_attention_with_lse` / :func:`qkv_attention_backward`
  — the ops (csrc/ops/attention.cpp; CPU kernels in csrc/cpu/attention*, CUDA in
  csrc/cuda/attention*). The forward op also returns lse [B, H, T] (float32, float64 for
  float64 qkv), the logsumexp saved for the backward; autograd saves (qkv, out, lse) and its
  backward is the op iddpm::qkv_attention_backward, so torch.compile traces both.
"""

from __future__ import annotations

import math

import torch

from . import checks, loader


def _check_args(qkv: torch.Tensor, num_heads: int):
    """The argument checks of the Python paths (einsum, sdpa); returns (B, 3·H·C, T)."""
    if qkv.dim() != 3:
        raise ValueError(f"qkv: expected a 3-D tensor [B, 3·H·C, T], got shape {list(qkv.shape)}")
    if num_heads < 1:
        raise ValueError(f"num_heads: expected a positive number of heads, got {num_heads}")
    B, width, T = qkv.shape
    if width <= 0 or width % (3 * num_heads) != 0:
        raise ValueError(
            f"qkv: expected a channel count (dim 1) that is a positive multiple of 3·num_heads = "
            f"{3 * num_heads}, got {width}"
        )
    return B, width, T


def qkv_attention_reference(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The reference's einsum attention (improved-diffusion's QKVAttention), readable path.

    qkv: [B, 3·H·C, T] -> [B, H·C, T].
    """
    B, width, T = _check_args(qkv, num_heads)
    qkv = qkv.reshape(B * num_heads, width // num_heads, T)
    ch = qkv.shape[1] // 3
    q, k, v = torch.split(qkv, ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)  # more stable in fp16
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    out = torch.einsum("bts,bcs->bct", weight, v)
    return out.reshape(B, -1, T)


def qkv_attention_sdpa(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The same attention through torch's ``scaled_dot_product_attention``, on views of qkv.

    qkv: [B, 3·H·C, T] -> [B, H·C, T]. Channels split as the reference's (per head: q | k | v),
    q, k, v are [B, H, T, C] views (no copy), scale 1/√C (the reference's C^-1/4 on q and on k).
    Fastest where qkv is channels-last in memory ([B, T, 3·H·C], what a 1×1 conv of
    channels-last activations gives): the views then have contiguous head dims and torch's CPU
    flash kernel reads them in place; its output, [B, T, H, C] in memory on the CPU, comes back
    as a [B, H·C, T] view, channels-last again. Differentiable (torch's backward).
    """
    B, width, T = _check_args(qkv, num_heads)
    C = width // (3 * num_heads)
    heads = qkv.unflatten(1, (num_heads, 3, C)).transpose(-1, -2)  # [B, H, 3, T, C] view
    out = torch.nn.functional.scaled_dot_product_attention(heads[:, :, 0], heads[:, :, 1], heads[:, :, 2])
    return out.transpose(-1, -2).flatten(1, 2)  # [B, H, C, T] -> [B, H·C, T] (a view when it can be)


def qkv_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """QKV attention: [B, 3·H·C, T] -> [B, H·C, T], differentiable w.r.t. qkv.

    Under the implementation switch (see :func:`set_attention_impl`): "auto" runs
    :func:`qkv_attention_sdpa` for a channels-last qkv on the CPU in fp32/bf16 when no gradient
    is being recorded (:func:`_auto_sdpa`); else the fused op ``iddpm::qkv_attention`` when
    ``_C`` has a kernel for ``qkv``'s device, dtype and head dim and the dtype is one the fused
    op is preferred for (any on CPU; fp16/bf16 on CUDA, where fp32 stays on cuBLAS until its
    tensor-core kernels have run on a card, see ``_AUTO_DTYPES``); else
    :func:`qkv_attention_reference`; before all of these, a bf16 CPU qkv without autograd runs
    :func:`qkv_attention_bf16` on CPUs with AVX512-BF16 and without AMX (:func:`_auto_bf16`).
    "fused" always runs the op (a clear error when it cannot); "einsum" always runs the
    reference; "sdpa" always runs :func:`qkv_attention_sdpa`; "bf16" always runs
    :func:`qkv_attention_bf16` (bf16 CPU qkv only, without gradient).
    On CUDA the fused fp32 op follows torch's TF32 setting as cuBLAS does
    (``torch.backends.cuda.matmul.fp32_precision == "tf32"``, set by
    ``torch.set_float32_matmul_precision("high")``, ``torch.backends.cuda.matmul.allow_tf32 =
    True`` or ``torch.backends.fp32_precision = "tf32"``; ``_C.attention_fp32_tf32()`` says what
    it reads now): TF32 tensor cores when it is on, split-TF32 (three TF32 products, about fp32's
    accuracy) when it is off.
    """
    impl = _impl
    if impl == "einsum":
        return qkv_attention_reference(qkv, num_heads)
    if impl == "fused":
        _require_fused_device(qkv)
        return qkv_attention_fused(qkv, num_heads)
    if impl == "sdpa":
        return qkv_attention_sdpa(qkv, num_heads)
    if impl == "bf16":
        return qkv_attention_bf16(qkv, num_heads)
    if _auto_bf16(qkv, num_heads):
        return qkv_attention_bf16(qkv, num_heads)
    if _auto_sdpa(qkv, num_heads):
        return qkv_attention_sdpa(qkv, num_heads)
    if _auto_fused(qkv, num_heads):
        return qkv_attention_fused(qkv, num_heads)
    return qkv_attention_reference(qkv, num_heads)


def qkv_attention_bf16(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The CPU bf16 inference attention (op ``iddpm::qkv_attention_bf16``): [B, 3·H·C, T] bf16
    -> [B, H·C, T] bf16, the same math as :func:`qkv_attention_reference`.

    q·k and p·v are bf16 pair dot products accumulated in float32 (AVX512-BF16's VDPBF16PS where
    the CPU has it, else the same sums in float32 multiply-adds; :func:`bf16_isa`), the softmax
    online in float32; the probabilities and the output are each rounded once to bf16 (torch's
    CPU SDPA rounds the same two; the reference's einsum under autocast also rounds the logits).
    qkv is read at its strides, fastest token-major — channel stride 1, what a 1×1 conv of
    channels-last activations gives — with k in place (for another layout or an odd head dim
    the kernel copies k; v is packed per head and query chunk, q per block of queries); the
    output is token-major (strides
    T·H·C, 1, H·C), as SDPA returns it. Inference only: no gradient (differentiating raises).
    """
    loader.require()
    return torch.ops.iddpm.qkv_attention_bf16(qkv, num_heads)


def bf16_isa() -> str | None:
    """The build of :func:`qkv_attention_bf16` this process runs: "avx512_bf16" (AVX512-BF16
    products), "avx512", "avx2" or "generic" (the same sums in float32 multiply-adds); None
    without ``_C``."""
    caps = loader.capabilities()["attention_bf16"]["cpu"]
    return None if caps is None else caps["isa"]


def _auto_bf16_cpu() -> bool:
    """Whether "auto" runs qkv_attention_bf16 for bf16 CPU inputs without autograd on this CPU:
    where its products are AVX512-BF16 instructions and the CPU has no AMX (measured 1.9x SDPA
    at the CIFAR-10 UNet's T = 256 blocks on an AMD EPYC Zen 4, docs/attention.md; with AMX,
    torch's SDPA runs on AMX tiles and the two have not been compared)."""
    return bf16_isa() == "avx512_bf16" and not loader.cpu_has_amx()


_AUTO_BF16 = _auto_bf16_cpu()  # asked once, at import


def _auto_bf16(qkv: torch.Tensor, num_heads: int) -> bool:
    """Whether "auto" runs :func:`qkv_attention_bf16`: a bf16 CPU qkv of a valid shape with no
    gradient being recorded, on a CPU where it is the fast path (``_AUTO_BF16``)."""
    if not _AUTO_BF16 or qkv.device.type != "cpu" or qkv.dtype != torch.bfloat16 or qkv.dim() != 3:
        return False
    if torch.is_grad_enabled() and qkv.requires_grad:
        return False
    return _heads_split(qkv.shape[1], num_heads)


def _heads_split(width: int, num_heads: int) -> bool:
    """Whether ``width`` channels split into q, k, v of ``num_heads`` heads (else the op's error)."""
    return num_heads >= 1 and width > 0 and width % (3 * num_heads) == 0


# The dtypes "auto" sends to torch's SDPA on the CPU (fp16 and fp64 stay on the fused op).
_AUTO_SDPA_DTYPES = (torch.float32, torch.bfloat16)


def _auto_sdpa(qkv: torch.Tensor, num_heads: int) -> bool:
    """Whether "auto" runs torch's SDPA: a CPU qkv in fp32/bf16 laid out channels-last
    ([B, T, 3·H·C] in memory: channel stride 1, position stride 3·H·C), with no gradient being
    recorded. There SDPA reads the q/k/v views in place where the fused op first copies qkv
    (measured 2–4× faster at the CIFAR-10 UNet's blocks, docs/attention.md); an NCHW qkv is
    faster on the fused op, and with autograd the two measured about even (bf16 T = 64: the
    fused op 2× faster), so training keeps the fused op.
    """
    if qkv.device.type != "cpu" or qkv.dtype not in _AUTO_SDPA_DTYPES or qkv.dim() != 3:
        return False
    if torch.is_grad_enabled() and qkv.requires_grad:
        return False
    B, width, T = qkv.shape
    if not _heads_split(width, num_heads) or T < 2:
        return False
    return qkv.stride(1) == 1 and qkv.stride(2) == width


# What the compiled kernels cover, asked of _C once at import (loader.capabilities), so that
# the dispatch above is plain Python over constants (torch.compile(fullgraph=True) traces it
# without a graph break).
_HAS_KERNEL = {"cpu": loader.has_kernel("cpu"), "cuda": loader.has_kernel("cuda")}
_KERNELS = {device: caps for device, caps in loader.capabilities()["attention"].items() if caps}
# The dtypes "auto" sends to the fused op (see qkv_attention's docstring). fp32 on CUDA runs
# on TF32 or split-TF32 tensor-core kernels (csrc/cuda/attention_common.cuh) that so far have
# run only under the CPU emulator: by the project's rule "auto" keeps fp32 on einsum until a
# GPU check passes and `iddpm bench attention` shows them faster than einsum under the same
# TF32 setting ("fused" runs them).
_AUTO_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "cuda": (torch.float16, torch.bfloat16),
}


# The head dims "auto" sends to the fused op, per device (None: every head dim with a kernel).
# On CUDA the kernels cover every multiple of 8 up to 256 (capabilities' "head_dims"), but by
# the project's rule a CUDA path is picked by "auto" only once it has run correctly on a card:
# the tile-width kernels at C = 32, 64, 128 have (H100, 2026-11-27); the head dims below a tile
# width (zero-filled channels) and the Cp = 256 kernels have run under the CPU emulator only,
# so "auto" keeps those on einsum until a GPU check passes ("fused" runs them).
AUTO_HEAD_DIMS = {"cpu": None, "cuda": frozenset({32, 64, 128})}


def _auto_fused(qkv: torch.Tensor, num_heads: int) -> bool:
    """Whether "auto" runs the fused op for this qkv (device, dtype, head dim)."""
    kind = qkv.device.type
    if qkv.dtype not in _AUTO_DTYPES.get(kind, ()) or not fused_supported(qkv, num_heads):
        return False
    head_dims = AUTO_HEAD_DIMS.get(kind)
    return head_dims is None or qkv.shape[1] // (3 * num_heads) in head_dims


# What a CUDA device can run, beyond the dtypes and head dims compiled in: code built for compute
# capability 8.0 or newer (cp.async, bf16 and TF32 mma; a build whose arch list reaches a card
# only through 7.5, e.g. a T4, has kernels that trap there), and the kernel's shared memory per
# block within the device's opt-in limit (the kernels are sized for the H100's 227 KB: an A100
# has 163 KB, sm_86 / sm_89 cards 99 KB, too little for some tile widths). The CUDA ops refuse
# the rest with a ValueError saying which; "auto" takes einsum there. Asked of _C once per
# (device, element size, head dim) and process.
CUDA_MIN_ARCH = 80
_CUDA_RUNS: dict[tuple[int, int, int], bool] = {}


def _cuda_device_runs(index: int, element_size: int, head_dim: int) -> bool:
    """Whether CUDA device ``index`` runs the fused kernels for this element size and head dim."""
    if not torch.cuda.is_available():  # no device (FakeTensors in CI): nothing would launch
        return True
    return _cuda_device_runs_cached(index, element_size, head_dim)


# A constant for torch.compile (asked outside the graph, once per key and process).
@torch.compiler.assume_constant_result
def _cuda_device_runs_cached(index: int, element_size: int, head_dim: int) -> bool:
    key = (index, element_size, head_dim)
    if key not in _CUDA_RUNS:
        _CUDA_RUNS[key] = _ask_cuda_device(index, element_size, head_dim)
    return _CUDA_RUNS[key]


def _ask_cuda_device(index: int, element_size: int, head_dim: int) -> bool:
    C = loader._C
    if not hasattr(C, "attention_smem_bytes"):  # a _C older than these queries: trust it
        return True
    try:
        if C.attention_kernel_arch(index) < CUDA_MIN_ARCH:
            return False
    except RuntimeError as e:  # no kernel image for this device: a lasting answer; else raise
        if "no kernel image" not in str(e):
            raise
        return False
    limit = getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", None)
    if limit is None:  # an older torch: the op's own check (its ValueError) is the answer
        return True
    return all(
        C.attention_smem_bytes(element_size, head_dim, backward) <= limit for backward in (False, True)
    )


def cuda_device_support(index: int) -> dict:
    """What the fused CUDA attention runs on CUDA device ``index`` (``iddpm info``): the
    architecture its code there was built for ("kernel_arch", None with "error" where the build
    has no code for the card) and, per element type, the head dims whose forward and backward
    both run there (none below compute capability 8.0; fewer where shared memory is short)."""
    caps = _KERNELS.get("cuda")
    if caps is None:
        return {"kernel_arch": None, "error": "iddpm_ext._C has no CUDA attention kernels"}
    try:
        arch = int(loader._C.attention_kernel_arch(index))
    except RuntimeError as e:
        return {"kernel_arch": None, "error": str(e).splitlines()[0]}
    sizes = {"float16/bfloat16": 2, "float32": 4}
    return {
        "kernel_arch": arch,
        "head_dims": {
            name: [c for c in caps["head_dims"] if _cuda_device_runs(index, size, c)]
            for name, size in sizes.items()
        },
    }


def fused_supported(qkv: torch.Tensor, num_heads: int) -> bool:
    """True when the fused op has a kernel for this qkv (device, dtype, head dim, length) that
    the device runs (CUDA: code built for 8.0 or newer, shared memory within the card's limit)."""
    caps = _KERNELS.get(qkv.device.type)
    if caps is None or qkv.dtype not in caps["dtypes"]:
        return False
    if qkv.dim() != 3 or num_heads < 1 or qkv.shape[1] % (3 * num_heads) != 0:
        return False
    head_dim = qkv.shape[1] // (3 * num_heads)
    if caps["head_dims"] != "any" and head_dim not in caps["head_dims"]:
        return False
    if qkv.shape[0] * num_heads > caps.get("max_batch_heads", qkv.shape[0] * num_heads):
        return False
    if head_dim < 1 or qkv.shape[2] > caps.get("max_positions", qkv.shape[2]):
        return False
    if qkv.device.type != "cuda":
        return True
    return _cuda_device_runs(qkv.device.index or 0, qkv.element_size(), head_dim)


def _require_fused_device(qkv: torch.Tensor):
    if not loader.available():
        loader.require()
    kind = qkv.device.type
    if not _HAS_KERNEL.get(kind, False):
        built = "with" if _HAS_KERNEL["cuda"] else "without"
        raise ValueError(
            f"qkv: the fused attention (attention impl 'fused') has no kernel for device "
            f"{qkv.device}; iddpm_ext._C was built {built} CUDA and has kernels for "
            f"{[k for k, v in _HAS_KERNEL.items() if v]}"
        )


# ---------------------------------------------------------------------------------
# Which implementation qkv_attention uses: "auto" (the bf16 CPU kernel or SDPA for CPU inputs
# without autograd as _auto_bf16 / _auto_sdpa say, else the fused op where _C has a kernel for
# the device, else einsum), "fused" (the op, error if unavailable), "einsum", "sdpa" (torch's
# scaled_dot_product_attention) or "bf16" (iddpm::qkv_attention_bf16).
# ---------------------------------------------------------------------------------
_IMPLS = ("auto", "fused", "einsum", "sdpa", "bf16")
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


# ---------------------------------------------------------------------------------
# the ops
# ---------------------------------------------------------------------------------


def qkv_attention_fused(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Fused attention [B, 3·H·C, T] -> [B, H·C, T] (differentiable w.r.t. qkv)."""
    loader.require()
    out, _ = torch.ops.iddpm.qkv_attention(qkv, num_heads)
    return out


def qkv_attention_with_lse(qkv: torch.Tensor, num_heads: int):
    """The raw forward op: (out [B, H·C, T], lse [B, H, T] float32, float64 for float64 qkv)."""
    loader.require()
    return torch.ops.iddpm.qkv_attention(qkv, num_heads)


# ---------------------------------------------------------------------------------
# The Hopper (sm_90a) kernels (csrc/cuda/attention_{fwd,bwd}_sm90.cu, issue 13 item 4): built
# only for sm_90a, NEVER RUN ON A CARD YET, so never picked by "auto" or "fused". The CUDA ops
# run them instead of the sm_80 forward and backward only while their process-wide switch is on
# (:class:`attention_sm90`, or IDDPM_ATTENTION_SM90=1 in the environment at start-up), on a
# compute-capability 9.0 device, for fp16 / bf16 and head dims 64 and 128 (else the sm_80 kernels
# run). Same outputs (out, lse; grad_qkv), so either backward takes either forward's lse. See
# docs/attention.md.
# ---------------------------------------------------------------------------------
SM90_ENV = "IDDPM_ATTENTION_SM90"
SM90_DTYPES = (torch.float16, torch.bfloat16)
SM90_HEAD_DIMS = (64, 128)


def sm90_built() -> bool:
    """Whether ``_C`` has the sm_90a attention kernels compiled in (build_info()["attention_sm90"])."""
    return loader.available() and bool(loader.build_info().get("attention_sm90", False))


def sm90_supported(qkv: torch.Tensor, num_heads: int) -> bool:
    """Whether the switch (:class:`attention_sm90`) would run the sm_90a kernels for this qkv:
    built, a CUDA tensor on a compute-capability 9.0 device, fp16 / bf16, head dim 64 or 128, and
    a qkv the fused op takes."""
    if qkv.device.type != "cuda" or qkv.dtype not in SM90_DTYPES or not sm90_built():
        return False
    if not fused_supported(qkv, num_heads):
        return False
    if qkv.shape[1] // (3 * num_heads) not in SM90_HEAD_DIMS:
        return False
    return torch.cuda.get_device_capability(qkv.device) == (9, 0)  # an sm_90a cubin loads only there


def sm90_enabled() -> bool:
    """Whether the sm_90a kernels' process-wide switch is on (False without ``_C``)."""
    return loader.available() and bool(loader._C.attention_sm90_enabled())


class _process_switch:
    """Context manager over one of ``_C``'s process-wide switches (its setter, named by
    ``_setter``, returns the previous value): set on entry, restored on exit; no effect without
    ``_C``."""

    _setter = ""

    def __init__(self, enabled: bool = True):
        self.enabled = bool(enabled)

    def __enter__(self):
        self.previous = getattr(loader._C, self._setter)(self.enabled) if loader.available() else None
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            getattr(loader._C, self._setter)(self.previous)
        return False


class attention_sm90(_process_switch):
    """Context manager: the CUDA attention ops (forward and backward) run their sm_90a kernels
    where they can inside, and the switch goes back to its previous value after. The switch is
    process-wide (every thread's calls follow it), initially on when IDDPM_ATTENTION_SM90=1 was in
    the environment when the op first ran; no effect without ``_C``."""

    _setter = "set_attention_sm90"


# ---------------------------------------------------------------------------------
# The launch order of the sm_80 CUDA kernels: by default the grid is [B·H, tiles] (the heads of
# one tile adjacent in launch order); with the switch on, [tiles, B·H] (a head's tiles adjacent,
# FlashAttention's order: the CTAs that run together share their head's k, v or q, dO in L2).
# Same results; opt-in until `iddpm bench attention` has timed it on a card (row
# "iddpm (fused, tile-major)"). IDDPM_ATTENTION_TILE_MAJOR=1 in the environment at start-up, or
# :class:`attention_tile_major`.
# ---------------------------------------------------------------------------------
TILE_MAJOR_ENV = "IDDPM_ATTENTION_TILE_MAJOR"


def tile_major_enabled() -> bool:
    """Whether the sm_80 kernels' tile-major launch order is on (False without ``_C``)."""
    return loader.available() and bool(loader._C.attention_tile_major_enabled())


class attention_tile_major(_process_switch):
    """Context manager: the CUDA attention ops launch their sm_80 kernels tile-major inside, and
    the switch goes back to its previous value after (process-wide, like :class:`attention_sm90`;
    initially on when IDDPM_ATTENTION_TILE_MAJOR=1 was in the environment)."""

    _setter = "set_attention_tile_major"


# ---------------------------------------------------------------------------------
# The sm_90a forward's two consumer loops (csrc/cuda/attention_fwd_sm90.cuh; both never run on
# a card): plain (the default: each key tile's S, softmax and P·vᵀ in turn) or pipelined
# (FlashAttention-3's overlaps: S of tile kt issued with P·vᵀ of tile kt - 1, the softmax while
# the latter runs, the two consumer warpgroups taking turns; 6 / 3 stages). Same results to
# rounding; applies only where the sm_90a forward runs (:class:`attention_sm90`). Opt-in until
# `iddpm bench attention` has timed both on a card (row "iddpm (fused, sm90 pipelined)").
# IDDPM_ATTENTION_SM90_PIPELINED=1 in the environment at start-up, or
# :class:`attention_sm90_pipelined`.
# ---------------------------------------------------------------------------------
SM90_PIPELINED_ENV = "IDDPM_ATTENTION_SM90_PIPELINED"


def sm90_pipelined_enabled() -> bool:
    """Whether the sm_90a forward's pipelined consumers are switched on (False without ``_C``)."""
    return loader.available() and bool(loader._C.attention_sm90_pipelined_enabled())


class attention_sm90_pipelined(_process_switch):
    """Context manager: where the sm_90a forward runs (:class:`attention_sm90`), it runs its
    pipelined consumers inside; the switch goes back to its previous value after (process-wide;
    initially on when IDDPM_ATTENTION_SM90_PIPELINED=1 was in the environment)."""

    _setter = "set_attention_sm90_pipelined"


# ---------------------------------------------------------------------------------
# How the sm_90a backward (csrc/cuda/attention_bwd_sm90.cuh; never run on a card) adds each query
# tile's dq into its fp32 accumulator: by per-element atomics (the default, as the sm_80
# backward) or, with this switch, through shared memory and TMA bulk reductions
# (cp.reduce.async.bulk.tensor ... add: two boxes of [64 channels × 32 queries] per warpgroup and
# 64 channels, FlashAttention-3's way), where T % 4 == 0 (else atomics). Same sums up to their
# order; applies only where the sm_90a backward runs (:class:`attention_sm90`). Opt-in until
# `iddpm bench attention` has timed both on a card (row "iddpm (fused, sm90 bulk dq)").
# IDDPM_ATTENTION_SM90_BULK_DQ=1 in the environment at start-up, or
# :class:`attention_sm90_bulk_dq`.
# ---------------------------------------------------------------------------------
SM90_BULK_DQ_ENV = "IDDPM_ATTENTION_SM90_BULK_DQ"


def sm90_bulk_dq_enabled() -> bool:
    """Whether the sm_90a backward's bulk dq reductions are switched on (False without ``_C``)."""
    return loader.available() and bool(loader._C.attention_sm90_bulk_dq_enabled())


class attention_sm90_bulk_dq(_process_switch):
    """Context manager: where the sm_90a backward runs (:class:`attention_sm90`), it adds dq by
    TMA bulk reductions inside (where T % 4 == 0); the switch goes back to its previous value
    after (process-wide; initially on when IDDPM_ATTENTION_SM90_BULK_DQ=1 was in the
    environment)."""

    _setter = "set_attention_sm90_bulk_dq"


def qkv_attention_fused_sm90(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The fused op with the sm_90a kernels asked for (:class:`attention_sm90`), for its forward
    and, when autograd runs the backward inside the same switch, its backward; where they do not
    apply (:func:`sm90_supported`) the op runs its sm_80 kernels, as without it."""
    with attention_sm90():
        return qkv_attention_fused(qkv, num_heads)


def qkv_attention_backward(grad_out, qkv, out, lse, num_heads: int) -> torch.Tensor:
    """The raw backward op: grad_qkv [B, 3·H·C, T] in qkv's layout."""
    loader.require()
    return torch.ops.iddpm.qkv_attention_backward(grad_out, qkv, out, lse, num_heads)


def _fake_dims(qkv, num_heads):
    """The checks of csrc/ops/attention.cpp's check_qkv (ValueError, its messages); returns
    (B, H·C, T). On a FakeTensor's real device the kernel's limits apply; on meta (which stands
    for any device) the dtypes of some kernel."""
    checks.defined(qkv, "qkv")
    checks.dim(qkv, "qkv", 3, "[B, 3·num_heads·C, T]")
    if num_heads < 1:
        raise ValueError(f"num_heads: expected a positive number of heads, got {num_heads}")
    B, width, T = qkv.shape
    torch._check_value(
        width > 0 and width % (3 * num_heads) == 0,
        lambda: (
            f"qkv: expected a channel count (dim 1) that is a positive multiple of 3·num_heads = "
            f"{3 * num_heads} (q, k and v of C channels per head), got {width} channels"
        ),
    )
    kind = qkv.device.type
    caps = _KERNELS.get(kind, _KERNELS.get("cpu") if kind == "meta" else None)
    if caps is not None:
        where = "" if kind == "meta" else f" on {kind.upper()}"
        checks.dtype_in(qkv, "qkv", caps["dtypes"], where)
        C = width // (3 * num_heads)
        if caps["head_dims"] != "any":
            step, top = caps["head_dim_step"], caps["max_head_dim"]
            torch._check_value(
                C in caps["head_dims"],
                lambda: (
                    f"qkv: expected a head dim C = channels / (3·num_heads) that is a multiple of "
                    f"{step} from {step} to {top} on {kind.upper()}, got C = {C} ({width} channels, "
                    f"{num_heads} heads)"
                ),
            )
        if "max_positions" in caps:
            torch._check_value(
                T <= caps["max_positions"],
                lambda: f"qkv: expected at most {caps['max_positions']} positions (dim 2) on {kind}, got {T}",
            )
            torch._check_value(
                B * num_heads <= caps["max_batch_heads"],
                lambda: (
                    f"qkv: expected at most {caps['max_batch_heads']} batch items × heads on {kind}, "
                    f"got {B} × {num_heads}"
                ),
            )
    return B, width // 3, T


def _fake_like_out(x, name, qkv, B, hc, T):
    checks.defined(x, name)
    checks.same_device(x, name, qkv, "qkv")
    checks.dim(x, name, 3, f"[{B}, {hc}, {T}] (that of the attention output)")
    checks.shape(tuple(x.shape) == (B, hc, T), name, (B, hc, T), x, " (that of the attention output)")
    if x.dtype != qkv.dtype:
        raise ValueError(f"{name}: expected dtype {qkv.dtype} (that of qkv), got {x.dtype}")


def _lse_dtype(qkv):
    return torch.float64 if qkv.dtype == torch.float64 else torch.float32


if loader.available():

    @torch.library.register_fake("iddpm::qkv_attention")
    def _qkv_attention_fake(qkv, num_heads):
        B, hc, T = _fake_dims(qkv, num_heads)
        out = qkv.new_empty((B, hc, T))
        lse = qkv.new_empty((B, num_heads, T), dtype=_lse_dtype(qkv))
        return out, lse

    @torch.library.register_fake("iddpm::qkv_attention_backward")
    def _qkv_attention_backward_fake(grad_out, qkv, out, lse, num_heads):
        # csrc/ops/attention.cpp's check_backward, in its order.
        B, hc, T = _fake_dims(qkv, num_heads)
        _fake_like_out(grad_out, "grad_out", qkv, B, hc, T)
        _fake_like_out(out, "out", qkv, B, hc, T)
        checks.defined(lse, "lse")
        checks.same_device(lse, "lse", qkv, "qkv")
        checks.dtype_in(lse, "lse", (_lse_dtype(qkv),))
        checks.dim(lse, "lse", 3, f"[{B}, {num_heads}, {T}]")
        checks.shape(tuple(lse.shape) == (B, num_heads, T), "lse", (B, num_heads, T), lse)
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

    torch.library.register_autograd("iddpm::qkv_attention", _backward, setup_context=_setup_context)

    @torch.library.register_fake("iddpm::qkv_attention_bf16")
    def _qkv_attention_bf16_fake(qkv, num_heads):
        # csrc/ops/attention.cpp's qkv_attention_bf16_cpu checks, in their order.
        checks.defined(qkv, "qkv")
        checks.cpu_only(qkv, "qkv", "qkv_attention_bf16")
        if qkv.dtype != torch.bfloat16:
            raise ValueError(
                f"qkv: expected dtype bfloat16 (qkv_attention_bf16 is the bf16 kernel), "
                f"got {checks.dtype_name(qkv.dtype)}"
            )
        B, hc, T = _fake_dims(qkv, num_heads)
        # at::empty({B, T, H·C}).transpose(1, 2): a 0-size T counts as 1 in the batch stride
        return qkv.new_empty_strided((B, hc, T), (max(T, 1) * hc, 1, hc))

    def _bf16_no_backward(ctx, grad):
        raise RuntimeError(
            "iddpm::qkv_attention_bf16 has no gradient (inference only): differentiate through "
            "qkv_attention_fused or qkv_attention_sdpa instead (qkv_attention's 'auto' runs it "
            "for inputs without autograd only)"
        )

    torch.library.register_autograd("iddpm::qkv_attention_bf16", _bf16_no_backward)
