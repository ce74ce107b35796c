"""Fused reverse-diffusion steps on CUDA (marked gpu; run by scripts/gpu_check.sh):
parity with the eager CUDA path and the CPU kernel, both kernels (vector and scalar paths),
Philox noise keyed by the CUDA generator, CUDA graph capture, noise statistics, one launch
per step, and errors that need a second device."""

import numpy as np
import pytest
import torch

import iddpm_ext.ops as ops
from helpers.oracles import max_err, philox_normals, reference_step64
from helpers.step_cases import assert_parity, make_diffusion, make_inputs, noise_probe, probe_noise, run_step
from iddpm_ext import ModelMeanType, ModelVarType

pytestmark = pytest.mark.gpu

DEV = "cuda"
T_MIXED = torch.tensor([0, 1, 57, 99])


def _capture(fn):
    """fn warmed up on a side stream, then captured: (graph, fn's static outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = fn()
    return graph, static


def _cuda(*tensors):
    return [v.to(DEV) for v in tensors]


@pytest.mark.parametrize("rule,eta", [("ancestral", 0.0), ("ddim", 0.0), ("ddim", 0.5), ("reverse", 0.0)])
@pytest.mark.parametrize("var_type", list(ModelVarType), ids=lambda v: v.name)
@pytest.mark.parametrize("mean_type", list(ModelMeanType), ids=lambda m: m.name)
def test_cuda_matches_eager_and_cpu(mean_type, var_type, rule, eta):
    d = make_diffusion(mean_type, var_type)
    x, mo, noise = make_inputs(d, (4, 3, 8, 8))
    noise = None if rule == "reverse" else noise
    truth = reference_step64(d, rule, x, mo, T_MIXED, True, eta, noise)
    cpu = run_step(d, rule, x, mo, T_MIXED, True, eta, noise, fused=True)
    xc, moc, tc = _cuda(x, mo, T_MIXED)
    nc = None if noise is None else noise.to(DEV)
    eager = run_step(d, rule, xc, moc, tc, True, eta, nc, fused=False)
    fused = run_step(d, rule, xc, moc, tc, True, eta, nc, fused=True)
    for key in ("sample", "pred_xstart"):
        assert fused[key].is_cuda
        assert_parity(fused[key].cpu(), eager[key].cpu(), truth[key])
        assert_parity(fused[key].cpu(), cpu[key])


@pytest.mark.parametrize("var_type", list(ModelVarType), ids=lambda v: v.name)
@pytest.mark.parametrize("mean_type", list(ModelMeanType), ids=lambda m: m.name)
def test_cuda_fused_step_is_the_eager_step_bit_for_bit(mean_type, var_type):
    """The kernel's per-element arithmetic is the eager path's operation by operation (no FMA
    contraction, the DDIM factors in float32 in the reference's order, the device's expf and
    correctly rounded sqrt as torch's CUDA ops), so on CUDA too the fused float32 step should
    be the eager one (and the reference's) bit for bit: every rule, at every timestep of a
    1000-step cosine schedule. (Not yet run on a card; the CPU twin is
    tests/core/test_step_parity.py::test_fused_cpu_step_is_the_eager_step_bit_for_bit.)"""
    d = make_diffusion(mean_type, var_type, steps=1000, schedule="cosine")
    x, mo, noise = _cuda(*make_inputs(d, (1000, 3, 4, 4), seed=7))
    t = torch.arange(1000, device=DEV).flip(0)
    for rule, eta in [("ancestral", 0.0), ("ddim", 0.0), ("ddim", 0.5), ("ddim", 1.0), ("reverse", 0.0)]:
        for clip in (True, False):
            z = None if rule == "reverse" else noise
            fused = run_step(d, rule, x, mo, t, clip, eta, z, fused=True)
            eager = run_step(d, rule, x, mo, t, clip, eta, z, fused=False)
            for key in ("sample", "pred_xstart"):
                got, want = fused[key].cpu(), eager[key].cpu()
                assert torch.equal(got, want), (rule, eta, clip, key, max_err(got, want))


@pytest.mark.parametrize(
    "x_dtype,mo_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.float16, torch.float32),
    ],
    ids=lambda d: str(d).replace("torch.", ""),
)
@pytest.mark.parametrize(
    "case",
    ["vec", "odd_size", "misaligned", "channels_last", "channels_last_fixed", "sliced", "flat", "large"],
)
def test_cuda_kernel_paths_match_cpu(case, x_dtype, mo_dtype):
    """Vector path (aligned, C*S a multiple of the vector width) and scalar path (odd sizes,
    misaligned pointers, channels-last with 2C channels) against the CPU kernel."""
    var = ModelVarType.FIXED_SMALL if case == "channels_last_fixed" else ModelVarType.LEARNED_RANGE
    d = make_diffusion(ModelMeanType.EPSILON, var)
    shape = {"odd_size": (3, 3, 5, 5), "flat": (5, 7), "large": (8, 3, 64, 64)}.get(case, (4, 3, 8, 8))
    x, mo, noise = make_inputs(d, shape, x_dtype=x_dtype, mo_dtype=mo_dtype)
    t = torch.arange(shape[0]) * 13 % 100
    table = d.coef_table("cpu")
    args = dict(model_mean_type=d.model_mean_type, model_var_type=d.model_var_type)
    cpu_s, cpu_p = ops.p_sample_step(x, mo, t, table, noise=noise, **args)
    xc, moc, nc, tc = _cuda(x, mo, noise, t)
    if case == "misaligned":  # contiguous, but one element past an aligned address

        def shift(v):
            buf = torch.empty(v.numel() + 1, dtype=v.dtype, device=DEV)
            out = buf[1:].view(v.shape)
            out.copy_(v)
            return out

        xc, moc, nc = shift(xc), shift(moc), shift(nc)
    elif case.startswith("channels_last"):
        xc, moc, nc = (v.to(memory_format=torch.channels_last) for v in (xc, moc, nc))
    elif case == "sliced":
        xc, moc, nc = (torch.cat([v, v], -1)[..., : v.shape[-1]] for v in (xc, moc, nc))
    s, p = ops.p_sample_step(xc, moc, tc, d.coef_table(DEV), noise=nc, **args)
    assert s.dtype == x_dtype
    tol = 1e-5 if x_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(s.cpu().float(), cpu_s.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(p.cpu().float(), cpu_p.float(), rtol=tol, atol=tol)
    for eta in (0.0, 0.7):
        a, _ = ops.ddim_step(x, mo, t, table, eta=eta, noise=noise, **args)
        b, _ = ops.ddim_step(xc, moc, tc, d.coef_table(DEV), eta=eta, noise=nc, **args)
        torch.testing.assert_close(b.cpu().float(), a.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("rule", ["ancestral", "ddim", "reverse"])
def test_cuda_low_precision_error_at_most_twice_eager(rule):
    # through d.step with fused=True / False: the public p_sample sends a half learned-range
    # ancestral step to the eager math (as the reference does), which would compare eager with eager
    d = make_diffusion(ModelMeanType.EPSILON, ModelVarType.LEARNED_RANGE)
    t = torch.tensor([0, 3, 20, 60, 99, 40]).to(DEV)
    x32, mo32, n32 = _cuda(*make_inputs(d, (6, 3, 8, 8), seed=3))
    kind = {"reverse": "ddim_reverse"}.get(rule, rule)
    eta = 0.5 if rule == "ddim" else 0.0

    def step(x, mo, noise, fused):
        noise = None if rule == "reverse" else noise
        return d.step(kind, mo, x, t, clip_denoised=True, eta=eta, noise=noise, fused=fused)

    for dtype in (torch.float16, torch.bfloat16):
        x, mo, noise = x32.to(dtype), mo32.to(dtype), n32.to(dtype)
        ref = step(x32, mo32, n32, False)
        eager = step(x, mo, noise, False)
        fused = step(x, mo, noise, True)
        for key in ("sample", "pred_xstart"):
            eager_err = max_err(eager[key].to(dtype), ref[key])
            assert max_err(fused[key], ref[key]) <= 2 * eager_err + 1e-6, (dtype, key)


def test_cuda_noise_is_philox_from_the_generator_state():
    d, x, mo, t = noise_probe(shape=(3, 2, 5, 7), device=DEV)
    n = x.numel()
    torch.cuda.manual_seed(1234)
    first = probe_noise(d, x, mo, t).cpu().reshape(-1).numpy()
    second = probe_noise(d, x, mo, t).cpu().reshape(-1).numpy()
    # seed 1234, offset 0 then 4 (one counter step per call); device math differs from
    # numpy's in the last bits only.
    np.testing.assert_allclose(first, philox_normals(1234, 0, n), rtol=5e-5, atol=5e-5)
    np.testing.assert_allclose(second, philox_normals(1234, 4, n), rtol=5e-5, atol=5e-5)
    g = torch.Generator(DEV).manual_seed(99)
    mine = probe_noise(d, x, mo, t, generator=g).cpu().reshape(-1).numpy()
    np.testing.assert_allclose(mine, philox_normals(99, 0, n), rtol=5e-5, atol=5e-5)
    g2 = torch.Generator(DEV).manual_seed(99)
    assert np.array_equal(probe_noise(d, x, mo, t, generator=g2).cpu().reshape(-1).numpy(), mine)


@pytest.mark.parametrize("case", ["vec", "vec_fp16", "odd_size", "channels_last", "flat"])
def test_cuda_per_sample_noise_does_not_depend_on_the_batch_split(case):
    """A batch of 6 as one call and as two calls of 3 with sample_index [0, 1, 2] / [3, 4, 5]
    (the same generator seed each call): the same noise per sample, bit for bit, on the
    vector path (C*S a multiple of the vector width) and the scalar path (odd C*S, where a
    thread's 4 elements straddle samples, and channels-last with 2C channels); and sample n's
    noise is Philox elements n*C*S .. of the generator's (seed, offset)."""
    shape = {"odd_size": (6, 3, 5, 7), "flat": (6, 3)}.get(case, (6, 2, 4, 4))
    x_dtype = torch.float16 if case == "vec_fp16" else torch.float32
    d, x, mo, t = noise_probe(shape=shape, device=DEV, x_dtype=x_dtype)
    fmt = torch.channels_last if case == "channels_last" else torch.contiguous_format

    def noise(items, index):
        g = torch.Generator(DEV).manual_seed(321)
        xi, moi = (v[items].contiguous(memory_format=fmt) for v in (x, mo))
        return probe_noise(d, xi, moi, t[items], generator=g, sample_index=index)

    whole = noise(list(range(6)), None)
    for items in ([0, 1, 2], [3, 4, 5]):
        part = noise(items, torch.tensor(items, device=DEV))
        assert torch.equal(part, whole[items])
        assert torch.equal(noise(items, items[0]), part)  # int k: samples k .. k+B-1
    shuffled = noise([4, 0], torch.tensor([4, 0], device=DEV, dtype=torch.int32))
    assert torch.equal(shuffled, whole[[4, 0]])
    L = whole[0].numel()
    index = [2**33 + 1, 5]
    far = noise([0, 1], torch.tensor(index, device=DEV))
    tol = 5e-5 if x_dtype == torch.float32 else 2e-3  # fp16: rounding of values up to ~5
    for b, n in enumerate(index):
        got = far[b].float().cpu()
        if case == "channels_last":
            got = got.permute(1, 2, 0)  # the sample's memory order: h, w, c
        expected = philox_normals(321, 0, L, first=n * L)
        np.testing.assert_allclose(got.reshape(-1).numpy(), expected, rtol=tol, atol=tol)


def test_cuda_graph_replay_reads_new_sample_indices():
    """One capture with a static sample_index buffer: replays after copying new indices into
    it give each sample its own noise, as an eager call on the whole batch."""
    d, x, mo, t = noise_probe(shape=(6, 3, 8, 8), device=DEV)
    table = d.coef_table(DEV)
    xs, mos, ts = x[:3].clone(), mo[:3].clone(), t[:3].clone()
    index = torch.arange(3, device=DEV)

    def step():
        return ops.p_sample_step(
            xs,
            mos,
            ts,
            table,
            d.model_mean_type,
            d.model_var_type,
            clip_denoised=False,
            return_pred_xstart=False,
            sample_index=index,
        )[0]

    graph, static = _capture(step)
    parts = []
    for first in (0, 3):
        index.copy_(torch.arange(first, first + 3))
        torch.cuda.manual_seed(55)
        graph.replay()
        parts.append(static.clone())
    torch.cuda.manual_seed(55)
    whole = probe_noise(d, x, mo, t)
    assert torch.equal(torch.cat(parts), whole)


def test_cuda_graph_capture_replays_like_eager_calls():
    d = make_diffusion(ModelMeanType.EPSILON, ModelVarType.LEARNED_RANGE)
    x, mo, _ = _cuda(*make_inputs(d, (4, 3, 8, 8)))
    t = T_MIXED.to(DEV)
    table = d.coef_table(DEV)

    def two_steps():
        a, pa = ops.p_sample_step(x, mo, t, table, d.model_mean_type, d.model_var_type)
        b, _ = ops.ddim_step(
            a, mo, t, table, d.model_mean_type, d.model_var_type, eta=0.5, return_pred_xstart=False
        )
        return a, pa, b

    graph, static = _capture(two_steps)
    torch.cuda.manual_seed(77)
    graph.replay()
    first = [v.clone() for v in static]
    graph.replay()
    second = [v.clone() for v in static]
    torch.cuda.manual_seed(77)
    eager_first = two_steps()
    eager_second = two_steps()
    for g_out, e_out in zip(first + second, list(eager_first) + list(eager_second)):
        assert torch.equal(g_out, e_out)
    assert not torch.equal(first[0], second[0])  # each replay draws new noise
    assert torch.isfinite(first[2]).all()


def test_cuda_noise_statistics():
    d, x, mo, t = noise_probe(shape=(64, 3, 32, 32), device=DEV)
    g = torch.Generator(DEV).manual_seed(4242)
    z1 = probe_noise(d, x, mo, t, generator=g).double()
    z2 = probe_noise(d, x, mo, t, generator=g).double()
    flat = z1.reshape(-1)
    n = flat.numel()
    se = 1 / n**0.5
    assert abs(flat.mean().item()) < 5 * se
    assert abs(flat.var().item() - 1) < 5 * 2**0.5 * se
    for k, p in ((2, 0.04550), (3, 0.00270)):
        frac = (flat.abs() > k).double().mean().item()
        assert abs(frac - p) < 5 * (p * (1 - p) / n) ** 0.5

    def corr(a, b):
        a, b = a.reshape(-1) - a.mean(), b.reshape(-1) - b.mean()
        return ((a * b).sum() / (a.norm() * b.norm())).item()

    assert abs(corr(z1, z2)) < 5 * se  # consecutive steps
    assert abs(corr(z1[:-1], z1[1:])) < 5 / z1[1:].numel() ** 0.5  # batch items
    assert abs(corr(flat[:-1], flat[1:])) < 5 * se  # neighbours


def test_one_kernel_launch_per_step():
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    d = make_diffusion(ModelMeanType.EPSILON, ModelVarType.LEARNED_RANGE)
    x, mo, _ = _cuda(*make_inputs(d, (16, 3, 32, 32)))
    t = torch.full((16,), 50, device=DEV)
    table = d.coef_table(DEV)
    ops.p_sample_step(x, mo, t, table, d.model_mean_type, d.model_var_type)  # warm-up
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        ops.p_sample_step(x, mo, t, table, d.model_mean_type, d.model_var_type, return_pred_xstart=False)
        torch.cuda.synchronize()
    gpu_events = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not gpu_events:
        pytest.skip("the profiler recorded no CUDA activity on this machine")
    assert len(gpu_events) == 1 and "step_" in gpu_events[0], gpu_events


def test_cuda_argument_errors():
    d = make_diffusion(ModelMeanType.EPSILON, ModelVarType.LEARNED_RANGE)
    x, mo, noise = _cuda(*make_inputs(d, (2, 3, 4, 4)))
    t = torch.tensor([1, 2], device=DEV)
    table = d.coef_table(DEV)
    args = (d.model_mean_type, d.model_var_type)
    with pytest.raises(ValueError, match=r"^t: expected a tensor on cuda:0 \(the device of x\), got cpu"):
        ops.p_sample_step(x, mo, t.cpu(), table, *args)
    with pytest.raises(ValueError, match=r"^table: expected a tensor on cuda"):
        ops.ddim_step(x, mo, t, d.coef_table("cpu"), *args)
    with pytest.raises(ValueError, match=r"^model_output: expected a tensor on cuda"):
        ops.p_sample_step(x, mo.cpu(), t, table, *args)
    with pytest.raises(ValueError, match=r"^noise: expected a tensor on cuda"):
        ops.p_sample_step(x, mo, t, table, *args, noise=noise.cpu())
    with pytest.raises(ValueError, match=r"^generator: expected a cuda generator"):
        ops.p_sample_step(x, mo, t, table, *args, generator=torch.Generator())


def test_cuda_out_of_range_t_gives_nan_for_that_item_only():
    d = make_diffusion(ModelMeanType.EPSILON, ModelVarType.LEARNED_RANGE)
    x, mo, noise = _cuda(*make_inputs(d, (3, 3, 4, 4)))
    table = d.coef_table(DEV)
    args = (d.model_mean_type, d.model_var_type)
    good, _ = ops.p_sample_step(x, mo, torch.tensor([5, 6, 7], device=DEV), table, *args, noise=noise)
    bad, pred = ops.p_sample_step(x, mo, torch.tensor([5, 100, -1], device=DEV), table, *args, noise=noise)
    assert torch.equal(bad[0], good[0])
    assert torch.isnan(bad[1:]).all() and torch.isnan(pred[1:]).all()


@pytest.mark.parametrize("loop,eta", [("p_sample_loop", None), ("ddim_sample_loop", 0.5)])
def test_cuda_loops_fused_on_and_off_agree(loop, eta):
    d = make_diffusion(ModelMeanType.EPSILON, ModelVarType.LEARNED_RANGE, steps=200, respacing="ddim20")
    shape = (3, 2, 8, 8)
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(shape, generator=g).to(DEV)
    step_noise = torch.randn((d.num_timesteps, *shape), generator=g).to(DEV)
    proj = torch.randn(4, 2, generator=g).to(DEV)

    def model(x, t, **kwargs):
        return torch.tanh(0.3 * torch.einsum("bchw,oc->bohw", x, proj))

    kwargs = dict(noise=x_T, step_noise=step_noise)
    if eta is not None:
        kwargs["eta"] = eta
    d.use_fused = False
    eager = getattr(d, loop)(model, shape, **kwargs)
    d.use_fused = True
    fused = getattr(d, loop)(model, shape, **kwargs)
    assert_parity(fused.cpu(), eager.cpu(), rel=1e-4)
    # In-kernel noise: the same seed reproduces the whole loop.
    runs = []
    for _ in range(2):
        torch.cuda.manual_seed(8)
        runs.append(getattr(d, loop)(model, shape, noise=x_T, **({} if eta is None else {"eta": eta})))
    assert torch.equal(runs[0], runs[1])


def test_cuda_opcheck_and_compile():
    d = make_diffusion(ModelMeanType.EPSILON, ModelVarType.LEARNED_RANGE)
    x, mo, noise = _cuda(*make_inputs(d, (2, 3, 4, 4)))
    t = torch.tensor([0, 9], device=DEV)
    table = d.coef_table(DEV)
    common = (x, mo, t, table, "epsilon", "learned_range", True)
    torch.library.opcheck(torch.ops.iddpm.p_sample_step.default, common, {"noise": noise})
    torch.library.opcheck(torch.ops.iddpm.ddim_step.default, common + (0.5,), {})
    torch.library.opcheck(torch.ops.iddpm.ddim_reverse_step.default, common, {})
    torch.library.opcheck(
        torch.ops.iddpm.p_sample_step.default, common, {"sample_index": torch.tensor([7, 3], device=DEV)}
    )

    @torch.compile(fullgraph=True)
    def step(x, mo, t, noise):
        return ops.p_sample_step(x, mo, t, table, "epsilon", "learned_range", noise=noise)[0]

    expected, _ = ops.p_sample_step(x, mo, t, table, "epsilon", "learned_range", noise=noise)
    assert torch.equal(step(x, mo, t, noise), expected)
