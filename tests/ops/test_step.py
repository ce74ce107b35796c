"""torch integration and argument checking of the fused step ops (CPU): opcheck,
torch.compile(fullgraph=True), error messages, property-based argument fuzzing, and the
table columns the kernels read."""

import os
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import iddpm_ext.ops as ops
from helpers import REPO
from helpers.oracles import LEARNED
from helpers.step_cases import assert_parity, make_diffusion, make_inputs, run_step
from iddpm_ext import ModelMeanType, ModelVarType
from iddpm_ext.core.tables import COEF_INDEX, COEF_NAMES

pytestmark = pytest.mark.kernels

OPS = torch.ops.iddpm


def _args(var_type=ModelVarType.LEARNED_RANGE, shape=(2, 3, 4, 4), t=(0, 7)):
    d = make_diffusion(ModelMeanType.EPSILON, var_type)
    x, mo, noise = make_inputs(d, shape)
    return d, x, mo, torch.tensor(t), d.coef_table("cpu"), noise


def test_kernel_columns_match_the_table():
    # csrc/common/step_math.h reads these positions of COEF_NAMES.
    header = open(os.path.join(REPO, "csrc", "common", "step_math.h")).read()
    found = dict(re.findall(r"constexpr int k(\w+) = (\d+);", header))
    names = {
        "PosteriorLogVarianceClipped": "posterior_log_variance_clipped",
        "PosteriorMeanCoef1": "posterior_mean_coef1",
        "PosteriorMeanCoef2": "posterior_mean_coef2",
        "SqrtRecipAlphasCumprod": "sqrt_recip_alphas_cumprod",
        "SqrtRecipm1AlphasCumprod": "sqrt_recipm1_alphas_cumprod",
        "LogBetas": "log_betas",
        "FixedLargeLogVariance": "fixed_large_log_variance",
        "AlphasCumprod": "alphas_cumprod",
        "AlphasCumprodPrev": "alphas_cumprod_prev",
        "AlphasCumprodNext": "alphas_cumprod_next",
        "RecipPosteriorMeanCoef1": "recip_posterior_mean_coef1",
        "PosteriorMeanCoef2OverCoef1": "posterior_mean_coef2_over_coef1",
    }
    for const, name in names.items():
        assert int(found[const]) == COEF_INDEX[name], const
    assert int(found["MinColumns"]) == max(COEF_INDEX[n] for n in names.values()) + 1
    assert len(COEF_NAMES) >= int(found["MinColumns"])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_opcheck(layout):
    d, x, mo, t, table, noise = _args()
    if layout == "channels_last":
        x, mo, noise = (v.to(memory_format=torch.channels_last) for v in (x, mo, noise))
    elif layout == "sliced":
        x, noise = x[..., ::2], noise[..., ::2]
        mo = mo[..., ::2]
    common = (x, mo, t, table, "epsilon", "learned_range", True)
    torch.library.opcheck(OPS.p_sample_step.default, common, {"noise": noise})
    torch.library.opcheck(OPS.p_sample_step.default, common, {"noise": noise, "return_pred_xstart": False})
    torch.library.opcheck(OPS.ddim_step.default, common + (0.5,), {"noise": noise})
    torch.library.opcheck(OPS.ddim_step.default, common + (0.0,), {})
    torch.library.opcheck(OPS.ddim_reverse_step.default, common, {})
    # In-kernel noise from the default generator.
    torch.library.opcheck(OPS.p_sample_step.default, common, {})
    # ... numbered per sample (sample_index, int64 and int32).
    torch.library.opcheck(OPS.p_sample_step.default, common, {"sample_index": torch.tensor([4, 1])})
    torch.library.opcheck(
        OPS.ddim_step.default,
        common + (0.5,),
        {"sample_index": torch.tensor([0, 9], dtype=torch.int32), "return_pred_xstart": False},
    )


def test_torch_compile_fullgraph():
    d, x, mo, t, table, noise = _args()

    @torch.compile(fullgraph=True)
    def step(x, mo, t, noise):
        sample, pred = ops.p_sample_step(
            x, mo, t, table, d.model_mean_type, d.model_var_type, True, noise=noise
        )
        return sample * 1.0, pred

    @torch.compile(fullgraph=True)
    def ddim(x, mo, t):  # DDIM and in-kernel noise from the default generator
        a, _ = ops.ddim_step(
            x, mo, t, table, "epsilon", "learned_range", True, eta=0.5, return_pred_xstart=False
        )
        b, _ = ops.ddim_reverse_step(a, mo, t, table, "epsilon", "learned_range", True)
        return b

    sample, pred = step(x, mo, t, noise)
    eager_sample, eager_pred = ops.p_sample_step(
        x, mo, t, table, d.model_mean_type, d.model_var_type, True, noise=noise
    )
    assert torch.equal(sample, eager_sample) and torch.equal(pred, eager_pred)
    torch.manual_seed(0)
    a = ddim(x, mo, t)
    torch.manual_seed(0)
    b = ddim(x, mo, t)
    assert torch.equal(a, b) and torch.isfinite(a).all()

    @torch.compile(fullgraph=True)
    def per_sample(x, mo, t, index):  # in-kernel noise numbered by a sample-index tensor
        return ops.p_sample_step(
            x, mo, t, table, "epsilon", "learned_range", True, return_pred_xstart=False, sample_index=index
        )[0]

    index = torch.tensor([5, 2])
    torch.manual_seed(1)
    c = per_sample(x, mo, t, index)
    torch.manual_seed(1)
    e = ops.p_sample_step(x, mo, t, table, "epsilon", "learned_range", True, sample_index=index)[0]
    assert torch.equal(c, e)


def _raises(fn, pattern):
    with pytest.raises(ValueError, match=pattern):
        fn()


def test_error_messages():
    d, x, mo, t, table, noise = _args()

    def call(x=x, mo=mo, t=t, table=table, mean="epsilon", var="learned_range", **kw):
        return ops.p_sample_step(x, mo, t, table, mean, var, **kw)

    _raises(
        lambda: call(x=x.double(), mo=mo.double()),
        r"^x: expected dtype float32, float16 or bfloat16, got Double",
    )
    _raises(lambda: call(x=x[:, 0, 0, 0]), r"^x: expected a tensor \[B, C, \.\.\.\] with at least 2")
    _raises(
        lambda: call(mo=mo[:, :3]),
        r"^model_output: expected shape \[2, 6, 4, 4\] \(\[B, 2C, \.\.\.\]: mean and variance "
        r"channels for model_var_type 'learned_range'\), got \[2, 3, 4, 4\]",
    )
    _raises(
        lambda: call(var="fixed_small"),
        r"^model_output: expected shape \[2, 3, 4, 4\] .*'fixed_small'\), got \[2, 6, 4, 4\]",
    )
    _raises(lambda: call(mo=mo[..., :3]), r"^model_output: expected shape \[2, 6, 4, 4\]")
    _raises(lambda: call(mo=mo.int()), r"^model_output: expected dtype float32, float16 or bfloat16")
    _raises(lambda: call(t=t[:1]), r"^t: expected shape \[2\] \(one timestep per batch item")
    _raises(lambda: call(t=t.float()), r"^t: expected an integer tensor \(int64 or int32\), got Float")
    _raises(
        lambda: call(t=torch.tensor([3, 100])),
        r"^t: expected timesteps in \[0, 100\) \(the table has 100 rows\), got t\[1\] = 100",
    )
    _raises(lambda: call(t=torch.tensor([-1, 0], dtype=torch.int32)), r"got t\[0\] = -1")
    _raises(
        lambda: call(table=table[:, :5]),
        r"^table: expected a \[T, K\] coefficient table with T >= 1 and K >= 18 columns.*"
        r"got shape \[100, 5\]",
    )
    _raises(lambda: call(table=table[:0]), r"^table: expected a \[T, K\] coefficient table")
    _raises(lambda: call(table=table.double()), r"^table: expected dtype Float, got Double")
    _raises(lambda: call(noise=noise[:1]), r"^noise: expected shape \[2, 3, 4, 4\] \(the shape of x\)")
    _raises(lambda: call(noise=noise.half()), r"^noise: expected dtype Float \(the dtype of x\), got Half")
    _raises(lambda: call(mean="eps"), r"^model_mean_type: expected one of")
    _raises(lambda: call(var=ModelMeanType.EPSILON), r"^model_var_type: expected one of")
    _raises(
        lambda: OPS.p_sample_step(x, mo, t, table, "eps", "learned_range", True),
        r"^model_mean_type: expected 'epsilon', 'start_x' or 'previous_x', got 'eps'",
    )
    _raises(
        lambda: OPS.p_sample_step(x, mo, t, table, "epsilon", "big", True),
        r"^model_var_type: expected 'fixed_small', 'fixed_large', 'learned' or",
    )
    for eta in (float("nan"), -0.25, 1.5, float("inf")):
        _raises(
            lambda: ops.ddim_step(x, mo, t, table, "epsilon", "learned_range", eta=eta),
            r"^eta: expected a number in \[0, 1\] \(DDIM's eta; above 1 the coefficient "
            r"sqrt\(1 - abar_prev - sigma\^2\) is not real at some steps\), got " + re.escape(str(eta)),
        )
    _raises(
        lambda: ops.ddim_step(x, mo, t, table, "epsilon", "learned_range", eta="a"),
        r"^eta: expected a number in \[0, 1\] \(DDIM's η\), got 'a'",
    )
    _raises(
        lambda: call(sample_index=torch.tensor([[0, 1]])),
        r"^sample_index: expected shape \[2\] \(one global sample index per batch item of x\), "
        r"got \[1, 2\]",
    )
    _raises(
        lambda: call(sample_index=torch.tensor([0.0, 1.0])),
        r"^sample_index: expected an integer tensor \(int64 or int32\), got Float",
    )
    _raises(
        lambda: ops.ddim_step(x, mo, t, table, "epsilon", "learned_range", eta=0.5, sample_index="0"),
        r"^sample_index: expected None, an int",
    )


# ---- property-based: random shapes, dtypes, strides and argument mistakes -----------------

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32]
_ARG = r"^(x|model_output|t|table|noise|eta|model_mean_type|model_var_type): "


@st.composite
def _cases(draw):
    spatial = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=3)))
    return dict(
        B=draw(st.integers(0, 3)),
        C=draw(st.integers(1, 3)),
        spatial=spatial,
        mean=draw(st.sampled_from(list(ModelMeanType))),
        var=draw(st.sampled_from(list(ModelVarType))),
        rule=draw(st.sampled_from(["ancestral", "ddim", "reverse"])),
        x_dtype=draw(st.sampled_from(_DTYPES)),
        mo_dtype=draw(st.sampled_from(_DTYPES)),
        layout=draw(st.sampled_from(["contiguous", "channels_last", "transposed", "sliced"])),
        channel_error=draw(st.sampled_from([0, 0, 0, 1, -1])),
        t_kind=draw(st.sampled_from(["ok", "ok", "ok", "high", "negative", "float", "short"])),
        t_dtype=draw(st.sampled_from([torch.int64, torch.int32])),
        noise_kind=draw(st.sampled_from(["given", "given", "none", "wrong_shape", "wrong_dtype"])),
        clip=draw(st.booleans()),
        eta=draw(st.sampled_from([0.0, 0.5, 1.0])),
    )


def _layout(v, kind):
    if v.dim() < 4 or v.numel() == 0:
        return v
    if kind == "channels_last" and v.dim() == 4:
        return v.to(memory_format=torch.channels_last)
    if kind == "transposed":
        return v.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "sliced":
        wide = torch.zeros(*v.shape[:-1], 2 * v.shape[-1], dtype=v.dtype)
        wide[..., ::2] = v
        return wide[..., ::2]
    return v


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_cases())
def test_random_arguments_give_a_result_or_a_clean_error(case):
    d = make_diffusion(case["mean"], case["var"], steps=50)
    shape = (case["B"], case["C"], *case["spatial"])
    x32, mo32, noise32 = make_inputs(d, shape, seed=case["B"] * 7 + case["C"])
    if case["channel_error"]:
        mo32 = torch.cat([mo32, mo32[:, :1]], 1) if case["channel_error"] > 0 else mo32[:, 1:]
    x = _layout(x32.to(case["x_dtype"]), case["layout"])
    mo = _layout(mo32.to(case["mo_dtype"]), case["layout"])
    t = torch.randint(0, 50, (case["B"],), generator=torch.Generator().manual_seed(1))
    t = t.to(case["t_dtype"])
    if case["t_kind"] == "high" and case["B"]:
        t[-1] = 50
    elif case["t_kind"] == "negative" and case["B"]:
        t[0] = -3
    elif case["t_kind"] == "float":
        t = t.float()
    elif case["t_kind"] == "short":
        t = t[:-1] if case["B"] else torch.zeros(1, dtype=torch.long)
    noise = {
        "given": noise32,
        "none": None,
        "wrong_shape": torch.zeros((case["B"] + 1, *shape[1:])),
        "wrong_dtype": noise32.double(),
    }[case["noise_kind"]]
    if noise is not None and case["noise_kind"] != "wrong_dtype":
        noise = _layout(noise.to(case["x_dtype"]), case["layout"])
    table = d.coef_table("cpu")

    floats = (torch.float32, torch.float16, torch.bfloat16)
    uses_noise = case["rule"] == "ancestral" or (case["rule"] == "ddim" and case["eta"] != 0)
    valid = (
        case["x_dtype"] in floats
        and case["mo_dtype"] in floats
        and case["channel_error"] == 0
        and (case["t_kind"] == "ok" or (case["B"] == 0 and case["t_kind"] in ("high", "negative")))
        and (case["noise_kind"] in ("given", "none") or case["rule"] == "reverse")
    )
    mt, vt = case["mean"], case["var"]
    try:
        if case["rule"] == "ancestral":
            sample, pred = ops.p_sample_step(x, mo, t, table, mt, vt, case["clip"], noise=noise)
        elif case["rule"] == "ddim":
            sample, pred = ops.ddim_step(x, mo, t, table, mt, vt, case["clip"], eta=case["eta"], noise=noise)
        else:
            sample, pred = ops.ddim_reverse_step(x, mo, t, table, mt, vt, case["clip"])
    except ValueError as exc:
        assert not valid, f"unexpected error for a valid case: {exc}"
        assert re.match(_ARG, str(exc)), str(exc)
        return
    assert valid, "an invalid case gave no error"
    assert sample.shape == x.shape and sample.dtype == x.dtype and pred.shape == x.shape
    if noise is None and uses_noise:
        return  # in-kernel noise: tested in ops/test_step_noise.py
    eager = run_step(
        d,
        case["rule"],
        x32.to(case["x_dtype"]).float(),
        mo32.to(case["mo_dtype"]).float(),
        t.long(),
        case["clip"],
        case["eta"],
        None if noise is None else noise.float(),
        fused=False,
    )
    if case["x_dtype"] == torch.float32:
        assert_parity(sample, eager["sample"])
        assert_parity(pred, eager["pred_xstart"])
    else:  # output rounded to x's 16-bit dtype
        tol = 1e-2 * max([1.0] + eager["sample"].abs().flatten().tolist())
        torch.testing.assert_close(sample.float(), eager["sample"], rtol=1e-2, atol=tol)


def test_learned_variance_channels_are_named_in_errors():
    for var in LEARNED:
        d, x, mo, t, table, noise = _args(var)
        _raises(
            lambda: ops.ddim_reverse_step(x, mo[:, :3], t, table, "epsilon", var),
            r"mean and variance channels",
        )


@pytest.mark.slow
def test_portable_cpu_kernel_via_a_subprocess():
    """ATEN_CPU_CAPABILITY=default makes csrc/cpu/step.cpp take its scalar kernel instead of
    the AVX2 at::vec one: the parity and noise tests must pass there too."""
    import subprocess
    import sys

    root = REPO
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            os.path.join(root, "tests", "core", "test_step_parity.py"),
            os.path.join(root, "tests", "ops", "test_step_noise.py"),
            "-k",
            "ancestral_matches or ddim_matches or reverse_matches or layouts or low_precision "
            "or spatial or kernel_noise or channels_last or bit_for_bit or ddim_factors or loops",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
