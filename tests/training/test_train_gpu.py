"""Training and sampling on a CUDA device (run by scripts/gpu_check.sh)."""

import numpy as np
import pytest
import torch

from helpers.models import randomize_
from helpers.training import blob_images, tiny_config
from iddpm_ext.cli import generate as S
from iddpm_ext.script_util import create_model_and_diffusion
from iddpm_ext.training.data import ArraySource, BatchStream
from iddpm_ext.training.log import read_jsonl
from iddpm_ext.training.loop import TrainLoop

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_cuda_training_steps(tmp_path, amp):
    cfg = tiny_config(dropout=0.1)
    images, labels = blob_images(64, 8, 1)

    def loop(resume: str, max_steps: int) -> TrainLoop:
        model, diffusion = create_model_and_diffusion(**cfg)
        data = BatchStream(ArraySource(images, labels), 16)
        return TrainLoop(model=model.cuda(), diffusion=diffusion, data=data, batch_size=16, microbatch=8,
                         lr=1e-3, ema_rate="0.9", log_interval=1, save_interval=4, resume_checkpoint=resume,
                         config=cfg, out_dir=str(tmp_path), amp=amp, max_steps=max_steps,
                         progress=False)  # fmt: skip

    torch.manual_seed(0)
    loop(resume="", max_steps=4).run_loop()
    recs = read_jsonl(str(tmp_path / "progress.jsonl"))
    assert len(recs) == 4 and all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in recs)
    # resume on the GPU restores the CUDA RNG state and continues
    loop2 = loop(resume=str(tmp_path), max_steps=6)
    assert loop2.step == 4
    loop2.run_loop()
    assert [r["step"] for r in read_jsonl(str(tmp_path / "progress.jsonl"))] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("saved_fused, resumed_fused", [(False, True), (True, False)])
def test_cuda_resume_across_adamw_implementations(tmp_path, saved_fused, resumed_fused):
    """A run saved with one AdamW implementation resumed with the other on CUDA: the fused kernel
    needs the loaded step counters on the parameters' device (TrainLoop writes its implementation
    into the state's param groups before loading); the resumed steps run and stay finite."""
    cfg = tiny_config(dropout=0.0)
    images, labels = blob_images(32, 8, 1)

    def loop(out, resume, max_steps, fused):
        model, diffusion = create_model_and_diffusion(**cfg)
        data = BatchStream(ArraySource(images, labels), 8)
        return TrainLoop(model=model.cuda(), diffusion=diffusion, data=data, batch_size=8, microbatch=-1,
                         lr=1e-3, ema_rate="0.9", log_interval=1, save_interval=2, resume_checkpoint=resume,
                         config=cfg, out_dir=str(out), max_steps=max_steps, progress=False,
                         fused_optimizer=fused)  # fmt: skip

    torch.manual_seed(0)
    loop(tmp_path / "a", "", 2, saved_fused).run_loop()
    again = loop(tmp_path / "b", str(tmp_path / "a"), 4, resumed_fused)
    assert again.step == 2 and again.fused_optimizer is resumed_fused
    for p, st in again.opt.state.items():
        assert st["step"].device == (p.device if resumed_fused else torch.device("cpu")), st["step"].device
    again.run_loop()
    recs = read_jsonl(str(tmp_path / "b" / "progress.jsonl"))
    assert [r["step"] for r in recs] == [3, 4] and all(np.isfinite(r["loss"]) for r in recs)


def test_cuda_samples_do_not_depend_on_batch_size():
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(
        **tiny_config(timestep_respacing="8", class_cond=True, num_classes=3)
    )
    randomize_(model)
    model.cuda().eval()
    a = S.generate(model, diffusion, 6, (1, 8, 8), batch_size=2, seed=4, device="cuda")
    b = S.generate(model, diffusion, 6, (1, 8, 8), batch_size=6, seed=4, device="cuda")
    assert np.array_equal(a["labels"], b["labels"])
    # cuDNN may pick other algorithms per batch size: allow one step of uint8 rounding
    assert np.abs(a["images"].astype(int) - b["images"].astype(int)).max() <= 1
    assert len({i.tobytes() for i in a["images"]}) == 6


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_cuda_compiled_training_follows_the_eager_run(tmp_path, mode):
    """TrainLoop(compile=mode) on CUDA (inductor; reduce-overhead adds CUDA graphs): the loss
    curve of 4 steps (dropout 0) is the eager run's within fp32 reduction-order rounding (cuDNN
    may pick other algorithms: not bitwise) and the checkpoint has the eager run's keys."""
    from iddpm_ext.training import checkpoint as ckpt

    cfg = tiny_config(dropout=0.0, diffusion_steps=5)
    images, labels = blob_images(32, 8, 1)
    runs = {}
    for name, comp in (("eager", "none"), ("compiled", mode)):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model, diffusion = create_model_and_diffusion(**cfg)
        data = BatchStream(ArraySource(images, labels), 8, seed=0)
        out = tmp_path / name
        TrainLoop(model=model.cuda(), diffusion=diffusion, data=data, batch_size=8, microbatch=-1, lr=1e-3,
                  ema_rate="0.9", log_interval=1, save_interval=4, resume_checkpoint="", config=cfg,
                  out_dir=str(out), max_steps=4, compile=comp, progress=False).run_loop()  # fmt: skip
        losses = [r["loss"] for r in read_jsonl(str(out / "progress.jsonl"))]
        runs[name] = (losses, ckpt.load_weights(str(out / "model000004.safetensors"))[0])
    (l0, w0), (l1, w1) = runs["eager"], runs["compiled"]
    np.testing.assert_allclose(l1, l0, rtol=1e-3, atol=1e-5)
    assert sorted(w1) == sorted(w0) and all(w1[k].shape == w0[k].shape for k in w0)
