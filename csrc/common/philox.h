// csrc/common/philox.h — counter-based normal noise shared by the CPU and CUDA step kernels.
//
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11)
// maps a 128-bit counter and a 64-bit key to four 32-bit words; two Box–Muller
// transforms turn them into four N(0, 1) floats.
//
// Counter layout (the same as curand_init(seed, subsequence, offset) for its first draw,
// which is how torch's CUDA kernels use the generator's Philox state):
//   counter = (offset / 4 low, offset / 4 high, group low, group high), key = seed,
// where `group` = element index / 4: element i gets normal number i % 4 of group i / 4.
// The step kernels number elements per sample (common/step_params.h noise_element):
// element e of global sample n is i = n * (elements per sample) + e, so each sample has
// its own run of counters whatever batch it is computed in.
// A call reserves one offset step (an increment of 4 in torch's units), so calls that
// take disjoint offsets from a generator never share counters with each other or with
// torch's own kernels on that generator.
//
// The integer part is bit-identical on every device. The transcendental functions of
// Box–Muller differ in the last bits between the host (libm, or SLEEF in the AVX2 CPU
// kernel) and the device (logf, __sincosf), so CPU and CUDA noise agree to ~1e-6, not bit
// for bit.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace iddpm::philox {

constexpr uint32_t kMul0 = 0xD2511F53u;
constexpr uint32_t kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kWeyl1 = 0xBB67AE85u;  // sqrt(3) - 1

struct U32x4 {
  uint32_t v[4];
};

IDDPM_HD uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

// Philox4x32 with 10 rounds: ctr (4 words) and key (2 words) -> 4 random words.
IDDPM_HD U32x4 philox4x32_10(U32x4 ctr, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kWeyl0;
      k1 += kWeyl1;
    }
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo(kMul0, ctr.v[0], &hi0);
    const uint32_t lo1 = mulhilo(kMul1, ctr.v[2], &hi1);
    ctr = U32x4{{hi1 ^ ctr.v[1] ^ k0, lo1, hi0 ^ ctr.v[3] ^ k1, lo0}};
  }
  return ctr;
}

// The four random words of element group `group` under (seed, offset).
IDDPM_HD U32x4 group_bits(uint64_t seed, uint64_t offset, uint64_t group) {
  const uint64_t step = offset / 4;
  const U32x4 ctr{{static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32),
                   static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32)}};
  return philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Box–Muller: two words -> two independent N(0, 1) values.
// u1 = (top 24 bits + 1) / 2^24 in (0, 1], angle = 2π (top 24 bits of b) / 2^24 - π.
IDDPM_HD void box_muller(uint32_t a, uint32_t b, float* z0, float* z1) {
  constexpr float kInv24 = 1.0f / 16777216.0f;
  constexpr float kTwoPi = 6.2831853071795864769f;
  constexpr float kPi = 3.14159265358979323846f;
  const float u1 = static_cast<float>((a >> 8) + 1u) * kInv24;
  const float angle = static_cast<float>(b >> 8) * (kTwoPi * kInv24) - kPi;
#if defined(__CUDA_ARCH__)
  // logf, not __logf: the fast log's absolute error (~2^-22) exceeds |log u1| for u1 just
  // below 1, where it could turn positive and make the square root NaN.
  const float r = sqrtf(-2.0f * logf(u1));
  float s, c;
  __sincosf(angle, &s, &c);  // |angle| <= π: absolute error about 2^-21.4
#else
  const float r = std::sqrt(-2.0f * std::log(u1));
  const float s = std::sin(angle);
  const float c = std::cos(angle);
#endif
  *z0 = r * c;
  *z1 = r * s;
}

// Four N(0, 1) values for elements 4*group .. 4*group + 3.
IDDPM_HD void normal4(uint64_t seed, uint64_t offset, uint64_t group, float out[4]) {
  const U32x4 bits = group_bits(seed, offset, group);
  box_muller(bits.v[0], bits.v[1], &out[0], &out[1]);
  box_muller(bits.v[2], bits.v[3], &out[2], &out[3]);
}

}  // namespace iddpm::philox
