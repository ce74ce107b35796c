"""Respacing: sampling (or training) with a subset of the original process's timesteps.

Same names and semantics as openai/improved-diffusion's ``respace.py``: the kept steps
define a new process whose β come from the kept ᾱ, and the model always sees the
original process's timesteps (rescaled to [0, 1000) when ``rescale_timesteps``).
"""

from __future__ import annotations

import numpy as np
import torch

from .core.tables import cached
from .gaussian_diffusion import GaussianDiffusion


def _parse_section_counts(num_timesteps: int, section_counts):
    """The per-section counts of a respacing spec, or the DDIM set for "ddimN"."""
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            try:
                desired_count = int(spec[len("ddim") :])
            except ValueError:
                raise ValueError(
                    f"section_counts: expected 'ddimN' with an integer N, got {section_counts!r}"
                ) from None
            # The DDIM paper's fixed striding: the integer stride that yields exactly N steps.
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == desired_count:
                    return set(range(0, num_timesteps, i))
            raise ValueError(
                f"section_counts: cannot take exactly {desired_count} of {num_timesteps} steps "
                f"with an integer stride ({section_counts!r})"
            )
        try:
            counts = [int(x) for x in spec.split(",")]
        except ValueError:
            raise ValueError(
                "section_counts: expected comma-separated integers like '10,15,20', 'ddimN' or "
                f"a list of ints, got {section_counts!r}"
            ) from None
        return counts
    try:
        counts = [int(x) for x in section_counts]
    except (TypeError, ValueError):
        raise ValueError(
            f"section_counts: expected a string or a list of ints, got {section_counts!r}"
        ) from None
    return counts


def space_timesteps(num_timesteps, section_counts):
    """The set of original timesteps to keep.

    The process is cut into ``len(section_counts)`` equal sections (the first
    ``num_timesteps % len`` one step longer), and section i keeps ``section_counts[i]``
    evenly strided steps, positions rounded with Python's ``round`` (half to even).
    ``"ddimN"`` uses the DDIM paper's fixed integer stride instead (one section only).

    >>> sorted(space_timesteps(10, "3"))
    [0, 4, 9]
    """
    if (
        isinstance(num_timesteps, bool)
        or not isinstance(num_timesteps, (int, np.integer))
        or num_timesteps < 1
    ):
        raise ValueError(f"num_timesteps: expected a positive int, got {num_timesteps!r}")
    counts = _parse_section_counts(int(num_timesteps), section_counts)
    if isinstance(counts, set):
        return counts
    if len(counts) == 0:
        raise ValueError(f"section_counts: expected at least one section, got {section_counts!r}")
    if any(c < 0 for c in counts):
        raise ValueError(f"section_counts: expected non-negative counts, got {section_counts!r}")
    size_per = num_timesteps // len(counts)
    extra = num_timesteps % len(counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(
                f"section_counts: cannot divide section {i} of {size} steps into "
                f"{section_count} (from {section_counts!r} over {num_timesteps} steps)"
            )
        if section_count <= 1:
            frac_stride = 1
        else:
            frac_stride = (size - 1) / (section_count - 1)
        cur_idx = 0.0
        taken_steps = []
        for _ in range(section_count):
            taken_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken_steps
        start_idx += size
    return set(all_steps)


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion process that keeps only ``use_timesteps`` of a base process.

    :param use_timesteps: timesteps of the original process to keep (any collection).
    :param kwargs: the arguments of the base :class:`GaussianDiffusion` (``betas`` of the
        original process, mean/var/loss types, rescale_timesteps).
    """

    def __init__(self, use_timesteps, **kwargs):
        if "betas" not in kwargs:
            raise ValueError("betas: expected the original process's betas as a keyword argument")
        base_diffusion = GaussianDiffusion(**kwargs)
        self.original_num_steps = base_diffusion.num_timesteps
        try:
            self.use_timesteps = set(int(t) for t in use_timesteps)
        except (TypeError, ValueError):
            raise ValueError(f"use_timesteps: expected a collection of ints, got {use_timesteps!r}") from None
        if not self.use_timesteps:
            raise ValueError("use_timesteps: expected at least one timestep, got none")
        out_of_range = [t for t in self.use_timesteps if not 0 <= t < self.original_num_steps]
        if out_of_range:
            raise ValueError(
                f"use_timesteps: expected timesteps in [0, {self.original_num_steps}), "
                f"got {sorted(out_of_range)[:5]}"
            )
        self.timestep_map = []
        last_alpha_cumprod = 1.0
        new_betas = []
        for i, alpha_cumprod in enumerate(base_diffusion.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        kwargs["betas"] = np.array(new_betas)
        super().__init__(**kwargs)
        self._map_tensors: dict[tuple, torch.Tensor] = {}

    def _timestep_map_tensor(self, device, dtype) -> torch.Tensor:
        """timestep_map on ``device`` (made once per device and dtype, keyed by t.device; not kept
        while torch.export traces: :func:`iddpm_ext.core.tables.cached`)."""
        make = lambda: torch.tensor(self.timestep_map, device=device, dtype=dtype)  # noqa: E731
        return cached(self._map_tensors, (device, dtype), make)

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self)

    def _run_model(self, model, x, t, model_kwargs):
        # What self._wrap_model(model)(x, t, ...) does, without making a wrapper per call.
        if isinstance(model, _WrappedModel):
            return model(x, t, **(model_kwargs or {}))
        return model(x, self.model_timesteps(t), **(model_kwargs or {}))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The original process's timesteps of respaced timesteps ``t`` (scaled to [0, 1000)
        with ``rescale_timesteps``): what the model is given."""
        m = self._timestep_map_tensor(t.device, t.dtype)
        return map_timesteps(m, t, self.rescale_timesteps, self.original_num_steps)

    def _scale_timesteps(self, t):
        # Scaling is done by the wrapped model.
        return t


def map_timesteps(timestep_map: torch.Tensor, t: torch.Tensor, rescale: bool, original_num_steps: int):
    """timestep_map[t] (on t's device, in t's dtype), scaled to [0, 1000) as float32 when
    ``rescale``: the timesteps a respaced process's model is given."""
    # take == m[t] for a 1-D m (negative t counts from the end as well), with less overhead
    new_ts = torch.take(timestep_map, t) if t.dtype == torch.int64 else timestep_map[t]
    if rescale:
        new_ts = new_ts.float() * (1000.0 / original_num_steps)
    return new_ts


class _WrappedModel:
    """Calls the model with original-process timesteps (rescaled when asked).

    ``_WrappedModel(model, diffusion)``, or the reference's
    ``_WrappedModel(model, timestep_map, rescale_timesteps, original_num_steps)``."""

    def __init__(self, model, diffusion, rescale_timesteps=None, original_num_steps=None):
        self.model = model
        if isinstance(diffusion, SpacedDiffusion):
            self.diffusion = diffusion
            self.timestep_map = diffusion.timestep_map
            self.rescale_timesteps = diffusion.rescale_timesteps
            self.original_num_steps = diffusion.original_num_steps
        else:  # the reference's arguments
            if rescale_timesteps is None or original_num_steps is None:
                raise ValueError(
                    "_WrappedModel: expected (model, diffusion) or (model, timestep_map, "
                    "rescale_timesteps, original_num_steps)"
                )
            self.diffusion = None
            self.timestep_map = list(diffusion)
            self.rescale_timesteps = rescale_timesteps
            self.original_num_steps = original_num_steps

    def __call__(self, x, ts, **kwargs):
        if self.diffusion is not None:  # its map tensor, cached per device and dtype
            m = self.diffusion._timestep_map_tensor(ts.device, ts.dtype)
        else:
            m = torch.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)
        return self.model(x, map_timesteps(m, ts, self.rescale_timesteps, self.original_num_steps), **kwargs)
