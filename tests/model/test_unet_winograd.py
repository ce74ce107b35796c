"""The Winograd 3×3 conv in the inference conv forward (iddpm_ext.nn.set_conv_winograd): the UNet
with it matches the reference's computation (fp32 ≤ 1e-5 relative), which convs "auto" / "on" /
"off" run it for, the calls that never take it (grad, autocast, float64, prepack off), the
transformed-weight cache (in-place changes, new tensors, load_state_dict, train()), the fused
residual add, the output layout, and the switch's errors and environment variable."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from helpers.models import randomize_, tiny_kwargs
from iddpm_ext import nn as inn
from iddpm_ext.nn import groupnorm_impl
from iddpm_ext.ops import winograd as wops
from iddpm_ext.ops.attention import attention_impl
from iddpm_ext.unet import ResBlock, UNetModel

pytestmark = [
    pytest.mark.kernels,
    pytest.mark.skipif(not inn._mkldnn_conv_available(), reason="torch built without oneDNN"),
]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _model(seed=0):
    torch.manual_seed(seed)
    kw = tiny_kwargs(out_channels=6, use_scale_shift_norm=True, num_heads=2)
    return randomize_(UNetModel(**kw), seed).eval()


def _inputs(n=2, spatial=(8, 8), seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, *spatial, generator=g), torch.randint(0, 1000, (n,), generator=g)


def _all_off(model, x, t):
    """The reference's computation: every fast path off."""
    with torch.no_grad(), attention_impl("einsum"), groupnorm_impl("torch"):
        return model(x, t)


@pytest.fixture
def spy(monkeypatch):
    """Records (Cin, Cout, H, W, residual given) of each Winograd conv call."""
    calls = []
    real = wops.conv3x3_winograd

    def wrapped(x, weight_t, bias=None, residual=None):
        calls.append((x.shape[1], weight_t.shape[2], x.shape[2], x.shape[3], residual is not None))
        return real(x, weight_t, bias, residual)

    monkeypatch.setattr(wops, "conv3x3_winograd", wrapped)
    return calls


def _convs_3x3_s1(model):
    return [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and m.stride == (1, 1)
    ]


def test_on_matches_the_reference_computation_and_runs_every_3x3_conv(spy):
    model = _model()
    x, t = _inputs()
    expected = _all_off(model, x, t)
    fast = copy.deepcopy(model).to_inference()  # CPU defaults: channels-last, prepack "bf16"
    with torch.no_grad(), inn.conv_winograd("on"):
        got = fast(x, t)
    assert len(spy) == len(_convs_3x3_s1(model)) > 0
    n_res = sum(isinstance(m, ResBlock) for m in model.modules())
    assert sum(c[4] for c in spy) == n_res > 0  # each ResBlock's skip + out_layers conv: add fused
    assert got.is_contiguous() and got.dtype == torch.float32
    assert _rel(got, expected) <= 1e-5
    with torch.no_grad(), inn.conv_winograd("off"):
        plain = fast(x, t)
    assert len(spy) == len(_convs_3x3_s1(model))  # "off": no further call
    assert not torch.equal(plain, got)  # (the two paths really differ) ...
    assert _rel(plain, expected) <= 1e-5  # ... and both match


def test_auto_skips_small_channel_counts_and_maps(spy):
    model = _model()
    fast = copy.deepcopy(model).to_inference()
    with torch.no_grad(), inn.conv_winograd("auto"):
        fast(*_inputs(spatial=(8, 8)))
    convs = _convs_3x3_s1(model)
    # not the 3-channel stem conv, nor the 6-channel output conv
    assert len(spy) == len(convs) - 2 and all(min(c[0], c[1]) >= 32 for c in spy)
    spy.clear()
    with torch.no_grad(), inn.conv_winograd("auto"):
        fast(*_inputs(spatial=(6, 6)))  # 6×6 and 3×3 maps: the 3×3 level is skipped
    assert spy and all(min(c[2], c[3]) >= 4 for c in spy)
    assert len(spy) < len(convs) - 2


def test_calls_that_never_take_it(spy):
    model = _model()
    x, t = _inputs()
    fast = copy.deepcopy(model).to_inference()
    with inn.conv_winograd("on"):
        fast(x, t)  # grad enabled
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            fast(x, t)  # the conv runs in bf16
        with torch.no_grad():
            copy.deepcopy(model).to_inference(prepack=False)(x, t)  # the modules' own forward
            fast64 = copy.deepcopy(fast).double()
            fast64(x.double(), t)
    assert spy == []


def test_weight_cache_follows_changes():
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(16, 24, 3, padding=1)
    x = torch.randn(2, 16, 6, 7, generator=g).contiguous(memory_format=torch.channels_last)
    inn.set_conv_prepack(conv, "bf16")
    fwd = conv.__dict__["forward"]

    def check():
        with torch.no_grad():
            got = conv(x)
            expected = F.conv2d(x, conv.weight, conv.bias, 1, 1)
        assert _rel(got, expected) <= 1e-6
        return fwd.entries["winograd"][1]

    with inn.conv_winograd("on"):
        first = check()
        assert check() is first  # transformed once per weight version
        conv.weight.detach().mul_(2)  # in place, through detach(): a new version
        assert check() is not first
        conv.bias.detach().add_(1)
        check()
        conv.weight = torch.nn.Parameter(torch.randn(24, 16, 3, 3, generator=g))  # a new tensor
        check()
        other = torch.nn.Conv2d(16, 24, 3, padding=1)
        conv.load_state_dict(other.state_dict())
        check()
        inn.clear_conv_prepack(conv)  # what UNetModel.train() calls
        assert fwd.entries == {}
        check()
    assert "winograd" not in conv.state_dict() and list(conv.state_dict()) == ["weight", "bias"]


def test_train_frees_the_transformed_weights():
    fast = _model().to_inference()
    with torch.no_grad(), inn.conv_winograd("on"):
        fast(*_inputs())
    holders = [m for m in fast.modules() if "winograd" in getattr(m.__dict__.get("forward"), "entries", {})]
    assert holders
    fast.train()
    assert all("winograd" not in m.__dict__["forward"].entries for m in holders)


@pytest.mark.parametrize("channels_last", [True, False])
def test_conv_add_folds_the_residual_and_keeps_torchs_layout(channels_last):
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(16, 16, 3, padding=1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 16, 5, 5, generator=g).contiguous(memory_format=fmt)
    r = torch.randn(2, 16, 5, 5, generator=g)
    with torch.no_grad():
        expected = r + conv(x)
        inn.set_conv_prepack(conv, True)
        with inn.conv_winograd("on"):
            got = inn.conv_add(conv, x, r)
            y = conv(x)
            row = torch.randn(1, 16, 1, 1, generator=g)  # broadcasts: added after, still right
            assert _rel(inn.conv_add(conv, x, row), row + F.conv2d(x, conv.weight, conv.bias, 1, 1)) <= 1e-6
    assert "winograd" in conv.__dict__["forward"].entries
    assert _rel(got, expected) <= 1e-6
    assert y.is_contiguous(memory_format=fmt)  # as torch's conv lays it out


def test_switch_errors_and_environment(monkeypatch):
    previous = inn.set_conv_winograd("off")
    try:
        assert inn.get_conv_winograd() == "off"
        assert inn.set_conv_winograd(True) == "off" and inn.get_conv_winograd() == "on"
        with inn.conv_winograd(False):
            assert inn.get_conv_winograd() == "off"
        assert inn.get_conv_winograd() == "on"
        with pytest.raises(ValueError, match="mode: expected 'auto', 'on', 'off', True or False, got 'fast'"):
            inn.set_conv_winograd("fast")
    finally:
        inn.set_conv_winograd(previous)
    for raw, mode in [("0", "off"), ("1", "on"), ("AUTO", "auto"), ("", "auto"), ("off", "off")]:
        monkeypatch.setenv("IDDPM_CONV_WINOGRAD", raw)
        assert inn._winograd_mode_from_env() == mode
    monkeypatch.delenv("IDDPM_CONV_WINOGRAD")
    assert inn._winograd_mode_from_env() == "auto"
    monkeypatch.setenv("IDDPM_CONV_WINOGRAD", "maybe")
    with pytest.raises(
        ValueError, match="IDDPM_CONV_WINOGRAD: expected auto, 1 or 0 \\(or unset\\), got 'maybe'"
    ):
        inn._winograd_mode_from_env()
