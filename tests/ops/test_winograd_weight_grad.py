"""The Winograd weight gradient ``iddpm::conv3x3_winograd_weight_grad(x, grad_y)``: against float64
``aten::convolution_backward`` (within 3× torch's own fp32 error) over odd sizes, 1×1 maps, channel
counts off the vector width, layouts, several tile blocks; empty inputs; argument errors (CPU and
meta, same words); opcheck; then its use in ``conv3x3_winograd_train`` (``weight_grad``: which
calls take it, the bias gradient with it, bf16 and create_graph left to torch) and
``iddpm_ext.nn``'s switch."""

from __future__ import annotations

import pytest
import torch

from iddpm_ext import nn as inn
from iddpm_ext.ops import winograd as WG

pytestmark = [
    pytest.mark.kernels,
    pytest.mark.skipif(not WG.available(), reason="needs iddpm_ext._C with the CPU Winograd kernel"),
]

CL = torch.channels_last
op = torch.ops.iddpm.conv3x3_winograd_weight_grad


def _case(N, Cin, Cout, H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, Cin, H, W, generator=g, dtype=torch.float64)
    gy = torch.randn(N, Cout, H, W, generator=g, dtype=torch.float64)
    return x, gy


def _torch_weight_grad(x, gy):
    w = torch.zeros(gy.shape[1], x.shape[1], 3, 3, dtype=x.dtype)
    return torch.ops.aten.convolution_backward(
        gy, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]
    )[1]


def _err(a, ref):
    return (a.double() - ref).abs().max().item() / ref.abs().max().item()


CASES = [
    # N, Cin, Cout, H, W
    (2, 32, 48, 8, 8),
    (2, 16, 16, 7, 9),  # odd H and W: the last tiles' missing rows and columns
    (1, 5, 7, 1, 1),  # 1×1 map, channels off the vector width
    (3, 19, 33, 3, 5),
    (2, 64, 24, 16, 1),  # one column
    (1, 3, 130, 2, 6),  # channels past two AVX-512 vectors, few inputs
    (4, 70, 66, 11, 6),
]


@pytest.mark.parametrize("N, Cin, Cout, H, W", CASES)
@pytest.mark.parametrize("layout", ["channels_last", "nchw", "strided"])
def test_matches_float64_within_3x_torch_fp32_error(N, Cin, Cout, H, W, layout):
    x, gy = _case(N, Cin, Cout, H, W)
    ref = _torch_weight_grad(x, gy)
    xf, gyf = x.float(), gy.float()
    if layout == "channels_last":
        xf, gyf = xf.contiguous(memory_format=CL), gyf.contiguous(memory_format=CL)
    elif layout == "strided":  # views with gaps between the channels and between the rows
        xf = torch.stack([xf, xf], 2).flatten(1, 2)[:, ::2]
        gyf = torch.cat([gyf, gyf], 3)[..., :W]
        assert not xf.is_contiguous() and not gyf.is_contiguous()
    ours = op(xf, gyf)
    theirs = _torch_weight_grad(x.float(), gy.float())
    assert ours.dtype == torch.float32 and ours.shape == (Cout, Cin, 3, 3) and ours.is_contiguous()
    assert _err(ours, ref) <= 3 * max(_err(theirs, ref), 2e-7), (_err(ours, ref), _err(theirs, ref))


@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_vector_builds_agree_with_the_best(monkeypatch, isa):
    """The adjoint transform of every vector build gives the same bits (the same float32 sums)."""
    x, gy = (t.float() for t in _case(2, 37, 21, 9, 7))
    best = op(x, gy)
    monkeypatch.setenv("IDDPM_WINOGRAD_CPU_ISA", isa)
    assert torch.equal(op(x, gy), best)


def test_several_tile_blocks():
    """Enough tiles for more than one block of the op's 8 MB workspace (dU accumulates)."""
    x, gy = _case(3, 256, 256, 30, 28)  # 3 · 15 · 14 = 630 tiles of 16 · 512 floats: 3 blocks
    ref = _torch_weight_grad(x, gy)
    ours = op(x.float(), gy.float())
    theirs = _torch_weight_grad(x.float(), gy.float())
    assert _err(ours, ref) <= 3 * _err(theirs, ref)


def test_empty_inputs():
    x, gy = (t.float() for t in _case(0, 4, 6, 5, 5))
    assert torch.equal(op(x, gy), torch.zeros(6, 4, 3, 3))  # no samples: a zero gradient
    x, gy = (t.float() for t in _case(2, 4, 6, 0, 5))
    assert torch.equal(op(x, gy), torch.zeros(6, 4, 3, 3))
    x, gy = (t.float() for t in _case(2, 0, 6, 5, 5))
    assert op(x, gy).shape == (6, 0, 3, 3)
    x, gy = (t.float() for t in _case(2, 4, 0, 5, 5))
    assert op(x, gy).shape == (0, 4, 3, 3)


def test_opcheck_and_wrapper():
    x, gy = (t.float() for t in _case(2, 8, 12, 5, 6))
    torch.library.opcheck(op.default, (x, gy))
    torch.library.opcheck(op.default, (x.contiguous(memory_format=CL), gy))
    assert torch.equal(WG.conv3x3_winograd_weight_grad(x, gy), op(x, gy))


BAD = [
    (dict(x=torch.zeros(2, 4, 5)), r"x: expected a 4-D tensor \[N, Cin, H, W\], got shape \[2, 4, 5\]"),
    (
        dict(x=torch.zeros(2, 4, 5, 5).bfloat16()),
        r"x: expected dtype float32 \(the weight gradient op is float32 only\), got bfloat16",
    ),
    (
        dict(grad_y=torch.zeros(2, 6, 5, 5, dtype=torch.float64)),
        r"grad_y: expected dtype float32 \(that of x\), got float64",
    ),
    (
        dict(grad_y=torch.zeros(2, 6, 5, 4)),
        r"grad_y: expected shape \[2, Cout, 5, 5\] \(N, H and W of x\), got \[2, 6, 5, 4\]",
    ),
    (dict(grad_y=torch.zeros(3, 6, 5, 5)), r"grad_y: expected shape \[2, Cout, 5, 5\]"),
    (dict(grad_y=torch.zeros(6, 5, 5)), r"grad_y: expected shape \[2, Cout, 5, 5\]"),
]


@pytest.mark.parametrize("kw, match", BAD)
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_errors_name_the_argument(kw, match, device):
    args = {"x": torch.zeros(2, 4, 5, 5), "grad_y": torch.zeros(2, 6, 5, 5), **kw}
    with pytest.raises(ValueError, match=match):
        op(*(v.to(device) for v in args.values()))


def test_none_mixed_devices_and_backward():
    with pytest.raises((ValueError, RuntimeError), match="x"):
        WG.conv3x3_winograd_weight_grad(None, torch.zeros(1, 2, 3, 3))
    with pytest.raises(ValueError, match="grad_y: expected a tensor on cpu"):
        op(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3, device="meta"))
    x = torch.randn(1, 2, 3, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="have no gradient formula"):
        op(x, torch.randn(1, 2, 3, 3)).sum().backward()


# ------------------------------------------------------------------------------------------
# conv3x3_winograd_train(..., weight_grad=...) and iddpm_ext.nn's switch
# ------------------------------------------------------------------------------------------


def _train_grads(cin, cout, mode, dtype=torch.float32, bias=True):
    x, gy = _case(2, cin, cout, 6, 5)
    x, gy = x.to(dtype).contiguous(memory_format=CL), gy.to(dtype)
    w = (torch.randn(cout, cin, 3, 3, generator=torch.Generator().manual_seed(1)) / 9).to(dtype)
    w.requires_grad_()
    b = torch.randn(cout, dtype=dtype, requires_grad=True) if bias else None
    WG.conv3x3_winograd_train(x, w, b, None, mode).backward(gy)
    return x, w.detach(), gy, w.grad, None if b is None else b.grad


@pytest.mark.parametrize(
    "cin, cout, mode, winograd",
    [
        (64, 16, "auto", True),  # Cin >= 64
        (16, 64, "auto", True),  # Cout >= 64
        (32, 48, "auto", False),
        (8, 8, "on", True),
        (64, 64, "off", False),
    ],
)
def test_which_weight_gradients_are_winograd(cin, cout, mode, winograd):
    """The weight gradient is bit for bit the op's (or torch's), the bias gradient grad_out's sum."""
    x, w, gy, grad_w, grad_b = _train_grads(cin, cout, mode)
    by_torch = torch.ops.aten.convolution_backward(
        gy, x, w, [cout], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, True]
    )
    expected = op(x, gy) if winograd else by_torch[1]
    assert torch.equal(grad_w, expected)
    assert not torch.equal(op(x, gy), by_torch[1])  # (the two differ in their rounding)
    torch.testing.assert_close(grad_b, by_torch[2])


def test_bf16_and_create_graph_keep_torchs_weight_gradient():
    x, w, gy, grad_w, _ = _train_grads(64, 64, "on", torch.bfloat16, bias=False)
    by_torch = torch.ops.aten.convolution_backward(
        gy, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]
    )[1]
    assert torch.equal(grad_w, by_torch)
    x, gy = (t.float() for t in _case(1, 64, 64, 4, 4))
    w = torch.randn(64, 64, 3, 3, requires_grad=True)
    y = WG.conv3x3_winograd_train(x, w, None, None, "on")
    (gw,) = torch.autograd.grad(y, w, gy, create_graph=True)
    assert gw.requires_grad  # torch's differentiable backward
    torch.testing.assert_close(gw, _torch_weight_grad(x, gy), rtol=0, atol=0)


def test_weight_grad_argument_error():
    x, w = torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3)
    with pytest.raises(ValueError, match="weight_grad: expected 'auto', 'on' or 'off', got 'fast'"):
        WG.conv3x3_winograd_train(x, w, None, None, "fast")


def test_nn_switch_reaches_the_backward(monkeypatch):
    torch.manual_seed(0)
    conv = inn.conv_nd(2, 64, 64, 3, padding=1)
    x = torch.randn(2, 64, 6, 6).contiguous(memory_format=CL)
    gy = torch.randn(2, 64, 6, 6)
    grads = {}
    for mode in ("on", "off"):
        conv.zero_grad()
        with inn.conv_winograd_train("on"), inn.conv_winograd_weight_grad(mode):
            assert inn.get_conv_winograd_weight_grad() == mode
            conv(x).backward(gy)
        grads[mode] = conv.weight.grad.clone()
    assert torch.equal(grads["on"], op(x, gy))
    by_torch = torch.ops.aten.convolution_backward(
        gy, x, conv.weight.detach(), [64], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, True]
    )[1]
    assert torch.equal(grads["off"], by_torch)
    torch.testing.assert_close(grads["on"], grads["off"], rtol=1e-5, atol=1e-5)
    previous = inn.set_conv_winograd_weight_grad(False)
    try:
        assert inn.get_conv_winograd_weight_grad() == "off"
        with pytest.raises(ValueError, match="mode: expected 'auto', 'on', 'off', True or False, got 'x'"):
            inn.set_conv_winograd_weight_grad("x")
    finally:
        inn.set_conv_winograd_weight_grad(previous)
    for raw, mode in (("", "auto"), ("0", "off"), ("yes", "on")):
        monkeypatch.setenv("IDDPM_CONV_WINOGRAD_WEIGHT_GRAD", raw)
        assert inn._winograd_weight_grad_mode_from_env() == mode
    monkeypatch.setenv("IDDPM_CONV_WINOGRAD_WEIGHT_GRAD", "fast")
    with pytest.raises(ValueError, match="IDDPM_CONV_WINOGRAD_WEIGHT_GRAD: expected auto, 1 or 0"):
        inn._winograd_weight_grad_mode_from_env()


def test_residual_gradient_keeps_the_incoming_layout():
    """The residual's gradient is grad_out as it came (an NCHW skip connection gets an NCHW
    gradient), not the channels-last copy the Winograd kernels read."""
    torch.manual_seed(0)
    conv = inn.conv_nd(2, 64, 64, 3, padding=1)
    h0 = torch.randn(4, 64, 16, 16, requires_grad=True)
    skip = h0 * 1  # a non-leaf NCHW residual, as in the UNet's ResBlock
    seen = []
    skip.register_hook(lambda g: seen.append(g.is_contiguous()))
    with inn.conv_winograd_train("on"):
        y = inn.conv_add(conv, h0, skip)
    y.backward(torch.randn(y.shape))
    assert seen == [True]


# ------------------------------------------------------------------------------------------
# iddpm::convert_layout, the ops' NCHW <-> channels-last copy
# ------------------------------------------------------------------------------------------

convert = torch.ops.iddpm.convert_layout


@pytest.mark.parametrize(
    "shape", [(2, 128, 32, 32), (3, 5, 7, 9), (2, 17, 33, 1), (1, 16, 4, 4), (0, 3, 2, 2)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int32])
@pytest.mark.parametrize("isa", [None, "avx2", "default"])
def test_convert_layout_is_torchs_copy(shape, dtype, isa, monkeypatch):
    """Both directions, float32/bf16 by the kernel's blocked transpose (full 16×16 blocks and the
    edges; every vector build), other dtypes by torch: the values and strides of torch's own."""
    if isa:
        monkeypatch.setenv("IDDPM_WINOGRAD_CPU_ISA", isa)
    x = (torch.randn(shape) * 100).to(dtype)
    for cl, src in ((True, x), (False, x.contiguous(memory_format=CL))):
        ref = src.contiguous(memory_format=CL if cl else torch.contiguous_format)
        out = convert(src, cl)
        assert torch.equal(out, ref) and out.dtype == dtype
        assert out.stride() == ref.stride() or out.numel() == 0  # (an empty tensor has any strides)


def test_convert_layout_copies_and_passes_gradients():
    x = torch.randn(2, 8, 4, 4)
    same = convert(x, False)  # already NCHW: a copy, never an alias (a custom op's contract)
    assert torch.equal(same, x) and same.data_ptr() != x.data_ptr()
    strided = torch.randn(2, 8, 4, 8)[..., ::2]  # neither layout: torch's copy
    torch.testing.assert_close(convert(strided, True), strided, rtol=0, atol=0)
    torch.library.opcheck(convert.default, (x, True))
    torch.library.opcheck(convert.default, (x.contiguous(memory_format=CL), False))
    leaf = torch.randn(2, 8, 4, 4, requires_grad=True)
    g = torch.randn(2, 8, 4, 4)
    convert(leaf, True).backward(g)
    assert torch.equal(leaf.grad, g)
    assert WG.to_layout(x, False) is x  # the Python helper: no copy where none is needed
    assert WG.to_layout(x, True).is_contiguous(memory_format=CL)
    for device in ("cpu", "meta"):
        with pytest.raises(
            ValueError, match=r"x: expected a 4-D tensor \[N, C, H, W\], got shape \[2, 8, 4\]"
        ):
            convert(torch.zeros(2, 8, 4, device=device), True)
