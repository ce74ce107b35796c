// csrc/cuda/attention_fwd_sm90.cu — launcher of the Hopper (sm_90a) attention forward
// (attention_fwd_sm90.cuh, where the algorithm is described). CUDA C++17, no torch. Built only
// when the arch list has 9.0 / 9.0a, and then only for sm_90a (CMakeLists.txt: its own target,
// -gencode arch=compute_90a,code=sm_90a), which defines IDDPM_WITH_SM90 for the glue. Never the
// default: csrc/ops/attention.cpp runs it only when asked for (IDDPM_ATTENTION_SM90=1) on a
// compute-capability 9.x device, for the dtypes and head dims below.
#include <cuda_runtime.h>

#include "cuda/attention.h"
#include "cuda/attention_fwd_sm90.cuh"
#include "cuda/attention_sm90_tma.h"

namespace iddpm::cuda {
namespace {

using namespace attn_sm90;

template <class T, int C, bool kPipe>
struct Sm90Kernel {};

// kPipe: the pipelined consumers (AttentionFwdParams::sm90_pipelined).
template <class T, int C, bool kPipe>
int launch_fwd_sm90(const attn::AttentionFwdParams& p, cudaStream_t stream) {
  using Cfg = Sm90FwdCfg<T, C, kPipe>;
  const int64_t BH = p.s.B * p.s.H, T_len = p.s.T;
  auto kernel = attn_fwd_sm90_kernel<T, C, kPipe>;
  cudaError_t err = attn_dev::set_smem_limit_once<Sm90Kernel<T, C, kPipe>>(
      reinterpret_cast<const void*>(kernel), Cfg::kSmemBytes);
  if (err != cudaSuccess) return static_cast<int>(err);
  err = check_register_budget<Sm90Kernel<T, C, kPipe>>(
      reinterpret_cast<const void*>(kernel), Cfg::kThreads, Cfg::kProducerRegs, Cfg::kConsumerRegs);
  if (err != cudaSuccess) return static_cast<int>(err);
  const bool vec = T_len % 8 == 0 && reinterpret_cast<uintptr_t>(p.qkv) % 16 == 0;
  // TMA where it applies (tma_usable); a map that cannot be made is an error, not a silent
  // fallback (this path is opt-in and unproven: a failure must show).
  const int64_t rows = BH * 3 * C;
  const bool tma = tma_usable(p.qkv, rows, T_len);
  CUtensorMap map{};
  if (tma && !make_tma_map<T, C>(&map, p.qkv, rows, T_len)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  // gridDim.x = B·H · query tiles <= 2^31 - 1
  const int64_t q_tiles = (T_len + Cfg::BQ - 1) / Cfg::BQ;
  if (BH > int64_t{2147483647} / q_tiles) return static_cast<int>(cudaErrorInvalidConfiguration);
  const dim3 grid(static_cast<unsigned>(BH * q_tiles));
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(
      map, static_cast<const T*>(p.qkv), static_cast<T*>(p.out), static_cast<float*>(p.lse),
      static_cast<int>(T_len), attn::logit_scale_log2<float>(C), vec, tma);
  return static_cast<int>(cudaGetLastError());
}

template <class T, int C>
int launch_variant(const attn::AttentionFwdParams& p, cudaStream_t stream) {
  return p.sm90_pipelined ? launch_fwd_sm90<T, C, true>(p, stream)
                          : launch_fwd_sm90<T, C, false>(p, stream);
}

template <class T>
int launch_dim(const attn::AttentionFwdParams& p, cudaStream_t stream) {
  if (p.s.C == 64) return launch_variant<T, 64>(p, stream);
  if (p.s.C == 128) return launch_variant<T, 128>(p, stream);
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace

int qkv_attention_fwd_sm90(const attn::AttentionFwdParams& p, cudaStream_t stream) {
  if (p.s.B * p.s.H == 0 || p.s.T == 0) return 0;
  if (!qkv_attention_sm90_supported(p.dtype, p.s.C)) return static_cast<int>(cudaErrorInvalidValue);
  return p.dtype == DType::kFloat16 ? launch_dim<__half>(p, stream)
                                    : launch_dim<__nv_bfloat16>(p, stream);
}

}  // namespace iddpm::cuda
