"""``iddpm train``, ``iddpm sample`` and ``iddpm nll``: the work behind the commands
(improved-diffusion's image_train.py / image_sample.py / image_nll.py), single process or
under ``torchrun`` (see :mod:`iddpm_ext.dist_util`)."""

from __future__ import annotations

import inspect
import json
import math
import os
import time

import numpy as np
import torch

from .. import dist_util, logger
from ..core.checks import check_eta
from ..core.precision import amp_dtype, with_amp
from ..errors import TrainingStopped
from ..io import check_writable_dir
from ..script_util import create_model_and_diffusion
from ..training import checkpoint as ckpt
from .flags import model_config

# Flags that may differ between training and use: the checkpoint's value never overrides them.
_USE_TIME_KEYS = ("timestep_respacing", "use_checkpoint", "dropout")


def _check_out_dir(out_dir: str):
    """--out_dir usable? Asked before any work (so before the process group exists), by the
    process that writes there: rank 0 under torchrun, which stops the others when it fails."""
    if os.environ.get("RANK", "0") == "0":
        check_writable_dir(out_dir, "out_dir")


def _say(*a):
    if dist_util.is_main():
        print(*a, flush=True)


def resolve_model(model_path: str, args, explicit: set):
    """(weights path, state dict, config): the checkpoint's config fills the model and
    diffusion flags that were not given; given ones must agree with it."""
    path = ckpt.model_path_from(model_path)
    state, stored, meta = ckpt.load_weights(path)
    if os.path.isdir(model_path) or os.path.basename(model_path) == ckpt.LATEST:
        ckpt.check_step(path, meta, ckpt.resolve_resume(model_path)["step"])
    config = model_config(args)
    if stored is not None:
        ckpt.check_config(path, stored, config, explicit)
        for k, v in stored.items():
            if k in config and k not in explicit and k not in _USE_TIME_KEYS:
                config[k] = v
    return path, state, config


def build(config: dict, device):
    model, diffusion = create_model_and_diffusion(**config)
    return model.to(device), diffusion


def annealed_run(config: dict, data, steps: int, out_dir: str, device, *, seed: int,
                 schedule_sampler="uniform", **loop_kwargs):  # fmt: skip
    """A TrainLoop of ``steps`` steps for a fresh model of ``config`` (initial weights from
    ``seed``), the learning rate annealed to 0 over them and one checkpoint at the end: the
    short runs of the demo and the reproduction. ``loop_kwargs``: batch_size, lr, ema_rate, ..."""
    from ..resample import create_named_schedule_sampler
    from ..training.loop import TrainLoop

    torch.manual_seed(seed)
    model, diffusion = build(config, device)
    sampler = create_named_schedule_sampler(schedule_sampler, diffusion)
    return TrainLoop(model=model, diffusion=diffusion, data=data, microbatch=-1, save_interval=steps,
                     resume_checkpoint="", lr_anneal_steps=steps, schedule_sampler=sampler, config=config,
                     out_dir=out_dir, seed=seed, **loop_kwargs)  # fmt: skip


# -------------------------------------------------------------------------------------
# train
# -------------------------------------------------------------------------------------


def cmd_train(args, explicit: set) -> dict:
    from ..resample import create_named_schedule_sampler
    from ..training.data import BatchStream, open_source
    from ..training.loop import TrainLoop

    if "out_dir" not in explicit and os.environ.get("OPENAI_LOGDIR"):
        args.out_dir = os.environ["OPENAI_LOGDIR"]  # --out_dir, then $OPENAI_LOGDIR, then the default
    log_formats = ["log", "csv"] + ([] if args.progress else ["stdout"])
    log_formats += ["tensorboard"] if args.tensorboard else []
    logger.check_formats(log_formats)  # tensorboard missing: one line, before any work
    _check_out_dir(args.out_dir)
    device = dist_util.setup_dist(args.device or None)
    config = model_config(args)
    if args.resume_checkpoint:
        files = ckpt.resolve_resume(args.resume_checkpoint)
        _, stored, _ = ckpt.load_weights(files["model"])
        if stored is not None:
            ckpt.check_config(files["model"], stored, config, explicit)
            config.update(
                {
                    k: v
                    for k, v in stored.items()
                    if k in config and k not in explicit and k not in _USE_TIME_KEYS
                }
            )
    if config["timestep_respacing"]:
        _say("note: training with --timestep_respacing trains the respaced process")
    source = open_source(
        args.data_dir,
        image_size=config["image_size"],
        image_channels=config["image_channels"],
        split="train",
        resize=args.resize,
    )
    if config["class_cond"]:
        if source.labels is None:
            raise ValueError(f"class_cond: {source.description} has no class labels")
        if source.num_classes > config["num_classes"]:
            raise ValueError(
                f"num_classes: the data has {source.num_classes} classes, more than "
                f"--num_classes {config['num_classes']}"
            )
    data = BatchStream(
        source,
        args.batch_size,
        rank=dist_util.get_rank(),
        world=dist_util.get_world_size(),
        seed=args.seed,
        random_flip=args.random_flip,
        class_cond=config["class_cond"],
        num_workers=args.num_workers,
    )
    torch.manual_seed(args.seed)  # the same initial weights on every rank (rank 0's are broadcast too)
    model, diffusion = build(config, device)
    n_params = sum(p.numel() for p in model.parameters())
    _say(
        f"data: {source.description}; model: {n_params:,} parameters; "
        f"{dist_util.get_world_size()} process(es) on {device}; out_dir {args.out_dir}"
    )
    sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion)
    # TrainLoop's keyword arguments come from the flags of the same names.
    flags = {k: v for k, v in vars(args).items() if k in inspect.signature(TrainLoop).parameters}
    flags.update(model=model, diffusion=diffusion, data=data, schedule_sampler=sampler, config=config)
    loop = TrainLoop(log=print, **flags)
    if not (args.max_steps or args.lr_anneal_steps):
        _say("no --max_steps or --lr_anneal_steps: training until interrupted (Ctrl-C)")
    t0 = time.perf_counter()
    # The key-value log (log.txt, progress.csv, ...) starts once the folder is accepted, so a
    # refused run never truncates another run's files; only the main process writes it.
    with logger.scoped_configure(args.out_dir, log_formats if dist_util.is_main() else []):
        try:
            loop.run_loop()
        except TrainingStopped:
            dist_util.cleanup()
            raise
    _say(
        f"trained to step {loop.step} in {time.perf_counter() - t0:.1f} s; checkpoints, progress.jsonl, "
        f"progress.csv, log.txt and loss.png in {args.out_dir}"
    )
    dist_util.cleanup()
    return {"step": loop.step, "out_dir": args.out_dir}


# -------------------------------------------------------------------------------------
# sample
# -------------------------------------------------------------------------------------


def _for_inference(model, inference: bool):
    """Eval mode, and with ``--inference`` the UNet's inference fast paths (to_inference)."""
    model.eval()
    if inference:
        if not hasattr(model, "to_inference"):
            raise ValueError(f"inference: {type(model).__name__} has no inference fast paths (to_inference)")
        model.to_inference()


def _precision_note(args) -> str:
    notes = ([f"amp {args.amp}"] if args.amp != "none" else []) + (["to_inference"] if args.inference else [])
    notes += ["op-graph capture"] if getattr(args, "capture", False) else []
    return "".join(f", {n}" for n in notes)


def cmd_sample(args, explicit: set) -> dict:
    from . import generate as S
    from . import images

    if not args.model_path:
        raise ValueError("model_path: expected a checkpoint file or run folder, got nothing")
    if args.num_samples < 1 or args.batch_size < 1:
        raise ValueError(
            f"num_samples, batch_size: expected positive ints, got {args.num_samples}, {args.batch_size}"
        )
    check_eta(args.eta)
    amp_dtype(args.amp)
    _check_out_dir(args.out_dir)
    device = dist_util.setup_dist(args.device or None)
    path, state, config = resolve_model(args.model_path, args, explicit)
    model, diffusion = build(config, device)
    ckpt.load_into(model, state, path)
    _for_inference(model, args.inference)
    if hasattr(diffusion, "use_fused"):
        diffusion.use_fused = bool(args.fused)
    c, h = config["image_channels"], config["image_size"]
    npz = os.path.join(args.out_dir, f"samples_{args.num_samples}x{h}x{h}x{c}.npz")
    png = os.path.join(args.out_dir, "samples.png")
    traj = os.path.join(args.out_dir, "trajectory.png") if args.trajectory else None
    if dist_util.is_main() and not args.overwrite:
        images.check_outputs_free([npz, png, traj])
    steps = diffusion.num_timesteps
    sampler = S.Sampler(args.engine, model, diffusion, device, args.amp, args.capture)  # resolved once
    engine = sampler.name
    _say(
        f"sampling {args.num_samples} images from {path} "
        f"({'DDIM η=' + str(args.eta) if args.use_ddim else 'ancestral'}, {steps} steps, engine {engine}"
        f"{_precision_note(args)}, {dist_util.get_world_size()} process(es) on {device})"
    )
    res = S.generate(
        model,
        diffusion,
        args.num_samples,
        (c, h, h),
        batch_size=args.batch_size,
        seed=args.seed,
        use_ddim=args.use_ddim,
        eta=args.eta,
        clip_denoised=args.clip_denoised,
        label=None if args.label < 0 else args.label,
        device=device,
        trajectory_steps=args.trajectory,
        progress=args.progress,
        engine=sampler,
    )
    if dist_util.is_main():
        images.save_npz(npz, res["images"], res["labels"], overwrite=args.overwrite)
        images.save_grid(png, res["images"][:256], overwrite=args.overwrite)
        if traj:
            images.save_trajectory(traj, res["trajectory"], overwrite=args.overwrite, diffusion=diffusion)
        per = res["seconds"] / max(1, math.ceil(args.num_samples / dist_util.get_world_size()))
        _say(
            f"wrote {npz} and {png}{' and ' + traj if traj else ''}; {res['seconds']:.1f} s "
            f"({1000 * per:.1f} ms per sample per process, engine {engine}, "
            f"fused={getattr(diffusion, 'use_fused', False) or engine != 'loop'})"
        )
    dist_util.barrier()
    dist_util.cleanup()
    return {
        "npz": npz,
        "png": png,
        "images": res["images"],
        "labels": res["labels"],
        "seconds": res["seconds"],
        "engine": engine,
    }


# -------------------------------------------------------------------------------------
# nll
# -------------------------------------------------------------------------------------


def cmd_nll(args, explicit: set) -> dict:
    from ..evaluation.likelihood import bits_per_dim, mean_stderr
    from ..io import atomic_write
    from ..training.data import open_source
    from .images import check_outputs_free

    if not args.model_path:
        raise ValueError("model_path: expected a checkpoint file or run folder, got nothing")
    if args.num_samples < 1 or args.batch_size < 1:
        raise ValueError(
            f"num_samples, batch_size: expected positive ints, got {args.num_samples}, {args.batch_size}"
        )
    amp_dtype(args.amp)
    _check_out_dir(args.out_dir)
    device = dist_util.setup_dist(args.device or None)
    if args.capture and torch.device(device).type != "cpu":
        raise ValueError(f"capture: op graphs replay CPU calls, got device {device}")
    path, state, config = resolve_model(args.model_path, args, explicit)
    source = open_source(
        args.data_dir,
        image_size=config["image_size"],
        image_channels=config["image_channels"],
        split=args.split,
        resize=args.resize,
    )
    if config["class_cond"] and source.labels is None:
        raise ValueError(f"class_cond: {source.description} has no class labels")
    outputs = {k: os.path.join(args.out_dir, f"{k}_terms.npz") for k in ("vb", "mse", "xstart_mse")}
    outputs["bpd"] = os.path.join(args.out_dir, "bpd.npz")
    if dist_util.is_main() and not args.overwrite:
        check_outputs_free(outputs.values())
    model, diffusion = build(config, device)
    ckpt.load_into(model, state, path)
    _for_inference(model, args.inference)
    n = min(args.num_samples, len(source))
    _say(
        f"bits/dim of {n} images of {source.description} with {path}: the full "
        f"{diffusion.num_timesteps}-step bound{_precision_note(args)}, {dist_util.get_world_size()} "
        f"process(es) on {device}"
    )
    t0 = time.perf_counter()
    if args.capture:
        from ..engine import capture_forward

        model = capture_forward(model)  # one op graph per batch shape
    res = bits_per_dim(
        with_amp(model, args.amp, device),
        diffusion,
        source,
        n,
        args.batch_size,
        clip_denoised=args.clip_denoised,
        seed=args.seed,
        device=device,
        class_cond=config["class_cond"],
        progress=args.progress,
    )
    seconds = time.perf_counter() - t0
    mean, err = mean_stderr(res["total_bpd"])
    if dist_util.is_main():
        for k in ("vb", "mse", "xstart_mse"):  # per-timestep means, as the reference's image_nll
            terms = res[k].mean(axis=0)
            atomic_write(outputs[k], lambda f, a=terms: np.savez(f, a), overwrite=args.overwrite)
        atomic_write(
            outputs["bpd"],
            lambda f: np.savez(f, total_bpd=res["total_bpd"], prior_bpd=res["prior_bpd"]),
            overwrite=args.overwrite,
        )
        _say(f"bits/dim: {mean:.4f} ± {err:.4f} (mean ± standard error over {n} images; {seconds:.1f} s)")
        _say(json.dumps({"bits_per_dim": mean, "stderr": err, "num_images": n}))
    dist_util.barrier()
    dist_util.cleanup()
    return {"bits_per_dim": mean, "stderr": err, "num_images": n, "seconds": seconds, **res}


# -------------------------------------------------------------------------------------
# fid
# -------------------------------------------------------------------------------------


def cmd_fid(args) -> dict:
    """``iddpm fid REF SAMPLES --inception PATH``: FID, IS, precision and recall."""
    from ..evaluation import evaluate
    from ..io import atomic_write_bytes

    if args.batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {args.batch_size}")
    device = str(dist_util.resolve_device(args.device))
    for what, path in (("ref", args.ref), ("samples", args.samples)):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{what}: no such file: {path!r} (expected an .npz with arr_0 uint8 NHWC images)"
            )
    cache_dir = None if args.no_cache else args.cache_dir
    t0 = time.perf_counter()
    res = evaluate(
        args.ref,
        args.samples,
        args.inception,
        batch_size=args.batch_size,
        device=device,
        cache_dir=cache_dir,
        progress=args.progress,
    )
    res["seconds"] = time.perf_counter() - t0
    res.update(ref=args.ref, samples=args.samples, inception=args.inception)
    cached = (
        "read from the cache"
        if res["reference_cached"]
        else ("computed and cached" if cache_dir is not None else "computed (no cache)")
    )
    print(f"FID              {res['fid']:.4f}")
    print(f"Inception Score  {res['inception_score']:.4f} ± {res['inception_score_std']:.4f}")
    print(f"precision        {res['precision']:.4f}")
    print(f"recall           {res['recall']:.4f}")
    print(
        f"reference: {args.ref} ({res['num_reference']} images, statistics {cached}); samples: "
        f"{args.samples} ({res['num_samples']} images); {res['seconds']:.1f} s on {device}"
    )
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(res, indent=1) + "\n").encode(), overwrite=True)
        print(f"wrote {args.json}")
    return res
