// csrc/common/winograd_params.h — the arguments of the CPU Winograd F(2×2, 3×3) and F(4×4, 3×3)
// transforms of iddpm::conv3x3_winograd (csrc/ops/winograd.cpp, csrc/cpu/winograd*), as raw
// pointers. F(2×2, 3×3) below; F(4×4, 3×3) (`tile` = 4, float32 only) at the end.
//
// The convolution is 3×3, stride 1, padding 1 (zeros), dilation 1, one group, so the output has
// the input's H × W. The output is cut into 2×2 tiles, P = N · ceil(H/2) · ceil(W/2) of them
// (tile p = (n · TH + ty) · TW + tx); tile (ty, tx) reads the 4×4 input patch at rows
// 2·ty - 1 … 2·ty + 2 and columns 2·tx - 1 … 2·tx + 2 (outside the image: zero).
//   input transform:  V[k][p][c] = (Bᵀ d B)[i][j], k = 4·i + j, d the patch of channel c
//   16 GEMMs:         M[k] = V[k] @ U[k]   ([P, Cin] @ [Cin, Cout], U = G g Gᵀ per (ci, co))
//                     (F(4×4, 3×3): 36, below)
//   output transform: y[2·ty + a][2·tx + b][co] = (Aᵀ M A)[a][b] + bias[co] + residual[...]
// The weight gradient (iddpm::conv3x3_winograd_weight_grad) runs the adjoints backwards:
//   dM[k][p][co] = (A dY Aᵀ)[i][j] from the output tile's gradient dY (rows/columns past H/W: 0),
//   dU[k] = Σ over the tiles V[k]ᵀ @ dM[k]   ([Cin, P] @ [P, Cout]),  dg = Gᵀ dU G per (ci, co),
// with Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
//      G  = [[1, 0, 0], [½, ½, ½], [½, -½, ½], [0, 0, 1]],
//      Aᵀ = [[1, 1, 1, 0], [0, 1, -1, -1]].
// Activations are channels-last (NHWC); output rows/columns past H/W (odd sizes) are not written.
// Every array of one call has the same element type, `dtype`: float32, or bfloat16 (then the
// transforms compute in float32 from the bf16 values and round V and y once each to bf16; the
// GEMMs' M is bf16 as at::bmm writes it).
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace iddpm {

inline constexpr int64_t kWinogradTile = 2;     // output tile edge (F(2×2, 3×3))
inline constexpr int64_t kWinogradAlpha = 4;    // input tile edge
inline constexpr int64_t kWinogradPoints = 16;  // alpha², the number of GEMMs

// F(4×4, 3×3): 4×4 output tiles from 6×6 input patches (rows 4·ty - 1 … 4·ty + 4), 36 GEMMs: 2.25
// products per output and channel pair instead of F(2×2)'s 4 (direct: 9), with larger transform
// coefficients, so about 4× F(2×2)'s float32 rounding error (still ~1e-6 relative). Points 0, 1,
// -1, ½, -2 and ∞ (the choice of Barabasz et al., "Error analysis and improving the accuracy of
// Winograd convolution for deep neural networks", 2020: about 1.5× more accurate than 0, ±1, ±2):
//   Bᵀ = [[1, -3/2, -2, 3/2, 1, 0], [0, -1, 1/2, 5/2, 1, 0], [0, 1, -5/2, 1/2, 1, 0],
//         [0, -2, -1, 2, 1, 0], [0, 1/2, -1, -1/2, 1, 0], [0, 1, -3/2, -2, 3/2, 1]],
//   G  = [[1, 0, 0], [1/3, 1/3, 1/3], [-1/3, 1/3, -1/3], [-16/15, -8/15, -4/15],
//         [1/15, -2/15, 4/15], [0, 0, 1]],
//   Aᵀ = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 1/2, -2, 0], [0, 1, 1, 1/4, 4, 0],
//         [0, 1, -1, 1/8, -8, 1]];
// V, M and dM are then [36, tiles, C] (k = 6·i + j), U [36, Cin, Cout].
inline constexpr int64_t kWinogradTile4 = 4;

// The output tile edge (2 or 4) of a transformed weight with `points` matrices (16 or 36; else 0).
inline int64_t winograd_tile_of_points(int64_t points) {
  return points == 16 ? 2 : points == 36 ? 4 : 0;
}
// (tile + 2)², the GEMMs of F(tile×tile, 3×3).
inline int64_t winograd_points(int64_t tile) { return (tile + 2) * (tile + 2); }
inline int64_t winograd_tiles(int64_t size, int64_t tile = kWinogradTile) {
  return (size + tile - 1) / tile;
}

// The transforms work on the tiles [tile_begin, tile_end) (the op runs blocks of tiles so that
// V and M stay small); V and M hold that block only: row t - tile_begin of each of their 16 (36)
// matrices is tile t.
// G of F(2×2, 3×3) and of F(4×4, 3×3) (above), [alpha][3], for the weight transform G g Gᵀ.
inline constexpr double kWinogradG2[4][3] = {
    {1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
inline constexpr double kWinogradG4[6][3] = {{1, 0, 0},
                                             {1.0 / 3, 1.0 / 3, 1.0 / 3},
                                             {-1.0 / 3, 1.0 / 3, -1.0 / 3},
                                             {-16.0 / 15, -8.0 / 15, -4.0 / 15},
                                             {1.0 / 15, -2.0 / 15, 4.0 / 15},
                                             {0, 0, 1}};

// The weight transform: u[k][ci][co] = (G g Gᵀ)[i][j], k = alpha·i + j, g the 3×3 filter (co, ci)
// of w (read at its strides, elements: a transposed view gives U of the transposed weight), or
// with `flip` that filter rotated by 180° (g[2 - r][2 - s]: the input gradient's conv), computed
// in float64 and rounded once to dtype.
struct WinogradWeightParams {
  DType dtype = DType::kFloat32;  // of w and u
  const void* w;                  // [Cout, Cin, 3, 3] at `stride`
  void* u;                        // [points, Cin, Cout] (dense)
  int64_t Cout = 0, Cin = 0;
  int64_t stride[4] = {0, 0, 0, 0};
  int64_t tile = kWinogradTile;  // 2, or 4 (float32 only)
  bool flip = false;
};

struct WinogradInputParams {
  DType dtype = DType::kFloat32;  // of x and v
  const void* x;                  // [N, H, W, C] (channels-last)
  void* v;                        // [points, tile_end - tile_begin, C]
  int64_t N = 0, H = 0, W = 0, C = 0;
  int64_t tile_begin = 0, tile_end = 0;
  int64_t tile = kWinogradTile;  // 2: F(2×2, 3×3); 4: F(4×4, 3×3) (float32 only)
};

struct WinogradOutputParams {
  DType dtype = DType::kFloat32;  // of m, bias, residual and y
  const void* m;                  // [points, tile_end - tile_begin, C]
  const void* bias;               // [C] or nullptr
  const void* residual;           // [N, H, W, C] or nullptr (added to the output)
  void* y;                        // [N, H, W, C]
  int64_t N = 0, H = 0, W = 0, C = 0;
  int64_t tile_begin = 0, tile_end = 0;
  int64_t tile = kWinogradTile;  // 2 or 4, as above
};

// The bf16 convolution on a packed transformed weight (csrc/cpu/winograd_packed.cpp, CPUs with
// AVX512-BF16): U packed as pairs of adjacent input channels for VDPBF16PS,
//   u_packed[k][nb][p][2·j + h] = U[k][2·p + h][32·nb + j]   ([16, Cout/32, Cin/2, 64] bf16),
// Cin even and Cout a multiple of 32. Per block of tiles, V (bf16, the input transform above) and
// M (float32, not rounded) stay in the caller's scratch; the output transform reads M in float32
// and rounds y once to bf16.
inline constexpr int64_t kWinogradPackCols = 32;  // output channels per packed column block

struct WinogradPackedParams {
  const void* u_packed;  // [16, Cout/32, Cin/2, 64] bf16
  const void* bias;      // [Cout] bf16 or nullptr
  const void* residual;  // [N, H, W, Cout] bf16 or nullptr
  void* y;               // [N, H, W, Cout] bf16
  int64_t N = 0, H = 0, W = 0, Cin = 0, Cout = 0;
};

}  // namespace iddpm
