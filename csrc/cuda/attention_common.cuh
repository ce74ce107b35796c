// csrc/cuda/attention_common.cuh — device building blocks of the fused attention kernels
// (attention_fwd.cu, attention_bwd.cu): warp-level 16×8×16 matrix products on tensor cores
// (mma.sync, fp16/bf16 in, fp32 accumulate; fp32 inputs as TF32 or split-TF32, see Prec),
// shared-memory fragment loads (ldmatrix) and the global → shared tile copies (cp.async when
// 16-byte aligned, guarded scalar loads otherwise).
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with .row.col), lane = 4·g + t (g = lane/4,
// t = lane%4); a "pair" is two consecutive k (A, B) or n (C) elements:
//   A (16×16, rows m, cols k):  x[0] = (m=g,   k=2t..2t+1)   x[1] = (m=g+8, k=2t..2t+1)
//                               x[2] = (m=g,   k=2t+8..+9)   x[3] = (m=g+8, k=2t+8..+9)
//   B (16×8, rows k, cols n):   x[0] = (k=2t..2t+1, n=g)     x[1] = (k=2t+8..+9, n=g)
//   C (16×8 f32):               c[0], c[1] = (m=g, n=2t, 2t+1)   c[2], c[3] = (m=g+8, same n)
// Two C tiles side by side (n = 0..7 and 8..15) are exactly the A fragment of a 16×16 block,
// which is how P (and dS) go from one product into the next without leaving registers.
//
// fp32 inputs keep this k16 layout (a pair = two floats, float2) and run each 16×8×16 product
// as two m16n8k8 TF32 products (mma.sync ...f32.tf32.tf32.f32), whose fragments are, per lane:
//   A (16×8): a0 = (m=g, k=t)  a1 = (m=g+8, k=t)  a2 = (m=g, k=t+4)  a3 = (m=g+8, k=t+4)
//   B (8×8):  b0 = (k=t, n=g)  b1 = (k=t+4, n=g);  C as above.
// The k16 fragment's lane holds k = 2t, 2t+1 (+8 for the second half) of its rows of A and of
// its column of B, so half h of the k16 product is the k8 product whose slot t holds k = 8h + 2t
// and slot t+4 holds k = 8h + 2t + 1: the same permutation of k for A and B, i.e. the same sum,
// with no data exchanged between lanes (a_regs / b_regs below).
//
// With IDDPM_ATTN_HOST_EMULATION defined, the handful of warp-collective instructions below
// (mma.sync, ldmatrix, cp.async, and cvt.rna.tf32) call into a host emulator instead of inline PTX,
// which lets tests/ops/cuda_emulation/ run these kernels, unchanged otherwise, on the CPU (see
// docs/attention.md).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "common/attention_math.h"

// Whether the sm_80 kernels' bodies are compiled in this pass: under host emulation, and on the
// device for sm_80 and newer (cp.async, bf16 and TF32 mma.sync). A build whose arch list has
// 7.5 (Turing: T4) gets kernels that trap for it; the launchers never start them there
// (qkv_attention_kernel_arch, which the torch glue checks), so "auto" attention uses einsum.
#if defined(IDDPM_ATTN_HOST_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
#define IDDPM_ATTN_SM80_CODE 1
#else
#define IDDPM_ATTN_SM80_CODE 0
#endif
#include "common/dtype.h"
#include "cuda/attention.h"

namespace iddpm::cuda::attn_dev {

constexpr unsigned kFull = 0xffffffffu;

// ---- element types -------------------------------------------------------------------------
template <class T>
struct Elem;

template <>
struct Elem<__half> {
  using Pair = uint32_t;
  static constexpr bool kTensorCore = true;
  static __device__ __forceinline__ Pair pack(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);  // a in the low half
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_f(float x) { return __float2half_rn(x); }
};

template <>
struct Elem<__nv_bfloat16> {
  using Pair = uint32_t;
  static constexpr bool kTensorCore = true;
  static __device__ __forceinline__ Pair pack(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float x) { return __float2bfloat16_rn(x); }
};

template <>
struct Elem<float> {
  using Pair = float2;
  static constexpr bool kTensorCore = false;
  static __device__ __forceinline__ Pair pack(float a, float b) { return make_float2(a, b); }
  static __device__ __forceinline__ float to_f(float x) { return x; }
  static __device__ __forceinline__ float from_f(float x) { return x; }
};

template <class T>
struct FragA {
  typename Elem<T>::Pair x[4];
};
template <class T>
struct FragB {
  typename Elem<T>::Pair x[2];
};

__device__ __forceinline__ int lane_id() { return threadIdx.x & 31; }

#if !defined(IDDPM_ATTN_HOST_EMULATION)
__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
#endif

// ---- how the products run ------------------------------------------------------------------
// fp16 / bf16: kNative (mma.sync m16n8k16). fp32, chosen by the launcher (the caller's TF32
// permission, torch.backends.cuda.matmul.allow_tf32), a template parameter of the kernels:
//  kTf32:   the operands rounded to TF32 (cvt.rna: 10 mantissa bits, ties away from zero) once,
//           where they enter shared memory or an A fragment (round_tile, c_to_a, pack_operand),
//           so that the products themselves are plain m16n8k8 TF32 mma.sync;
//  kTf32x3: split-TF32, an accurate fp32 product: a = a_hi + a_lo with a_hi = tf32(a),
//           a_lo = tf32(a - a_hi) (a - a_hi is exact), and a·b ≈ a_lo·b_hi + a_hi·b_lo + a_hi·b_hi
//           (three TF32 products, fp32 accumulation; the dropped a_lo·b_lo and the rounding of
//           a_lo leave a relative error of about 2^-21 per product, near fp32's 2^-24);
//  kFma:    the product in fp32 FMAs on the same fragments (mma_f32_shuffle), the fp32 path
//           before the TF32 ones; not compiled for the GPU any more, the emulation test keeps it
//           as a second reference for kTf32x3.
enum class Prec { kNative, kTf32, kTf32x3, kFma };

// fp32 → TF32 (the bits of an fp32 value whose low 13 mantissa bits are zero), round to nearest,
// ties away from zero (cvt.rna.tf32.f32).
__device__ __forceinline__ uint32_t tf32_bits(float x) {
#if defined(IDDPM_ATTN_HOST_EMULATION)
  return attn_emu::cvt_rna_tf32(x);
#else
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
#endif
}
__device__ __forceinline__ float tf32_round(float x) { return __uint_as_float(tf32_bits(x)); }

// An fp32 value as it enters an operand under precision P (rounded to TF32 under kTf32).
template <Prec P>
__device__ __forceinline__ float operand(float x) {
  if constexpr (P == Prec::kTf32) {
    return tf32_round(x);
  } else {
    return x;
  }
}

// ---- matrix products: c (16×8 f32) += a (16×16) · b (16×8) ------------------------------------
// kFma: the product in fp32 FMAs on the same fragment layout. Each lane gathers row g and g+8
// of A and columns 2t, 2t+1 of B one k at a time from the lanes that hold them. Not inlined:
// inlined into every product of the fp32 kernels it made ptxas take minutes (sm_80).
#if defined(IDDPM_ATTN_HOST_EMULATION)
#define IDDPM_ATTN_NOINLINE
#else
#define IDDPM_ATTN_NOINLINE __noinline__
#endif
template <int = 0>
__device__ IDDPM_ATTN_NOINLINE void mma_f32_shuffle(float (&c)[4], const FragA<float>& a,
                                                    const FragB<float>& b) {
  const int lane = lane_id(), g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int k = 0; k < 16; ++k) {
    const int half = k >> 3, src_t = (k & 7) >> 1;
    const bool odd = k & 1;
    const float a_row = odd ? a.x[2 * half].y : a.x[2 * half].x;  // A[g'][k] on lane 4g'+src_t
    const float a_row8 = odd ? a.x[2 * half + 1].y : a.x[2 * half + 1].x;  // A[g'+8][k]
    const float b_col = odd ? b.x[half].y : b.x[half].x;  // B[k][g'] on lane 4g'+src_t
    const float ag = __shfl_sync(kFull, a_row, 4 * g + src_t);
    const float ag8 = __shfl_sync(kFull, a_row8, 4 * g + src_t);
    const float b0 = __shfl_sync(kFull, b_col, 4 * (2 * t) + src_t);
    const float b1 = __shfl_sync(kFull, b_col, 4 * (2 * t + 1) + src_t);
    c[0] = fmaf(ag, b0, c[0]);
    c[1] = fmaf(ag, b1, c[1]);
    c[2] = fmaf(ag8, b0, c[2]);
    c[3] = fmaf(ag8, b1, c[3]);
  }
}

// One m16n8k8 TF32 product (operands: TF32 bits, see the layouts at the top).
__device__ __forceinline__ void mma_tf32_k8(float (&c)[4], const uint32_t (&a)[4],
                                            const uint32_t (&b)[2]) {
#if defined(IDDPM_ATTN_HOST_EMULATION)
  attn_emu::mma_tf32(c, a, b);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// The registers of the two k8 halves of a k16 fp32 fragment (see the top): f maps a value to
// the TF32 bits that go in.
template <class F>
__device__ __forceinline__ void a_regs(uint32_t (&r)[2][4], const FragA<float>& a, F f) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    r[h][0] = f(a.x[2 * h].x);
    r[h][1] = f(a.x[2 * h + 1].x);
    r[h][2] = f(a.x[2 * h].y);
    r[h][3] = f(a.x[2 * h + 1].y);
  }
}
template <class F>
__device__ __forceinline__ void b_regs(uint32_t (&r)[2][2], const FragB<float>& b, F f) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    r[h][0] = f(b.x[h].x);
    r[h][1] = f(b.x[h].y);
  }
}

struct AsTf32 {  // kTf32: the operands are TF32 already (rounded where they were made)
  __device__ __forceinline__ uint32_t operator()(float x) const { return __float_as_uint(x); }
};
struct Tf32Hi {
  __device__ __forceinline__ uint32_t operator()(float x) const { return tf32_bits(x); }
};
struct Tf32Lo {
  __device__ __forceinline__ uint32_t operator()(float x) const {
    return tf32_bits(x - tf32_round(x));
  }
};

// An fp32 A operand in the registers the TF32 products take: hi (and lo under kTf32x3).
template <Prec P>
struct Tf32A {
  uint32_t hi[2][4];
  uint32_t lo[P == Prec::kTf32x3 ? 2 : 1][4];
  __device__ __forceinline__ explicit Tf32A(const FragA<float>& a) {
    if constexpr (P == Prec::kTf32x3) {
      a_regs(hi, a, Tf32Hi{});
      a_regs(lo, a, Tf32Lo{});
    } else {
      a_regs(hi, a, AsTf32{});
    }
  }
};

// c += a · b for an fp32 B fragment b.
template <Prec P>
__device__ __forceinline__ void mma_tf32(float (&c)[4], const Tf32A<P>& a, const FragB<float>& b) {
  if constexpr (P == Prec::kTf32x3) {
    uint32_t bh[2][2], bl[2][2];
    b_regs(bh, b, Tf32Hi{});
    b_regs(bl, b, Tf32Lo{});
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // the small terms first
      mma_tf32_k8(c, a.lo[h], bh[h]);
      mma_tf32_k8(c, a.hi[h], bl[h]);
      mma_tf32_k8(c, a.hi[h], bh[h]);
    }
  } else {
    uint32_t bh[2][2];
    b_regs(bh, b, AsTf32{});
#pragma unroll
    for (int h = 0; h < 2; ++h) mma_tf32_k8(c, a.hi[h], bh[h]);
  }
}

// c += a · b: fp16 and bf16 on tensor cores (mma.sync m16n8k16); fp32 under P.
template <Prec P, class T>
__device__ __forceinline__ void mma(float (&c)[4], const FragA<T>& a, const FragB<T>& b) {
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  if constexpr (!Elem<T>::kTensorCore) {
    static_assert(P != Prec::kNative, "fp32 products run as kTf32, kTf32x3 or kFma");
    if constexpr (P == Prec::kFma) {
#if defined(IDDPM_ATTN_HOST_EMULATION)
      attn_emu::mma_f32(c, a.x, b.x);  // one collective step; mma_f32_shuffle is tested on its own
#else
      mma_f32_shuffle(c, a, b);
#endif
    } else {
      mma_tf32(c, Tf32A<P>(a), b);
    }
  } else {
    static_assert(P == Prec::kNative, "fp16 / bf16 products run as kNative");
#if defined(IDDPM_ATTN_HOST_EMULATION)
    attn_emu::mma_b16(c, a.x, b.x, kBf16);
#else
// The instruction with A and B of PTX type AB ("f16" or "bf16").
// clang-format off
#define IDDPM_ATTN_MMA_M16N8K16(AB)                                                        \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." AB "." AB ".f32 {%0,%1,%2,%3}, " \
               "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                                 \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                           \
               : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b.x[0]), "r"(b.x[1]))
    // clang-format on
    if constexpr (kBf16) {
      IDDPM_ATTN_MMA_M16N8K16("bf16");
    } else {
      IDDPM_ATTN_MMA_M16N8K16("f16");
    }
#undef IDDPM_ATTN_MMA_M16N8K16
#endif
  }
}

// ---- fragment loads from shared memory --------------------------------------------------------
// Four 8×8 b16 matrices (ldmatrix .x4; lane L gives the address of row L%8 of matrix L/8),
// transposed when kTrans.
template <bool kTrans>
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
#if defined(IDDPM_ATTN_HOST_EMULATION)
  attn_emu::ldmatrix_x4(r, p, kTrans);
#else
#define IDDPM_ATTN_LDSM_X4(TRANS)                                                         \
  asm volatile("ldmatrix.sync.aligned.m8n8.x4" TRANS ".shared.b16 {%0,%1,%2,%3}, [%4];\n" \
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])                           \
               : "r"(smem_addr(p))                                                        \
               : "memory")
  if constexpr (kTrans) {
    IDDPM_ATTN_LDSM_X4(".trans");
  } else {
    IDDPM_ATTN_LDSM_X4("");
  }
#undef IDDPM_ATTN_LDSM_X4
#endif
}

// A fragment of the 16×16 block (m0.., k0..) of a matrix stored k-major: A[m][k] = s[k·ld + m]
// (a [C, T] tile read as its transpose). For ldmatrix.trans, lane L gives the address of row
// L%8 of 8×8 matrix q = L/8, where matrix q holds (m: +8·(q&1), k: +8·(q>>1)) = x[q].
template <class T>
__device__ __forceinline__ void load_a_kmajor(FragA<T>& f, const T* s, int ld, int m0, int k0) {
  const int lane = lane_id();
  const int q = lane >> 3, r = lane & 7;
  if constexpr (Elem<T>::kTensorCore) {
    uint32_t v[4];
    ldsm_x4<true>(v, s + (k0 + (q >> 1) * 8 + r) * ld + m0 + (q & 1) * 8);
#pragma unroll
    for (int i = 0; i < 4; ++i) f.x[i] = v[i];
  } else {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const T* p = s + (k0 + (i >> 1) * 8 + 2 * t) * ld + m0 + (i & 1) * 8 + g;
      f.x[i] = make_float2(p[0], p[ld]);
    }
  }
}

// How a B operand (16 × 16, rows k, cols n) is stored in shared memory: k-major,
// B[k][n] = s[k·ld + n] (a [C, T] tile with k = channel, read with ldmatrix.trans), or n-major,
// B[k][n] = s[n·ld + k] (a [C, T] tile with k = time, read with plain ldmatrix).
enum class Major { k, n };

// B fragments of n-tiles n0.. and n0+8.. (k0..k0+15). Matrix q of the x4 load holds
// (k: +8·(q&1), n: +8·(q>>1)); lane L gives the address of row L%8 of matrix L/8.
template <Major kMajor, class T>
__device__ __forceinline__ void load_b(FragB<T>& b0, FragB<T>& b1, const T* s, int ld, int k0,
                                       int n0) {
  constexpr bool kK = kMajor == Major::k;
  // The stored rows run along k (k-major) or n (n-major): B[k][n] = s[row·ld + col].
  const int row0 = kK ? k0 : n0, col0 = kK ? n0 : k0;
  const int lane = lane_id();
  const int q = lane >> 3, r = lane & 7;
  if constexpr (Elem<T>::kTensorCore) {
    const int kq = (q & 1) * 8, nq = (q >> 1) * 8;  // matrix q starts at B[k0 + kq][n0 + nq]
    uint32_t v[4];
    ldsm_x4<kK>(v, s + (row0 + (kK ? kq : nq) + r) * ld + col0 + (kK ? nq : kq));
    b0.x[0] = v[0];
    b0.x[1] = v[1];
    b1.x[0] = v[2];
    b1.x[1] = v[3];
  } else {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      // B[k][n] and B[k + 1][n] with k = k0 + ki + 2t, n = n0 + ni + g.
      const int ki = (i & 1) * 8, ni = (i >> 1) * 8;
      const T* p = kK ? s + (row0 + ki + 2 * t) * ld + col0 + ni + g
                      : s + (row0 + ni + g) * ld + col0 + ki + 2 * t;
      FragB<T>& b = (i >> 1) ? b1 : b0;
      b.x[i & 1] = make_float2(p[0], p[kK ? ld : 1]);
    }
  }
}

// Two products sharing A: c0 += a · B[:, n0..n0+7] and c1 += a · B[:, n0+8..n0+15], with B
// (rows k0..k0+15) read from shared memory as load_b does. (fp32 under TF32: a's registers, and
// under kTf32x3 its split, are made once for both.)
template <Major kMajor, Prec P, class T>
__device__ __forceinline__ void mma_pair(float (&c0)[4], float (&c1)[4], const FragA<T>& a,
                                         const T* s, int ld, int k0, int n0) {
  FragB<T> b0, b1;
  load_b<kMajor>(b0, b1, s, ld, k0, n0);
  if constexpr (!Elem<T>::kTensorCore && (P == Prec::kTf32 || P == Prec::kTf32x3)) {
    const Tf32A<P> at(a);
    mma_tf32(c0, at, b0);
    mma_tf32(c1, at, b1);
  } else {
    mma<P>(c0, a, b0);
    mma<P>(c1, a, b1);
  }
}

// Two values as a pair of an operand that goes into products under P (rounded to TF32 under
// kTf32, the only place besides round_tile where fp32 operands are made).
template <Prec P, class T>
__device__ __forceinline__ typename Elem<T>::Pair pack_operand(float a, float b) {
  return Elem<T>::pack(operand<P>(a), operand<P>(b));
}

// The A fragment of a 16×16 block whose values sit in two adjacent C tiles (see above).
template <Prec P, class T>
__device__ __forceinline__ void c_to_a(FragA<T>& f, const float (&lo)[4], const float (&hi)[4]) {
  f.x[0] = pack_operand<P, T>(lo[0], lo[1]);
  f.x[1] = pack_operand<P, T>(lo[2], lo[3]);
  f.x[2] = pack_operand<P, T>(hi[0], hi[1]);
  f.x[3] = pack_operand<P, T>(hi[2], hi[3]);
}

// ---- global -> shared tiles ------------------------------------------------------------------
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
#if defined(IDDPM_ATTN_HOST_EMULATION)
  attn_emu::cp_async_16(dst, src, valid);  // deferred until this thread's wait, as on the GPU
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#if defined(IDDPM_ATTN_HOST_EMULATION)
  attn_emu::cp_async_wait_all();
#else
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// s[r·LD + c] = g[r·ldg + col0 + c] for r < rows, c < COLS, and zero for rows r >= rows (the
// channels C..Cp-1 a head dim C < Cp leaves free in a tile of ROWS = Cp, so that the products
// over channels see exact zeros there) and where col0 + c >= T. The loop runs over the whole
// tile (compile-time trip count), so C == Cp only adds an always-true row test. `vec`: 16-byte
// cp.async (needs g, ldg and col0 aligned to 16 bytes and T a multiple of the chunk, which the
// launcher checks; its src-size 0 form writes the zeros); otherwise guarded element loads.
template <class T, int ROWS, int COLS, int LD, int NT>
__device__ __forceinline__ void load_tile(T* s, int rows, const T* g, int64_t ldg, int col0,
                                          int T_len, bool vec) {
  constexpr int E = 16 / sizeof(T);  // elements per 16-byte chunk
  static_assert(COLS % E == 0 && LD % E == 0, "tile rows must be whole 16-byte chunks");
  if (vec) {
    constexpr int CPR = COLS / E, TOTAL = ROWS * CPR;
    for (int idx = threadIdx.x; idx < TOTAL; idx += NT) {
      const int r = idx / CPR, c = (idx % CPR) * E;
      const bool valid = r < rows && col0 + c < T_len;
      const T* src = valid ? g + r * ldg + col0 + c : g;
      cp_async_16(s + r * LD + c, src, valid);
    }
  } else {
    for (int idx = threadIdx.x; idx < ROWS * COLS; idx += NT) {
      const int r = idx / COLS, c = idx % COLS;
      s[r * LD + c] = r < rows && col0 + c < T_len ? g[r * ldg + col0 + c] : Elem<T>::from_f(0.0f);
    }
  }
}

// Under kTf32 (fp32 tiles), rounds to TF32 the elements of a tile that this thread brought in
// with load_tile (same arguments and thread mapping), so that every product reads TF32 operands
// without converting them again. Call it after the thread's cp_async_wait_all and before the
// barrier that publishes the tile: it touches only this thread's own copies, so it needs no
// barrier of its own. No-op for every other precision.
template <Prec P, class T, int ROWS, int COLS, int LD, int NT>
__device__ __forceinline__ void round_tile(T* s, bool vec) {
  if constexpr (P == Prec::kTf32) {
    static_assert(std::is_same_v<T, float>, "TF32 tiles are fp32");
    constexpr int E = 16 / sizeof(T);
    if (vec) {
      constexpr int CPR = COLS / E, TOTAL = ROWS * CPR;
      for (int idx = threadIdx.x; idx < TOTAL; idx += NT) {  // one 16-byte access each way
        float4* p = reinterpret_cast<float4*>(s + (idx / CPR) * LD + (idx % CPR) * E);
        float4 v = *p;
        v.x = tf32_round(v.x);
        v.y = tf32_round(v.y);
        v.z = tf32_round(v.z);
        v.w = tf32_round(v.w);
        *p = v;
      }
    } else {
      for (int idx = threadIdx.x; idx < ROWS * COLS; idx += NT) {
        float& x = s[(idx / COLS) * LD + idx % COLS];
        x = tf32_round(x);
      }
    }
  }
}

// Writes rows r < rows (<= ROWS) of the [ROWS, COLS] smem tile back to g (row stride ldg) where
// col0 + c < T.
template <class T, int ROWS, int COLS, int LD, int NT>
__device__ __forceinline__ void store_tile(T* g, int64_t ldg, const T* s, int rows, int col0,
                                           int T_len) {
  for (int idx = threadIdx.x; idx < ROWS * COLS; idx += NT) {
    const int r = idx / COLS, c = idx % COLS;
    if (r < rows && col0 + c < T_len) g[r * ldg + col0 + c] = s[r * LD + c];
  }
}

// ---- small math ---------------------------------------------------------------------------
// Zeroes N accumulator tiles (16×8 f32 C fragments).
template <int N>
__device__ __forceinline__ void zero_tiles(float (&acc)[N][4]) {
#pragma unroll
  for (int n = 0; n < N; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
}

struct Exp2 {
  __device__ __forceinline__ float operator()(float x) const { return exp2f(x); }
};
struct Log2 {
  __device__ __forceinline__ float operator()(float x) const { return log2f(x); }
};
struct Max {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Max / sum over the 4 lanes of a quad (the lanes that share a fragment row).
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(kFull, v, 1));
  return fmaxf(v, __shfl_xor_sync(kFull, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(kFull, v, 1);
  return v + __shfl_xor_sync(kFull, v, 2);
}

// Raises a kernel's dynamic shared-memory limit once per device (`Tag` names the kernel), so
// that later launches, including those under CUDA-graph capture, make no such call. (Atomic
// flags: threads launching at once may both set the attribute, which is harmless, but do not
// race on the flag.)
template <class Tag>
inline cudaError_t set_smem_limit_once(const void* kernel, size_t bytes) {
  static std::atomic<bool> done[64] = {};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const bool cached = dev >= 0 && dev < 64;
  if (cached && done[dev].load(std::memory_order_acquire)) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(bytes));
  if (err == cudaSuccess && cached) done[dev].store(true, std::memory_order_release);
  return err;
}

// The CTA of both attention kernels: 4 warps, warp w owning rows 16w..16w+15 of its tile.
struct CtaShape {
  static constexpr int kWarps = 4, kThreads = 32 * kWarps;
};

// Padding of smem rows (elements): keeps ldmatrix / fragment loads free of bank conflicts and
// rows 16-byte aligned.
template <class T>
constexpr int kPad = 16 / sizeof(T) == 8 ? 8 : 4;

// ---- host: the compiled kernel instances -----------------------------------------------------
// A kernel instance: element type T and product precision P (kNative for fp16 / bf16; kTf32 or
// kTf32x3 for fp32).
template <class T, Prec P>
struct ElemTag {
  using type = T;
  static constexpr Prec prec = P;
};

// Shared memory a CTA may use: the H100's opt-in limit per block (227 KB); every kernel config
// asserts its budget against it at compile time. (The A100's is 163 KB: the fp32 kernels at
// Cp = 128 (forward) and Cp = 256 (both) need more, so they run on sm_90 cards only.)
inline constexpr size_t kMaxSmemBytes = 227 * 1024;

static_assert(kAttentionTileDims[sizeof(kAttentionTileDims) / sizeof(int) - 1] ==
                  kAttentionMaxHeadDim,
              "the widest tile covers the largest head dim");

template <size_t I, class Tag, class F>
int with_tile_dim(int tile_dim, F& f) {
  if constexpr (I < sizeof(kAttentionTileDims) / sizeof(kAttentionTileDims[0])) {
    constexpr int Cp = kAttentionTileDims[I];
    static_assert(Cp % 32 == 0, "tile widths are whole 32-channel blocks");
    if (tile_dim == Cp) return f(Tag{}, std::integral_constant<int, Cp>{});
    return with_tile_dim<I + 1, Tag>(tile_dim, f);
  } else {
    return static_cast<int>(cudaErrorInvalidValue);
  }
}

// Returns f(ElemTag<T, P>{}, std::integral_constant<int, Cp>{}) for the element type T of
// `dtype` (one of kAttentionDtypes), the precision P of its products (fp32: kTf32 when
// `allow_tf32`, else kTf32x3) and the tile width Cp = qkv_attention_tile_dim(head_dim) (one of
// kAttentionTileDims): the launchers instantiate their kernels through this, for exactly those.
// cudaErrorInvalidValue for a dtype or head dim without a kernel (the glue's checks refuse
// them before this is reached).
template <class F>
int with_compiled_kernel(DType dtype, int64_t head_dim, bool allow_tf32, F f) {
  const int tile_dim = qkv_attention_tile_dim(head_dim);
  switch (dtype) {
    case DType::kFloat32:
      return allow_tf32 ? with_tile_dim<0, ElemTag<float, Prec::kTf32>>(tile_dim, f)
                        : with_tile_dim<0, ElemTag<float, Prec::kTf32x3>>(tile_dim, f);
    case DType::kFloat16: return with_tile_dim<0, ElemTag<__half, Prec::kNative>>(tile_dim, f);
    case DType::kBFloat16:
      return with_tile_dim<0, ElemTag<__nv_bfloat16, Prec::kNative>>(tile_dim, f);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace iddpm::cuda::attn_dev
