# A/B of the batch-1 channels-last fix (iddpm_ext.nn.canonical_channels_last) inside one process:
# the CIFAR-10 UNet after to_inference(bf16 or fp32), B = 1, 1 thread, rounds interleaved.
# Usage: python channels_last_batch1_ab.py bf16|fp32
import sys
import time

import torch

import iddpm_ext.unet as U
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
dtype = torch.bfloat16 if sys.argv[1] == "bf16" else torch.float32
m.to_inference(dtype if dtype == torch.bfloat16 else None)
fix = U.canonical_channels_last
res = {}
with torch.no_grad():
    x = torch.randn(1, 3, 32, 32).to(dtype)
    t = torch.tensor([10])
    for _ in range(3):
        m(x, t)
    for _ in range(15):
        for name in ("fixed", "before"):
            U.canonical_channels_last = fix if name == "fixed" else (lambda v: v)
            t0 = time.perf_counter()
            m(x, t)
            res.setdefault(name, []).append(time.perf_counter() - t0)
for k, v in res.items():
    print(sys.argv[1], k, "median ms %.1f" % (sorted(v)[len(v) // 2] * 1e3))
