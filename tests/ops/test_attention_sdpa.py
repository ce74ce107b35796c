"""The SDPA path of the UNet attention (iddpm_ext.ops.attention.qkv_attention_sdpa): torch's
scaled_dot_product_attention on q/k/v views of the reference's qkv layout, against the einsum
reference (fp32 ≤ 1e-5 relative, forward and backward; bf16 within 2× of the einsum path's own
error against a float64 oracle), its channels-innermost output, and what "auto" picks."""

from __future__ import annotations

import pytest
import torch

from iddpm_ext.ops import attention as A


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _qkv(B=2, H=2, C=8, T=20, layout="innermost", dtype=torch.float32, seed=0):
    """qkv [B, 3·H·C, T]; "innermost": channels innermost in memory ([B, T, 3·H·C], what a 1×1
    conv of channels-last activations gives), "contiguous": the NCHW-style layout."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, T, 3 * H * C, generator=g).to(dtype)
    qkv = base.transpose(1, 2)
    return qkv if layout == "innermost" else qkv.contiguous()


@pytest.mark.parametrize("layout", ["innermost", "contiguous"])
@pytest.mark.parametrize("H, C, T", [(2, 8, 20), (4, 16, 64), (1, 5, 3)])
def test_sdpa_matches_einsum_forward_and_backward_fp32(layout, H, C, T):
    qkv = _qkv(H=H, C=C, T=T, layout=layout)
    a = qkv.detach().requires_grad_()
    b = qkv.detach().requires_grad_()
    got = A.qkv_attention_sdpa(a, H)
    expected = A.qkv_attention_reference(b, H)
    assert got.shape == expected.shape == (2, H * C, T) and got.dtype == torch.float32
    assert _rel(got, expected) <= 1e-5
    g = torch.randn(got.shape, generator=torch.Generator().manual_seed(1))
    got.backward(g)
    expected.backward(g)
    assert _rel(a.grad, b.grad) <= 1e-5


def test_sdpa_keeps_the_reference_head_order():
    # Two heads whose q/k/v differ only in head 1's v: only head 1's output channels change.
    qkv = _qkv(H=2, C=4, T=6, layout="contiguous")
    changed = qkv.clone()
    changed[:, 3 * 4 + 2 * 4 : 3 * 4 + 3 * 4] += 1.0  # head 1, its v channels
    out, out2 = A.qkv_attention_sdpa(qkv, 2), A.qkv_attention_sdpa(changed, 2)
    assert torch.equal(out[:, :4], out2[:, :4])
    assert not torch.allclose(out[:, 4:], out2[:, 4:])
    torch.testing.assert_close(out2, A.qkv_attention_reference(changed, 2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["innermost", "contiguous"])
def test_sdpa_bf16_within_twice_the_einsum_error(layout):
    qkv32 = _qkv(H=4, C=16, T=64, layout=layout, seed=3)
    qkv = qkv32.to(torch.bfloat16)
    oracle = A.qkv_attention_reference(qkv.double(), 4)  # same (rounded) inputs, float64 math
    ref_err = _rel(A.qkv_attention_reference(qkv, 4), oracle)
    got = A.qkv_attention_sdpa(qkv, 4)
    assert got.dtype == torch.bfloat16
    err = _rel(got, oracle)
    assert 0 < ref_err and err <= 2 * ref_err, (err, ref_err)


def test_sdpa_output_of_channels_innermost_input_is_channels_innermost():
    qkv = _qkv(H=2, C=8, T=16, layout="innermost")
    out = A.qkv_attention_sdpa(qkv, 2)
    assert out.shape == (2, 16, 16) and out.stride(1) == 1 and out.stride(2) == 16


def test_auto_picks_sdpa_for_channels_innermost_inference_only():
    inner, contig = _qkv(layout="innermost"), _qkv(layout="contiguous")
    for dtype in (torch.float32, torch.bfloat16):
        assert A._auto_sdpa(inner.to(dtype), 2)
        assert not A._auto_sdpa(contig.to(dtype), 2)
    # fp16 and float64 stay on the fused op; a recorded gradient keeps the fused op too.
    assert not A._auto_sdpa(inner.half(), 2) and not A._auto_sdpa(inner.double(), 2)
    assert not A._auto_sdpa(inner.detach().requires_grad_(), 2)
    with torch.no_grad():
        assert A._auto_sdpa(inner.detach().requires_grad_(), 2)
    assert not A._auto_sdpa(_qkv(T=1, layout="innermost"), 2)  # T = 1: no layout to read
    assert not A._auto_sdpa(inner, 5)  # channels not a multiple of 3·heads: the op's error path
    assert not A._auto_sdpa(torch.zeros(2, 20, 48, device="meta").transpose(1, 2), 2)

    with A.attention_impl("auto"):
        assert torch.equal(A.qkv_attention(inner, 2), A.qkv_attention_sdpa(inner, 2))
        assert torch.equal(A.qkv_attention(contig, 2), A.qkv_attention_fused(contig, 2))
        leaf = inner.detach().requires_grad_()
        assert torch.equal(A.qkv_attention(leaf, 2), A.qkv_attention_fused(leaf, 2))


def test_sdpa_switch_and_errors(monkeypatch):
    calls = []
    real = A.qkv_attention_sdpa
    monkeypatch.setattr(A, "qkv_attention_sdpa", lambda qkv, h: calls.append(qkv.shape) or real(qkv, h))
    qkv = _qkv(layout="contiguous")
    leaf = qkv.detach().requires_grad_()
    with A.attention_impl("sdpa"):
        assert A.get_attention_impl() == "sdpa"
        out = A.qkv_attention(leaf, 2)  # "sdpa" runs it for any layout, with autograd too
        assert len(calls) == 1 and torch.equal(out, real(qkv, 2))
        out.sum().backward()
    assert leaf.grad is not None and leaf.grad.shape == qkv.shape
    inner = _qkv(layout="innermost")
    with torch.no_grad():
        with A.attention_impl("einsum"):
            assert torch.equal(A.qkv_attention(inner, 2), A.qkv_attention_reference(inner, 2))
        with A.attention_impl("fused"):
            assert torch.equal(A.qkv_attention(inner, 2), A.qkv_attention_fused(inner, 2))
        assert len(calls) == 1  # the switch-off: neither ran SDPA
        A.qkv_attention(inner, 2)  # "auto" does
        assert len(calls) == 2
    expected = r"impl: expected one of \['auto', 'fused', 'einsum', 'sdpa', 'bf16'\]"
    with pytest.raises(ValueError, match=expected):
        A.set_attention_impl("flash")
    with pytest.raises(ValueError, match="qkv: expected a 3-D tensor"):
        A.qkv_attention_sdpa(torch.zeros(48, 20), 2)
    with pytest.raises(ValueError, match="num_heads: expected a positive number of heads, got 0"):
        A.qkv_attention_sdpa(qkv, 0)
    with pytest.raises(ValueError, match="multiple of 3·num_heads = 15, got 48"):
        A.qkv_attention_sdpa(qkv, 5)


class _Block(torch.nn.Module):
    def forward(self, qkv):
        return A.qkv_attention(qkv, 2) * 2


@pytest.mark.slow  # ~2.5 s: dynamo's first trace in the process
def test_torch_compile_fullgraph_picks_sdpa():
    torch._dynamo.reset()
    inner = _qkv(layout="innermost")
    compiled = torch.compile(_Block(), fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(inner), 2 * A.qkv_attention_sdpa(inner, 2))
    leaf = inner.detach().requires_grad_()  # with autograd: the fused op, traced with its backward
    out = compiled(leaf)
    out.sum().backward()
    torch.testing.assert_close(out, 2 * A.qkv_attention_fused(inner, 2))
    ref = inner.detach().requires_grad_()
    (2 * A.qkv_attention_reference(ref, 2)).sum().backward()
    torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-5, atol=1e-6)
