// csrc/cpu/attention_kernel.h — the CPU attention kernel, written once over GCC vector types
// and compiled once per vector ISA. Included ONLY by csrc/cpu/attention_isa_*.cpp, inside
// `namespace iddpm::cpu::isa_<name> { ... }` and (for avx2/avx512) a `#pragma GCC target`
// region; the includer defines IDDPM_VB (bytes per vector) and IDDPM_MR (rows per micro-tile)
// and includes every standard/c10 header first. No include guard on purpose.
//
// Per (batch, head) the three [C, T] blocks q, k, v are read straight from qkv. Work is done
// in blocks so that the T×T score matrix never exists: the forward keeps a [BK, BQ] block of
// scores (keys × queries, queries contiguous) and runs the online softmax down its columns;
// the backward keeps [BQb, BKb] blocks of P and dS (queries × keys, keys contiguous).
// All products are one micro-kernel: D[r, n:n+NB] (+)= Σ_k a(r, k) · B[k, n:n+NB] with a()
// read by scalar broadcast at any strides and B rows contiguous — so every operand is read in
// the layout it already has (the only transposed copy is k → kᵀ for dq in the backward).

typedef float vf __attribute__((vector_size(IDDPM_VB)));
typedef double vd __attribute__((vector_size(IDDPM_VB)));
typedef int32_t vi32 __attribute__((vector_size(IDDPM_VB)));

template <class A>
struct VecOf;
template <>
struct VecOf<float> {
  using type = vf;
};
template <>
struct VecOf<double> {
  using type = vd;
};
template <class A>
using Vec = typename VecOf<A>::type;
template <class A>
inline constexpr int kW = IDDPM_VB / static_cast<int>(sizeof(A));  // lanes per vector
inline constexpr int kMR = IDDPM_MR;                                // rows per micro-tile
inline constexpr int64_t kBQ = 64;   // forward: queries per block (multiple of 2·kW<float>)
inline constexpr int64_t kBK = 128;  // forward: keys per block
inline constexpr int64_t kBQb = 64;  // backward: queries per block
inline constexpr int64_t kBKb = 64;  // backward: keys per block (multiple of 2·kW<float>)

template <class A>
inline Vec<A> vload(const A* p) {
  Vec<A> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <class A>
inline void vstore(A* p, Vec<A> v) {
  __builtin_memcpy(p, &v, sizeof(v));
}
template <class A>
inline Vec<A> vsplat(A a) {
  return Vec<A>{} + a;
}
template <class V>
inline V vmax(V a, V b) {
  return a > b ? a : b;
}

// 2^x for float vectors: x = n + f with n integer and |f| <= 1/2, 2^f by its degree-7 Taylor
// polynomial in f·ln2 (relative error < 4e-9, below float rounding), 2^n through the exponent
// bits. x < -126 (including -inf) gives exactly 0; NaN stays NaN.
inline vf vexp2(vf x) {
  const vf lo = vsplat(-126.0f), hi = vsplat(127.0f);
  vf xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const vf magic = vsplat(12582912.0f);  // 1.5·2^23: adding it rounds to an integer
  const vf n = (xc + magic) - magic;
  const vf f = xc - n;
  vf p = vsplat(1.5252733804059841e-05f);
  p = p * f + 1.5403530393381609e-04f;
  p = p * f + 1.3333558146428443e-03f;
  p = p * f + 9.6181291076284772e-03f;
  p = p * f + 5.5504108664821580e-02f;
  p = p * f + 2.4022650695910071e-01f;
  p = p * f + 6.9314718055994531e-01f;
  p = p * f + 1.0f;
  const vi32 e = (__builtin_convertvector(n, vi32) + 127) << 23;
  vf r = p * __builtin_bit_cast(vf, e);
  r = x < lo ? vsplat(0.0f) : r;
  return x != x ? x : r;
}
inline vd vexp2(vd x) {  // double: only used for gradcheck-grade accuracy, not speed
  vd r;
  for (int i = 0; i < kW<double>; ++i) r[i] = std::exp2(x[i]);
  return r;
}

// Function objects for the shared math of common/attention_math.h (lambdas are avoided: GCC
// does not give them the enclosing `#pragma GCC target`).
struct Exp2Fn {
  template <class V>
  V operator()(V x) const {
    return vexp2(x);
  }
};
struct MaxFn {
  template <class V>
  V operator()(V a, V b) const {
    return vmax(a, b);
  }
};
struct Log2Fn {
  template <class A>
  A operator()(A x) const {
    return static_cast<A>(std::log2(x));
  }
};

// ---- the micro-kernel --------------------------------------------------------------------
// D[r, 0:2W) (+)= Σ_{k<K} Ap[r·ars + k·aks] · B[k·ldb + 0:2W) for r < R.
template <class A, int R, bool ACC>
inline void micro(A* D, int64_t ldd, const A* Ap, int64_t ars, int64_t aks, const A* B,
                  int64_t ldb, int64_t K) {
  using V = Vec<A>;
  constexpr int W = kW<A>;
  V acc0[R], acc1[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    if constexpr (ACC) {
      acc0[r] = vload(D + r * ldd);
      acc1[r] = vload(D + r * ldd + W);
    } else {
      acc0[r] = V{};
      acc1[r] = V{};
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    const V b0 = vload(B + k * ldb), b1 = vload(B + k * ldb + W);
    const A* a = Ap + k * aks;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const V av = vsplat(a[r * ars]);
      acc0[r] += av * b0;
      acc1[r] += av * b1;
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    vstore(D + r * ldd, acc0[r]);
    vstore(D + r * ldd + W, acc1[r]);
  }
}

template <class A, bool ACC, int R>
inline void micro_tail(int rem, A* D, int64_t ldd, const A* Ap, int64_t ars, int64_t aks,
                       const A* B, int64_t ldb, int64_t K) {
  if constexpr (R > 0) {
    if (rem == R) {
      micro<A, R, ACC>(D, ldd, Ap, ars, aks, B, ldb, K);
    } else {
      micro_tail<A, ACC, R - 1>(rem, D, ldd, Ap, ars, aks, B, ldb, K);
    }
  }
}

// D[M, N] (+)= a(M, K) · B[K, N]; N a multiple of 2·kW<A>.
template <class A, bool ACC>
void gemm_bcast(int64_t M, int64_t N, A* D, int64_t ldd, const A* Ap, int64_t ars, int64_t aks,
                const A* B, int64_t ldb, int64_t K) {
  constexpr int64_t NB = 2 * kW<A>;
  for (int64_t n0 = 0; n0 < N; n0 += NB) {
    int64_t r0 = 0;
    for (; r0 + kMR <= M; r0 += kMR) {
      micro<A, kMR, ACC>(D + r0 * ldd + n0, ldd, Ap + r0 * ars, ars, aks, B + n0, ldb, K);
    }
    if (r0 < M) {
      micro_tail<A, ACC, kMR - 1>(static_cast<int>(M - r0), D + r0 * ldd + n0, ldd,
                                  Ap + r0 * ars, ars, aks, B + n0, ldb, K);
    }
  }
}

template <class In, class A>
inline A load_as(const In* p, int64_t i) {
  // c10::Half / c10::BFloat16 convert through float; float and double directly.
  using Via = std::conditional_t<std::is_same_v<In, double>, double, float>;
  return static_cast<A>(static_cast<Via>(p[i]));
}

// Copies rows [0, rows) × cols [0, n) of src (row stride lds) into dst (row stride ldd),
// converted and multiplied by `mul`, zero-filling cols [n, ldd) when `pad` is set.
template <class In, class A>
void copy_rows(A* dst, int64_t ldd, const In* src, int64_t lds, int64_t rows, int64_t n, A mul,
               bool pad) {
  for (int64_t r = 0; r < rows; ++r) {
    A* d = dst + r * ldd;
    const In* s = src + r * lds;
    for (int64_t i = 0; i < n; ++i) d[i] = load_as<In, A>(s, i) * mul;
    if (pad) {
      for (int64_t i = n; i < ldd; ++i) d[i] = A(0);
    }
  }
}

// lse is stored in float, or in double when accumulating in double (f64 inputs).
template <class A>
using Lse = std::conditional_t<std::is_same_v<A, double>, double, float>;

// ---- forward ------------------------------------------------------------------------------
template <class A>
struct FwdWork {
  std::vector<A> k, v, q, st, o, m, l, alpha;
};

// Query blocks [qb0, qb1) of one head. qkv_h: [3C, T], out_h: [C, T], lse_h: [T].
template <class In, class A>
void fwd_head(const In* qkv_h, In* out_h, Lse<A>* lse_h, int64_t C, int64_t T, int64_t qb0,
              int64_t qb1, FwdWork<A>& w) {
  using V = Vec<A>;
  constexpr int W = kW<A>;
  constexpr int64_t NVQ = kBQ / W;
  const A scale2 = attn::logit_scale_log2<A>(C);
  const Exp2Fn exp2_fn;
  const MaxFn max_fn;

  // k, v: [C, T] read in place when already in the accumulation type, else converted once.
  const A* kp;
  const A* vp;
  if constexpr (std::is_same_v<In, A>) {
    kp = qkv_h + C * T;
    vp = qkv_h + 2 * C * T;
  } else {
    w.k.resize(C * T);
    w.v.resize(C * T);
    copy_rows<In, A>(w.k.data(), T, qkv_h + C * T, T, C, T, A(1), false);
    copy_rows<In, A>(w.v.data(), T, qkv_h + 2 * C * T, T, C, T, A(1), false);
    kp = w.k.data();
    vp = w.v.data();
  }
  w.q.resize(C * kBQ);
  w.st.resize(kBK * kBQ);
  w.o.resize(C * kBQ);
  w.m.resize(kBQ);
  w.l.resize(kBQ);
  w.alpha.resize(kBQ);
  A* qs = w.q.data();     // [C, BQ] q block · scale·log2e, zero past T
  A* st = w.st.data();    // [BK, BQ] base-2 logits, then probabilities
  A* o = w.o.data();      // [C, BQ] unnormalized output
  A* m = w.m.data();      // [BQ] running max (base 2)
  A* l = w.l.data();      // [BQ] running sum
  A* alpha = w.alpha.data();

  for (int64_t qb = qb0; qb < qb1; ++qb) {
    const int64_t q0 = qb * kBQ, nq = std::min(kBQ, T - q0);
    copy_rows<In, A>(qs, kBQ, qkv_h + q0, T, C, nq, scale2, true);
    std::fill(m, m + kBQ, -std::numeric_limits<A>::infinity());
    std::fill(l, l + kBQ, A(0));
    std::fill(o, o + C * kBQ, A(0));
    for (int64_t j0 = 0; j0 < T; j0 += kBK) {
      const int64_t nk = std::min(kBK, T - j0);
      // st[j, i] = Σ_c k[c, j0 + j] · qs[c, i]
      gemm_bcast<A, false>(nk, kBQ, st, kBQ, kp + j0, 1, T, qs, kBQ, C);
      for (int64_t v = 0; v < NVQ; ++v) {
        V mx = vsplat(-std::numeric_limits<A>::infinity());
        for (int64_t j = 0; j < nk; ++j) mx = vmax(mx, vload(st + j * kBQ + v * W));
        V al;
        const V mnew = attn::online_max_update(vload(m + v * W), mx, &al, max_fn, exp2_fn);
        V sum = V{};
        for (int64_t j = 0; j < nk; ++j) {
          const V p = attn::online_prob(vload(st + j * kBQ + v * W), mnew, exp2_fn);
          vstore(st + j * kBQ + v * W, p);
          sum += p;
        }
        vstore(m + v * W, mnew);
        vstore(alpha + v * W, al);
        vstore(l + v * W, attn::online_sum_update(vload(l + v * W), al, sum));
      }
      if (j0 > 0) {
        for (int64_t c = 0; c < C; ++c) {
          for (int64_t v = 0; v < NVQ; ++v) {
            vstore(o + c * kBQ + v * W, vload(o + c * kBQ + v * W) * vload(alpha + v * W));
          }
        }
      }
      // o[c, i] += Σ_j v[c, j0 + j] · st[j, i]
      gemm_bcast<A, true>(C, kBQ, o, kBQ, vp + j0, T, 1, st, kBQ, nk);
    }
    for (int64_t i = 0; i < nq; ++i) {
      lse_h[q0 + i] = static_cast<Lse<A>>(attn::row_lse(m[i], l[i], Log2Fn{}));
      alpha[i] = A(1) / l[i];
    }
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t i = 0; i < nq; ++i) out_h[c * T + q0 + i] = static_cast<In>(o[c * kBQ + i] * alpha[i]);
    }
  }
}

template <class In, class A>
void fwd_tasks_typed(const AttnFwdArgs& a, int64_t begin, int64_t end) {
  const int64_t C = a.s.C, T = a.s.T;
  const int64_t nqb = (T + kBQ - 1) / kBQ;
  const In* qkv = static_cast<const In*>(a.qkv);
  In* out = static_cast<In*>(a.out);
  FwdWork<A> w;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t bh = task / a.q_chunks, chunk = task % a.q_chunks;
    const int64_t qb0 = chunk * nqb / a.q_chunks, qb1 = (chunk + 1) * nqb / a.q_chunks;
    if (qb0 >= qb1) continue;
    fwd_head<In, A>(qkv + bh * 3 * C * T, out + bh * C * T, static_cast<Lse<A>*>(a.lse) + bh * T,
                    C, T, qb0, qb1, w);
  }
}

// ---- backward -----------------------------------------------------------------------------
template <class A>
struct BwdWork {
  std::vector<A> q, k, v, kt, dout, lse2, delta, dqt, p, ds, dk, dv;
};

// One head. qkv_h, gqkv_h: [3C, T]; out_h, gout_h: [C, T]; lse_h: [T].
template <class In, class A>
void bwd_head(const In* qkv_h, const In* out_h, const In* gout_h, const Lse<A>* lse_h,
              In* gqkv_h, int64_t C, int64_t T, BwdWork<A>& w) {
  using V = Vec<A>;
  constexpr int W = kW<A>;
  constexpr int64_t NVK = kBKb / W;
  const int64_t Tk = (T + kBKb - 1) / kBKb * kBKb;  // keys padded to whole blocks
  const int64_t Cp = (C + 2 * W - 1) / (2 * W) * (2 * W);
  const A scale = attn::softmax_scale<A>(C), scale2 = attn::logit_scale_log2<A>(C);
  const Exp2Fn exp2_fn;

  w.q.resize(C * T);
  w.k.resize(C * Tk);
  w.v.resize(C * Tk);
  w.kt.assign(Tk * Cp, A(0));
  w.lse2.resize(T);
  w.delta.resize(T);
  w.dqt.assign(T * Cp, A(0));
  w.p.resize(kBQb * kBKb);
  w.ds.resize(kBQb * kBKb);
  w.dk.resize(C * kBKb);
  w.dv.resize(C * kBKb);
  A* qs = w.q.data();  // [C, T] q · scale·log2e
  A* ks = w.k.data();  // [C, Tk] zero past T
  A* vs = w.v.data();  // [C, Tk] zero past T
  A* kt = w.kt.data();  // [Tk, Cp] kᵀ, zero past (T, C)
  copy_rows<In, A>(qs, T, qkv_h, T, C, T, scale2, false);
  copy_rows<In, A>(ks, Tk, qkv_h + C * T, T, C, T, A(1), true);
  copy_rows<In, A>(vs, Tk, qkv_h + 2 * C * T, T, C, T, A(1), true);
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t j = 0; j < T; ++j) kt[j * Cp + c] = ks[c * Tk + j];
  }
  const A* dop;  // [C, T] grad of out
  if constexpr (std::is_same_v<In, A>) {
    dop = gout_h;
  } else {
    w.dout.resize(C * T);
    copy_rows<In, A>(w.dout.data(), T, gout_h, T, C, T, A(1), false);
    dop = w.dout.data();
  }
  A* lse2 = w.lse2.data();
  A* delta = w.delta.data();
  for (int64_t i = 0; i < T; ++i) {
    lse2[i] = attn::lse_to_base2(static_cast<A>(lse_h[i]));
    delta[i] = A(0);
  }
  for (int64_t c = 0; c < C; ++c) {  // D_i = Σ_c dO[c, i] · O[c, i]
    for (int64_t i = 0; i < T; ++i) delta[i] += dop[c * T + i] * load_as<In, A>(out_h, c * T + i);
  }
  A* dqt = w.dqt.data();  // [T, Cp] dq (without the softmax scale), transposed
  A* pb = w.p.data();     // [BQb, BKb] probabilities
  A* dsb = w.ds.data();   // [BQb, BKb] dP, then dS
  A* dkb = w.dk.data();   // [C, BKb]
  A* dvb = w.dv.data();   // [C, BKb]

  for (int64_t j0 = 0; j0 < T; j0 += kBKb) {
    const int64_t nk = std::min(kBKb, T - j0);
    std::fill(dkb, dkb + C * kBKb, A(0));
    std::fill(dvb, dvb + C * kBKb, A(0));
    for (int64_t i0 = 0; i0 < T; i0 += kBQb) {
      const int64_t nq = std::min(kBQb, T - i0);
      // s2[i, j] = Σ_c qs[c, i0 + i] · k[c, j0 + j];  dP[i, j] = Σ_c dO[c, i0 + i] · v[c, j0 + j]
      gemm_bcast<A, false>(nq, kBKb, pb, kBKb, qs + i0, 1, T, ks + j0, Tk, C);
      gemm_bcast<A, false>(nq, kBKb, dsb, kBKb, dop + i0, 1, T, vs + j0, Tk, C);
      for (int64_t i = 0; i < nq; ++i) {
        const V l2 = vsplat(lse2[i0 + i]);
        const A d = delta[i0 + i];
        for (int64_t v = 0; v < NVK; ++v) {
          const V p = attn::recomputed_prob(vload(pb + i * kBKb + v * W), l2, exp2_fn);
          vstore(pb + i * kBKb + v * W, p);
          vstore(dsb + i * kBKb + v * W, attn::logit_grad(p, vload(dsb + i * kBKb + v * W), d));
        }
        for (int64_t j = nk; j < kBKb; ++j) {  // keys past T (zero k, v) take no part
          pb[i * kBKb + j] = A(0);
          dsb[i * kBKb + j] = A(0);
        }
      }
      // dv[c, j] += Σ_i dO[c, i0 + i] · p[i, j];  dk[c, j] += Σ_i qs[c, i0 + i] · dS[i, j]
      gemm_bcast<A, true>(C, kBKb, dvb, kBKb, dop + i0, T, 1, pb, kBKb, nq);
      gemm_bcast<A, true>(C, kBKb, dkb, kBKb, qs + i0, T, 1, dsb, kBKb, nq);
      // dqᵀ[i0 + i, c] += Σ_j dS[i, j] · kᵀ[j0 + j, c]
      gemm_bcast<A, true>(nq, Cp, dqt + i0 * Cp, Cp, dsb, kBKb, 1, kt + j0 * Cp, Cp, nk);
    }
    // qs carries scale·log2e, so dk = scale · Σ dS q = ln2 · Σ dS qs.
    const A ln2 = static_cast<A>(attn::kLn2);
    In* gk = gqkv_h + C * T;
    In* gv = gqkv_h + 2 * C * T;
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t j = 0; j < nk; ++j) {
        gk[c * T + j0 + j] = static_cast<In>(dkb[c * kBKb + j] * ln2);
        gv[c * T + j0 + j] = static_cast<In>(dvb[c * kBKb + j]);
      }
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t i = 0; i < T; ++i) gqkv_h[c * T + i] = static_cast<In>(dqt[i * Cp + c] * scale);
  }
}

template <class In, class A>
void bwd_heads_typed(const AttnBwdArgs& a, int64_t begin, int64_t end) {
  const int64_t C = a.s.C, T = a.s.T;
  const In* qkv = static_cast<const In*>(a.qkv);
  const In* out = static_cast<const In*>(a.out);
  const In* gout = static_cast<const In*>(a.grad_out);
  In* gqkv = static_cast<In*>(a.grad_qkv);
  BwdWork<A> w;
  for (int64_t bh = begin; bh < end; ++bh) {
    bwd_head<In, A>(qkv + bh * 3 * C * T, out + bh * C * T, gout + bh * C * T,
                    static_cast<const Lse<A>*>(a.lse) + bh * T,
                    gqkv + bh * 3 * C * T, C, T, w);
  }
}

// ---- entry points (declared in cpu/attention_isa.h) ---------------------------------------
void attn_fwd_tasks(const AttnFwdArgs& a, int64_t begin, int64_t end) {
  switch (a.dtype) {
    case AttnDtype::f32: return fwd_tasks_typed<float, float>(a, begin, end);
    case AttnDtype::f64: return fwd_tasks_typed<double, double>(a, begin, end);
    case AttnDtype::f16: return fwd_tasks_typed<c10::Half, float>(a, begin, end);
    case AttnDtype::bf16: return fwd_tasks_typed<c10::BFloat16, float>(a, begin, end);
  }
}

void attn_bwd_heads(const AttnBwdArgs& a, int64_t begin, int64_t end) {
  switch (a.dtype) {
    case AttnDtype::f32: return bwd_heads_typed<float, float>(a, begin, end);
    case AttnDtype::f64: return bwd_heads_typed<double, double>(a, begin, end);
    case AttnDtype::f16: return bwd_heads_typed<c10::Half, float>(a, begin, end);
    case AttnDtype::bf16: return bwd_heads_typed<c10::BFloat16, float>(a, begin, end);
  }
}

int64_t attn_query_block() { return kBQ; }
