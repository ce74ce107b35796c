"""Interleaved rounds, process CPU time per forward (one thread, B = 2, CIFAR-10 UNet, same weights):
openai/improved-diffusion (fp32, and under bf16 autocast), ours to_inference(channels_last=True,
prepack=True) in fp32 and bf16, and the same with this branch's paths switched off (the channels-last
attention block, "auto" attention, the batched time-embedding GEMM, the ResBlock skip add folded into
the packed conv). Usage: IDDPM_REF_PATH=/tmp/ref python ab_paths.py ROUNDS OUT.json"""

import copy
import json
import os
import statistics
import sys
import time

import torch

import iddpm_ext.unet as U
from iddpm_ext.bench.unet import randomize_zero_layers_
from iddpm_ext.ops.attention import attention_impl
from iddpm_ext.script_util import create_model

sys.path.insert(0, os.environ.get("IDDPM_REF_PATH", "/tmp/ref"))
from improved_diffusion.unet import UNetModel as RefUNet  # noqa: E402

torch.set_num_threads(1)
torch.manual_seed(0)
ours = create_model(32, 128, 3, learn_sigma=True, class_cond=False, use_checkpoint=False,
                    attention_resolutions="16,8", num_heads=4, num_heads_upsample=-1,
                    use_scale_shift_norm=True, dropout=0.0)  # fmt: skip
ours = randomize_zero_layers_(ours).eval()
ref = RefUNet(in_channels=3, model_channels=128, out_channels=6, num_res_blocks=3,
              attention_resolutions=(2, 4), dropout=0.0, channel_mult=(1, 2, 2, 2), num_heads=4,
              use_scale_shift_norm=True).eval()  # fmt: skip
ref.load_state_dict(ours.state_dict())
fp32 = copy.deepcopy(ours).to_inference(torch.float32, channels_last=True, prepack=True)
bf16 = copy.deepcopy(ours).to_inference(torch.bfloat16, channels_last=True, prepack=True)
x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 500])


def paths_off(model):
    def run():
        previous, conv_add = U.set_channels_last_attention(False), U.conv_add
        model.batch_emb = False
        U.conv_add = lambda conv, h, residual: residual + conv(h)
        try:
            with attention_impl("fused"):
                return model(x, t)
        finally:
            U.set_channels_last_attention(previous)
            model.batch_emb, U.conv_add = True, conv_add

    return run


def ref_bf16():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return ref(x, t)


cases = {
    "fp32 reference": lambda: ref(x, t),
    "fp32 ours new": lambda: fp32(x, t),
    "fp32 ours paths off": paths_off(fp32),
    "bf16 reference autocast": ref_bf16,
    "bf16 ours new": lambda: bf16(x, t),
    "bf16 ours paths off": paths_off(bf16),
}
times = {k: [] for k in cases}
with torch.no_grad():
    for f in cases.values():
        f()
    for _ in range(int(sys.argv[1])):
        for k, f in cases.items():
            start = time.process_time()
            f()
            times[k].append((time.process_time() - start) * 1e3)
summary = {}
for k, v in times.items():
    base = times["fp32 reference" if k.startswith("fp32") else "bf16 reference autocast"]
    summary[k] = {"min_ms": min(v), "median_ms": statistics.median(v)}
    med, base_med = statistics.median(v), statistics.median(base)
    print(
        f"{k:28s} min {min(v):7.1f} med {med:7.1f} ms   speedup vs ref: "
        f"min {min(base) / min(v):.2f}x med {base_med / med:.2f}x"
    )
with open(sys.argv[2], "w") as f:
    json.dump({"rounds": int(sys.argv[1]), "cpu_ms": times, "summary": summary}, f, indent=1)
