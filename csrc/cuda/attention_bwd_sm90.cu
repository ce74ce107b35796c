// csrc/cuda/attention_bwd_sm90.cu — launcher of the Hopper (sm_90a) attention backward
// (attention_bwd_sm90.cuh, where the algorithm is described) between the sm_80 backward's delta
// and dq kernels (attention_bwd_kernel.cuh). CUDA C++17, no torch. Built with the sm_90a forward
// (CMakeLists.txt: the same target, sm_90a only); never the default: csrc/ops/attention.cpp runs
// it only when asked for (IDDPM_ATTENTION_SM90=1 / attention_sm90()) on a compute-capability 9.0
// device, for fp16 / bf16 and head dims 64 and 128.
#include <cuda_runtime.h>

#include "cuda/attention.h"
#include "cuda/attention_bwd_kernel.cuh"
#include "cuda/attention_bwd_sm90.cuh"
#include "cuda/attention_sm90_tma.h"

namespace iddpm::cuda {
namespace {

using namespace attn_sm90;

template <class T, int C, bool kBulkDq>
struct Sm90BwdKernel {};

// kBulkDq: dq by TMA bulk reductions (AttentionBwdParams::sm90_bulk_dq where dq_accum allows it).
template <class T, int C, bool kBulkDq>
int launch_bwd_sm90(const attn::AttentionBwdParams& p, cudaStream_t stream) {
  using Cfg = Sm90BwdCfg<T, C, kBulkDq>;
  const int64_t BH = p.s.B * p.s.H, T_len = p.s.T;
  const int Ti = static_cast<int>(T_len);
  const T* dout = static_cast<const T*>(p.grad_out);
  const T* qkv = static_cast<const T*>(p.qkv);
  T* grad_qkv = static_cast<T*>(p.grad_qkv);
  auto kernel = attn_bwd_sm90_kernel<T, C, kBulkDq>;
  cudaError_t err = attn_dev::set_smem_limit_once<Sm90BwdKernel<T, C, kBulkDq>>(
      reinterpret_cast<const void*>(kernel), Cfg::kSmemBytes);
  if (err != cudaSuccess) return static_cast<int>(err);
  err = check_register_budget<Sm90BwdKernel<T, C, kBulkDq>>(
      reinterpret_cast<const void*>(kernel), Cfg::kThreads, Cfg::kProducerRegs, Cfg::kConsumerRegs);
  if (err != cudaSuccess) return static_cast<int>(err);
  // TMA where both qkv and dout allow it (tma_usable); a map that cannot be made is an error,
  // not a silent fallback (this path is opt-in and unproven: a failure must show).
  const int64_t rows = BH * 3 * C;
  const bool tma = tma_usable(qkv, rows, T_len) && tma_usable(dout, BH * C, T_len);
  CUtensorMap map_qkv{}, map_do{};
  if (tma && !(make_tma_map<T, C>(&map_qkv, qkv, rows, T_len) &&
               make_tma_map<T, C>(&map_do, dout, BH * C, T_len))) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  CUtensorMap map_dq{};
  if (kBulkDq && !make_tma_map_dq(&map_dq, p.dq_accum, BH * C, T_len)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const bool vec = T_len % 8 == 0 && reinterpret_cast<uintptr_t>(qkv) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(dout) % 16 == 0;
  if (const int e = attn_kernels::launch_bwd_prologue<T>(p, stream)) return e;
  // gridDim.x = B·H · key tiles <= 2^31 - 1 (fewer than the delta kernel's blocks, which the
  // prologue checked)
  const dim3 grid(static_cast<unsigned>(BH * ((T_len + Cfg::BK - 1) / Cfg::BK)));
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(
      map_qkv, map_do, map_dq, qkv, dout, static_cast<const float*>(p.lse), p.delta, grad_qkv,
      p.dq_accum, Ti, attn::softmax_scale<float>(C), attn::logit_scale_log2<float>(C), vec, tma);
  err = cudaGetLastError();
  if (err != cudaSuccess) return static_cast<int>(err);
  return attn_kernels::launch_bwd_epilogue<T>(p, stream);
}

template <class T, int C>
int launch_bulk(const attn::AttentionBwdParams& p, cudaStream_t stream) {
  // Bulk dq where asked for and dq_accum's rows allow the reductions' tensor map, else atomics.
  const bool bulk = p.sm90_bulk_dq && tma_usable(p.dq_accum, p.s.B * p.s.H * C, p.s.T, 4);
  return bulk ? launch_bwd_sm90<T, C, true>(p, stream) : launch_bwd_sm90<T, C, false>(p, stream);
}

template <class T>
int launch_dim(const attn::AttentionBwdParams& p, cudaStream_t stream) {
  if (p.s.C == 64) return launch_bulk<T, 64>(p, stream);
  if (p.s.C == 128) return launch_bulk<T, 128>(p, stream);
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace

int qkv_attention_bwd_sm90(const attn::AttentionBwdParams& p, cudaStream_t stream) {
  if (p.s.B * p.s.H == 0 || p.s.T == 0) return 0;
  if (!qkv_attention_sm90_supported(p.dtype, p.s.C)) return static_cast<int>(cudaErrorInvalidValue);
  return p.dtype == DType::kFloat16 ? launch_dim<__half>(p, stream)
                                    : launch_dim<__nv_bfloat16>(p, stream);
}

}  // namespace iddpm::cuda
