// csrc/cuda/gather_coefs.cu — CUDA kernel of iddpm::gather_coefs (CUDA C++17, no torch).
#include "cuda/gather_coefs.h"

#include <cuda_runtime.h>

#include "common/gather_coefs_math.h"

namespace iddpm::cuda {
namespace {

// One thread per output element, grid-stride.
template <typename index_t>
__global__ void gather_coefs_kernel(const float* __restrict__ table, int64_t T, int64_t K,
                                    const index_t* __restrict__ t, int64_t B,
                                    float* __restrict__ out) {
  const int64_t n = B * K;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t b = i / K;
    out[i] = gather_coef(table, T, K, t[b], i - b * K);
  }
}

template <typename index_t>
int launch(const GatherCoefsParams& p, cudaStream_t stream) {
  const int64_t n = p.B * p.K;
  if (n == 0) return 0;
  const int threads = 128;
  const int64_t blocks64 = (n + threads - 1) / threads;
  const int blocks = static_cast<int>(blocks64 < 65535 ? blocks64 : 65535);
  gather_coefs_kernel<index_t><<<blocks, threads, 0, stream>>>(
      p.table, p.T, p.K, static_cast<const index_t*>(p.t), p.B, p.out);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int gather_coefs(const GatherCoefsParams& p, cudaStream_t stream) {
  return p.t_is_int64 ? launch<int64_t>(p, stream) : launch<int32_t>(p, stream);
}

}  // namespace iddpm::cuda
