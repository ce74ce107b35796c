"""TrainLoop: exact resume, microbatching, EMA, AMP, clipping, annealing, logs and plot."""

import json
import os
import time

import numpy as np
import pytest
import torch

from helpers.training import blob_images, tiny_config
from iddpm_ext.resample import create_named_schedule_sampler
from iddpm_ext.script_util import create_model_and_diffusion
from iddpm_ext.training import checkpoint as ckpt
from iddpm_ext.training.data import ArraySource, BatchStream
from iddpm_ext.training.log import read_jsonl
from iddpm_ext.training.loop import TrainLoop


def _loop(out_dir, *, seed=0, batch_size=8, sampler="uniform", resume="", config=None, **kw):
    cfg = config or tiny_config(dropout=0.1, diffusion_steps=5)
    torch.manual_seed(seed)
    model, diffusion = create_model_and_diffusion(**cfg)
    images, labels = blob_images(48, 8, 1)
    data = BatchStream(
        ArraySource(images, labels), batch_size, seed=seed, random_flip=True, class_cond=cfg["class_cond"]
    )
    args = dict(
        model=model,
        diffusion=diffusion,
        data=data,
        batch_size=batch_size,
        microbatch=-1,
        lr=1e-3,
        ema_rate="0.9,0.99",
        log_interval=1,
        save_interval=1000,
        resume_checkpoint=resume,
        schedule_sampler=create_named_schedule_sampler(sampler, diffusion),
        config=cfg,
        out_dir=str(out_dir),
        seed=seed,
        progress=False,
        log=lambda *a: None,
    )
    args.update(kw)
    return TrainLoop(**args)


def _losses(out_dir):
    return [
        (r["step"], r["loss"], r["grad_norm"]) for r in read_jsonl(os.path.join(out_dir, "progress.jsonl"))
    ]


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    # loss-second-moment with T=5 warms up after 50 losses (7 steps of 8): the history
    # saved at step 4 decides the timestep distribution after the resume.
    common = dict(sampler="loss-second-moment", microbatch=3)
    full = _loop(tmp_path / "full", max_steps=10, save_interval=4, **common)
    full.run_loop()
    part = _loop(tmp_path / "part", max_steps=4, save_interval=4, **common)
    part.run_loop()
    resumed = _loop(tmp_path / "part", max_steps=10, save_interval=4, resume=str(tmp_path / "part"), **common)
    assert resumed.step == 4
    resumed.run_loop()
    assert _losses(tmp_path / "full") == _losses(tmp_path / "part")  # exact equality on CPU
    assert len(_losses(tmp_path / "full")) == 10
    for name in ("model000010.safetensors", "ema_0.9_000010.safetensors", "ema_0.99_000010.safetensors"):
        a, _, _ = ckpt.load_weights(str(tmp_path / "full" / name))
        b, _, _ = ckpt.load_weights(str(tmp_path / "part" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert full.schedule_sampler._warmed_up()
    state = ckpt.load_train_state(str(tmp_path / "part" / "opt000010.pt"))
    assert state["step"] == 10 and state["data"]["position"] == 10


class _FixedNoise:
    """Delegates to a diffusion, with noise a fixed function of the batch item (so a batch
    and its microbatches see the same noise)."""

    def __init__(self, diffusion):
        self.d = diffusion

    def __getattr__(self, name):
        return getattr(self.d, name)

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        noise = torch.sin(7.0 * x_start + t.view(-1, 1, 1, 1).float())
        return self.d.training_losses(model, x_start, t, model_kwargs=model_kwargs, noise=noise)


class _FixedTimesteps:
    def __init__(self, ts):
        self.ts, self.pos = ts, 0

    def sample(self, n, device, rng=None):
        t = torch.tensor(self.ts[self.pos : self.pos + n], device=device)
        self.pos += n
        return t, torch.ones(n, device=device)


def test_microbatches_accumulate_the_batch_gradient(tmp_path):
    grads = {}
    for micro in (-1, 3):
        loop = _loop(tmp_path / str(micro), microbatch=micro, config=tiny_config(diffusion_steps=5))
        loop.diffusion = _FixedNoise(loop.diffusion)
        loop.schedule_sampler = _FixedTimesteps([0, 1, 2, 3, 4, 4, 2, 0])
        x, cond = next(loop.data)
        loop.forward_backward(x, cond)
        grads[micro] = torch.cat([p.grad.flatten() for p in loop.params])
    assert torch.allclose(grads[-1], grads[3], rtol=1e-5, atol=1e-7)


def test_ema_rates_clip_and_anneal(tmp_path):
    loop = _loop(tmp_path, ema_rate="0.0,0.5", grad_clip=1e-3, lr_anneal_steps=4, max_steps=0)
    before = [p.detach().clone() for p in loop.params]
    loop.run_loop()
    assert loop.step == 4  # stops at lr_anneal_steps
    recs = read_jsonl(str(tmp_path / "progress.jsonl"))
    assert [r["lr"] for r in recs] == pytest.approx([1e-3 * (1 - s / 4) for s in range(4)])
    assert all(r["grad_norm"] > 1e-3 for r in recs)  # the logged norm is before clipping
    clipped = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in loop.params))
    assert clipped <= 1e-3 * 1.01
    ema0, ema5 = loop.ema_params
    assert all(torch.equal(e, p) for e, p in zip(ema0, loop.params))  # rate 0: the model itself
    # rate 0.5 after 4 steps: between the initial and the final weights, equal to neither
    assert not all(torch.equal(e, p) for e, p in zip(ema5, loop.params))
    assert not all(torch.equal(e, b) for e, b in zip(ema5, before))
    files = sorted(os.listdir(tmp_path))
    assert "ema_0.0_000004.safetensors" in files and "ema_0.5_000004.safetensors" in files


def test_log_records_and_plot(tmp_path):
    loop = _loop(tmp_path, max_steps=6, log_interval=3, save_interval=3, batch_size=16)
    loop.run_loop()
    recs = read_jsonl(str(tmp_path / "progress.jsonl"))
    assert [r["step"] for r in recs] == [3, 6] and recs[-1]["samples"] == 6 * 16
    for key in ("loss", "mse", "vb", "grad_norm", "samples_per_s", "lr", "loss_q0", "mse_q3"):
        assert key in recs[0] and np.isfinite(recs[0][key]), key
    # per-sample loss = mse + vb is a float32 sum: equal to float32 rounding
    assert recs[0]["loss"] == pytest.approx(recs[0]["mse"] + recs[0]["vb"], rel=1e-6)
    from PIL import Image

    with Image.open(tmp_path / "loss.png") as img:
        assert img.size == (1000, 680)  # training.plots.loss_figure's size
    latest = json.load(open(tmp_path / "latest.json"))
    assert latest["step"] == 6 and latest["ema"] == {
        "0.9": "ema_0.9_000006.safetensors",
        "0.99": "ema_0.99_000006.safetensors",
    }


def test_plot_refresh_schedule(tmp_path, monkeypatch):
    """loss.png is drawn once, at the end, by a run shorter than PLOT_EVERY_S; with a zero
    interval and cost factor, after every logged interval and at the end; the interval after
    a drawing is at least PLOT_COST_FACTOR times the drawing's time. (Intervals far from a
    run's length: a loaded machine cannot make this flaky.)"""
    from iddpm_ext.training import loop as loop_mod
    from iddpm_ext.training.log import MetricsLog

    calls = []
    monkeypatch.setattr(MetricsLog, "plot", lambda self, title="": calls.append(self.records[-1]["step"]))
    monkeypatch.setattr(loop_mod, "PLOT_EVERY_S", 1e6)
    _loop(tmp_path / "a", max_steps=4, log_interval=1, save_interval=100).run_loop()
    assert calls == [4]
    calls.clear()
    monkeypatch.setattr(loop_mod, "PLOT_EVERY_S", 0.0)
    monkeypatch.setattr(loop_mod, "PLOT_COST_FACTOR", 0.0)
    _loop(tmp_path / "b", max_steps=4, log_interval=2, save_interval=100).run_loop()
    assert calls == [2, 4, 4]
    calls.clear()

    def slow_plot(self, title=""):
        calls.append(self.records[-1]["step"])
        time.sleep(0.05)

    monkeypatch.setattr(MetricsLog, "plot", slow_plot)
    monkeypatch.setattr(loop_mod, "PLOT_COST_FACTOR", 1e4)  # 0.05 s drawing: next one 500 s later
    _loop(tmp_path / "c", max_steps=4, log_interval=1, save_interval=100).run_loop()
    assert calls == [1, 4]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.slow
def test_autocast_training_runs(tmp_path, amp):
    loop = _loop(tmp_path, max_steps=3, amp=amp)
    loop.run_loop()
    recs = read_jsonl(str(tmp_path / "progress.jsonl"))
    assert len(recs) == 3 and all(np.isfinite(r["loss"]) for r in recs)
    assert all(p.dtype == torch.float32 for p in loop.params)  # fp32 master weights
    if amp == "fp16":
        assert loop.scaler.is_enabled() and "loss_scale" in recs[0]


@pytest.mark.slow  # two 4-step runs and a step of each (~5 s on 2 cores)
def test_channels_last_training_follows_the_nchw_run(tmp_path):
    """TrainLoop(channels_last=True): the torso runs NHWC; the gradients of a step and the loss
    curve are those of the NCHW run (same data and noise; convolution rounding only)."""
    x = torch.from_numpy(blob_images(8, 8, 1)[0]).permute(0, 3, 1, 2).float() / 127.5 - 1
    runs = {}
    for cl in (False, True):
        out = tmp_path / str(cl)
        loop = _loop(out, max_steps=4, channels_last=cl, config=tiny_config(diffusion_steps=5))
        convs = [m for m in loop.model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert loop.model.channels_last is cl
        assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs) is cl
        torch.manual_seed(1)
        loop.forward_backward(x, {})
        grads = [p.grad.clone() for p in loop.params]
        loop.opt.zero_grad(set_to_none=True)
        loop.run_loop()
        runs[cl] = (grads, _losses(out))
    (g0, l0), (g1, l1) = runs[False], runs[True]
    for a, b in zip(g1, g0):
        assert (a - b).norm() <= 1e-4 * b.norm() + 1e-7
    assert len(l0) == len(l1) == 4
    np.testing.assert_allclose(np.array(l1), np.array(l0), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="channels_last: expected True or False, got 'yes'"):
        _loop(tmp_path / "bad", channels_last="yes")


@pytest.mark.slow  # two 2-step runs, one traced by AOTAutograd (~7 s on 2 cores)
def test_compiled_training_follows_the_eager_run(tmp_path):
    """TrainLoop(compile=...): the network's forward and backward go through torch.compile (here
    its aot_eager backend: AOTAutograd's joint graph of the model, our fused ops included, without
    inductor's minutes of codegen); the gradients of a step, the loss curve and the checkpoint's
    keys are the eager run's (dropout 0: no random stream in the graph)."""
    x = torch.from_numpy(blob_images(8, 8, 1)[0]).permute(0, 3, 1, 2).float() / 127.5 - 1
    runs = {}
    for name, comp in (("eager", "none"), ("compiled", {"backend": "aot_eager"})):
        out = tmp_path / name
        torch._dynamo.reset()
        loop = _loop(out, max_steps=2, compile=comp, config=tiny_config(dropout=0.0, diffusion_steps=5))
        assert (loop.compile is None) is (name == "eager")
        torch.manual_seed(1)
        loop.forward_backward(x, {})
        grads = [p.grad.clone() for p in loop.params]
        loop.opt.zero_grad(set_to_none=True)
        loop.run_loop()
        weights, _, _ = ckpt.load_weights(str(out / "model000002.safetensors"))
        runs[name] = (grads, _losses(out), weights)
    (g0, l0, w0), (g1, l1, w1) = runs["eager"], runs["compiled"]
    assert all(p.grad is not None for p in loop.params)
    for a, b in zip(g1, g0):
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-7
    assert len(l0) == len(l1) == 2
    np.testing.assert_allclose(np.array(l1), np.array(l0), rtol=1e-4, atol=1e-6)
    assert sorted(w1) == sorted(w0) and not any(k.startswith("_orig_mod") for k in w1)
    for k in w0:
        torch.testing.assert_close(w1[k], w0[k], rtol=1e-4, atol=1e-5)


def test_compile_argument_is_checked(tmp_path):
    from iddpm_ext.cli.flags import CHOICES
    from iddpm_ext.training.loop import COMPILE_MODES, compile_options

    assert CHOICES["compile"] == list(COMPILE_MODES)  # iddpm train --compile offers exactly these
    assert compile_options("none") is None and compile_options(None) is None
    assert compile_options("max-autotune") == {"mode": "max-autotune", "dynamic": False}
    assert compile_options({"backend": "eager", "dynamic": True}) == {"backend": "eager", "dynamic": True}
    with pytest.raises(ValueError, match=r"compile: expected one of \['none', 'default'.*got 'fast'"):
        _loop(tmp_path / "bad", compile="fast")
    with pytest.raises(ValueError, match="compile: expected .* or a dict of torch.compile arguments, got 3"):
        _loop(tmp_path / "bad", compile=3)
    assert not (tmp_path / "bad").exists()  # refused before the run folder was touched


def test_steps_are_marked_for_every_mode_with_cuda_graphs():
    """TrainLoop marks each step's start for torch's CUDA-graph trees wherever the compile mode
    (or an explicit option) runs CUDA graphs: "reduce-overhead" and "max-autotune" both do."""
    from iddpm_ext.training.options import compile_options, uses_cudagraphs

    modes = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    marked = [uses_cudagraphs(compile_options(m)) for m in modes]
    assert marked == [False, False, True, True, False]
    assert uses_cudagraphs({"mode": "default", "options": {"triton.cudagraphs": True}})
    assert not uses_cudagraphs({"mode": "max-autotune", "options": {"triton.cudagraphs": False}})
    assert not uses_cudagraphs({"backend": "eager"})


def test_channels_last_needs_a_2d_unet():
    from iddpm_ext.unet import UNetModel

    model = UNetModel(in_channels=1, model_channels=32, out_channels=1, num_res_blocks=1,
                      attention_resolutions=(), dims=1)  # fmt: skip
    with pytest.raises(ValueError, match="channels_last: only 2-D models have a channels-last format"):
        model.set_channels_last(True)
    model.set_channels_last(False)
    assert model.channels_last is False


def test_class_conditional_training(tmp_path):
    cfg = tiny_config(class_cond=True, num_classes=3, diffusion_steps=5)
    loop = _loop(tmp_path, max_steps=2, config=cfg)
    loop.run_loop()
    assert loop.model.label_emb.weight.grad is not None


def test_refuses_an_existing_run_and_overwriting_later_steps(tmp_path):
    _loop(tmp_path, max_steps=4, save_interval=2).run_loop()
    with pytest.raises(ckpt.CheckpointError, match="already holds a training run"):
        _loop(tmp_path, max_steps=4)
    with pytest.raises(ckpt.CheckpointError, match="already holds later steps"):
        _loop(tmp_path, max_steps=4, resume=str(tmp_path / "model000002.safetensors"))
    with pytest.raises(ValueError, match="ema_rate"):
        _loop(tmp_path / "x", ema_rate="0.9,abc")
    with pytest.raises(ValueError, match="amp"):
        _loop(tmp_path / "x", amp="fp8")


def test_resume_with_other_model_flags_is_refused(tmp_path):
    _loop(tmp_path, max_steps=2, save_interval=2).run_loop()
    with pytest.raises(ckpt.CheckpointError, match="learn_sigma=True in the checkpoint but False"):
        _loop(
            tmp_path / "b",
            resume=str(tmp_path),
            config=tiny_config(learn_sigma=False, diffusion_steps=5, dropout=0.1),
        )


def test_fused_optimizer_follows_the_per_tensor_adamw(tmp_path):
    """TrainLoop(fused_optimizer=True), the default: torch's fused AdamW, whose parameters after one
    step are the per-tensor AdamW's (the reference's) to float rounding, and the loss curve of 3
    steps with it the per-tensor one's (later steps amplify the rounding through the network:
    Adam's normalised update of near-zero gradients); a resumed run keeps its own choice whatever
    the checkpoint says; a bad value names the argument."""
    params, losses = {}, {}
    for fused in (True, False):
        out = tmp_path / str(fused)
        loop = _loop(out, max_steps=1, save_interval=1, fused_optimizer=fused)
        assert loop.fused_optimizer is fused
        assert all(g["fused"] is (True if fused else None) for g in loop.opt.param_groups)
        loop.run_loop()
        params[fused] = [p.detach().clone() for p in loop.params]
        again = _loop(tmp_path / f"three-{fused}", max_steps=3, fused_optimizer=fused)
        again.run_loop()
        losses[fused] = [loss for _, loss, _ in _losses(tmp_path / f"three-{fused}")]
    assert any(not torch.equal(a, b) for a, b in zip(params[True], params[False]))  # two implementations
    for a, b in zip(params[True], params[False]):  # (lr 1e-3: one step moves a weight up to ~1e-3)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)
    for saved, now in ((True, False), (False, True)):  # each run's checkpoint resumed the other way
        again = _loop(tmp_path / f"again-{saved}", resume=str(tmp_path / str(saved)), max_steps=2,
                      fused_optimizer=now)  # fmt: skip
        assert again.step == 1 and all(g["fused"] is (True if now else None) for g in again.opt.param_groups)
        again.run_loop()
        assert again.step == 2
    with pytest.raises(ValueError, match="fused_optimizer: expected True or False, got 'yes'"):
        _loop(tmp_path / "bad", fused_optimizer="yes")


@pytest.mark.parametrize("saved_cl", [True, False])
def test_fused_resume_across_layouts(tmp_path, saved_cl):
    """A run saved channels-last and resumed NCHW (or the reverse): the loaded AdamW moments take
    the parameters' layout (the fused kernel reads flat buffers), so the resumed step equals the
    per-tensor AdamW's resumed step to float rounding, and the moments' strides are the params'."""
    saved = tmp_path / "saved"
    _loop(saved, max_steps=1, save_interval=1, channels_last=saved_cl).run_loop()
    params = {}
    for fused in (True, False):
        out = tmp_path / f"resumed-{fused}"
        loop = _loop(out, resume=str(saved), max_steps=2, channels_last=not saved_cl, fused_optimizer=fused)
        for p, st in loop.opt.state.items():
            assert st["exp_avg"].stride() == p.stride() and st["exp_avg_sq"].stride() == p.stride()
        loop.run_loop()
        params[fused] = [p.detach().clone() for p in loop.params]
    for a, b in zip(params[True], params[False]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
