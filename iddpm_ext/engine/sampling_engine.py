"""Low-latency sampling: one whole denoising step on static buffers, replayed per timestep.

:class:`SamplingEngine` runs the ancestral or DDIM sampling loop of a diffusion with one
step function per configuration (batch, image shape, respacing, sampler, η, clipping,
model kwargs, autocast dtype, channels-last): the UNet forward on a static x buffer, then
the fused step op (iddpm::p_sample_step / ddim_step, docs/step.md) drawing its noise in
the kernel, its result copied back into the static x, and a device step counter advanced.
The timestep of step i is read on the device (``t_rows[counter]``), so a step has no
host-to-device copy and no host sync, and the same step can be

- ``"graph"``: captured once in a CUDA graph and replayed for every timestep (the default on
  CUDA); on the CPU captured as an op graph (:mod:`.op_graph`: the step's operator calls
  recorded once by make_fx and replayed without the Python around them; a configuration is
  captured again when the model's parameters change in place);
- ``"compile"``: the step function compiled by ``torch.compile`` (default options: inductor,
  no CUDA graphs, ``dynamic=False``; see docs/sampling_engine.md);
- ``"compile-graph"``: both — the compiled step (inductor's code, no CUDA graphs of its own)
  captured once in a CUDA graph and replayed (CUDA only; not yet measured on a card, so never
  the default);
- ``"eager"``: the same step function run as it is (the default elsewhere; what the CPU
  tests exercise).

Choose with ``mode=`` or the environment variable IDDPM_EXT_ENGINE_MODE
(``auto`` | ``graph`` | ``compile`` | ``compile-graph`` | ``eager``). Configurations are
cached: the first run of a configuration builds (and in graph mode captures) it, later runs
reuse its buffers.

Noise: a run with ``generator=G`` gives the same samples as
``diffusion.p_sample_loop(model, shape, generator=G)`` (``ddim_sample_loop`` for DDIM): x_T
is ``torch.randn(shape, generator=G)``, each step's noise is the fused op's in-kernel
Philox noise from G. That noise is numbered per sample (docs/step.md): batch item b draws
the stream of global sample ``sample_index[b]`` (default b), kept in a static device buffer
that each run refills, so one captured graph serves every set of indices. With x_T given as
``noise``, the same generator state per run, and the model computing each sample on its
own, sample j's result depends only on (x_T of j, G's state, j), not on the batch it is in
(:mod:`iddpm_ext.cli.generate` builds ``iddpm sample`` on this). Without a generator G is the
default generator of the device (on
CUDA this is exactly ``p_sample_loop(..., generator=None)``; on CPU that loop draws its step
noise with ``torch.randn_like`` instead, so the engine matches
``p_sample_loop(..., generator=torch.default_generator)``). The step function always uses the
device's default generator; a user generator's state is moved into it for the run and its
advanced state written back, so graphs stay valid for any generator and
``torch.compile`` never sees a Generator object.

Shapes: x: [B, C, *spatial] float32 (the engine keeps x in float32; with ``amp`` only the
model runs in bf16/fp16 under autocast); t: [B] int64; y (class labels): [B].
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import ops
from ..core import checks
from . import capture, op_graph

MODES = ("graph", "compile", "compile-graph", "eager")
_CAPTURED = ("graph", "compile-graph")  # the modes that replay a captured graph
SAMPLERS = ("ancestral", "ddim")
ENV_MODE = "IDDPM_EXT_ENGINE_MODE"
_AMP_NAMES = {
    None: None,
    "none": None,
    "fp32": None,
    "float32": None,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
_UNSET = object()


# ---------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------


def default_mode(device) -> str:
    """The engine mode for ``device`` when none is given: IDDPM_EXT_ENGINE_MODE if set
    (``auto`` or empty = by device), else ``graph`` on CUDA and ``eager`` elsewhere."""
    device = torch.device(device)
    value = os.environ.get(ENV_MODE, "auto").strip().lower()
    if value in ("", "auto"):
        return "graph" if device.type == "cuda" else "eager"
    if value not in MODES:
        raise ValueError(f"{ENV_MODE}: expected one of auto, {', '.join(MODES)}; got {value!r}")
    return value


def _amp_dtype(amp):
    if isinstance(amp, torch.dtype):
        if amp == torch.float32:
            return None
        if amp in (torch.bfloat16, torch.float16):
            return amp
    elif amp is None or isinstance(amp, str):
        key = amp.lower() if isinstance(amp, str) else amp
        if key in _AMP_NAMES:
            return _AMP_NAMES[key]
    raise ValueError(f"amp: expected None, 'bf16', 'fp16' or a torch dtype among those, got {amp!r}")


def diffusion_signature(diffusion) -> tuple:
    """What of a diffusion a captured step depends on: process length, respacing map,
    timestep rescaling, mean/variance types and the β schedule."""
    betas = np.ascontiguousarray(np.asarray(diffusion.betas, dtype=np.float64))
    return (
        type(diffusion).__name__,
        int(diffusion.num_timesteps),
        tuple(int(v) for v in getattr(diffusion, "timestep_map", ())),
        getattr(diffusion, "original_num_steps", None),
        bool(diffusion.rescale_timesteps),
        diffusion.model_mean_type.name,
        diffusion.model_var_type.name,
        hashlib.sha1(betas.tobytes()).hexdigest()[:16],
    )


def _memory_format(shape, channels_last: bool):
    if channels_last and len(shape) == 4:
        return torch.channels_last
    if channels_last and len(shape) == 5:
        return torch.channels_last_3d
    return torch.contiguous_format


# ---------------------------------------------------------------------------------
# one cached configuration
# ---------------------------------------------------------------------------------


@dataclass
class _Entry:
    key: tuple
    diffusion: object
    sampler: str
    eta: float
    clip_denoised: bool
    amp_dtype: torch.dtype | None
    x: torch.Tensor  # [B, C, *spatial] float32, the static sample buffer
    t_rows: torch.Tensor  # [S, B] int64, row i = the timestep of step i (S-1-i)
    model_t_rows: torch.Tensor  # [S, B], the timesteps the model sees at step i
    counter: torch.Tensor  # [1] int64, the index of the next step
    sample_index: torch.Tensor  # [B] int64, the global sample index keying each item's noise
    kwargs: dict  # name -> static tensor (class labels y, ...)
    run_step: object = None  # what a step calls: the step function, its compiled form, or replay
    graph: object = None
    versions: tuple | None = None  # CPU op graph: the watched tensors' versions at capture
    memory: dict = field(default_factory=dict)
    runs: int = 0

    @property
    def num_steps(self) -> int:
        return self.t_rows.shape[0]

    def static_bytes(self) -> int:
        tensors = [
            self.x,
            self.t_rows,
            self.model_t_rows,
            self.counter,
            self.sample_index,
            *self.kwargs.values(),
        ]
        return sum(v.untyped_storage().nbytes() for v in tensors)


class SamplingEngine:
    """Sampling loops with one captured (or compiled, or plain) step per configuration.

    :param model: the denoiser, ``model(x, timesteps, **model_kwargs)``, in eval mode.
    :param diffusion: the default diffusion (a GaussianDiffusion or SpacedDiffusion); each
        call may pass another (e.g. another respacing).
    :param mode: ``"graph"`` (a CUDA graph; on the CPU an op graph), ``"compile"``,
        ``"compile-graph"`` (CUDA only), ``"eager"`` or None/``"auto"`` (:func:`default_mode`).
    :param amp: None (fp32), ``"bf16"`` or ``"fp16"``: the model runs under
        ``torch.autocast`` in that dtype; x and the step stay float32. Overridable per call.
    :param channels_last: convert the model to channels-last (in place) and keep x in
        channels-last.
    :param compile_options: keyword arguments of ``torch.compile`` for modes ``"compile"`` and
        ``"compile-graph"`` (default ``{"dynamic": False}``; add ``mode=...`` or ``backend=...``).
    :param device: where to run (default: the device of the model's parameters).
    """

    def __init__(
        self,
        model,
        diffusion=None,
        *,
        mode=None,
        amp=None,
        channels_last=False,
        compile_options=None,
        device=None,
    ):
        self.model = model
        self.diffusion = diffusion
        if device is None:
            try:
                device = next(model.parameters()).device
            except (AttributeError, StopIteration, TypeError):
                device = torch.device("cpu")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None and torch.cuda.is_available():
            # "cuda" as the current device's index: the step looks tables up under x.device
            # (cuda:N), and torch.device("cuda") != torch.device("cuda:0")
            self.device = torch.device("cuda", torch.cuda.current_device())
        capture.default_generator(self.device)  # cpu or cuda only
        ops.require()
        if not ops.has_kernel(self.device):
            raise ValueError(f"device: iddpm_ext._C has no kernels for {self.device} (built without CUDA?)")
        if mode is None or mode == "auto":
            mode = default_mode(self.device)
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES} or 'auto', got {mode!r}")
        self.mode = mode
        self._backend = capture.graph_backend(self.device) if mode in _CAPTURED else None
        if mode == "compile-graph" and isinstance(self._backend, capture.OpGraphBackend):
            raise ValueError(
                "mode: 'compile-graph' captures the compiled step in a CUDA graph and needs a CUDA device, "
                f"got {self.device} (on the CPU: mode='graph', an op graph, or 'compile')"
            )
        # A CPU op graph keeps what the capture derived from the weights (prepacked, Winograd):
        # a configuration is captured again when a parameter or buffer changed in place.
        self._watch = op_graph.watched(model) if isinstance(self._backend, capture.OpGraphBackend) else ()
        self.amp = _amp_dtype(amp)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            if not isinstance(model, torch.nn.Module):
                raise ValueError("channels_last: needs an nn.Module model to convert")
            model.to(memory_format=torch.channels_last)
        self.compile_options = {"dynamic": False, **(compile_options or {})}
        self._entries: dict[tuple, _Entry] = {}
        self.stats = {"builds": 0, "captures": 0, "compiles": 0, "runs": 0}

    # -- public API ------------------------------------------------------------------
    def sample(self, shape, *, sampler="ancestral", eta=0.0, diffusion=None, noise=None, clip_denoised=True,
               model_kwargs=None, y=None, generator=None, amp=_UNSET, progress=False, sample_index=None,
               callback=None) -> torch.Tensor:  # fmt: skip
        """Draw samples: x_T = ``noise`` (or N(0, I) from the generator), then every step of
        the (respaced) process. Returns a new float32 [B, C, *spatial] tensor.

        :param sampler: ``"ancestral"`` (p_sample_loop) or ``"ddim"`` (ddim_sample_loop).
        :param eta: DDIM's η (part of the configuration: each value has its own step).
        :param y: class labels [B] (same as ``model_kwargs={"y": y}``).
        :param generator: torch.Generator on the engine's device (see the module docstring).
        :param sample_index: the global sample index of each batch item, which keys its
            in-kernel step noise: None (item b is sample b), an int k (samples k .. k+B-1), or
            B integers (tensor or sequence). Copied into a static buffer: no rebuild.
        :param callback: ``callback(t, x)`` after each step, with the timestep just taken
            (S-1 down to 0) and the static x buffer, x_t after that step (valid until the
            next step: clone what you keep).
        """
        d = self.diffusion if diffusion is None else diffusion
        if d is None:
            raise ValueError("diffusion: none given here and none given to the engine")
        shape = self._check_shape(shape)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler: expected one of {SAMPLERS}, got {sampler!r}")
        eta = self._check_eta(sampler, eta)
        kwargs = self._check_kwargs(model_kwargs, y, shape[0])
        amp_dtype = self.amp if amp is _UNSET else _amp_dtype(amp)
        if generator is not None and (
            not isinstance(generator, torch.Generator) or generator.device.type != self.device.type
        ):
            got = generator.device if isinstance(generator, torch.Generator) else type(generator)
            raise ValueError(f"generator: expected a torch.Generator on {self.device.type}, got {got}")
        if noise is not None and tuple(noise.shape) != shape:
            raise ValueError(f"noise: expected shape {shape} (the sample shape), got {tuple(noise.shape)}")
        index = self._check_sample_index(sample_index, shape[0])
        if callback is not None and not callable(callback):
            raise ValueError(f"callback: expected a callable or None, got {type(callback).__name__}")
        if getattr(self.model, "training", False):
            raise ValueError(
                "model: expected eval mode (call model.eval()); dropout in "
                "training mode would draw random numbers inside the step"
            )

        entry = self._entry(d, shape, sampler, eta, bool(clip_denoised), kwargs, amp_dtype)
        with torch.no_grad():
            if noise is None:
                noise = torch.randn(*shape, device=self.device, generator=generator)
            entry.x.copy_(noise)
            for name, value in kwargs.items():
                entry.kwargs[name].copy_(value)
            entry.sample_index.copy_(index)
            entry.counter.zero_()
            steps = range(entry.num_steps)
            if progress:
                from tqdm.auto import tqdm

                steps = tqdm(steps)
            with capture.generator_as_default(generator, self.device):
                for i in steps:
                    entry.run_step()
                    if callback is not None:
                        callback(entry.num_steps - 1 - i, entry.x)
            entry.runs += 1
            self.stats["runs"] += 1
            return entry.x.clone(memory_format=torch.contiguous_format)

    def p_sample_loop(self, shape, noise=None, clip_denoised=True, model_kwargs=None, progress=False,
                      generator=None, diffusion=None):  # fmt: skip
        """Ancestral sampling; the arguments of GaussianDiffusion.p_sample_loop."""
        args = {k: v for k, v in locals().items() if k not in ("self", "shape")}
        return self.sample(shape, sampler="ancestral", **args)

    def ddim_sample_loop(self, shape, noise=None, clip_denoised=True, model_kwargs=None, progress=False,
                         eta=0.0, generator=None, diffusion=None):  # fmt: skip
        """DDIM sampling; the arguments of GaussianDiffusion.ddim_sample_loop."""
        args = {k: v for k, v in locals().items() if k not in ("self", "shape")}
        return self.sample(shape, sampler="ddim", **args)

    def cache_keys(self) -> list:
        """The keys of the cached configurations (see :meth:`config_key`)."""
        return list(self._entries)

    def clear(self):
        """Drop every cached configuration (buffers, graphs, compiled steps)."""
        self._entries.clear()

    def memory_report(self) -> dict:
        """Bytes held per cached configuration: the static buffers, and in graph mode the
        graph's memory pool (growth of torch.cuda.memory_reserved across the capture,
        after an empty_cache) and the bytes still allocated from it after capture."""
        entries = []
        for e in self._entries.values():
            rec = {
                "shape": list(e.x.shape),
                "sampler": e.sampler,
                "eta": e.eta,
                "steps": e.num_steps,
                "amp": str(e.amp_dtype).replace("torch.", ""),
                "static_bytes": e.static_bytes(),
                "runs": e.runs,
            }
            rec.update(e.memory)
            entries.append(rec)
        total = sum(r["static_bytes"] + r.get("graph_pool_reserved_bytes", 0) for r in entries)
        return {"mode": self.mode, "device": str(self.device), "entries": entries, "total_bytes": total}

    def config_key(
        self,
        diffusion,
        shape,
        sampler="ancestral",
        eta=0.0,
        clip_denoised=True,
        model_kwargs=None,
        amp=_UNSET,
    ) -> tuple:
        """The cache key of a configuration: mode, shape, sampler, η (DDIM), clipping,
        diffusion signature (respacing), model-kwarg shapes/dtypes (class conditioning),
        autocast dtype, channels-last."""
        amp_dtype = self.amp if amp is _UNSET else _amp_dtype(amp)
        spec = tuple(sorted((k, tuple(v.shape), v.dtype) for k, v in (model_kwargs or {}).items()))
        return (
            self.mode,
            tuple(int(s) for s in shape),
            sampler,
            float(eta) if sampler == "ddim" else None,
            bool(clip_denoised),
            diffusion_signature(diffusion),
            spec,
            amp_dtype,
            self.channels_last,
        )

    # -- argument checks ---------------------------------------------------------------
    @staticmethod
    def _check_shape(shape) -> tuple:
        return checks.check_sample_shape(shape)

    @staticmethod
    def _check_eta(sampler, eta) -> float:
        if sampler == "ancestral":
            if isinstance(eta, bool) or not isinstance(eta, (int, float)) or eta != 0.0:
                raise ValueError(f"eta: only DDIM has an eta; ancestral sampling got {eta!r}")
            return 0.0
        return checks.check_eta(eta)

    def _check_sample_index(self, sample_index, batch) -> torch.Tensor:
        """[B] int64 global sample indices (on the engine's device for None and ints)."""
        if sample_index is None:
            sample_index = 0
        if isinstance(sample_index, int) and not isinstance(sample_index, bool):
            return torch.arange(sample_index, sample_index + batch, device=self.device)
        try:
            index = torch.as_tensor(sample_index)
        except (TypeError, ValueError, RuntimeError):
            index = None
        if (
            index is None
            or index.dtype.is_floating_point
            or index.dtype.is_complex
            or index.dtype == torch.bool
            or tuple(index.shape) != (batch,)
        ):
            got = (
                f"shape {tuple(index.shape)} dtype {index.dtype}"
                if index is not None
                else type(sample_index).__name__
            )
            raise ValueError(
                f"sample_index: expected None, an int or {batch} integers (one per batch item), got {got}"
            )
        return index.to(torch.long)

    def _check_kwargs(self, model_kwargs, y, batch) -> dict:
        kwargs = dict(model_kwargs or {})
        if y is not None:
            if "y" in kwargs:
                raise ValueError("y: given both as y= and in model_kwargs")
            kwargs["y"] = y
        for name, value in kwargs.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(
                    f"model_kwargs[{name!r}]: expected a tensor (it becomes a "
                    f"static buffer), got {type(value).__name__}"
                )
            if value.dim() == 0 or value.shape[0] != batch:
                raise ValueError(
                    f"model_kwargs[{name!r}]: expected a leading batch dim of "
                    f"{batch}, got shape {tuple(value.shape)}"
                )
        checks.check_class_labels(self.model, kwargs, batch)
        return kwargs

    # -- building a configuration --------------------------------------------------------
    def _entry(self, d, shape, sampler, eta, clip, kwargs, amp_dtype) -> _Entry:
        key = self.config_key(d, shape, sampler, eta, clip, kwargs, amp_dtype)
        entry = self._entries.get(key)
        if (
            entry is not None
            and entry.versions is not None
            and entry.versions != op_graph.versions(self._watch)
        ):
            entry = None  # weights changed since the op graph was captured
        if entry is None:
            entry = self._build(key, d, shape, sampler, eta, clip, kwargs, amp_dtype)
            self._entries[key] = entry
        return entry

    def _build(self, key, d, shape, sampler, eta, clip, kwargs, amp_dtype) -> _Entry:
        dev = self.device
        S, B = int(d.num_timesteps), shape[0]
        # Normal tensors even when called under inference_mode: later runs update them in place.
        with torch.inference_mode(False), torch.no_grad():
            x = torch.empty(
                shape,
                device=dev,
                dtype=torch.float32,
                memory_format=_memory_format(shape, self.channels_last),
            ).zero_()
            t_rows = torch.arange(S - 1, -1, -1, device=dev, dtype=torch.long)
            t_rows = t_rows.view(S, 1).expand(S, B).contiguous()
            model_t_rows = d.model_timesteps(t_rows.reshape(-1)).reshape(S, B).contiguous()
            static_kwargs = {k: torch.zeros(v.shape, dtype=v.dtype, device=dev) for k, v in kwargs.items()}
            for k, v in kwargs.items():  # valid values for the warm-up
                static_kwargs[k].copy_(v)
            counter = torch.zeros(1, dtype=torch.long, device=dev)
            sample_index = torch.arange(B, dtype=torch.long, device=dev)
            d.coef_table(dev)  # the step's table, made now: outside graph capture and compilation
        entry = _Entry(
            key=key,
            diffusion=d,
            sampler=sampler,
            eta=eta,
            clip_denoised=clip,
            amp_dtype=amp_dtype,
            x=x,
            t_rows=t_rows,
            model_t_rows=model_t_rows,
            counter=counter,
            sample_index=sample_index,
            kwargs=static_kwargs,
        )
        step = self._step_function(entry)
        self.stats["builds"] += 1

        def warm():
            entry.counter.zero_()
            entry.run_step()
            # back to step 0: the CPU's op-graph capture runs the step once more for real, which
            # must read a valid row (a one-step process has only row 0); sample() resets it too
            entry.counter.zero_()

        if self.mode == "eager":
            entry.run_step = step
        elif self.mode == "compile":
            entry.run_step = torch.compile(step, **self.compile_options)
            self.stats["compiles"] += 1
            self._warn_recompile_limit()
            with torch.no_grad(), capture.rng_preserved(dev):
                warm()  # compiles now, not in the first timed run
        else:  # graph / compile-graph: warm up (compiling first), then capture what warm ran
            if self.mode == "compile-graph":
                step = torch.compile(step, **self.compile_options)
                self.stats["compiles"] += 1
                self._warn_recompile_limit()
            entry.run_step = step
            with torch.no_grad(), capture.rng_preserved(dev):
                replay, graph, info = self._backend.build(warm, step)
            entry.run_step, entry.graph = replay, graph
            if self._watch:
                entry.versions = op_graph.versions(self._watch)
            entry.memory.update(info)
            self.stats["captures"] += 1
        return entry

    def _step_function(self, e: _Entry):
        """The function one step runs (and graph mode captures): reads the static x, the
        device counter, the static sample indices and kwargs; writes x_{t-1} into x (through
        the diffusion's one per-step API, fused, with in-kernel per-sample noise) and advances
        the counter. No host-to-device copies, no host syncs, no allocation that outlives the step."""
        model = self.model
        t_rows, model_t_rows, counter, x, kwargs, index = (
            e.t_rows,
            e.model_t_rows,
            e.counter,
            e.x,
            e.kwargs,
            e.sample_index,
        )
        d = e.diffusion
        kind, clip, eta = e.sampler, e.clip_denoised, e.eta  # samplers are step kinds
        amp_dtype, device_type = e.amp_dtype, self.device.type

        def step():
            t = torch.index_select(t_rows, 0, counter).view(-1)  # [B] int64
            model_t = torch.index_select(model_t_rows, 0, counter).view(-1)  # [B]
            if amp_dtype is None:
                model_output = model(x, model_t, **kwargs)
            else:
                with torch.autocast(device_type, dtype=amp_dtype, cache_enabled=False):
                    model_output = model(x, model_t, **kwargs)
            out = d.step(
                kind,
                model_output,
                x,
                t,
                clip_denoised=clip,
                eta=eta,
                sample_index=index,
                fused=True,
                pred_xstart=False,
            )
            x.copy_(out["sample"])
            counter.add_(1)

        return step

    def _warn_recompile_limit(self):
        limit = getattr(
            torch._dynamo.config, "recompile_limit", getattr(torch._dynamo.config, "cache_size_limit", None)
        )
        if limit is not None and self.stats["compiles"] > limit:
            warnings.warn(
                f"SamplingEngine: {self.stats['compiles']} compiled configurations exceed "
                f"torch._dynamo's recompile limit ({limit}); further ones may run uncompiled",
                stacklevel=3,
            )
