"""Sampling with per-sample seeds, and the sample files (npz, PNG grid, trajectory strip).

Sample i (its global index) has its own ``torch.Generator`` seeded from (seed, i) through
numpy's SeedSequence. From it come, in this order, its class label (class-conditional
models: uniform over the model's own ``num_classes``) and its x_T. The noise of the steps
comes, by ``engine``:

- ``"loop"``: from the same per-sample generator, drawn in chunks of steps after x_T; the
  steps go through ``diffusion.p_sample`` / ``ddim_sample`` with explicit noise, which run
  the fused step kernels where they apply (``diffusion.use_fused``).
- ``"graph"`` | ``"compile"`` | ``"compile-graph"`` | ``"eager"``: the
  :class:`~iddpm_ext.engine.sampling_engine.SamplingEngine` in that mode (one captured/compiled
  step replayed per timestep; ``"graph"`` on the CPU is an op graph) with the fused op's
  in-kernel Philox noise, numbered per sample (``sample_index`` = the global indices, docs/
  step.md) and keyed by one generator seeded from ``seed`` alone (:func:`step_noise_seed`),
  reset at the start of every batch, so step k of every batch uses the same Philox key and
  offset and sample i's noise at step k depends only on (seed, i, k).
- ``"auto"``: ``"graph"`` on CUDA (when ``_C`` has CUDA kernels and ``diffusion.use_fused``
  is on), ``"loop"`` elsewhere.

Either way sample i does not depend on the batch size, on which batch or process made it,
or on the number of processes. The two noise sources differ, so the loop and the engine give
different samples (the same labels and x_T); generators are per device type, so CPU and
CUDA runs differ too (each reproducible).
"""

from __future__ import annotations

import numpy as np
import torch

from .. import dist_util
from ..core.precision import amp_dtype, with_amp
from ..training.progress import progress_bar
from .images import to_uint8

NOISE_CHUNK = 32  # steps of noise drawn at once per sample (loop)
ENGINES = ("auto", "graph", "compile", "compile-graph", "eager", "loop")
_STEP_NOISE_TAG = 0x5354_4550  # "STEP": keeps the step-noise seed apart from the samples' seeds


def sample_seed(seed: int, index: int) -> int:
    """The 63-bit seed of sample ``index``'s generator."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint32)
    return int(state[0]) | (int(state[1] & 0x7FFFFFFF) << 32)


def step_noise_seed(seed: int) -> int:
    """The 63-bit seed of the generator keying the engine's in-kernel step noise: the same
    on every rank and batch (a SeedSequence of its own, never a sample's seed stream)."""
    ss = np.random.SeedSequence([int(seed)], spawn_key=(_STEP_NOISE_TAG,))
    state = ss.generate_state(2, dtype=np.uint32)
    return int(state[0]) | (int(state[1] & 0x7FFFFFFF) << 32)


def _generators(seed, indices, device):
    gens = []
    for i in indices:
        g = torch.Generator(device=device)
        g.manual_seed(sample_seed(seed, i))
        gens.append(g)
    return gens


def resolve_engine(engine, device, diffusion=None) -> str:
    """The sampler for ``engine`` ∈ ENGINES on ``device``: ``auto`` is ``graph`` on CUDA when
    ``_C`` has CUDA kernels and the diffusion's fused step is on, else ``loop``."""
    from .. import ops as _ops

    if engine not in ENGINES:
        raise ValueError(f"engine: expected one of {', '.join(ENGINES)}, got {engine!r}")
    device = torch.device(device)
    if engine == "compile-graph" and device.type != "cuda":
        raise ValueError(
            f"engine: {engine!r} captures CUDA graphs and needs a CUDA device, got {device} "
            "(use graph, eager, compile or loop)"
        )
    if engine != "auto":
        return engine
    fused = bool(getattr(diffusion, "use_fused", True))
    if device.type == "cuda" and fused and _ops.available() and _ops.has_kernel(device):
        return "graph"
    return "loop"


class Sampler:
    """The sampler of a command, resolved once: ``name`` in ("loop", "graph", "compile",
    "eager") and, for the engine modes, one :class:`~iddpm_ext.engine.sampling_engine.SamplingEngine`
    (``engine``) reused across batches (one configuration per batch size: a short last
    batch builds, and in graph mode captures, a second one). ``amp`` (none, bf16, fp16): the
    network runs under autocast in that precision, the steps stay float32. ``capture`` (loop on
    the CPU): the network's forward replayed from op graphs (:func:`iddpm_ext.engine.capture_forward`,
    one per batch shape, kept across batches as ``net``): the same samples, less Python per step."""

    def __init__(self, engine, model, diffusion, device, amp="none", capture=False):
        amp_dtype(amp)  # checked first
        self.name = resolve_engine(engine, device, diffusion)
        self.amp = amp
        self.engine = None
        self.net = None  # the loop's network when captured
        if capture:
            if self.name != "loop" or torch.device(device).type != "cpu":
                raise ValueError(
                    f"capture: op graphs serve the loop sampler on the CPU, got engine {self.name!r} on "
                    f"{torch.device(device)} (the engine's own capture is --engine graph)"
                )
            from ..engine import capture_forward

            self.net = with_amp(capture_forward(model), amp, device)
        if self.name != "loop":
            from ..engine import SamplingEngine

            self.engine = SamplingEngine(model, diffusion, mode=self.name, device=device, amp=amp)


def _sampler(engine, model, diffusion, device, amp="none") -> Sampler:
    if not isinstance(engine, Sampler):
        return Sampler(engine, model, diffusion, device, amp)
    if amp not in ("none", engine.amp):
        raise ValueError(f"amp: expected the Sampler's own amp {engine.amp!r} (or none), got {amp!r}")
    return engine


def model_num_classes(model) -> int | None:
    inner = getattr(model, "module", model)
    return getattr(inner, "num_classes", None)


def _labels_and_x_T(model, gens, indices, shape, label, device):
    """Per-sample class labels ([B] or None) and x_T [B, C, H, W], each from its sample's
    generator (labels first)."""
    n_classes = model_num_classes(model)
    labels = None
    if n_classes is not None:
        if label is None:
            labels = torch.stack([torch.randint(0, n_classes, (), generator=g, device=device) for g in gens])
        else:
            if not 0 <= int(label) < n_classes:
                raise ValueError(f"label: expected a class in [0, {n_classes}), got {label}")
            labels = torch.full((len(indices),), int(label), device=device, dtype=torch.long)
    x = torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])  # [B, C, H, W]
    return labels, x


def _kept_steps(T: int, trajectory_steps: int) -> set:
    if trajectory_steps <= 0:
        return set()
    return {int(round(v)) for v in np.linspace(T - 1, 0, trajectory_steps)}


@torch.no_grad()
def sample_batch(model, diffusion, indices, shape, *, seed=0, use_ddim=False, eta=0.0, clip_denoised=True,
                 label=None, device="cpu", trajectory_steps=0, engine="loop", on_step=None,
                 amp="none"):  # fmt: skip
    """Samples for global ``indices``: (x0 float [B, C, H, W], labels [B] or None, frames).

    ``shape``: (C, H, W). ``label``: None = random classes (class-conditional models),
    an int = that class for all. ``trajectory_steps`` > 0 keeps x_t at that many evenly
    spaced steps (frames: list of (t, [B, C, H, W] on CPU)). ``engine``: one of ENGINES, or
    a :class:`Sampler` (reused across batches by :func:`generate`; see the module docstring).
    ``on_step``: called with no arguments after each denoising step (progress bars).
    ``amp``: none, bf16 or fp16, the network's autocast precision (a :class:`Sampler` brings its own).
    """
    device = torch.device(device)
    sampler = _sampler(engine, model, diffusion, device, amp)
    gens = _generators(seed, indices, device)
    labels, x = _labels_and_x_T(model, gens, indices, shape, label, device)
    keep = _kept_steps(diffusion.num_timesteps, trajectory_steps)
    if sampler.engine is None:
        net = sampler.net if sampler.net is not None else with_amp(model, sampler.amp, device)
        return _loop(net, diffusion, gens, x, labels, use_ddim, eta, clip_denoised, keep, on_step)
    frames = []

    def after_step(t_int, x_t):
        if t_int in keep:  # x_t is the engine's static buffer: copy it
            frames.append((t_int, x_t.to("cpu", torch.float32, copy=True)))
        if on_step is not None:
            on_step()

    # Every batch starts the step-noise generator afresh: step k has the same Philox key and
    # offset in every batch and process, and sample i takes its own stream (sample_index).
    g = torch.Generator(device=device).manual_seed(step_noise_seed(seed))
    out = sampler.engine.sample(
        tuple(x.shape),
        sampler="ddim" if use_ddim else "ancestral",
        eta=eta if use_ddim else 0.0,
        diffusion=diffusion,
        noise=x,
        clip_denoised=clip_denoised,
        y=labels,
        generator=g,
        sample_index=torch.tensor(list(indices), dtype=torch.long),
        callback=after_step if keep or on_step is not None else None,
    )
    return out, labels, frames


class _StepNoise:
    """The loop's step noise: a callable t -> [B, C, H, W] for the library's sampling loops
    (``step_noise=``), drawing each sample's noise from its own generator in chunks of
    NOISE_CHUNK steps. Called for t = T-1 .. 0 in order; ``zeros``: all-zero noise (DDIM
    with eta = 0 uses none)."""

    def __init__(self, gens, x, num_timesteps, zeros=False):
        self.gens, self.shape, self.device = gens, tuple(x.shape[1:]), x.device
        self.T, self.next, self.chunk = num_timesteps, 0, None
        self.zeros = torch.zeros_like(x) if zeros else None

    def __call__(self, t: int) -> torch.Tensor:
        j = self.T - 1 - t
        if j != self.next:
            raise RuntimeError(
                f"step noise asked for timestep {t} out of order (expected {self.T - 1 - self.next})"
            )
        self.next += 1
        if self.zeros is not None:
            return self.zeros
        k = j % NOISE_CHUNK
        if k == 0:
            n = min(NOISE_CHUNK, self.T - j)
            self.chunk = torch.stack(
                [torch.randn((n, *self.shape), generator=g, device=self.device) for g in self.gens], 1
            )  # [n, B, C, H, W]
        return self.chunk[k]


def _loop(model, diffusion, gens, x, labels, use_ddim, eta, clip_denoised, keep, on_step=None):
    """The explicit-noise loop: the library's sampling loop, each step's noise from the
    per-sample generators."""
    model_kwargs = {} if labels is None else {"y": labels}
    T = diffusion.num_timesteps
    noise = _StepNoise(gens, x, T, zeros=use_ddim and eta == 0.0)
    kwargs = dict(noise=x, clip_denoised=clip_denoised, model_kwargs=model_kwargs, step_noise=noise)
    if use_ddim:
        steps = diffusion.ddim_sample_loop_progressive(model, tuple(x.shape), eta=eta, **kwargs)
    else:
        steps = diffusion.p_sample_loop_progressive(model, tuple(x.shape), **kwargs)
    frames = []
    for t_int, out in zip(range(T - 1, -1, -1), steps):
        x = out["sample"]
        if t_int in keep:
            frames.append((t_int, x.float().cpu()))
        if on_step is not None:
            on_step()
    return x.float(), labels, frames


def generate(model, diffusion, num_samples, shape, *, batch_size=16, seed=0, use_ddim=False, eta=0.0,
             clip_denoised=True, label=None, device="cpu", trajectory_steps=0, trajectory_samples=8,
             progress=False, log=print, engine="loop", amp="none"):  # fmt: skip
    """``num_samples`` samples split over the processes (rank r makes a contiguous block of
    global indices, :func:`rank_indices`), gathered on every rank in index order.

    ``engine``: one of ENGINES (module docstring), resolved here once, or a :class:`Sampler`.
    ``amp``: none, bf16 or fp16, the network's autocast precision (a :class:`Sampler` brings its own).
    ``progress``: a tqdm bar on stderr (main process only) ticking once per denoising step of
    every batch, with its rate and the time left.

    :return: dict with "images" uint8 [N, H, W, C] (numpy), "labels" [N] or None,
        "trajectory" (list of (t, [k, C, H, W]) for the first k samples, rank 0's), "seconds",
        "engine" (the sampler used).
    """
    import time

    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    mine = dist_util.rank_indices(num_samples, rank, world)
    counts = dist_util.rank_counts(num_samples, world)
    sampler = _sampler(engine, model, diffusion, device, amp)
    images, labels, trajectory = [], [], []
    starts = range(0, len(mine), batch_size)
    bar = progress_bar(progress, len(starts) * diffusion.num_timesteps, "sample", "step")
    t0 = time.perf_counter()
    for b, s in enumerate(starts):
        bar.set_postfix_str(f"batch {b + 1}/{len(starts)}", refresh=False)
        idx = mine[s : s + batch_size]
        want_traj = trajectory_steps if (s == 0 and rank == 0) else 0
        x, y, frames = sample_batch(
            model,
            diffusion,
            idx,
            shape,
            seed=seed,
            use_ddim=use_ddim,
            eta=eta,
            clip_denoised=clip_denoised,
            label=label,
            device=device,
            trajectory_steps=want_traj,
            engine=sampler,
            on_step=bar.update if not bar.disable else None,
        )
        images.append(to_uint8(x))
        if y is not None:
            labels.append(y)
        if frames:
            trajectory = [(t, f[:trajectory_samples]) for t, f in frames]
    if device != "cpu" and torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    bar.close()
    dev = torch.device(device)
    local = (
        torch.cat(images)
        if images
        else torch.zeros((0, shape[1], shape[2], shape[0]), dtype=torch.uint8, device=dev)
    )
    all_images = dist_util.all_gather_rows(local, counts).cpu().numpy()
    all_labels = None
    if model_num_classes(model) is not None:
        local_y = torch.cat(labels) if labels else torch.zeros((0,), dtype=torch.long, device=dev)
        all_labels = dist_util.all_gather_rows(local_y, counts).cpu().numpy()
    return {
        "images": all_images,
        "labels": all_labels,
        "trajectory": trajectory,
        "seconds": seconds,
        "engine": sampler.name,
    }
