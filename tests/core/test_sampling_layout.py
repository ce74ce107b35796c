"""Seeded sampling with the fused step draws the same noise as the eager path (and as the
reference) even when the model returns tensors in an unusual memory layout: randn_like(x)
follows x's layout, so the fused result must come back in the eager math's layout."""

import pytest
import torch

from iddpm_ext import create_gaussian_diffusion

pytestmark = pytest.mark.kernels


class PermutedModel(torch.nn.Module):
    """Returns its output with channels outermost in memory (an einsum does this)."""

    def __init__(self, c, out):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(out, c, generator=g) * 0.5)

    def forward(self, x, t):
        y = torch.einsum("oc,nchw->nohw", self.w, x)
        return torch.tanh(y + t.float().view(-1, 1, 1, 1) / 100.0)


@pytest.mark.parametrize("predict_xstart", [False, True])
@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop"])
def test_seeded_loops_match_eager_with_permuted_model_outputs(predict_xstart, learn_sigma, loop):
    d = create_gaussian_diffusion(
        steps=40,
        learn_sigma=learn_sigma,
        noise_schedule="cosine",
        predict_xstart=predict_xstart,
        timestep_respacing="8",
    )
    model = PermutedModel(3, 6 if learn_sigma else 3)
    kwargs = {"eta": 0.5} if loop == "ddim_sample_loop" else {}
    results = {}
    for fused in (True, False):
        d.use_fused = fused
        torch.manual_seed(7)
        results[fused] = getattr(d, loop)(model, (3, 3, 4, 5), **kwargs)
    assert results[True].stride() == results[False].stride()
    torch.testing.assert_close(results[True], results[False], rtol=1e-5, atol=1e-5)


def test_fused_step_returns_eager_strides():
    d = create_gaussian_diffusion(steps=10, noise_schedule="cosine", predict_xstart=True)
    model = PermutedModel(3, 3)
    x = torch.randn(2, 3, 4, 4)
    t = torch.tensor([3, 0])
    with torch.no_grad():
        noise = torch.randn_like(x)
        d.use_fused = True
        a = d.p_sample(model, x, t, noise=noise)
        d.use_fused = False
        b = d.p_sample(model, x, t, noise=noise)
    assert a["sample"].stride() == b["sample"].stride() != x.stride()
    assert a["pred_xstart"].stride() == b["pred_xstart"].stride()
    torch.testing.assert_close(a["sample"], b["sample"], rtol=1e-6, atol=1e-6)
