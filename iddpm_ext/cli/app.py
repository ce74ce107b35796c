"""The ``iddpm`` command (also ``python -m iddpm_ext``).

    iddpm train  ...   train a model (improved-diffusion's image_train.py flags)
    iddpm sample ...   generate samples (image_sample.py flags)
    iddpm nll    ...   bits/dim on a data set (image_nll.py flags)
    iddpm demo         the digits demo (iddpm demo --toy: the 2-D toy run)
    iddpm fid REF.npz SAMPLES.npz --inception PATH
                       FID, Inception Score, precision/recall (user-provided Inception-v3 weights)
    iddpm reproduce    the paper's ablations at a small scale on the digits (docs/results.md)
    iddpm bench  ...   benchmarks
    iddpm info         torch, CUDA and build facts

train, sample and nll also run under ``torchrun --nproc_per_node=N``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import MissingDependencyError

COMMAND_HELP = {
    "train": "train a diffusion model (improved-diffusion's image_train.py flags, plus --preset etc.)",
    "sample": "generate samples to samples_NxHxWxC.npz and a PNG grid (image_sample.py flags)",
    "nll": "bits/dim of a data set under a model, with per-timestep terms (image_nll.py flags)",
}


def _cmd_info(args) -> int:
    import torch

    from .. import ops as _ops

    info = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    if _ops.available():
        info["build"] = _ops.build_info()
    else:
        info["build_error"] = _ops.load_error()
    if torch.cuda.is_available():
        info["gpus"] = [_gpu_info(i, _ops.available()) for i in range(torch.cuda.device_count())]
    print(json.dumps(info, indent=2))
    return 0


def _gpu_info(index: int, built: bool) -> dict:
    """A visible GPU: name, compute capability, shared memory per block, and what the fused
    attention runs there (when _C is built)."""
    import torch

    p = torch.cuda.get_device_properties(index)
    gpu = {"name": p.name, "capability": f"{p.major}.{p.minor}",
           "shared_memory_per_block_optin": getattr(p, "shared_memory_per_block_optin", None)}  # fmt: skip
    if built:
        from ..ops.attention import cuda_device_support

        gpu["fused_attention"] = cuda_device_support(index)
    return gpu


def _cmd_demo(args) -> int:
    if args.toy:
        from . import toy

        toy.run(
            out_dir=args.out, train_steps=args.train_steps or 3000, seed=args.seed, progress=args.progress
        )
        return 0
    from . import demo

    demo.run(
        out_dir=args.out,
        train_steps=args.train_steps,
        seed=args.seed,
        nll_images=args.nll_images,
        num_samples=args.num_samples,
        sample_steps=args.sample_steps,
        device=args.device or None,
        progress=args.progress,
    )
    return 0


def _cmd_fid(args) -> int:
    from .commands import cmd_fid

    cmd_fid(args)
    return 0


def _cmd_reproduce(args) -> int:
    from . import reproduce

    steps = None
    if args.sample_steps:
        try:
            steps = [int(v) for v in args.sample_steps.split(",") if v.strip()]
        except ValueError:
            raise ValueError(
                f"sample_steps: expected comma-separated ints like 0,100,50,25, got {args.sample_steps!r}"
            ) from None
    runs = [r.strip() for r in args.runs.split(",") if r.strip()] if args.runs else None
    given = {
        k: getattr(args, k) for k in ("seed", "train_steps", "diffusion_steps", "nll_images", "num_samples")
    }
    reproduce.run(out_dir=args.out, scale=args.scale, jobs=args.jobs or None, threads=args.threads or None,
                  device=args.device, reuse=args.reuse, runs=runs, sample_steps=steps, progress=args.progress,
                  **given)  # fmt: skip
    return 0


def _add_progress(p):
    """--progress BOOL, as train, sample and nll have it."""
    from ..script_util import str2bool
    from .flags import PROGRESS_HELP

    p.add_argument(
        "--progress", type=str2bool, default=True, metavar="BOOL", help=PROGRESS_HELP + " (default: True)"
    )


def _add_eval_parsers(sub):
    p = sub.add_parser(
        "fid",
        help="FID, Inception Score and precision/recall of a samples .npz against a "
        "reference .npz, with Inception-v3 weights you provide",
        description="FID / Inception Score / precision-recall (k=3) in the feature space of the "
        "FID Inception-v3. Both files: arr_0 uint8 [N, H, W, C] (C 1 or 3), as "
        "`iddpm sample` writes. Nothing is downloaded: pass the weights file "
        "(e.g. pt_inception-2015-12-05-6726825d.pth, or a .safetensors of it).",
    )
    p.add_argument("ref", help="reference images (.npz); its statistics are cached per file content")
    p.add_argument("samples", help="generated images (.npz)")
    p.add_argument(
        "--inception", required=True, help="the Inception-v3 FID weights file (.pth / .safetensors)"
    )
    p.add_argument("--batch_size", type=int, default=50, help="images per Inception batch (default: 50)")
    p.add_argument("--device", default="", help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--cache_dir",
        default="",
        help="where reference statistics are cached (default: $IDDPM_EXT_CACHE or ~/.cache/iddpm_ext)",
    )
    p.add_argument("--no_cache", action="store_true", help="neither read nor write cached statistics")
    p.add_argument("--json", default="", help="also write the numbers to this JSON file")
    _add_progress(p)
    p.set_defaults(func=_cmd_fid)

    from .reproduce import RUNS, SCALES

    p = sub.add_parser(
        "reproduce",
        help="the paper's ablations at a small scale on the digits: bits/dim and "
        "classifier-feature FD vs sampling steps (docs/results.md)",
        description="Train small digit UNets with L_simple / L_hybrid / L_vlb and linear / cosine "
        "schedules, then report held-out bits/dim (full bound) and sample quality at "
        "T, 100, 50 and 25 steps as a Fréchet distance in the features of a small "
        "digits classifier trained here (not Inception FID). Flags below override "
        "the chosen --scale.",
    )
    p.add_argument(
        "--scale",
        choices=list(SCALES),
        default="default",
        help="tiny (tests), small (~1/3 of default), default (~20-25 min on 2 idle cores), long",
    )
    p.add_argument("--out", default="out/reproduce", help="output folder (default: out/reproduce)")
    p.add_argument("--runs", default="", help=f"comma-separated subset of {', '.join(RUNS)} (default: all)")
    p.add_argument(
        "--jobs", type=int, default=0, help="worker processes (default: min(2, CPUs); 1: in process)"
    )
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads per job (default: CPUs / jobs, max 2)"
    )
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda (then one job)")
    p.add_argument("--seed", type=int, default=None, help="seed of everything (default: 0)")
    p.add_argument("--train_steps", type=int, default=None, help="training steps per run")
    p.add_argument("--diffusion_steps", type=int, default=None, help="T (default: 1000)")
    p.add_argument("--nll_images", type=int, default=None, help="test digits for bits/dim (default: all 297)")
    p.add_argument("--num_samples", type=int, default=None, help="samples per step count (default: 500)")
    p.add_argument(
        "--sample_steps", default="", help="comma-separated step counts, 0 = T (default: 0,100,50,25)"
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep the finished tasks of an earlier run in --out with the same settings",
    )
    _add_progress(p)
    p.set_defaults(func=_cmd_reproduce)


def command_parser(command: str, suppress: bool = False) -> argparse.ArgumentParser:
    from .flags import add_command_flags

    p = argparse.ArgumentParser(
        prog=f"iddpm {command}",
        description=COMMAND_HELP[command],
        argument_default=argparse.SUPPRESS if suppress else None,
    )
    add_command_flags(p, command, suppress=suppress)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iddpm",
        description="Improved DDPM with fused kernels (iddpm_ext).",
        epilog="Run `iddpm COMMAND --help` for a command's flags.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in COMMAND_HELP.items():
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)

    p = sub.add_parser(
        "demo", help="the digits demo: samples, loss plot and held-out bits/dim (--toy: the 2-D toy run)"
    )
    p.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    p.add_argument("--toy", action="store_true", help="run the 2-D toy demo instead")
    p.add_argument(
        "--train_steps",
        type=int,
        default=0,
        help="train a digits model for this many steps instead of using the shipped checkpoint "
        "(toy: default 3000)",
    )
    p.add_argument("--nll_images", type=int, default=None, help="held-out digits for bits/dim (default: 120)")
    p.add_argument("--num_samples", type=int, default=64, help="samples in the grid (default: 64)")
    p.add_argument("--sample_steps", type=int, default=100, help="respaced sampling steps (default: 100)")
    p.add_argument("--device", default="", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    _add_progress(p)
    p.set_defaults(func=_cmd_demo)

    _add_eval_parsers(sub)

    p = sub.add_parser("info", help="torch, CUDA and build facts as JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("bench", help="benchmarks (iddpm bench --help)", add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    return parser


def _run_command(command: str, argv) -> int:
    from .. import dist_util
    from . import commands
    from .flags import parse_command

    args, explicit = parse_command(lambda suppress: command_parser(command, suppress), command, argv)
    if getattr(args, "threads", 0):
        import torch

        torch.set_num_threads(args.threads)
    fn = {"train": commands.cmd_train, "sample": commands.cmd_sample, "nll": commands.cmd_nll}[command]
    try:
        fn(args, explicit)
    finally:  # the process group setup_dist made, also when the command fails
        dist_util.cleanup()
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # the bench parser owns everything after `bench`
        from .. import bench

        return bench.main(argv[1:])
    from ..errors import TrainingStopped

    try:
        if argv and argv[0] in COMMAND_HELP:
            return _run_command(argv[0], argv[1:])
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except (ValueError, FileExistsError, FileNotFoundError, MissingDependencyError) as err:
        # Bad input or a missing optional package: one clear line, no traceback (DataError and
        # CheckpointError are ValueErrors).
        print(f"iddpm: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        # The system refused (disk full, permissions, ...): one line naming the file.
        text = err.strerror if err.strerror and err.filename is None else str(err)
        print(f"iddpm: error: {text}", file=sys.stderr)
        return 1
    except TrainingStopped as stop:
        # SIGINT / SIGTERM during training: the step reached is saved (exit 130 / 143).
        if _main_rank():
            print(f"iddpm: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        if _main_rank():
            print("iddpm: interrupted", file=sys.stderr)
        return 130


def _main_rank() -> bool:
    """Whether this process is rank 0 (or alone): only it reports a stop."""
    return os.environ.get("RANK", "0") == "0"


if __name__ == "__main__":
    sys.exit(main())
