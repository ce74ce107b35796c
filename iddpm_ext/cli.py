"""The ``iddpm`` command (also ``python -m iddpm_ext``).

    iddpm train  ...   train a model (improved-diffusion's image_train.py flags)
    iddpm sample ...   generate samples (image_sample.py flags)
    iddpm nll    ...   bits/dim on a data set (image_nll.py flags)
    iddpm demo         the digits demo (iddpm demo --toy: the 2-D toy run)
    iddpm bench  ...   benchmarks
    iddpm info         torch, CUDA and build facts

train, sample and nll also run under ``torchrun --nproc_per_node=N``.
"""

from __future__ import annotations

import argparse
import json
import sys

COMMAND_HELP = {
    "train": "train a diffusion model (improved-diffusion's image_train.py flags, plus --preset etc.)",
    "sample": "generate samples to samples_NxHxWxC.npz and a PNG grid (image_sample.py flags)",
    "nll": "bits/dim of a data set under a model, with per-timestep terms (image_nll.py flags)",
}


def _cmd_info(args) -> int:
    import torch

    from . import _ops

    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available()}
    if _ops.available():
        info["build"] = _ops.build_info()
    else:
        info["build_error"] = _ops.load_error()
    print(json.dumps(info, indent=2))
    return 0


def _cmd_demo(args) -> int:
    if args.toy:
        from . import toy

        toy.run(out_dir=args.out, train_steps=args.train_steps or 3000, seed=args.seed)
        return 0
    from . import demo

    demo.run(out_dir=args.out, train_steps=args.train_steps, seed=args.seed, nll_images=args.nll_images,
             num_samples=args.num_samples, sample_steps=args.sample_steps, device=args.device or None)
    return 0


def command_parser(command: str, suppress: bool = False) -> argparse.ArgumentParser:
    from .flags import add_command_flags

    p = argparse.ArgumentParser(prog=f"iddpm {command}", description=COMMAND_HELP[command],
                                argument_default=argparse.SUPPRESS if suppress else None)
    add_command_flags(p, command, suppress=suppress)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iddpm", description="Improved DDPM with fused kernels (iddpm_ext).",
        epilog="Run `iddpm COMMAND --help` for a command's flags.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in COMMAND_HELP.items():
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)

    p = sub.add_parser("demo", help="the digits demo: samples, loss plot and held-out bits/dim "
                                    "(--toy: the 2-D toy run)")
    p.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    p.add_argument("--toy", action="store_true", help="run the 2-D toy demo instead")
    p.add_argument("--train_steps", type=int, default=0,
                   help="train a digits model for this many steps instead of using the shipped checkpoint "
                        "(toy: default 3000)")
    p.add_argument("--nll_images", type=int, default=None, help="held-out digits for bits/dim (default: 50)")
    p.add_argument("--num_samples", type=int, default=64, help="samples in the grid (default: 64)")
    p.add_argument("--sample_steps", type=int, default=100, help="respaced sampling steps (default: 100)")
    p.add_argument("--device", default="", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("info", help="torch, CUDA and build facts as JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("bench", help="benchmarks (iddpm bench --help)", add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    return parser


def _run_command(command: str, argv) -> int:
    from . import commands
    from .flags import parse_command

    args, explicit = parse_command(lambda suppress: command_parser(command, suppress), command, argv)
    if getattr(args, "threads", 0):
        import torch

        torch.set_num_threads(args.threads)
    fn = {"train": commands.cmd_train, "sample": commands.cmd_sample, "nll": commands.cmd_nll}[command]
    fn(args, explicit)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # the bench parser owns everything after `bench`
        from . import bench

        return bench.main(argv[1:])
    try:
        if argv and argv[0] in COMMAND_HELP:
            return _run_command(argv[0], argv[1:])
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        # Bad input: one clear line, no traceback (DataError and CheckpointError are ValueErrors).
        print(f"iddpm: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
