// csrc/common/macros.h — shared by the CPU (g++) and CUDA (nvcc) builds.
#pragma once

#if defined(__CUDACC__)
#define IDDPM_HD __host__ __device__ __forceinline__
#else
#define IDDPM_HD inline
#endif
