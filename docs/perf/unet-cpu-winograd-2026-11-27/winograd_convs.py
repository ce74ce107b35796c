"""One 3x3 stride-1 conv at the CIFAR-10 UNet's shapes (B = 2, one thread): torch's channels-last
conv, the prepacked oneDNN conv (mkldnn::_convolution_pointwise, what iddpm_ext.nn's prepacking
runs) and iddpm::conv3x3_winograd; median ms of 25 calls each, and each one's max error against
float64 (relative to the output's max). Usage: python winograd_convs.py [out.txt]"""

import sys
import time

import torch
import torch.nn.functional as F

import iddpm_ext.ops  # noqa: F401  (registers the iddpm ops)

torch.set_num_threads(1)

# (Cin, Cout, H = W, how many of them the model runs per forward)
SHAPES = [
    (128, 128, 32, 10), (256, 128, 32, 3), (384, 128, 32, 1), (256, 256, 32, 1),
    (256, 256, 16, 10), (512, 256, 16, 3), (384, 256, 16, 1), (128, 256, 16, 1),
    (256, 256, 8, 11), (512, 256, 8, 4), (256, 256, 4, 14), (512, 256, 4, 4),
    (3, 128, 32, 1), (128, 6, 32, 1),  # the stem and output convs ("auto" leaves them)
    (256, 256, 2, 0), (256, 256, 1, 0), (64, 64, 32, 0), (16, 16, 32, 0),  # not in the model
]  # fmt: skip


def median_ms(fn, n=25):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[n // 2] * 1e3


def main():
    lines = []
    totals = [0.0, 0.0, 0.0]
    cols = ("torch", "packed", "winograd")
    header = f"{'Cin->Cout':>10} {'map':>6} {'n':>3} " + " ".join(f"{c:>8}" for c in cols)
    lines.append(header + "  x_packed  err_torch err_wino")
    g = torch.Generator().manual_seed(0)
    for cin, cout, hw, count in SHAPES:
        cl = torch.channels_last
        x = torch.randn(2, cin, hw, hw, generator=g).contiguous(memory_format=cl)
        w = (torch.randn(cout, cin, 3, 3, generator=g) / (9 * cin) ** 0.5).contiguous(memory_format=cl)
        b = torch.randn(cout, generator=g)
        with torch.no_grad():
            t_conv = median_ms(lambda: F.conv2d(x, w, b, 1, 1))
            packed = torch.ops.mkldnn._reorder_convolution_weight(w, [1, 1], [1, 1], [1, 1], 1, list(x.shape))
            t_pack = median_ms(
                lambda: torch.ops.mkldnn._convolution_pointwise(
                    x, packed, b, [1, 1], [1, 1], [1, 1], 1, "none", [], ""
                )
            )
            u = torch.ops.iddpm.winograd_weight(w)
            t_wino = median_ms(lambda: torch.ops.iddpm.conv3x3_winograd(x, u, b, None))
            ref = F.conv2d(x.double(), w.double(), b.double(), 1, 1)
            scale = ref.abs().max().item()
            e_torch = (F.conv2d(x, w, b, 1, 1).double() - ref).abs().max().item() / scale
            e_wino = (
                torch.ops.iddpm.conv3x3_winograd(x, u, b, None).double() - ref
            ).abs().max().item() / scale
        for i, t in enumerate((t_conv, t_pack, t_wino)):
            totals[i] += t * count
        lines.append(
            f"{cin:>4}->{cout:<5} {hw:>2}x{hw:<3} {count:>3} {t_conv:8.3f} {t_pack:8.3f} {t_wino:8.3f}"
            f"  {t_pack / t_wino:7.2f}x  {e_torch:.1e}   {e_wino:.1e}"
        )
        print(lines[-1], flush=True)
    lines.append(
        "model's 3x3 stride-1 convs, weighted by count (ms): "
        + ", ".join(f"{c} {t:.1f}" for c, t in zip(cols, totals))
    )
    print(lines[-1])
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
