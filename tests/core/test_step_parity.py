"""Fused reverse-diffusion steps against the eager path (CPU): every mean × variance type,
respaced schedules, t = 0 / T-1 / mixed, clipping, low precision, layouts, spatial ranks,
and the sampling loops with the fused ops on and off."""

import itertools

import numpy as np
import pytest
import torch

import iddpm_ext.ops as ops
from helpers.oracles import LEARNED, max_err, reference_step64
from helpers.step_cases import assert_parity, const_model, make_diffusion, make_inputs, run_step
from iddpm_ext import ModelMeanType, ModelVarType

pytestmark = pytest.mark.kernels

MEANS = list(ModelMeanType)
VARS = list(ModelVarType)
T_MIXED = torch.tensor([0, 1, 57, 99])  # t = 0, 1, a middle step and T-1 in one batch
# The CPU step's exp and sqrt are torch's own (oneMKL VML): fused = eager bit for bit.
TORCH_EXP_SQRT = bool(ops.loader.capabilities()["step"]["cpu"].get("torch_exp_sqrt"))
needs_torch_exp_sqrt = pytest.mark.skipif(
    not TORCH_EXP_SQRT, reason="this torch has no oneMKL VML: the step's exp is not torch's own"
)


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the fused ops the diffusion methods call."""
    calls = []
    for name in ("p_sample_step", "ddim_step", "ddim_reverse_step"):
        real = getattr(ops, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(ops, name, spy)
    return calls


def _check_step(d, rule, shape, t, clip, eta=0.0, op_calls=None, **input_kwargs):
    x, mo, noise = make_inputs(d, shape, **input_kwargs)
    noise = noise if rule != "reverse" else None
    eager = run_step(d, rule, x, mo, t, clip, eta, noise, fused=False)
    truth = reference_step64(d, rule, x, mo, t, clip, eta, noise)
    n_before = len(op_calls) if op_calls is not None else 0
    fused = run_step(d, rule, x, mo, t, clip, eta, noise, fused=True)
    if op_calls is not None:
        assert len(op_calls) == n_before + 1, "the fused op was not used"
    assert set(fused) == {"sample", "pred_xstart"}
    assert_parity(fused["sample"], eager["sample"], truth["sample"])
    assert_parity(fused["pred_xstart"], eager["pred_xstart"], truth["pred_xstart"])
    return fused, eager


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("var_type", VARS, ids=lambda v: v.name)
@pytest.mark.parametrize("mean_type", MEANS, ids=lambda m: m.name)
def test_ancestral_matches_eager(mean_type, var_type, clip, op_calls):
    d = make_diffusion(mean_type, var_type)
    fused, eager = _check_step(d, "ancestral", (4, 3, 5, 5), T_MIXED, clip, op_calls=op_calls)
    # No noise in the last step: the t = 0 item is the mean itself in both paths.
    d.use_fused = True
    x, mo, noise = make_inputs(d, (4, 3, 5, 5))
    again = d.p_sample(const_model(mo), x, T_MIXED, clip_denoised=clip, noise=2 * noise)
    assert torch.equal(again["sample"][0], fused["sample"][0])
    assert not torch.equal(again["sample"][1:], fused["sample"][1:])


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize(
    "var_type", [ModelVarType.FIXED_SMALL, ModelVarType.LEARNED_RANGE], ids=lambda v: v.name
)
@pytest.mark.parametrize("mean_type", MEANS, ids=lambda m: m.name)
def test_ddim_matches_eager(mean_type, var_type, clip, eta, op_calls):
    d = make_diffusion(mean_type, var_type)
    _check_step(d, "ddim", (4, 3, 5, 5), T_MIXED, clip, eta, op_calls=op_calls)


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("var_type", [ModelVarType.FIXED_LARGE, ModelVarType.LEARNED], ids=lambda v: v.name)
@pytest.mark.parametrize("mean_type", MEANS, ids=lambda m: m.name)
def test_ddim_reverse_matches_eager(mean_type, var_type, clip, op_calls):
    d = make_diffusion(mean_type, var_type)
    _check_step(d, "reverse", (4, 3, 5, 5), T_MIXED, clip, op_calls=op_calls)


@pytest.mark.parametrize("rule,eta", [("ancestral", 0.0), ("ddim", 0.0), ("ddim", 1.0), ("reverse", 0.0)])
@pytest.mark.parametrize("respacing", ["ddim10", "10,5", [3, 2]])
def test_respaced_schedules(respacing, rule, eta):
    d = make_diffusion(
        ModelMeanType.EPSILON, ModelVarType.LEARNED_RANGE, steps=200, schedule="cosine", respacing=respacing
    )
    T = d.num_timesteps
    t = torch.tensor([0, T - 1, T // 2, 1 % T])
    _check_step(d, rule, (4, 2, 3, 4), t, True, eta)


@pytest.mark.parametrize("spatial", [(), (7,), (3, 5), (2, 3, 4)], ids=lambda s: f"{len(s)}d")
def test_spatial_ranks(spatial):
    d = make_diffusion(ModelMeanType.EPSILON, ModelVarType.LEARNED_RANGE)
    for rule in ("ancestral", "ddim", "reverse"):
        _check_step(d, rule, (3, 2, *spatial), T_MIXED[:3], True, eta=0.3)


def _strided(v, kind):
    """The same values as ``v`` in another memory layout."""
    if kind == "channels_last":
        return v.to(memory_format=torch.channels_last)
    if kind == "transposed":  # spatial dims swapped in memory
        return v.transpose(2, 3).contiguous().transpose(2, 3)
    if kind == "sliced":  # every other column of a wider tensor
        wide = torch.zeros(*v.shape[:-1], 2 * v.shape[-1], dtype=v.dtype)
        wide[..., ::2] = v
        return wide[..., ::2]
    return v


@pytest.mark.parametrize(
    "var_type", [ModelVarType.FIXED_SMALL, ModelVarType.LEARNED_RANGE], ids=lambda v: v.name
)
@pytest.mark.parametrize(
    "x_layout,mo_layout",
    [
        ("channels_last", "channels_last"),
        ("channels_last", "contiguous"),
        ("contiguous", "channels_last"),
        ("transposed", "sliced"),
        ("sliced", "transposed"),
    ],
)
def test_layouts(x_layout, mo_layout, var_type):
    d = make_diffusion(ModelMeanType.EPSILON, var_type)
    x, mo, noise = make_inputs(d, (4, 3, 6, 5))
    eager = run_step(d, "ancestral", x, mo, T_MIXED, True, noise=noise, fused=False)
    xs, mos, ns = _strided(x, x_layout), _strided(mo, mo_layout), _strided(noise, mo_layout)
    assert torch.equal(xs, x) and torch.equal(mos, mo)
    fused = run_step(d, "ancestral", xs, mos, T_MIXED, True, noise=ns, fused=True)
    assert_parity(fused["sample"], eager["sample"])
    assert_parity(fused["pred_xstart"], eager["pred_xstart"])
    if x_layout == "channels_last":  # the outputs keep x's layout
        assert fused["sample"].is_contiguous(memory_format=torch.channels_last)
    if x_layout == "contiguous":
        assert fused["sample"].is_contiguous()


def test_channels_last_3d_and_ddim():
    d = make_diffusion(ModelMeanType.START_X, ModelVarType.LEARNED)
    x, mo, noise = make_inputs(d, (2, 3, 3, 4, 5))
    cl = torch.channels_last_3d
    for rule in ("ancestral", "ddim", "reverse"):
        eager = run_step(d, rule, x, mo, T_MIXED[:2], True, 0.7, noise, fused=False)
        fused = run_step(
            d,
            rule,
            x.to(memory_format=cl),
            mo.to(memory_format=cl),
            T_MIXED[:2],
            True,
            0.7,
            noise.to(memory_format=cl),
            fused=True,
        )
        assert fused["sample"].is_contiguous(memory_format=cl)
        assert_parity(fused["sample"], eager["sample"])


# The low-precision rule: the fused path's error against an fp32 reference is at most twice
# the eager path's own error in the same precision (its output rounded to x's dtype). Through
# the diffusion's methods both return float32, the reference's promotion.
@pytest.mark.parametrize(
    "x_dtype,mo_dtype",
    [
        (torch.float32, torch.float16),
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float16),
    ],
    ids=lambda d: str(d).replace("torch.", ""),
)
@pytest.mark.parametrize("rule", ["ancestral", "ddim", "reverse"])
@pytest.mark.parametrize(
    "var_type",
    [ModelVarType.FIXED_LARGE, ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE],
    ids=lambda v: v.name,
)
def test_low_precision_error_at_most_twice_eager(var_type, rule, x_dtype, mo_dtype):
    d = make_diffusion(ModelMeanType.EPSILON, var_type)
    t = torch.tensor([0, 3, 20, 60, 99, 40])
    shape = (6, 3, 8, 8)
    x32, mo32, n32 = make_inputs(d, shape, seed=3)
    x, mo, noise = x32.to(x_dtype), mo32.to(mo_dtype), n32.to(x_dtype)
    ref = run_step(d, rule, x32, mo32, t, True, 0.5, n32, fused=False)
    eager = run_step(d, rule, x, mo, t, True, 0.5, noise, fused=False)
    fused = run_step(d, rule, x, mo, t, True, 0.5, noise, fused=True)
    for key in ("sample", "pred_xstart"):
        assert fused[key].dtype == eager[key].dtype == torch.float32
        eager_err = max_err(eager[key].to(x_dtype), ref[key])
        fused_err = max_err(fused[key], ref[key])
        assert fused_err <= 2 * eager_err + 1e-6, (key, fused_err, eager_err)


def test_pred_xstart_can_be_skipped():
    d = make_diffusion(ModelMeanType.EPSILON, ModelVarType.LEARNED_RANGE)
    x, mo, noise = make_inputs(d, (4, 3, 5, 5))
    table = d.coef_table("cpu")
    s1, p1 = ops.p_sample_step(x, mo, T_MIXED, table, d.model_mean_type, d.model_var_type, noise=noise)
    s2, p2 = ops.p_sample_step(
        x, mo, T_MIXED, table, d.model_mean_type, d.model_var_type, noise=noise, return_pred_xstart=False
    )
    assert p1 is not None and p2 is None
    assert torch.equal(s1, s2)
    s3, p3 = ops.ddim_step(
        x, mo, T_MIXED, table, "epsilon", "learned_range", eta=0.0, return_pred_xstart=False
    )
    assert p3 is None and torch.isfinite(s3).all()


@pytest.mark.parametrize(
    "loop,eta", [("p_sample_loop", None), ("ddim_sample_loop", 0.0), ("ddim_sample_loop", 0.8)]
)
@pytest.mark.parametrize(
    "var_type", [ModelVarType.FIXED_SMALL, ModelVarType.LEARNED_RANGE], ids=lambda v: v.name
)
def test_loops_fused_on_and_off_agree(loop, eta, var_type):
    d = make_diffusion(ModelMeanType.EPSILON, var_type, steps=200, respacing="ddim20")
    shape = (3, 2, 4, 4)
    g = torch.Generator().manual_seed(11)
    x_T = torch.randn(shape, generator=g)
    step_noise = torch.randn((d.num_timesteps, *shape), generator=g)
    proj = torch.randn(2 * shape[1] if var_type in LEARNED else shape[1], shape[1], generator=g)

    def model(x, t, **kwargs):  # a fixed smooth function of x and t
        h = torch.einsum("bchw,oc->bohw", x, proj) * 0.3
        return torch.tanh(h + t.float().view(-1, 1, 1, 1) / 1000)

    kwargs = dict(noise=x_T, step_noise=step_noise)
    if eta is not None:
        kwargs["eta"] = eta
    d.use_fused = False
    eager = getattr(d, loop)(model, shape, **kwargs)
    d.use_fused = True
    fused = getattr(d, loop)(model, shape, **kwargs)
    assert_parity(fused, eager, rel=1e-4)
    if TORCH_EXP_SQRT:  # the same exp and sqrt: the same bits, step after step
        assert torch.equal(fused, eager), max_err(fused, eager)
    progressive = loop.replace("_loop", "_loop_progressive")
    outs = list(getattr(d, progressive)(model, shape, **kwargs))
    assert len(outs) == d.num_timesteps
    assert all(o["pred_xstart"] is not None for o in outs)
    assert torch.equal(outs[-1]["sample"], fused)


def test_default_cpu_noise_follows_the_global_rng():
    """Without noise= or generator=, the fused CPU step draws torch.randn_like(x) as the
    reference does: the same torch.manual_seed gives the eager path's sample."""
    for rule, eta in (("ancestral", 0.0), ("ddim", 0.5), ("ddim", 0.0)):
        d = make_diffusion(ModelMeanType.EPSILON, ModelVarType.LEARNED_RANGE)
        x, mo, _ = make_inputs(d, (4, 3, 5, 5))
        torch.manual_seed(123)
        eager = run_step(d, rule, x, mo, T_MIXED, True, eta, None, fused=False)
        after_eager = torch.rand(1)
        torch.manual_seed(123)
        fused = run_step(d, rule, x, mo, T_MIXED, True, eta, None, fused=True)
        after_fused = torch.rand(1)
        assert_parity(fused["sample"], eager["sample"])
        assert torch.equal(after_eager, after_fused)  # the global stream moved alike


def test_switch_and_fallbacks(monkeypatch, op_calls):
    monkeypatch.setenv("IDDPM_EXT_FUSED", "0")
    assert make_diffusion().use_fused is False
    monkeypatch.setenv("IDDPM_EXT_FUSED", "1")
    d = make_diffusion()
    assert d.use_fused is True
    x, mo, noise = make_inputs(d, (2, 3, 4, 4))
    t = torch.tensor([3, 7])
    d.p_sample(const_model(mo), x, t, noise=noise)
    assert op_calls == ["p_sample_step"]
    # Eager where the fused op does not apply: denoised_fn, float64, noise of another dtype,
    # gradients being recorded, or the switch off.
    d.p_sample(const_model(mo), x, t, noise=noise, denoised_fn=lambda v: v * 0.5)
    d.p_sample(const_model(mo.double()), x.double(), t, noise=noise.double())
    d.p_sample(const_model(mo), x, t, noise=noise.double())
    d.p_sample(const_model(mo.requires_grad_()), x, t, noise=noise)
    d.use_fused = False
    d.ddim_sample(const_model(mo.detach()), x, t, noise=noise)
    assert op_calls == ["p_sample_step"]


def test_fused_errors_match_the_eager_messages():
    d = make_diffusion(ModelMeanType.EPSILON, ModelVarType.LEARNED_RANGE)
    x, mo, noise = make_inputs(d, (2, 3, 4, 4))
    t = torch.tensor([3, 7])
    for fused in (True, False):
        d.use_fused = fused
        with pytest.raises(ValueError, match=r"model_output: expected shape \(2, 6, 4, 4\)"):
            d.p_sample(const_model(mo[:, :3]), x, t, noise=noise)
        with pytest.raises(ValueError, match="noise: expected shape"):
            d.ddim_sample(const_model(mo), x, t, noise=noise[:1])
        with pytest.raises(ValueError, match=r"t: expected timesteps in \[0, 100\)"):
            d.p_sample(const_model(mo), x, torch.tensor([3, 100]), noise=noise)


def _ddim_float32_in_reference_order(d, rule, x, mo, t, clip, eta, noise):
    """The reference's ddim_sample / ddim_reverse_sample in numpy float32, one rounding per
    operation, in its order, with torch's own float32 square root (what the kernel computes:
    oneMKL's where torch uses it, which is not always correctly rounded, else a correctly
    rounded one, as numpy's)."""
    f = np.float32

    def sqrt(a):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=f)).sqrt().numpy()

    def col(name):  # the reference's _extract_into_tensor: float64 table -> float32, per item
        return np.asarray(getattr(d, name), dtype=np.float64)[t.numpy()].astype(f)[:, None, None, None]

    x, eps_out = x.numpy(), mo[:, : x.shape[1]].numpy()
    sr, srm1 = col("sqrt_recip_alphas_cumprod"), col("sqrt_recipm1_alphas_cumprod")
    x0 = sr * x - srm1 * eps_out
    if clip:
        x0 = np.clip(x0, f(-1), f(1))
    eps = (sr * x - x0) / srm1
    if rule == "reverse":
        abn = col("alphas_cumprod_next")
        return x0 * sqrt(abn) + sqrt(f(1) - abn) * eps
    ab, abp = col("alphas_cumprod"), col("alphas_cumprod_prev")
    sigma = f(eta) * sqrt((f(1) - abp) / (f(1) - ab)) * sqrt(f(1) - ab / abp)
    mean = x0 * sqrt(abp) + sqrt(np.maximum((f(1) - abp) - sigma * sigma, f(0))) * eps
    mask = (t.numpy() != 0).astype(f)[:, None, None, None]
    return mean + (mask * sigma) * noise.numpy()


@pytest.mark.parametrize("schedule,respacing", [("linear", None), ("cosine", None), ("cosine", "ddim50")])
@pytest.mark.parametrize("rule,eta", [("ddim", 0.0), ("ddim", 0.5), ("ddim", 1.0), ("reverse", 0.0)])
def test_fused_ddim_factors_are_float32_in_the_reference_order(schedule, respacing, rule, eta):
    """σ, √ᾱ_prev, √((1 − ᾱ_prev) − σ²), √ᾱ_next, √(1 − ᾱ_next) in float32, as the reference
    computes them (not in float64, which differed by up to 4e-6 per step): bit for bit
    against that arithmetic in numpy at every timestep."""
    d = make_diffusion(ModelMeanType.EPSILON, ModelVarType.LEARNED_RANGE, steps=1000, schedule=schedule,
                       respacing=respacing)  # fmt: skip
    T = d.num_timesteps
    x, mo, noise = make_inputs(d, (T, 2, 3, 3), seed=11)
    t = torch.arange(T)
    for clip in (True, False):
        got = run_step(d, rule, x, mo, t, clip, eta, noise if rule == "ddim" else None, fused=True)["sample"]
        want = _ddim_float32_in_reference_order(d, rule, x, mo, t, clip, eta, noise)
        assert got.dtype == torch.float32 and np.array_equal(got.numpy(), want), (
            clip,
            max_err(got, torch.from_numpy(want)),
        )


@needs_torch_exp_sqrt
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("respacing", [None, "ddim10"])
@pytest.mark.parametrize("var_type", VARS, ids=lambda v: v.name)
@pytest.mark.parametrize("mean_type", MEANS, ids=lambda m: m.name)
def test_fused_cpu_step_is_the_eager_step_bit_for_bit(mean_type, var_type, respacing, x_dtype, op_calls):
    """With torch's own exp and sqrt (oneMKL's, not always correctly rounded), the fused CPU
    step is the eager path (and so the reference) bit for bit: every rule, learned variances
    included (SLEEF's exp differed by up to 4e-7 there), each timestep, both layouts."""
    d = make_diffusion(mean_type, var_type, steps=1000, schedule="cosine", respacing=respacing)
    T = d.num_timesteps
    x, mo, noise = make_inputs(d, (T, 3, 4, 4), seed=7, x_dtype=x_dtype)
    t = torch.arange(T).flip(0)
    CL = torch.channels_last
    rules = [("ancestral", 0.0), ("ddim", 0.0), ("ddim", 0.5), ("ddim", 1.0), ("reverse", 0.0)]
    for (rule, eta), clip, layout in itertools.product(rules, (True, False), ("nchw", "nhwc")):
        xs, ms = (x, mo) if layout == "nchw" else (x.to(memory_format=CL), mo.to(memory_format=CL))
        z = noise if rule != "reverse" else None
        n_before = len(op_calls)
        fused = run_step(d, rule, xs, ms, t, clip, eta, z, fused=True)
        assert len(op_calls) == n_before + 1, "the fused op was not used"
        eager = run_step(d, rule, xs, ms, t, clip, eta, z, fused=False)
        for key in ("sample", "pred_xstart"):
            assert fused[key].dtype == eager[key].dtype, (rule, key)
            assert torch.equal(fused[key], eager[key]), (rule, eta, clip, layout, key,
                                                         max_err(fused[key], eager[key]))  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_output_takes_the_reference_arithmetic(dtype):
    """A model returning float16/bfloat16 (autocast): the reference computes a learned
    variance's (v + 1) / 2 in that precision and returns a START_X model's x_0 in it; by
    default the step then runs eagerly (the reference's bits), while fused=True still runs
    the float32 op (which differs: the case matters)."""
    t = torch.tensor([3, 50, 99])
    d = make_diffusion(ModelMeanType.EPSILON, ModelVarType.LEARNED_RANGE)
    x, mo, noise = make_inputs(d, (3, 2, 4, 4), seed=5, mo_dtype=dtype)
    auto = d.p_sample(const_model(mo), x, t, noise=noise)["sample"]
    eager = run_step(d, "ancestral", x, mo, t, True, 0.0, noise, fused=False)["sample"]
    forced = d.step("ancestral", mo, x, t, noise=noise, fused=True)["sample"]
    assert torch.equal(auto, eager) and not torch.equal(forced, eager)
    d = make_diffusion(ModelMeanType.START_X, ModelVarType.FIXED_SMALL)
    x, mo, noise = make_inputs(d, (3, 2, 4, 4), seed=5, mo_dtype=dtype)
    model = const_model(mo)
    for out in (d.p_sample(model, x, t, noise=noise), d.ddim_sample(model, x, t, noise=noise)):
        assert out["pred_xstart"].dtype == dtype and out["sample"].dtype == torch.float32
