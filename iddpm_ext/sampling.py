"""Sampling methods of :class:`iddpm_ext.diffusion.GaussianDiffusion` (a mixin).

Each step calls the model, then applies the update rule either eagerly (the readable
reference math, ``_*_from_output`` below) or as one fused kernel (iddpm::p_sample_step /
ddim_step / ddim_reverse_step, docs/step.md) whenever it applies: the extension has
kernels for x's device, ``denoised_fn`` is None, x and the model output are
float32/float16/bfloat16, explicit noise (if any) has x's dtype and device, and no
gradient is being recorded. ``diffusion.use_fused = False`` (or IDDPM_EXT_FUSED=0 in the
environment before the diffusion is made) forces the eager path.

Results are float32 either way, as in the reference: its float32 coefficient tables promote
fp16/bf16 operands, so an fp16/bf16 x is upcast (exactly) before the fused op, which then
computes from the same values as the eager math. (The ops themselves, and the sampling
engine, return x's dtype.) Noise that is not given is drawn with ``torch.randn_like(x)`` from torch's
global RNG on CPU without a generator (as the reference draws it, so seeded runs match
the reference), else in the kernel with Philox keyed by ``generator`` or the device's
default generator. Because ``randn_like`` follows x's memory layout, a fused result is
returned in the layout the eager math would have produced (predicted once per layout on
meta tensors), so the next step's noise lands where the reference's would.
"""

from __future__ import annotations

import torch

from . import ops

_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FUSED_DEVICES: dict[str, bool] = {}


def _fused_kernels_on(device: torch.device) -> bool:
    on = _FUSED_DEVICES.get(device.type)
    if on is None:
        on = ops.has_kernel(device)
        _FUSED_DEVICES[device.type] = on
    return on


def _nonzero_mask(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """1.0 where t != 0, as [N, 1, ..., 1] (no noise is added at the last step)."""
    return (t != 0).float().view(-1, *([1] * (ndim - 1)))


def _dim_order(x: torch.Tensor) -> tuple:
    """Dims of x ordered from the largest stride to the smallest, size-1 dims ignored."""
    dims = [d for d in range(x.dim()) if x.shape[d] != 1]
    return tuple(sorted(dims, key=lambda d: -x.stride(d)))


class SamplingMixin:
    """p_sample / ddim_sample / ddim_reverse_sample and the sampling loops."""

    # ------------------------------------------------------------------------------
    # noise
    # ------------------------------------------------------------------------------

    def _noise_like(self, x, noise, generator, name="noise"):
        """The explicit ``noise`` (checked), or fresh N(0, I) noise like ``x``: from
        ``generator`` when given, else from torch's global RNG exactly as the reference
        draws it (``torch.randn_like(x)``), so seeded runs match it."""
        if noise is not None:
            self._check_same_shape(noise, name, x, "x")
            return noise
        if generator is None:
            return torch.randn_like(x)
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    @staticmethod
    def _fused_noise(x, noise, generator):
        """The noise argument of a fused step: ``noise`` as given; on CPU without a
        generator, ``torch.randn_like(x)`` from the global RNG exactly as the reference
        draws it; otherwise None (Philox noise in the kernel from ``generator`` or the
        device's default generator)."""
        if noise is None and generator is None and x.device.type == "cpu":
            return torch.randn_like(x)
        return noise

    @staticmethod
    def _as_float32(*vs):
        """x (and noise) as the eager math sees them: its float32 coefficient tables promote
        fp16/bf16 operands to float32, so its results are float32. Upcasting first (exact)
        makes the fused op compute from the same values and return float32 as well."""
        return tuple(v.float() if v is not None and v.dtype != torch.float32 else v for v in vs)

    # ------------------------------------------------------------------------------
    # when the fused kernels apply, and the layout of their results
    # ------------------------------------------------------------------------------

    def _fused_applies(self, x, model_output, t, denoised_fn, noise) -> bool:
        """Whether a sampling step can run as one fused op (see the module docstring).
        Raises the eager path's errors for a wrong model output or noise shape."""
        if not self.use_fused or denoised_fn is not None or not _fused_kernels_on(x.device):
            return False
        if not isinstance(model_output, torch.Tensor) or model_output.device != x.device:
            return False
        if x.dtype not in _FUSED_DTYPES or model_output.dtype not in _FUSED_DTYPES:
            return False
        if t.device != x.device or t.dtype not in (torch.int64, torch.int32):
            return False
        if torch.is_grad_enabled() and (x.requires_grad or model_output.requires_grad):
            return False  # the fused ops are not differentiable
        if noise is not None:
            self._check_same_shape(noise, "noise", x, "x")
            if noise.dtype != x.dtype or noise.device != x.device:
                return False
        self._check_model_output(model_output, x)
        return True

    def _eager_layout(self, kind, x, model_output, noise, clip_denoised, eta):
        """(sample strides, pred_xstart strides) the eager math gives for these input
        layouts, or None in the common case where the fused kernel's (row-major) layout
        is the eager one: x contiguous and every operand in the same dim order."""
        if x.is_contiguous() and _dim_order(model_output) == _dim_order(x) and (
            noise is None or _dim_order(noise) == _dim_order(x)
        ):
            return None
        key = (kind, tuple(x.shape), x.stride(), model_output.stride(),
               None if noise is None else noise.stride(), x.dtype, model_output.dtype,
               bool(clip_denoised), float(eta))
        cache = self.__dict__.setdefault("_layout_cache", {})
        if key not in cache:
            def meta(v):
                return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta")

            xm, mm = meta(x), meta(model_output)
            nm = torch.empty_like(xm) if noise is None else meta(noise)  # randn_like keeps x's layout
            tm = torch.zeros(x.shape[0], dtype=torch.long, device="meta")
            with torch.no_grad():
                if kind == "p_sample":
                    out = self._p_sample_from_output(mm, xm, tm, clip_denoised, None, nm)
                elif kind == "ddim":
                    out = self._ddim_from_output(mm, xm, tm, clip_denoised, None, eta, nm)
                else:
                    out = self._ddim_reverse_from_output(mm, xm, tm, clip_denoised, None)
            cache[key] = (out["sample"].stride(), out["pred_xstart"].stride())
        return cache[key]

    @staticmethod
    def _relayout(v: torch.Tensor, strides) -> torch.Tensor:
        if v is None or v.numel() == 0 or v.stride() == tuple(strides):
            return v
        return torch.empty_strided(v.shape, strides, dtype=v.dtype, device=v.device).copy_(v)

    def _fused_result(self, kind, x, model_output, noise, clip_denoised, eta, sample, pred):
        layout = self._eager_layout(kind, x, model_output, noise, clip_denoised, eta)
        if layout is not None:
            sample = self._relayout(sample, layout[0])
            pred = self._relayout(pred, layout[1])
        return {"sample": sample, "pred_xstart": pred}

    # ------------------------------------------------------------------------------
    # the eager update rules (the readable reference math)
    # ------------------------------------------------------------------------------

    def _p_sample_from_output(self, model_output, x, t, clip_denoised, denoised_fn, noise):
        out = self._p_mean_variance_from_output(model_output, x, t, clip_denoised, denoised_fn)
        nonzero_mask = _nonzero_mask(t, x.dim())
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _ddim_from_output(self, model_output, x, t, clip_denoised, denoised_fn, eta, noise):
        out = self._p_mean_variance_from_output(model_output, x, t, clip_denoised, denoised_fn)
        c = self._coefs(t, x.dim())
        # The model may predict x_0 or x_{t-1}: re-derive ε from the (clipped) x_0.
        eps = self._eps_from_xstart(x, c, out["pred_xstart"])
        alpha_bar = c.alphas_cumprod
        alpha_bar_prev = c.alphas_cumprod_prev
        sigma = (
            eta
            * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        mean_pred = (
            out["pred_xstart"] * torch.sqrt(alpha_bar_prev)
            + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        )
        sample = mean_pred + _nonzero_mask(t, x.dim()) * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _ddim_reverse_from_output(self, model_output, x, t, clip_denoised, denoised_fn):
        out = self._p_mean_variance_from_output(model_output, x, t, clip_denoised, denoised_fn)
        c = self._coefs(t, x.dim())
        eps = self._eps_from_xstart(x, c, out["pred_xstart"])
        alpha_bar_next = c.alphas_cumprod_next
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    # ------------------------------------------------------------------------------
    # one step
    # ------------------------------------------------------------------------------

    def p_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        noise=None,
        generator=None,
    ):
        """Sample x_{t-1} ~ p(x_{t-1} | x_t): mean + σ·noise, no noise where t == 0.

        :param noise: optional explicit N(0, I) noise of x's shape.
        :param generator: optional torch.Generator for the noise.
        :return: dict with 'sample' and 'pred_xstart'.
        """
        self._check_x(x)
        self._check_t(t, x.shape[0])
        return self._p_sample(model, x, t, clip_denoised, denoised_fn, model_kwargs, noise,
                              generator)

    def _p_sample(self, model, x, t, clip_denoised, denoised_fn, model_kwargs, noise, generator,
                  need_pred_xstart=True):
        model_output = self._run_model(model, x, t, model_kwargs)
        if self._fused_applies(x, model_output, t, denoised_fn, noise):
            noise = self._fused_noise(x, noise, generator)
            x32, noise32 = self._as_float32(x, noise)
            sample, pred_xstart = ops.p_sample_step(
                x32, model_output, t, self.coef_table(x.device), self.model_mean_type,
                self.model_var_type, clip_denoised, noise=noise32, generator=generator,
                return_pred_xstart=need_pred_xstart)
            return self._fused_result("p_sample", x, model_output, noise, clip_denoised, 0.0,
                                      sample, pred_xstart)
        noise = self._noise_like(x, noise, generator)
        return self._p_sample_from_output(model_output, x, t, clip_denoised, denoised_fn, noise)

    def ddim_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        eta=0.0,
        noise=None,
        generator=None,
    ):
        """Sample x_{t-1} with DDIM (Song et al. eq. 12); ``eta`` = 0 is deterministic.
        Noise is still drawn when eta = 0 (as the reference does) unless ``noise`` is given."""
        self._check_x(x)
        self._check_t(t, x.shape[0])
        return self._ddim_sample(model, x, t, clip_denoised, denoised_fn, model_kwargs, eta, noise,
                                 generator)

    def _ddim_sample(self, model, x, t, clip_denoised, denoised_fn, model_kwargs, eta, noise,
                     generator, need_pred_xstart=True):
        model_output = self._run_model(model, x, t, model_kwargs)
        if isinstance(eta, (int, float)) and self._fused_applies(x, model_output, t, denoised_fn,
                                                                  noise):
            # The reference draws noise even when eta = 0; the default CPU draw keeps that.
            noise = self._fused_noise(x, noise, generator)
            x32, noise32 = self._as_float32(x, noise)
            sample, pred_xstart = ops.ddim_step(
                x32, model_output, t, self.coef_table(x.device), self.model_mean_type,
                self.model_var_type, clip_denoised, eta=float(eta), noise=noise32,
                generator=generator, return_pred_xstart=need_pred_xstart)
            return self._fused_result("ddim", x, model_output, noise, clip_denoised, eta,
                                      sample, pred_xstart)
        noise = self._noise_like(x, noise, generator)
        return self._ddim_from_output(model_output, x, t, clip_denoised, denoised_fn, eta, noise)

    def ddim_reverse_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        eta=0.0,
    ):
        """Deterministic DDIM step from x_t to x_{t+1} (the reverse ODE); eta must be 0."""
        if eta != 0.0:
            raise ValueError(f"eta: the reverse DDIM ODE is deterministic, expected 0.0, got {eta}")
        self._check_x(x)
        self._check_t(t, x.shape[0])
        model_output = self._run_model(model, x, t, model_kwargs)
        if self._fused_applies(x, model_output, t, denoised_fn, None):
            (x32,) = self._as_float32(x)
            sample, pred_xstart = ops.ddim_reverse_step(
                x32, model_output, t, self.coef_table(x.device), self.model_mean_type,
                self.model_var_type, clip_denoised)
            return self._fused_result("ddim_reverse", x, model_output, None, clip_denoised, 0.0,
                                      sample, pred_xstart)
        return self._ddim_reverse_from_output(model_output, x, t, clip_denoised, denoised_fn)

    # ------------------------------------------------------------------------------
    # the loops
    # ------------------------------------------------------------------------------

    def p_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        generator=None,
        step_noise=None,
    ):
        """Generate samples: x_T = ``noise`` (or N(0, I)), then T ancestral steps.

        :param step_noise: optional [T, *shape] tensor; entry t is the noise used at timestep t.
        :return: the final x_0 batch (no grad).
        """
        # As p_sample_loop_progressive, but the fused steps skip writing pred_xstart.
        def step(x, t, step_eps):
            return self._p_sample(model, x, t, clip_denoised, denoised_fn, model_kwargs, step_eps,
                                  generator, need_pred_xstart=False)

        final = None
        for final in self._loop(step, model, shape, noise, device, progress, generator,
                                step_noise):
            pass
        return final["sample"]

    def p_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        generator=None,
        step_noise=None,
    ):
        """Like :meth:`p_sample_loop`, yielding each step's p_sample dict (t = T-1 .. 0)."""
        def step(x, t, step_eps):
            return self._p_sample(model, x, t, clip_denoised, denoised_fn, model_kwargs, step_eps,
                                  generator)

        yield from self._loop(step, model, shape, noise, device, progress, generator, step_noise)

    def ddim_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
        generator=None,
        step_noise=None,
    ):
        """Generate samples with DDIM; same arguments as :meth:`p_sample_loop` plus ``eta``."""
        # As ddim_sample_loop_progressive, but the fused steps skip writing pred_xstart.
        def step(x, t, step_eps):
            return self._ddim_sample(model, x, t, clip_denoised, denoised_fn, model_kwargs, eta,
                                     step_eps, generator, need_pred_xstart=False)

        final = None
        for final in self._loop(step, model, shape, noise, device, progress, generator,
                                step_noise):
            pass
        return final["sample"]

    def ddim_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
        generator=None,
        step_noise=None,
    ):
        """Like :meth:`ddim_sample_loop`, yielding each step's ddim_sample dict."""
        def step(x, t, step_eps):
            return self._ddim_sample(model, x, t, clip_denoised, denoised_fn, model_kwargs, eta,
                                     step_eps, generator)

        yield from self._loop(step, model, shape, noise, device, progress, generator, step_noise)

    def _loop(self, step_fn, model, shape, noise, device, progress, generator, step_noise):
        if not isinstance(shape, (tuple, list)) or len(shape) < 2:
            raise ValueError(f"shape: expected a tuple (N, C, ...), got {shape!r}")
        shape = tuple(int(s) for s in shape)
        if device is None:
            device = _default_device(model, noise)
        if noise is not None:
            if tuple(noise.shape) != shape:
                raise ValueError(f"noise: expected shape {shape} (the sample shape), got {tuple(noise.shape)}")
            img = noise
        elif generator is not None:
            img = torch.randn(*shape, device=device, generator=generator)
        else:
            img = torch.randn(*shape, device=device)
        if step_noise is not None and tuple(step_noise.shape) != (self.num_timesteps, *shape):
            raise ValueError(
                f"step_noise: expected shape {(self.num_timesteps, *shape)} "
                f"([T, *shape], entry t used at timestep t), got {tuple(step_noise.shape)}"
            )
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices)
        for i in indices:
            # A fill kernel, not a host-to-device copy.
            t = torch.full((shape[0],), i, device=img.device, dtype=torch.long)
            with torch.no_grad():
                out = step_fn(img, t, None if step_noise is None else step_noise[i])
                yield out
                img = out["sample"]


def _default_device(model, noise):
    if noise is not None:
        return noise.device
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")
