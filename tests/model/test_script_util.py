"""script_util: model constructors and command-line helpers with the reference's names."""

from __future__ import annotations

import argparse
import inspect

import pytest
import torch

from iddpm_ext import SpacedDiffusion, SuperResModel, UNetModel, script_util
from iddpm_ext.gaussian_diffusion import LossType, ModelMeanType, ModelVarType

# improved-diffusion's model_and_diffusion_defaults(), as published (README / script_util.py).
# A table, laid out by hand.
# fmt: off
REFERENCE_DEFAULTS = dict(
    image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
    attention_resolutions="16,8", dropout=0.0, learn_sigma=False, sigma_small=False,
    class_cond=False, diffusion_steps=1000, noise_schedule="linear", timestep_respacing="",
    use_kl=False, predict_xstart=False, rescale_timesteps=True, rescale_learned_sigmas=True,
    use_checkpoint=False, use_scale_shift_norm=True,
)
# fmt: on


def _small(**overrides):
    """create_model arguments for a small model (32 channels, 1 res block)."""
    kw = dict(image_size=32, num_channels=32, num_res_blocks=1, learn_sigma=False,
              class_cond=False, use_checkpoint=False, attention_resolutions="16,8", num_heads=4,
              num_heads_upsample=-1, use_scale_shift_norm=True, dropout=0.0)  # fmt: skip
    kw.update(overrides)
    return kw


def test_defaults_are_the_reference_plus_extras():
    d = script_util.model_and_diffusion_defaults()
    assert {k: d[k] for k in REFERENCE_DEFAULTS} == REFERENCE_DEFAULTS
    assert set(d) - set(REFERENCE_DEFAULTS) == {"channel_mult", "num_classes", "image_channels"}
    assert d["channel_mult"] == "" and d["num_classes"] == 1000 and d["image_channels"] == 3
    # every default key is an argument of create_model_and_diffusion
    assert set(d) == set(inspect.signature(script_util.create_model_and_diffusion).parameters)


def test_create_model_and_diffusion_from_defaults():
    d = script_util.model_and_diffusion_defaults()
    d.update(
        image_size=32,
        num_channels=32,
        num_res_blocks=1,
        learn_sigma=True,
        class_cond=True,
        num_classes=7,
        diffusion_steps=100,
        noise_schedule="cosine",
        timestep_respacing="25",
        dropout=0.1,
    )
    model, diffusion = script_util.create_model_and_diffusion(**d)
    assert isinstance(model, UNetModel) and isinstance(diffusion, SpacedDiffusion)
    assert model.out_channels == 6 and model.in_channels == 3
    assert model.num_classes == 7 and model.label_emb.weight.shape == (7, 128)
    assert model.channel_mult == (1, 2, 2, 2) and model.attention_resolutions == (2, 4)
    assert model.input_blocks[1][0].use_scale_shift_norm and model.dropout == 0.1
    assert diffusion.num_timesteps == 25 and diffusion.original_num_steps == 100
    assert diffusion.model_var_type == ModelVarType.LEARNED_RANGE
    assert diffusion.model_mean_type == ModelMeanType.EPSILON
    assert diffusion.loss_type == LossType.RESCALED_MSE and diffusion.rescale_timesteps
    out = model(torch.randn(2, 3, 32, 32), torch.tensor([0, 99]), y=torch.tensor([0, 6]))
    assert out.shape == (2, 6, 32, 32)


@pytest.mark.parametrize(
    "size, mult", [(32, (1, 2, 2, 2)), (64, (1, 2, 3, 4)), (128, (1, 1, 2, 3, 4)), (256, (1, 1, 2, 2, 4, 4))]
)
def test_channel_mult_by_image_size(size, mult):
    model = script_util.create_model(**_small(image_size=size, num_channels=32))
    assert model.channel_mult == mult
    assert model.attention_resolutions == (size // 16, size // 8)
    assert model.num_classes is None and model.out_channels == 3


def test_channel_mult_override_and_unsupported_size():
    with pytest.raises(ValueError, match="image_size"):
        script_util.create_model(**_small(image_size=48))
    for override in ("1,2,2", (1, 2, 2), [1, 2, 2], " 1, 2,2 "):
        model = script_util.create_model(
            **_small(image_size=48, channel_mult=override, attention_resolutions="12")
        )
        assert model.channel_mult == (1, 2, 2) and model.attention_resolutions == (4,)
    model = script_util.create_model(**_small(channel_mult="1,2"))  # override beats the table
    assert model.channel_mult == (1, 2)
    with pytest.raises(ValueError, match="channel_mult"):
        script_util.create_model(**_small(channel_mult="1,two"))


def test_attention_resolutions_and_num_classes():
    model = script_util.create_model(**_small(attention_resolutions=(32, 4)))
    assert model.attention_resolutions == (1, 8)
    # a size that does not divide the image size: image_size // res, as the reference, with a warning
    with pytest.warns(UserWarning, match=r"12 does not divide the image size 32.* 32 // 12 = 2"):
        model = script_util.create_model(**_small(attention_resolutions="16,12"))
    assert model.attention_resolutions == (2, 2)
    with pytest.warns(UserWarning, match=r"64 does not divide the image size 32.* = 0: attention nowhere"):
        assert script_util.create_model(**_small(attention_resolutions="64")).attention_resolutions == (0,)
    with pytest.raises(ValueError, match="attention_resolutions: expected positive"):
        script_util.create_model(**_small(attention_resolutions="16,0"))
    with pytest.raises(ValueError, match="attention_resolutions"):
        script_util.create_model(**_small(attention_resolutions="sixteen"))
    model = script_util.create_model(**_small(class_cond=True))
    assert model.num_classes == 1000  # the reference's fixed count, by default
    model = script_util.create_model(**_small(class_cond=True, num_classes=10))
    assert model.num_classes == 10
    with pytest.raises(ValueError, match="num_classes"):
        script_util.create_model(**_small(class_cond=True, num_classes=0))
    assert script_util.create_model(**_small(class_cond=False, num_classes=0)).num_classes is None


def test_super_resolution_constructors():
    d = script_util.sr_model_and_diffusion_defaults()
    assert d["large_size"] == 256 and d["small_size"] == 64 and "image_size" not in d
    assert "sigma_small" not in d  # the reference's SR constructor has no sigma_small
    d.update(large_size=64, small_size=32, num_channels=32, num_res_blocks=1, diffusion_steps=100)
    model, diffusion = script_util.sr_create_model_and_diffusion(**d)
    assert model.iddpm_config == d  # recorded for the trainer's checkpoints
    assert isinstance(model, SuperResModel) and model.in_channels == 6
    assert model.channel_mult == (1, 2, 3, 4) and diffusion.num_timesteps == 100
    out = model(torch.randn(1, 3, 64, 64), torch.tensor([3]), low_res=torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="large_size"):
        d.update(large_size=40)
        script_util.sr_create_model_and_diffusion(**d)


def test_argparse_helpers():
    parser = argparse.ArgumentParser()
    defaults = dict(lr=1e-4, steps=10, name="x", flag=True, maybe=None)
    script_util.add_dict_to_argparser(parser, defaults)
    args = parser.parse_args([])
    assert script_util.args_to_dict(args, defaults.keys()) == defaults
    args = parser.parse_args(["--lr", "0.5", "--steps", "3", "--flag", "no", "--maybe", "m"])
    assert (args.lr, args.steps, args.flag, args.maybe) == (0.5, 3, False, "m")
    assert script_util.args_to_dict(args, ["steps"]) == {"steps": 3}
    for text in ("yes", "True", "T", "y", "1"):
        assert script_util.str2bool(text) is True
    for text in ("no", "FALSE", "f", "n", "0"):
        assert script_util.str2bool(text) is False
    assert script_util.str2bool(False) is False
    with pytest.raises(argparse.ArgumentTypeError):
        script_util.str2bool("maybe")
    # The full default set round-trips through the command line.
    parser = argparse.ArgumentParser()
    script_util.add_dict_to_argparser(parser, script_util.model_and_diffusion_defaults())
    args = parser.parse_args(["--channel_mult", "1,2", "--class_cond", "true"])
    d = script_util.args_to_dict(args, script_util.model_and_diffusion_defaults().keys())
    assert d["channel_mult"] == "1,2" and d["class_cond"] is True and d["num_classes"] == 1000
