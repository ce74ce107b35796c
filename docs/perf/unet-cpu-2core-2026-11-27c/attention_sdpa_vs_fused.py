"""One attention call of the CIFAR-10 UNet's shapes (B = 2, H = 4, C = 64, T = 256 and 64): the
fused op vs torch's SDPA on views (iddpm_ext.ops.attention.qkv_attention_sdpa), for a channels-last
qkv ([B, T, 3·H·C] in memory) and a contiguous one; fastest of 20 forward / 8 forward+backward
calls, one thread. err: relative L2 error against float64 einsum on the same inputs."""

import time

import torch

from iddpm_ext.ops.attention import qkv_attention_fused, qkv_attention_reference, qkv_attention_sdpa

torch.set_num_threads(1)


def fastest_ms(f, *args, n=20):
    f(*args)
    best = float("inf")
    for _ in range(n):
        start = time.perf_counter()
        f(*args)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


print(__doc__)
N, H, C = 2, 4, 64
for dtype in (torch.float32, torch.bfloat16):
    for T in (256, 64):
        for channels_last in (True, False):
            x = torch.randn(N, T, 3 * H * C, dtype=dtype)
            qkv = x.transpose(1, 2) if channels_last else x.transpose(1, 2).contiguous()
            layout = "channels-last" if channels_last else "contiguous"
            with torch.no_grad():
                oracle = qkv_attention_reference(qkv.double(), H)
                err_sdpa = rel(qkv_attention_sdpa(qkv, H), oracle)
                err_fused = rel(qkv_attention_fused(qkv, H), oracle)
                fused_ms = fastest_ms(qkv_attention_fused, qkv, H)
                sdpa_ms = fastest_ms(qkv_attention_sdpa, qkv, H)
            print(
                f"{dtype} T={T} {layout}: fwd fused {fused_ms:.2f} ms, sdpa {sdpa_ms:.2f} ms; "
                f"err sdpa {err_sdpa:.1e}, fused {err_fused:.1e}"
            )
            leaf = x.detach().clone().requires_grad_()

            def fwd_bwd(f, leaf=leaf, channels_last=channels_last):
                inp = leaf.transpose(1, 2)
                inp = inp if channels_last else inp.contiguous()
                f(inp, H).float().square().sum().backward()

            fused_ms = fastest_ms(fwd_bwd, qkv_attention_fused, n=8)
            sdpa_ms = fastest_ms(fwd_bwd, qkv_attention_sdpa, n=8)
            print(f"    fwd+bwd fused {fused_ms:.2f} ms, sdpa {sdpa_ms:.2f} ms")
