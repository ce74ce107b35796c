"""A scheduler with the conventions of Hugging Face diffusers, running our fused steps.

``IDDPMScheduler`` lets a diffusers-style loop drive an Improved-DDPM model::

    sched = IDDPMScheduler(num_train_timesteps=4000, beta_schedule="cosine",
                           variance_type="learned_range")
    sched.set_timesteps(50, device="cuda")
    x = torch.randn(shape, device="cuda") * sched.init_noise_sigma
    for t in sched.timesteps:
        out = model(sched.scale_model_input(x, t), sched.model_timesteps(t))
        x = sched.step(out, t, x, generator=g).prev_sample

It needs no diffusers install: the names (``set_timesteps``, ``timesteps``,
``init_noise_sigma``, ``scale_model_input``, ``step(model_output, timestep, sample,
generator=None, return_dict=True)`` returning ``prev_sample`` and
``pred_original_sample``, ``add_noise``, ``config``, ``order``) follow diffusers'
DDPMScheduler / DDIMScheduler; the arithmetic is ours. ``step`` runs the update of
:meth:`GaussianDiffusion.p_sample` (or ``ddim_sample`` with ``sampler="ddim"``) on the
respaced process, which is one fused kernel (iddpm::p_sample_step / ddim_step) where it
applies, so the loop above gives the samples of ``diffusion.p_sample_loop`` with the same
model, x_T and generator (tested).

Differences from diffusers to know about:
- ``set_timesteps(n)`` keeps the timesteps improved-diffusion's respacing keeps
  (:func:`iddpm_ext.respace.space_timesteps` with ``str(n)``, or ``"ddimN"``), not
  diffusers' "leading"/"trailing" spacing; the respaced process's β follow from the kept ᾱ.
- ``timesteps`` are original-process timesteps (as in diffusers). A model trained with
  ``rescale_timesteps=True`` expects them scaled to [0, 1000): pass
  ``sched.model_timesteps(t)`` to the model (the identity when rescaling is off).
- Noise: ``generator`` → in-kernel Philox noise from that generator (as
  ``p_sample(..., generator=g)``); no generator → on CPU ``torch.randn_like`` from the
  global RNG, on CUDA in-kernel Philox noise from the default CUDA generator (as
  ``p_sample``); ``variance_noise`` → that exact noise.
- A ``timestep`` given as a Python int or CPU tensor is checked against ``timesteps`` (a
  ValueError names it); a CUDA tensor is looked up on the device (no host sync), and a
  value that is not one of ``timesteps`` is not detected.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..core.checks import check_eta
from ..core.schedules import get_named_beta_schedule
from ..gaussian_diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType
from ..respace import SpacedDiffusion, space_timesteps

_VARIANCE_TYPES = {
    "fixed_small": ModelVarType.FIXED_SMALL,
    "fixed_large": ModelVarType.FIXED_LARGE,
    "learned": ModelVarType.LEARNED,
    "learned_range": ModelVarType.LEARNED_RANGE,
}
_PREDICTION_TYPES = {"epsilon": ModelMeanType.EPSILON, "sample": ModelMeanType.START_X}
_SAMPLERS = ("ancestral", "ddim")


@dataclass
class IDDPMSchedulerOutput:
    """What :meth:`IDDPMScheduler.step` returns (diffusers' DDPMSchedulerOutput fields)."""

    prev_sample: torch.Tensor  # x_{t-1}: [B, C, *spatial]
    pred_original_sample: torch.Tensor  # the model's x_0 estimate (clipped if clip_sample)

    def __getitem__(self, i):
        return (self.prev_sample, self.pred_original_sample)[i]

    def to_tuple(self):
        return (self.prev_sample, self.pred_original_sample)


class _Config(dict):
    """The constructor arguments, readable as attributes (diffusers' ``scheduler.config``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class IDDPMScheduler:
    """Improved-DDPM sampling steps behind diffusers' scheduler interface.

    :param num_train_timesteps: T of the trained (original) process.
    :param beta_schedule: ``"linear"`` or ``"cosine"`` (improved-diffusion's names; diffusers'
        ``"squaredcos_cap_v2"`` is accepted for cosine). Ignored when ``trained_betas``.
    :param trained_betas: explicit β_1..β_T (array-like of length T).
    :param variance_type: ``"learned_range"`` (model output [B, 2C, ...]), ``"learned"``,
        ``"fixed_small"`` or ``"fixed_large"``.
    :param prediction_type: ``"epsilon"`` or ``"sample"`` (x_0).
    :param clip_sample: clip the x_0 estimate to [-1, 1].
    :param rescale_timesteps: the model takes timesteps scaled to [0, 1000)
        (see :meth:`model_timesteps`).
    :param sampler: ``"ancestral"`` (DDPM) or ``"ddim"``; ``eta``: DDIM's η (``step`` may override).
    """

    order = 1
    init_noise_sigma = 1.0

    def __init__(
        self,
        num_train_timesteps=1000,
        beta_schedule="linear",
        trained_betas=None,
        variance_type="learned_range",
        prediction_type="epsilon",
        clip_sample=True,
        rescale_timesteps=False,
        sampler="ancestral",
        eta=0.0,
    ):
        if variance_type not in _VARIANCE_TYPES:
            raise ValueError(
                f"variance_type: expected one of {sorted(_VARIANCE_TYPES)}, got {variance_type!r}"
            )
        if prediction_type not in _PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type: expected one of {sorted(_PREDICTION_TYPES)}, got {prediction_type!r}"
            )
        if sampler not in _SAMPLERS:
            raise ValueError(f"sampler: expected one of {_SAMPLERS}, got {sampler!r}")
        eta = check_eta(eta)
        if trained_betas is not None:
            betas = np.asarray(trained_betas, dtype=np.float64)
            if betas.ndim != 1 or betas.shape[0] != int(num_train_timesteps):
                raise ValueError(
                    f"trained_betas: expected {num_train_timesteps} values, got shape {betas.shape}"
                )
        else:
            name = "cosine" if beta_schedule == "squaredcos_cap_v2" else beta_schedule
            betas = get_named_beta_schedule(name, num_train_timesteps)
        self.config = _Config(
            num_train_timesteps=int(num_train_timesteps),
            beta_schedule=beta_schedule,
            trained_betas=None if trained_betas is None else betas.tolist(),
            variance_type=variance_type,
            prediction_type=prediction_type,
            clip_sample=bool(clip_sample),
            rescale_timesteps=bool(rescale_timesteps),
            sampler=sampler,
            eta=float(eta),
        )
        self._betas = betas
        self._types = dict(
            model_mean_type=_PREDICTION_TYPES[prediction_type],
            model_var_type=_VARIANCE_TYPES[variance_type],
            loss_type=LossType.MSE,
        )
        self.base = GaussianDiffusion(betas=betas, rescale_timesteps=bool(rescale_timesteps), **self._types)
        self.num_inference_steps = None
        self.set_timesteps(int(num_train_timesteps))

    @classmethod
    def from_diffusion(cls, diffusion, sampler="ancestral", eta=0.0, clip_sample=True):
        """A scheduler over the process of one of our diffusions (a GaussianDiffusion, or a
        SpacedDiffusion that keeps every step, whose β are recomputed from its ᾱ)."""
        if isinstance(diffusion, SpacedDiffusion) and (
            len(diffusion.timestep_map) != diffusion.original_num_steps
        ):
            raise ValueError(
                "diffusion: a respaced diffusion does not keep the original process's betas; "
                "build the scheduler from num_train_timesteps and beta_schedule/trained_betas"
            )
        if not isinstance(diffusion, GaussianDiffusion):
            raise ValueError(f"diffusion: expected a GaussianDiffusion, got {type(diffusion).__name__}")
        variance = {v: k for k, v in _VARIANCE_TYPES.items()}[diffusion.model_var_type]
        prediction = {v: k for k, v in _PREDICTION_TYPES.items()}.get(diffusion.model_mean_type)
        if prediction is None:
            raise ValueError(
                f"diffusion: model_mean_type {diffusion.model_mean_type.name} has no "
                "diffusers prediction_type"
            )
        return cls(
            num_train_timesteps=diffusion.num_timesteps,
            trained_betas=diffusion.betas,
            variance_type=variance,
            prediction_type=prediction,
            clip_sample=clip_sample,
            rescale_timesteps=diffusion.rescale_timesteps,
            sampler=sampler,
            eta=eta,
        )

    def __len__(self):
        return self.config.num_train_timesteps

    # -- timesteps -----------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None):
        """Keep ``num_inference_steps`` of the original timesteps (improved-diffusion's
        respacing of ``str(n)``; a string such as ``"ddim50"`` or ``"10,20"`` is passed to
        space_timesteps as it is) or exactly the given ``timesteps``."""
        T = self.config.num_train_timesteps
        if timesteps is not None:
            keep = {int(v) for v in (timesteps.tolist() if torch.is_tensor(timesteps) else timesteps)}
        else:
            if num_inference_steps is None:
                raise ValueError("num_inference_steps: give it or timesteps")
            spec = (
                num_inference_steps if isinstance(num_inference_steps, str) else str(int(num_inference_steps))
            )
            keep = space_timesteps(T, spec)
        self.process = SpacedDiffusion(
            keep, betas=self._betas, rescale_timesteps=self.config.rescale_timesteps, **self._types
        )
        # The respaced process without the model wrapper: step() hands it the model output.
        # Its timesteps are indices into timestep_map, valid by construction: no host read.
        self._steps = GaussianDiffusion(betas=self.process.betas, **self._types)
        self._steps.check_timesteps = False
        self._index = {t: i for i, t in enumerate(self.process.timestep_map)}
        self._map_on: dict[str, torch.Tensor] = {}
        self.num_inference_steps = len(self.process.timestep_map)
        device = torch.device("cpu") if device is None else torch.device(device)
        self.timesteps = torch.tensor(self.process.timestep_map[::-1], dtype=torch.long, device=device)

    def model_timesteps(self, timestep):
        """The timestep(s) to give the model: ``timestep`` itself, or scaled to [0, 1000)
        when ``rescale_timesteps`` (improved-diffusion's convention)."""
        if not self.config.rescale_timesteps:
            return timestep
        t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
        return t.float() * (1000.0 / self.config.num_train_timesteps)

    def scale_model_input(self, sample, timestep=None):
        """Identity (the DDPM family does not scale the model input)."""
        return sample

    def _step_index(self, timestep, batch: int, device) -> torch.Tensor:
        """[B] int64 indices into the respaced process for ``timestep`` (original values)."""
        if torch.is_tensor(timestep) and timestep.device.type != "cpu":
            idx = self._device_index(timestep, device)
        else:
            values = timestep.reshape(-1).tolist() if torch.is_tensor(timestep) else [timestep]
            try:
                rows = [self._index[int(v)] for v in values]
            except (KeyError, TypeError, ValueError):
                raise ValueError(
                    f"timestep: expected one of the scheduler's timesteps (set_timesteps kept "
                    f"{self.num_inference_steps} of {len(self)}), got {timestep!r}"
                ) from None
            idx = torch.tensor(rows, dtype=torch.long).to(device)
        if idx.numel() not in (1, batch):
            raise ValueError(f"timestep: expected a scalar or {batch} values, got {idx.numel()}")
        return idx.expand(batch).contiguous()

    def _device_index(self, timestep: torch.Tensor, device) -> torch.Tensor:
        """Indices of original timesteps looked up on the device (searchsorted in the sorted
        timestep map; no host sync, so values outside ``timesteps`` go undetected)."""
        ts = timestep.reshape(-1).to(device=device, dtype=torch.long)
        key = str(device)
        if key not in self._map_on:
            self._map_on[key] = torch.tensor(self.process.timestep_map, dtype=torch.long, device=device)
        return torch.searchsorted(self._map_on[key], ts)

    # -- the step ------------------------------------------------------------------------
    def step(
        self, model_output, timestep, sample, generator=None, return_dict=True, eta=None, variance_noise=None
    ):
        """x_{t-1} from the model output at original timestep ``timestep``.

        :param model_output: [B, C, ...] ([B, 2C, ...] for the learned variance types).
        :param sample: x_t, [B, C, ...].
        :param eta: DDIM's η for this call (default: the constructor's).
        :param variance_noise: explicit noise of x's shape (exact reproducibility).
        :return: IDDPMSchedulerOutput(prev_sample, pred_original_sample), or that tuple.
        """
        if not torch.is_tensor(sample) or sample.dim() < 2:
            raise ValueError(
                f"sample: expected a tensor [B, C, ...], got "
                f"{tuple(sample.shape) if torch.is_tensor(sample) else type(sample).__name__}"
            )
        t = self._step_index(timestep, sample.shape[0], sample.device)
        if self.config.sampler == "ancestral":
            if eta not in (None, 0, 0.0):
                raise ValueError(f"eta: ancestral sampling has no eta, got {eta}")
            eta = 0.0
        else:
            eta = self.config.eta if eta is None else check_eta(eta)
        with torch.no_grad():
            out = self._steps.step(
                self.config.sampler,
                model_output,
                sample,
                t,
                clip_denoised=self.config.clip_sample,
                eta=eta,
                noise=variance_noise,
                generator=generator,
            )
        result = IDDPMSchedulerOutput(out["sample"], out["pred_xstart"])
        return result if return_dict else result.to_tuple()

    def add_noise(self, original_samples, noise, timesteps):
        """q(x_t | x_0) at original-process ``timesteps`` ([B] or a scalar):
        √ᾱ_t·x_0 + √(1-ᾱ_t)·noise."""
        B = original_samples.shape[0]
        t = torch.as_tensor(timesteps, device=original_samples.device).long().reshape(-1)
        if t.numel() == 1:
            t = t.expand(B).contiguous()
        return self.base.q_sample(original_samples, t, noise)
