// tests/ops/cuda_emulation/attention_reference.h — the float64 attention the emulation tests
// hold the CUDA kernels against (attention_emulation.cpp: the sm_80 kernels;
// attention_sm90_emulation.cpp: the sm_90a backward): forward and every gradient of one (b·h) on
// the [C, T] layout, from the same rounded inputs the kernel read.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

inline double max_rel_err(const std::vector<double>& ref, const std::vector<double>& got) {
  double m = 0, e = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    m = std::max(m, std::fabs(ref[i]));
    e = std::max(e, std::fabs(ref[i] - got[i]));
  }
  return e / (1e-30 + m);
}

// float64 reference for one (b·h): q, k, v, dO: [C, T] -> o [C, T], lse [T], dq, dk, dv [C, T].
inline void reference(int C, int T, const double* q, const double* k, const double* v,
                      const double* dout, double* o, double* lse, double* dq, double* dk,
                      double* dv) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(C));
  std::vector<double> p(static_cast<size_t>(T) * T), dp(static_cast<size_t>(T) * T);
  for (int i = 0; i < T; ++i) {
    double mx = -INFINITY;
    for (int j = 0; j < T; ++j) {
      double s = 0;
      for (int c = 0; c < C; ++c) s += q[c * T + i] * k[c * T + j];
      p[i * T + j] = s * scale;
      mx = std::max(mx, s * scale);
    }
    double sum = 0;
    for (int j = 0; j < T; ++j) sum += std::exp(p[i * T + j] - mx);
    lse[i] = mx + std::log(sum);
    for (int j = 0; j < T; ++j) p[i * T + j] = std::exp(p[i * T + j] - lse[i]);
  }
  for (int c = 0; c < C; ++c) {
    for (int i = 0; i < T; ++i) {
      double acc = 0;
      for (int j = 0; j < T; ++j) acc += p[i * T + j] * v[c * T + j];
      o[c * T + i] = acc;
    }
  }
  for (int i = 0; i < T; ++i) {
    double d = 0;
    for (int c = 0; c < C; ++c) d += dout[c * T + i] * o[c * T + i];
    for (int j = 0; j < T; ++j) {
      double s = 0;
      for (int c = 0; c < C; ++c) s += dout[c * T + i] * v[c * T + j];
      dp[i * T + j] = p[i * T + j] * (s - d);  // dS
    }
  }
  for (int c = 0; c < C; ++c) {
    for (int x = 0; x < T; ++x) {
      double aq = 0, ak = 0, av = 0;
      for (int y = 0; y < T; ++y) {
        aq += dp[x * T + y] * k[c * T + y];
        ak += dp[y * T + x] * q[c * T + y];
        av += p[y * T + x] * dout[c * T + y];
      }
      dq[c * T + x] = scale * aq;
      dk[c * T + x] = scale * ak;
      dv[c * T + x] = av;
    }
  }
}

// The reference of every (b·h) of qkv [BH, 3C, T] and dout [BH, C, T] (elements converted by
// to_f): r_o [BH, C, T], r_lse [BH, T], r_g [BH, 3C, T] (sized by the caller).
template <class T, class ToF>
void reference_heads(int BH, int C, int T_len, const T* qkv, const T* dout, ToF to_f,
                     std::vector<double>& r_o, std::vector<double>& r_lse,
                     std::vector<double>& r_g) {
  const size_t CT = static_cast<size_t>(C) * T_len;
  std::vector<double> q(CT), k(CT), v(CT), d(CT);
  for (int bh = 0; bh < BH; ++bh) {
    const T* base = qkv + bh * 3 * CT;
    for (size_t i = 0; i < CT; ++i) {
      q[i] = to_f(base[i]);
      k[i] = to_f(base[CT + i]);
      v[i] = to_f(base[2 * CT + i]);
      d[i] = to_f(dout[bh * CT + i]);
    }
    double* gq = r_g.data() + bh * 3 * CT;
    reference(C, T_len, q.data(), k.data(), v.data(), d.data(), r_o.data() + bh * CT,
              r_lse.data() + bh * T_len, gq, gq + CT, gq + 2 * CT);
  }
}

// The largest relative error of each of dq, dk, dv (grad_qkv [BH, 3, C·T] as doubles) over all
// (b·h), against the reference's.
inline void grad_part_errors(const std::vector<double>& ref, const std::vector<double>& got, int BH,
                             size_t CT, double (&err)[3]) {
  for (int part = 0; part < 3; ++part) {
    std::vector<double> a, b;
    for (int bh = 0; bh < BH; ++bh) {
      const size_t off = bh * 3 * CT + part * CT;
      a.insert(a.end(), ref.begin() + off, ref.begin() + off + CT);
      b.insert(b.end(), got.begin() + off, got.begin() + off + CT);
    }
    err[part] = max_rel_err(a, b);
  }
}
