"""A scheduler with the conventions of Hugging Face diffusers, running our fused steps.

``IDDPMScheduler`` takes ``DDPMScheduler``'s arguments and config and steps an
Improved-DDPM model the way :meth:`GaussianDiffusion.p_sample` does::

    sched = IDDPMScheduler(num_train_timesteps=4000, beta_schedule="squaredcos_cap_v2",
                           variance_type="learned_range")      # or IDDPMScheduler.from_config(...)
    sched.set_timesteps(50, device="cuda")
    x = torch.randn(shape, device="cuda") * sched.init_noise_sigma
    for t in sched.timesteps:
        out = model(sched.scale_model_input(x, t), sched.model_timesteps(t))
        x = sched.step(out, t, x, generator=g).prev_sample

With diffusers installed it is a ``diffusers.SchedulerMixin`` / ``ConfigMixin``
(``config``, ``from_config``, ``save_pretrained``, ``from_pretrained``, a component of
``DDPMPipeline``); without it the same class works with a small stand-in for those
(``config``, ``from_config``, ``save_pretrained`` / ``from_pretrained`` of
``scheduler_config.json``). ``import iddpm_ext`` never imports diffusers: this module is
loaded on first use of ``IDDPMScheduler``.

The arguments are ``DDPMScheduler``'s (same names, defaults and meaning; a value this
scheduler cannot honour raises a ValueError naming it) plus ``rescale_timesteps``,
``sampler`` and ``eta``:

- betas: ``beta_schedule`` ``"linear"`` / ``"scaled_linear"`` / ``"sigmoid"`` (from
  ``beta_start``, ``beta_end``), ``"squaredcos_cap_v2"`` (= improved-diffusion's
  ``"cosine"``, also accepted), or ``trained_betas``; computed in float64.
  improved-diffusion's ``"linear"`` for T steps is beta_start = 1e-4·1000/T, beta_end =
  0.02·1000/T (diffusers' defaults at T = 1000); :meth:`from_improved_diffusion` sets them.
- ``variance_type``: ``"fixed_small"`` (= ``"fixed_small_log"``), ``"fixed_large"``,
  ``"learned_range"`` (model output [B, 2C, ...], improved-diffusion's learned σ),
  ``"learned"`` (diffusers' meaning: the second half of the output is σ²) and
  ``"learned_log"`` (improved-diffusion's LEARNED: log σ²). ``"fixed_large_log"`` is refused.
- ``prediction_type`` ``"epsilon"`` or ``"sample"``; ``clip_sample`` (range 1.0 only);
  ``thresholding``, ``rescale_betas_zero_snr`` and ``v_prediction`` are refused.
- ``set_timesteps(n)`` keeps the timesteps ``DDPMScheduler`` keeps for ``timestep_spacing``
  ``"leading"`` (default; plus ``steps_offset``), ``"trailing"`` or ``"linspace"``;
  ``"respace"`` keeps improved-diffusion's ``space_timesteps(T, str(n))``, and a string
  (``"ddim50"``, ``"10,15,20"``) is always the reference's section counts. The kept
  timesteps define the respaced process (β from consecutive ᾱ), which is also how
  ``DDPMScheduler`` steps between them.

The step is the update of :meth:`GaussianDiffusion.p_sample` (``ddim_sample`` with
``sampler="ddim"``) on that process — one fused kernel (iddpm::p_sample_step / ddim_step)
where it applies — so a diffusers loop gives ``diffusion.p_sample_loop``'s samples with the
same model, x_T and generator, and ``DDPMScheduler``'s steps to float32 rounding (tested).
One difference: improved-diffusion adds no noise at the last step; ``DDPMScheduler`` adds
noise at a last timestep > 0 ("trailing" spacing, ``steps_offset``) from a variance with
ᾱ_prev = 1 (1e-20 for fixed_small). Here the last step never adds noise.

Noise: ``generator`` on the sample's device → in-kernel Philox noise from it (as
``p_sample(..., generator=g)``); a generator on another device (a CPU generator for a
CUDA sample, as diffusers pipelines allow) or a list of per-sample generators → noise drawn
there and moved; no generator → on CPU ``torch.randn_like`` from the global RNG, on CUDA
in-kernel noise from the default CUDA generator; ``variance_noise`` → that exact noise.

``timesteps`` are original-process timesteps (as in diffusers). A model trained with
``rescale_timesteps=True`` expects them scaled to [0, 1000): pass ``sched.model_timesteps(t)``
to a plain ``UNetModel`` (``IDDPMUNet2DModel`` scales by itself). A timestep given as a
Python int or CPU tensor is checked against ``timesteps``; a CUDA tensor is looked up on the
device (no host sync) and a value that is not one of ``timesteps`` is not detected.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..core.checks import check_eta
from ..core.tables import cached
from ..errors import UnknownNameError
from ..gaussian_diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType
from ..respace import SpacedDiffusion, space_timesteps

try:  # the optional diffusers base classes
    from diffusers import ConfigMixin, SchedulerMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.utils import BaseOutput

    HAVE_DIFFUSERS = True
except ImportError:
    HAVE_DIFFUSERS = False

_VARIANCE_TYPES = {
    "fixed_small": ModelVarType.FIXED_SMALL,
    "fixed_small_log": ModelVarType.FIXED_SMALL,  # diffusers: the same step, σ through its log
    "fixed_large": ModelVarType.FIXED_LARGE,
    "learned": ModelVarType.LEARNED,  # σ² output: its log is handed to the LEARNED step
    "learned_log": ModelVarType.LEARNED,  # improved-diffusion's LEARNED: log σ² output
    "learned_range": ModelVarType.LEARNED_RANGE,
}
_PREDICTION_TYPES = {"epsilon": ModelMeanType.EPSILON, "sample": ModelMeanType.START_X}
_SAMPLERS = ("ancestral", "ddim")
_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine", "sigmoid")
_SPACINGS = ("leading", "trailing", "linspace", "respace")


if HAVE_DIFFUSERS:

    @dataclass
    class IDDPMSchedulerOutput(BaseOutput):
        """What :meth:`IDDPMScheduler.step` returns (diffusers' DDPMSchedulerOutput fields)."""

        prev_sample: torch.Tensor  # x_{t-1}: [B, C, *spatial]
        pred_original_sample: torch.Tensor | None = None  # x_0 estimate (clipped if clip_sample)

else:

    @dataclass
    class IDDPMSchedulerOutput:
        """What :meth:`IDDPMScheduler.step` returns (diffusers' DDPMSchedulerOutput fields)."""

        prev_sample: torch.Tensor  # x_{t-1}: [B, C, *spatial]
        pred_original_sample: torch.Tensor | None = None  # x_0 estimate (clipped if clip_sample)

        def __getitem__(self, i):
            return self.to_tuple()[i]

        def to_tuple(self):
            return (self.prev_sample, self.pred_original_sample)

    class _Config(dict):
        """The constructor arguments, readable as attributes (diffusers' ``scheduler.config``)."""

        def __getattr__(self, name):
            try:
                return self[name]
            except KeyError:
                raise AttributeError(name) from None

    def register_to_config(init):
        """Record the constructor's arguments (defaults filled in) as ``self.config``;
        arguments whose name starts with "_" (diffusers' bookkeeping) are dropped."""

        @functools.wraps(init)
        def inner(self, *args, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_")}
            bound = inspect.signature(init).bind(self, *args, **kwargs)
            bound.apply_defaults()
            self.register_to_config(**{k: v for k, v in list(bound.arguments.items())[1:]})
            init(self, *args, **kwargs)

        return inner

    class SchedulerMixin:
        """Stand-in for diffusers' SchedulerMixin when diffusers is not installed."""

    class ConfigMixin:
        """Stand-in for diffusers' ConfigMixin: ``config``, ``from_config``,
        ``save_pretrained`` / ``from_pretrained`` of ``<folder>/scheduler_config.json``."""

        config_name = "scheduler_config.json"

        @property
        def config(self):
            return self._internal_dict

        def register_to_config(self, **kwargs):
            self._internal_dict = _Config({**getattr(self, "_internal_dict", {}), **kwargs})

        @classmethod
        def from_config(cls, config=None, **kwargs):
            """``cls(**config)`` with the keys its constructor takes (values that were defaults
            where the config was made are left to this class's defaults, as diffusers does)."""
            config = dict(config or {})
            defaults = set(config.pop("_use_default_values", []))
            names = set(inspect.signature(cls.__init__).parameters) - {"self"}
            init = {k: v for k, v in config.items() if k in names and k not in defaults}
            init.update(kwargs)
            return cls(**init)

        def save_pretrained(self, save_directory, **kwargs):
            os.makedirs(save_directory, exist_ok=True)
            data = {"_class_name": type(self).__name__, **dict(self.config)}
            with open(os.path.join(save_directory, self.config_name), "w") as f:
                json.dump(data, f, indent=2, sort_keys=True)

        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, **kwargs):
            folder = os.path.join(pretrained_model_name_or_path, subfolder or "")
            path = os.path.join(folder, cls.config_name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"pretrained_model_name_or_path: no {cls.config_name} in {folder}")
            with open(path) as f:
                return cls.from_config(json.load(f), **kwargs)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _refuse(name, value, why):
    raise ValueError(f"{name}: {why} (IDDPMScheduler steps as improved-diffusion does), got {value!r}")


def _betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas) -> np.ndarray:
    """β_1..β_T in float64 from DDPMScheduler's arguments."""
    T = num_train_timesteps
    if trained_betas is not None:
        betas = np.asarray(
            trained_betas.tolist() if torch.is_tensor(trained_betas) else trained_betas, dtype=np.float64
        )
        if betas.ndim != 1 or betas.shape[0] != T:
            raise ValueError(f"trained_betas: expected {T} values, got shape {betas.shape}")
        if not (np.all(betas > 0) and np.all(betas <= 1)):
            raise ValueError("trained_betas: expected values in (0, 1]")
        return betas
    if beta_schedule in ("squaredcos_cap_v2", "cosine"):
        from ..core.schedules import get_named_beta_schedule

        return get_named_beta_schedule("cosine", T)
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, T, dtype=np.float64)
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    if beta_schedule == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, T, dtype=np.float64)))
        return s * (beta_end - beta_start) + beta_start
    raise UnknownNameError(f"beta_schedule: expected one of {list(_SCHEDULES)}, got {beta_schedule!r}")


class IDDPMScheduler(SchedulerMixin, ConfigMixin):
    """Improved-DDPM sampling steps behind diffusers' scheduler interface.

    The arguments up to ``rescale_betas_zero_snr`` are ``DDPMScheduler``'s (see the module
    docstring for what is honoured and what is refused). Ours:

    :param rescale_timesteps: the model takes timesteps scaled to [0, 1000)
        (see :meth:`model_timesteps`).
    :param sampler: ``"ancestral"`` (DDPM) or ``"ddim"``; ``eta``: DDIM's η (``step`` may override).
    """

    config_name = "scheduler_config.json"
    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,  # used only with thresholding
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,  # used only with thresholding
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        rescale_timesteps: bool = False,
        sampler: str = "ancestral",
        eta: float = 0.0,
    ):
        if not _is_int(num_train_timesteps):
            raise ValueError(f"num_train_timesteps: expected a positive int, got {num_train_timesteps!r}")
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps: expected a positive int, got {num_train_timesteps}")
        if variance_type == "fixed_large_log":
            _refuse("variance_type", variance_type, "fixed_large_log has no improved-diffusion step")
        if variance_type not in _VARIANCE_TYPES:
            raise UnknownNameError(
                f"variance_type: expected one of {sorted(_VARIANCE_TYPES)}, got {variance_type!r}"
            )
        if prediction_type not in _PREDICTION_TYPES:
            raise UnknownNameError(
                f"prediction_type: expected one of {sorted(_PREDICTION_TYPES)}, got {prediction_type!r}"
            )
        if thresholding:
            _refuse("thresholding", thresholding, "dynamic thresholding is not supported")
        if clip_sample and float(clip_sample_range) != 1.0:
            _refuse("clip_sample_range", clip_sample_range, "x_0 is clipped to [-1, 1] only")
        if rescale_betas_zero_snr:
            _refuse("rescale_betas_zero_snr", rescale_betas_zero_snr, "zero terminal SNR is not supported")
        if timestep_spacing not in _SPACINGS:
            raise UnknownNameError(
                f"timestep_spacing: expected one of {list(_SPACINGS)}, got {timestep_spacing!r}"
            )
        if not _is_int(steps_offset) or steps_offset < 0:
            raise ValueError(f"steps_offset: expected an int >= 0, got {steps_offset!r}")
        if sampler not in _SAMPLERS:
            raise UnknownNameError(f"sampler: expected one of {list(_SAMPLERS)}, got {sampler!r}")
        check_eta(eta)
        T = int(num_train_timesteps)
        betas = _betas(T, beta_start, beta_end, beta_schedule, trained_betas)
        if trained_betas is not None and not isinstance(trained_betas, list):
            self.register_to_config(trained_betas=betas.tolist())  # JSON-friendly in the config
        self._betas = betas
        # diffusers' attributes (float32 tensors, as DDPMScheduler's; the steps use float64 tables)
        self.betas = torch.tensor(betas, dtype=torch.float32)
        self.alphas = torch.tensor(1.0 - betas, dtype=torch.float32)
        self.alphas_cumprod = torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float32)
        self.one = torch.tensor(1.0)
        self.variance_type = variance_type
        self._types = dict(
            model_mean_type=_PREDICTION_TYPES[prediction_type],
            model_var_type=_VARIANCE_TYPES[variance_type],
            loss_type=LossType.MSE,
        )
        self.base = GaussianDiffusion(betas=betas, rescale_timesteps=bool(rescale_timesteps), **self._types)
        self._use(range(T), None)
        self.num_inference_steps = None  # as DDPMScheduler before set_timesteps
        self.custom_timesteps = False

    @classmethod
    def from_diffusion(cls, diffusion, sampler="ancestral", eta=0.0, clip_sample=True, **kwargs):
        """A scheduler over the process of one of our diffusions (a GaussianDiffusion, or a
        SpacedDiffusion that keeps every step, whose β are recomputed from its ᾱ); ``kwargs``:
        other constructor arguments (``timestep_spacing``, ...)."""
        if isinstance(diffusion, SpacedDiffusion) and (
            len(diffusion.timestep_map) != diffusion.original_num_steps
        ):
            raise ValueError(
                "diffusion: a respaced diffusion does not keep the original process's betas; "
                "build the scheduler from num_train_timesteps and beta_schedule/trained_betas"
            )
        if not isinstance(diffusion, GaussianDiffusion):
            raise ValueError(f"diffusion: expected a GaussianDiffusion, got {type(diffusion).__name__}")
        names = {
            ModelVarType.FIXED_SMALL: "fixed_small",
            ModelVarType.FIXED_LARGE: "fixed_large",
            ModelVarType.LEARNED: "learned_log",
            ModelVarType.LEARNED_RANGE: "learned_range",
        }
        prediction = {v: k for k, v in _PREDICTION_TYPES.items()}.get(diffusion.model_mean_type)
        if prediction is None:
            raise ValueError(
                f"diffusion: model_mean_type {diffusion.model_mean_type.name} has no "
                "diffusers prediction_type"
            )
        return cls(
            num_train_timesteps=diffusion.num_timesteps,
            trained_betas=np.asarray(diffusion.betas, dtype=np.float64).tolist(),
            variance_type=names[diffusion.model_var_type],
            prediction_type=prediction,
            clip_sample=clip_sample,
            rescale_timesteps=diffusion.rescale_timesteps,
            sampler=sampler,
            eta=eta,
            **kwargs,
        )

    @classmethod
    def from_improved_diffusion(cls, sampler="ancestral", eta=0.0, clip_sample=True, **flags):
        """The scheduler of improved-diffusion's flags (``diffusion_steps``, ``noise_schedule``,
        ``learn_sigma``, ``sigma_small``, ``predict_xstart``, ``rescale_timesteps``; the rest of
        :func:`model_and_diffusion_defaults`' keys are accepted and unused; missing ones take
        those defaults). Constructor arguments (``timestep_spacing``, ...) may be given too."""
        from ..script_util import model_and_diffusion_defaults

        args = model_and_diffusion_defaults()
        own = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(set(flags) - set(args) - own)
        if unknown:
            raise ValueError(f"flags: unknown names {unknown} (expected model_and_diffusion_defaults() keys)")
        extra = {k: flags.pop(k) for k in list(flags) if k in own and k not in args}
        args.update(flags)
        T = int(args["diffusion_steps"])
        schedule = args["noise_schedule"]
        if schedule == "linear":
            extra.setdefault("beta_start", 1000 / T * 0.0001)
            extra.setdefault("beta_end", 1000 / T * 0.02)
        elif schedule != "cosine":
            raise UnknownNameError(f"noise_schedule: expected 'linear' or 'cosine', got {schedule!r}")
        if args["learn_sigma"]:
            variance = "learned_range"
        else:
            variance = "fixed_small" if args["sigma_small"] else "fixed_large"
        return cls(
            num_train_timesteps=T,
            beta_schedule="linear" if schedule == "linear" else "squaredcos_cap_v2",
            variance_type=variance,
            prediction_type="sample" if args["predict_xstart"] else "epsilon",
            clip_sample=clip_sample,
            rescale_timesteps=bool(args["rescale_timesteps"]),
            sampler=sampler,
            eta=eta,
            **extra,
        )

    def __len__(self):
        return self.config.num_train_timesteps

    # -- timesteps -----------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None):
        """Keep ``num_inference_steps`` timesteps as ``timestep_spacing`` says (``DDPMScheduler``'s
        "leading" / "trailing" / "linspace", or improved-diffusion's "respace"); a string such as
        ``"ddim50"`` or ``"10,20"`` is improved-diffusion's section counts
        (:func:`space_timesteps`); or exactly the given descending ``timesteps``."""
        T = self.config.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("set_timesteps: give num_inference_steps or timesteps, not both")
        if timesteps is not None:
            values = [int(v) for v in (timesteps.tolist() if torch.is_tensor(timesteps) else timesteps)]
            descending = all(b < a for a, b in zip(values, values[1:]))
            if not values or not descending or values[-1] < 0 or values[0] >= T:
                raise ValueError(f"timesteps: expected strictly descending values in [0, {T}), got {values}")
            keep, custom = values, True
        elif num_inference_steps is None:
            raise ValueError("num_inference_steps: give it or timesteps")
        elif isinstance(num_inference_steps, str):
            keep, custom = space_timesteps(T, num_inference_steps), False
        else:
            n = num_inference_steps
            if not _is_int(n) or not 1 <= n <= T:
                raise ValueError(f"num_inference_steps: expected an int in [1, {T}], got {n!r}")
            keep, custom = self._spaced(int(n)), False
        self._use(keep, device)
        self.custom_timesteps = custom
        self.num_inference_steps = len(self.process.timestep_map)

    def _spaced(self, n: int) -> list:
        """The n timesteps of ``timestep_spacing`` (DDPMScheduler's arithmetic for its three)."""
        T, spacing = self.config.num_train_timesteps, self.config.timestep_spacing
        if spacing == "respace":
            return sorted(space_timesteps(T, str(n)))
        if spacing == "linspace":
            keep = np.linspace(0, T - 1, n).round().astype(np.int64)
        elif spacing == "leading":
            keep = np.arange(0, n) * (T // n) + self.config.steps_offset
        else:  # trailing
            keep = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
        keep = sorted(int(v) for v in keep)
        if keep[-1] >= T or keep[0] < 0 or len(set(keep)) != len(keep) or len(keep) != n:
            # diffusers' arithmetic goes wrong here (its trailing spacing gives n + 1 timesteps
            # down to -1 for T = 999, n = 13; an offset can pass T - 1): refused, not stepped
            raise ValueError(
                f"num_inference_steps: timestep_spacing={spacing!r} with steps_offset="
                f"{self.config.steps_offset} gives {len(keep)} timesteps from {keep[0]} to "
                f"{keep[-1]} for num_inference_steps={n}, not {n} distinct ones in [0, {T})"
            )
        return keep

    def _use(self, keep, device):
        """Step between the original timesteps ``keep`` (the respaced process they define)."""
        self.process = SpacedDiffusion(
            set(keep), betas=self._betas, rescale_timesteps=self.config.rescale_timesteps, **self._types
        )
        # The respaced process without the model wrapper: step() hands it the model output.
        # Its timesteps are indices into timestep_map, valid by construction: no host read.
        self._steps = GaussianDiffusion(betas=self.process.betas, **self._types)
        self._steps.check_timesteps = False
        self._index = {t: i for i, t in enumerate(self.process.timestep_map)}
        self._map_on: dict[str, torch.Tensor] = {}
        device = torch.device("cpu") if device is None else torch.device(device)
        self.timesteps = torch.tensor(self.process.timestep_map[::-1], dtype=torch.long, device=device)

    def previous_timestep(self, timestep):
        """The timestep stepped to from ``timestep`` (the next of ``timesteps``; -1 after the
        last), as DDPMScheduler: a tensor for a tensor, an int for an int."""
        if not torch.is_tensor(timestep):
            i = self._lookup([timestep])[0]
            return self.process.timestep_map[i - 1] if i > 0 else -1
        if timestep.numel() != 1:
            raise ValueError(f"timestep: expected one timestep, got shape {tuple(timestep.shape)}")
        i = self._lookup(timestep.reshape(-1).tolist())[0]
        return torch.tensor(self.process.timestep_map[i - 1] if i > 0 else -1, device=timestep.device)

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

    def _lookup(self, values) -> list:
        try:
            return [self._index[int(v)] for v in values]
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"timestep: expected one of the scheduler's timesteps ({len(self._index)} kept of "
                f"{len(self)}), got {values!r}"
            ) from None

    def _step_index(self, timestep, batch: int, device) -> torch.Tensor:
        """[B] int64 indices into the respaced process for ``timestep`` (original values)."""
        if torch.is_tensor(timestep) and timestep.device.type != "cpu":
            idx = self._device_index(timestep, device)
        else:
            values = timestep.reshape(-1).tolist() if torch.is_tensor(timestep) else [timestep]
            idx = torch.tensor(self._lookup(values), dtype=torch.long).to(device)
        if idx.numel() not in (1, batch):
            raise ValueError(f"timestep: expected a scalar or {batch} values, got {idx.numel()}")
        return idx.expand(batch).contiguous()

    def _device_index(self, timestep: torch.Tensor, device) -> torch.Tensor:
        """Indices of original timesteps looked up on the device (searchsorted in the sorted
        timestep map; no host sync, so values outside ``timesteps`` go undetected)."""
        ts = timestep.reshape(-1).to(device=device, dtype=torch.long)
        make = lambda: torch.tensor(self.process.timestep_map, dtype=torch.long, device=device)  # noqa: E731
        return torch.searchsorted(cached(self._map_on, str(device), make), ts)

    # -- the step ------------------------------------------------------------------------
    def step(
        self, model_output, timestep, sample, generator=None, return_dict=True, eta=None, variance_noise=None
    ):
        """x_{t-1} from the model output at original timestep ``timestep``.

        :param model_output: [B, C, ...] ([B, 2C, ...] for the learned variance types).
        :param sample: x_t, [B, C, ...].
        :param generator: a torch.Generator, or a list of B of them (one per sample).
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
        if variance_noise is None and generator is not None:
            variance_noise, generator = self._noise_from(generator, sample)
        if self.config.variance_type == "learned" and torch.is_tensor(model_output):
            C = sample.shape[1]
            if model_output.dim() == sample.dim() and model_output.shape[1] == 2 * C:
                model_output = torch.cat([model_output[:, :C], torch.log(model_output[:, C:])], dim=1)
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
        result = IDDPMSchedulerOutput(prev_sample=out["sample"], pred_original_sample=out["pred_xstart"])
        return result if return_dict else (result.prev_sample, result.pred_original_sample)

    @staticmethod
    def _noise_from(generator, sample):
        """(explicit noise, None) for a generator list or one on another device than
        ``sample`` (drawn there, as diffusers' randn_tensor); else (None, generator)."""
        if isinstance(generator, (list, tuple)):
            if len(generator) != sample.shape[0]:
                raise ValueError(
                    f"generator: expected one generator or a list of {sample.shape[0]}, got {len(generator)}"
                )
            parts = [
                torch.randn((1, *sample.shape[1:]), generator=g, device=g.device, dtype=sample.dtype)
                for g in generator
            ]
            return torch.cat([p.to(sample.device) for p in parts]), None
        if not isinstance(generator, torch.Generator):
            raise ValueError(
                f"generator: expected a torch.Generator or a list of them, got {type(generator).__name__}"
            )
        if generator.device.type != sample.device.type:
            where = generator.device
            noise = torch.randn(sample.shape, generator=generator, device=where, dtype=sample.dtype)
            return noise.to(sample.device), None
        return None, generator

    def add_noise(self, original_samples, noise, timesteps):
        """q(x_t | x_0) at original-process ``timesteps`` ([B] or a scalar):
        √ᾱ_t·x_0 + √(1-ᾱ_t)·noise."""
        B = original_samples.shape[0]
        t = torch.as_tensor(timesteps, device=original_samples.device).long().reshape(-1)
        if t.numel() == 1:
            t = t.expand(B).contiguous()
        return self.base.q_sample(original_samples, t, noise)
