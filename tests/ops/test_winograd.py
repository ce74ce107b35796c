"""iddpm::conv3x3_winograd / iddpm::winograd_weight: the CPU Winograd F(2×2, 3×3) conv against
float64 ``F.conv2d`` — fp32 within 3× of torch's own fp32 NCHW conv error, bf16 within 4× of
torch's bf16 conv error and exact where every rounding is (small integers) — odd and tiny shapes,
channel counts off the vector width, bias / residual, both input layouts, every vector build
(bit-identical), several tile blocks, the bf16 weight transform rounded once, empty tensors,
opcheck, argument errors (CPU and meta), a clear error on backward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from iddpm_ext.ops import winograd as WG

pytestmark = pytest.mark.kernels

conv = torch.ops.iddpm.conv3x3_winograd
wweight = torch.ops.iddpm.winograd_weight


@pytest.fixture(params=["native", "avx2", "default"])
def isa(request, monkeypatch):
    """Runs a test with each vector build of the transforms this machine can execute."""
    if request.param != "native":
        monkeypatch.setenv("IDDPM_WINOGRAD_CPU_ISA", request.param)
    return request.param


def _case(N, Cin, Cout, H, W, bias=True, residual=False, channels_last=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, Cin, H, W, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(Cout, Cin, 3, 3, generator=g) / (9 * max(Cin, 1)) ** 0.5
    b = torch.randn(Cout, generator=g) if bias else None
    r = torch.randn(N, Cout, H, W, generator=g) if residual else None
    return x, w, b, r


def _oracle(x, w, b, r):
    y = F.conv2d(x.double(), w.double(), None if b is None else b.double(), 1, 1)
    return y if r is None else y + r.double()


def _err(y, ref):
    return (y.double() - ref).abs().max().item() / ref.abs().max().item()


CASES = [
    # N, Cin, Cout, H, W
    (2, 32, 48, 8, 8),
    (2, 16, 16, 7, 9),  # odd H and W: the last tile row/column half outside
    (1, 5, 7, 1, 1),  # 1×1 map, channels off the vector width
    (3, 19, 33, 3, 5),  # odd everything, a vector tail in each channel loop
    (1, 3, 17, 2, 2),  # one tile
    (2, 64, 24, 16, 1),  # one column
]


@pytest.fixture(params=["auto", "bmm"])
def gemm(request, monkeypatch):
    """Runs a test with each float32 GEMM path: "auto" (cpublas::brgemm blocks: oneDNN's micro-kernel
    where it runs) and one at::bmm."""
    monkeypatch.setenv("IDDPM_WINOGRAD_GEMM", request.param)
    return request.param


@pytest.mark.parametrize("N, Cin, Cout, H, W", CASES)
@pytest.mark.parametrize(
    "bias, residual, cl", [(True, False, True), (False, True, False), (True, True, True)]
)
def test_matches_float64_within_3x_torch_fp32_error(N, Cin, Cout, H, W, bias, residual, cl, isa, gemm):
    x, w, b, r = _case(N, Cin, Cout, H, W, bias, residual, cl)
    y = conv(x, wweight(w), b, r)
    ref = _oracle(x, w, b, r)
    assert y.shape == (N, Cout, H, W) and y.dtype == torch.float32
    assert y.is_contiguous(memory_format=torch.channels_last)
    # torch's own fp32 error, its more accurate (NCHW) conv (floor: a few float32 ulps of the
    # output's scale). At the model's shapes Winograd measured 1.4-2x of it (and 0.3-0.4x of the
    # channels-last conv's error): docs/unet.md.
    torch_y = F.conv2d(x.contiguous(), w, b, 1, 1) + (0 if r is None else r)
    torch_err = _err(torch_y, ref)
    assert _err(y, ref) <= 3 * max(torch_err, 2e-7), (_err(y, ref), torch_err)


def _bf16(*tensors):
    return [None if t is None else t.bfloat16() for t in tensors]


@pytest.mark.parametrize("N, Cin, Cout, H, W", CASES)
@pytest.mark.parametrize(
    "bias, residual, cl", [(True, False, True), (False, True, False), (True, True, True)]
)
def test_bf16_matches_float64_within_4x_torch_bf16_error(N, Cin, Cout, H, W, bias, residual, cl, isa):
    x, w, b, r = _bf16(*_case(N, Cin, Cout, H, W, bias, residual, cl))
    y = conv(x, wweight(w), b, r)
    ref = _oracle(x, w, b, r)  # float64 of the bf16 values
    assert y.shape == (N, Cout, H, W) and y.dtype == torch.bfloat16
    assert y.is_contiguous(memory_format=torch.channels_last)
    # torch's direct bf16 conv rounds only its output (and the residual add); Winograd also rounds
    # the transformed input and weight and the GEMMs' products to bf16: 0.9-2.7x of it over these
    # cases (floor: half a bf16 ulp of the output's scale).
    torch_y = F.conv2d(x, w, b, 1, 1) + (0 if r is None else r)
    torch_err = _err(torch_y, ref)
    assert _err(y, ref) <= 4 * max(torch_err, 2.0**-9), (_err(y, ref), torch_err)


def _int_case(N, Cin, Cout, H, W, seed=0, residual=True):
    """bf16 values on which every rounding of the bf16 path is exact: x and w in {-1, 0, 1}, w
    nonzero for input channels 0 and Cin - 1 only (V: sums of 4 entries; U: quarters up to 9/4;
    M: at most 2 · 4 · 9/4 in steps of 1/4, all exact in bf16's 8 bits), integer bias and
    residual. The result is the exact convolution."""
    g = torch.Generator().manual_seed(seed)
    x = (
        torch.randint(-1, 2, (N, Cin, H, W), generator=g)
        .float()
        .contiguous(memory_format=torch.channels_last)
    )
    w = torch.zeros(Cout, Cin, 3, 3)
    for c in {0, Cin - 1}:
        w[:, c] = torch.randint(-1, 2, (Cout, 3, 3), generator=g).float()
    b = torch.randint(-4, 5, (Cout,), generator=g).float()
    r = torch.randint(-4, 5, (N, Cout, H, W), generator=g).float() if residual else None
    return x, w, b, r


@pytest.mark.parametrize(
    "N, Cin, Cout, H, W",
    [(2, 19, 33, 7, 9), (1, 2, 5, 1, 1), (3, 37, 17, 2, 3), (1, 64, 40, 16, 1), (2, 1, 3, 4, 4)],
)
def test_bf16_exact_where_every_rounding_is(N, Cin, Cout, H, W, isa):
    """Exactness pins the bf16 path's indexing and transforms (vector tails of both channel loops,
    odd maps, 1×1 maps, bias, residual) to the bit, independently of any error bound."""
    x, w, b, r = _int_case(N, Cin, Cout, H, W)
    expected = _oracle(x, w, b, r)
    assert expected.abs().max() <= 256  # integers exact in bf16
    y = conv(*_bf16(x, wweight(w.bfloat16()), b, r))
    assert y.dtype == torch.bfloat16 and torch.equal(y.double(), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vector_builds_agree_bitwise(monkeypatch, dtype):
    """The transforms are elementwise over channels: every ISA build gives the same bits, NaN
    included; in bf16 every NaN is stored as c10::BFloat16's 0x7FC0, as torch rounds it (inf - inf
    in a transform gives x86's negative default NaN, which plain rounding would keep negative)."""
    x, w, b, r = (t.to(dtype) for t in _case(2, 40, 24, 6, 5, residual=True))
    x[1, 7, 2, 3] = float("nan")
    x[0, 39, 0, 0] = x[0, 39, 2, 0] = float("inf")  # rows 0 and 2 of a patch, the last (tail) channel
    u = wweight(w)
    outs = []
    for name in ("avx512", "avx2", "default"):
        monkeypatch.setenv("IDDPM_WINOGRAD_CPU_ISA", name)
        outs.append(conv(x, u, b, r))
    assert outs[0][0].isnan().any() and outs[0][1].isnan().any()
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32  # NaN != NaN: compare the bits
    assert all(torch.equal(outs[0].view(bits), o.view(bits)) for o in outs[1:])
    if dtype == torch.bfloat16:
        for o in outs:
            assert set(o.view(torch.int16)[o.isnan()].tolist()) == {0x7FC0}


@pytest.mark.parametrize("flip", [False, True])
def test_f2_weight_transform_builds_agree_bitwise(monkeypatch, flip):
    """F(2×2)'s weight transform (G of 0, ±½, 1: exact products, so fused multiply-adds change
    nothing) gives the same bits in every ISA build, float32 and bf16, blocks of 16 output
    channels and a tail, weights over 12 decades."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(37, 5, 3, 3, generator=g) * torch.logspace(-6, 6, 37).view(-1, 1, 1, 1)
    outs = {torch.float32: [], torch.bfloat16: []}
    for name in ("avx512", "avx2", "default"):
        monkeypatch.setenv("IDDPM_WINOGRAD_CPU_ISA", name)
        for dtype, got in outs.items():
            got.append(wweight(w.to(dtype).transpose(0, 1) if flip else w.to(dtype), False, 2, flip))
    for dtype, got in outs.items():
        bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
        assert all(torch.equal(got[0].view(bits), o.view(bits)) for o in got[1:]), dtype


def test_several_tile_blocks_match_torch(gemm):
    """512 + 512 channels: blocks of 128 tiles, so 2 × 9 × 9 = 162 tiles run as two blocks (and,
    with the brgemm GEMMs, row blocks of 64 with a tail, column blocks of 64)."""
    x, w, b, r = _case(2, 512, 512, 17, 17, residual=True, seed=3)
    y = conv(x, wweight(w), b, r)
    expected = F.conv2d(x, w, b, 1, 1) + r
    assert ((y - expected).norm() / expected.norm()).item() <= 1e-6


def test_bf16_several_tile_blocks_exact():
    """bf16 blocks hold twice the tiles (256 at 512 + 512 channels): 2 × 12 × 12 = 288 tiles run as
    two blocks, exactly (the small-integer case)."""
    x, w, b, r = _int_case(2, 512, 512, 23, 24, seed=3)
    y = conv(*_bf16(x, wweight(w.bfloat16()), b, r))
    assert torch.equal(y.double(), _oracle(x, w, b, r))


def test_weight_transform_matches_float64_formula():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 4, 3, 3, generator=g)
    G = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64)
    ref = torch.einsum("ir,ocrs,js->ijco", G, w.double(), G).reshape(16, 4, 6)
    u = wweight(w)
    assert u.shape == (16, 4, 6) and u.dtype == torch.float32
    torch.testing.assert_close(u.double(), ref, rtol=0, atol=1e-6)
    # any strides: a channels-last and a transposed view give the same transform
    assert torch.equal(wweight(w.contiguous(memory_format=torch.channels_last)), u)
    wt = w.transpose(0, 1).contiguous().transpose(0, 1)
    assert not wt.is_contiguous() and torch.equal(wweight(wt), u)


def _bf16_nearest(v: float) -> float:
    """v rounded once to bf16 (to nearest, ties to even): the oracle of the weight transform
    (torch's float64 -> bf16 conversion rounds through float32, twice)."""
    if v == 0 or not math.isfinite(v):
        return v
    m, e = math.frexp(v)  # v = m · 2^e, 0.5 <= |m| < 1; bf16 keeps 8 significant bits
    r = math.ldexp(round(m * 256) / 256, e)  # m · 256 is exact; round() ties to even
    return r if abs(r) <= _BF16_MAX else math.copysign(math.inf, v)


_BF16_MAX = math.ldexp(255 / 128, 127)  # the largest finite bf16


def test_bf16_weight_transform_rounds_once():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(5, 3, 3, 3, generator=g).bfloat16()
    # U[1][0] = (g00 + g10 + g20) / 2 = (1 + 2^-8 + 2^-30) / 2: rounded once it is above the bf16
    # tie (0.5 · (1 + 2^-7)); rounded through float32 it would be the tie itself, then 0.5.
    w[0, 0, :, 0] = torch.tensor([1.0, 2.0**-8, 2.0**-30], dtype=torch.bfloat16)
    G = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64)
    exact = torch.einsum("ir,ocrs,js->ijco", G, w.double(), G).reshape(16, 3, 5)
    u = wweight(w)
    assert u.shape == (16, 3, 5) and u.dtype == torch.bfloat16
    expected = torch.tensor([_bf16_nearest(v) for v in exact.flatten().tolist()], dtype=torch.float64)
    assert torch.equal(u.double().flatten(), expected)
    assert u[4, 0, 0].item() == 0.5 * (1 + 2.0**-7)
    assert torch.equal(wweight(w.contiguous(memory_format=torch.channels_last)), u)


@pytest.mark.parametrize("flip", [False, True])
def test_bf16_weight_transform_rounds_once_in_every_lane(flip):
    """Blocks of 16 output channels and a tail (Cout = 37), values planted just above, at and
    below bf16 ties (where rounding through float32 would round twice), and overflow to ±inf and
    NaN: every element the once-rounded float64 transform (flip: of the rotated filter)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(37, 4, 3, 3, generator=g).bfloat16()
    for co in (0, 7, 15, 16, 31, 36):  # U[1][0] = (g00 + g10 + g20) / 2: above, at, below a tie
        tiny = (2.0**-30, 0.0, -(2.0**-30))[co % 3]
        w[co, co % 4, :, 0] = torch.tensor([1.0, 2.0**-8, tiny], dtype=torch.bfloat16)
    w[20, 1] = 3.0e38  # sums beyond the bf16 range: inf
    w[21, 2, 0, 0], w[21, 2, 1, 1] = float("inf"), float("-inf")  # inf - inf: NaN
    w[22, 3, 2, 2] = float("nan")
    G = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64)
    filters = w.double().flip(2, 3) if flip else w.double()
    exact = torch.einsum("ir,ocrs,js->ijco", G, filters, G).reshape(16, 4, 37)
    u = wweight(w, False, 2, flip)
    expected = torch.tensor([_bf16_nearest(v) for v in exact.flatten().tolist()], dtype=torch.float64)
    assert torch.isinf(expected).any() and torch.isnan(expected).any()
    torch.testing.assert_close(u.double().flatten(), expected, rtol=0, atol=0, equal_nan=True)


def test_gemm_switch(monkeypatch):
    """IDDPM_WINOGRAD_GEMM picks the float32 GEMM path (cpublas::brgemm blocks or one at::bmm);
    each gives the float64 oracle's result within fp32 error (channel counts off the 64-column
    blocks, a row tail); a bad value is a clear error."""
    x, w, b, r = _case(2, 70, 67, 9, 11, residual=True, seed=5)
    ref = _oracle(x, w, b, r)
    u = wweight(w)
    for mode in ("bmm", "brgemm", "auto"):
        monkeypatch.setenv("IDDPM_WINOGRAD_GEMM", mode)
        assert _err(conv(x, u, b, r), ref) <= 1e-5, mode
    monkeypatch.setenv("IDDPM_WINOGRAD_GEMM", "mkl")
    with pytest.raises(ValueError, match="IDDPM_WINOGRAD_GEMM: expected auto, bmm or brgemm"):
        conv(x, u, b, r)


def test_empty_tensors():
    x, w, b, r = _case(0, 8, 4, 5, 5, residual=True)
    assert conv(x, wweight(w), b, r).shape == (0, 4, 5, 5)
    x, w, b, r = _case(2, 0, 4, 3, 3, residual=True)  # no input channels: bias + residual
    y = conv(x, wweight(w), b, r)
    torch.testing.assert_close(y, r + b.view(1, -1, 1, 1), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    x, w, b, r = (t.to(dtype) for t in _case(2, 8, 12, 5, 6, residual=True))
    torch.library.opcheck(wweight.default, (w,))
    torch.library.opcheck(wweight.default, (w.transpose(0, 1), False, 2, True))  # the input grad's U
    u = wweight(w)
    torch.library.opcheck(conv.default, (x, u, b, r))
    torch.library.opcheck(conv.default, (x.contiguous(), u, None, None))


def test_python_wrappers():
    x, w, b, _ = _case(1, 4, 4, 4, 4)
    assert WG.available()
    torch.testing.assert_close(WG.conv3x3_winograd(x, WG.winograd_weight(w), b), conv(x, wweight(w), b))


def _args():
    x, w, b, r = _case(2, 4, 6, 5, 5, residual=True)
    return dict(x=x, weight_t=wweight(w), bias=b, residual=r)


BAD = [
    (dict(x=torch.zeros(2, 4, 5)), r"x: expected a 4-D tensor \[N, Cin, H, W\], got shape \[2, 4, 5\]"),
    (
        dict(x=torch.zeros(2, 4, 5, 5, dtype=torch.float64)),
        "x: expected dtype float32 or bfloat16, got float64",
    ),
    (dict(weight_t=torch.zeros(9, 4, 6)), r"weight_t: expected shape \[16, 4, Cout\] .*got \[9, 4, 6\]"),
    (dict(weight_t=torch.zeros(16, 3, 6)), r"weight_t: expected shape \[16, 4, Cout\]"),
    (
        dict(weight_t=torch.zeros(16, 4, 6).half()),
        "weight_t: expected dtype float32 or bfloat16, got float16",
    ),
    (
        dict(weight_t=torch.zeros(16, 4, 6).bfloat16()),
        r"weight_t: expected dtype float32 \(that of x\), got bfloat16",
    ),
    (dict(bias=torch.zeros(5)), r"bias: expected shape \[6\] \(\[Cout\] of weight_t\), got \[5\]"),
    (dict(bias=torch.zeros(6, dtype=torch.int64)), "bias: expected dtype float32 or bfloat16, got int64"),
    (dict(bias=torch.zeros(6).bfloat16()), r"bias: expected dtype float32 \(that of x\), got bfloat16"),
    (
        dict(residual=torch.zeros(2, 6, 5, 5).bfloat16()),
        r"residual: expected dtype float32 \(that of x\), got bfloat16",
    ),
    (
        dict(residual=torch.zeros(2, 6, 5, 4)),
        r"residual: expected shape \[2, 6, 5, 5\] \(that of the output\), got \[2, 6, 5, 4\]",
    ),
]


@pytest.mark.parametrize("kw, match", BAD)
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_errors_name_the_argument(kw, match, device):
    args = {**_args(), **kw}
    args = {k: v.to(device) for k, v in args.items()}
    with pytest.raises(ValueError, match=match):
        conv(*args.values())


def test_weight_errors_and_mixed_devices():
    for device in ("cpu", "meta"):
        bad_shape = r"weight: expected shape \[Cout, Cin, 3, 3\], got \[4, 4, 5, 5\]"
        with pytest.raises(ValueError, match=bad_shape):
            wweight(torch.zeros(4, 4, 5, 5, device=device))
        with pytest.raises(ValueError, match="weight: expected dtype float32 or bfloat16, got float64"):
            wweight(torch.zeros(4, 4, 3, 3, dtype=torch.float64, device=device))
    args = _args()
    args["bias"] = args["bias"].to("meta")  # meta mixed with CPU reaches the fake: refused
    with pytest.raises(ValueError, match="bias: expected a tensor on cpu"):
        conv(*args.values())


def test_backward_is_a_clear_error():
    x, w, b, _ = _case(1, 4, 4, 4, 4)
    for y in (conv(x.requires_grad_(True), wweight(w), b), wweight(w.requires_grad_(True))):
        with pytest.raises(RuntimeError, match="have no gradient formula"):
            y.sum().backward()
