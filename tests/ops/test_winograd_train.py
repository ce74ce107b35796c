"""Winograd 3×3 convolutions in training: ``iddpm_ext.ops.winograd.conv3x3_winograd_train`` (the
forward and the input gradient by the Winograd kernel on weights transformed each call, the weight
and bias gradients by torch) against float64 ``F.conv2d`` and its gradients — fp32 within 3× of
torch's own fp32 error, bf16 within 4× of torch's bf16 error — every argument's gradient (and only
those asked for), layouts, argument errors; then ``iddpm_ext.nn.Conv2d`` / ``conv_add`` under
``set_conv_winograd_train`` (which calls take the path in each mode, residual folding, hooks,
no_grad), and the UNet's training step with it against the plain step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from iddpm_ext import nn as inn
from iddpm_ext.ops import winograd as WG

pytestmark = [
    pytest.mark.kernels,
    pytest.mark.skipif(not WG.available(), reason="needs iddpm_ext._C with the CPU Winograd kernel"),
]

CL = torch.channels_last

CASES = [
    # N, Cin, Cout, H, W
    (2, 32, 48, 8, 8),
    (2, 16, 16, 7, 9),  # odd H and W
    (1, 5, 7, 1, 1),  # 1×1 map, channels off the vector width
    (3, 19, 33, 3, 5),
    (2, 64, 24, 16, 1),  # one column
]


def _case(N, Cin, Cout, H, W, bias=True, residual=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, Cin, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(Cout, Cin, 3, 3, generator=g, dtype=torch.float64) / (9 * Cin) ** 0.5
    b = torch.randn(Cout, generator=g, dtype=torch.float64) if bias else None
    r = torch.randn(N, Cout, H, W, generator=g, dtype=torch.float64) if residual else None
    gy = torch.randn(N, Cout, H, W, generator=g, dtype=torch.float64)
    return x, w, b, r, gy


def _torch_conv(x, w, b, r):
    y = F.conv2d(x, w, b, 1, 1)
    return y if r is None else r + y


def _grads(fn, x, w, b, r, gy, dtype, layout):
    """fn's output and the gradients of x, w, b, r (None where absent) for inputs cast to dtype."""
    x = x.to(dtype, copy=True).contiguous(memory_format=layout).requires_grad_()
    leaves = [x] + [None if t is None else t.to(dtype, copy=True).requires_grad_() for t in (w, b, r)]
    y = fn(*leaves)
    y.backward(gy.to(y.dtype))
    return [y.detach()] + [None if t is None else t.grad for t in leaves]


def _err(a, ref):
    return (a.double() - ref).abs().max().item() / ref.abs().max().item()


@pytest.mark.parametrize("N, Cin, Cout, H, W", CASES)
@pytest.mark.parametrize(
    "bias, residual, layout", [(True, False, CL), (False, True, torch.contiguous_format)]
)
@pytest.mark.parametrize("dtype, factor, floor", [(torch.float32, 3, 2e-7), (torch.bfloat16, 4, 2.0**-9)])
def test_output_and_every_gradient_match_float64(
    N, Cin, Cout, H, W, bias, residual, layout, dtype, factor, floor
):
    """Output, grad x, grad w, grad b and grad residual against float64 autograd of F.conv2d,
    within ``factor``× torch's own error in ``dtype`` (bf16: the Winograd forward and input
    gradient round the transformed operands, measured ~2× torch's error)."""
    x, w, b, r, gy = _case(N, Cin, Cout, H, W, bias, residual)
    ref = _grads(_torch_conv, x, w, b, r, gy, torch.float64, layout)
    ours = _grads(WG.conv3x3_winograd_train, x, w, b, r, gy, dtype, layout)
    theirs = _grads(_torch_conv, x, w, b, r, gy, dtype, layout)
    names = ("out", "grad x", "grad weight", "grad bias", "grad residual")
    for name, o, t, e in zip(names, ours, theirs, ref):
        assert (o is None) == (e is None), name
        if e is None:
            continue
        assert o.dtype == dtype and o.shape == e.shape, name
        assert _err(o, e) <= factor * max(_err(t, e), floor), (name, _err(o, e), _err(t, e))
    # the output channels-last (the kernel's layout); grad x in x's own layout
    assert ours[0].is_contiguous(memory_format=CL)
    assert ours[1].is_contiguous(memory_format=layout)


@pytest.mark.parametrize("tile", [2, 4])
def test_transformed_weights_match_the_kernels_and_the_flipped_filter(tile):
    """The training transforms are the op's: the input-gradient one is the op's transform of
    weight.flip(2, 3).transpose(0, 1) (read in place: flip=True on the transposed view), bit
    for bit; under autocast too (float64 inside the op either way)."""
    w = torch.randn(24, 40, 3, 3)
    fwd = WG._train_weight(w, torch.float32, for_input_grad=False, tile=tile)
    bwd = WG._train_weight(w, torch.float32, for_input_grad=True, tile=tile)
    assert torch.equal(fwd, WG.winograd_weight(w, tile=tile))
    flipped = w.flip(2, 3).transpose(0, 1).contiguous()
    assert torch.equal(bwd, WG.winograd_weight(flipped, tile=tile))
    points = (tile + 2) ** 2
    assert fwd.shape == (points, 40, 24) and bwd.shape == (points, 24, 40)
    with torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(WG._train_weight(w, torch.float32, False, tile), fwd)
        if tile == 2:  # bf16: from the bf16 weight, rounded once
            got = WG._train_weight(w.bfloat16(), torch.bfloat16, True)
            assert torch.equal(got, WG.winograd_weight(flipped.bfloat16()))


def test_only_requested_gradients():
    x, w, b, _, gy = _case(2, 8, 8, 5, 5)
    x, w, b, gy = x.float(), w.float().requires_grad_(), b.float(), gy.float()
    y = WG.conv3x3_winograd_train(x, w, b)  # only the weight needs a gradient
    y.backward(gy)
    ref_w = torch.ops.aten.convolution_backward(
        gy, x, w.detach(), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]
    )[1]
    torch.testing.assert_close(w.grad, ref_w, rtol=0, atol=0)


def test_double_backward_is_torchs():
    """create_graph (a gradient penalty): the gradients come from torch's differentiable conv
    backward, so the second derivative exists and equals torch's."""
    x, w, b, r, _ = _case(2, 8, 8, 5, 5, residual=True)

    def penalty(fn):
        xs, ws = x.float().requires_grad_(), w.float().requires_grad_()
        y = fn(xs, ws, b.float(), r.float())
        (gx,) = torch.autograd.grad(y.square().sum(), xs, create_graph=True)
        gx.square().sum().backward()
        return gx.detach(), ws.grad

    ours = penalty(WG.conv3x3_winograd_train)
    theirs = penalty(_torch_conv)
    for a, b_ in zip(ours, theirs):
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-4)


def test_backward_inside_autocast_stays_float32():
    """A float32 forward whose backward runs inside a CPU bf16 autocast region: the input gradient
    (Winograd, its weight transform a GEMM) is float32 math, as torch's own conv backward is."""
    x, w, b, _, gy = _case(2, 32, 32, 8, 8)
    ref = _grads(_torch_conv, x, w, b, None, gy, torch.float64, CL)
    xs = x.float().contiguous(memory_format=CL).requires_grad_()
    y = WG.conv3x3_winograd_train(xs, w.float(), b.float())
    with torch.autocast("cpu", torch.bfloat16):
        y.backward(gy.float())
    assert _err(xs.grad, ref[1]) < 1e-5, _err(xs.grad, ref[1])


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda x, w: (x, w[:, :, :2]), r"weight: expected shape \[Cout, Cin, 3, 3\]"),
        (lambda x, w: (x, w.double()), "weight: expected dtype float32"),
        (lambda x, w: (x[:, :3], w), r"x: expected shape \[N, 4, H, W\]"),
        (lambda x, w: (x.double(), w.double()), "x: expected dtype float32 or bfloat16, got float64"),
        (lambda x, w: (None, w), "x"),
        (lambda x, w: (x.int(), w), "x: expected dtype float32 or bfloat16, got int32"),
    ],
)
def test_errors_name_the_argument(make, match):
    x, w = torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3)
    a, b = make(x, w)
    with pytest.raises(ValueError, match=match):
        WG.conv3x3_winograd_train(a, b)


def test_bias_and_residual_errors_name_them():
    x, w = torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3)
    with pytest.raises(ValueError, match=r"bias: expected shape \[6\] \(\[Cout\] of weight\), got \[4\]"):
        WG.conv3x3_winograd_train(x, w, torch.zeros(4))
    with pytest.raises(ValueError, match=r"residual: expected shape \[1, 6, 5, 5\] \(that of the output\)"):
        WG.conv3x3_winograd_train(x, w, None, torch.zeros(1, 4, 5, 5))
    with pytest.raises(ValueError, match="bias: expected dtype float32 or bfloat16, got float64"):
        WG.conv3x3_winograd_train(x, w, torch.zeros(6, dtype=torch.float64))


# ------------------------------------------------------------------------------------------
# iddpm_ext.nn.Conv2d and conv_add under set_conv_winograd_train
# ------------------------------------------------------------------------------------------


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of conv3x3_winograd_train made through iddpm_ext.nn."""
    seen = []
    real = WG.conv3x3_winograd_train

    def counting(*args):
        seen.append(args[0].dtype)
        return real(*args)

    monkeypatch.setattr(WG, "conv3x3_winograd_train", counting)
    return seen


def _conv(cin=32, cout=32, **kw):
    torch.manual_seed(0)
    return inn.conv_nd(2, cin, cout, 3, padding=1, **kw)


def test_conv_nd_is_a_plain_conv2d_with_the_same_state_dict():
    conv = _conv()
    assert isinstance(conv, torch.nn.Conv2d) and type(conv) is inn.Conv2d
    assert list(conv.state_dict()) == ["weight", "bias"]


@pytest.mark.parametrize(
    "mode, layout, amp, expected",
    [
        ("off", CL, False, 0),
        ("auto", CL, False, 1),  # fp32: the default rule (both layouts at this size)
        ("auto", torch.contiguous_format, False, 1),
        ("auto", CL, True, 0),  # bf16 autocast: only with "on"
        ("on", torch.contiguous_format, False, 1),
        ("on", CL, True, 1),
    ],
)
def test_which_calls_take_the_winograd_path(mode, layout, amp, expected, calls):
    conv = _conv(128, 128)
    x = torch.randn(4, 128, 16, 16).contiguous(memory_format=layout).requires_grad_()
    with inn.conv_winograd_train(mode), torch.autocast("cpu", torch.bfloat16, enabled=amp):
        y = conv(x)
        ref = F.conv2d(x, conv.weight, conv.bias, 1, 1)  # autocast casts as it does for conv
    assert len(calls) == expected
    assert y.dtype == ref.dtype and y.shape == ref.shape
    # torch's layout: channels-last out for channels-last input, NCHW for NCHW
    assert y.is_contiguous(memory_format=layout)
    tol = 3e-2 if amp else 2e-5
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol)
    if expected == 0:
        assert torch.equal(y, ref)  # torch's own conv, bit for bit


# "auto"'s bounds per layout: min(Cin, Cout), max(Cin, Cout), min(H, W), N·H·W
@pytest.mark.parametrize(
    "cin, cout, shape, layout, expected",
    [
        (32, 64, (4, 8, 8), CL, 1),  # every channels-last bound met exactly
        (64, 32, (16, 4, 4), CL, 1),
        (32, 32, (4, 8, 8), CL, 0),  # max(Cin, Cout) < 64
        (16, 64, (4, 8, 8), CL, 0),  # Cin < 32
        (32, 64, (1, 16, 15), CL, 0),  # 240 pixels
        (32, 64, (64, 3, 3), CL, 0),  # 3×3 map
        (128, 128, (2, 16, 16), torch.contiguous_format, 1),  # every NCHW bound met exactly
        (128, 128, (2, 16, 15), torch.contiguous_format, 0),  # 480 pixels
        (64, 128, (4, 16, 16), torch.contiguous_format, 0),  # Cin < 128
        (128, 64, (4, 16, 16), torch.contiguous_format, 0),  # Cout < 128
        (128, 128, (4, 4, 64), torch.contiguous_format, 1),
        (128, 128, (4, 3, 128), torch.contiguous_format, 0),  # H = 3
    ],
)
def test_auto_rule_bounds(cin, cout, shape, layout, expected, calls):
    conv = _conv(cin, cout)
    N, H, W = shape
    x = torch.randn(N, cin, H, W).contiguous(memory_format=layout).requires_grad_()
    with inn.conv_winograd_train("auto"):
        y = conv(x)
    assert len(calls) == expected
    torch.testing.assert_close(y, F.conv2d(x, conv.weight, conv.bias, 1, 1), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    "setup",
    [
        lambda: (torch.no_grad(), _conv(32, 64), torch.randn(4, 32, 8, 8)),  # no grad: inference rules
        lambda: (torch.enable_grad(), _conv(32, 64, stride=2), torch.randn(4, 32, 8, 8)),  # strided
        # neither channels-last nor NCHW-contiguous
        lambda: (torch.enable_grad(), _conv(64, 64), torch.randn(4, 64, 16, 32)[..., ::2]),
    ],
)
def test_auto_leaves_other_calls_to_torch(setup, calls):
    ctx, conv, x = setup()
    if x.is_contiguous():
        x = x.contiguous(memory_format=CL)
    with ctx, inn.conv_winograd_train("auto"):
        y = conv(x)
    assert not calls and torch.equal(y, F.conv2d(x, conv.weight, conv.bias, conv.stride, 1))


def test_torch_func_transforms_take_torchs_conv(calls):
    """Under torch.func.grad / vmap the wrapped inputs go to torch's conv (the kernel has no
    batching rule): the transforms work and give torch's numbers."""
    conv = _conv()
    x = torch.randn(2, 32, 6, 6).contiguous(memory_format=CL)
    w = conv.weight.detach()

    def loss(weight):
        return F.conv2d(x, weight, conv.bias, 1, 1).square().sum()

    def ours(weight):
        return torch.func.functional_call(conv, {"weight": weight, "bias": conv.bias}, (x,)).square().sum()

    with inn.conv_winograd_train("on"):
        g = torch.func.grad(ours)(w)
        batched = torch.func.vmap(lambda xi: conv(xi.unsqueeze(0)))(x)
    assert not calls
    torch.testing.assert_close(g, torch.func.grad(loss)(w), rtol=0, atol=0)
    assert batched.shape == (2, 1, 32, 6, 6)


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
def test_torchscript_compiles_it_as_torchs_conv():
    conv = _conv()
    scripted = torch.jit.script(conv)
    x = torch.randn(1, 32, 4, 4)
    assert torch.equal(scripted(x), F.conv2d(x, conv.weight, conv.bias, 1, 1))


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")  # (torch scripts a helper)
def test_forward_mode_ad_takes_torchs_conv(calls):
    """Dual tensors (torch.autograd.forward_ad) go to torch's conv: the Function has no jvp."""
    import torch.autograd.forward_ad as fwAD

    conv = _conv()
    x = torch.randn(1, 32, 6, 6).contiguous(memory_format=CL)
    t = torch.randn_like(x)
    with inn.conv_winograd_train("on"), fwAD.dual_level():
        y, tangent = fwAD.unpack_dual(conv(fwAD.make_dual(x, t)))
    assert not calls
    torch.testing.assert_close(tangent, F.conv2d(t, conv.weight, None, 1, 1), rtol=1e-5, atol=1e-5)


def test_flop_count_is_the_direct_convs(calls):
    """bench's FLOP counter counts torch's convs (it knows no iddpm op): the same count whichever
    path the training convs take."""
    from iddpm_ext.bench.unet import count_flops

    class Net(torch.nn.Module):  # count_flops calls model(x, t)
        def __init__(self):
            super().__init__()
            self.conv = _conv(bias=False)

        def forward(self, x, t):
            return self.conv(x)

    x = torch.randn(2, 32, 8, 8).contiguous(memory_format=CL)
    with inn.conv_winograd_train("on"):
        counted = count_flops(Net(), x, torch.zeros(2), backward=True)
    assert counted == 2 * (2 * 32 * 32 * 9 * 64)  # one image's forward and weight gradient (x needs none)


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
def test_jit_trace_records_torchs_conv(calls):
    conv = _conv()
    x = torch.randn(1, 32, 4, 4).contiguous(memory_format=CL)
    with inn.conv_winograd_train("on"):
        traced = torch.jit.trace(conv, x)
    assert not calls
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert "aten::_convolution" in kinds and not any("iddpm" in k or "PythonOp" in k for k in kinds), kinds
    with inn.conv_winograd_train("off"):
        assert torch.equal(traced(x), conv(x))


@pytest.mark.parametrize(
    "mode, x_layout, r_layout", [("auto", CL, torch.contiguous_format), ("on", torch.contiguous_format, CL)]
)
def test_conv_add_keeps_torchs_layout_for_a_residual_in_the_other_one(mode, x_layout, r_layout, calls):
    conv = _conv(32, 64)
    x = torch.randn(8, 32, 6, 6).contiguous(memory_format=x_layout).requires_grad_()
    r = torch.randn(8, 64, 6, 6).contiguous(memory_format=r_layout)
    with inn.conv_winograd_train(mode):
        y = inn.conv_add(conv, x, r)
    ref = r + F.conv2d(x, conv.weight, conv.bias, 1, 1)
    assert len(calls) == 1 and y.stride() == ref.stride(), (y.stride(), ref.stride())
    torch.testing.assert_close(y, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("layout", [CL, torch.contiguous_format])
def test_conv_add_folds_the_residual_with_its_gradient(layout, calls):
    conv = _conv()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 32, 6, 6, generator=g).contiguous(memory_format=layout).requires_grad_()
    r = torch.randn(2, 32, 6, 6, generator=g).contiguous(memory_format=layout).requires_grad_()
    with inn.conv_winograd_train("on"):
        y = inn.conv_add(conv, x, r)
    assert len(calls) == 1 and y.is_contiguous(memory_format=layout)
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)
    xr, rr = x.detach().requires_grad_(), r.detach().requires_grad_()
    ref = rr + F.conv2d(xr, conv.weight, conv.bias, 1, 1)
    ref.backward(gy)
    torch.testing.assert_close(y, ref, rtol=2e-5, atol=2e-5)
    assert torch.equal(r.grad, gy)  # the residual's gradient passes through unchanged
    torch.testing.assert_close(x.grad, xr.grad, rtol=2e-5, atol=2e-5)


def test_empty_inputs(calls):
    """An empty batch runs (zero gradients); an empty map is torch's own error, raised by the forward."""
    conv = _conv()
    x = torch.randn(0, 32, 8, 8).contiguous(memory_format=CL).requires_grad_()
    with inn.conv_winograd_train("on"):
        y = conv(x)
        y.sum().backward()
        assert y.shape == (0, 32, 8, 8) and x.grad.shape == x.shape
        assert torch.equal(conv.weight.grad, torch.zeros_like(conv.weight))
        with pytest.raises(RuntimeError, match="Kernel size can't be greater than actual input size"):
            conv(torch.randn(2, 32, 0, 8, requires_grad=True))
    assert len(calls) == 1


def test_hooks_run_and_skip_the_fold(calls):
    conv = _conv(32, 64)
    seen = []
    conv.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    x = torch.randn(16, 32, 4, 4).contiguous(memory_format=CL).requires_grad_()
    with inn.conv_winograd_train("auto"):
        inn.conv_add(conv, x, torch.zeros(16, 64, 4, 4))
    assert seen == [(16, 64, 4, 4)] and len(calls) == 1  # through conv(x): hook, then Winograd


def test_mode_switch_and_env(monkeypatch):
    previous = inn.set_conv_winograd_train(False)
    try:
        assert inn.get_conv_winograd_train() == "off"
        assert inn.set_conv_winograd_train(True) == "off" and inn.get_conv_winograd_train() == "on"
        with pytest.raises(ValueError, match="mode: expected 'auto', 'on', 'off', True or False, got 'fp32'"):
            inn.set_conv_winograd_train("fp32")
    finally:
        inn.set_conv_winograd_train(previous)
    for raw, mode in (("", "auto"), ("0", "off"), ("yes", "on"), ("AUTO", "auto")):
        monkeypatch.setenv("IDDPM_CONV_WINOGRAD_TRAIN", raw)
        assert inn._winograd_train_mode_from_env() == mode
    monkeypatch.setenv("IDDPM_CONV_WINOGRAD_TRAIN", "fast")
    with pytest.raises(ValueError, match="IDDPM_CONV_WINOGRAD_TRAIN: expected auto, 1 or 0"):
        inn._winograd_train_mode_from_env()


# ------------------------------------------------------------------------------------------
# the UNet's training step
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("channels_last, batch, mode", [(True, 4, "auto"), (False, 16, "on")])
def test_unet_training_steps_match_the_plain_path(tmp_path, calls, channels_last, batch, mode):
    """An fp32 TrainLoop against the same run with the path off: channels-last with the default
    "auto" (which takes the tiny model's 32 → 64 and 64 → 64 convs at batch 4), NCHW with "on"
    (auto's NCHW bound, 128 channels, is above this model's): the losses of 4 steps and the final
    parameters agree to float32 rounding accumulated over the steps."""
    from iddpm_ext.bench.train import _loop

    def run(mode):
        torch.manual_seed(0)
        x = torch.rand(batch, 3, 16, 16) * 2 - 1
        with inn.conv_winograd_train(mode):
            folder = str(tmp_path / mode)
            loop, _, _ = _loop("tiny", False, "none", torch.device("cpu"), batch, folder, channels_last)
            losses = []
            for _ in range(4):
                loop.run_step(x, {})
                losses.append(loop._acc["sums"]["loss"].item())
            params = [p.detach().clone() for p in loop.params]
            loop.close()
        return losses, params

    on_losses, on_params = run(mode)
    assert len(calls) > 0
    n = len(calls)
    off_losses, off_params = run("off")
    assert len(calls) == n  # nothing more with the path off
    torch.testing.assert_close(torch.tensor(on_losses), torch.tensor(off_losses), rtol=1e-4, atol=1e-6)
    for a, b in zip(on_params, off_params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
