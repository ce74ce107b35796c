"""Our diffusion math against openai/improved-diffusion's own code, function by function
(dev-time check, not run in CI).

Skipped unless IDDPM_REF_PATH names a checkout of improved-diffusion (the folder that holds the
``improved_diffusion`` package), e.g.

    IDDPM_REF_PATH=/tmp/ref pytest -q tests/compat/test_diffusion_reference.py

Both libraries get the same arguments and, where they draw random numbers (p_sample's noise,
the samplers' timesteps), the same seeds: every method of GaussianDiffusion / SpacedDiffusion
that the reference has, over mean types × variance types × loss types × timestep rescaling ×
schedules × respacings (a seeded sample of the grid), gives the same values (float tolerance)
or both raise; and so do space_timesteps, the losses module, timestep_embedding, the schedule
samplers and create_model_and_diffusion. Where the reference crashes on a case we accept (a
one-step process: IndexError in its constructor), the case is left out, not compared.
"""

from __future__ import annotations

import importlib
import itertools
import os
import random
import sys

import numpy as np
import pytest
import torch

from iddpm_ext import gaussian_diffusion as OG
from iddpm_ext import losses as OL
from iddpm_ext import nn as ON
from iddpm_ext import resample as OS
from iddpm_ext import respace as OR
from iddpm_ext import script_util as OU

REF_PATH = os.environ.get("IDDPM_REF_PATH")
pytestmark = pytest.mark.skipif(
    not REF_PATH or not os.path.isdir(os.path.join(REF_PATH, "improved_diffusion")),
    reason="set IDDPM_REF_PATH to a checkout of openai/improved-diffusion",
)


def _ref(name):
    if REF_PATH not in sys.path:
        sys.path.insert(0, REF_PATH)
    return importlib.import_module(f"improved_diffusion.{name}")


def _outcome(fn, seed=0):
    torch.manual_seed(seed)
    np.random.seed(seed)
    try:
        return "ok", fn()
    except Exception as exc:  # noqa: BLE001 - comparing which calls fail is the point
        return "error", f"{type(exc).__name__}: {exc}"


def _assert_same(name, a, b, tol):
    if isinstance(a, dict):
        assert set(a) == set(b), f"{name}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            _assert_same(f"{name}[{k}]", a[k], b[k], tol)
    elif isinstance(a, (tuple, list)) and not isinstance(a, str):
        assert len(a) == len(b), f"{name}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(f"{name}[{i}]", x, y, tol)
    elif torch.is_tensor(a) or isinstance(a, np.ndarray):
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        assert a.shape == b.shape and a.dtype == b.dtype, (
            f"{name}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
        )
        a, b = a.double(), b.double()
        assert torch.equal(torch.isfinite(a), torch.isfinite(b)), f"{name}: non-finite elements differ"
        fin = torch.isfinite(a)
        assert torch.equal(a[~fin].nan_to_num(), b[~fin].nan_to_num()), f"{name}: non-finite values differ"
        if fin.any():
            err = ((a - b).abs()[fin] / (b.abs()[fin] + 1)).max().item()
            assert err <= tol, f"{name}: max relative error {err:.3g} > {tol}"
    else:
        assert a == b, f"{name}: {a!r} vs {b!r}"


def _compare(name, ref_fn, our_fn, seed=0, tol=1e-5):
    ref, ours = _outcome(ref_fn, seed), _outcome(our_fn, seed)
    assert ref[0] == ours[0], (
        f"{name}: the reference {ref[0]} ({ref[1]!s:.200}), ours {ours[0]} ({ours[1]!s:.200})"
    )
    if ref[0] == "ok":
        _assert_same(name, ref[1], ours[1], tol)


def _model(channels, learned, seed=123):
    """A deterministic stand-in network: a per-pixel linear map of x plus a term in t
    (learned variances: a second half in (-1, 1))."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(channels, channels, generator=g) * 0.5
    v = torch.randn(channels, channels, generator=g) * 0.5

    def model(x, t, **kwargs):
        tt = t.float().view(-1, 1, 1, 1)
        h = torch.einsum("oc,bchw->bohw", w, x) + tt / 1000
        if not learned:
            return h
        return torch.cat([h, torch.tanh(torch.einsum("oc,bchw->bohw", v, x) + tt / 500)], 1)

    return model


def _configs():
    """(steps, schedule, respacing, mean, var, loss, rescale): a seeded fifth of the grid."""
    rng = random.Random(0)
    out = []
    for steps, schedule, respacings in (
        (2, "cosine", ["", "2"]),
        (7, "cosine", ["", "2", "1,1", "3"]),
        (20, "linear", ["", "ddim4", "5"]),  # the last beta is 1: alphas_cumprod reaches 0
        (50, "cosine", ["", "5,6", "ddim10", "16"]),
        (1000, "linear", ["", "ddim50"]),
        (4000, "cosine", ["25"]),
    ):
        for respacing, mean, var, loss, rescale in itertools.product(
            respacings, OG.ModelMeanType, OG.ModelVarType, OG.LossType, (False, True)
        ):
            if rng.random() < 0.2:
                out.append((steps, schedule, respacing, mean.name, var.name, loss.name, rescale))
    return out


CONFIGS = _configs()


@pytest.mark.parametrize("steps, schedule, respacing, mean, var, loss, rescale", CONFIGS)
def test_diffusion_methods_match_the_reference(steps, schedule, respacing, mean, var, loss, rescale):
    rg, rr = _ref("gaussian_diffusion"), _ref("respace")
    sections = respacing or [steps]
    timesteps = rr.space_timesteps(steps, sections)
    assert timesteps == OR.space_timesteps(steps, sections)
    made = []
    for lib, gd in ((rr, rg), (OR, OG)):
        made.append(_outcome(lambda: lib.SpacedDiffusion(
            use_timesteps=timesteps,
            betas=gd.get_named_beta_schedule(schedule, steps),
            model_mean_type=gd.ModelMeanType[mean],
            model_var_type=gd.ModelVarType[var],
            loss_type=gd.LossType[loss],
            rescale_timesteps=rescale,
        )))  # fmt: skip
    assert made[0][0] == made[1][0] == "ok", made
    dr, do = made[0][1], made[1][1]
    B, C = 3, 2
    model = _model(C, var in ("LEARNED", "LEARNED_RANGE"))
    g = torch.Generator().manual_seed(steps + len(respacing))
    x0 = torch.rand(B, C, 4, 4, generator=g) * 2 - 1
    xt = torch.randn(B, C, 4, 4, generator=g)
    t = torch.randint(0, dr.num_timesteps, (B,), generator=g)
    noise = torch.randn(B, C, 4, 4, generator=g)
    _compare("betas", lambda: dr.betas, lambda: do.betas, tol=0)
    _compare("q_mean_variance", lambda: dr.q_mean_variance(x0, t), lambda: do.q_mean_variance(x0, t))
    _compare("q_sample", lambda: dr.q_sample(x0, t, noise), lambda: do.q_sample(x0, t, noise))
    _compare(
        "q_posterior_mean_variance",
        lambda: dr.q_posterior_mean_variance(x0, xt, t),
        lambda: do.q_posterior_mean_variance(x0, xt, t),
    )
    _compare("prior_bpd", lambda: dr._prior_bpd(x0), lambda: do._prior_bpd(x0))
    for clip in (True, False):
        for denoised_fn in (None, lambda z: z * 0.9):
            _compare(
                f"p_mean_variance(clip={clip}, denoised_fn={denoised_fn is not None})",
                lambda: dr.p_mean_variance(model, xt, t, clip, denoised_fn),
                lambda: do.p_mean_variance(model, xt, t, clip, denoised_fn),
                tol=1e-4,
            )
        _compare(f"p_sample(clip={clip})", lambda: dr.p_sample(model, xt, t, clip),
                 lambda: do.p_sample(model, xt, t, clip), seed=1, tol=1e-4)  # fmt: skip
        for eta in (0.0, 0.5):
            _compare(
                f"ddim_sample(clip={clip}, eta={eta})",
                lambda: dr.ddim_sample(model, xt, t, clip, eta=eta),
                lambda: do.ddim_sample(model, xt, t, clip, eta=eta),
                seed=2,
                tol=1e-4,
            )
        _compare(f"ddim_reverse_sample(clip={clip})", lambda: dr.ddim_reverse_sample(model, xt, t, clip),
                 lambda: do.ddim_reverse_sample(model, xt, t, clip), tol=1e-4)  # fmt: skip
        _compare(f"_vb_terms_bpd(clip={clip})", lambda: dr._vb_terms_bpd(model, x0, xt, t, clip),
                 lambda: do._vb_terms_bpd(model, x0, xt, t, clip), tol=1e-4)  # fmt: skip
    _compare("training_losses", lambda: dr.training_losses(model, x0, t, noise=noise),
             lambda: do.training_losses(model, x0, t, noise=noise), tol=1e-4)  # fmt: skip
    _compare("training_losses (drawn noise)", lambda: dr.training_losses(model, x0, t),
             lambda: do.training_losses(model, x0, t), seed=3, tol=1e-4)  # fmt: skip
    if dr.num_timesteps <= 16:
        shape = (B, C, 4, 4)
        _compare("calc_bpd_loop", lambda: dr.calc_bpd_loop(model, x0), lambda: do.calc_bpd_loop(model, x0),
                 seed=4, tol=1e-4)  # fmt: skip
        _compare("p_sample_loop", lambda: dr.p_sample_loop(model, shape, noise=xt, device="cpu"),
                 lambda: do.p_sample_loop(model, shape, noise=xt, device="cpu"), seed=5,
                 tol=1e-3)  # fmt: skip
        _compare(
            "ddim_sample_loop",
            lambda: dr.ddim_sample_loop(model, shape, noise=xt, eta=0.3, device="cpu"),
            lambda: do.ddim_sample_loop(model, shape, noise=xt, eta=0.3, device="cpu"),
            seed=6,
            tol=1e-3,
        )


SECTION_COUNTS = ["1", "2", "3", "10", "ddim1", "ddim2", "ddim3", "ddim7", "ddim10", "ddim25", "ddim100",
                  "ddim1000", "1,1", "2,3", "5,5,5", "0", "0,1", "3,0", "10,10", "1000", "4000", "1,2,3,4,5",
                  [1], [2, 3], [0, 2]]  # fmt: skip


@pytest.mark.parametrize("num", [1, 2, 5, 10, 50, 1000, 4000])
def test_space_timesteps_matches_the_reference(num):
    rr = _ref("respace")
    for sections in [*SECTION_COUNTS, [num], [num, 1]]:
        _compare(f"space_timesteps({num}, {sections!r})", lambda: sorted(rr.space_timesteps(num, sections)),
                 lambda: sorted(OR.space_timesteps(num, sections)))  # fmt: skip


def test_losses_and_timestep_embedding_match_the_reference():
    rl, rn = _ref("losses"), _ref("nn")
    g = torch.Generator().manual_seed(0)
    for shape in ((3,), (2, 3, 4, 4)):
        m1, lv1, m2, lv2 = (torch.randn(shape, generator=g) for _ in range(4))
        _compare("normal_kl", lambda: rl.normal_kl(m1, lv1, m2, lv2), lambda: OL.normal_kl(m1, lv1, m2, lv2))
        _compare(
            "normal_kl (floats)",
            lambda: rl.normal_kl(m1, lv1, 0.0, 0.0),
            lambda: OL.normal_kl(m1, lv1, 0.0, 0.0),
        )
        _compare("approx_standard_normal_cdf", lambda: rl.approx_standard_normal_cdf(m1),
                 lambda: OL.approx_standard_normal_cdf(m1))  # fmt: skip
        x = torch.randint(0, 256, shape, generator=g).float() / 127.5 - 1
        x[..., 0], x[..., -1] = -1.0, 1.0  # both edge bins
        _compare(
            "discretized_gaussian_log_likelihood",
            lambda: rl.discretized_gaussian_log_likelihood(x, means=m1 * 0.5, log_scales=lv1 - 3),
            lambda: OL.discretized_gaussian_log_likelihood(x, means=m1 * 0.5, log_scales=lv1 - 3),
        )
    for dim in (1, 2, 3, 8, 9, 128):
        for t in (torch.tensor([0.0, 1.0, 999.0]), torch.tensor([5]), torch.tensor([0.5, 3.25])):
            _compare(f"timestep_embedding({t.tolist()}, {dim})", lambda: rn.timestep_embedding(t, dim),
                     lambda: ON.timestep_embedding(t, dim))  # fmt: skip


@pytest.mark.parametrize("steps", [2, 5, 100])
def test_schedule_samplers_match_the_reference(steps, monkeypatch):
    monkeypatch.setattr(np, "int", int, raising=False)  # the reference's resample predates numpy 1.24
    rg, rs = _ref("gaussian_diffusion"), _ref("resample")
    betas = np.linspace(0.1, 0.2, steps)
    dr, do = (
        gd.GaussianDiffusion(betas=betas, model_mean_type=gd.ModelMeanType.EPSILON,
                             model_var_type=gd.ModelVarType.FIXED_LARGE, loss_type=gd.LossType.MSE)
        for gd in (rg, OG)
    )  # fmt: skip
    for name in ("uniform", "loss-second-moment"):
        sr, so = rs.create_named_schedule_sampler(name, dr), OS.create_named_schedule_sampler(name, do)
        _compare(f"{name} weights", sr.weights, so.weights)
        _compare(f"{name} sample", lambda: sr.sample(7, "cpu"), lambda: so.sample(7, "cpu"), seed=3)
        if name == "uniform":
            continue
        for it in range(30):  # the history fills (10 losses per timestep) and the weights change
            ts = np.random.RandomState(it).randint(0, steps, 8).tolist()
            ls = np.random.RandomState(100 + it).rand(8).tolist()
            sr.update_with_all_losses(ts, ls)
            so.update_with_all_losses(ts, ls)
            if it % 7 == 0 or it == 29:
                _compare(f"weights after {it + 1} updates", sr.weights, so.weights)
                _compare(f"sample after {it + 1} updates", lambda: sr.sample(5, "cpu"),
                         lambda: so.sample(5, "cpu"), seed=it)  # fmt: skip


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(image_size=64),
        dict(image_size=256),
        dict(image_size=48),
        dict(learn_sigma=True, use_kl=True),
        dict(predict_xstart=True, sigma_small=True),
        dict(class_cond=True),
        dict(num_heads=1, num_heads_upsample=2, attention_resolutions="32,16"),
        dict(timestep_respacing="ddim25"),
        dict(timestep_respacing="100", rescale_timesteps=False),
        dict(noise_schedule="cosine", diffusion_steps=50),
        dict(noise_schedule="bogus"),
        dict(use_scale_shift_norm=False, dropout=0.1),
        dict(rescale_learned_sigmas=False, learn_sigma=True),
    ],
)
def test_create_model_and_diffusion_matches_the_reference(overrides):
    ru = _ref("script_util")
    ref_defaults = ru.model_and_diffusion_defaults()
    ours = OU.model_and_diffusion_defaults()
    assert {k: ours[k] for k in ref_defaults} == ref_defaults
    args = {**ref_defaults, "num_channels": 32, **overrides}
    ref, mine = (
        _outcome(lambda: ru.create_model_and_diffusion(**args)),
        _outcome(lambda: OU.create_model_and_diffusion(**args)),
    )
    assert ref[0] == mine[0], (ref, mine)
    if ref[0] == "error":
        return
    (mr, dr), (mo, do) = ref[1], mine[1]
    assert {k: v.shape for k, v in mr.state_dict().items()} == {
        k: v.shape for k, v in mo.state_dict().items()
    }
    for attr in ("num_timesteps", "model_mean_type", "model_var_type", "loss_type", "rescale_timesteps"):
        a, b = getattr(dr, attr), getattr(do, attr)
        assert getattr(a, "name", a) == getattr(b, "name", b), attr
    np.testing.assert_array_equal(dr.betas, do.betas)
    assert list(dr.timestep_map) == list(do.timestep_map)


@pytest.mark.parametrize(
    "t",
    [
        torch.tensor(3),
        torch.tensor([3]),
        torch.tensor([1, 5, 9], dtype=torch.int32),
        torch.tensor([1, 5, 10]),
    ],
)
def test_forward_process_timestep_forms_match_the_reference(t):
    """One timestep for the whole batch (shape () or (1,)) and int32 timesteps, as the reference
    takes them in the forward-process methods; out of range: both raise."""
    rg, rr = _ref("gaussian_diffusion"), _ref("respace")
    made = [
        lib.SpacedDiffusion(use_timesteps=OR.space_timesteps(50, "10"),
                            betas=gd.get_named_beta_schedule("cosine", 50),
                            model_mean_type=gd.ModelMeanType.EPSILON,
                            model_var_type=gd.ModelVarType.LEARNED_RANGE,
                            loss_type=gd.LossType.MSE, rescale_timesteps=True)
        for lib, gd in ((rr, rg), (OR, OG))
    ]  # fmt: skip
    dr, do = made
    g = torch.Generator().manual_seed(0)
    x0, xt, noise = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    _compare("q_sample", lambda: dr.q_sample(x0, t, noise), lambda: do.q_sample(x0, t, noise))
    _compare("q_mean_variance", lambda: dr.q_mean_variance(x0, t), lambda: do.q_mean_variance(x0, t))
    _compare("q_posterior_mean_variance", lambda: dr.q_posterior_mean_variance(x0, xt, t),
             lambda: do.q_posterior_mean_variance(x0, xt, t))  # fmt: skip
