// csrc/cpu/winograd.h — CPU kernels of iddpm::conv3x3_winograd and iddpm::winograd_weight over
// raw pointers (common/winograd_params.h; no tensor types here). The transforms pick the
// vector-ISA build of csrc/cpu/winograd_kernel.inc the CPU runs (avx512, avx2 or the baseline);
// the GEMMs between them are the op glue's (csrc/ops/winograd.cpp).
#pragma once

#include <cstdint>

#include "common/winograd_params.h"

namespace iddpm::cpu {

// V from x (input transform).
void winograd_input(const WinogradInputParams& p);
// y from M (output transform, + bias, + residual).
void winograd_output(const WinogradOutputParams& p);
// dM from dY, the output transform's adjoint (A dY Aᵀ per tile; for the weight gradient): p.x is
// dY [N, H, W, C] (channels-last), p.v receives dM [16 or 36, tile_end - tile_begin, C] (p.tile).
void winograd_output_adjoint(const WinogradInputParams& p);
// Per plane n < N: dst[n] = src[n]ᵀ, src [R][S] -> dst [S][R] (dense), float32 or bfloat16
// (raw 16-bit elements): the NCHW <-> channels-last conversions of the ops (R = C, S = H·W or the
// reverse).
void transpose_planes(const void* src, void* dst, DType dtype, int64_t N, int64_t R, int64_t S);
// kron(G, G) of F(tile×tile, 3×3) (tile 2 or 4) into k [points][9], float64: row 6i + j (4i + j)
// takes a filter's 9 taps (row-major) to its transformed point (i, j); its transpose takes the
// transformed weight's gradient back to the taps' (Gᵀ dU G).
void winograd_transform_matrix(int64_t tile, double* k);
// The dtypes the transforms and the weight transform take (one for all arrays of a call).
inline constexpr DType kWinogradDtypes[] = {DType::kFloat32, DType::kBFloat16};

// U [points, Cin, Cout] from a [Cout, Cin, 3, 3] weight given by its strides (elements), both of
// `dtype` (float32 or bfloat16; tile 4 float32 only), computed in float64 and rounded once to
// dtype (common/winograd_params.h's WinogradWeightParams). tile: 2 (F(2×2, 3×3), 16 points) or 4
// (F(4×4, 3×3), 36 points); flip: of the filters rotated by 180°.
void winograd_weight(const WinogradWeightParams& p);
// True when this CPU runs the packed bf16 convolution (AVX512-BF16 with AVX-512 F/BW/VL/DQ).
bool winograd_packed_supported();
// u_packed (common/winograd_params.h) from U [16, Cin, Cout] bf16 (raw bits), Cin even, Cout a
// multiple of kWinogradPackCols.
void winograd_pack_bf16(const uint16_t* u, int64_t Cin, int64_t Cout, uint16_t* u_packed);
// Tiles [t0, t1) of the packed bf16 convolution from their V ([16, t1 - t0, Cin] bf16, the
// input transform of that block): the 16 GEMMs into m ([16, t1 - t0, 32] float32 scratch), one
// column block of 32 output channels at a time, each followed by its output transform into y.
// Only where winograd_packed_supported().
void winograd_packed_block(const WinogradPackedParams& p, int64_t t0, int64_t t1, const uint16_t* v,
                           float* m);
// "avx512", "avx2" or "default": the build the transforms run on this CPU
// (IDDPM_WINOGRAD_CPU_ISA=avx2 or default forces a lower one).
const char* winograd_isa();

}  // namespace iddpm::cpu
