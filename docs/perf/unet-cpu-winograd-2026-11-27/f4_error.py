"""Why not Winograd F(4x4, 3x3): its fp32 error at the model's shapes, emulated with torch ops
(input and output transforms and the pointwise products in float32, the weight transform in
float64 rounded once, as the F(2x2, 3x3) op does), against float64 F.conv2d; torch's own fp32 conv
for scale. Max abs error relative to the output's max. Usage: python f4_error.py"""

import torch
import torch.nn.functional as F

BT = torch.tensor(
    [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ],
    dtype=torch.float32,
)
G = torch.tensor(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
    dtype=torch.float64,
)
AT = torch.tensor(
    [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    dtype=torch.float32,
)


def winograd_f4(x, w):
    N, _, H, W = x.shape
    TH, TW = (H + 3) // 4, (W + 3) // 4
    xp = F.pad(x, (1, TW * 4 + 1 - W, 1, TH * 4 + 1 - H))
    d = xp.unfold(2, 6, 4).unfold(3, 6, 4)  # [N, C, TH, TW, 6, 6]
    V = torch.einsum("ik,nctukl,jl->ijntuc", BT, d, BT)
    U = torch.einsum("ir,ocrs,js->ijco", G, w.double(), G).float()
    M = torch.einsum("ijntuc,ijco->ijntuo", V, U)
    Y = torch.einsum("ai,ijntuo,bj->ntuoab", AT, M, AT)  # [N, TH, TW, Cout, 4, 4]
    return Y.permute(0, 3, 1, 4, 2, 5).reshape(N, w.shape[0], TH * 4, TW * 4)[:, :, :H, :W]


def main():
    torch.manual_seed(0)
    for cin, hw in [(128, 32), (256, 16), (256, 8), (512, 4)]:
        x = torch.randn(2, cin, hw, hw)
        w = torch.randn(cin, cin, 3, 3) / (9 * cin) ** 0.5
        ref = F.conv2d(x.double(), w.double(), None, 1, 1)
        scale = ref.abs().max()
        e_torch = ((F.conv2d(x, w, None, 1, 1).double() - ref).abs().max() / scale).item()
        e_f4 = ((winograd_f4(x, w).double() - ref).abs().max() / scale).item()
        print(f"{cin}->{cin} {hw}x{hw}: torch fp32 conv {e_torch:.1e}, F(4x4, 3x3) {e_f4:.1e}")


if __name__ == "__main__":
    main()
