// csrc/common/winograd_params.h — the arguments of the CPU Winograd F(2×2, 3×3) transforms of
// iddpm::conv3x3_winograd (csrc/ops/winograd.cpp, csrc/cpu/winograd*), as raw pointers.
//
// The convolution is 3×3, stride 1, padding 1 (zeros), dilation 1, one group, so the output has
// the input's H × W. The output is cut into 2×2 tiles, P = N · ceil(H/2) · ceil(W/2) of them
// (tile p = (n · TH + ty) · TW + tx); tile (ty, tx) reads the 4×4 input patch at rows
// 2·ty - 1 … 2·ty + 2 and columns 2·tx - 1 … 2·tx + 2 (outside the image: zero).
//   input transform:  V[k][p][c] = (Bᵀ d B)[i][j], k = 4·i + j, d the patch of channel c
//   16 GEMMs:         M[k] = V[k] @ U[k]   ([P, Cin] @ [Cin, Cout], U = G g Gᵀ per (ci, co))
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

inline int64_t winograd_tiles(int64_t size) { return (size + kWinogradTile - 1) / kWinogradTile; }

// The transforms work on the tiles [tile_begin, tile_end) (the op runs blocks of tiles so that
// V and M stay small); V and M hold that block only: row t - tile_begin of each of their 16
// matrices is tile t.
struct WinogradInputParams {
  DType dtype = DType::kFloat32;  // of x and v
  const void* x;                  // [N, H, W, C] (channels-last)
  void* v;                        // [16, tile_end - tile_begin, C]
  int64_t N = 0, H = 0, W = 0, C = 0;
  int64_t tile_begin = 0, tile_end = 0;
};

struct WinogradOutputParams {
  DType dtype = DType::kFloat32;  // of m, bias, residual and y
  const void* m;                  // [16, tile_end - tile_begin, C]
  const void* bias;               // [C] or nullptr
  const void* residual;           // [N, H, W, C] or nullptr (added to the output)
  void* y;                        // [N, H, W, C]
  int64_t N = 0, H = 0, W = 0, C = 0;
  int64_t tile_begin = 0, tile_end = 0;
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
