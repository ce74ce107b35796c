"""The CPU bf16 inference attention (op iddpm::qkv_attention_bf16): against a float64 oracle
(the 2× rule against the reference's own bf16 error) and against a float64 emulation of its two
roundings (within one bf16 step of the output), every vector build this machine runs (the
AVX512-BF16 instructions where the CPU has them, the emulated sums everywhere), both input
layouts, odd head dims and lengths, several key blocks, empty shapes, opcheck, torch.compile,
errors (real and fake), no gradient, and what "auto" picks."""

from __future__ import annotations

import math

import pytest
import torch

from helpers.oracles import attention_math_f64, check_two_x_rule
from iddpm_ext.ops import attention as A

pytestmark = pytest.mark.kernels
OP = torch.ops.iddpm.qkv_attention_bf16

# (B, H, C, T): one key, odd head dims (a zero channel is appended), odd T (a lone key in the
# last pair), T past one key block (128) and one query block (64), the UNet's head dims, a head
# dim past 256 (the output block's buffer larger than the logits').
SHAPES = [
    (2, 3, 16, 37),
    (1, 4, 64, 64),
    (2, 2, 32, 257),
    (1, 1, 5, 1),
    (3, 1, 7, 130),
    (1, 2, 128, 96),
    (1, 1, 300, 70),
]


@pytest.fixture(params=["native", "avx512", "avx2", "generic"])
def isa(request, monkeypatch):
    """Each build of the kernel this machine runs ("native": the best one, AVX512-BF16's where
    the CPU has it)."""
    if request.param != "native":
        monkeypatch.setenv("IDDPM_ATTN_CPU_ISA", request.param)
    return request.param


def _qkv(B, H, C, T, layout="tokens", seed=0, scale=1.0):
    """bf16 qkv [B, 3·H·C, T]; "tokens": channel stride 1 ([B, T, 3·H·C] in memory, what a 1×1
    conv of channels-last activations gives), "nct": contiguous."""
    g = torch.Generator().manual_seed(seed)
    base = (scale * torch.randn(B, T, 3 * H * C, generator=g)).to(torch.bfloat16)
    qkv = base.transpose(1, 2)
    return qkv if layout == "tokens" else qkv.contiguous()


def _bf16_round(x64):
    return x64.to(torch.float32).to(torch.bfloat16).double()


def _emulated(qkv, H):
    """The kernel's math in float64 with its two roundings where it makes them — the
    probabilities (relative to the row's maximum logit) and the output, each once to bf16 —
    for T ≤ 128 (one key block, so the running maximum is the final one)."""
    B, width, T = qkv.shape
    C = width // (3 * H)
    q, k, v = qkv.double().reshape(B * H, 3 * C, T).split(C, dim=1)
    s2 = torch.einsum("bct,bcs->bts", q, k) * (math.log2(math.e) / math.sqrt(C))
    p = torch.exp2(s2 - s2.amax(-1, keepdim=True))
    pb, total = _bf16_round(p), p.sum(-1).unsqueeze(1)
    out = torch.einsum("bts,bcs->bct", pb, v) / total
    mag = torch.einsum("bts,bcs->bct", pb, v.abs()) / total  # the size of the sum's terms
    # A probability rounded the other way (its float32 logit on the other side of a bf16
    # rounding boundary; ~0.1% of them): 2^-8 of the largest term each.
    flip = 2.0**-8 * (pb.unsqueeze(1) * v.abs().unsqueeze(2)).amax(-1) / total
    return tuple(x.reshape(B, H * C, T) for x in (out, mag, flip))


def _spacing(b):
    """bf16's spacing at b: 2^(e - 7) for |b| in [2^e, 2^(e+1))."""
    return torch.exp2(torch.floor(torch.log2(b.double().abs().clamp_min(2.0**-126))) - 7)


def _ulps(a, b):
    """|a - b| in units of bf16's spacing at b."""
    return (a.double() - b.double()).abs() / _spacing(b)


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_within_twice_the_reference_bf16_error(shape, isa):
    B, H, C, T = shape
    qkv = _qkv(B, H, C, T, seed=sum(shape))
    out = OP(qkv, H)
    assert out.shape == (B, H * C, T) and out.dtype == torch.bfloat16
    oracle = attention_math_f64(qkv.double(), H)  # the same (rounded) inputs, exact math
    eager = A.qkv_attention_reference(qkv, H)  # the reference's bf16 einsum
    check_two_x_rule(out, eager, oracle, f"bf16 attention {shape} ({isa})", floor=1e-6)


@pytest.mark.parametrize("shape", [s for s in SHAPES if s[3] <= 128] + [(2, 4, 64, 128)])
def test_rounds_the_probabilities_and_the_output_once(shape, isa):
    """Within one bf16 step of the emulation that rounds p and out once each (plus float32
    summation error, 1e-5 of the size of the sum's terms where the output cancels, and up to
    four probabilities rounded the other way), 99% within half a step: a kernel that rounded
    anything else (the logits, the sum, v·p in bf16) is further."""
    B, H, C, T = shape
    qkv = _qkv(B, H, C, T, seed=3 + T)
    out = OP(qkv, H)
    emulated, mag, flip = _emulated(qkv, H)
    diff = (out.double() - emulated).abs()
    excess = diff - (_spacing(emulated) + 1e-5 * mag + 4 * flip)
    assert excess.max().item() <= 0, excess.max().item()
    assert (diff <= 0.5 * _spacing(emulated) + 1e-5 * mag).double().mean().item() >= 0.99


def test_the_emulated_builds_agree_with_the_native_one(monkeypatch):
    """Every build computes the same sums in the same order: 99% of the outputs bit-identical
    (a probability may round the other way where a float32 logit differs in its last bit:
    VDPBF16PS may round its pair sums differently and flushes denormals)."""
    qkv = _qkv(2, 4, 64, 200, seed=11)
    native = OP(qkv, 4)
    for isa in ("avx512", "avx2", "generic"):
        monkeypatch.setenv("IDDPM_ATTN_CPU_ISA", isa)
        same = (OP(qkv, 4) == native).double().mean().item()
        assert same >= 0.99, (isa, same)


@pytest.mark.parametrize("shape", [(2, 3, 16, 37), (1, 1, 7, 5)])
def test_layouts_give_the_same_bits_and_a_token_major_output(shape):
    B, H, C, T = shape
    tokens = _qkv(B, H, C, T, seed=2)
    out = OP(tokens, H)
    assert out.stride() == (T * H * C, 1, H * C)  # as torch's SDPA returns it
    assert torch.equal(OP(tokens.contiguous(), H), out)  # NCHW: copied once, same values
    strided = torch.empty(B, T, 2 * 3 * H * C, dtype=torch.bfloat16)[..., ::2]  # channel stride 2
    strided.copy_(tokens.transpose(1, 2))
    assert torch.equal(OP(strided.transpose(1, 2), H), out)
    wide = torch.zeros(B + 1, T + 3, 3 * H * C + 8, dtype=torch.bfloat16)  # larger strides
    view = wide[1:, 2 : T + 2, 4 : 4 + 3 * H * C]
    view.copy_(tokens.transpose(1, 2))
    assert torch.equal(OP(view.transpose(1, 2), H), out)


@pytest.mark.parametrize("dim", [1, 2])
def test_zero_strides(dim, isa):
    """A qkv broadcast along the channels (stride 0: every channel equal) or the positions
    (every token equal) is read as it is."""
    g = torch.Generator().manual_seed(13)
    if dim == 1:
        qkv = torch.randn(2, 1, 9, generator=g).to(torch.bfloat16).expand(2, 3 * 2 * 8, 9)
    else:
        qkv = torch.randn(2, 3 * 2 * 8, 1, generator=g).to(torch.bfloat16).expand(2, 3 * 2 * 8, 9)
    assert qkv.stride(dim) == 0
    out = OP(qkv, 2)
    check_two_x_rule(
        out, A.qkv_attention_reference(qkv, 2), attention_math_f64(qkv.double(), 2), "zero", 1e-6
    )
    assert torch.equal(out, OP(qkv.contiguous(), 2))


@pytest.mark.parametrize("layout", ["tokens", "nct"])
def test_threads_split_a_head_into_query_chunks_with_the_same_bits(layout):
    """With fewer heads than threads a head's query blocks are split over threads (each chunk
    packs k and v again): the same bits as one thread."""
    qkv = _qkv(1, 1, 24, 300, layout=layout, seed=14)  # 5 query blocks
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = OP(qkv, 1)
        torch.set_num_threads(4)
        assert torch.equal(OP(qkv, 1), one)
    finally:
        torch.set_num_threads(previous)


def test_fake_strides_match_the_kernel_at_every_size():
    from torch._subclasses.fake_tensor import FakeTensorMode

    for shape in [(2, 24, 5), (2, 24, 0), (0, 24, 5), (1, 24, 1)]:
        real = OP(torch.zeros(shape, dtype=torch.bfloat16), 2)
        with FakeTensorMode():
            fake = OP(torch.zeros(shape, dtype=torch.bfloat16), 2)
        assert (tuple(fake.shape), fake.stride()) == (tuple(real.shape), real.stride()), shape


def test_heads_are_independent_and_in_the_reference_order():
    qkv = _qkv(1, 2, 8, 12, seed=4)
    changed = qkv.clone()
    changed[:, 3 * 8 + 2 * 8 : 3 * 8 + 3 * 8] += 1.0  # head 1, its v channels
    out, out2 = OP(qkv, 2), OP(changed, 2)
    assert torch.equal(out[:, :8], out2[:, :8])
    assert not torch.equal(out[:, 8:], out2[:, 8:])


def test_large_logits_and_one_hot_rows():
    """Logits far apart (probabilities underflow to 0) and equal keys (uniform rows)."""
    qkv = _qkv(1, 1, 8, 40, seed=5, scale=30.0)
    out = OP(qkv, 1)
    assert torch.isfinite(out.float()).all()
    check_two_x_rule(out, A.qkv_attention_reference(qkv, 1), attention_math_f64(qkv.double(), 1), "big", 1e-6)
    same = _qkv(1, 1, 8, 1, seed=6).expand(1, 24, 9).contiguous()  # every position identical
    torch.testing.assert_close(OP(same, 1).float(), same[:, 16:].float(), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(0, 12, 5), (2, 12, 0), (0, 12, 0)])
def test_empty(shape):
    out = OP(torch.zeros(shape, dtype=torch.bfloat16), 2)
    assert out.shape == (shape[0], 4, shape[2]) and out.dtype == torch.bfloat16


def test_opcheck():
    torch.library.opcheck(OP.default, (_qkv(2, 2, 8, 11, seed=8), 2))
    torch.library.opcheck(OP.default, (_qkv(1, 3, 5, 7, layout="nct", seed=9), 3))


@pytest.mark.parametrize(
    "qkv, heads, match",
    [
        (
            torch.zeros(2, 24, 5),
            2,
            r"^qkv: expected dtype bfloat16 \(qkv_attention_bf16 is the bf16 kernel\), got float32",
        ),
        (torch.zeros(2, 24, 5, dtype=torch.float16), 2, "got float16"),
        (torch.zeros(24, 5, dtype=torch.bfloat16), 2, r"^qkv: expected a 3-D tensor"),
        (
            torch.zeros(2, 24, 5, dtype=torch.bfloat16),
            0,
            "^num_heads: expected a positive number of heads, got 0",
        ),
        (torch.zeros(2, 20, 5, dtype=torch.bfloat16), 2, "multiple of 3·num_heads = 6"),
        (torch.zeros(2, 0, 5, dtype=torch.bfloat16), 2, "multiple of 3·num_heads = 6"),
    ],
)
def test_errors_real_and_fake(qkv, heads, match):
    with pytest.raises(ValueError, match=match):
        OP(qkv, heads)
    with pytest.raises(ValueError, match=match):
        OP(qkv.to("meta"), heads)


def test_no_gradient():
    qkv = _qkv(1, 2, 8, 6).detach().requires_grad_()
    out = OP(qkv, 2)
    with pytest.raises(RuntimeError, match="qkv_attention_bf16 has no gradient"):
        out.float().sum().backward()


class _Block(torch.nn.Module):
    def forward(self, qkv):
        return A.qkv_attention_bf16(qkv, 2) * 2


@pytest.mark.slow  # dynamo's first trace in the process
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    qkv = _qkv(2, 2, 16, 33, seed=12)
    compiled = torch.compile(_Block(), fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(qkv), 2 * OP(qkv, 2))


def test_capabilities_and_isa(monkeypatch):
    monkeypatch.delenv("IDDPM_ATTN_CPU_ISA", raising=False)
    assert A.bf16_isa() in ("avx512_bf16", "avx512", "avx2", "generic")
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if probe is not None and probe():
        assert A.bf16_isa() == "avx512_bf16"


# ---- what "auto" picks ----


def test_auto_picks_it_for_bf16_cpu_inference_where_it_is_the_fast_path(monkeypatch):
    tokens, nct = _qkv(2, 2, 8, 20), _qkv(2, 2, 8, 20, layout="nct")
    monkeypatch.setattr(A, "_AUTO_BF16", True)
    assert A._auto_bf16(tokens, 2) and A._auto_bf16(nct, 2)
    assert not A._auto_bf16(tokens.float(), 2) and not A._auto_bf16(tokens.half(), 2)
    assert not A._auto_bf16(tokens.detach().requires_grad_(), 2)
    with torch.no_grad():
        assert A._auto_bf16(tokens.detach().requires_grad_(), 2)
    assert not A._auto_bf16(tokens, 5)  # not a multiple of 3·heads: the other paths' errors
    assert not A._auto_bf16(torch.zeros(2, 20, 48, dtype=torch.bfloat16, device="meta").transpose(1, 2), 2)
    with A.attention_impl("auto"):
        assert torch.equal(A.qkv_attention(tokens, 2), OP(tokens, 2))
        assert torch.equal(A.qkv_attention(nct, 2), OP(nct, 2))
        leaf = tokens.detach().requires_grad_()  # with autograd: the fused op, as before
        assert torch.equal(A.qkv_attention(leaf, 2), A.qkv_attention_fused(tokens, 2))
    monkeypatch.setattr(A, "_AUTO_BF16", False)  # e.g. a CPU with AMX: torch's SDPA
    assert not A._auto_bf16(tokens, 2)
    assert torch.equal(A.qkv_attention(tokens, 2), A.qkv_attention_sdpa(tokens, 2))


def test_auto_rule_follows_the_cpu(monkeypatch):
    """Picked only where the kernel's products are AVX512-BF16 instructions and there is no AMX."""
    from iddpm_ext.ops import loader

    for isa, amx, expected in [
        ("avx512_bf16", False, True),
        ("avx512_bf16", True, False),
        ("avx512", False, False),
        ("generic", False, False),
    ]:
        monkeypatch.setattr(A, "bf16_isa", lambda isa=isa: isa)
        monkeypatch.setattr(loader, "_cpu_has_amx", amx)
        assert A._auto_bf16_cpu() is expected, (isa, amx)


def test_impl_switch_runs_it_and_sdpa_switches_it_off(monkeypatch):
    tokens = _qkv(2, 2, 8, 20)
    monkeypatch.setattr(A, "_AUTO_BF16", True)
    calls = []
    real = A.qkv_attention_bf16
    monkeypatch.setattr(A, "qkv_attention_bf16", lambda q, h: calls.append(1) or real(q, h))
    with A.attention_impl("sdpa"):
        assert torch.equal(A.qkv_attention(tokens, 2), A.qkv_attention_sdpa(tokens, 2))
    with A.attention_impl("fused"):
        A.qkv_attention(tokens, 2)
    assert not calls
    monkeypatch.setattr(A, "_AUTO_BF16", False)
    with A.attention_impl("bf16"):
        assert A.get_attention_impl() == "bf16"
        assert torch.equal(A.qkv_attention(tokens, 2), real(tokens, 2))
        with pytest.raises(ValueError, match="qkv: expected dtype bfloat16"):
            A.qkv_attention(tokens.float(), 2)
    assert len(calls) == 2
    with pytest.raises(
        ValueError, match=r"impl: expected one of \['auto', 'fused', 'einsum', 'sdpa', 'bf16'\]"
    ):
        A.set_attention_impl("flash")
