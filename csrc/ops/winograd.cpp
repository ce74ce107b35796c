// csrc/ops/winograd.cpp — torch glue of the CPU Winograd F(2×2, 3×3) and F(4×4, 3×3) convolutions:
//
//   iddpm::winograd_weight(Tensor weight, bool packed=False, int tile=2, bool flip=False) -> Tensor
//     weight: [Cout, Cin, 3, 3] float32 or bfloat16 (any strides) -> U [16, Cin, Cout] of its dtype
//     (G g Gᵀ per (co, ci), computed in float64, rounded once): what conv3x3_winograd takes, made
//     once per weight. packed (bf16, Cin even, Cout a multiple of 32, a CPU with AVX512-BF16): U
//     packed for the VDPBF16PS GEMMs, [16, Cout/32, Cin/2, 64] (common/winograd_params.h).
//     tile=4 (float32, not packed): F(4×4, 3×3)'s U [36, Cin, Cout]; conv3x3_winograd then runs
//     F(4×4, 3×3) (36 GEMMs over 4×4 output tiles: 1.78× fewer products, ~4× the rounding error).
//     flip: U of the filters rotated by 180° (g[2 - r][2 - s]); of weight.transpose(0, 1), the U
//     of the input gradient's conv (the training conv remakes both every call).
//   iddpm::conv3x3_winograd(Tensor x, Tensor weight_t, Tensor? bias, Tensor? residual) -> Tensor
//     y = conv2d(x, weight, bias, stride 1, padding 1) (+ residual), x [N, Cin, H, W] (any layout;
//     channels-last is read in place), weight_t = winograd_weight(weight), bias [Cout], residual
//     [N, Cout, H, W], all float32 or all bfloat16. y: [N, Cout, H, W] of that dtype,
//     channels-last. A packed weight_t runs the bf16 GEMMs and output transform of
//     csrc/cpu/winograd_packed.cpp per block of tiles whose V stays in the L2 cache (M in float32,
//     not rounded to bf16).
//   iddpm::conv3x3_winograd_weight_grad(Tensor x, Tensor grad_y, int tile=2) -> Tensor
//     the weight gradient [Cout, Cin, 3, 3] of conv2d(x, weight, stride 1, padding 1) given
//     grad_y [N, Cout, H, W] (the output's gradient, any layout), float32 only; by the same
//     transforms: 16 GEMMs Vᵀ @ dM reduce over the tiles (2.25x fewer products than direct), or
//     with tile=4 F(4×4, 3×3)'s 36 (4x fewer).
//   iddpm::convert_layout(Tensor x, bool channels_last) -> Tensor
//     a copy of the 4-D x in channels-last (True) or contiguous NCHW (False) memory format: the
//     ops' own conversion (below), for the Python side of the training conv.
// Input transform, 16 (F(4×4): 36) GEMMs [P, Cin] @ [Cin, Cout] (float32: cpublas::brgemm, oneDNN's
// micro-kernel where it runs; bf16: at::bmm, oneDNN), output transform (common/winograd_params.h
// has the math; the transforms are csrc/cpu/winograd*). bfloat16: V, M and y are bf16 (each rounded
// once from float32 arithmetic). CPU only.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>

#include "common/winograd_params.h"
#include "cpu/winograd.h"
#include "ops/checks.h"
#include "ops/dtype.h"

namespace iddpm::ops {
namespace {

using OptTensor = std::optional<at::Tensor>;

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// t in channels-last (else contiguous NCHW) memory format: t itself where it already is (unless
// `copy`), else a copy: for a dense 4-D float32/bf16 CPU tensor in the other layout by
// cpu::transpose_planes (16×16 register blocks on AVX-512; torch's strided copy is much slower at
// the UNet's shapes: iddpm bench conv --passes train, NCHW rows), else by torch.
at::Tensor to_layout(const at::Tensor& t, bool channels_last, bool copy) {
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const auto other = channels_last ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
  if (t.is_contiguous(fmt)) return copy ? t.clone(fmt) : t;
  if (t.dim() != 4 || !t.is_cpu() || !t.is_contiguous(other) ||
      !dtype_in(t.scalar_type(), cpu::kWinogradDtypes)) {
    return t.contiguous(fmt);
  }
  at::Tensor out = at::empty(t.sizes(), t.options().memory_format(fmt));
  const int64_t N = t.size(0), C = t.size(1), HW = t.size(2) * t.size(3);
  if (out.numel() > 0) {  // per image [C][HW] -> [HW][C], or back
    cpu::transpose_planes(t.const_data_ptr(), out.mutable_data_ptr(), dtype_of(t), N,
                          channels_last ? C : HW, channels_last ? HW : C);
  }
  return out;
}

at::Tensor convert_layout_cpu(const at::Tensor& x, bool channels_last) {
  check_defined(x, "x");
  check_dim(x, "x", 4, "[N, C, H, W]");
  return to_layout(x, channels_last, /*copy=*/true);
}

constexpr int64_t kBlockBytes = int64_t(8) << 20;
constexpr int64_t kMinBlockTiles = 64;

// Tiles per block of a call whose V and M (or dM) take `per_tile` elements of `esize` bytes per
// tile: about kBlockBytes together, at least kMinBlockTiles (the GEMMs need rows), at most P.
int64_t block_tiles(int64_t P, int64_t per_tile, int64_t esize) {
  return std::min(P, std::max(kMinBlockTiles, kBlockBytes / (esize * per_tile)));
}

// A workspace of `bytes` bytes (never shared between threads, so concurrent calls from different
// threads are safe): the calling thread's kept buffer (grown as needed, up to
// 2·kBlockBytes: ~8 MB normally), or a buffer of this call alone for the rare wider convolution
// (kMinBlockTiles tiles of thousands of channels), so no thread keeps more than 16 MB for good.
at::Tensor workspace(int64_t bytes, const at::TensorOptions& options) {
  const auto opts = options.dtype(at::kByte);
  if (bytes > 2 * kBlockBytes) return at::empty({bytes}, opts);
  thread_local at::Tensor buf;
  if (!buf.defined() || buf.numel() < bytes) buf = at::empty({bytes}, opts);
  return buf;
}

// ---- the GEMMs M[k] = V[k] @ U[k] ([rows, Cin] @ [Cin, Cout], row-major, k < 16 or 36) ----
// float32: torch's batch-reduce GEMM entry point at::native::cpublas::brgemm (oneDNN's
// micro-kernel, which torch's CPU flash attention also runs, where torch has it and the CPU
// supports it; else torch runs its own sgemm on the block) on blocks of kGemmRows x kGemmCols,
// parallel over (k, row block): 1.2-2x at::bmm's MKL sgemm at these shapes on an AMD EPYC with the
// micro-kernel (MKL takes slower code paths on non-Intel CPUs); with oneDNN off, as fast as at::bmm
// (a reviewer's measurement). bf16: at::bmm (the bf16 micro-kernel wants a VNNI-packed U, and where
// it is refused brgemm has no fallback). IDDPM_WINOGRAD_GEMM=bmm forces at::bmm; unset, auto or
// brgemm: as above.
constexpr int64_t kGemmRows = 64;
constexpr int64_t kGemmCols = 64;

// True when the float32 GEMMs of this call go through cpublas::brgemm (IDDPM_WINOGRAD_GEMM, read
// per call: tests switch it).
bool use_brgemm(at::ScalarType dtype) {
  const char* v = std::getenv("IDDPM_WINOGRAD_GEMM");
  const std::string mode = (v == nullptr || *v == '\0') ? "auto" : v;
  TORCH_CHECK_VALUE(mode == "auto" || mode == "bmm" || mode == "brgemm",
                    "IDDPM_WINOGRAD_GEMM: expected auto, bmm or brgemm (or unset), got '", mode,
                    "'");
  return mode != "bmm" && dtype == at::kFloat;
}

void gemms_brgemm(int64_t points, const float* v, const float* u, float* m, int64_t rows,
                  int64_t Cin, int64_t Cout) {
  const int64_t row_blocks = (rows + kGemmRows - 1) / kGemmRows;
  at::parallel_for(0, points * row_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t k = i / row_blocks, r0 = (i % row_blocks) * kGemmRows;
      const int64_t mr = std::min(kGemmRows, rows - r0);
      const float* a = v + (k * rows + r0) * Cin;
      const float* b = u + k * Cin * Cout;
      float* c = m + (k * rows + r0) * Cout;
      for (int64_t n0 = 0; n0 < Cout; n0 += kGemmCols) {
        const int64_t nc = std::min(kGemmCols, Cout - n0);
        at::native::cpublas::brgemm(mr, nc, Cin, Cin, Cout, Cout, false, a, b + n0, c + n0, false);
      }
    }
    at::native::cpublas::brgemm_release(false);
  });
}

void check_cpu(const at::Tensor& t, const char* name) {
  check_cpu_only(t, name, "the op");
  TORCH_CHECK_VALUE(dtype_in(t.scalar_type(), cpu::kWinogradDtypes), name, ": expected dtype ",
                    dtype_names(cpu::kWinogradDtypes), ", got ", torch_dtype_name(t));
}

// The packed form's requirements on a weight of Cin inputs and Cout outputs (and the CPU).
void check_packable(const at::Tensor& weight, int64_t Cin, int64_t Cout, const char* name) {
  TORCH_CHECK_VALUE(weight.scalar_type() == at::kBFloat16, name,
                    ": the packed form is bf16 only, got ", torch_dtype_name(weight));
  TORCH_CHECK_VALUE(Cin > 0 && Cin % 2 == 0 && Cout > 0 && Cout % kWinogradPackCols == 0, name,
                    ": the packed form needs an even Cin and a Cout that is a multiple of ",
                    kWinogradPackCols, ", got Cin = ", Cin, ", Cout = ", Cout);
  TORCH_CHECK_VALUE(cpu::winograd_packed_supported(), name,
                    ": the packed form needs a CPU with AVX512-BF16 (this one has none; "
                    "capabilities()['winograd']['cpu']['packed'] is False)");
}

// tile (2 or 4) for a tensor of `dtype` named `name` (F(4×4, 3×3) is float32 only).
void check_tile(int64_t tile, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(tile == kWinogradTile || tile == kWinogradTile4,
                    "tile: expected 2 (F(2x2, 3x3)) or 4 (F(4x4, 3x3)), got ", tile);
  TORCH_CHECK_VALUE(tile == kWinogradTile || t.scalar_type() == at::kFloat, name,
                    ": tile=4 (F(4x4, 3x3)) is float32 only, got ", torch_dtype_name(t));
}

at::Tensor winograd_weight_cpu(const at::Tensor& weight, bool packed, int64_t tile, bool flip) {
  check_defined(weight, "weight");
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3,
                    "weight: expected shape [Cout, Cin, 3, 3], got ", shape_str(weight));
  check_cpu(weight, "weight");
  check_tile(tile, weight, "weight");
  const int64_t Cout = weight.size(0), Cin = weight.size(1);
  TORCH_CHECK_VALUE(!packed || tile == kWinogradTile,
                    "packed: the packed form is F(2x2, 3x3) (tile=2) only, got tile=", tile);
  if (packed) check_packable(weight, Cin, Cout, "weight");
  at::Tensor u = at::empty({winograd_points(tile), Cin, Cout}, weight.options());
  WinogradWeightParams p;
  p.dtype = dtype_of(weight);
  p.w = weight.const_data_ptr();
  p.u = u.mutable_data_ptr();
  p.Cout = Cout;
  p.Cin = Cin;
  for (int d = 0; d < 4; ++d) p.stride[d] = weight.stride(d);
  p.tile = tile;
  p.flip = flip;
  if (u.numel() > 0) cpu::winograd_weight(p);
  if (!packed) return u;
  at::Tensor up =
      at::empty({kWinogradPoints, Cout / kWinogradPackCols, Cin / 2, 2 * kWinogradPackCols},
                weight.options());
  cpu::winograd_pack_bf16(static_cast<const uint16_t*>(u.const_data_ptr()), Cin, Cout,
                          static_cast<uint16_t*>(up.mutable_data_ptr()));
  return up;
}

// The most rows (tiles) per block of the packed path: V of the block ~384 KB (L2-resident with a
// column block's packed U and the float32 M), a multiple of the 12-row micro-tile (conv_packed
// then splits the tiles into equal blocks of at most this many).
int64_t packed_block_rows(int64_t Cin) {
  const int64_t rows = (int64_t(384) << 10) / (2 * kWinogradPoints * Cin);
  return std::max<int64_t>(12, std::min<int64_t>(240, rows / 12 * 12));
}

// y = conv(x) + bias (+ r) from the packed weight u (checked by the caller).
void conv_packed(const at::Tensor& x, const at::Tensor& u, const at::Tensor& b, const at::Tensor& r,
                 at::Tensor& y) {
  const int64_t N = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3), Cout = y.size(1);
  const int64_t P = N * winograd_tiles(H) * winograd_tiles(W);
  // Blocks of at most the L2-sized row count, as many as a multiple of the thread count, of
  // equal size (and so a balanced split between the threads).
  const int64_t threads = at::get_num_threads(), cap = packed_block_rows(Cin);
  const int64_t want = ((P + cap - 1) / cap + threads - 1) / threads * threads;
  const int64_t block = std::max<int64_t>(1, (P + want - 1) / want);
  const int64_t nblocks = (P + block - 1) / block;
  WinogradPackedParams pp;
  pp.u_packed = u.const_data_ptr();
  pp.bias = b.defined() ? b.const_data_ptr() : nullptr;
  pp.residual = r.defined() ? r.const_data_ptr() : nullptr;
  pp.y = y.mutable_data_ptr();
  pp.N = N, pp.H = H, pp.W = W, pp.Cin = Cin, pp.Cout = Cout;
  const int64_t v_bytes = kWinogradPoints * block * Cin * 2;
  const int64_t m_bytes = kWinogradPoints * block * kWinogradPackCols * 4;
  at::parallel_for(0, nblocks, 1, [&](int64_t begin, int64_t end) {
    const at::Tensor ws_buf = workspace(v_bytes + m_bytes, x.options());  // this thread's
    char* ws = static_cast<char*>(ws_buf.mutable_data_ptr());
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t0 = i * block, t1 = std::min(P, t0 + block);
      WinogradInputParams in;
      in.dtype = DType::kBFloat16;
      in.x = x.const_data_ptr();
      in.v = ws;
      in.N = N, in.H = H, in.W = W, in.C = Cin;
      in.tile_begin = t0, in.tile_end = t1;
      cpu::winograd_input(in);  // (its parallel_for runs inline inside this one)
      cpu::winograd_packed_block(pp, t0, t1, reinterpret_cast<const uint16_t*>(ws),
                                 reinterpret_cast<float*>(ws + v_bytes));
    }
  });
}

at::Tensor conv3x3_winograd_cpu(const at::Tensor& x_in, const at::Tensor& weight_t,
                                const OptTensor& bias, const OptTensor& residual) {
  check_defined(x_in, "x");
  check_dim(x_in, "x", 4, "[N, Cin, H, W]");
  check_cpu(x_in, "x");
  check_defined(weight_t, "weight_t");
  check_cpu(weight_t, "weight_t");
  check_same_dtype(weight_t, "weight_t", x_in, "x");
  const int64_t N = x_in.size(0), Cin = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const bool packed = weight_t.dim() == 4;
  if (packed) {
    TORCH_CHECK_VALUE(weight_t.size(0) == kWinogradPoints && weight_t.size(2) * 2 == Cin &&
                          weight_t.size(3) == 2 * kWinogradPackCols,
                      "weight_t: expected shape [16, Cout/32, ", Cin / 2, ", 64] (winograd_weight(",
                      "weight, packed=True) of a [Cout, Cin, 3, 3] weight, Cin = dim 1 of x = ",
                      Cin, ") or [16 or 36, ", Cin, ", Cout], got ", shape_str(weight_t));
    check_packable(weight_t, Cin, weight_t.size(1) * kWinogradPackCols, "weight_t");
  } else {
    TORCH_CHECK_VALUE(weight_t.dim() == 3 && winograd_tile_of_points(weight_t.size(0)) != 0 &&
                          weight_t.size(1) == Cin,
                      "weight_t: expected shape [16, ", Cin, ", Cout] or [36, ", Cin,
                      ", Cout] (winograd_weight of a [Cout, Cin, 3, 3] weight with tile=2 or 4, "
                      "Cin = dim 1 of x), got ",
                      shape_str(weight_t));
    check_tile(winograd_tile_of_points(weight_t.size(0)), weight_t, "weight_t");
  }
  const int64_t Cout = packed ? weight_t.size(1) * kWinogradPackCols : weight_t.size(2);
  if (given(bias)) {
    check_cpu(*bias, "bias");
    check_same_dtype(*bias, "bias", x_in, "x");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == Cout, "bias: expected shape [", Cout,
                      "] ([Cout] of weight_t), got ", shape_str(*bias));
  }
  if (given(residual)) {
    check_cpu(*residual, "residual");
    check_same_dtype(*residual, "residual", x_in, "x");
    TORCH_CHECK_VALUE(residual->dim() == 4 && residual->size(0) == N && residual->size(1) == Cout &&
                          residual->size(2) == H && residual->size(3) == W,
                      "residual: expected shape [", N, ", ", Cout, ", ", H, ", ", W,
                      "] (that of the output), got ", shape_str(*residual));
  }
  const auto cl = at::MemoryFormat::ChannelsLast;
  at::Tensor y = at::empty({N, Cout, H, W}, x_in.options(), cl);
  if (y.numel() == 0) return y;
  const at::Tensor x = to_layout(x_in, true, false);
  const at::Tensor u = weight_t.contiguous();
  const at::Tensor b = given(bias) ? bias->contiguous() : at::Tensor();
  const at::Tensor r = given(residual) ? to_layout(*residual, true, false) : at::Tensor();
  if (packed) {
    conv_packed(x, u, b, r, y);
    return y;
  }
  const int64_t points = weight_t.size(0), tile = winograd_tile_of_points(points);
  const int64_t P = N * winograd_tiles(H, tile) * winograd_tiles(W, tile);
  // Blocks of tiles whose V and M together take about kBlockBytes (at least kMinBlockTiles
  // tiles: the GEMMs need rows), in a per-thread workspace kept between calls (fresh multi-MB
  // buffers cost page faults on every call).
  const DType dtype = dtype_of(x);
  const bool brgemm = use_brgemm(x.scalar_type());
  const int64_t esize = static_cast<int64_t>(x.element_size());
  const int64_t per_tile = points * (Cin + Cout);  // elements of V and M per tile
  const int64_t block = block_tiles(P, per_tile, esize);
  const at::Tensor ws_buf = workspace(block * per_tile * esize, x.options());  // held for the call
  char* ws = static_cast<char*>(ws_buf.mutable_data_ptr());
  const void* xp = x.const_data_ptr();
  for (int64_t t0 = 0; t0 < P; t0 += block) {
    const int64_t t1 = std::min(P, t0 + block), rows = t1 - t0;
    void* vp = ws;
    void* mp = ws + points * rows * Cin * esize;
    at::Tensor v = at::from_blob(vp, {points, rows, Cin}, x.options());
    at::Tensor m = at::from_blob(mp, {points, rows, Cout}, x.options());
    if (Cin > 0) {
      WinogradInputParams in;
      in.dtype = dtype;
      in.x = xp;
      in.v = vp;
      in.N = N, in.H = H, in.W = W, in.C = Cin;
      in.tile_begin = t0, in.tile_end = t1;
      in.tile = tile;
      cpu::winograd_input(in);
    }
    if (brgemm && Cin > 0) {
      gemms_brgemm(points, static_cast<const float*>(vp), u.const_data_ptr<float>(),
                   static_cast<float*>(mp), rows, Cin, Cout);
    } else {
      at::bmm_out(m, v, u);  // Cin = 0: zeros
    }
    WinogradOutputParams out;
    out.dtype = dtype;
    out.m = mp;
    out.bias = b.defined() ? b.const_data_ptr() : nullptr;
    out.residual = r.defined() ? r.const_data_ptr() : nullptr;
    out.y = y.mutable_data_ptr();
    out.N = N, out.H = H, out.W = W, out.C = Cout;
    out.tile_begin = t0, out.tile_end = t1;
    out.tile = tile;
    cpu::winograd_output(out);
  }
  return y;
}

// The weight gradient of y = conv2d(x, weight, padding 1) from grad_y: per block of tiles, V
// (the input transform of x) and dM (the output transform's adjoint of grad_y), dU[k] += V[k]ᵀ
// dM[k] (16 or 36 GEMMs [Cin, rows] @ [rows, Cout]: the first block's at::bmm writes dU, the
// others' at::baddbmm add to it), and at the end Gᵀ dU G for every filter as one float32 GEMM.
// float32 only. (The GEMMs run in float32 also inside an autocast region: their out= and in-place
// forms, which autocast leaves alone. at::mm may split the last GEMM differently with the thread
// count: the F(4×4) results can differ in the last bits between thread counts, not between runs.)
at::Tensor conv3x3_winograd_weight_grad_cpu(const at::Tensor& x_in, const at::Tensor& grad_y_in,
                                            int64_t tile) {
  check_defined(x_in, "x");
  check_dim(x_in, "x", 4, "[N, Cin, H, W]");
  check_cpu_only(x_in, "x", "the op");
  TORCH_CHECK_VALUE(x_in.scalar_type() == at::kFloat,
                    "x: expected dtype float32 (the weight gradient op is float32 only), got ",
                    torch_dtype_name(x_in));
  check_defined(grad_y_in, "grad_y");
  check_same_device(grad_y_in, "grad_y", x_in, "x");
  check_same_dtype(grad_y_in, "grad_y", x_in, "x");
  const int64_t N = x_in.size(0), Cin = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  TORCH_CHECK_VALUE(grad_y_in.dim() == 4 && grad_y_in.size(0) == N && grad_y_in.size(2) == H &&
                        grad_y_in.size(3) == W,
                    "grad_y: expected shape [", N, ", Cout, ", H, ", ", W,
                    "] (N, H and W of x), got ", shape_str(grad_y_in));
  check_tile(tile, x_in, "x");
  const int64_t Cout = grad_y_in.size(1), points = winograd_points(tile);
  const at::TensorOptions opts = x_in.options();
  at::Tensor grad_w = at::empty({Cout, Cin, 3, 3}, opts);
  const int64_t P = N * winograd_tiles(H, tile) * winograd_tiles(W, tile);
  if (grad_w.numel() == 0) return grad_w;
  if (P == 0) return grad_w.zero_();
  const at::Tensor x = to_layout(x_in, true, false);
  const at::Tensor gy = to_layout(grad_y_in, true, false);
  at::Tensor du = at::empty({points, Cin, Cout}, opts);  // (the first block's bmm writes it)
  const int64_t per_tile = points * (Cin + Cout);        // floats of V and dM per tile
  const int64_t block = block_tiles(P, per_tile, 4);
  const at::Tensor ws_buf = workspace(block * per_tile * 4, opts);  // held for the call
  float* ws = static_cast<float*>(ws_buf.mutable_data_ptr());
  for (int64_t t0 = 0; t0 < P; t0 += block) {
    const int64_t t1 = std::min(P, t0 + block), rows = t1 - t0;
    float* vp = ws;
    float* mp = ws + points * rows * Cin;
    WinogradInputParams in;
    in.x = x.const_data_ptr();
    in.v = vp;
    in.N = N, in.H = H, in.W = W, in.C = Cin;
    in.tile_begin = t0, in.tile_end = t1;
    in.tile = tile;
    cpu::winograd_input(in);
    in.x = gy.const_data_ptr();
    in.v = mp;
    in.C = Cout;
    cpu::winograd_output_adjoint(in);
    const at::Tensor v = at::from_blob(vp, {points, rows, Cin}, opts);
    const at::Tensor m = at::from_blob(mp, {points, rows, Cout}, opts);
    if (t0 == 0) {
      at::bmm_out(du, v.transpose(1, 2), m);
    } else {
      du.baddbmm_(v.transpose(1, 2), m);
    }
  }
  // Gᵀ dU G per filter as one GEMM: [9, points] @ [points, Cin·Cout] (kron(G, G)ᵀ, rounded once
  // to float32 from float64), then the taps to [Cout, Cin, 3, 3].
  at::Tensor k = at::empty({points, 9}, opts.dtype(at::kDouble));
  cpu::winograd_transform_matrix(tile, k.mutable_data_ptr<double>());
  at::Tensor taps = at::empty({9, Cin * Cout}, opts);
  at::mm_out(taps, k.to(at::kFloat).t(), du.view({points, Cin * Cout}));
  grad_w.copy_(taps.view({3, 3, Cin, Cout}).permute({3, 2, 0, 1}));
  return grad_w;
}

}  // namespace

TORCH_LIBRARY_IMPL(iddpm, CPU, m) {
  m.impl("winograd_weight", &winograd_weight_cpu);
  m.impl("conv3x3_winograd", &conv3x3_winograd_cpu);
  m.impl("conv3x3_winograd_weight_grad", &conv3x3_winograd_weight_grad_cpu);
  m.impl("convert_layout", &convert_layout_cpu);
}

#ifdef IDDPM_WITH_CUDA
// No CUDA kernel: the CPU functions' checks refuse CUDA tensors with a clear error (instead of
// the dispatcher's "could not run with arguments from the CUDA backend").
TORCH_LIBRARY_IMPL(iddpm, CUDA, m) {
  m.impl("winograd_weight", &winograd_weight_cpu);
  m.impl("conv3x3_winograd", &conv3x3_winograd_cpu);
  m.impl("conv3x3_winograd_weight_grad", &conv3x3_winograd_weight_grad_cpu);
  m.impl("convert_layout", &convert_layout_cpu);  // (torch's copy on CUDA)
}
#endif

}  // namespace iddpm::ops
