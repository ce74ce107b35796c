"""Whole UNet forwards, one thread, minimum of 8 (ms), one JSON line per run: the CIFAR-10 UNet
(random weights) at B = 2 after to_inference() in fp32 and bf16 autocast, and the shipped digits
model at B = 64, plain and after to_inference(). Run against each build in turn."""

import copy
import json
import time

import torch

from iddpm_ext.cli.commands import build
from iddpm_ext.cli.demo import CHECKPOINT
from iddpm_ext.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from iddpm_ext.training import checkpoint as ckpt

torch.set_num_threads(1)


def best_ms(model, x, t, amp, n=8):
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=amp):
        for _ in range(2):
            model(x, t)
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            model(x, t)
            ts.append(time.perf_counter() - t0)
    return min(ts) * 1e3


res = {}
torch.manual_seed(0)
d = model_and_diffusion_defaults()
d.update(num_channels=128, num_res_blocks=3, learn_sigma=True, dropout=0.3, image_size=32)
cifar = create_model_and_diffusion(**d)[0].eval().to_inference()
x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 500])
res["cifar B2 fp32 inference"] = best_ms(cifar, x, t, False)
res["cifar B2 bf16 inference"] = best_ms(cifar, x, t, True)
state, config, _ = ckpt.load_weights(CHECKPOINT)
digits = build({**config, "timestep_respacing": "100"}, torch.device("cpu"))[0]
ckpt.load_into(digits, state, CHECKPOINT)
digits.eval()
digits_inf = copy.deepcopy(digits).to_inference()
x, t = torch.randn(64, 1, 16, 16), torch.full((64,), 500)
res["digits B64 fp32 plain"] = best_ms(digits, x, t, False)
res["digits B64 fp32 inference"] = best_ms(digits_inf, x, t, False)
print(json.dumps(res))
