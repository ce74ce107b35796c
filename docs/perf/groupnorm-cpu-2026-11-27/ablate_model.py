"""The CIFAR-10 UNet forward (B = 2, one thread) with groupnorm impl "auto" with and without the
fused op iddpm::group_norm_act, in interleaved rounds; process CPU time per forward (steadier than
wall time on a shared machine). Usage: python ablate_model.py [ROUNDS]."""

import copy
import statistics
import sys
import time

import torch

from iddpm_ext import nn as inn
from iddpm_ext.bench.unet import CONFIGS
from iddpm_ext.nn import groupnorm_impl
from iddpm_ext.unet import UNetModel

torch.set_num_threads(1)
kw = dict(CONFIGS["cifar10"])
kw.pop("image_size")
torch.manual_seed(0)
model = UNetModel(**kw).eval()
x, t = torch.randn(2, 3, 32, 32), torch.randint(0, 1000, (2,))
variants = {
    "fp32 NCHW": (model, x, None),
    "fp32 to_inference channels-last": (copy.deepcopy(model).to_inference(channels_last=True), x, None),
    "bf16 autocast": (model, x, torch.bfloat16),
    "bf16 to_inference channels-last": (
        copy.deepcopy(model).to_inference(torch.bfloat16, channels_last=True),
        x.bfloat16(),
        None,
    ),
}
fused_table = dict(inn._AUTO_FUSED)
impls = ("without", "with")
times = {(v, i): [] for v in variants for i in impls}
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 8
for r in range(rounds + 1):  # round 0 warms up
    for v, (module, inp, ac) in variants.items():
        for i in impls:
            inn._AUTO_FUSED.clear()
            if i == "with":
                inn._AUTO_FUSED.update(fused_table)
            ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=ac is not None)
            with torch.no_grad(), groupnorm_impl("auto"), ctx:
                t0 = time.process_time()
                module(inp, t)
                ms = (time.process_time() - t0) * 1e3
            if r:
                times[(v, i)].append(ms)
for v in variants:
    a, b = times[(v, "without")], times[(v, "with")]
    ma, mb = statistics.median(a), statistics.median(b)
    print(
        f"{v:32s} without: min {min(a):6.1f} med {ma:6.1f} ms | with fused: min {min(b):6.1f} "
        f"med {mb:6.1f} ms | speedup min {min(a) / min(b):.2f} med {ma / mb:.2f}"
    )
