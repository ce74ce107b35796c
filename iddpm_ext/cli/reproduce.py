"""``iddpm reproduce``: the paper's ablations at a small scale, on the built-in digits.

Trains small UNets on the 1500 training digits (native 8×8, grayscale) with

* ``simple_cosine``  L_simple, fixed σ² = β_t (the reference's default), cosine schedule
* ``hybrid_cosine``  L_hybrid (learned σ, RESCALED_MSE), cosine schedule
* ``vlb_cosine``     L_vlb (learned σ, RESCALED_KL) with the loss-second-moment timestep sampler
* ``hybrid_linear``  L_hybrid, linear schedule
* ``simple_linear``  L_simple, fixed σ, linear schedule

with the library's own trainer (:class:`iddpm_ext.training.loop.TrainLoop`; each run folder is an
ordinary ``iddpm train`` run folder), the same number of steps and seed for every run, and
reports on the 297 held-out test digits:

* NLL in bits/dim: the full T-step bound (``calc_bpd_loop``, the code behind ``iddpm nll``);
* sample quality at T (full), 100, 50 and 25 respaced ancestral steps: the Fréchet distance
  in the feature space of a small digits classifier trained (and checked) here — *not*
  Inception FID — with a bootstrap spread, and a real-vs-real floor.

Work is split into tasks (train a run; its NLL; its samples) run by ``--jobs`` worker
processes with ``--threads`` torch threads each. Everything goes to ``--out``:
``results.json`` (all numbers, settings, timings), ``table.md``, ``quality_vs_steps.png``,
``nll.png``, ``samples.png``, and one folder per run (checkpoints, training log,
``bpd.npz``, ``samples_{K}steps.npz``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time

import numpy as np
import torch


class ReproductionError(ValueError):
    """A reproduction that cannot give meaningful numbers (e.g. the classifier failed its check)."""


# -------------------------------------------------------------------------------------
# what is run
# -------------------------------------------------------------------------------------

# The runs, the shared settings and the scales: tables laid out by hand.
# fmt: off
RUNS = {
    "simple_cosine": dict(label="L_simple, fixed σ, cosine", objective="simple", learn_sigma=False,
                          use_kl=False, noise_schedule="cosine", schedule_sampler="uniform"),
    "hybrid_cosine": dict(label="L_hybrid, learned σ, cosine", objective="hybrid", learn_sigma=True,
                          use_kl=False, noise_schedule="cosine", schedule_sampler="uniform"),
    "vlb_cosine": dict(label="L_vlb, learned σ, cosine (loss-second-moment t)", objective="vlb",
                       learn_sigma=True, use_kl=True, noise_schedule="cosine",
                       schedule_sampler="loss-second-moment"),
    "hybrid_linear": dict(label="L_hybrid, learned σ, linear", objective="hybrid", learn_sigma=True,
                          use_kl=False, noise_schedule="linear", schedule_sampler="uniform"),
    "simple_linear": dict(label="L_simple, fixed σ, linear", objective="simple", learn_sigma=False,
                          use_kl=False, noise_schedule="linear", schedule_sampler="uniform"),
}

# Model, diffusion and evaluation settings shared by all runs; a scale overrides some.
BASE = dict(
    runs=list(RUNS), image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2",
    attention_resolutions="4", num_heads=4, dropout=0.1, diffusion_steps=1000, train_steps=3000,
    batch_size=64, lr=5e-4, ema_rate=0.995, grad_clip=1.0, nll_images=297, num_samples=500,
    sample_steps=[0, 100, 50, 25], grid_samples=16, classifier_epochs=40, min_classifier_accuracy=0.95,
    floor_rounds=5, seed=0,
)
SCALES = {
    # For tests: two runs, a few steps, T = 20. Minutes of nothing; numbers meaningless.
    "tiny": dict(runs=["simple_cosine", "hybrid_cosine"], diffusion_steps=20, train_steps=6,
                 batch_size=16, nll_images=8, num_samples=12, sample_steps=[0, 10, 5], grid_samples=4,
                 classifier_epochs=1, min_classifier_accuracy=0.0, floor_rounds=2),
    # About a third of the default's work.
    "small": dict(train_steps=1500, nll_images=100, num_samples=200),
    # The reported configuration: about 20 minutes on 2 idle CPU cores (docs/results.md).
    "default": dict(),
    # Longer training and more samples: several times the default.
    "long": dict(train_steps=15000, ema_rate=0.999, num_samples=1000),
}
SETTING_KEYS = tuple(BASE)
# fmt: on


def scale_settings(scale: str, **overrides) -> dict:
    """The settings of ``scale`` with ``overrides`` (None values ignored) applied."""
    if scale not in SCALES:
        raise ValueError(f"scale: expected one of {list(SCALES)}, got {scale!r}")
    s = {**BASE, **SCALES[scale]}
    for k, v in overrides.items():
        if v is None:
            continue
        if k not in s:
            raise ValueError(f"{k}: not a reproduction setting (known: {', '.join(SETTING_KEYS)})")
        s[k] = v
    s["runs"] = list(s["runs"])
    unknown = [r for r in s["runs"] if r not in RUNS]
    if unknown or not s["runs"]:
        raise ValueError(f"runs: expected names from {list(RUNS)}, got {s['runs']}")
    T = int(s["diffusion_steps"])
    steps = sorted({T if int(k) in (0, T) else int(k) for k in s["sample_steps"]}, reverse=True)
    bad = [k for k in steps if not 1 <= k <= T]
    if bad:
        raise ValueError(f"sample_steps: expected counts in [1, T={T}] (0 = T), got {bad}")
    s["sample_steps"] = steps
    for k in ("train_steps", "batch_size", "nll_images", "num_samples", "diffusion_steps"):
        if int(s[k]) < 1:
            raise ValueError(f"{k}: expected a positive int, got {s[k]}")
    if s["num_samples"] < 2:
        raise ValueError(f"num_samples: expected at least 2 (covariances), got {s['num_samples']}")
    return s


def model_config(settings: dict, run: str) -> dict:
    """create_model_and_diffusion arguments of ``run``."""
    from ..script_util import model_and_diffusion_defaults

    spec = RUNS[run]
    cfg = model_and_diffusion_defaults()
    cfg.update(
        image_size=settings["image_size"],
        image_channels=1,
        num_channels=settings["num_channels"],
        num_res_blocks=settings["num_res_blocks"],
        channel_mult=settings["channel_mult"],
        attention_resolutions=settings["attention_resolutions"],
        num_heads=settings["num_heads"],
        dropout=settings["dropout"],
        diffusion_steps=settings["diffusion_steps"],
        noise_schedule=spec["noise_schedule"],
        learn_sigma=spec["learn_sigma"],
        use_kl=spec["use_kl"],
        rescale_learned_sigmas=True,
        sigma_small=False,
    )
    return cfg


def run_command_lines(settings: dict, out_dir: str, run: str) -> dict:
    """The ``iddpm`` commands equivalent to this run's training, NLL and sampling."""
    spec, cfg = RUNS[run], model_config(settings, run)
    run_dir = os.path.join(out_dir, run)
    keys = (
        "image_size",
        "image_channels",
        "num_channels",
        "num_res_blocks",
        "channel_mult",
        "attention_resolutions",
        "num_heads",
        "dropout",
        "diffusion_steps",
        "noise_schedule",
        "learn_sigma",
        "use_kl",
    )
    flags = " ".join(f"--{k} {cfg[k]}" for k in keys)
    n = settings["train_steps"]
    train = (
        f"iddpm train --data_dir digits {flags} --schedule_sampler {spec['schedule_sampler']} "
        f"--lr {settings['lr']} --batch_size {settings['batch_size']} --ema_rate {settings['ema_rate']} "
        f"--lr_anneal_steps {n} --grad_clip {settings['grad_clip']} --save_interval {n} "
        f"--seed {settings['seed']} --out_dir {run_dir}"
    )
    nll = (
        f"iddpm nll --model_path {run_dir} --data_dir digits --split test --num_samples "
        f"{settings['nll_images']} --batch_size {settings['nll_images']} --seed {settings['seed']}"
    )
    sample = (
        f"iddpm sample --model_path {run_dir} --num_samples {settings['num_samples']} --batch_size "
        f"{settings['num_samples']} --timestep_respacing K --seed {settings['seed']}"
    )
    return {"train": train, "nll": nll, "sample": sample}


# -------------------------------------------------------------------------------------
# tasks (run in worker processes)
# -------------------------------------------------------------------------------------


def _digits(settings, split):
    from ..training.data import open_source

    return open_source("digits", image_size=settings["image_size"], image_channels=1, split=split)


def _say(*a):
    from ..training.progress import bar_safe

    bar_safe(print)(*a)


def _load_ema(run_dir, settings, run, respacing, device):
    from ..script_util import create_model_and_diffusion
    from ..training import checkpoint as ckpt

    path = ckpt.model_path_from(run_dir)  # the latest EMA weights, as iddpm sample/nll use
    state, _, _ = ckpt.load_weights(path)
    model, diffusion = create_model_and_diffusion(
        **{**model_config(settings, run), "timestep_respacing": respacing}
    )
    ckpt.load_into(model, state, path)
    return model.to(device).eval(), diffusion


def task_train(run, settings, out_dir, device="cpu") -> dict:
    from ..training.data import BatchStream
    from ..training.log import read_jsonl
    from .commands import annealed_run

    t0, c0 = time.perf_counter(), time.process_time()
    run_dir = os.path.join(out_dir, run)
    if os.path.isdir(run_dir):  # an earlier attempt of this task: ours to replace, nothing else
        ours = {"progress.jsonl", "latest.json", "train.json", "loss.png"}
        if os.listdir(run_dir) and not ours & set(os.listdir(run_dir)):
            raise ReproductionError(
                f"{run_dir}: exists and is not a reproduction run folder; choose another --out"
            )
        shutil.rmtree(run_dir)
    cfg, seed, n = model_config(settings, run), settings["seed"], settings["train_steps"]
    data = BatchStream(_digits(settings, "train"), settings["batch_size"], seed=seed)
    loop = annealed_run(cfg, data, n, run_dir, device, seed=seed,
                        schedule_sampler=RUNS[run]["schedule_sampler"], batch_size=settings["batch_size"],
                        lr=settings["lr"], ema_rate=str(settings["ema_rate"]), log_interval=max(1, n // 50),
                        grad_clip=settings["grad_clip"], progress=False, log=lambda *a: None)  # fmt: skip
    _say(f"[{run}] training {n} steps ({sum(p.numel() for p in loop.model.parameters()):,} parameters)")
    loop.run_loop()
    records = read_jsonl(os.path.join(run_dir, "progress.jsonl"))
    last = records[-1] if records else {}
    out = {
        "steps": loop.step,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "final_loss": last.get("loss"),
        "final_mse": last.get("mse"),
        "final_vb": last.get("vb"),
        "parameters": sum(p.numel() for p in loop.model.parameters()),
    }
    _say(f"[{run}] trained in {out['seconds']:.0f} s (final loss {out['final_loss']})")
    return out


def task_nll(run, settings, out_dir, device="cpu") -> dict:
    from ..evaluation.likelihood import bits_per_dim, mean_stderr

    t0, c0 = time.perf_counter(), time.process_time()
    run_dir = os.path.join(out_dir, run)
    model, diffusion = _load_ema(run_dir, settings, run, "", device)
    n = settings["nll_images"]
    res = bits_per_dim(
        model, diffusion, _digits(settings, "test"), n, n, seed=settings["seed"], device=device
    )
    np.savez(os.path.join(run_dir, "bpd.npz"), total_bpd=res["total_bpd"], prior_bpd=res["prior_bpd"])
    mean, err = mean_stderr(res["total_bpd"])
    vb = res["vb"].mean(axis=0)  # [T], column j = timestep T-1-j
    out = {
        "bpd": mean,
        "stderr": err,
        "images": int(len(res["total_bpd"])),
        "prior_bpd": float(res["prior_bpd"].mean()),
        "decoder_bpd": float(vb[-1]),
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
    }
    _say(
        f"[{run}] NLL {mean:.4f} ± {err:.4f} bits/dim on {out['images']} test digits ({out['seconds']:.0f} s)"
    )
    return out


def task_samples(run, settings, out_dir, device="cpu") -> dict:
    from ..evaluation.digits_classifier import FeatureFD, load_classifier, predict_logits
    from ..evaluation.fid import precision_recall
    from .generate import generate
    from .images import save_npz

    t0, c0 = time.perf_counter(), time.process_time()
    run_dir = os.path.join(out_dir, run)
    clf = load_classifier(os.path.join(out_dir, "classifier.pt"))
    fd = FeatureFD(clf, _digits(settings, "test").images)
    T, n, size = settings["diffusion_steps"], settings["num_samples"], settings["image_size"]
    out = {}
    for k in settings["sample_steps"]:
        t1 = time.perf_counter()
        model, diffusion = _load_ema(run_dir, settings, run, "" if k == T else str(k), device)
        res = generate(
            model, diffusion, n, (1, size, size), batch_size=min(n, 512), seed=settings["seed"], device=device
        )
        images = res["images"]  # uint8 [n, H, W, 1]
        save_npz(os.path.join(run_dir, f"samples_{k}steps.npz"), images, overwrite=True)
        feats = fd.features(images)
        precision, recall = precision_recall(fd.reference_features, feats)
        classes = np.bincount(predict_logits(clf, images).argmax(axis=1), minlength=10)
        out[str(k)] = {
            "fd": fd.from_features(feats),
            "fd_bootstrap_std": fd.bootstrap_std(feats),
            "precision": precision,
            "recall": recall,
            "class_counts": classes.tolist(),
            "seconds": time.perf_counter() - t1,
        }
        _say(f"[{run}] {k:>4} steps: FD {out[str(k)]['fd']:.2f} ({out[str(k)]['seconds']:.0f} s)")
    return {"by_steps": out, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}


TASKS = {"train": task_train, "nll": task_nll, "samples": task_samples}
# Each task's share of a run's work, for the progress bar's time left (from the measured
# default reproduction, docs/results/reproduce_default.json: training 42%, NLL 18%, samples 40%).
TASK_SHARE = {"train": 0.42, "nll": 0.18, "samples": 0.40}


def _task_entry(kind, run, settings, out_dir, device, threads):
    """Worker-process entry: one task, its result also written to RUN/KIND.json."""
    torch.set_num_threads(threads)
    result = TASKS[kind](run, settings, out_dir, device)
    with open(os.path.join(out_dir, run, f"{kind}.json"), "w") as f:
        json.dump({"settings": settings, "result": result}, f, indent=1)
    return kind, run, result


def _cached(kind, run, settings, out_dir):
    path = os.path.join(out_dir, run, f"{kind}.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            blob = json.load(f)
    except (OSError, ValueError):
        return None
    return blob["result"] if blob.get("settings") == settings else None


# -------------------------------------------------------------------------------------
# the whole reproduction
# -------------------------------------------------------------------------------------


def _classifier(settings, out_dir, log) -> dict:
    from ..evaluation.digits_classifier import FeatureFD, save_classifier, train_classifier

    train, test = _digits(settings, "train"), _digits(settings, "test")
    model, info = train_classifier(
        train.images,
        train.labels,
        test.images,
        test.labels,
        epochs=settings["classifier_epochs"],
        seed=settings["seed"],
        log=log,
    )
    if info["test_accuracy"] < settings["min_classifier_accuracy"]:
        raise ReproductionError(
            f"digits classifier: test accuracy {info['test_accuracy']:.4f} is below the required "
            f"{settings['min_classifier_accuracy']}; its features would not measure digit quality"
        )
    save_classifier(os.path.join(out_dir, "classifier.pt"), model, info)
    # The floor: FD of real training digits (as many as the samples) to the test digits.
    fd = FeatureFD(model, test.images)
    rng = np.random.default_rng(settings["seed"])
    m = min(settings["num_samples"], len(train))
    floors = [fd(train.images[rng.permutation(len(train))[:m]]) for _ in range(settings["floor_rounds"])]
    info["real_floor_fd"] = float(np.mean(floors))
    info["real_floor_fd_std"] = float(np.std(floors, ddof=1)) if len(floors) > 1 else float("nan")
    info["real_floor_images"] = m
    info["test_images"] = len(test)
    log(
        f"real-vs-real floor: FD of {m} training digits to the test digits {info['real_floor_fd']:.2f} "
        f"± {info['real_floor_fd_std']:.2f} (over {len(floors)} draws)"
    )
    return info


def _schedule(settings, out_dir, device, jobs, threads, reuse, log, progress=False) -> dict:
    """Run every task (train first, then NLL and samples of each trained run), in ``jobs``
    worker processes (jobs = 1: in this process); ``progress``: a bar over the runs' work
    (tasks weighted by TASK_SHARE) with the time left."""
    from ..training.progress import progress_bar

    results = {run: {} for run in settings["runs"]}
    pending = []
    for run in settings["runs"]:
        cached = {k: _cached(k, run, settings, out_dir) for k in TASKS} if reuse else {}
        if cached.get("train") is not None:
            results[run]["train"] = cached["train"]
            log(f"[{run}] reusing the finished training in {os.path.join(out_dir, run)}")
            for k in ("nll", "samples"):
                if cached.get(k) is not None:
                    results[run][k] = cached[k]
                else:
                    pending.append((k, run))
        else:
            pending.append(("train", run))
    pending.sort(key=lambda kr: kr[0] != "train")  # training tasks first, in the order given
    done_share = sum(TASK_SHARE[k] for r in results.values() for k in r)
    bar = progress_bar(
        progress,
        len(settings["runs"]),
        "reproduce",
        "run",
        initial=done_share,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}",
    )

    def finished(kind, run):
        bar.set_postfix_str(f"{run} {kind} done", refresh=False)
        bar.update(TASK_SHARE[kind])

    try:
        return _run_tasks(pending, results, settings, out_dir, device, jobs, threads, finished)
    finally:
        bar.close()


def _run_tasks(pending, results, settings, out_dir, device, jobs, threads, finished) -> dict:
    if jobs <= 1:
        before = torch.get_num_threads()
        queue = list(pending)
        try:
            while queue:
                kind, run = queue.pop(0)
                _, _, res = _task_entry(kind, run, settings, out_dir, device, threads)
                results[run][kind] = res
                finished(kind, run)
                if kind == "train":
                    queue.extend([("nll", run), ("samples", run)])
        finally:
            torch.set_num_threads(before)
        return results
    import concurrent.futures as cf
    import multiprocessing as mp

    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_task_entry, k, r, settings, out_dir, device, threads) for k, r in pending}
        while futures:
            done, futures = cf.wait(futures, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                kind, run, res = fut.result()
                results[run][kind] = res
                finished(kind, run)
                if kind == "train":
                    futures |= {
                        pool.submit(_task_entry, k, run, settings, out_dir, device, threads)
                        for k in ("nll", "samples")
                    }
    return results


def run(
    out_dir="out/reproduce",
    scale="default",
    jobs=None,
    threads=None,
    device="cpu",
    reuse=False,
    log=print,
    progress=False,
    **overrides,
) -> dict:
    """The whole reproduction; returns (and writes to ``out_dir/results.json``) every number.
    ``progress``: a bar over the runs' work with the time left (stderr)."""
    from ..evaluation import repro_report
    from ..training.progress import bar_safe

    log = bar_safe(log)
    settings = scale_settings(scale, **overrides)
    cpus = os.cpu_count() or 1
    if device != "cpu":
        jobs = 1
    jobs = jobs or min(2, cpus)
    threads = threads or max(1, min(2, cpus) // jobs)
    os.makedirs(out_dir, exist_ok=True)
    t0, load0 = time.perf_counter(), os.getloadavg()
    c0 = time.process_time()
    log(
        f"reproduce ({scale}): runs {', '.join(settings['runs'])}; T={settings['diffusion_steps']}, "
        f"{settings['train_steps']} training steps each, {jobs} job(s) × {threads} thread(s) on {device}; "
        f"out {out_dir}"
    )
    classifier = _classifier(settings, out_dir, log)
    classifier["seconds_total"] = time.perf_counter() - t0
    runs = _schedule(settings, out_dir, device, jobs, threads, reuse, log, progress)
    wall = time.perf_counter() - t0
    for name, r in runs.items():
        r["label"] = RUNS[name]["label"]
        r["spec"] = RUNS[name]
        r["commands"] = run_command_lines(settings, out_dir, name)
    given = " ".join(
        f"--{k} {','.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in overrides.items()
        if v is not None
    )
    results = {
        "command": (
            f"iddpm reproduce --scale {scale} {given} --jobs {jobs} --threads {threads} "
            f"--device {device} --out {out_dir}"
        ).replace("  ", " "),
        "scale": scale,
        "settings": settings,
        "classifier": classifier,
        "runs": runs,
        "timing": {
            "wall_seconds": wall,
            "classifier_seconds": classifier["seconds_total"],
            **{f"{k}_seconds_sum": sum(r.get(k, {}).get("seconds", 0) for r in runs.values()) for k in TASKS},
            "task_cpu_seconds": sum(
                t.get("cpu_seconds", 0)
                for r in runs.values()
                for t in (r.get("train", {}), r.get("nll", {}), r.get("samples", {}))
            ),
            "main_cpu_seconds": time.process_time() - c0,
            "jobs": jobs,
            "threads": threads,
            "loadavg_start": load0,
            "loadavg_end": os.getloadavg(),
            "cpus": cpus,
        },
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "device": device,
        },
    }
    results["checks"] = repro_report.expected_directions(results, out_dir)
    t_plot = time.perf_counter()
    repro_report.write_all(results, out_dir)
    results["timing"]["report_seconds"] = time.perf_counter() - t_plot
    results["timing"]["wall_seconds"] = time.perf_counter() - t0
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=_json_default)
    log(repro_report.table_markdown(results))
    log(
        f"done in {results['timing']['wall_seconds']:.0f} s; results.json, table.md, quality_vs_steps.png, "
        f"nll.png, samples.png in {out_dir}"
    )
    return results


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
