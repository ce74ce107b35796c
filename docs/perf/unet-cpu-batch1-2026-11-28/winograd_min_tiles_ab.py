# A/B of the bf16 Winograd "auto" tile threshold (iddpm_ext.nn._WINOGRAD_AUTO_MIN_TILES) inside one
# process: the CIFAR-10 UNet after to_inference(bf16), 1 thread, rounds interleaved.
# Usage: python winograd_min_tiles_ab.py BATCH THRESHOLDS ROUNDS, e.g. 1 16,32 25
import sys
import time

import torch

import iddpm_ext.nn as N
from iddpm_ext.script_util import create_model

torch.set_num_threads(1)
m = create_model(
    image_size=32,
    num_channels=128,
    num_res_blocks=3,
    learn_sigma=True,
    class_cond=False,
    use_checkpoint=False,
    attention_resolutions="16,8",
    num_heads=4,
    num_heads_upsample=-1,
    use_scale_shift_norm=True,
    dropout=0.3,
)
m.to_inference(torch.bfloat16)
B = int(sys.argv[1])
res = {}
with torch.no_grad():
    x = torch.randn(B, 3, 32, 32).bfloat16()
    t = torch.tensor([10] * B)
    for _ in range(3):
        m(x, t)
    for _ in range(int(sys.argv[3])):
        for name, mt in [(f"min{v}", v) for v in map(int, sys.argv[2].split(","))]:
            N._WINOGRAD_AUTO_MIN_TILES[torch.bfloat16] = mt
            t0 = time.perf_counter()
            m(x, t)
            res.setdefault(name, []).append(time.perf_counter() - t0)
for k, v in res.items():
    print("B", B, k, "median ms %.1f" % (sorted(v)[len(v) // 2] * 1e3))
