"""Kernel microbenchmarks behind ``iddpm bench <what>`` (also ``python -m iddpm_ext.bench``).

Each benchmark is a module of this package with ``add_arguments(parser)`` (optional) and
``run(args) -> list[dict]`` returning records ``{op, impl, shape, dtype, device, ms,
gbps?, tflops?, pct_peak?}``; :mod:`iddpm_ext.bench.common` has the timing, table and
JSON helpers. Register a new benchmark in ``BENCHES`` below.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help); a benchmark is named after the op it measures
BENCHES = {
    "gather_coefs": ("iddpm_ext.bench.gather_coefs", "schedule-coefficient gather (iddpm::gather_coefs)"),
    "step": ("iddpm_ext.bench.step", "fused reverse-diffusion step vs eager (iddpm::p_sample_step)"),
    "sample": (
        "iddpm_ext.bench.sample",
        "sampling loops: reference-style vs eager vs CUDA graph vs torch.compile",
    ),
    "unet": ("iddpm_ext.bench.unet", "UNet (CIFAR-10 config) fwd / fwd+bwd, fused vs einsum attention"),
    "attention": (
        "iddpm_ext.bench.attention",
        "QKV self-attention: fused op vs einsum vs SDPA (iddpm::qkv_attention)",
    ),
    "group_norm": (
        "iddpm_ext.bench.group_norm",
        "GroupNorm + scale-shift + SiLU: fused op vs eager composition (iddpm::group_norm_act)",
    ),
    "conv": (
        "iddpm_ext.bench.conv",
        "3x3 convs at the UNet's shapes (CPU): Winograd op vs oneDNN (iddpm::conv3x3_winograd)",
    ),
    "train": (
        "iddpm_ext.bench.train",
        "training step it/s and peak memory (CIFAR-10 config), fused vs einsum",
    ),
}
ALIASES = {"gather_coefs": ["gather"], "group_norm": ["groupnorm"]}  # earlier names, still accepted


def build_parser(prog: str = "iddpm bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="iddpm_ext kernel microbenchmarks")
    sub = parser.add_subparsers(dest="what", required=True)
    for name, (module, help_text) in BENCHES.items():
        p = sub.add_parser(name, help=help_text, aliases=ALIASES.get(name, []))
        _common_arguments(p)
        mod = importlib.import_module(module)
        if hasattr(mod, "add_arguments"):
            mod.add_arguments(p)
    p = sub.add_parser("all", help="every benchmark above, one after another")
    _common_arguments(p)
    return parser


def _common_arguments(p: argparse.ArgumentParser):
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the records as JSON")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up runs per case")
    p.add_argument("--iters", type=int, default=None, help="timed runs per case (median reported)")
    p.add_argument("--quick", action="store_true", help="fewer cases and runs (smoke test)")


def main(argv=None, prog: str = "iddpm bench") -> int:
    from . import common

    args = build_parser(prog).parse_args(argv)
    canonical = {alias: name for name, aliases in ALIASES.items() for alias in aliases}
    args.what = canonical.get(args.what, args.what)
    names = list(BENCHES) if args.what == "all" else [args.what]
    records = []
    for name in names:
        mod = importlib.import_module(BENCHES[name][0])
        if args.what == "all":
            # Fill in each benchmark's own defaults for arguments `all` does not carry.
            p = argparse.ArgumentParser()
            _common_arguments(p)
            if hasattr(mod, "add_arguments"):
                mod.add_arguments(p)
            defaults = vars(p.parse_args([]))
            defaults.update({k: v for k, v in vars(args).items() if v is not None})
            sub_args = argparse.Namespace(**defaults)
        else:
            sub_args = args
        common.setup(sub_args)
        sub_args.record_sink = records  # common.emit prints each case as it ends and adds it here
        print(f"iddpm bench {name} on {common.device_name(sub_args.device)}:", flush=True)
        try:
            recs = mod.run(sub_args)
        except common.BenchArgumentError as e:  # a bad --cases / --dtype / ... value: one line
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 2
        common.print_table(recs, title=f"iddpm bench {name}")
        records.extend(r for r in recs if not any(r is seen for seen in records))
    if args.json:
        common.write_json(args.json, records)
        print(f"wrote {len(records)} records to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m iddpm_ext.bench"))
