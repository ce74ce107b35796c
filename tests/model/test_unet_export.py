"""Deployment through torch.export and AOTInductor: the UNet with the fused attention and the fused
GroupNorm ops, and a whole denoising step (UNet + the fused sampling step op), export as graphs
holding the iddpm ops, with a dynamic batch, save/load round trips, and (slow) compile with
AOTInductor into a package that runs without Python model code — each equal to the eager model."""

from __future__ import annotations

import pytest
import torch

from helpers.models import randomize_, tiny_kwargs
from iddpm_ext import create_gaussian_diffusion
from iddpm_ext.nn import groupnorm_impl
from iddpm_ext.ops.attention import attention_impl
from iddpm_ext.unet import UNetModel

pytestmark = pytest.mark.kernels


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _model(device="cpu"):
    kw = tiny_kwargs(out_channels=6, use_scale_shift_norm=True, num_classes=3)
    return randomize_(UNetModel(**kw), 0).eval().to(device)


def _inputs(n, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    args = (x, torch.randint(0, 10, (n,), generator=g), torch.randint(0, 3, (n,), generator=g))
    return tuple(a.to(device) for a in args)


class DenoisingStep(torch.nn.Module):
    """One ancestral step of a 10-step respaced cosine process: x_t -> x_{t-1} (explicit noise)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.diffusion = create_gaussian_diffusion(
            steps=1000, learn_sigma=True, noise_schedule="cosine", timestep_respacing="10"
        )

    def forward(self, x, t, y, noise):
        out = self.model(x, self.diffusion.model_timesteps(t), y)
        return self.diffusion.step("ancestral", out, x, t, noise=noise, fused=True)["sample"]


def _iddpm_ops(ep):
    return {str(n.target) for n in ep.graph.nodes if n.op == "call_function" and "iddpm" in str(n.target)}


def _export(module, args):
    batch = torch.export.Dim("batch", min=1, max=64)
    shapes = tuple({0: batch} for _ in args)
    with torch.no_grad(), attention_impl("fused"), groupnorm_impl("fused"):
        return torch.export.export(module, args, dynamic_shapes=shapes)


@pytest.mark.parametrize("device", DEVICES)
def test_unet_exports_with_the_fused_ops_and_a_dynamic_batch(tmp_path, device):
    model = _model(device)
    ep = _export(model, _inputs(2, device=device))
    assert _iddpm_ops(ep) == {"iddpm.qkv_attention.default", "iddpm.group_norm_act.default"}
    path = tmp_path / "unet.pt2"
    torch.export.save(ep, str(path))
    loaded = torch.export.load(str(path))
    for n in (2, 5):  # the traced batch and another
        args = _inputs(n, seed=n, device=device)
        with torch.no_grad(), attention_impl("fused"), groupnorm_impl("fused"):
            expected = model(*args)
        for prog in (ep, loaded):
            with torch.no_grad():
                torch.testing.assert_close(prog.module()(*args), expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_denoising_step_exports_with_the_fused_step_op(device):
    step = DenoisingStep(_model(device))
    x, t, y = _inputs(3, device=device)
    noise = torch.randn_like(x)
    ep = _export(step, (x, t, y, noise))
    assert "iddpm.p_sample_step.default" in _iddpm_ops(ep)
    # eager after export, on purpose: tracing must not have left tracing tensors (FakeTensors) in
    # the diffusion's per-device caches (coefficient table, timestep map), which eager would read
    with torch.no_grad(), attention_impl("fused"), groupnorm_impl("fused"):
        expected = step(x, t, y, noise)
        got = ep.module()(x, t, y, noise)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.slow
def test_aot_inductor_package_runs_the_step(tmp_path):
    """AOTInductor compiles the exported step (C++ for the CPU, ~30 s on 2 cores) into a .pt2
    package; the package calls the iddpm ops through the dispatcher and matches eager."""
    step = DenoisingStep(_model())
    x, t, y = _inputs(2)
    ep = _export(step, (x, t, y, torch.randn_like(x)))
    package = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "step.pt2"))
    runner = torch._inductor.aoti_load_package(package)
    for n in (2, 4):
        x, t, y = _inputs(n, seed=10 + n)
        noise = torch.randn_like(x)
        with torch.no_grad(), attention_impl("fused"), groupnorm_impl("fused"):
            expected = step(x, t, y, noise)
        torch.testing.assert_close(runner(x, t, y, noise), expected, rtol=1e-5, atol=1e-5)


def _real_tensors(cache: dict) -> bool:
    return bool(cache) and all(type(v) is torch.Tensor for v in cache.values())


def test_scheduler_device_lookup_keeps_no_tracing_tensor():
    """IDDPMScheduler's on-device timestep map (what a CUDA timestep looks up) is not kept while
    torch.export traces: the eager lookup after an export reads a real tensor."""
    from iddpm_ext.engine.scheduler import IDDPMScheduler

    sched = IDDPMScheduler.from_improved_diffusion(diffusion_steps=1000, noise_schedule="cosine")
    sched.set_timesteps(10)

    class Lookup(torch.nn.Module):
        def forward(self, t):
            return sched._device_index(t, t.device)

    t = sched.timesteps[:3].clone()
    expected = torch.tensor([sched._index[int(v)] for v in t])
    with torch.no_grad():
        ep = torch.export.export(Lookup(), (t,))
    assert sched._map_on == {}  # made while tracing: not kept
    torch.testing.assert_close(sched._device_index(t, t.device), expected, rtol=0, atol=0)
    torch.testing.assert_close(ep.module()(t), expected, rtol=0, atol=0)
    assert _real_tensors(sched._map_on)


def test_torch_compile_keeps_the_tables_it_makes():
    """Under torch.compile (dynamo) the diffusion's tables made during tracing are kept — as real
    tensors (dynamo replays the store) — so later compiled calls read a constant instead of
    rebuilding the table (a host-to-device copy per step on CUDA)."""
    torch._dynamo.reset()
    step = DenoisingStep(_model())
    d = step.diffusion
    x, t, y = _inputs(2)
    noise = torch.randn_like(x)
    compiled = torch.compile(step, backend="eager")
    d._coef_tables.clear()
    d._map_tensors.clear()
    with torch.no_grad():
        got = compiled(x, t, y, noise)
        assert _real_tensors(d._coef_tables) and _real_tensors(d._map_tensors)
        torch.testing.assert_close(got, step(x, t, y, noise), rtol=0, atol=0)
