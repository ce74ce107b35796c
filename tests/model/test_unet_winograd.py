"""The Winograd 3×3 conv in the inference conv forward (iddpm_ext.nn.set_conv_winograd): the UNet
with it matches the reference's computation (fp32 ≤ 1e-5 relative; bf16 weights and bf16 autocast
within 2× of the reference's own bf16-autocast error), which convs "auto" / "fp32" / "on" / "off"
run it for and in which dtype (bf16 "auto": maps ≥ 8, CPUs without AMX), the calls that never take
it (grad, float64, prepack off), the transformed-weight cache (in-place changes, new tensors,
load_state_dict, train(), one entry per compute dtype), the fused residual add, the output layout,
and the switch's errors and environment variable."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from helpers.models import randomize_, tiny_kwargs
from iddpm_ext import nn as inn
from iddpm_ext.nn import groupnorm_impl
from iddpm_ext.ops import loader
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
    """Records (Cin, Cout, H, W, residual given, dtype) of each Winograd conv call."""
    calls = []
    real = wops.conv3x3_winograd

    def wrapped(x, weight_t, bias=None, residual=None):
        assert weight_t.dtype == x.dtype and (bias is None or bias.dtype == x.dtype)
        cout = weight_t.shape[1] * wops.PACK_COLS if weight_t.dim() == 4 else weight_t.shape[2]  # packed: 4-D
        calls.append((x.shape[1], cout, x.shape[2], x.shape[3], residual is not None, x.dtype))
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


@pytest.mark.parametrize("amx", [False, True])
def test_bf16_auto_takes_32_tiles_and_more_on_cpus_without_amx(spy, monkeypatch, amx):
    monkeypatch.setattr(loader, "_cpu_has_amx", amx)
    fast = _model().to_inference(torch.bfloat16)
    convs = _convs_3x3_s1(fast)
    with torch.no_grad(), inn.conv_winograd("auto"):
        fast(*_inputs(spatial=(16, 16)))  # 16×16 and 8×8 maps, B = 2: every ≥ 32-channel conv
        n_16 = len(spy)
        fast(*_inputs(spatial=(8, 8)))  # 8×8 (32 tiles) and 4×4 maps (B = 2: 8 tiles, skipped)
        n_8 = len(spy) - n_16
        fast(*_inputs(n=4, spatial=(8, 8)))  # B = 4: the 4×4 maps have 16 tiles, skipped
        n_8_b4 = len(spy) - n_16 - n_8
        fast(*_inputs(n=8, spatial=(8, 8)))  # B = 8: 32 tiles, taken
        n_8_b8 = len(spy) - n_16 - n_8 - n_8_b4
    if amx:  # not measured against oneDNN's AMX bf16 convs: the direct conv
        assert spy == []
        return
    assert n_16 == len(convs) - 2 and all(c[5] == torch.bfloat16 for c in spy)
    assert all(min(c[0], c[1]) >= 32 for c in spy)
    assert 0 < n_8 == n_8_b4 < n_16 == n_8_b8
    assert all(min(c[2], c[3]) >= 8 for c in spy[n_16 : n_16 + n_8 + n_8_b4])
    assert any(c[2] == 4 for c in spy[n_16 + n_8 + n_8_b4 :])
    spy.clear()
    with torch.no_grad(), inn.conv_winograd("fp32"):  # "fp32": no bf16 call ...
        fast(*_inputs(spatial=(16, 16)))
        assert spy == []
        _model().to_inference()(*_inputs(spatial=(16, 16)))  # ... the fp32 ones as "auto"
    assert len(spy) == len(convs) - 2 and all(c[5] == torch.float32 for c in spy)


def _bf16_error_budget(model, x, t):
    """(the fp32 reference computation, 2 × the reference computation's own bf16-autocast error)."""
    expected = _all_off(model, x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_bf16 = _all_off(model, x, t)
    return expected, 2 * _rel(ref_bf16, expected)


def test_bf16_weights_on_matches_the_reference_within_2x_its_bf16_error(spy):
    model = _model()
    x, t = _inputs(spatial=(16, 16))
    expected, budget = _bf16_error_budget(model, x, t)
    fast = copy.deepcopy(model).to_inference(torch.bfloat16)
    with torch.no_grad(), inn.conv_winograd("on"):
        got = fast(x, t)
    assert len(spy) == len(_convs_3x3_s1(model)) and all(c[5] == torch.bfloat16 for c in spy)
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert _rel(got, expected) <= budget, (_rel(got, expected), budget)
    with torch.no_grad(), inn.conv_winograd("off"):
        direct = fast(x, t)
    assert not torch.equal(direct, got) and _rel(direct, expected) <= budget


def test_bf16_autocast_runs_it_in_bf16(spy):
    """Under CPU bf16 autocast (fp32 weights) the conv is bf16 as autocast's: weight, bias and input
    cast to bf16, a bf16 result."""
    model = _model()
    x, t = _inputs(spatial=(16, 16))
    expected, budget = _bf16_error_budget(model, x, t)
    fast = copy.deepcopy(model).to_inference()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), inn.conv_winograd("on"):
        got = fast(x, t)
        conv = _convs_3x3_s1(fast)[1]
        h = torch.randn(2, conv.in_channels, 8, 8)
        y = conv(h)
        plain = F.conv2d(h, conv.weight, conv.bias, 1, 1)  # autocast's bf16 conv
    assert len(spy) == len(_convs_3x3_s1(model)) + 1 and all(c[5] == torch.bfloat16 for c in spy)
    assert y.dtype == plain.dtype == torch.bfloat16
    assert _rel(y, plain) <= 1e-2
    assert _rel(got, expected) <= budget, (_rel(got, expected), budget)


@pytest.mark.parametrize("winograd", ["on", "off"])
def test_dtype_mismatches_get_torchs_own_error(winograd):
    """Outside autocast a bf16 weight with an fp32 bias (or fp32 input) is torch's error, not a
    silent cast: neither the Winograd nor the packed path takes such a call."""
    conv = torch.nn.Conv2d(32, 32, 3, padding=1).to(torch.bfloat16)
    conv.bias.data = conv.bias.data.float()
    inn.set_conv_prepack(conv, True)
    x = torch.randn(1, 32, 8, 8, dtype=torch.bfloat16)
    with torch.no_grad(), inn.conv_winograd(winograd):
        with pytest.raises(RuntimeError, match="should be the same"):
            conv(x)
        conv.bias.data = conv.bias.data.bfloat16()
        with pytest.raises(RuntimeError, match="should be the same"):
            conv(x.float())
        assert conv(x).dtype == torch.bfloat16  # (the matching call runs)


def test_empty_map_gets_torchs_own_error(spy):
    """ "on" takes every size, but an empty feature map is torch's error (as without prepacking)."""
    conv = torch.nn.Conv2d(32, 32, 3, padding=1)
    inn.set_conv_prepack(conv, True)
    with torch.no_grad(), inn.conv_winograd("on"):
        with pytest.raises(RuntimeError, match="Kernel size can't be greater than actual input size"):
            conv(torch.randn(2, 32, 0, 8))
        assert conv(torch.randn(0, 32, 8, 8)).shape == (0, 32, 8, 8)  # an empty batch runs
    assert spy == [(32, 32, 8, 8, False, torch.float32)]


def test_calls_that_never_take_it(spy):
    model = _model()
    x, t = _inputs()
    fast = copy.deepcopy(model).to_inference()
    with inn.conv_winograd("on"):
        fast(x, t)  # grad enabled
        copy.deepcopy(model).to_inference(torch.bfloat16)(x, t)
        with torch.no_grad():
            copy.deepcopy(model).to_inference(prepack=False)(x, t)  # the modules' own forward
            copy.deepcopy(model).to_inference(torch.bfloat16, prepack=False)(x, t)
            fast64 = copy.deepcopy(fast).double()
            fast64(x.double(), t)
            with torch.autocast("cpu", dtype=torch.float16):
                fast(x, t)  # a CPU fp16 autocast: torch's conv
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
        return fwd.entries[("winograd", torch.float32, 2)][1]  # (6×7 maps: F(2×2))

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
        with torch.no_grad(), pytest.raises(RuntimeError, match="should be the same"):
            conv(x.bfloat16())  # fp32 weights, bf16 input: torch's own dtype error, no entry
    assert list(fwd.entries) == [("winograd", torch.float32, 2)]
    with inn.conv_winograd("on"), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        conv(x)  # a second compute dtype: its own entry next to the first
    assert set(fwd.entries) == {("winograd", torch.float32, 2), ("winograd", torch.bfloat16, 2)}
    assert fwd.entries[("winograd", torch.bfloat16, 2)][1].dtype == torch.bfloat16
    with inn.conv_winograd("on"):
        inn.clear_conv_prepack(conv)  # what UNetModel.train() calls
        assert fwd.entries == {}
        check()
    assert list(conv.state_dict()) == ["weight", "bias"]


def test_train_frees_the_transformed_weights():
    fast = _model().to_inference()
    with torch.no_grad(), inn.conv_winograd("on"):
        for tile in (2, 4):
            with inn.conv_winograd_tile(tile):
                fast(*_inputs())
    keys = {("winograd", torch.float32, 2), ("winograd", torch.float32, 4)}  # F(2×2) and F(4×4) convs
    held = [set(getattr(m.__dict__.get("forward"), "entries", {})) & keys for m in fast.modules()]
    assert set().union(*held) == keys
    fast.train()
    assert not any(set(getattr(m.__dict__.get("forward"), "entries", {})) & keys for m in fast.modules())


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
    assert ("winograd", torch.float32, 2) in conv.__dict__["forward"].entries
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
        with pytest.raises(
            ValueError, match="mode: expected 'auto', 'fp32', 'on', 'off', True or False, got 'fast'"
        ):
            inn.set_conv_winograd("fast")
    finally:
        inn.set_conv_winograd(previous)
    for raw, mode in [
        ("0", "off"),
        ("1", "on"),
        ("AUTO", "auto"),
        ("", "auto"),
        ("off", "off"),
        ("fp32", "fp32"),
    ]:
        monkeypatch.setenv("IDDPM_CONV_WINOGRAD", raw)
        assert inn._winograd_mode_from_env() == mode
    monkeypatch.delenv("IDDPM_CONV_WINOGRAD")
    assert inn._winograd_mode_from_env() == "auto"
    monkeypatch.setenv("IDDPM_CONV_WINOGRAD", "maybe")
    with pytest.raises(
        ValueError, match="IDDPM_CONV_WINOGRAD: expected auto, fp32, 1 or 0 \\(or unset\\), got 'maybe'"
    ):
        inn._winograd_mode_from_env()
