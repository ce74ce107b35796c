"""Sampling: per-sample seeds (independent of batch size), DDIM, class labels, output files."""

import os

import numpy as np
import pytest
import torch

from iddpm_ext import sample as S
from iddpm_ext.script_util import create_model_and_diffusion

from _unet_util import randomize_
from _train_util import tiny_config


def _model(**overrides):
    cfg = tiny_config(**overrides)
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**cfg)
    randomize_(model)
    return model.eval(), diffusion


@pytest.mark.parametrize("use_ddim,eta", [(False, 0.0), (True, 0.0), (True, 0.7)])
def test_samples_do_not_depend_on_batch_size(use_ddim, eta):
    model, diffusion = _model(timestep_respacing="6")
    kw = dict(seed=5, use_ddim=use_ddim, eta=eta)
    a = S.generate(model, diffusion, 6, (1, 8, 8), batch_size=2, **kw)["images"]
    b = S.generate(model, diffusion, 6, (1, 8, 8), batch_size=3, **kw)["images"]
    c = S.generate(model, diffusion, 6, (1, 8, 8), batch_size=6, **kw)["images"]
    assert a.shape == (6, 8, 8, 1) and a.dtype == np.uint8
    assert np.array_equal(a, b) and np.array_equal(a, c)
    assert len({img.tobytes() for img in a}) == 6  # distinct samples
    other = S.generate(model, diffusion, 6, (1, 8, 8), batch_size=6, seed=6, use_ddim=use_ddim, eta=eta)["images"]
    assert not np.array_equal(a, other)


def test_one_sample_alone_equals_its_place_in_a_batch():
    model, diffusion = _model(timestep_respacing="4")
    x_all, _, _ = S.sample_batch(model, diffusion, [0, 1, 2, 3], (1, 8, 8), seed=1)
    x_two, _, _ = S.sample_batch(model, diffusion, [2], (1, 8, 8), seed=1)
    torch.testing.assert_close(x_all[2:3], x_two, rtol=1e-5, atol=1e-5)


def test_noise_chunks_do_not_change_samples(monkeypatch):
    model, diffusion = _model(diffusion_steps=10)
    a, _, _ = S.sample_batch(model, diffusion, [0, 1], (1, 8, 8), seed=2)
    monkeypatch.setattr(S, "NOISE_CHUNK", 3)
    b, _, _ = S.sample_batch(model, diffusion, [0, 1], (1, 8, 8), seed=2)
    assert torch.equal(a, b)


def test_class_labels_come_from_the_models_classes():
    model, diffusion = _model(class_cond=True, num_classes=3, timestep_respacing="3")
    res = S.generate(model, diffusion, 12, (1, 8, 8), batch_size=5, seed=0)
    assert res["labels"].shape == (12,) and set(res["labels"].tolist()) <= {0, 1, 2}
    assert len(set(res["labels"].tolist())) > 1
    again = S.generate(model, diffusion, 12, (1, 8, 8), batch_size=12, seed=0)
    assert np.array_equal(res["labels"], again["labels"]) and np.array_equal(res["images"], again["images"])
    fixed = S.generate(model, diffusion, 4, (1, 8, 8), batch_size=4, seed=0, label=2)
    assert fixed["labels"].tolist() == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="label"):
        S.generate(model, diffusion, 2, (1, 8, 8), label=3)


def test_fused_and_eager_steps_agree():
    model, diffusion = _model(timestep_respacing="5")
    if not hasattr(diffusion, "use_fused"):
        pytest.skip("this diffusion has no fused sampling step")
    diffusion.use_fused = False
    eager = S.sample_batch(model, diffusion, [0, 1, 2], (1, 8, 8), seed=3)[0]
    diffusion.use_fused = True
    fused = S.sample_batch(model, diffusion, [0, 1, 2], (1, 8, 8), seed=3)[0]
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-4)


def test_trajectory_and_files(tmp_path):
    model, diffusion = _model(timestep_respacing="8")
    res = S.generate(model, diffusion, 5, (1, 8, 8), batch_size=5, seed=0, trajectory_steps=4,
                     trajectory_samples=3)
    ts = [t for t, _ in res["trajectory"]]
    assert ts == [7, 5, 2, 0] and all(f.shape == (3, 1, 8, 8) for _, f in res["trajectory"])
    # the last frame is the final sample
    assert np.array_equal(S.to_uint8(res["trajectory"][-1][1]).numpy(), res["images"][:3])
    npz = str(tmp_path / S.samples_filename(res["images"]))
    assert os.path.basename(npz) == "samples_5x8x8x1.npz"
    S.save_npz(npz, res["images"], np.arange(5))
    with np.load(npz) as f:
        assert np.array_equal(f["arr_0"], res["images"]) and f["arr_1"].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(FileExistsError):
        S.save_npz(npz, res["images"][:1])
    with np.load(npz) as f:
        assert f["arr_0"].shape == (5, 8, 8, 1)  # untouched
    S.save_grid(str(tmp_path / "g.png"), res["images"])
    S.save_trajectory(str(tmp_path / "t.png"), res["trajectory"])
    from PIL import Image

    with Image.open(tmp_path / "g.png") as g, Image.open(tmp_path / "t.png") as t:
        assert g.size == ((3 * 10 + 2) * 12, (2 * 10 + 2) * 12)  # 3x2 tiles of 8 px + 2 px pads, ×12
        assert t.size == ((4 * 10 + 2) * 12, (3 * 10 + 2) * 12)
    with pytest.raises(FileExistsError, match="already exists"):
        S.check_outputs_free([str(tmp_path / "none.png"), npz])
