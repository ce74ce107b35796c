"""iddpm::group_norm_act alone, one JSON line per run: {case: [fwd min ms, fwd median ms,
fwd+bwd min ms]}. Usage: python ab_op.py THREADS (run against each build in turn)."""

import json
import sys
import time

import torch

import iddpm_ext.ops.group_norm as GN

torch.set_num_threads(int(sys.argv[1]))
CASES = [((64, 32, 16, 16), 32), ((64, 64, 8, 8), 32), ((2, 128, 32, 32), 32), ((2, 256, 16, 16), 32)]


def times(f, warmup, n):
    for _ in range(warmup):
        f()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)


res = {}
for shape, G in CASES:
    for cl in (False, True):
        for dt in (torch.float32, torch.bfloat16):
            fmt = torch.channels_last if cl else torch.contiguous_format
            g = torch.Generator().manual_seed(0)
            x = torch.randn(shape, generator=g).to(dt).contiguous(memory_format=fmt)
            C = shape[1]
            w, b = torch.randn(C), torch.randn(C)
            sc, sh = torch.randn(shape[0], C), torch.randn(shape[0], C)
            ts = times(lambda: GN.group_norm_act(x, G, w, b, sc, sh), 5, 60)
            xr = x.detach().requires_grad_()
            dy = torch.randn(shape).to(dt).contiguous(memory_format=fmt)

            def fwd_bwd():
                torch.autograd.grad(GN.group_norm_act(xr, G, w, b, sc, sh), xr, dy)

            tb = times(fwd_bwd, 3, 30)
            key = f"{'x'.join(map(str, shape))} {'cl' if cl else 'nchw'} {str(dt)[6:]}"
            res[key] = (ts[0] * 1e3, ts[len(ts) // 2] * 1e3, tb[0] * 1e3)
print(json.dumps(res))
