"""The lean per-call path of p_sample / ddim_sample / ddim_reverse_sample and the loops gives
bit for bit what the plain composition gives: noise drawn with ``randn_like`` where the
reference draws it, then the raw fused op (``torch.ops.iddpm.*``) called with the
diffusion's coefficient table. So the fast path changes no value, no noise draw and no
layout; the fused op's own accuracy is tested in test_step_parity.py."""

import pytest
import torch

from helpers.step_cases import const_model, make_diffusion, make_inputs
from iddpm_ext import ModelMeanType, ModelVarType
from iddpm_ext.core.checks import int_range

pytestmark = pytest.mark.kernels

TYPES = [
    (ModelMeanType.EPSILON, ModelVarType.LEARNED_RANGE),
    (ModelMeanType.START_X, ModelVarType.FIXED_SMALL),
    (ModelMeanType.PREVIOUS_X, ModelVarType.LEARNED),
    (ModelMeanType.EPSILON, ModelVarType.FIXED_LARGE),
]


def _composed(d, rule, x, mo, t, clip, eta, seed):
    """The step written out: seed, randn_like(x) (float32 as the method sees x), raw op."""
    x32 = x.float()
    types = (d.model_mean_type.name.lower(), d.model_var_type.name.lower())
    table = d.coef_table(x.device)
    torch.manual_seed(seed)
    if rule == "reverse":
        return torch.ops.iddpm.ddim_reverse_step(x32, mo, t, table, *types, clip, True)
    noise = torch.randn_like(x).float()  # drawn like x (as the reference), then upcast exactly
    if rule == "ancestral":
        return torch.ops.iddpm.p_sample_step(x32, mo, t, table, *types, clip, noise, None, True, None)
    return torch.ops.iddpm.ddim_step(x32, mo, t, table, *types, clip, eta, noise, None, True, None)


def _method(d, rule, x, mo, t, clip, eta, seed):
    model = const_model(mo)
    torch.manual_seed(seed)
    if rule == "ancestral":
        return d.p_sample(model, x, t, clip_denoised=clip)
    if rule == "ddim":
        return d.ddim_sample(model, x, t, clip_denoised=clip, eta=eta)
    return d.ddim_reverse_sample(model, x, t, clip_denoised=clip)


def _assert_same(out, ref):
    sample, pred = ref
    assert torch.equal(out["sample"], sample) and out["sample"].stride() == sample.stride()
    assert torch.equal(out["pred_xstart"], pred) and out["pred_xstart"].stride() == pred.stride()


@pytest.mark.parametrize("respacing", [None, "10"])
@pytest.mark.parametrize("rule,eta", [("ancestral", 0.0), ("ddim", 0.0), ("ddim", 0.7), ("reverse", 0.0)])
@pytest.mark.parametrize("types", TYPES, ids=lambda m: f"{m[0].name}-{m[1].name}")
def test_methods_equal_the_composed_step_bit_for_bit(types, rule, eta, respacing):
    d = make_diffusion(*types, respacing=respacing)
    clip = types[0] != ModelMeanType.PREVIOUS_X
    for shape, t in (((1, 3, 8, 8), [d.num_timesteps // 2]), ((3, 1, 5, 4), [0, 1, d.num_timesteps - 1])):
        x, mo, _ = make_inputs(d, shape, seed=len(shape) + shape[0])
        t = torch.tensor(t)
        _assert_same(_method(d, rule, x, mo, t, clip, eta, 5), _composed(d, rule, x, mo, t, clip, eta, 5))


def test_low_precision_and_channels_last_inputs_equal_the_composed_step():
    # a fixed variance: with a learned one and a bf16 output the method runs the reference's
    # bf16 arithmetic eagerly (test_step_parity.py)
    d = make_diffusion(ModelMeanType.EPSILON, ModelVarType.FIXED_LARGE)
    x, mo, _ = make_inputs(d, (2, 3, 4, 6), x_dtype=torch.float16, mo_dtype=torch.bfloat16)
    t = torch.tensor([3, 0])
    for rule in ("ancestral", "ddim"):
        _assert_same(_method(d, rule, x, mo, t, True, 0.5, 1), _composed(d, rule, x, mo, t, True, 0.5, 1))
    x = x.float().contiguous(memory_format=torch.channels_last)
    mo = mo.float().contiguous(memory_format=torch.channels_last)
    _assert_same(
        _method(d, "ancestral", x, mo, t, True, 0.0, 2), _composed(d, "ancestral", x, mo, t, True, 0.0, 2)
    )


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop"])
def test_seeded_loops_equal_the_composed_steps(loop):
    d = make_diffusion(respacing="8")
    shape = (2, 3, 4, 4)
    _, mo, _ = make_inputs(d, shape)
    torch.manual_seed(11)
    out = getattr(d, loop)(const_model(mo), shape)
    torch.manual_seed(11)
    img = torch.randn(*shape)
    types = (d.model_mean_type.name.lower(), d.model_var_type.name.lower())
    table = d.coef_table("cpu")
    for i in reversed(range(d.num_timesteps)):
        t = torch.full((shape[0],), i)
        noise = torch.randn_like(img)
        if loop == "p_sample_loop":
            img = torch.ops.iddpm.p_sample_step(img, mo, t, table, *types, True, noise, None, False, None)[0]
        else:
            img = torch.ops.iddpm.ddim_step(img, mo, t, table, *types, True, 0.0, noise, None, False, None)[0]
    assert torch.equal(out, img)


@pytest.mark.parametrize("batch", [1, 5, 40])  # both ways of reading t: Python ints and one reduction
def test_timestep_check_names_the_bad_value_at_any_batch(batch):
    d = make_diffusion(steps=20, schedule="cosine")
    x = torch.zeros(batch, 3, 2, 2)
    mo = torch.zeros(batch, 6, 2, 2)
    for bad in (20, -1):
        t = torch.full((batch,), 3)
        t[batch // 2] = bad
        with pytest.raises(ValueError, match=rf"t: expected timesteps in \[0, 20\), got {bad}$"):
            d.p_sample(const_model(mo), x, t)
        assert int_range(t) == (min(t.tolist()), max(t.tolist()))
    assert int_range(torch.arange(batch, dtype=torch.int32)) == (0, batch - 1)


def test_respaced_model_sees_original_timesteps_once():
    d = make_diffusion(steps=100, respacing="10")
    seen = []

    def model(x, ts):
        seen.append(ts)
        return torch.zeros(x.shape[0], 6, *x.shape[2:])

    x = torch.zeros(3, 3, 2)
    t = torch.tensor([0, 4, 9])
    d.p_sample(model, x, t)
    d.p_sample(d._wrap_model(model), x, t)  # an already wrapped model is not mapped twice
    expected = torch.tensor([d.timestep_map[i] for i in (0, 4, 9)])
    assert all(torch.equal(s, expected) for s in seen) and len(seen) == 2
    assert torch.equal(d.model_timesteps(t.int()), expected.int())
    assert torch.equal(d.model_timesteps(torch.tensor([-1])), torch.tensor([d.timestep_map[-1]]))


def test_reverse_ddim_draws_no_noise_as_the_reference():
    d = make_diffusion()
    x, mo, _ = make_inputs(d, (2, 3, 4, 4))
    for fused in (True, False):
        d.use_fused = fused
        torch.manual_seed(0)
        d.ddim_reverse_sample(const_model(mo), x, torch.tensor([3, 0]))
        after = torch.randn(4)
        torch.manual_seed(0)
        assert torch.equal(after, torch.randn(4)), f"fused={fused}: the global RNG moved"
