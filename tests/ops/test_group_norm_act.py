"""iddpm::group_norm_act (+ backward): the fused GroupNorm + scale-shift + SiLU against an
independent float64 computation (fp32 ≤ 1e-5 relative, fp16/bf16 within 2× of the reference's
eager composition in that dtype), gradcheck in float64 (NCHW, channels-last, 1-D/3-D, with and
without parameters), opcheck, torch.compile(fullgraph=True), argument errors, empty tensors."""

from __future__ import annotations

import pytest
import torch

from helpers.group_norm import make, oracle
from helpers.oracles import check_two_x_rule, max_err
from iddpm_ext.ops import group_norm as GN

pytestmark = pytest.mark.kernels

op = torch.ops.iddpm.group_norm_act
op_bwd = torch.ops.iddpm.group_norm_act_backward


@pytest.fixture(params=["native", "avx2", "default"])
def isa(request, monkeypatch):
    """Runs a test with each vector build of the CPU kernel this machine can execute."""
    if request.param != "native":
        monkeypatch.setenv("IDDPM_GN_CPU_ISA", request.param)
    return request.param


CASES = [
    # shape, groups, channels_last
    ((2, 64, 8, 8), 32, False),
    ((2, 64, 8, 8), 32, True),
    ((3, 48, 5, 7), 4, True),  # C = 48: a vector tail per channels-last row
    ((2, 32, 300), 8, False),  # 1-D, S = 300: chunks and a tail per row
    ((1, 16, 3, 4, 5), 4, False),  # 3-D
    ((2, 8, 1, 1), 8, False),  # one element per group
    # channels-last sums kept in registers, up to 8 vectors of channels per sweep (4 in the
    # backward; fp32 lanes: 16 AVX-512, 8 AVX2 and baseline): C = 328 is several sweeps (and a
    # part vector with AVX-512), C = 44 a part vector with every build
    ((2, 328, 3, 2), 8, True),
    ((3, 24, 4, 4), 24, True),  # one channel per group, one vector and a half (AVX-512)
    ((2, 44, 3, 3), 4, True),
]


@pytest.mark.parametrize("shape, G, cl", CASES)
@pytest.mark.parametrize(
    "silu, params, film", [(True, True, True), (False, True, False), (True, False, True)]
)
def test_forward_f32_matches_float64(shape, G, cl, silu, params, film, isa):
    x, G, w, b, sc, sh = make(shape, G, params=params, film=film, channels_last=cl)
    out, mean, rstd = op(x, G, w, b, sc, sh, 1e-5, silu)
    ref = oracle(x, G, w, b, sc, sh, 1e-5, silu)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    assert max_err(out, ref) <= 1e-5 * ref.abs().max().item()
    xg = x.double().reshape(shape[0], G, -1)
    assert mean.shape == (shape[0], G) and mean.dtype == torch.float32
    torch.testing.assert_close(mean.double(), xg.mean(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        rstd.double(), 1 / torch.sqrt(xg.var(-1, unbiased=False) + 1e-5), rtol=1e-5, atol=0
    )


def test_forward_f64_exact_and_large_mean():
    # C = 200: float64 sweeps of 64 channels (AVX-512) and a part; C = 74: a part vector with
    # every build (float64 lanes: 8 AVX-512, 4 AVX2 and baseline)
    for shape, G in (((2, 32, 6, 6), 8), ((2, 200, 3, 3), 8), ((2, 74, 3, 3), 2)):
        x, G, w, b, sc, sh = make(shape, G, dtype=torch.float64, channels_last=True)
        out = GN.group_norm_act(x, G, w, b, sc, sh, 1e-6, True)
        torch.testing.assert_close(out, oracle(x, G, w, b, sc, sh, 1e-6), rtol=1e-12, atol=1e-12)
    # A large mean next to a small spread: the two-pass variance keeps fp32 accurate.
    x, G, w, b, sc, sh = make((2, 32, 8, 8), 8, offset=1000.0)
    x = (x - 1000.0) * 1e-2 + 1000.0
    ref = oracle(x, G, w, b, sc, sh)
    assert max_err(GN.group_norm_act(x, G, w, b, sc, sh), ref) <= 2e-2 * ref.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cl", [False, True])
def test_low_precision_two_x_rule(dtype, cl, isa):
    x, G, w, b, sc, sh = make((2, 64, 16, 16), 32, dtype=dtype, channels_last=cl)
    sc, sh = sc.to(dtype), sh.to(dtype)  # the ResBlock's emb_out chunks are in h's dtype
    ours = GN.group_norm_act(x, G, w, b, sc, sh)
    eager = GN.group_norm_act_reference(x, G, w, b, sc, sh)
    assert ours.dtype == dtype and ours.is_contiguous(
        memory_format=torch.channels_last if cl else torch.contiguous_format
    )
    check_two_x_rule(ours, eager, oracle(x, G, w, b, sc, sh), f"forward {dtype}")
    # The backward: grads against float64 autograd of the oracle.
    xs = [t.detach().requires_grad_() for t in (x, w, b, sc, sh)]
    g = torch.Generator().manual_seed(3)
    dy = torch.randn(x.shape, generator=g).to(dtype)
    grads_ours = torch.autograd.grad(GN.group_norm_act(xs[0], G, *xs[1:]), xs, dy)
    grads_eager = torch.autograd.grad(GN.group_norm_act_reference(xs[0], G, *xs[1:]), xs, dy)
    x64 = [t.detach().double().requires_grad_() for t in xs]
    grads_ref = torch.autograd.grad(oracle(x64[0], G, *x64[1:]), x64, dy.double())
    for name, a, e, r in zip(("x", "weight", "bias", "scale", "shift"), grads_ours, grads_eager, grads_ref):
        assert a.dtype == e.dtype
        check_two_x_rule(a, e, r, f"grad {name} {dtype}")


@pytest.mark.parametrize("shape, G, cl", CASES[:5] + CASES[6:])
def test_backward_f32_matches_float64(shape, G, cl, isa):
    x, G, w, b, sc, sh = make(shape, G, channels_last=cl, seed=4)
    xs = [t.detach().requires_grad_() for t in (x, w, b, sc, sh)]
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    grads = torch.autograd.grad(GN.group_norm_act(xs[0], G, *xs[1:]), xs, dy)
    x64 = [t.detach().double().requires_grad_() for t in xs]
    refs = torch.autograd.grad(oracle(x64[0], G, *x64[1:]), x64, dy.double())
    for name, a, r in zip(("x", "weight", "bias", "scale", "shift"), grads, refs):
        assert a.dtype == torch.float32 and a.shape == r.shape, name
        assert max_err(a, r) <= 1e-5 * r.abs().max().item(), name
    assert grads[0].is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


@pytest.mark.parametrize(
    "shape, G, cl, params, film, silu",
    [
        ((2, 8, 3, 3), 2, False, True, True, True),
        ((2, 8, 3, 3), 4, True, True, True, True),
        ((2, 6, 5), 3, False, False, True, True),
        ((1, 4, 2, 2, 2), 2, False, True, False, False),
        ((2, 8, 3, 2), 2, True, False, False, False),
        ((1, 76, 2, 1), 4, True, True, True, True),  # float64 sweeps: 32 / 64 channels and a part
        ((1, 74, 2, 1), 2, True, True, True, True),  # a float64 part vector with every build
    ],
)
def test_gradcheck_f64(shape, G, cl, params, film, silu):
    x, G, w, b, sc, sh = make(shape, G, dtype=torch.float64, params=params, film=film, channels_last=cl)
    args = [None if t is None else t.double().requires_grad_() for t in (x, w, b, sc, sh)]

    def f(x, w, b, sc, sh):
        return GN.group_norm_act(x, G, w, b, sc, sh, 1e-5, silu)

    assert torch.autograd.gradcheck(f, args)


def test_gradient_flows_to_some_inputs_only():
    x, G, w, b, sc, sh = make((2, 8, 4, 4), 2)
    x.requires_grad_()
    out = GN.group_norm_act(x, G, w, b, sc, sh)
    (gx,) = torch.autograd.grad(out.sum(), [x])
    assert gx.shape == x.shape and torch.isfinite(gx).all()


@pytest.mark.slow  # opcheck traces both ops through fake tensors and AOT dispatch (~4 s on 2 cores)
def test_opcheck_forward_and_backward():
    x, G, w, b, sc, sh = make((2, 8, 3, 4), 4, dtype=torch.float64, channels_last=True)
    req = [t.requires_grad_() for t in (x, w, b, sc, sh)]
    torch.library.opcheck(op.default, (req[0], G, *req[1:], 1e-5, True))
    x, G, w, b, sc, sh = make((2, 8, 7), 2, film=False)
    out, mean, rstd = op(x, G, w, b, None, None, 1e-5, False)
    torch.library.opcheck(op_bwd.default, (torch.randn_like(out), x, mean, rstd, G, w, b, None, None, False))


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.GroupNorm(4, 16)
        self.emb = torch.nn.Linear(8, 32)
        self.conv = torch.nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x, e):
        scale, shift = self.emb(e).chunk(2, dim=1)
        h = GN.group_norm_act(x, 4, self.norm.weight, self.norm.bias, scale, shift, self.norm.eps, True)
        return self.conv(h)


@pytest.mark.slow  # torch.compile of a small block, forward and backward (~3 s on 2 cores)
def test_torch_compile_fullgraph():
    torch.manual_seed(6)
    model = _Block()
    x, e = torch.randn(2, 16, 6, 6), torch.randn(2, 8)
    eager = model(x, e)
    eager.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out = torch.compile(model, fullgraph=True)(x, e)
    out.sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


def test_empty_tensors():
    x, G, w, b, sc, sh = make((0, 8, 3, 3), 2)
    out, mean, rstd = op(x, G, w, b, sc, sh, 1e-5, True)
    assert out.shape == x.shape and mean.shape == (0, 2)
    gx, gw, gb, gsc, gsh = op_bwd(out, x, mean, rstd, G, w, b, sc, sh, True)
    assert gx.shape == x.shape and gsc.shape == (0, 8)
    assert torch.equal(gw, torch.zeros(8)) and torch.equal(gb, torch.zeros(8))
    x = torch.randn(2, 8, 0)  # no positions: an empty output, finite statistics
    out, mean, rstd = op(x, 2, None, None, None, None, 1e-5, True)
    assert out.shape == x.shape and torch.isfinite(rstd).all()


def _bad(**kw):
    x, G, w, b, sc, sh = make((2, 8, 3, 3), 4)
    args = dict(x=x, num_groups=G, weight=w, bias=b, scale=sc, shift=sh, eps=1e-5, silu=True)
    args.update(kw)
    return args


BAD = [
    (dict(num_groups=3), "num_groups: expected a positive divisor of the channel count C = 8"),
    (dict(num_groups=0), "num_groups: expected a positive divisor"),
    (dict(weight=torch.ones(4)), r"weight: expected shape \[8\] \(\[C\] of x\), got \[4\]"),
    (dict(bias=torch.ones(8, 1)), r"bias: expected shape \[8\]"),
    (dict(scale=torch.ones(8)), r"scale: expected shape \[2, 8\] \(\[N, C\] of x\), got \[8\]"),
    (dict(shift=torch.ones(3, 8)), r"shift: expected shape \[2, 8\]"),
    (dict(weight=torch.ones(8, dtype=torch.int32)), "weight: expected a floating-point dtype"),
    (dict(x=torch.ones(2, 8, 3, dtype=torch.int64)), "x: expected dtype"),
    (dict(x=torch.ones(8)), r"x: expected a tensor \[N, C, \*\] of at least 2 dims, got shape \[8\]"),
    (dict(eps=0.0), "eps: expected a finite number > 0, got 0"),
    (dict(eps=float("nan")), "eps: expected a finite number > 0"),
    (dict(eps=float("inf")), "eps: expected a finite number > 0"),
]


@pytest.mark.parametrize("kw, match", BAD)
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_forward_errors_name_the_argument(kw, match, device):
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in _bad(**kw).items()}
    with pytest.raises(ValueError, match=match):
        op(*args.values())


def test_fake_cuda_refuses_more_item_groups_than_the_grid_takes(monkeypatch):
    """Traced for CUDA (fake tensors), the op refuses N · G > 2³¹ - 1 (one CUDA block per batch
    item and group) as check_x does on the card, with its words."""
    from torch._subclasses import fake_tensor

    monkeypatch.setattr(fake_tensor, "init_gpu_context", lambda device: None)  # (no GPU here)
    with fake_tensor.FakeTensorMode():
        x = torch.empty(2**20, 4096, 1, device="cuda")
        want = r"num_groups: expected at most 2147483647 batch items × groups on CUDA, got 1048576 × 4096"
        with pytest.raises(ValueError, match=want):
            op(x, 4096, None, None, None, None, 1e-5, True)
        out = op(x[:4], 4096, None, None, None, None, 1e-5, True)[0]  # within the limit: traced
        assert out.shape == (4, 4096, 1) and out.device.type == "cuda"


def test_device_and_backward_errors():
    args = _bad()
    args["scale"] = args["scale"].to("meta")  # meta mixed with CPU reaches the fake: refused
    with pytest.raises(ValueError, match="scale: expected a tensor on cpu"):
        op(*args.values())
    x, G, w, b, sc, sh = make((2, 8, 3, 3), 4)
    out, mean, rstd = op(x, G, w, b, sc, sh, 1e-5, True)
    for device in ("cpu", "meta"):
        d = [t.to(device) for t in (out, x, mean, rstd)]
        with pytest.raises(ValueError, match=r"grad_out: expected shape \[2, 8, 3, 3\] \(that of x\)"):
            op_bwd(d[0][:1], d[1], d[2], d[3], G, None, None, None, None, True)
        with pytest.raises(ValueError, match="grad_out: expected dtype float32 \\(that of x\\), got float64"):
            op_bwd(d[0].double(), d[1], d[2], d[3], G, None, None, None, None, True)
        with pytest.raises(ValueError, match=r"mean: expected shape \[2, 4\]"):
            op_bwd(d[0], d[1], d[2][:, :2], d[3], G, None, None, None, None, True)
        with pytest.raises(ValueError, match="rstd: expected dtype"):
            op_bwd(d[0], d[1], d[2], d[3].double(), G, None, None, None, None, True)


def test_capabilities_list_the_cpu_dtypes(isa):
    from iddpm_ext import _C

    caps = _C.capabilities()["group_norm"]["cpu"]
    if isa != "native":
        assert caps["isa"] == isa
    assert set(caps["dtypes"]) == {"float32", "float64", "float16", "bfloat16"}
    assert GN.fused_supported(torch.ones(1, 2, dtype=torch.bfloat16))
    assert not GN.fused_supported(torch.ones(1, 2, dtype=torch.int32))
