"""IDDPMUNet2DModel (our UNet as a diffusers ModelMixin) in DDPMPipeline with IDDPMScheduler
(skipped without diffusers): sampling (shape, range, determinism, equal to our p_sample_loop),
save_pretrained / from_pretrained of each part and of the pipeline, improved-diffusion
checkpoints (state dicts, .pt, our .safetensors with their config) and their errors."""

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, ModelMixin  # noqa: E402

from helpers.models import randomize_  # noqa: E402
from helpers.training import TINY  # noqa: E402
from iddpm_ext import (  # noqa: E402
    LossType,
    ModelMeanType,
    ModelVarType,
    SpacedDiffusion,
    create_model_and_diffusion,
    get_named_beta_schedule,
    model_and_diffusion_defaults,
)
from iddpm_ext.engine.scheduler import IDDPMScheduler  # noqa: E402
from iddpm_ext.errors import CheckpointError  # noqa: E402
from iddpm_ext.integrations import IDDPMUNet2DModel, pipeline_from_improved_diffusion  # noqa: E402
from iddpm_ext.training.checkpoint import save_weights  # noqa: E402

pytestmark = pytest.mark.kernels

# A tiny improved-diffusion configuration (the reference's flag names): the tests' tiny UNet
# on 3 channels, with 100 diffusion steps and rescaled timesteps.
FLAGS = {k: v for k, v in TINY.items() if k != "image_channels"}
FLAGS.update(diffusion_steps=100, rescale_timesteps=True)


def _reference_model(**overrides):
    """(UNetModel with random weights, its SpacedDiffusion) from the flags, as a user of the
    reference builds them."""
    args = {**model_and_diffusion_defaults(), **FLAGS, **overrides}
    model, diffusion = create_model_and_diffusion(**args)
    return randomize_(model, seed=3).eval(), diffusion, args


@pytest.fixture(scope="module")
def reference():
    return _reference_model()


@pytest.fixture(scope="module")
def unet(reference):
    model, _, _ = reference
    return IDDPMUNet2DModel.from_improved_diffusion(model.state_dict(), **FLAGS)


def _images(pipe, seed=0, steps=5, batch=2):
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(seed)
    return pipe(batch_size=batch, generator=gen, num_inference_steps=steps, output_type="np").images


def test_wrapper_is_a_diffusers_model_with_the_reference_outputs(reference, unet):
    model, _, _ = reference
    assert isinstance(unet, ModelMixin) and unet.config.sample_size == 8 and unet.config.in_channels == 3
    assert unet.config.out_channels == 6 and unet.config.rescale_timesteps
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = unet(x, torch.tensor(40))
        ref = model(x, torch.tensor([40.0, 40.0]) * (1000.0 / 100))  # rescale_timesteps
        assert torch.equal(out.sample, ref)
        (as_tuple,) = unet(x, 40, return_dict=False)  # a Python int, broadcast to the batch
        assert torch.equal(as_tuple, ref)
        per_item = unet(x, torch.tensor([40, 7])).sample
        assert torch.equal(per_item[0], ref[0]) and not torch.equal(per_item[1], ref[1])


def test_pipeline_samples_deterministically_and_as_our_loop(reference, unet):
    _, _, args = reference
    sched = IDDPMScheduler.from_improved_diffusion(**{**args, "rescale_timesteps": False})
    pipe = DDPMPipeline(unet=unet, scheduler=sched)
    a, b, c = _images(pipe, seed=0), _images(pipe, seed=0), _images(pipe, seed=1)
    assert a.shape == (2, 8, 8, 3) and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0 and a.std() > 0.05
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # The pipeline's loop is our p_sample_loop on the same timesteps, x_T and generator.
    model, _, _ = reference
    sched.set_timesteps(5)  # the pipeline's "leading" timesteps: 80, 60, 40, 20, 0
    diffusion = SpacedDiffusion(  # the flags' process, respaced to exactly those
        set(sched.timesteps.tolist()),
        betas=get_named_beta_schedule("cosine", 100),
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=ModelVarType.LEARNED_RANGE,
        loss_type=LossType.MSE,
        rescale_timesteps=True,
    )
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn((2, 3, 8, 8), generator=gen)  # what the pipeline draws first
    ours = diffusion.p_sample_loop(model, (2, 3, 8, 8), noise=x_T, generator=gen)
    expected = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(a, expected, rtol=0, atol=1e-6)


def test_pipeline_with_diffusers_own_scheduler(unet):
    """DDPMScheduler(variance_type="learned_range") splits the wrapper's 2C channels too."""
    sched = DDPMScheduler(
        num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", variance_type="learned_range"
    )
    images = _images(DDPMPipeline(unet=unet, scheduler=sched), steps=4)
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all() and images.std() > 0.05


def test_save_and_load_each_part_and_the_pipeline(tmp_path, unet):
    sched = IDDPMScheduler.from_improved_diffusion(**FLAGS, timestep_spacing="trailing")
    unet.save_pretrained(tmp_path / "unet")
    back = IDDPMUNet2DModel.from_pretrained(tmp_path / "unet")
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(back.config) == public(unet.config)
    for key, value in unet.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    pipe = DDPMPipeline(unet=unet, scheduler=sched)
    before = _images(pipe, seed=5)
    pipe.save_pretrained(tmp_path / "pipe")
    for loader in (DDPMPipeline, DiffusionPipeline):
        loaded = loader.from_pretrained(tmp_path / "pipe")
        assert type(loaded.unet) is IDDPMUNet2DModel and type(loaded.scheduler) is IDDPMScheduler
        assert loaded.scheduler.config.timestep_spacing == "trailing"
        assert np.array_equal(_images(loaded, seed=5), before)


def test_checkpoint_files_load(tmp_path, reference):
    model, _, args = reference
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        want = model(x, torch.tensor([500.0]))  # t = 50 of 100, rescaled
    # a reference .pt with the flags
    torch.save(model.state_dict(), tmp_path / "ema_0.9999_000010.pt")
    from_pt = IDDPMUNet2DModel.from_improved_diffusion(str(tmp_path / "ema_0.9999_000010.pt"), **FLAGS)
    # our .safetensors carries its config: no flags needed
    save_weights(str(tmp_path / "model.safetensors"), model.state_dict(), args)
    from_st = IDDPMUNet2DModel.from_improved_diffusion(tmp_path / "model.safetensors")
    assert not from_st.training and from_st.config.num_train_timesteps == 100
    with torch.no_grad():
        for loaded in (from_pt, from_st):
            assert torch.equal(loaded(x, 50).sample, want)
    pipe = pipeline_from_improved_diffusion(tmp_path / "model.safetensors", timestep_spacing="respace")
    assert pipe.scheduler.config.variance_type == "learned_range"
    assert not pipe.scheduler.config.rescale_timesteps  # the wrapper scales
    assert _images(pipe, steps=3).shape == (2, 8, 8, 3)


def test_checkpoint_errors(tmp_path, reference):
    model, _, args = reference
    state = model.state_dict()
    save_weights(str(tmp_path / "model.safetensors"), state, args)
    with pytest.raises(CheckpointError, match=r"num_channels=32 in the checkpoint but 64 from the flags"):
        IDDPMUNet2DModel.from_improved_diffusion(str(tmp_path / "model.safetensors"), num_channels=64)
    with pytest.raises(CheckpointError, match=r"shape mismatches"):
        IDDPMUNet2DModel.from_improved_diffusion(state, **{**FLAGS, "learn_sigma": False})
    with pytest.raises(CheckpointError, match=r"missing 1 tensors"):
        IDDPMUNet2DModel.from_improved_diffusion({k: v for k, v in list(state.items())[1:]}, **FLAGS)
    with pytest.raises(CheckpointError, match=r"no such checkpoint file"):
        IDDPMUNet2DModel.from_improved_diffusion(str(tmp_path / "none.pt"), **FLAGS)
    with pytest.raises(ValueError, match=r"flags: unknown names \['num_channel'\]"):
        IDDPMUNet2DModel.from_improved_diffusion(state, num_channel=32)
    with pytest.raises(ValueError, match=r"checkpoint: expected a path or a state dict of tensors, got int"):
        IDDPMUNet2DModel.from_improved_diffusion(3, **FLAGS)
    with pytest.raises(ValueError, match=r"sample_size: expected a positive int, got 0"):
        IDDPMUNet2DModel(sample_size=0)


def test_class_conditional_model_takes_class_labels():
    model, _, args = _reference_model(class_cond=True, num_classes=4, learn_sigma=False)
    flags = {k: args[k] for k in ("class_cond", "num_classes", "learn_sigma")}
    unet = IDDPMUNet2DModel.from_improved_diffusion(model.state_dict(), **{**FLAGS, **flags})
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 3])
    with torch.no_grad():
        out = unet(x, 10, class_labels=y).sample
        assert torch.equal(out, model(x, torch.tensor([100.0, 100.0]), y=y))
    assert unet.config.num_classes == 4 and out.shape == (2, 3, 8, 8)
