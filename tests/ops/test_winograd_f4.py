"""Winograd F(4×4, 3×3) (``tile=4``, float32): ``winograd_weight(w, tile=4)`` against the float64
transform, ``conv3x3_winograd`` on it and ``conv3x3_winograd_weight_grad(x, gy, tile=4)`` against
float64 convolutions (odd sizes not multiples of 4, 1×1 maps, channel counts off the vector width,
layouts, bias and residual, several tile blocks, empty inputs, every vector build), its rounding
error next to F(2×2)'s and the direct conv's, opcheck, the argument errors (CPU and meta, same
words), ``conv3x3_winograd_train(tile=4)``'s gradients, and ``iddpm_ext.nn``'s tile switch (which
calls take F(4×4), the environment variable, the UNet's outputs with it against the reference's
computation)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from helpers.models import randomize_, tiny_kwargs
from iddpm_ext import nn as inn
from iddpm_ext.nn import groupnorm_impl
from iddpm_ext.ops import winograd as WG
from iddpm_ext.ops.attention import attention_impl
from iddpm_ext.unet import UNetModel

pytestmark = [
    pytest.mark.kernels,
    pytest.mark.skipif(not WG.available(), reason="needs iddpm_ext._C with the CPU Winograd kernel"),
]

CL = torch.channels_last
conv_op = torch.ops.iddpm.conv3x3_winograd
weight_op = torch.ops.iddpm.winograd_weight
wgrad_op = torch.ops.iddpm.conv3x3_winograd_weight_grad

# F(4×4, 3×3)'s G (points 0, 1, -1, ½, -2, ∞; common/winograd_params.h), exact in float64 up to 1/3, 1/15
G4 = torch.tensor(
    [[1, 0, 0], [1 / 3, 1 / 3, 1 / 3], [-1 / 3, 1 / 3, -1 / 3],
     [-16 / 15, -8 / 15, -4 / 15], [1 / 15, -2 / 15, 4 / 15], [0, 0, 1]],
    dtype=torch.float64,
)  # fmt: skip


def _case(N, Cin, Cout, H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, Cin, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(Cout, Cin, 3, 3, generator=g, dtype=torch.float64) / (9 * max(Cin, 1)) ** 0.5
    b = torch.randn(Cout, generator=g, dtype=torch.float64)
    r = torch.randn(N, Cout, H, W, generator=g, dtype=torch.float64)
    return x, w, b, r


def _err(a, ref):
    return (a.double() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)


CASES = [
    # N, Cin, Cout, H, W
    (2, 32, 48, 8, 8),
    (2, 16, 16, 7, 9),  # the last tiles cover 3 and 1 rows / columns
    (1, 5, 7, 1, 1),  # 1×1 map, channels off the vector width
    (3, 19, 33, 6, 5),
    (2, 24, 20, 16, 1),  # one column
    (1, 3, 130, 2, 6),  # channels past two AVX-512 vectors
    (2, 64, 64, 12, 12),
]


def test_weight_transform_is_g_g_gt_in_float64():
    _, w, _, _ = _case(1, 5, 7, 4, 4)
    u = weight_op(w.float(), False, 4)
    k = torch.kron(G4, G4)  # point (i, j) = row 6i + j
    ref = (k @ w.float().double().permute(1, 0, 2, 3).reshape(5 * 7, 9).t()).view(36, 5, 7)
    assert u.shape == (36, 5, 7) and u.dtype == torch.float32
    torch.testing.assert_close(u, ref.float(), rtol=1e-7, atol=1e-12)
    # strided weights (a channels-last view) give the same transform
    assert torch.equal(weight_op(w.float().contiguous(memory_format=CL), False, 4), u)
    assert torch.equal(WG.winograd_weight(w.float(), tile=4), u)


@pytest.mark.parametrize("N, Cin, Cout, H, W", CASES)
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_conv_matches_float64(N, Cin, Cout, H, W, layout):
    x, w, b, r = _case(N, Cin, Cout, H, W)
    ref = F.conv2d(x, w, b, 1, 1) + r
    xf = x.float() if layout == "nchw" else x.float().contiguous(memory_format=CL)
    u = weight_op(w.float(), False, 4)
    ours = conv_op(xf, u, b.float(), r.float())
    direct = F.conv2d(x.float(), w.float(), b.float(), 1, 1) + r.float()
    assert ours.shape == (N, Cout, H, W) and ours.is_contiguous(memory_format=CL)
    # F(4×4)'s transform coefficients (up to 8) cost precision: at most 16× the direct fp32 conv's
    # max error here (F(2×2): 3×), and ~1e-6 of the output
    assert _err(ours, ref) <= 16 * max(_err(direct, ref), 1e-7) and _err(ours, ref) < 5e-6


def test_rounding_error_next_to_f2_and_direct():
    """At a UNet-like shape (256 channels, SiLU'd input): F(4×4)'s relative error is a few times
    F(2×2)'s and below 3e-6 (F(2×2) ~3e-7, the direct conv ~2e-7)."""
    x, w, _, _ = _case(2, 256, 256, 16, 16, seed=3)
    x = F.silu(x)
    ref = F.conv2d(x, w, None, 1, 1)

    def rel(y):
        return ((y.double() - ref).norm() / ref.norm()).item()

    xf = x.float().contiguous(memory_format=CL)
    e4 = rel(conv_op(xf, weight_op(w.float(), False, 4)))
    e2 = rel(conv_op(xf, weight_op(w.float(), False, 2)))
    direct = rel(F.conv2d(xf, w.float(), None, 1, 1))
    assert e2 < e4 < 3e-6 and e4 < 12 * direct, (e4, e2, direct)


@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_vector_builds_match_float64_too(monkeypatch, isa):
    """Every vector build computes the same transforms (with fused or separate multiply-adds: the
    same values to float rounding), as accurate as the best build's."""
    x, w, b, r = _case(2, 37, 21, 9, 7)
    gy = r.clone()
    ref = F.conv2d(x, w, b, 1, 1) + r
    w0 = torch.zeros_like(w)
    ref_g = torch.ops.aten.convolution_backward(
        gy, x, w0, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]
    )[1]  # fmt: skip
    x, w, b, r, gy = (t.float() for t in (x, w, b, r, gy))
    u = weight_op(w, False, 4)
    monkeypatch.setenv("IDDPM_WINOGRAD_CPU_ISA", isa)
    assert _err(conv_op(x, u, b, r), ref) < 5e-6
    assert _err(wgrad_op(x, gy, 4), ref_g) < 5e-6


def test_several_tile_blocks():
    """Enough tiles for several blocks of the op's 8 MB workspace."""
    x, w, b, _ = _case(3, 128, 160, 46, 42)  # 3 · 12 · 11 = 396 tiles of 36 · 288 floats: 2 blocks
    ref = F.conv2d(x, w, b, 1, 1)
    assert _err(conv_op(x.float(), weight_op(w.float(), False, 4), b.float()), ref) < 5e-6


@pytest.mark.parametrize("N, Cin, Cout, H, W", CASES)
def test_weight_grad_matches_float64(N, Cin, Cout, H, W):
    x, _, _, gy = _case(N, Cin, Cout, H, W)
    w0 = torch.zeros(Cout, Cin, 3, 3, dtype=torch.float64)
    ref = torch.ops.aten.convolution_backward(
        gy, x, w0, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]
    )[1]  # fmt: skip
    ours = wgrad_op(x.float(), gy.float(), 4)
    assert ours.shape == (Cout, Cin, 3, 3) and ours.is_contiguous()
    assert _err(ours, ref) < 5e-6
    assert torch.equal(WG.conv3x3_winograd_weight_grad(x.float(), gy.float(), tile=4), ours)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_weight_grad_several_blocks_and_layouts(layout):
    """Enough tiles for several blocks (dU written by the first block's GEMM, added to by the
    others), channels-last and strided inputs."""
    x, _, _, gy = _case(2, 192, 160, 46, 42)  # 2 · 12 · 11 = 264 tiles of 36 · 352 floats: 2 blocks
    w0 = torch.zeros(160, 192, 3, 3, dtype=torch.float64)
    ref = torch.ops.aten.convolution_backward(
        gy, x, w0, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]
    )[1]  # fmt: skip
    xf, gyf = x.float(), gy.float()
    if layout == "channels_last":
        xf, gyf = xf.contiguous(memory_format=CL), gyf.contiguous(memory_format=CL)
    else:
        xf = torch.stack([xf, xf], 2).flatten(1, 2)[:, ::2]
        gyf = torch.cat([gyf, gyf], 3)[..., :42]
        assert not xf.is_contiguous() and not gyf.is_contiguous()
    assert _err(wgrad_op(xf, gyf, 4), ref) < 5e-6


@pytest.mark.parametrize("tile", [2, 4])
def test_weight_grad_is_float32_under_autocast(tile):
    """Inside a CPU autocast region the op's GEMMs still run in float32 (same bits as outside)."""
    x, _, _, gy = (t.float() for t in _case(2, 32, 48, 12, 12))
    plain = wgrad_op(x, gy, tile)
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            assert torch.equal(wgrad_op(x, gy, tile), plain)


def test_empty_inputs():
    x, w, _, gy = (t.float() for t in _case(0, 4, 6, 5, 5))
    assert conv_op(x, weight_op(w, False, 4)).shape == (0, 6, 5, 5)
    assert torch.equal(wgrad_op(x, gy, 4), torch.zeros(6, 4, 3, 3))
    x, w, _, gy = (t.float() for t in _case(2, 0, 6, 5, 5))
    assert torch.equal(conv_op(x, weight_op(w, False, 4)), torch.zeros(2, 6, 5, 5))
    assert wgrad_op(x, gy, 4).shape == (6, 0, 3, 3)


def test_opcheck():
    x, w, b, r = (t.float() for t in _case(2, 8, 12, 5, 6))
    u = weight_op(w, False, 4)
    torch.library.opcheck(weight_op.default, (w, False, 4))
    torch.library.opcheck(conv_op.default, (x, u, b, r))
    torch.library.opcheck(conv_op.default, (x.contiguous(memory_format=CL), u))
    torch.library.opcheck(wgrad_op.default, (x, r, 4))


_W = torch.zeros(6, 4, 3, 3)
BAD = [
    (weight_op, (_W, False, 3), r"tile: expected 2 \(F\(2x2, 3x3\)\) or 4 \(F\(4x4, 3x3\)\), got 3"),
    (weight_op, (_W.bfloat16(), False, 4), r"weight: tile=4 \(F\(4x4, 3x3\)\) is float32 only, got bfloat16"),
    (weight_op, (_W, True, 4), r"packed: the packed form is F\(2x2, 3x3\) \(tile=2\) only, got tile=4"),
    (
        conv_op,
        (torch.zeros(2, 4, 5, 5), torch.zeros(25, 4, 6)),
        r"weight_t: expected shape \[16, 4, Cout\] or \[36, 4, Cout\] \(winograd_weight of a "
        r"\[Cout, Cin, 3, 3\] weight with tile=2 or 4, Cin = dim 1 of x\), got \[25, 4, 6\]",
    ),
    (
        conv_op,
        (torch.zeros(2, 4, 5, 5).bfloat16(), torch.zeros(36, 4, 6).bfloat16()),
        r"weight_t: tile=4 \(F\(4x4, 3x3\)\) is float32 only, got bfloat16",
    ),
    (wgrad_op, (torch.zeros(2, 4, 5, 5), torch.zeros(2, 6, 5, 5), 5), r"tile: expected 2 .* or 4 .*, got 5"),
]


@pytest.mark.parametrize("op, args, match", BAD)
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_errors_name_the_argument(op, args, match, device):
    with pytest.raises(ValueError, match=match):
        op(*(a.to(device) if isinstance(a, torch.Tensor) else a for a in args))


# ---- the training conv -------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_train_gradients_match_float64(layout):
    x, w, b, r = _case(2, 24, 40, 9, 10)
    fmt = CL if layout == "channels_last" else torch.contiguous_format
    leaves64 = [t.clone().requires_grad_() for t in (x, w, b, r)]
    leaves = [
        t.float().contiguous(memory_format=fmt if t.dim() == 4 else torch.contiguous_format)
        for t in (x, w, b, r)
    ]
    leaves = [t.requires_grad_() for t in leaves]
    gy = torch.randn(2, 40, 9, 10, dtype=torch.float64)
    (F.conv2d(*leaves64[:3], 1, 1) + leaves64[3]).backward(gy)
    y = WG.conv3x3_winograd_train(*leaves, weight_grad="on", tile=4)
    ref = F.conv2d(*(t.detach() for t in leaves64[:3]), 1, 1) + leaves64[3].detach()
    assert _err(y, ref) < 5e-6
    y.backward(gy.float())
    for ours, theirs in zip(leaves, leaves64):
        assert _err(ours.grad, theirs.grad) < 5e-6


@pytest.mark.parametrize("tile", [2, 4])
def test_train_weight_gradient_follows_the_tile(tile):
    """The training conv's Winograd weight gradient is the op's with the call's tile (same bits)."""
    x, w, _, gy = (t.float() for t in _case(2, 16, 24, 12, 12))
    x = x.contiguous(memory_format=CL)
    gy = gy.contiguous(memory_format=CL)
    w.requires_grad_()
    WG.conv3x3_winograd_train(x, w, weight_grad="on", tile=tile).backward(gy)
    assert torch.equal(w.grad, wgrad_op(x, gy, tile))
    assert not torch.equal(w.grad, wgrad_op(x, gy, 6 - tile))


def test_train_tile_errors():
    x, w = torch.zeros(1, 4, 5, 5), torch.zeros(6, 4, 3, 3)
    with pytest.raises(ValueError, match=r"tile: expected 2 .* or 4 .*, got 3"):
        WG.conv3x3_winograd_train(x, w, tile=3)
    with pytest.raises(ValueError, match=r"x: tile=4 \(F\(4x4, 3x3\)\) is float32 only, got bfloat16"):
        WG.conv3x3_winograd_train(x.bfloat16(), w.bfloat16(), tile=4)


# ---- iddpm_ext.nn's switch ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, dtype, shape, tile",
    [
        ("auto", torch.float32, (2, 1, 16, 16), 4),  # 32 tiles of 4×4
        ("auto", torch.float32, (1, 1, 16, 16), 2),  # 16: F(2×2)
        ("auto", torch.float32, (8, 1, 8, 8), 4),
        ("auto", torch.float32, (2, 1, 8, 8), 2),
        ("auto", torch.float32, (1, 1, 8, 64), 4),  # 2 · 16 = 32 tiles
        ("auto", torch.float32, (1, 1, 8, 60), 2),  # 2 · 15 = 30 tiles
        ("auto", torch.float32, (64, 1, 7, 7), 2),  # maps under 8×8: F(2×2)
        ("auto", torch.bfloat16, (8, 1, 32, 32), 2),  # bf16: always F(2×2)
        ("4", torch.float32, (1, 1, 2, 2), 4),
        ("4", torch.bfloat16, (8, 1, 32, 32), 2),
        ("2", torch.float32, (8, 1, 32, 32), 2),
    ],
)
def test_which_calls_take_f4(mode, dtype, shape, tile):
    with inn.conv_winograd_tile(mode):
        assert inn._winograd_tile(dtype, torch.zeros(shape)) == tile


@pytest.mark.parametrize(
    "shape, tile",
    [((8, 1, 8, 8), 2), ((8, 1, 16, 16), 4), ((32, 1, 8, 8), 4), ((2, 1, 32, 32), 4), ((1, 1, 32, 32), 2)],
)
def test_training_calls_need_128_tiles(shape, tile):
    """A training conv transforms its weight on every call: F(4×4) from 128 tiles of 4×4."""
    assert inn._winograd_tile(torch.float32, torch.zeros(shape), training=True) == tile
    assert inn._winograd_tile(torch.float32, torch.zeros(shape)) == (
        4 if shape[0] * shape[2] * shape[3] >= 512 else 2
    )


def test_switch_values_errors_and_environment(monkeypatch):
    previous = inn.set_conv_winograd_tile(4)
    try:
        assert inn.get_conv_winograd_tile() == "4"
        assert inn.set_conv_winograd_tile("auto") == "4" and inn.get_conv_winograd_tile() == "auto"
        for bad in (3, "3", True, None, 4.0):
            with pytest.raises(ValueError, match=r"tile: expected 2, 4 or 'auto', got"):
                inn.set_conv_winograd_tile(bad)
        assert inn.get_conv_winograd_tile() == "auto"
    finally:
        inn.set_conv_winograd_tile(previous)
    monkeypatch.setenv("IDDPM_CONV_WINOGRAD_TILE", " 2 ")
    assert inn._winograd_tile_from_env() == "2"
    monkeypatch.setenv("IDDPM_CONV_WINOGRAD_TILE", "")
    assert inn._winograd_tile_from_env() == "auto"
    monkeypatch.setenv("IDDPM_CONV_WINOGRAD_TILE", "6")
    with pytest.raises(
        ValueError, match=r"IDDPM_CONV_WINOGRAD_TILE: expected auto, 2 or 4 \(or unset\), got '6'"
    ):
        inn._winograd_tile_from_env()


@pytest.fixture
def points(monkeypatch):
    """The number of transformed points (16: F(2×2), 36: F(4×4)) of each Winograd conv call."""
    calls = []
    real = WG.conv3x3_winograd

    def wrapped(x, weight_t, bias=None, residual=None):
        calls.append(weight_t.shape[0])
        return real(x, weight_t, bias, residual)

    monkeypatch.setattr(WG, "conv3x3_winograd", wrapped)
    return calls


def _model():
    kw = tiny_kwargs(out_channels=6, use_scale_shift_norm=True, num_heads=2)
    return randomize_(UNetModel(**kw), 0).eval()


def test_unet_inference_with_f4_matches_the_reference_computation(points):
    model = _model()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([3, 800])
    with torch.no_grad(), attention_impl("einsum"), groupnorm_impl("torch"):
        expected = model(x, t)
    fast = copy.deepcopy(model).to_inference()
    with torch.no_grad(), inn.conv_winograd("fp32"):
        with inn.conv_winograd_tile("4"):
            got4 = fast(x, t)
        n4 = list(points)
        with inn.conv_winograd_tile("2"):
            got2 = fast(x, t)
    assert n4 and set(n4) == {36} and set(points[len(n4) :]) == {16}
    assert not torch.equal(got4, got2)
    rel = ((got4.double() - expected.double()).norm() / expected.double().norm()).item()
    assert rel <= 1e-5


@pytest.fixture
def train_tiles(monkeypatch):
    """The tile of each Winograd training conv call."""
    calls = []
    real = WG.conv3x3_winograd_train

    def wrapped(*args):
        calls.append(args[5])
        return real(*args)

    monkeypatch.setattr(WG, "conv3x3_winograd_train", wrapped)
    return calls


def test_unet_training_step_with_f4(train_tiles):
    """A training forward + backward with F(4×4) (forward and input gradients) against torch's convs:
    the loss and every parameter gradient agree to float32 rounding."""
    model = _model().train()
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([5, 500])

    def grads(train_mode, tile):
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout masks
        with inn.conv_winograd_train(train_mode), inn.conv_winograd_tile(tile):
            loss = model(x, t).square().mean()
            loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_ref, g_ref = grads("off", "2")
    assert not train_tiles
    loss4, g4 = grads("on", "4")
    assert train_tiles and set(train_tiles) == {4}
    torch.testing.assert_close(loss4, loss_ref, rtol=1e-5, atol=0)
    flat4, flat_ref = torch.cat([a.flatten() for a in g4]), torch.cat([b.flatten() for b in g_ref])
    assert ((flat4 - flat_ref).norm() / flat_ref.norm()).item() < 2e-5
    scale = flat_ref.abs().max().item()
    for a, b in zip(g4, g_ref):  # (some gradients are ~1e-9 of the largest: compared at its scale)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)
