"""The UNet's fast paths against the model with every fast path off: GroupNorm of bf16/fp16
activations without fp32 copies, to_inference (one dtype for every parameter, channels-last),
fused attention; the fp32 ≤ 1e-5 relative rule, the bf16 "within 2× of the all-off model's own
bf16-autocast error" rule (float64 oracle), strict state-dict round trips and a seeded DDIM run."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from helpers.engine_cases import diffusion
from helpers.models import randomize_, tiny_kwargs
from iddpm_ext import nn as inn
from iddpm_ext import unet as iunet
from iddpm_ext.nn import GroupNorm32, groupnorm_impl, set_groupnorm_impl
from iddpm_ext.ops.attention import attention_impl
from iddpm_ext.unet import UNetModel


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    kw = tiny_kwargs(out_channels=6, use_scale_shift_norm=True, num_heads=2, **overrides)
    return randomize_(UNetModel(**kw), seed).eval()


def _inputs(n=2, spatial=(8, 8), seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, *spatial, generator=g), torch.randint(0, 1000, (n,), generator=g)


def _all_off(model, x, t, autocast_dtype=None):
    """The model with every fast path off (the reference's way of running it)."""
    ctx = torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None)
    with torch.no_grad(), attention_impl("einsum"), groupnorm_impl("torch"), ctx:
        return model(x, t).float()


# ---------------------------------------------------------------------------------
# GroupNorm32
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_groupnorm_low_precision_matches_fp32_copy_path(dtype, channels_last):
    g = torch.Generator().manual_seed(0)
    norm = GroupNorm32(32, 64)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(64, generator=g))
        norm.bias.copy_(0.1 * torch.randn(64, generator=g))
    x = (3 * torch.randn(2, 64, 8, 8, generator=g) + 1).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    oracle = F.group_norm(x.double(), 32, norm.weight.double(), norm.bias.double(), norm.eps)
    with groupnorm_impl("torch"):
        slow = norm(x)
    with groupnorm_impl("auto"):
        fast = norm(x)
    assert fast.dtype == dtype and slow.dtype == dtype
    assert fast.is_contiguous(memory_format=torch.channels_last) == channels_last
    err_fast = (fast.double() - oracle).abs().max().item()
    err_slow = (slow.double() - oracle).abs().max().item()
    assert err_fast <= 2 * err_slow + 1e-12, (err_fast, err_slow)


def test_groupnorm_impl_switch_and_errors(monkeypatch):
    previous = set_groupnorm_impl("torch")
    try:
        assert inn.get_groupnorm_impl() == "torch"
        with groupnorm_impl("auto"):
            assert inn.get_groupnorm_impl() == "auto"
        assert inn.get_groupnorm_impl() == "torch"
    finally:
        set_groupnorm_impl(previous)
    with pytest.raises(ValueError, match="impl: expected one of \\['auto', 'torch', 'fused'\\], got 'fast'"):
        set_groupnorm_impl("fast")
    monkeypatch.setenv("IDDPM_GROUPNORM_IMPL", "fast")
    with pytest.raises(ValueError, match="IDDPM_GROUPNORM_IMPL: expected one of"):
        inn._groupnorm_impl_from_env()
    monkeypatch.setenv("IDDPM_GROUPNORM_IMPL", "TORCH")
    assert inn._groupnorm_impl_from_env() == "torch"


# ---------------------------------------------------------------------------------
# to_inference
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("channels_last", [False, True])
def test_fp32_fast_paths_match_all_off_model(channels_last):
    model = _model()
    x, t = _inputs()
    expected = _all_off(model, x, t)
    fast = copy.deepcopy(model).to_inference(channels_last=channels_last)
    assert fast.channels_last == channels_last and not fast.training
    with torch.no_grad():
        got = fast(x, t)
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert _rel(got, expected) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_low_precision_weights_within_twice_the_autocast_error(dtype, channels_last):
    model = _model(seed=2)
    x, t = _inputs(seed=3)
    oracle = _all_off(copy.deepcopy(model).double(), x.double(), t)
    ref_err = _rel(_all_off(model, x, t, autocast_dtype=dtype), oracle)
    fast = copy.deepcopy(model).to_inference(dtype, channels_last=channels_last)
    assert fast.inner_dtype == dtype and fast.time_embed[0].weight.dtype == dtype
    with torch.no_grad():
        got = fast(x, t)
        got_bf16_input = fast(x.to(dtype), t)
    assert got.dtype == torch.float32 and got_bf16_input.dtype == dtype
    err = _rel(got, oracle)
    assert 0 < ref_err and err <= 2 * ref_err, (err, ref_err)


def test_to_inference_keeps_state_dict_keys_and_round_trips_strictly():
    model = _model(num_classes=4)
    keys = list(model.state_dict())
    fast = copy.deepcopy(model).to_inference(torch.bfloat16, channels_last=True)
    assert list(fast.state_dict()) == keys
    conv = fast.input_blocks[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and conv.dtype == torch.bfloat16
    fresh = UNetModel(**tiny_kwargs(out_channels=6, use_scale_shift_norm=True, num_heads=2, num_classes=4))
    fresh.load_state_dict(fast.state_dict(), strict=True)  # loads, cast back to the fresh model's fp32
    back = copy.deepcopy(fast).to_inference(
        torch.float32, channels_last=False, prepack=False, batch_emb=False
    )
    assert not back.channels_last and back.input_blocks[0][0].weight.is_contiguous()
    x, t = _inputs()
    y = torch.tensor([0, 3])
    with torch.no_grad():
        torch.testing.assert_close(back(x, t, y), fresh.eval()(x, t, y), rtol=0, atol=0)


def test_channels_last_keeps_the_callers_layout_and_feature_vectors():
    model = _model()
    fast = copy.deepcopy(model).to_inference(channels_last=True)
    x, t = _inputs()
    x_nhwc = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = fast(x_nhwc, t)
        feats, ref_feats = fast.get_feature_vectors(x, t), model.get_feature_vectors(x, t)
    assert out.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(
        feats["down"] + [feats["middle"]] + feats["up"],
        ref_feats["down"] + [ref_feats["middle"]] + ref_feats["up"],
    ):
        assert a.is_contiguous()
        assert _rel(a, b) <= 1e-5


def test_to_inference_errors_and_default(monkeypatch):
    model = UNetModel(**tiny_kwargs(dims=1))
    with pytest.raises(ValueError, match="channels_last: only 2-D models .* dims=1"):
        model.to_inference(torch.bfloat16, channels_last=True)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # refused: nothing changed
    assert model.training
    for name, bad in (("prepack", dict(prepack="yes")), ("batch_emb", dict(batch_emb=1))):
        with pytest.raises(ValueError, match=f"^{name}: expected"):
            model.to_inference(torch.bfloat16, **bad)
        assert all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(ValueError, match="dtype: expected a floating torch.dtype or None, got torch.int32"):
        model.to_inference(torch.int32)
    monkeypatch.setenv("IDDPM_CHANNELS_LAST", "0")
    assert iunet.default_channels_last("cpu") is False
    monkeypatch.setenv("IDDPM_CHANNELS_LAST", "1")
    assert iunet.default_channels_last("cuda") is True
    monkeypatch.setenv("IDDPM_CHANNELS_LAST", "maybe")
    with pytest.raises(ValueError, match="IDDPM_CHANNELS_LAST: expected 1 or 0"):
        iunet.default_channels_last("cpu")
    monkeypatch.delenv("IDDPM_CHANNELS_LAST")
    assert iunet.default_channels_last("cpu") is True
    assert iunet.default_channels_last("cuda") is False


@pytest.mark.parametrize("dims, spatial", [(1, (16,)), (3, (3, 8, 8))])
def test_to_inference_defaults_on_1d_and_3d_models(dims, spatial):
    # The CPU's channels-last default applies to 2-D models; the others keep their format
    # (to_inference() once raised "only 2-D models have a channels-last format" for them).
    model = _model(seed=6, dims=dims)
    x, t = _inputs(spatial=spatial, seed=7)
    expected = _all_off(model, x, t)
    fast = copy.deepcopy(model).to_inference()
    assert fast.channels_last is False and not fast.training
    with torch.no_grad():
        got = fast(x, t)
    assert _rel(got, expected) <= 1e-5
    bf16 = copy.deepcopy(model).to_inference(torch.bfloat16)
    with torch.no_grad():
        assert _rel(bf16(x.bfloat16(), t).float(), expected) <= 3e-2


@pytest.mark.slow
def test_seeded_ddim_with_fast_paths_matches_eager_path():
    model = _model(seed=4)
    fast = copy.deepcopy(model).to_inference(channels_last=True)
    d = diffusion(respacing="ddim5")
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(2, 3, 8, 8, generator=g)
    with attention_impl("einsum"), groupnorm_impl("torch"):
        expected = d.ddim_sample_loop(model, noise.shape, noise=noise, eta=0.0)
    got = d.ddim_sample_loop(fast, noise.shape, noise=noise, eta=0.0)
    assert _rel(got, expected) <= 1e-5


@pytest.mark.slow
def test_compile_fullgraph_with_fast_paths():
    torch._dynamo.reset()
    model = _model().to_inference(torch.bfloat16, channels_last=True, prepack=True)
    x, t = _inputs()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    # While compiling, prepacked convs trace the module's own conv (compile packs by itself), so
    # the compiled model computes what the model with prepacking off computes eagerly.
    plain = copy.deepcopy(model).to_inference(channels_last=True, prepack=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t), plain(x, t))


# ---------------------------------------------------------------------------------
# Prepacked convolutions (to_inference(prepack=...), iddpm_ext.nn.set_conv_prepack)
# ---------------------------------------------------------------------------------
needs_mkldnn = pytest.mark.skipif(not inn._mkldnn_conv_available(), reason="torch built without oneDNN")


def _packed_entries(model, winograd=False):
    """How many packed weight copies (``winograd``: Winograd-transformed copies) the convs hold."""
    return sum(
        (key[0] == "winograd") == winograd
        for m in model.modules()
        if inn.conv_prepack_enabled(m)
        for key in m.__dict__["forward"].entries
    )


@needs_mkldnn
@pytest.mark.parametrize("dims, channels_last", [(2, False), (2, True), (1, False)])
def test_prepack_fp32_matches_plain_model(dims, channels_last):
    model = _model(dims=dims)
    x, t = _inputs(spatial=(8, 8) if dims == 2 else (8,))
    plain = copy.deepcopy(model).to_inference(channels_last=channels_last, prepack=False)
    packed = copy.deepcopy(model).to_inference(channels_last=channels_last, prepack=True)
    n_convs = sum(isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)) for m in model.modules())
    assert sum(inn.conv_prepack_enabled(m) for m in packed.modules()) == n_convs
    with torch.no_grad():
        expected, got = plain(x, t), packed(x, t)
    # the packed path (or, for 3x3 convs, the Winograd conv: iddpm_ext.nn.set_conv_winograd) ran
    # for every conv
    assert _packed_entries(packed) + _packed_entries(packed, winograd=True) == n_convs
    assert got.is_contiguous() and got.dtype == torch.float32
    assert _rel(got, expected) <= 1e-5


@needs_mkldnn
@pytest.mark.parametrize("weights", ["bf16", "autocast"])
def test_prepack_bf16_within_twice_the_autocast_error(weights):
    model = _model(seed=2)
    x, t = _inputs(seed=3)
    oracle = _all_off(copy.deepcopy(model).double(), x.double(), t)
    ref_err = _rel(_all_off(model, x, t, autocast_dtype=torch.bfloat16), oracle)
    if weights == "bf16":
        fast = copy.deepcopy(model).to_inference(torch.bfloat16, channels_last=True, prepack=True)
        with torch.no_grad():
            got = fast(x, t)
    else:  # fp32 weights, bf16 autocast: the convs run from bf16 packed copies
        fast = copy.deepcopy(model).to_inference(channels_last=True, prepack=True)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            got = fast(x, t)
        assert {e[1].dtype for m in fast.modules() if inn.conv_prepack_enabled(m)
                for e in m.__dict__["forward"].entries.values()} == {torch.bfloat16}  # fmt: skip
    assert _packed_entries(fast) > 0
    err = _rel(got, oracle)
    assert 0 < ref_err and err <= 2 * ref_err, (err, ref_err)


@needs_mkldnn
def test_prepack_never_uses_stale_weights():
    model = _model(num_classes=4)
    keys = list(model.state_dict())
    fast = copy.deepcopy(model).to_inference(channels_last=True, prepack=True)
    x, t = _inputs()
    y = torch.tensor([0, 3])
    with torch.no_grad():
        fast(x, t, y)  # packs the first weights
    assert list(fast.state_dict()) == keys
    other = _model(seed=5, num_classes=4)
    fast.load_state_dict(other.state_dict(), strict=True)  # in-place copies: new versions
    with torch.no_grad():
        assert _rel(fast(x, t, y), other(x, t, y)) <= 1e-5
        conv = fast.out[-1]
        conv.weight.detach().mul_(2)  # an in-place change through detach() is seen too
        conv.bias = torch.nn.Parameter(torch.zeros_like(conv.bias))  # so is a new tensor
        other.out[-1].weight.detach().mul_(2)
        other.out[-1].bias.zero_()
        assert _rel(fast(x, t, y), other(x, t, y)) <= 1e-5
        fast.to(torch.float64)  # a dtype the packed op does not run: the module's own conv
        # (GroupNorm32 normalises in fp32 even here, and the layouts differ: fp32-level agreement)
        assert _rel(fast(x.double(), t, y), other.double()(x.double(), t, y)) <= 1e-5


@needs_mkldnn
def test_prepack_then_training_backward_copy_and_pickle():
    import io

    model = _model()
    fast = copy.deepcopy(model).to_inference(channels_last=True, prepack=True)
    x, t = _inputs()
    with torch.no_grad():
        expected = fast(x, t)
    twin = copy.deepcopy(fast)  # after a call: the packed copies are dropped, not copied
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        for m in (twin, loaded):
            assert inn.conv_prepack_enabled(m.out[-1])
            torch.testing.assert_close(m(x, t), expected, rtol=0, atol=0)
    fast.train()  # frees the packed copies; with grad enabled the module's own conv runs
    assert _packed_entries(fast) == 0
    model.train()
    for m in (fast, model):
        m.zero_grad()
        m(x, t).square().mean().backward()
    grads = [torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (fast, model)]
    assert _rel(*grads) <= 1e-5  # (all together: a conv bias before a GroupNorm has ~0 gradient)
    fast.to_inference(prepack=False)
    assert not any(inn.conv_prepack_enabled(m) for m in fast.modules())


@needs_mkldnn
@pytest.mark.parametrize("dims", [1, 2])
def test_conv_add_folds_the_residual(dims):
    g = torch.Generator().manual_seed(0)
    conv = (torch.nn.Conv1d if dims == 1 else torch.nn.Conv2d)(16, 16, 3, padding=1)
    x = torch.randn(2, 16, *([6] * dims), generator=g)
    r = torch.randn(2, 16, *([6] * dims), generator=g)
    with torch.no_grad():
        expected = r + conv(x)
        assert torch.equal(inn.conv_add(conv, x, r), expected)  # prepacking off: the plain sum
        inn.set_conv_prepack(conv, True)
        got = inn.conv_add(conv, x, r)
        bias_row = torch.randn(1, 16, *([1] * dims), generator=g)  # broadcasts: not folded, still right
        assert _rel(inn.conv_add(conv, x, bias_row), bias_row + conv(x)) <= 1e-6
    assert got.is_contiguous() and _rel(got, expected) <= 1e-6
    inn.set_conv_prepack(conv, False)
    assert "forward" not in conv.__dict__


def test_prepack_switch_errors_and_default(monkeypatch):
    model = _model()
    with pytest.raises(ValueError, match="prepack: expected True, False, 'bf16' or None, got 'yes'"):
        model.to_inference(prepack="yes")
    monkeypatch.setenv("IDDPM_CONV_PREPACK", "maybe")
    with pytest.raises(ValueError, match="IDDPM_CONV_PREPACK: expected 1, bf16 or 0"):
        inn.default_conv_prepack("cpu")
    monkeypatch.setenv("IDDPM_CONV_PREPACK", "0")
    assert inn.default_conv_prepack("cpu") is False
    assert not any(inn.conv_prepack_enabled(m) for m in copy.deepcopy(model).to_inference().modules())
    monkeypatch.setenv("IDDPM_CONV_PREPACK", "1")
    assert inn.default_conv_prepack("cuda") is True
    monkeypatch.setenv("IDDPM_CONV_PREPACK", "BF16")
    assert inn.default_conv_prepack("cuda") == "bf16"
    monkeypatch.delenv("IDDPM_CONV_PREPACK")
    assert inn.default_conv_prepack("cuda") is False
    assert inn.default_conv_prepack("cpu") == ("bf16" if inn._mkldnn_conv_available() else False)
    model3d = randomize_(UNetModel(**tiny_kwargs(dims=3))).to_inference(channels_last=False, prepack=False)
    packed3d = copy.deepcopy(model3d).to_inference(channels_last=False, prepack=True)
    for m in packed3d.modules():  # 3-D convs keep their own forward; attention's 1-D convs pack
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv3d)):
            assert inn.conv_prepack_enabled(m) == isinstance(m, torch.nn.Conv1d)
    x = torch.randn(1, 3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert _rel(packed3d(x, torch.tensor([5])), model3d(x, torch.tensor([5]))) <= 1e-5


@needs_mkldnn
def test_prepack_default_packs_bf16_calls_only(monkeypatch):
    monkeypatch.delenv("IDDPM_CONV_PREPACK", raising=False)
    model = _model()
    fast = copy.deepcopy(model).to_inference()  # CPU default: channels-last, prepack "bf16"
    x, t = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(fast(x, t), model(x, t), rtol=1e-5, atol=1e-5)
        assert _packed_entries(fast) == 0  # fp32 calls take the module's own conv (or Winograd's)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast(x, t)
    assert _packed_entries(fast) > 0


# ---------------------------------------------------------------------------------
# The attention block with channels-last activations (SDPA on the [N, T, 3C] qkv)
# ---------------------------------------------------------------------------------
def _spy_attention(monkeypatch):
    """Record the layout of every qkv that reaches the attention and whether SDPA or the bf16
    kernel ran."""
    from iddpm_ext.ops import attention as A

    seen = []
    real_sdpa, real_bf16, real_dispatch = A.qkv_attention_sdpa, A.qkv_attention_bf16, iunet.qkv_attention

    def sdpa(qkv, h):
        seen[-1]["sdpa"] = True
        return real_sdpa(qkv, h)

    def bf16(qkv, h):
        seen[-1]["bf16"] = True
        return real_bf16(qkv, h)

    def dispatch(qkv, h):
        seen.append({"innermost": inn.channels_innermost(qkv), "sdpa": False, "bf16": False})
        return real_dispatch(qkv, h)

    monkeypatch.setattr(A, "qkv_attention_sdpa", sdpa)
    monkeypatch.setattr(A, "qkv_attention_bf16", bf16)
    monkeypatch.setattr(iunet, "qkv_attention", dispatch)
    return seen


def _block_outputs_channels_last(model):
    """Hooks recording whether each AttentionBlock's output is channels-last."""
    layouts = []
    for m in model.modules():
        if isinstance(m, iunet.AttentionBlock):
            m.register_forward_hook(
                lambda _m, _i, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last))
            )
    return layouts


@pytest.mark.parametrize("prepack", [False, True])
def test_channels_last_attention_runs_sdpa_and_matches_all_off_model_fp32(monkeypatch, prepack):
    model = _model()
    x, t = _inputs()
    expected = _all_off(model, x, t)
    fast = copy.deepcopy(model).to_inference(channels_last=True, prepack=prepack)
    seen = _spy_attention(monkeypatch)
    layouts = _block_outputs_channels_last(fast)
    with torch.no_grad():
        got = fast(x, t)
    assert seen and all(s == {"innermost": True, "sdpa": True, "bf16": False} for s in seen), seen
    assert layouts and all(layouts)
    assert _rel(got, expected) <= 1e-5
    # Switched off: the block flattens through contiguous tensors and "auto" runs the fused op.
    seen.clear()
    previous = iunet.set_channels_last_attention(False)
    try:
        with torch.no_grad():
            off = fast(x, t)
    finally:
        iunet.set_channels_last_attention(previous)
    assert seen and not any(s["innermost"] or s["sdpa"] for s in seen), seen
    assert _rel(off, expected) <= 1e-5


@pytest.mark.parametrize("bf16_kernel", [False, True])
def test_channels_last_attention_bf16_within_twice_the_autocast_error(monkeypatch, bf16_kernel):
    """bf16 inference channels-last: the attention runs SDPA, or the bf16 kernel where "auto"
    takes it (forced both ways here: on a CPU without AVX512-BF16 its emulated build runs)."""
    from iddpm_ext.ops import attention as A

    monkeypatch.setattr(A, "_AUTO_BF16", bf16_kernel)
    model = _model(seed=2)
    x, t = _inputs(seed=3)
    oracle = _all_off(copy.deepcopy(model).double(), x.double(), t)
    ref_err = _rel(_all_off(model, x, t, autocast_dtype=torch.bfloat16), oracle)
    seen = _spy_attention(monkeypatch)
    bf16 = copy.deepcopy(model).to_inference(torch.bfloat16, channels_last=True)
    fp32 = copy.deepcopy(model).to_inference(channels_last=True)
    with torch.no_grad():
        got_bf16 = bf16(x, t)  # bf16 weights
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got_autocast = fp32(x, t)  # fp32 weights under autocast
    path = "bf16" if bf16_kernel else "sdpa"
    assert seen and all(s[path] and s["innermost"] for s in seen), seen
    for got in (got_bf16, got_autocast):
        err = _rel(got, oracle)
        assert 0 < ref_err and err <= 2 * ref_err, (err, ref_err)


def test_channels_last_attention_training_gradients_match_contiguous_input():
    # A channels-last input to a training model takes the block's channels-last branch (torch's
    # conv2d on the [N, C, 1, T] view, the fused attention under autograd); the same gradients
    # as the contiguous input's path. "sdpa" forced: torch's backward, the same gradients too.
    model = _model().train()
    x, t = _inputs()
    grads = {}
    for name, inp, impl in [
        ("contiguous", x, "auto"),
        ("channels_last", x.contiguous(memory_format=torch.channels_last), "auto"),
        ("channels_last_sdpa", x.contiguous(memory_format=torch.channels_last), "sdpa"),
    ]:
        model.zero_grad()
        with attention_impl(impl):
            out = model(inp, t)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads[name] = (out.detach(), [p.grad.clone() for p in model.parameters()])
    out0, g0 = grads["contiguous"]
    largest = max(b.norm() for b in g0)
    for name in ("channels_last", "channels_last_sdpa"):
        out1, g1 = grads[name]
        assert _rel(out1, out0) <= 1e-5, name
        for a, b in zip(g1, g0):
            # ≤ 1e-5 relative; gradients that are zero up to rounding (a conv bias ahead of a
            # GroupNorm) against the largest gradient instead.
            assert (a - b).norm() <= 1e-5 * max(b.norm(), 1e-2 * largest), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_stays_channels_last_at_batch_one(dtype):
    # At N = 1 the attention block's [1, C, T] -> [1, C, H, W] view had batch stride C, torch.cat
    # then wrote the skip concatenation NCHW and every later conv of the level copied it back.
    model = _model(seed=4)
    x, t = _inputs(n=1, seed=5)
    expected = _all_off(model, x, t)
    fast = copy.deepcopy(model).to_inference(dtype, channels_last=True)
    strides = []

    def note(_m, inputs):
        a = inputs[0]
        n, c, h, w = a.shape
        strides.append((type(_m).__name__, a.stride(), (h * w * c, 1, w * c, c)))

    for m in fast.modules():
        if isinstance(m, (iunet.ResBlock, iunet.AttentionBlock, iunet.Upsample)):
            m.register_forward_pre_hook(note)
    with torch.no_grad():
        got = fast(x, t)
    assert len(strides) > 5 and all(s == want for _, s, want in strides), strides
    assert _rel(got, expected) <= (1e-5 if dtype == torch.float32 else 3e-2)


def test_canonical_channels_last():
    y = torch.randn(1, 6, 12).transpose(1, 2).contiguous().transpose(1, 2)  # [1, C, T], C innermost
    v = y.reshape(1, 6, 3, 4)
    assert v.is_contiguous(memory_format=torch.channels_last) and v.stride() != (72, 1, 24, 6)
    c = inn.canonical_channels_last(v)
    assert c.stride() == (72, 1, 24, 6) and c.data_ptr() == v.data_ptr() and torch.equal(c, v)
    assert torch.cat([c, c], 1).is_contiguous(memory_format=torch.channels_last)
    for t in (c, torch.randn(2, 3, 4, 5), torch.randn(1, 6, 12)):  # canonical, NCHW, 3-D: as they are
        assert inn.canonical_channels_last(t) is t


def test_set_channels_last_attention_errors():
    with pytest.raises(ValueError, match="enabled: expected True or False, got 'yes'"):
        iunet.set_channels_last_attention("yes")
    assert iunet.set_channels_last_attention(True) is True  # the default, unchanged


# ---------------------------------------------------------------------------------
# The ResBlocks' time-embedding projections in one GEMM (to_inference(batch_emb=True))
# ---------------------------------------------------------------------------------
def test_batched_emb_matches_per_block_projections_and_tracks_weights():
    model = _model(num_classes=4)
    x, t = _inputs()
    y = torch.tensor([0, 3])
    fast = copy.deepcopy(model).to_inference(channels_last=False, prepack=False)
    assert fast.batch_emb == "cpu"  # the default: CPU calls only until it has run on a GPU
    linears = [m.emb_layers[1] for m in fast.modules() if isinstance(m, iunet.ResBlock)]

    def unbatched():
        fast.batch_emb = False
        try:
            return fast(x, t, y)
        finally:
            fast.batch_emb = "cpu"

    with torch.no_grad():
        got, expected = fast(x, t, y), unbatched()
        cache = fast._emb_gemm
        assert cache.key is not None  # the batched GEMM ran
        # fp32 on the CPU: through oneDNN's packed linear where torch has it
        assert (cache.cast[torch.float32][2] is not None) == iunet._mkldnn_linear_available()
        assert tuple(cache.weight.shape) == (sum(lin.out_features for lin in linears), linears[0].in_features)
        assert _rel(got, expected) <= 1e-6
        # A changed projection (in place, then a new tensor) is seen on the next call.
        linears[1].weight.mul_(3)
        got, expected = fast(x, t, y), unbatched()
        assert _rel(got, expected) <= 1e-6 and _rel(got, model(x, t, y)) > 1e-3
        linears[2].bias = torch.nn.Parameter(linears[2].bias + 1)
        assert _rel(fast(x, t, y), unbatched()) <= 1e-6
    # Copies and pickles start with an empty cache; state-dict keys are unchanged.
    assert copy.deepcopy(fast)._emb_gemm.key is None
    assert list(fast.state_dict()) == list(model.state_dict())
    # With gradients recorded, or a hook on a projection, each block runs its own emb_layers.
    key = cache.key
    fast.zero_grad()
    fast(x, t, y).sum().backward()
    assert linears[0].weight.grad is not None and cache.key == key
    calls = []
    linears[0].register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        assert _rel(fast(x, t, y), unbatched()) <= 1e-6
    assert calls
    fast.train()
    assert cache.key is None  # training frees it
    with pytest.raises(ValueError, match="batch_emb: expected True, False or None, got 'yes'"):
        fast.to_inference(batch_emb="yes")
    assert not fast.to_inference(batch_emb=False).batch_emb
    assert fast.to_inference(batch_emb=True).batch_emb is True


def test_batched_emb_under_autocast_casts_the_weight_once():
    """Under CPU bf16 autocast the concatenated fp32 weight is cast once and kept (autocast
    would cast it on every call); the result is the per-block projections' under autocast, and
    a changed projection drops the cast copy with the rest."""
    fast = _model().to_inference(channels_last=False, prepack=False)
    linears = [m.emb_layers[1] for m in fast.modules() if isinstance(m, iunet.ResBlock)]
    emb = torch.randn(2, linears[0].in_features)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        batched = fast._batched_emb(emb)
        cache = fast._emb_gemm
        weight, bias, packed = cache.cast[torch.bfloat16]
        assert weight.dtype == bias.dtype == torch.bfloat16 and cache.weight.dtype == torch.float32
        # oneDNN's packed linear where it runs bf16 (the GEMM torch's F.linear ran slowly)
        assert (packed is not None) == (
            torch.backends.mkldnn.is_available()
            and iunet._mkldnn_linear_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
        for block in cache.blocks:
            got, expected = batched.outs[id(block)], block.emb_layers(emb)
            assert got.dtype == expected.dtype == torch.bfloat16
            # (oneDNN's packed linear vs F.linear: equal here; another kernel choice could sum
            # in another order, so one bf16 rounding step)
            torch.testing.assert_close(got, expected, rtol=2**-7, atol=1e-6)
        fast._batched_emb(emb)
        assert cache.cast[torch.bfloat16][0] is weight  # kept, not cast again
        linears[0].weight.add_(1)
    # (a new autocast region: autocast's own cache keeps its cast of the old parameter)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        after = fast._batched_emb(emb)
        assert cache.cast[torch.bfloat16][0] is not weight
        torch.testing.assert_close(
            after.outs[id(cache.blocks[0])], cache.blocks[0].emb_layers(emb), rtol=2**-7, atol=1e-6
        )
    with torch.no_grad():  # outside autocast the fp32 weight itself
        assert fast._batched_emb(emb).outs[id(cache.blocks[1])].dtype == torch.float32


def test_batched_emb_default_leaves_other_devices_alone():
    """to_inference's default batches the projections for CPU calls only: on another device
    (here the meta device, standing in for CUDA) each block runs its own emb_layers."""
    fast = _model().to("meta").to_inference(channels_last=False, prepack=False)
    emb = torch.zeros(2, fast.time_embed[0].out_features, device="meta")
    with torch.no_grad():
        assert fast._batched_emb(emb) is emb
        fast.batch_emb = True
        assert fast._batched_emb(emb) is not emb
