"""The ``iddpm`` command (also ``python -m iddpm_ext``)."""

from __future__ import annotations

import argparse
import json
import sys


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
    from . import toy

    toy.run(out_dir=args.out, train_steps=args.train_steps, seed=args.seed)
    return 0


def _cmd_bench(args) -> int:
    from . import bench

    return bench.main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iddpm", description="Improved DDPM with fused kernels (iddpm_ext)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="torch, CUDA and build facts as JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("bench", help="kernel microbenchmarks (iddpm bench --help)", add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("demo", help="a short end-to-end run on a toy 2-D data set")
    p.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    p.add_argument("--train_steps", type=int, default=3000, help="training steps (default: 3000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # the bench parser owns everything after `bench`
        from . import bench

        return bench.main(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
