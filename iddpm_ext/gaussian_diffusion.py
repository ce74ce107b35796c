"""Gaussian diffusion of Improved DDPM, written plainly in PyTorch: the readable reference path.

Names, arguments and semantics follow openai/improved-diffusion's ``gaussian_diffusion.py``
so that its users can switch by changing an import. Every schedule quantity is computed
once in float64 (numpy, the same formulas as the reference; :mod:`iddpm_ext.core.tables`),
then kept on each device as one float32 table of shape [T, K]; a step gathers the K
coefficients of its timesteps with a single op (``iddpm::gather_coefs`` when the extension
is built), so there are no per-step host-to-device copies and no host syncs inside a step.

Sampling goes through one public per-step API, :meth:`GaussianDiffusion.step` (ancestral,
DDIM and reverse-DDIM updates from a model output), which runs the fused step kernels where
they apply and the eager update rules below otherwise (:mod:`iddpm_ext.core.sampling`).

Additions over the reference: :meth:`GaussianDiffusion.step`, :meth:`model_timesteps`,
``noise=`` / ``generator=`` on the sampling functions, ``step_noise=`` on the loops,
``noise=`` on :meth:`GaussianDiffusion.calc_bpd_loop`, and ValueErrors (argument,
expected, received) instead of asserts.

Shapes: x, x_start, x_t: [N, C, ...]; t: [N] integer timesteps in [0, T);
model output: [N, C, ...] or [N, 2C, ...] with learned variances.
"""

from __future__ import annotations

import collections
import enum

import numpy as np
import torch

from .core import sampling
from .core.checks import (
    check_class_labels,
    check_eta,
    check_model_output,
    check_same_shape,
    check_sample_shape,
    check_timesteps,
    check_x,
)
from .core.schedules import betas_for_alpha_bar, get_named_beta_schedule  # noqa: F401  (the reference's names)
from .core.tables import StepCoefs, cached, schedule_arrays, stack_coef_table, step_coefs
from .errors import ArgumentError
from .losses import LN2, discretized_gaussian_log_likelihood, mean_flat, normal_kl


class ModelMeanType(enum.Enum):
    """Which type of output the model predicts."""

    PREVIOUS_X = enum.auto()  # the model predicts x_{t-1}
    START_X = enum.auto()  # the model predicts x_0
    EPSILON = enum.auto()  # the model predicts epsilon


class ModelVarType(enum.Enum):
    """What is used as the model's output variance.

    LEARNED: the model outputs log σ² directly. LEARNED_RANGE: the model outputs v in
    [-1, 1] and log σ² = frac·log β_t + (1-frac)·log β̃_t with frac = (v+1)/2.
    FIXED_SMALL: σ² = β̃_t (posterior variance). FIXED_LARGE: σ² = β_t (β̃_1 at t = 0).
    """

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    MSE = enum.auto()  # raw MSE loss (and KL when learning variances)
    RESCALED_MSE = enum.auto()  # raw MSE loss (with RESCALED_KL when learning variances)
    KL = enum.auto()  # the variational lower bound
    RESCALED_KL = enum.auto()  # like KL, but rescaled to estimate the full VLB

    def is_vb(self):
        return self == LossType.KL or self == LossType.RESCALED_KL


class GaussianDiffusion:
    """Utilities for training and sampling diffusion models (Ho et al. 2020; Nichol &
    Dhariwal 2021).

    :param betas: 1-D array of β_t for t = 0..T-1 (timestep 0 is the first noising step).
    :param model_mean_type: a :class:`ModelMeanType`.
    :param model_var_type: a :class:`ModelVarType`.
    :param loss_type: a :class:`LossType`.
    :param rescale_timesteps: pass float timesteps scaled to [0, 1000) to the model.

    Attribute ``use_fused`` (default from IDDPM_EXT_FUSED, see
    :func:`iddpm_ext.core.sampling.fused_default`): run sampling steps with the fused
    kernels where they apply (:meth:`step`); False keeps the eager path.
    Attribute ``check_timesteps`` (default True): public methods check that t is in [0, T),
    a host read of t (a sync on CUDA, skipped during graph capture and compilation).
    """

    def __init__(
        self,
        *,
        betas,
        model_mean_type,
        model_var_type,
        loss_type,
        rescale_timesteps=False,
    ):
        for name, value, kind in (
            ("model_mean_type", model_mean_type, ModelMeanType),
            ("model_var_type", model_var_type, ModelVarType),
            ("loss_type", loss_type, LossType),
        ):
            if not isinstance(value, kind):
                raise ValueError(f"{name}: expected a {kind.__name__}, got {value!r}")
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps

        arrays = schedule_arrays(betas)  # float64, the reference's formulas
        self.num_timesteps = int(arrays["betas"].shape[0])
        # The reference's numpy attributes, for code that reads them.
        for name in (
            "betas",
            "alphas_cumprod",
            "alphas_cumprod_prev",
            "alphas_cumprod_next",
            "sqrt_alphas_cumprod",
            "sqrt_one_minus_alphas_cumprod",
            "log_one_minus_alphas_cumprod",
            "sqrt_recip_alphas_cumprod",
            "sqrt_recipm1_alphas_cumprod",
            "posterior_variance",
            "posterior_log_variance_clipped",
            "posterior_mean_coef1",
            "posterior_mean_coef2",
        ):
            setattr(self, name, arrays[name])
        self._coef_table_f64 = stack_coef_table(arrays)  # [T, K] float64
        self._coef_tables: dict = {}  # device (as given, and as torch.device) -> [T, K] float32 table
        self._op_type_cache: tuple = (None, None, None)
        self._layout_cache: dict = {}  # strides of eager results per input layout (core.sampling)
        self.check_timesteps = True
        self.use_fused = sampling.fused_default()

    # ------------------------------------------------------------------------------
    # schedule tables on the device
    # ------------------------------------------------------------------------------

    def coef_table(self, device) -> torch.Tensor:
        """The [T, K] float32 coefficient table on ``device`` (made once per device, not kept
        while torch.export traces: :func:`iddpm_ext.core.tables.cached`; column names in
        :data:`iddpm_ext.core.tables.COEF_NAMES`)."""
        table = self._coef_tables.get(device)  # keyed by what callers pass: x.device per step
        if table is None:
            dev = torch.device(device)
            table = cached(
                self._coef_tables,
                dev,
                lambda: torch.from_numpy(self._coef_table_f64).to(torch.float32).to(dev),
            )
            if dev in self._coef_tables:
                self._coef_tables[device] = table
        return table

    def _op_types(self) -> tuple:
        """The model's mean and variance types as the fused ops name them, e.g.
        ("epsilon", "learned_range") (made once, remade if the attributes change)."""
        cached = self._op_type_cache
        if cached[0] is not self.model_mean_type or cached[1] is not self.model_var_type:
            names = (self.model_mean_type.name.lower(), self.model_var_type.name.lower())
            cached = self._op_type_cache = (self.model_mean_type, self.model_var_type, names)
        return cached[2]

    def _coefs(self, t: torch.Tensor, ndim: int) -> StepCoefs:
        return step_coefs(self.coef_table(t.device), t, ndim)

    def _extract(self, name: str, t: torch.Tensor, shape) -> torch.Tensor:
        """One coefficient for each timestep, expanded to ``shape`` (as the reference)."""
        return getattr(self._coefs(t, len(shape)), name).expand(shape)

    def _check_t(self, t, batch: int, name: str = "t"):
        check_timesteps(t, batch, self.num_timesteps, name, read_values=self.check_timesteps)

    def _forward_t(self, t, batch: int):
        """t for the forward-process methods (q_mean_variance, q_sample, q_posterior_mean_variance),
        checked: as the reference's ``_extract_into_tensor`` there, one timestep (shape () or
        (1,)) also serves the whole batch."""
        if isinstance(t, torch.Tensor) and t.dim() <= 1 and t.numel() == 1 and batch != 1:
            t = t.reshape(1).expand(batch)
        self._check_t(t, batch)
        return t

    @property
    def _learned_variance(self) -> bool:
        var_type = self.model_var_type
        return var_type is ModelVarType.LEARNED or var_type is ModelVarType.LEARNED_RANGE

    def _check_model_output(self, model_output, x):
        check_model_output(model_output, x, self._learned_variance, self.model_var_type)

    # ------------------------------------------------------------------------------
    # the forward process
    # ------------------------------------------------------------------------------

    def q_mean_variance(self, x_start, t):
        """q(x_t | x_0) = N(√ᾱ_t x_0, (1-ᾱ_t) I): (mean, variance, log_variance), x_start's shape."""
        check_x(x_start, "x_start")
        t = self._forward_t(t, x_start.shape[0])
        c = self._coefs(t, x_start.dim())
        mean = c.sqrt_alphas_cumprod * x_start
        variance = c.one_minus_alphas_cumprod.expand(x_start.shape)
        log_variance = c.log_one_minus_alphas_cumprod.expand(x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """Sample x_t ~ q(x_t | x_0) = √ᾱ_t x_0 + √(1-ᾱ_t) ε."""
        check_x(x_start, "x_start")
        t = self._forward_t(t, x_start.shape[0])
        if noise is None:
            noise = torch.randn_like(x_start)
        check_same_shape(noise, "noise", x_start, "x_start")
        return self._q_sample(x_start, t, noise)

    def _q_sample(self, x_start, t, noise):
        c = self._coefs(t, x_start.dim())
        return c.sqrt_alphas_cumprod * x_start + c.sqrt_one_minus_alphas_cumprod * noise

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I):
        μ̃_t = coef1·x_0 + coef2·x_t (Ho et al. eq. 7); returns (mean, variance,
        log_variance_clipped), each of x_t's shape."""
        check_x(x_t, "x_t")
        check_same_shape(x_start, "x_start", x_t, "x_t")
        t = self._forward_t(t, x_t.shape[0])
        return self._q_posterior(x_start, x_t, self._coefs(t, x_t.dim()))

    @staticmethod
    def _q_posterior(x_start, x_t, c: StepCoefs):
        mean = c.posterior_mean_coef1 * x_start + c.posterior_mean_coef2 * x_t
        variance = c.posterior_variance.expand(x_t.shape)
        log_variance = c.posterior_log_variance_clipped.expand(x_t.shape)
        return mean, variance, log_variance

    # ------------------------------------------------------------------------------
    # the reverse process
    # ------------------------------------------------------------------------------

    def _scale_timesteps(self, t):
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The timesteps the model is given for this process's timesteps ``t`` [N]: t itself,
        or t scaled to [0, 1000) with ``rescale_timesteps`` (respaced processes map t to the
        original process's timesteps first). Elementwise on t's device, no host sync."""
        return self._scale_timesteps(t)

    def _run_model(self, model, x, t, model_kwargs):
        """model(x, timesteps as the model expects them, **model_kwargs)."""
        return model(x, self.model_timesteps(t), **(model_kwargs or {}))

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """Apply the model to get p(x_{t-1} | x_t) and a prediction of x_0.

        :return: dict with 'mean', 'variance', 'log_variance', 'pred_xstart' (x's shape).
        """
        check_x(x)
        self._check_t(t, x.shape[0])
        return self._p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)

    def _p_mean_variance(self, model, x, t, clip_denoised, denoised_fn, model_kwargs):
        model_output = self._run_model(model, x, t, model_kwargs)
        return self._p_mean_variance_from_output(model_output, x, t, clip_denoised, denoised_fn)

    def _p_mean_variance_from_output(self, model_output, x, t, clip_denoised, denoised_fn):
        self._check_model_output(model_output, x)
        C = x.shape[1]
        c = self._coefs(t, x.dim())

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = model_var_values
                model_variance = torch.exp(model_log_variance)
            else:
                min_log = c.posterior_log_variance_clipped  # log β̃_t (clipped at t = 0)
                max_log = c.log_betas  # log β_t of this (possibly respaced) process
                frac = (model_var_values + 1) / 2  # v in [-1, 1] -> [0, 1]
                model_log_variance = frac * max_log + (1 - frac) * min_log
                model_variance = torch.exp(model_log_variance)
        elif self.model_var_type == ModelVarType.FIXED_LARGE:
            # β_t, with β̃_1 at t = 0 for a better decoder log likelihood.
            model_variance = c.fixed_large_variance.expand(x.shape)
            model_log_variance = c.fixed_large_log_variance.expand(x.shape)
        else:  # FIXED_SMALL
            model_variance = c.posterior_variance.expand(x.shape)
            model_log_variance = c.posterior_log_variance_clipped.expand(x.shape)

        def process_xstart(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            if clip_denoised:
                return x0.clamp(-1, 1)
            return x0

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._xstart_from_xprev(x, c, model_output))
            model_mean = model_output
        elif self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = process_xstart(model_output)
            model_mean = self._q_posterior(pred_xstart, x, c)[0]
        else:  # EPSILON
            pred_xstart = process_xstart(self._xstart_from_eps(x, c, model_output))
            model_mean = self._q_posterior(pred_xstart, x, c)[0]

        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
        }

    # x_0 = x_t/√ᾱ_t - √(1/ᾱ_t - 1)·ε
    @staticmethod
    def _xstart_from_eps(x_t, c: StepCoefs, eps):
        return c.sqrt_recip_alphas_cumprod * x_t - c.sqrt_recipm1_alphas_cumprod * eps

    # x_0 = (x_{t-1} - coef2·x_t) / coef1
    @staticmethod
    def _xstart_from_xprev(x_t, c: StepCoefs, xprev):
        return c.recip_posterior_mean_coef1 * xprev - c.posterior_mean_coef2_over_coef1 * x_t

    # ε = (x_t/√ᾱ_t - x_0) / √(1/ᾱ_t - 1)
    @staticmethod
    def _eps_from_xstart(x_t, c: StepCoefs, pred_xstart):
        return (c.sqrt_recip_alphas_cumprod * x_t - pred_xstart) / c.sqrt_recipm1_alphas_cumprod

    def _predict_xstart_from_eps(self, x_t, t, eps):
        check_same_shape(eps, "eps", x_t, "x_t")
        return self._xstart_from_eps(x_t, self._coefs(t, x_t.dim()), eps)

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        check_same_shape(xprev, "xprev", x_t, "x_t")
        return self._xstart_from_xprev(x_t, self._coefs(t, x_t.dim()), xprev)

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return self._eps_from_xstart(x_t, self._coefs(t, x_t.dim()), pred_xstart)

    # ------------------------------------------------------------------------------
    # the reverse-process updates, eager (the readable reference math)
    # ------------------------------------------------------------------------------

    def _p_sample_from_output(self, model_output, x, t, clip_denoised, denoised_fn, noise):
        out = self._p_mean_variance_from_output(model_output, x, t, clip_denoised, denoised_fn)
        nonzero_mask = sampling.nonzero_mask(t, x.dim())
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
        # With eta = 1 and a long jump (ᾱ_prev ≈ 1, ᾱ_t ≈ 0) the float32 radicand, exactly
        # (1-ᾱ_prev)²·ᾱ_t/(ᾱ_prev(1-ᾱ_t)) >= 0, can round below 0: clamp it (the reference gives
        # NaN there; elsewhere the clamp changes no bit). eta > 1 is refused (check_eta).
        mean_pred = (
            out["pred_xstart"] * torch.sqrt(alpha_bar_prev)
            + torch.sqrt((1 - alpha_bar_prev - sigma**2).clamp_min(0)) * eps
        )
        sample = mean_pred + sampling.nonzero_mask(t, x.dim()) * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _ddim_reverse_from_output(self, model_output, x, t, clip_denoised, denoised_fn):
        out = self._p_mean_variance_from_output(model_output, x, t, clip_denoised, denoised_fn)
        c = self._coefs(t, x.dim())
        eps = self._eps_from_xstart(x, c, out["pred_xstart"])
        alpha_bar_next = c.alphas_cumprod_next
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def _eager_update(self, kind, model_output, x, t, clip_denoised, denoised_fn, eta, noise):
        if kind == "ancestral":
            return self._p_sample_from_output(model_output, x, t, clip_denoised, denoised_fn, noise)
        if kind == "ddim":
            return self._ddim_from_output(model_output, x, t, clip_denoised, denoised_fn, eta, noise)
        return self._ddim_reverse_from_output(model_output, x, t, clip_denoised, denoised_fn)

    # ------------------------------------------------------------------------------
    # one step from a model output: the one per-step API
    # ------------------------------------------------------------------------------

    def step(self, kind, model_output, x, t, *, clip_denoised=True, denoised_fn=None, eta=0.0, noise=None,
             generator=None, sample_index=None, fused=None, pred_xstart=True):  # fmt: skip
        """One reverse-process update from a model output, as one fused kernel where it
        applies (:mod:`iddpm_ext.core.sampling`), else with the eager math above.

        :param kind: ``"ancestral"`` (x_{t-1} ~ p(x_{t-1} | x_t), :meth:`p_sample`'s rule),
            ``"ddim"`` (:meth:`ddim_sample`'s, with ``eta``) or ``"ddim_reverse"`` (x_t ->
            x_{t+1}, deterministic).
        :param model_output: the model's output at (x, t): [N, C, ...] or [N, 2C, ...].
        :param x: x_t, [N, C, ...]. :param t: [N] integer timesteps of this process.
        :param noise: explicit N(0, I) noise of x's shape. When None, noise is drawn: on CPU
            without ``generator`` and ``sample_index`` with ``torch.randn_like(x)`` (as the
            reference), otherwise in the kernel from ``generator`` (default: the device's).
            DDIM draws noise even when eta = 0, as the reference does.
        :param sample_index: the global sample index of each item ([N] integer tensor on x's
            device, or an int k: items are samples k .. k+N-1), keying its in-kernel noise
            stream (docs/step.md); needs the fused op.
        :param fused: None: the fused op where it applies and ``use_fused`` is on; True: the
            fused op (ValueError saying why when it cannot run); False: the eager math.
        :param pred_xstart: False lets the fused op skip writing x_0 (then None in the result).
        :return: dict with 'sample' and 'pred_xstart' (float32 for fp16/bf16 x, as the eager math).
        """
        sampling.check_kind(kind)
        check_x(x)
        self._check_t(t, x.shape[0])
        if kind == "ddim_reverse" and eta != 0.0:
            raise ArgumentError(f"eta: the reverse DDIM ODE is deterministic, expected 0.0, got {eta}")
        if kind == "ddim":
            eta = check_eta(eta)
        return self._step(kind, model_output, x, t, clip_denoised, denoised_fn, eta, noise, generator,
                          sample_index, fused, pred_xstart)  # fmt: skip

    def _half_output_math(self, kind, model_output) -> bool:
        """True where the reference does part of the step in a float16 / bfloat16 model
        output's own precision, which the fused op (float32 throughout) does not: a learned
        variance's (v + 1) / 2 or exp(0.5·v) in an ancestral step, and a START_X model's x_0
        (returned in the model's dtype). The default path is then the eager one, as the
        reference; ``fused=True`` still runs the op."""
        if model_output.dtype not in (torch.float16, torch.bfloat16):
            return False
        learned = self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)
        return (kind == "ancestral" and learned) or self.model_mean_type == ModelMeanType.START_X

    def _step(self, kind, model_output, x, t, clip_denoised, denoised_fn=None, eta=0.0, noise=None,
              generator=None, sample_index=None, fused=None, pred_xstart=True):  # fmt: skip
        """:meth:`step` after the checks of x and t."""
        if noise is not None:
            check_same_shape(noise, "noise", x, "x")
        self._check_model_output(model_output, x)
        blocker = sampling.fused_blocker(x, model_output, t, denoised_fn, noise)
        if fused is None:
            fused = (
                self.use_fused
                and blocker is None
                and isinstance(eta, (int, float))
                and not self._half_output_math(kind, model_output)
            )
        elif fused and blocker is not None:
            raise ValueError(f"fused: the fused step cannot run here: {blocker}")
        if fused:

            def eager_update(mo, xx, tt, nn):  # the layout oracle: this rule on meta tensors
                return self._eager_update(kind, mo, xx, tt, clip_denoised, None, eta, nn)

            table, types = self.coef_table(x.device), self._op_types()
            return sampling.fused_update(kind, model_output, x, t, table, types, clip_denoised, eta, noise,
                                         generator, sample_index, pred_xstart, self._layout_cache,
                                         eager_update)  # fmt: skip
        if sample_index is not None and noise is None and kind != "ddim_reverse":
            raise ValueError(
                "sample_index: per-sample noise streams are drawn in the fused kernel, which "
                "does not run here (give noise, or let the fused op run)"
            )
        if kind != "ddim_reverse" and noise is None:
            noise = sampling.eager_noise(x, generator)
        return self._eager_update(kind, model_output, x, t, clip_denoised, denoised_fn, eta, noise)

    # ------------------------------------------------------------------------------
    # sampling with a model: the reference's methods (signatures laid out as the reference's)
    # ------------------------------------------------------------------------------

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, noise=None,
                 generator=None):  # fmt: skip
        """Sample x_{t-1} ~ p(x_{t-1} | x_t): mean + σ·noise, no noise where t == 0.

        :param noise: optional explicit N(0, I) noise of x's shape.
        :param generator: optional torch.Generator for the noise.
        :return: dict with 'sample' and 'pred_xstart'.
        """
        model_output = self._checked_model_output(model, x, t, model_kwargs)
        return self._step("ancestral", model_output, x, t, clip_denoised, denoised_fn, 0.0, noise, generator)

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0,
                    noise=None, generator=None):  # fmt: skip
        """Sample x_{t-1} with DDIM (Song et al. eq. 12); ``eta`` = 0 is deterministic.
        Noise is still drawn when eta = 0 (as the reference does) unless ``noise`` is given."""
        eta = check_eta(eta)
        model_output = self._checked_model_output(model, x, t, model_kwargs)
        return self._step("ddim", model_output, x, t, clip_denoised, denoised_fn, eta, noise, generator)

    def ddim_reverse_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                            eta=0.0):  # fmt: skip
        """Deterministic DDIM step from x_t to x_{t+1} (the reverse ODE); eta must be 0."""
        if eta != 0.0:
            raise ArgumentError(f"eta: the reverse DDIM ODE is deterministic, expected 0.0, got {eta}")
        model_output = self._checked_model_output(model, x, t, model_kwargs)
        return self._step("ddim_reverse", model_output, x, t, clip_denoised, denoised_fn)

    def _checked_model_output(self, model, x, t, model_kwargs):
        check_x(x)
        self._check_t(t, x.shape[0])
        return self._run_model(model, x, t, model_kwargs)

    # ------------------------------------------------------------------------------
    # the sampling loops (one timestep loop: _loop; each passes on every argument as given)
    # ------------------------------------------------------------------------------

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                      device=None, progress=False, generator=None, step_noise=None):  # fmt: skip
        """Generate samples: x_T = ``noise`` (or N(0, I)), then T ancestral steps.

        :param step_noise: optional [T, *shape] tensor (entry t is the noise used at timestep
            t), or a callable t -> [*shape] noise tensor (None: drawn).
        :return: the final x_0 batch (no grad).
        """
        return self._final(self._loop("ancestral", **_arguments(locals()), pred_xstart=False))

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                  model_kwargs=None, device=None, progress=False, generator=None,
                                  step_noise=None):  # fmt: skip
        """Like :meth:`p_sample_loop`, yielding each step's p_sample dict (t = T-1 .. 0)."""
        yield from self._loop("ancestral", **_arguments(locals()))

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                         model_kwargs=None, device=None, progress=False, eta=0.0, generator=None,
                         step_noise=None):  # fmt: skip
        """Generate samples with DDIM; same arguments as :meth:`p_sample_loop` plus ``eta``."""
        return self._final(self._loop("ddim", **_arguments(locals()), pred_xstart=False))

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                     model_kwargs=None, device=None, progress=False, eta=0.0,
                                     generator=None, step_noise=None):  # fmt: skip
        """Like :meth:`ddim_sample_loop`, yielding each step's ddim_sample dict."""
        yield from self._loop("ddim", **_arguments(locals()))

    @staticmethod
    def _final(steps):
        return collections.deque(steps, maxlen=1)[0]["sample"]  # run the loop, keep its last step

    def _loop(self, kind, model, shape, noise, clip_denoised, denoised_fn, model_kwargs, device, progress,
              generator, step_noise, eta=0.0, pred_xstart=True):  # fmt: skip
        """x_T, then one step per timestep T-1 .. 0, yielding each step's dict. Its timesteps
        are valid by construction, so the steps skip the host read of t."""
        shape = check_sample_shape(shape)
        if kind == "ddim":
            eta = check_eta(eta)
        check_class_labels(model, model_kwargs, shape[0])
        if device is None:
            device = sampling.default_device(model, noise)
        img = sampling.initial_noise(shape, noise, device, generator)
        noise_at = sampling.step_noise_source(step_noise, self.num_timesteps, shape)
        for i in sampling.descending(self.num_timesteps, progress):
            t = torch.full((shape[0],), i, device=img.device, dtype=torch.long)  # a fill, not a copy
            with torch.no_grad():
                model_output = self._run_model(model, img, t, model_kwargs)
                out = self._step(kind, model_output, img, t, clip_denoised, denoised_fn, eta, noise_at(i),
                                 generator, pred_xstart=pred_xstart)  # fmt: skip
                yield out
                img = out["sample"]

    # ------------------------------------------------------------------------------
    # the variational bound and training losses
    # ------------------------------------------------------------------------------

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """One term of the variational bound, in bits per dimension: the decoder NLL
        -log p(x_0 | x_1) where t == 0, else KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)).

        :return: dict with 'output' ([N] bits) and 'pred_xstart'.
        """
        check_x(x_t, "x_t")
        check_same_shape(x_start, "x_start", x_t, "x_t")
        self._check_t(t, x_t.shape[0])
        model_output = self._run_model(model, x_t, t, model_kwargs)
        return self._vb_terms_from_output(model_output, x_start, x_t, t, clip_denoised)

    def _vb_terms_from_output(self, model_output, x_start, x_t, t, clip_denoised):
        c = self._coefs(t, x_t.dim())
        true_mean, _, true_log_variance_clipped = self._q_posterior(x_start, x_t, c)
        out = self._p_mean_variance_from_output(model_output, x_t, t, clip_denoised, None)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / LN2

        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / LN2

        output = torch.where((t == 0), decoder_nll, kl)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def _noised(self, x_start, t, noise):
        """The checked (noise, x_t ~ q(x_t | x_0)) of a loss or bound term (noise: fresh N(0, I)
        when None)."""
        check_x(x_start, "x_start")
        self._check_t(t, x_start.shape[0])
        if noise is None:
            noise = torch.randn_like(x_start)
        check_same_shape(noise, "noise", x_start, "x_start")
        return noise, self._q_sample(x_start, t, noise)

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Training losses for one timestep per batch item.

        MSE / RESCALED_MSE: 'mse' = mean_flat((target - prediction)²), the target being ε,
        x_0 or μ̃ by the mean type; with learned variances also 'vb', the bound term with
        the mean detached (the hybrid objective L_simple + λ·L_vlb; RESCALED_MSE scales
        'vb' by T/1000, i.e. λ = 0.001 for T = 1000 after the RESCALED_KL-like ×T).
        KL / RESCALED_KL: the bound term (×T for RESCALED_KL).

        :return: dict with 'loss' ([N]) and 'mse' / 'vb' where they apply.
        """
        noise, x_t = self._noised(x_start, t, noise)

        terms = {}
        if self.loss_type.is_vb():
            model_output = self._run_model(model, x_t, t, model_kwargs)
            terms["loss"] = self._vb_terms_from_output(model_output, x_start, x_t, t, clip_denoised=False)[
                "output"
            ]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        model_output = self._run_model(model, x_t, t, model_kwargs)
        self._check_model_output(model_output, x_t)
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            C = x_t.shape[1]
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            # Learn the variance with the bound, but don't let it move the mean.
            frozen_out = torch.cat([model_output.detach(), model_var_values], dim=1)
            terms["vb"] = self._vb_terms_from_output(frozen_out, x_start, x_t, t, clip_denoised=False)[
                "output"
            ]
            if self.loss_type == LossType.RESCALED_MSE:
                # Divide by 1000 for equivalence with the initial implementation.
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            target = self._q_posterior(x_start, x_t, self._coefs(t, x_t.dim()))[0]
        elif self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        else:
            target = noise
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def bpd_terms(self, model, x_start, t, noise=None, clip_denoised=True, model_kwargs=None):
        """Each item's term of the variational bound at its own timestep t, in bits per
        dimension ([N]): the decoder NLL -log p(x_0 | x_1) where t == 0, else
        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)), at x_t ~ q(x_t | x_0) drawn with ``noise``
        (default: fresh N(0, I)). :meth:`calc_bpd_loop`'s total is the sum of these over every t
        plus :meth:`prior_bpd`; iddpm_ext.evaluation.likelihood estimates it from a few."""
        noise, x_t = self._noised(x_start, t, noise)
        model_output = self._run_model(model, x_t, t, model_kwargs)
        return self._vb_terms_from_output(model_output, x_start, x_t, t, clip_denoised)["output"]

    def _prior_bpd(self, x_start):
        return self.prior_bpd(x_start)

    def prior_bpd(self, x_start):
        """KL(q(x_T | x_0) || N(0, I)) in bits per dimension, [N]: the bound's last term."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        c = self._coefs(t, x_start.dim())
        qt_mean = c.sqrt_alphas_cumprod * x_start
        qt_log_variance = c.log_one_minus_alphas_cumprod.expand(x_start.shape)
        kl_prior = normal_kl(mean1=qt_mean, logvar1=qt_log_variance, mean2=0.0, logvar2=0.0)
        return mean_flat(kl_prior) / LN2

    def calc_bpd_loop(
        self, model, x_start, clip_denoised=True, model_kwargs=None, noise=None, progress=False
    ):
        """The whole variational bound in bits per dimension, and related quantities.

        :param noise: optional [T, *x_start.shape] tensor; entry t is the noise used to
            draw x_t at timestep t. Default: fresh N(0, I) per timestep, drawn as the
            reference draws it.
        :return: dict with 'total_bpd' [N], 'prior_bpd' [N], and [N, T] tensors 'vb',
            'xstart_mse', 'mse' whose column j holds timestep T-1-j (the reference's order).
        """
        check_x(x_start, "x_start")
        if noise is not None and tuple(noise.shape) != (self.num_timesteps, *x_start.shape):
            raise ValueError(
                f"noise: expected shape {(self.num_timesteps, *x_start.shape)} "
                f"([T, *x_start.shape], entry t used at timestep t), got {tuple(noise.shape)}"
            )
        device = x_start.device
        batch_size = x_start.shape[0]

        vb, xstart_mse, mse = [], [], []
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices)
        for t in indices:
            t_batch = torch.full((batch_size,), t, device=device, dtype=torch.long)
            eps_true = torch.randn_like(x_start) if noise is None else noise[t]
            x_t = self._q_sample(x_start, t_batch, eps_true)
            with torch.no_grad():
                model_output = self._run_model(model, x_t, t_batch, model_kwargs)
                out = self._vb_terms_from_output(model_output, x_start, x_t, t_batch, clip_denoised)
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t_batch, out["pred_xstart"])
            mse.append(mean_flat((eps - eps_true) ** 2))

        vb = torch.stack(vb, dim=1)
        xstart_mse = torch.stack(xstart_mse, dim=1)
        mse = torch.stack(mse, dim=1)

        prior_bpd = self.prior_bpd(x_start)
        total_bpd = vb.sum(dim=1) + prior_bpd
        return {
            "total_bpd": total_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb,
            "xstart_mse": xstart_mse,
            "mse": mse,
        }


def _arguments(values: dict) -> dict:
    """A method's arguments from its ``locals()``, without ``self``."""
    return {k: v for k, v in values.items() if k != "self"}


def _extract_into_tensor(arr, timesteps, broadcast_shape):
    """Values of a 1-D numpy array at ``timesteps``, as float32 of ``broadcast_shape``
    (the reference's helper, for code that imports it)."""
    res = torch.from_numpy(np.asarray(arr)).to(device=timesteps.device)[timesteps].float()
    while len(res.shape) < len(broadcast_shape):
        res = res[..., None]
    return res.expand(broadcast_shape)
