"""Parity with openai/improved-diffusion's UNet (dev-time check, not run in CI).

Skipped unless IDDPM_REF_PATH names a checkout of improved-diffusion (the folder that
holds the ``improved_diffusion`` package), e.g.

    IDDPM_REF_PATH=/tmp/ref pytest -q tests/compat/test_unet_reference.py -s

Builds the reference model and ours with the same arguments, loads the reference's
state_dict into ours with strict=True, and compares outputs (and gradients) in fp32.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

from helpers.models import randomize_
from iddpm_ext import nn as inn
from iddpm_ext import script_util
from iddpm_ext.unet import SuperResModel, UNetModel

REF_PATH = os.environ.get("IDDPM_REF_PATH")
pytestmark = pytest.mark.skipif(
    not REF_PATH or not os.path.isdir(os.path.join(REF_PATH, "improved_diffusion")),
    reason="set IDDPM_REF_PATH to a checkout of openai/improved-diffusion",
)


def _ref():
    """The reference's unet and script_util modules (imported by package path, so the
    rest of the package, e.g. dist_util's mpi4py, is not needed)."""
    if REF_PATH not in sys.path:
        sys.path.insert(0, REF_PATH)
    unet = importlib.import_module("improved_diffusion.unet")
    try:
        su = importlib.import_module("improved_diffusion.script_util")
    except ImportError:  # pragma: no cover - depends on the checkout
        su = None
    return unet, su


# Model configurations, laid out by hand.
# fmt: off
CONFIGS = {
    "plain": dict(in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
                  attention_resolutions=(2,), channel_mult=(1, 2)),
    "class_cond_scale_shift_4_heads": dict(
        in_channels=3, model_channels=64, out_channels=6, num_res_blocks=2,
        attention_resolutions=(1, 4), channel_mult=(1, 2, 2), num_classes=10, num_heads=4,
        num_heads_upsample=2, use_scale_shift_norm=True, dropout=0.1),
    "dims1": dict(in_channels=2, model_channels=32, out_channels=2, num_res_blocks=1,
                  attention_resolutions=(2,), channel_mult=(1, 2), dims=1, num_heads=2),
}
# fmt: on
MAX_DIFF = {}


def _inputs(kw, n=2):
    gen = torch.Generator().manual_seed(3)
    spatial = (16,) * kw.get("dims", 2)
    x = torch.randn(n, kw["in_channels"], *spatial, generator=gen)
    t = torch.randint(0, 1000, (n,), generator=gen)
    y = torch.randint(0, kw["num_classes"], (n,), generator=gen) if "num_classes" in kw else None
    return x, t, y


def _assert_same_gradients(ref, ours, expected, got):
    """The reference's and our parameters get the same gradients of _loss."""
    _loss(expected).backward()
    _loss(got).backward()
    ref_grads = dict(ref.named_parameters())
    for k, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[k].grad, rtol=1e-4, atol=1e-4, msg=k)


def _loss(out):
    return (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_reference_checkpoint_loads_and_matches(name):
    ref_unet, _ = _ref()
    kw = CONFIGS[name]
    torch.manual_seed(0)
    ref = randomize_(ref_unet.UNetModel(**kw), seed=5).eval()
    ours = UNetModel(**kw).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
        (k, v.shape) for k, v in ref.state_dict().items()
    ]

    x, t, y = _inputs(kw)
    expected, got = ref(x, t, y), ours(x, t, y)
    diff = (got - expected).abs().max().item()
    MAX_DIFF[name] = diff
    print(f"\n{name}: max |ours - reference| = {diff:.3g} (output max {expected.abs().max():.3g})")
    assert diff <= 1e-4

    _assert_same_gradients(ref, ours, expected, got)


def test_reference_timestep_embedding_bit_for_bit():
    _ref()  # puts the checkout on sys.path
    ref_nn = importlib.import_module("improved_diffusion.nn")
    t = torch.cat([torch.arange(1000).float(), torch.rand(50) * 1000])  # rescaled (fractional) too
    for dim in (7, 32, 96, 128, 129, 160, 192, 384):
        assert torch.equal(inn.timestep_embedding(t, dim), ref_nn.timestep_embedding(t, dim)), dim


def test_reference_create_model_cifar10_and_feature_vectors():
    ref_unet, ref_su = _ref()
    if ref_su is None:
        pytest.skip("the reference's script_util did not import")
    args = dict(learn_sigma=True, class_cond=True, use_checkpoint=False, attention_resolutions="16,8",
                num_heads=4, num_heads_upsample=-1, use_scale_shift_norm=True, dropout=0.0)  # fmt: skip
    ref = ref_su.create_model(32, 64, 1, **args)
    ours = script_util.create_model(32, 64, 1, **args)
    ours.load_state_dict(randomize_(ref, seed=9).state_dict(), strict=True)
    x, t, _ = _inputs(dict(in_channels=3))
    y = torch.tensor([17, 999])
    with torch.no_grad():
        diff = (ours(x, t, y) - ref(x, t, y)).abs().max().item()
        fr, fo = ref.get_feature_vectors(x, t, y), ours.get_feature_vectors(x, t, y)
    MAX_DIFF["create_model"] = diff
    print(f"\ncreate_model(32, 64, 1, class_cond): max diff {diff:.3g}")
    assert diff <= 1e-4
    for part in ("down", "up"):
        for a, b in zip(fo[part], fr[part], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fo["middle"], fr["middle"], rtol=1e-4, atol=1e-4)


def test_reference_super_res_and_checkpointing():
    ref_unet, _ = _ref()
    kw = {**CONFIGS["plain"], "use_checkpoint": True}
    ref = randomize_(ref_unet.SuperResModel(**kw), seed=2)
    ours = SuperResModel(**kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, t, _ = _inputs(dict(in_channels=3))
    low = torch.randn(2, 3, 8, 8)
    expected, got = ref(x, t, low_res=low), ours(x, t, low_res=low)
    diff = (got - expected).abs().max().item()
    MAX_DIFF["super_res_checkpoint"] = diff
    assert diff <= 1e-4
    _assert_same_gradients(ref, ours, expected, got)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_reference_matches_channels_last_inference_paths():
    # to_inference(channels_last=True): the attention blocks keep channels-last activations and
    # "auto" runs torch's SDPA on the [N, T, 3C] qkv. fp32 ≤ 1e-5 relative to the reference;
    # bf16 (weights, and fp32 weights under autocast) within 2× of the reference's own
    # bf16-autocast error against its fp32 output.
    ref_unet, _ = _ref()
    kw = CONFIGS["class_cond_scale_shift_4_heads"]
    ref = randomize_(ref_unet.UNetModel(**kw), seed=7).eval()
    x, t, y = _inputs(kw)
    with torch.no_grad():
        expected = ref(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref_bf16 = ref(x, t, y)
    ref_err = _rel(ref_bf16, expected)

    def ours(*args, **kwargs):
        model = UNetModel(**kw)
        model.load_state_dict(ref.state_dict(), strict=True)
        return model.to_inference(*args, **kwargs)

    with torch.no_grad():
        fp32 = ours(channels_last=True, prepack=True)(x, t, y)
        bf16 = ours(torch.bfloat16, channels_last=True, prepack=True)(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = ours(channels_last=True, prepack=True)(x, t, y)
    MAX_DIFF["channels_last_fp32_rel"] = _rel(fp32, expected)
    print(f"\nchannels-last paths: fp32 rel {_rel(fp32, expected):.3g}; bf16 rel {_rel(bf16, expected):.3g}, "
          f"autocast {_rel(autocast, expected):.3g}, reference's own bf16 {ref_err:.3g}")  # fmt: skip
    assert _rel(fp32, expected) <= 1e-5
    assert 0 < ref_err
    assert _rel(bf16, expected) <= 2 * ref_err and _rel(autocast, expected) <= 2 * ref_err
