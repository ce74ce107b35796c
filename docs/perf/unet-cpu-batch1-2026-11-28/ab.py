"""A/B runs inside one process (rounds interleaved, 1 thread) on the CIFAR-10 UNet
(iddpm_ext.bench.unet's "cifar10" config, random weights) after to_inference:

  python ab.py layout bf16|fp32              B = 1: the batch-1 channels-last fix
                                             (iddpm_ext.nn.canonical_channels_last) on / off
  python ab.py tiles BATCH THRESHOLDS ROUNDS e.g. "tiles 1 16,32 25": the bf16 Winograd "auto"
                                             tile threshold (iddpm_ext.nn._WINOGRAD_AUTO_MIN_TILES)

Prints the median ms per forward of each variant."""

import sys
import time

import torch

import iddpm_ext.nn as N
import iddpm_ext.unet as U
from iddpm_ext.bench.unet import build_model


def run(model, x, t, variants, rounds):
    """variants: {name: function that switches the model to it}; median ms of each."""
    times = {name: [] for name in variants}
    with torch.no_grad():
        for _ in range(3):
            model(x, t)
        for _ in range(rounds):
            for name, switch in variants.items():
                switch()
                t0 = time.perf_counter()
                model(x, t)
                times[name].append(time.perf_counter() - t0)
    for name, v in times.items():
        print(name, "median ms %.1f" % (sorted(v)[len(v) // 2] * 1e3))


def main(argv):
    torch.set_num_threads(1)
    model, size = build_model("cifar10")
    if argv[0] == "layout":
        dtype = torch.bfloat16 if argv[1] == "bf16" else torch.float32
        model.to_inference(dtype if dtype == torch.bfloat16 else None)
        fix = U.canonical_channels_last

        def use(f):
            return lambda: setattr(U, "canonical_channels_last", f)

        x, t = torch.randn(1, 3, size, size).to(dtype), torch.tensor([10])
        run(model, x, t, {"fixed": use(fix), "before": use(lambda v: v)}, 15)
        U.canonical_channels_last = fix
    else:
        batch, thresholds, rounds = int(argv[1]), [int(v) for v in argv[2].split(",")], int(argv[3])
        model.to_inference(torch.bfloat16)

        def use(v):
            return lambda: N._WINOGRAD_AUTO_MIN_TILES.__setitem__(torch.bfloat16, v)

        x, t = torch.randn(batch, 3, size, size).bfloat16(), torch.tensor([10] * batch)
        run(model, x, t, {f"min{v}": use(v) for v in thresholds}, rounds)


if __name__ == "__main__":
    main(sys.argv[1:])
