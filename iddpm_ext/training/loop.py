"""The training loop (improved-diffusion's ``TrainLoop``, same arguments, plus ours).

Per step: sample timesteps (uniform or loss-second-moment, whose history is all-gathered
under DDP), compute ``diffusion.training_losses`` per microbatch under bf16/fp16 autocast
(fp16 with a GradScaler), accumulate gradients (microbatch losses are weighted by their
share of the batch, so the gradient does not depend on ``microbatch``; the reference sums
unweighted microbatch means), log and optionally clip the gradient norm, anneal the
learning rate linearly over ``lr_anneal_steps``, step AdamW, update every EMA.

Every ``log_interval`` steps one JSONL record (means over the interval and over ranks of
loss / mse / vb, their quartiles by timestep ``_q0.._q3`` as the reference logs them,
grad_norm, lr, samples/s) is appended to ``progress.jsonl`` and ``loss.png`` is redrawn; when
:mod:`iddpm_ext.logger` is configured (``logger.configure()``, as the reference's scripts do;
``iddpm train`` configures it into its folder) the same values are ``logkv``'d and dumped
there too (key table on stdout / ``log.txt``, ``progress.csv``, TensorBoard, ...).
Checkpoints (see :mod:`iddpm_ext.training.checkpoint`) hold everything needed to continue exactly:
a resumed run takes the same steps as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import threading
import time

import numpy as np
import torch
from torch.profiler import record_function

from .. import dist_util, logger
from ..core.precision import amp_dtype, with_amp
from ..errors import TrainingStopped
from ..resample import LossAwareSampler, UniformSampler
from . import checkpoint as ckpt
from .log import MetricsLog
from .options import (  # noqa: F401
    COMPILE_MODES,
    blob_logdir,
    compile_options,
    parse_ema_rates,
    training_test_mode,
    uses_cudagraphs,
)
from .runlock import RunFolderLock

# Signals that stop training gracefully: finish the step, save it, raise TrainingStopped.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

# loss.png while training runs: first redrawn PLOT_EVERY_S after the loop starts, then again
# PLOT_EVERY_S (or PLOT_COST_FACTOR times the last drawing's time, if longer) after each
# drawing, and at the end. A drawing takes about half a second on one CPU core, so the plot
# costs at most ~2% of the run's time; a run shorter than PLOT_EVERY_S draws it once, at the end.
PLOT_EVERY_S = 30.0
PLOT_COST_FACTOR = 50.0


def _control_group(world: int, device: torch.device):
    """The process group for the per-step stop flag: the default one when it runs on the CPU
    (gloo), else a gloo group, so agreeing on a stop needs no GPU sync (None: one process)."""
    if world <= 1:
        return None
    if torch.distributed.get_backend() == "gloo":
        return torch.distributed.group.WORLD
    if torch.distributed.is_gloo_available():
        return torch.distributed.new_group(backend="gloo")  # collective: every rank constructs a loop
    return torch.distributed.group.WORLD  # then the flag lives on the device


def _fused_adamw_runs(params) -> bool:
    """Whether torch's fused AdamW takes these parameters (floating point, on the CPU or CUDA)."""
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


class TrainLoop:
    """improved-diffusion's TrainLoop (same keyword arguments), plus ours: ``config`` (stored in every
    checkpoint; default: the arguments ``create_model_and_diffusion`` recorded on the model as
    ``model.iddpm_config``), ``out_dir``, ``amp``, ``grad_clip``, ``max_steps``, ``seed``,
    ``keep_checkpoints``, ``progress`` (a progress bar; default: unless the logger prints its key
    tables to stdout), ``log`` (messages; default: ``logger.log`` once the logger is configured (or
    ``out_dir`` was not given), else ``print``), ``channels_last`` (train the UNet's torso in NHWC:
    :meth:`UNetModel.set_channels_last`; checkpoints are the same either way), ``compile`` (run the
    network's forward and backward through ``torch.compile``: ``"none"``, a mode of COMPILE_MODES such
    as ``"max-autotune"`` or ``"reduce-overhead"`` (CUDA graphs), or a dict of ``torch.compile``
    arguments; the diffusion losses, optimizer and EMA stay eager; checkpoints and state-dict keys are
    the same either way; dropout draws its masks from the compiled graph's random stream, so with
    dropout the numbers differ from an eager run), ``fused_optimizer`` (True, the default: torch's
    fused AdamW where the parameters allow it (floating point, CPU or CUDA), the reference's update
    up to float rounding, faster (docs/training.md); False: the per-tensor AdamW the reference runs;
    a resumed run keeps its own choice, whatever the checkpoint's, and its moments are laid out as
    its parameters).

    ``out_dir`` given: that folder, which must not hold another run unless it is resumed
    (``resume_checkpoint``). Not given (the reference's way): ``$DIFFUSION_BLOB_LOGDIR``, else the
    logger's folder: the configured one, else the default logger's, which the reference's logger makes
    on first use (``$OPENAI_LOGDIR``, else a new ``openai-<time>`` folder under the system temp dir)
    and the trainer then logs into as well; a run already there is resumed from its latest step, as
    the reference's ``find_resume_checkpoint`` hook would. With ``$DIFFUSION_TRAINING_TEST`` set,
    :meth:`run_loop` returns after its first checkpoint (the reference's hook for integration tests).

    Steps count updates done: the checkpoints of step N (``model%06d``) hold the weights after N
    updates (the reference numbers from 0: its ``model000000.pt`` is after one update).
    The reference's attributes ``ema_rate`` (the rates as floats), ``resume_checkpoint``,
    ``resume_step`` (the step a resumed run started from, else 0; ``step`` counts on from it),
    ``use_fp16`` and ``fp16_scale_growth`` are kept as given.

    The run folder is locked (:mod:`iddpm_ext.training.runlock`) from construction until
    :meth:`run_loop` returns or :meth:`close` is called: a second run or resume into it
    raises RunFolderLockedError. During :meth:`run_loop` (main thread), SIGINT and SIGTERM
    finish the current step, save a checkpoint of it (every rank agreeing on the step) and
    raise :class:`iddpm_ext.errors.TrainingStopped`; a second signal stops at once."""

    def __init__(self, *, model, diffusion, data, batch_size, microbatch, lr, ema_rate, log_interval,
                 save_interval, resume_checkpoint, use_fp16=False, fp16_scale_growth=1e-3,
                 schedule_sampler=None, weight_decay=0.0, lr_anneal_steps=0, config=None, out_dir=None,
                 amp="none", grad_clip=0.0, max_steps=0, seed=0, keep_checkpoints=0, progress=None,
                 log=None, channels_last=False, compile="none", fused_optimizer=True):  # fmt: skip
        compile_kwargs = compile_options(compile)  # a bad value fails before anything is done
        amp_dtype(amp)  # a bad value fails here too
        if not isinstance(channels_last, bool):
            raise ValueError(f"channels_last: expected True or False, got {channels_last!r}")
        if channels_last:
            if not hasattr(model, "set_channels_last"):
                raise ValueError(
                    f"channels_last: expected a model with a channels-last format (UNetModel), "
                    f"got {type(model).__name__}"
                )
            model.set_channels_last(True)  # before the optimizer and EMA copy the parameters
        if use_fp16 and amp == "none":
            amp = "fp16"  # the reference's flag; fp16_scale_growth has no role with GradScaler
        for name, value in (
            ("batch_size", batch_size),
            ("log_interval", log_interval),
            ("save_interval", save_interval),
        ):
            if int(value) < 1:
                raise ValueError(f"{name}: expected a positive int, got {value}")
        for name, value, zero in (
            ("max_steps", max_steps, "no limit"),
            ("lr_anneal_steps", lr_anneal_steps, "no annealing"),
            ("keep_checkpoints", keep_checkpoints, "keep all"),
        ):
            if int(value) < 0:
                raise ValueError(f"{name}: expected an int >= 0 (0: {zero}), got {value}")
        self.model = model
        self.diffusion = diffusion
        self.data = data
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.lr = lr
        self.ema_rates = parse_ema_rates(ema_rate)
        self.ema_rate = list(self.ema_rates)  # the reference's name
        self.resume_checkpoint = resume_checkpoint
        self.use_fp16, self.fp16_scale_growth = use_fp16, fp16_scale_growth
        self.log_interval = log_interval
        self.save_interval = save_interval
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion)
        self.weight_decay = weight_decay
        self.lr_anneal_steps = lr_anneal_steps
        self.config = dict(config or getattr(model, "iddpm_config", None) or {})
        find_run = not out_dir and not resume_checkpoint
        self.out_dir = out_dir = out_dir or blob_logdir()
        self.amp = amp
        self.channels_last = channels_last
        self.grad_clip = grad_clip
        self.max_steps = max_steps
        self.seed = seed
        self.keep_checkpoints = keep_checkpoints
        if log is None:
            log = logger.log if logger.is_configured() else print
        self.log = log if dist_util.is_main() else (lambda *a, **k: None)
        if progress is None:
            progress = not logger.prints_table()
        self.progress = progress and dist_util.is_main()

        self.device = next(model.parameters()).device
        self.rank, self.world = dist_util.get_rank(), dist_util.get_world_size()
        self.global_batch = batch_size * self.world
        self.step = 0
        self._stop_signal = 0  # the first stop signal received (0: none)
        self._stop_group = _control_group(self.world, self.device)

        # Randomness: torch (noise, dropout) and the timestep sampler, per rank.
        torch.manual_seed(seed + self.rank)
        random.seed(seed + self.rank)
        self.t_rng = np.random.default_rng([seed, self.rank, 1])

        self.params = list(model.parameters())
        if not isinstance(fused_optimizer, bool):
            raise ValueError(f"fused_optimizer: expected True or False, got {fused_optimizer!r}")
        # torch's fused AdamW (one kernel over all parameters) where it runs: the same update up to
        # float rounding, faster than the per-tensor loop (iddpm bench train --breakdown).
        self.fused_optimizer = fused_optimizer and _fused_adamw_runs(self.params)
        self.opt = torch.optim.AdamW(
            self.params, lr=lr, weight_decay=weight_decay, fused=True if self.fused_optimizer else None
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=(amp == "fp16"))
        resume_step = None
        self._lock = RunFolderLock(out_dir)
        self._locked = False
        self._take_lock()  # before looking at the folder: two runs must not both find it free
        try:
            if find_run and os.path.isdir(out_dir):
                found = ckpt.read_latest(out_dir)
                if found is not None:
                    self.log(
                        f"{out_dir} holds a training run saved at step {found['step']}: resuming it "
                        "(for a new run, point OPENAI_LOGDIR or out_dir at another folder)"
                    )
                    resume_checkpoint = out_dir
            if resume_checkpoint:
                resume_step = self._resume(resume_checkpoint)
            else:
                existing = ckpt.read_latest(out_dir) if os.path.isdir(out_dir) else None
                if existing is not None:
                    raise ckpt.CheckpointError(
                        f"{out_dir}: already holds a training run (saved step {existing['step']}); continue "
                        f"it with --resume_checkpoint {out_dir} or choose another --out_dir"
                    )
                dist_util.broadcast_params(self.params)
                self.ema_params = [[p.detach().clone() for p in self.params] for _ in self.ema_rates]
        except BaseException:
            self.close()
            raise

        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp_model = DDP(
                model,
                device_ids=[self.device] if self.device.type == "cuda" else None,
                broadcast_buffers=False,
                find_unused_parameters=False,
            )
        else:
            self.ddp_model = model
        self.compile = compile_kwargs
        self._cudagraphs = uses_cudagraphs(compile_kwargs)  # ("reduce-overhead", "max-autotune")
        # The network as the losses call it: compiled (its forward and backward), under autocast.
        self.forward_model = self.ddp_model
        if compile_kwargs is not None:
            self.forward_model = torch.compile(self.ddp_model, **compile_kwargs)
        self.forward_model = with_amp(self.forward_model, amp, self.device)

        self.resume_step = resume_step or 0
        self.metrics = None
        if dist_util.is_main():
            os.makedirs(out_dir, exist_ok=True)
            ckpt.remove_stale_temporaries(out_dir)
            self.metrics = MetricsLog(
                os.path.join(out_dir, "progress.jsonl"),
                os.path.join(out_dir, "loss.png"),
                resume_step=resume_step,
                num_timesteps=diffusion.num_timesteps,
            )
        self._reset_accumulators()

    # ------------------------------------------------------------------------------
    # the run-folder lock
    # ------------------------------------------------------------------------------

    def _take_lock(self):
        """Lock the run folder (rank 0) and let every rank know: all raise the same
        RunFolderLockedError when rank 0 could not lock it."""
        if self._locked:
            return
        error = None
        if dist_util.is_main():
            try:
                self._lock.acquire()
            except (ValueError, OSError) as err:  # RunFolderLockedError, or the folder cannot be made
                error = err
        if self.world > 1:
            error = dist_util.broadcast_object(error)
        if error is not None:
            raise error
        self._locked = True

    def close(self):
        """Release the run folder's lock (run_loop does it when it returns or raises)."""
        self._locked = False
        self._lock.release()

    # ------------------------------------------------------------------------------
    # resume
    # ------------------------------------------------------------------------------

    def _resume(self, path) -> int:
        files = ckpt.resolve_resume(path)
        same_dir = os.path.abspath(os.path.dirname(files["model"])) == os.path.abspath(self.out_dir)
        latest = ckpt.read_latest(self.out_dir) if os.path.isdir(self.out_dir) else None
        if latest is not None and latest["step"] > files["step"] and same_dir:
            raise ckpt.CheckpointError(
                f"{path}: resuming step {files['step']} into {self.out_dir}, which already holds later steps "
                f"(up to {latest['step']}) that would be overwritten; choose another --out_dir"
            )
        state, config, meta = ckpt.load_weights(files["model"])
        ckpt.check_step(files["model"], meta, files["step"])
        if config is not None and self.config:
            ckpt.check_config(files["model"], config, self.config)
        ckpt.load_into(self.model, state, files["model"])
        self.log(f"resuming from {files['model']} (step {files['step']})")
        self.ema_params = []
        for rate in self.ema_rates:
            ema_path = files["ema"].get(str(rate))
            if ema_path is None:
                self.log(f"no EMA file for rate {rate} at step {files['step']}: starting it from the model")
                self.ema_params.append([p.detach().clone() for p in self.params])
                continue
            ema_state, _, ema_meta = ckpt.load_weights(ema_path)
            ckpt.check_step(ema_path, ema_meta, files["step"])
            names = [n for n, _ in self.model.named_parameters()]
            missing = [n for n in names if n not in ema_state]
            if missing:
                raise ckpt.CheckpointError(
                    f"{ema_path}: missing {len(missing)} parameters (e.g. {missing[:3]})"
                )
            self.ema_params.append(
                [ema_state[n].to(self.device, p.dtype).clone() for n, p in zip(names, self.params)]
            )
        self.step = files["step"]
        if files["opt"]:
            self._load_train_state(ckpt.load_train_state(files["opt"]), files["opt"], files["step"])
        else:
            self.log(
                f"no training state (opt{files['step']:06d}.pt) next to {files['model']}: "
                "fresh optimizer, data order and RNG"
            )
        return self.step

    def _optimizer_state(self, saved: dict) -> dict:
        """A saved optimizer state with this run's AdamW implementation in its param_groups (set
        before loading, so torch places the step counters where that implementation wants them:
        on the parameters' device for the fused kernel)."""
        flags = {"fused": True, "foreach": None} if self.fused_optimizer else {"fused": None}
        return {**saved, "param_groups": [{**g, **flags} for g in saved["param_groups"]]}

    def _load_train_state(self, state, path, step=None):
        if not isinstance(state, dict):
            raise ckpt.CheckpointError(
                f"{path}: expected a dict of training state, got {type(state).__name__}"
            )
        reference = "optimizer" not in state and "param_groups" in state  # improved-diffusion's opt*.pt
        if not reference and step is not None:
            ckpt.check_step(path, {"step": state.get("step")}, step)
        try:
            self.opt.load_state_dict(self._optimizer_state(state if reference else state["optimizer"]))
        except (KeyError, ValueError, TypeError) as err:
            raise ckpt.CheckpointError(f"{path}: optimizer state does not fit this model ({err})") from None
        # Each moment in its parameter's memory layout: the fused kernel walks them as flat buffers
        # (a run saved channels-last and resumed NCHW, or the reference's NCHW state in a
        # channels-last run, would pair mismatched elements).
        for p, st in self.opt.state.items():
            for key, value in st.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    st[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
        if reference:
            return
        self.step = int(state["step"])
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        hist = state.get("sampler")
        if (
            hist is not None
            and isinstance(self.schedule_sampler, LossAwareSampler)
            and hasattr(self.schedule_sampler, "load_state_dict")
        ):
            self.schedule_sampler.load_state_dict({k: v.numpy() for k, v in hist.items()})
        if "data" in state and hasattr(self.data, "load_state_dict"):
            if not self.data.load_state_dict(state["data"]):
                self.log(
                    "data layout changed (batch size, processes or data set): the data order continues "
                    "after the same number of images, not exactly"
                )
        rng = state.get("rng") or []
        if len(rng) == self.world:
            mine = rng[self.rank]
            torch.set_rng_state(mine["torch"])
            if mine.get("cuda") is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(mine["cuda"], self.device)
            self.t_rng.bit_generator.state = json.loads(mine["t_rng"])
            py = json.loads(mine["python"])
            random.setstate((py[0], tuple(py[1]), py[2]))
        else:
            self.log(
                f"{path}: saved by {len(rng)} process(es), resumed by {self.world}: RNG states not restored"
            )

    # ------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------

    def _done(self) -> bool:
        if self.max_steps and self.step >= self.max_steps:
            return True
        return bool(self.lr_anneal_steps) and self.step >= self.lr_anneal_steps

    def run_loop(self):
        """Train until ``max_steps`` / ``lr_anneal_steps`` (or forever), saving every
        ``save_interval`` steps and at the end. SIGINT / SIGTERM: see the class docstring."""
        self._take_lock()
        try:
            with self._stop_signals():
                self._run_loop()
        finally:
            self.close()

    def _run_loop(self):
        if self._done() and self.step:  # e.g. a finished run started again
            self.log(
                f"nothing to train: the run is at step {self.step}, where it stops "
                "(raise lr_anneal_steps or max_steps to go on)"
            )
        total = self.max_steps or self.lr_anneal_steps or None
        if self.lr_anneal_steps and self.max_steps:
            total = min(self.max_steps, self.lr_anneal_steps)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=self.step, desc="train", dynamic_ncols=True)
        self._t_log = time.perf_counter()
        plot_due = time.perf_counter() + PLOT_EVERY_S
        saved_at = self.step
        stop = 0
        try:
            while not stop and not self._done():
                batch, cond = next(self.data)
                self.run_step(batch, cond)
                if bar is not None:
                    bar.update(1)
                if self.step % self.log_interval == 0:
                    record = self._write_log()
                    if bar is not None and record:
                        bar.set_postfix(loss=f"{record['loss']:.4f}")
                    if self.metrics and time.perf_counter() >= plot_due:
                        t_plot = time.perf_counter()
                        self.metrics.plot(title=f"training ({self.out_dir})")
                        spent = time.perf_counter() - t_plot
                        plot_due = time.perf_counter() + max(PLOT_EVERY_S, PLOT_COST_FACTOR * spent)
                if self.step % self.save_interval == 0:
                    self.save()
                    saved_at = self.step
                    if training_test_mode():  # same env on every rank: all stop here
                        break
                stop = self._agreed_stop()
            if self._acc["steps"]:  # the steps since the last record (every rank: a collective)
                self._write_log()
            if saved_at != self.step:
                self.save()
            if self.metrics:
                self.metrics.plot(title=f"training ({self.out_dir})")
        finally:
            if bar is not None:
                bar.close()
        if stop:
            raise TrainingStopped(stop, self.step, self.out_dir)

    # ------------------------------------------------------------------------------
    # graceful stop
    # ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _stop_signals(self):
        """SIGINT / SIGTERM set a flag that the loop reads after each step (a second one
        stops at once); the previous handlers come back afterwards. Main thread only."""
        self._stop_signal = 0
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        # Signals ignored by whoever started us (a background job's SIGINT) stay ignored.
        previous = {s: signal.getsignal(s) for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}

        def restore():
            for s, handler in previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)

        def on_signal(signum, frame):
            if not self._stop_signal:
                self._stop_signal = signum  # no printing here: the handler may interrupt a print
                return
            restore()  # the second signal: stop now (checkpoints are written atomically)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

        for s in previous:
            signal.signal(s, on_signal)
        try:
            yield
        finally:
            restore()

    def _agreed_stop(self) -> int:
        """The stop signal every rank agrees on after this step (0: go on): the largest
        signal number any rank received, so all ranks save the same step and stop."""
        signum = self._stop_signal
        if self.world > 1:
            on_cpu = self._stop_group is not torch.distributed.group.WORLD or self.device.type == "cpu"
            flag = torch.tensor([signum], dtype=torch.int32, device="cpu" if on_cpu else self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._stop_group)
            signum = int(flag.item())
        if signum:
            name = signal.Signals(signum).name
            self.log(f"{name}: stopping after step {self.step}, saving a checkpoint (again to stop at once)")
        return signum

    def run_step(self, batch, cond):
        self.forward_backward(batch, cond)
        self.optimize()
        self.step += 1

    def forward_backward(self, batch, cond):
        self.opt.zero_grad(set_to_none=True)
        n_total = batch.shape[0]
        for i in range(0, n_total, self.microbatch):
            # [m, C, H, W] as the data gives it, also with channels_last: the model converts its
            # torso's activations, and the noise drawn like x_start stays the same numbers.
            micro = batch[i : i + self.microbatch].to(self.device)
            micro_cond = {k: v[i : i + self.microbatch].to(self.device) for k, v in cond.items()}
            last = i + self.microbatch >= n_total
            t, weights = self.schedule_sampler.sample(micro.shape[0], self.device, rng=self.t_rng)
            sync = contextlib.nullcontext() if (last or self.world == 1) else self.ddp_model.no_sync()
            if self._cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are dead
            with sync:
                losses = self.diffusion.training_losses(self.forward_model, micro, t, model_kwargs=micro_cond)
                if isinstance(self.schedule_sampler, LossAwareSampler):
                    self.schedule_sampler.update_with_local_losses(t, losses["loss"].detach())
                loss = (losses["loss"] * weights).mean() * (micro.shape[0] / n_total)
                self._accumulate(t, {k: v.detach() * weights for k, v in losses.items()})
                self.scaler.scale(loss).backward()

    def optimize(self):
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.opt)
        max_norm = self.grad_clip if self.grad_clip and self.grad_clip > 0 else float("inf")
        grads = [p.grad for p in self.params if p.grad is not None]
        with record_function("iddpm.grad_norm"):  # (named for iddpm bench train --breakdown)
            norm = (
                torch.nn.utils.clip_grad_norm_(self.params, max_norm)
                if grads
                else torch.zeros((), device=self.device)
            )
        self._acc["grad_norm"] += norm.detach().float()
        self._acc["steps"] += 1
        if self.lr_anneal_steps:
            frac_done = self.step / self.lr_anneal_steps
            for group in self.opt.param_groups:
                group["lr"] = self.lr * (1 - frac_done)
        if self.scaler.is_enabled():
            scale_before = self.scaler.get_scale()
            self.scaler.step(self.opt)
            self.scaler.update()
            if self.scaler.get_scale() < scale_before:  # inf/NaN gradients: the step was skipped
                return
        else:
            self.opt.step()
        with torch.no_grad(), record_function("iddpm.ema"):
            for rate, ema in zip(self.ema_rates, self.ema_params):
                torch._foreach_lerp_(ema, [p.detach() for p in self.params], 1.0 - rate)

    # ------------------------------------------------------------------------------
    # metrics
    # ------------------------------------------------------------------------------

    def _reset_accumulators(self):
        z = lambda *s: torch.zeros(*s, device=self.device, dtype=torch.float64)  # noqa: E731
        self._acc = {
            "grad_norm": z(()),
            "steps": 0,
            "sums": {},
            "counts": z(()),
            "q_sums": {},
            "q_counts": z(4),
        }

    def _accumulate(self, t, losses):
        acc = self._acc
        q = (4 * t // self.diffusion.num_timesteps).clamp_(0, 3)
        acc["counts"] += t.shape[0]
        acc["q_counts"].index_add_(0, q, torch.ones_like(t, dtype=torch.float64))
        for key, values in losses.items():
            v = values.double()
            acc["sums"].setdefault(key, torch.zeros((), device=self.device, dtype=torch.float64))
            acc["sums"][key] += v.sum()
            acc["q_sums"].setdefault(key, torch.zeros(4, device=self.device, dtype=torch.float64))
            acc["q_sums"][key].index_add_(0, q, v)

    def _write_log(self):
        acc = self._acc
        keys = sorted(acc["sums"])
        steps = max(acc["steps"], 1)  # fewer than log_interval right after a resume
        # One all-reduce of [counts, q_counts(4), grad_norm, per key: sum, q_sums(4)].
        flat = torch.cat(
            [acc["counts"].view(1), acc["q_counts"], acc["grad_norm"].view(1)]
            + [torch.cat([acc["sums"][k].view(1), acc["q_sums"][k]]) for k in keys]
        )
        flat = dist_util.all_reduce_sum(flat).tolist()
        now = time.perf_counter()
        elapsed, self._t_log = now - self._t_log, now
        self._reset_accumulators()
        if not dist_util.is_main():
            return None
        count, q_counts, grad_norm = flat[0], flat[1:5], flat[5] / self.world / steps
        record = {
            "step": self.step,
            "samples": self.step * self.global_batch,
            "lr": self.opt.param_groups[0]["lr"],
        }
        for j, key in enumerate(keys):
            base = 6 + 5 * j
            record[key] = flat[base] / max(count, 1)
            for qi in range(4):
                if q_counts[qi] > 0:
                    record[f"{key}_q{qi}"] = flat[base + 1 + qi] / q_counts[qi]
        record["grad_norm"] = grad_norm
        record["samples_per_s"] = steps * self.global_batch / max(elapsed, 1e-9)
        if self.scaler.is_enabled():
            record["loss_scale"] = self.scaler.get_scale()
        self.metrics.append(record)
        if logger.is_configured():  # the reference's key-value log too
            logger.logkvs(record)
            logger.dumpkvs()
        return record

    # ------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------

    def _rng_state(self) -> dict:
        py = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "t_rng": json.dumps(self.t_rng.bit_generator.state),
            "python": json.dumps([py[0], list(py[1]), py[2]]),
        }

    def _state_dict_from(self, params) -> dict:
        state = self.model.state_dict()
        for (name, _), p in zip(self.model.named_parameters(), params):
            state[name] = p
        return state

    def save(self):
        """Write the checkpoint files of this step, then latest.json (rank 0; all ranks
        take part in gathering the RNG states)."""
        rng_states = [self._rng_state()]
        if self.world > 1:
            gathered = [None] * self.world
            torch.distributed.all_gather_object(
                gathered, {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in rng_states[0].items()}
            )
            rng_states = gathered
        if dist_util.is_main():
            s = self.step
            meta = dict(step=s)
            model_name = f"model{s:06d}.safetensors"
            ckpt.save_weights(
                os.path.join(self.out_dir, model_name),
                self._state_dict_from(self.params),
                self.config,
                kind="model",
                **meta,
            )
            ema_names = {}
            for rate, params in zip(self.ema_rates, self.ema_params):
                name = f"ema_{rate}_{s:06d}.safetensors"
                ckpt.save_weights(
                    os.path.join(self.out_dir, name),
                    self._state_dict_from(params),
                    self.config,
                    kind="ema",
                    rate=rate,
                    **meta,
                )
                ema_names[str(rate)] = name
            sampler = None
            if hasattr(self.schedule_sampler, "state_dict"):
                sampler = {
                    k: torch.from_numpy(np.asarray(v)) for k, v in self.schedule_sampler.state_dict().items()
                }
            state = {
                "format": 1,
                "step": s,
                "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "rng": rng_states,
                "sampler": sampler,
                "data": self.data.state_dict() if hasattr(self.data, "state_dict") else None,
                "ema_rates": [str(r) for r in self.ema_rates],
                "world_size": self.world,
                "config": json.dumps(self.config, sort_keys=True),
                "seed": self.seed,
            }
            opt_name = f"opt{s:06d}.pt"
            ckpt.save_train_state(os.path.join(self.out_dir, opt_name), state)
            ckpt.write_latest(self.out_dir, s, {"model": model_name, "ema": ema_names, "opt": opt_name})
            self._prune()
        dist_util.barrier()

    def _prune(self):
        """Keep the newest ``keep_checkpoints`` steps (0: keep all); runs after latest.json."""
        if self.keep_checkpoints <= 0:
            return
        steps = sorted(
            {
                ckpt.step_from_filename(n)
                for n in os.listdir(self.out_dir)
                if n.startswith(("model", "ema_", "opt"))
                and not n.startswith(".")
                and n.endswith((".safetensors", ".pt"))
            }
        )
        for old in steps[: -self.keep_checkpoints]:
            if old == self.step:
                continue
            for n in os.listdir(self.out_dir):
                if ckpt.step_from_filename(n) == old and n.startswith(("model", "ema_", "opt")):
                    os.remove(os.path.join(self.out_dir, n))
