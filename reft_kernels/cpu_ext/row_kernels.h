// The per-row kernels of the low-rank edit, shared by lowrank_rows.cpp (listed rows, in place)
// and lowrank_all.cpp (every row, out of place):
//
//     y = x + (act(x A^T + a) - x C^T - c) B      per row x (d,) of h
//
// Types: S is the storage type of the rows (h, y, g, dh: float, double or c10::BFloat16), A the
// accumulation type (float for bfloat16 rows, else S; common.h's acc_t), in which the parameters,
// the latents z and u, every product and every sum are. A row element is read with common.h's
// ld (exact) and written with st (one rounding); with S = A both are plain loads and stores.
// Every sum has a fixed order (below), so the bits do not depend on the number of threads, on
// how many rows a kernel takes at once, or on the index order of other rows.
//
// Rows: fwd_kernel and bwd_kernel take entries [i0, i1) of an index (row idx[i], -1: padding),
// or with idx == nullptr the rows i themselves.
#pragma once

#include "common.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace reft_cpu {

// 8 lanes of A as one vector (GCC/Clang vector extensions), and lane = lane + x * m in one fused
// multiply-add where the CPU has one: written out (_mm256_fmadd_ps, _mm512_fmadd_pd) rather than
// left to the compiler's vectoriser, which contracted some instantiations of the lane loop of
// dots and not others (one row at a time and two gave sums 1 ulp apart) and vectorised it less
// well: measured on the 2-core CPU (AMD EPYC, bfloat16 rows, float32 parameters, lowrank_all,
// LoReFT and DiReFT, N = 1024, d = 768, two threads, ms forward, the best of 41, two runs), r = 8:
// 0.19-0.26 with the compiler's lanes, 0.13-0.18 with these; r = 32: 0.77-0.88 against 0.51-0.64.
template <typename A> struct Lanes;
template <> struct Lanes<float> { typedef float type __attribute__((vector_size(32))); };
template <> struct Lanes<double> { typedef double type __attribute__((vector_size(64))); };
template <typename A> using lanes_t = typename Lanes<A>::type;

inline lanes_t<float> fmadd(lanes_t<float> x, lanes_t<float> m, lanes_t<float> acc) {
#if defined(__FMA__)
  return (lanes_t<float>)_mm256_fmadd_ps((__m256)x, (__m256)m, (__m256)acc);
#elif defined(__x86_64__) || defined(__i386__)
  return acc + x * m;  // (no fused multiply-add instruction: nothing to contract either)
#else
  lanes_t<float> out;
  for (int l = 0; l < 8; ++l) out[l] = std::fma(x[l], m[l], acc[l]);
  return out;
#endif
}

inline lanes_t<double> fmadd(lanes_t<double> x, lanes_t<double> m, lanes_t<double> acc) {
#if defined(__AVX512F__)
  return (lanes_t<double>)_mm512_fmadd_pd((__m512d)x, (__m512d)m, (__m512d)acc);
#else
  lanes_t<double> out;
  for (int l = 0; l < 8; ++l) out[l] = std::fma(x[l], m[l], acc[l]);
  return out;
#endif
}

// 8 values from x, widened to A (exact).
template <typename A, typename S>
inline lanes_t<A> load_lanes(const S* x) {
  lanes_t<A> v;
  if constexpr (std::is_same_v<A, S>) {
    std::memcpy(&v, x, sizeof v);
  } else {
    for (int l = 0; l < 8; ++l) v[l] = ld(x[l]);
  }
  return v;
}

// K dot products x[e] . M[k] for NR rows x[e] at once (M's rows k < K, each of length d; out[e]
// gets them at k0 ..), in one pass over the rows. Each product is summed in 8 lanes, the lanes
// then combined in a fixed order, the tail (d mod 8 columns) added to lane j mod 8: the same
// result on every call, for every K and NR. Measured on the 2-core CPU (AMD EPYC, fp32, d = 256,
// r = 8, one thread, 1024 listed rows), 8 lanes against one product after another: forward 306
// against 338 us; forward + backward (whose g B^T takes the same products) 653 against 1351 us.
template <typename A, int K, int NR, typename S>
inline void dots(const S* const* x, const A* M, int64_t d, A* const* out, int64_t k0) {
  lanes_t<A> lane[NR][K];
  for (int e = 0; e < NR; ++e) {
    for (int k = 0; k < K; ++k) lane[e][k] = lanes_t<A>{};
  }
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) {
    lanes_t<A> xv[NR];
    for (int e = 0; e < NR; ++e) xv[e] = load_lanes<A>(x[e] + j);
    for (int k = 0; k < K; ++k) {
      const lanes_t<A> m = load_lanes<A>(M + k * d + j);
      for (int e = 0; e < NR; ++e) lane[e][k] = fmadd(xv[e], m, lane[e][k]);
    }
  }
  for (; j < d; ++j) {
    for (int k = 0; k < K; ++k) {
      for (int e = 0; e < NR; ++e) lane[e][k][j & 7] = std::fma(ld(x[e][j]), M[k * d + j], lane[e][k][j & 7]);
    }
  }
  for (int e = 0; e < NR; ++e) {
    for (int k = 0; k < K; ++k) {
      const lanes_t<A>& q = lane[e][k];
      out[e][k0 + k] = ((q[0] + q[1]) + (q[2] + q[3])) + ((q[4] + q[5]) + (q[6] + q[7]));
    }
  }
}

// Products per pass: as many as keep NR * K accumulators, the rows' lanes and M's in registers
// (32 vector registers with AVX-512, 16 without): for fp32 (8 lanes, one 256-bit register each)
// 8, or 4 for two rows without AVX-512; for fp64 (8 lanes, one 512-bit register or two 256-bit
// ones) 4, or 2 for two rows without AVX-512.
#if defined(__AVX512F__)
constexpr bool kManyRegisters = true;
#else
constexpr bool kManyRegisters = false;
#endif
template <typename A, int NR>
constexpr int kDots = (sizeof(A) == 4 ? 8 : 4) / (NR > 1 && !kManyRegisters ? 2 : 1);

// out[e][k] = x[e] . M[k] for the r rows of M (r, d): groups of kDots products, then 4, 2, 1.
template <typename A, int NR, typename S>
inline void dots_rows(const S* const* x, const A* M, int64_t r, int64_t d, A* const* out) {
  constexpr int K = kDots<A, NR>;
  int64_t k = 0;
  for (; k + K <= r; k += K) dots<A, K, NR>(x, M + k * d, d, out, k);
  if (K > 4 && k + 4 <= r) { dots<A, 4, NR>(x, M + k * d, d, out, k); k += 4; }
  if (k + 2 <= r) { dots<A, 2, NR>(x, M + k * d, d, out, k); k += 2; }
  if (k < r) dots<A, 1, NR>(x, M + k * d, d, out, k);
}

// y[j] += s x[j]
template <typename T>
inline void axpy(T* y, T s, const T* x, int64_t d) {
  for (int64_t j = 0; j < d; ++j) y[j] += s * x[j];
}

// out[e][j] = in[e][j] + sum_k s[e][k] M[k][j] for NR rows at once (out[e] may be in[e]), added
// in k order (as r calls of axpy would), over chunks that stay in registers across the r rows
// instead of r passes that load and store the whole row. A chunk of 64 values keeps 8
// independent chains of fused multiply-adds in flight in 256-bit registers (4 in 512-bit ones);
// 32 kept 4 and waited on their latency. Measured on the 2-core CPU (AMD EPYC, fp32, d = 256,
// r = 8, LoReFT, every row of 1024 listed, one thread, the forward and backward ops alone, three
// runs each alternating): chunks of 32 with -mavx2, forward 215-229 and backward 363-366 us;
// chunks of 64, 179-181 and 314-321 us; chunks of 64 with 512-bit vectors (cpu_ext/__init__.py,
// _flags), 130-132 and 220-224 us. The order of the additions, so every bit, is the same in all
// three; and for NR = 1 and 2, where the compiler makes each acc += s * m one fused multiply-add
// alike (tests/ops/test_cpu_ext_all.py, test_rows_at_once_give_the_bits_of_one_row_at_a_time).
template <typename A, int NR, typename S>
inline void add_rows(S* const* out, const S* const* in, const A* const* s, const A* M, int64_t r, int64_t d) {
  constexpr int64_t kChunk = 64;
  int64_t j0 = 0;
  for (; j0 + kChunk <= d; j0 += kChunk) {
    A acc[NR][kChunk];
    for (int e = 0; e < NR; ++e) {
      for (int64_t l = 0; l < kChunk; ++l) acc[e][l] = ld(in[e][j0 + l]);
    }
    for (int64_t k = 0; k < r; ++k) {
      const A* m = M + k * d + j0;
      for (int e = 0; e < NR; ++e) {
        const A sk = s[e][k];
        for (int64_t l = 0; l < kChunk; ++l) acc[e][l] += sk * m[l];
      }
    }
    for (int e = 0; e < NR; ++e) {
      for (int64_t l = 0; l < kChunk; ++l) out[e][j0 + l] = st<S>(acc[e][l]);
    }
  }
  const int64_t t = d - j0;  // the tail: the same passes over fewer columns
  if (t == 0) return;
  for (int e = 0; e < NR; ++e) {
    A acc[kChunk];
    for (int64_t l = 0; l < t; ++l) acc[l] = ld(in[e][j0 + l]);
    for (int64_t k = 0; k < r; ++k) {
      const A sk = s[e][k];
      const A* m = M + k * d + j0;
      for (int64_t l = 0; l < t; ++l) acc[l] += sk * m[l];
    }
    for (int64_t l = 0; l < t; ++l) out[e][j0 + l] = st<S>(acc[l]);
  }
}

// out[j] = in[j] + sum_k s[k] M[k][j] + sum_k t[k] N[k][j] for one row: add_rows's chunks with
// the two sums one after the other (each in k order) and one rounding; for float rows the same
// bits as add_rows with M and then with N.
template <typename A, typename S>
inline void add_rows2(S* out, const S* in, const A* s, const A* M, const A* t, const A* N, int64_t r, int64_t d) {
  constexpr int64_t kChunk = 64;
  // columns [j0, j0 + len), len <= kChunk (kChunk for every chunk but the tail)
  auto chunk = [&](int64_t j0, int64_t len) {
    A acc[kChunk];
    for (int64_t l = 0; l < len; ++l) acc[l] = ld(in[j0 + l]);
    for (int pass = 0; pass < 2; ++pass) {
      const A* w = pass ? t : s;
      const A* W = pass ? N : M;
      for (int64_t k = 0; k < r; ++k) {
        const A wk = w[k];
        const A* m = W + k * d + j0;
        for (int64_t l = 0; l < len; ++l) acc[l] += wk * m[l];
      }
    }
    for (int64_t l = 0; l < len; ++l) out[j0 + l] = st<S>(acc[l]);
  };
  int64_t j0 = 0;
  for (; j0 + kChunk <= d; j0 += kChunk) chunk(j0, kChunk);
  if (j0 < d) chunk(j0, d - j0);
}

// The rows of a group go two at a time (each load of M serving both; dots, add_rows), an odd
// one alone. Measured on the 2-core CPU (AMD EPYC, bfloat16 rows, float32 parameters,
// lowrank_all over every row, LoReFT and DiReFT, two threads, ms forward / forward + backward,
// the best of 41, two runs; one row at a time against two): N = 1024, d = 768, r = 1:
// 0.08-0.12 / 0.27-0.53 against 0.05-0.07 / 0.21-0.34; r = 8: 0.19-0.25 / 0.59-1.24 against
// 0.13-0.18 / 0.49-0.75; r = 32: 0.87-1.26 / 2.4-4.2 against 0.54-0.67 / 1.7-2.0; N = 4096,
// d = 2048, r = 8: 3.4-4.4 / 9.9-14.9 against 1.8-2.0 / 7.0-7.3. (Four rows at once, four
// products a pass, were no faster than two, before dots wrote its lanes out as vectors.)

// out[e][k] = x[e] . M[k] for the ne <= kGroup rows x[e].
template <typename A, typename S>
inline void dots_group(int ne, const S* const* x, const A* M, int64_t r, int64_t d, A* const* out) {
  int e = 0;
  for (; e + 2 <= ne; e += 2) dots_rows<A, 2>(x + e, M, r, d, out + e);
  if (e < ne) dots_rows<A, 1>(x + e, M, r, d, out + e);
}

// out[e] = in[e] + s[e] M for the ne <= kGroup rows (out[e] may be in[e]).
template <typename A, typename S>
inline void add_group(int ne, S* const* out, const S* const* in, const A* const* s, const A* M, int64_t r,
                      int64_t d) {
  int e = 0;
  for (; e + 2 <= ne; e += 2) add_rows<A, 2>(out + e, in + e, s + e, M, r, d);
  if (e < ne) add_rows<A, 1>(out + e, in + e, s + e, M, r, d);
}

// The parameters of the low-rank edit as its ops take them: B (r, d) and A, C (r, d), a, c (r,)
// where given, contiguous CPU tensors in h's dtype ht (or float32 beside bfloat16 h); `op` names
// the op in the error. (B's rank and width against h: the caller's.)
inline void check_params(const char* op, at::ScalarType ht, const std::optional<at::Tensor>& A,
                         const std::optional<at::Tensor>& a, const at::Tensor& B, const std::optional<at::Tensor>& C,
                         const std::optional<at::Tensor>& c) {
  const auto r = B.size(0), d = B.size(1);
  auto check = [&](const at::Tensor& t, std::vector<int64_t> shape, const char* name) {
    TORCH_CHECK(t.sizes() == at::IntArrayRef(shape) && param_dtype_ok(t.scalar_type(), ht) && t.is_contiguous() &&
                    t.device().is_cpu(),
                op, ": ", name, " must be a contiguous CPU tensor of shape ", at::IntArrayRef(shape),
                " in h's dtype (or float32 beside bfloat16 h)");
  };
  check(B, {r, d}, "B");
  if (A && A->defined()) check(*A, {r, d}, "A");
  if (C && C->defined()) check(*C, {r, d}, "C");
  if (a && a->defined()) check(*a, {r}, "a");
  if (c && c->defined()) check(*c, {r}, "c");
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; }

// The difference form's D = A - Cm (rd values), when it applies: the identity activation and both
// A and Cm; else empty.
template <typename A>
std::vector<A> difference(const A* Aw, const A* Cm, int64_t act, int64_t rd) {
  std::vector<A> D;
  if (act != kIdentity || !Aw || !Cm) return D;
  D.resize(rd);
  for (int64_t j = 0; j < rd; ++j) D[j] = Aw[j] - Cm[j];
  return D;
}

// Entries per group of the backward's parameter sums: each sum's row k takes the group's terms
// one after another, in index order (the order of one entry at a time, so the same bits), with
// one load and store of that row per group instead of per entry.
constexpr int kGroup = 4;

// Three (r,) vectors for each entry of a group, in one buffer: v[q][e] is vector q of entry e.
template <typename A>
struct GroupScratch {
  std::vector<A> buf;
  A* v[3][kGroup];
  explicit GroupScratch(int64_t r) : buf(3 * kGroup * r) {
    for (int q = 0; q < 3; ++q) {
      for (int e = 0; e < kGroup; ++e) v[q][e] = buf.data() + (q * kGroup + e) * r;
    }
  }
};

// Entries [i0, i1) of the forward: the row of entry i (idx[i], or i without an index) read from
// `in` and its edit written to the same row of `out` (out == in: in place), in groups of up to
// kGroup rows (dots_group, add_group). hsave, z, u (each nullptr: not wanted) take entry i's
// original row, latent and pre-activation (zeros for a padding entry). D: A - Cm (the difference
// form; then Aw and Cm are not read), else nullptr.
template <typename A, typename S>
void fwd_kernel(const S* in, S* out, const int64_t* idx, int64_t i0, int64_t i1, int64_t d, int64_t r, const A* Aw,
                const A* a, const A* B, const A* Cm, const A* c, const A* D, int64_t act, S* hsave, A* z, A* u) {
  GroupScratch<A> scratch(r);
  auto &zi = scratch.v[0], &ui = scratch.v[1], &ci = scratch.v[2];  // z, x A^T + a, x C^T per entry
  const S* xs[kGroup];
  S* os[kGroup];
  int64_t ent[kGroup];
  int64_t i = i0;
  while (i < i1) {
    int ne = 0;  // the next (up to) kGroup listed entries
    for (; i < i1 && ne < kGroup; ++i) {
      const int64_t row = idx ? idx[i] : i;
      if (row < 0) {
        if (hsave) std::memset(hsave + i * d, 0, sizeof(S) * d);
        if (z) std::memset(z + i * r, 0, sizeof(A) * r);
        if (u) std::memset(u + i * r, 0, sizeof(A) * r);
        continue;
      }
      xs[ne] = in + row * d;
      os[ne] = out + row * d;
      ent[ne] = i;
      ++ne;
    }
    if (ne == 0) break;
    if (D) {  // z = x D^T + a - c
      dots_group(ne, xs, D, r, d, zi);
    } else {
      if (Aw) dots_group(ne, xs, Aw, r, d, ui);
      if (Cm) dots_group(ne, xs, Cm, r, d, ci);
    }
    for (int e = 0; e < ne; ++e) {
      const int64_t ie = ent[e];
      for (int64_t k = 0; k < r; ++k) {
        A zk;
        if (D) {
          zk = zi[e][k] + (a ? a[k] : A(0));
        } else {
          const A uk = (Aw ? ui[e][k] : A(0)) + (a ? a[k] : A(0));
          if (u) u[ie * r + k] = uk;
          zk = act_fwd(uk, act);
          if (Cm) zk -= ci[e][k];
        }
        if (c) zk -= c[k];
        zi[e][k] = zk;
        if (z) z[ie * r + k] = zk;
      }
      if (hsave) std::memcpy(hsave + ie * d, xs[e], sizeof(S) * d);
    }
    add_group(ne, os, xs, zi, B, r, d);
  }
}

// out[k][j] += s[t][k] v[t][j] for the terms t < nt in order, for the r rows of out (r, d).
template <typename A, typename S>
inline void add_terms(A* out, int nt, const A* const* s, const S* const* v, int64_t r, int64_t d) {
  for (int64_t k = 0; k < r; ++k) {
    A* o = out + k * d;
    if (nt == 4) {
      const A s0 = s[0][k], s1 = s[1][k], s2 = s[2][k], s3 = s[3][k];
      const S *v0 = v[0], *v1 = v[1], *v2 = v[2], *v3 = v[3];
      for (int64_t j = 0; j < d; ++j) {
        A acc = o[j];
        acc += s0 * ld(v0[j]);
        acc += s1 * ld(v1[j]);
        acc += s2 * ld(v2[j]);
        acc += s3 * ld(v3[j]);
        o[j] = acc;
      }
    } else {
      for (int t = 0; t < nt; ++t) {
        const A sk = s[t][k];
        const S* vt = v[t];
        for (int64_t j = 0; j < d; ++j) o[j] += sk * ld(vt[j]);
      }
    }
  }
}

// Up to 2 kGroup terms: in fours, in order.
template <typename A, typename S>
inline void add_terms_in_fours(A* out, int nt, const A* const* s, const S* const* v, int64_t r, int64_t d) {
  for (int t = 0; t < nt; t += 4) add_terms(out, std::min(4, nt - t), s + t, v + t, r, d);
}

// Entries [i0, i1) of the backward: their rows of dh, and their sums added to dA .. dc. g and dh
// are indexed by row (idx[i], or i without an index), x (the saved original rows), z and u by
// entry. dh holds g's rows on entry (a copy of g, or g itself) unless dh_from_g: then each
// entry's dh row is written from g's row (dh a new tensor; rows of no entry are the caller's).
// With D (the difference form: A - Cm, identity activation) the sums go to dA <- P = sum gz^T x
// and dB <- Q = sum z^T g (dC is not written; the caller forms dA, dB and dC from P and Q) and a
// dh row takes gz D.
template <typename A, typename S>
void bwd_kernel(const S* g, S* dh, bool dh_from_g, const S* x, const int64_t* idx, int64_t i0, int64_t i1,
                int64_t d, int64_t r, const A* z, const A* u, const A* Aw, const A* B, const A* Cm, const A* D,
                bool tied, int64_t act, A* dA, A* da, A* dB, A* dC, A* dc) {
  // per entry of the group: gz = g_row B^T, ga = gz act'(u), mgz = -gz
  GroupScratch<A> scratch(r);
  auto &gz = scratch.v[0], &ga = scratch.v[1], &mgz = scratch.v[2];
  const S *gi[kGroup], *xi[kGroup], *srcs[kGroup];
  S* dhs[kGroup];
  const A* zi[kGroup];
  int64_t rows[kGroup], ent[kGroup];
  int64_t i = i0;
  while (i < i1) {
    int ne = 0;  // the next (up to) kGroup listed entries; padding entries (-1) get no gradient
    for (; i < i1 && ne < kGroup; ++i) {
      const int64_t row = idx ? idx[i] : i;
      if (row < 0) continue;
      rows[ne] = row;
      gi[ne] = g + row * d;
      xi[ne] = x + i * d;
      zi[ne] = z + i * r;
      ent[ne] = i;
      ++ne;
    }
    if (ne == 0) break;
    dots_group(ne, gi, B, r, d, gz);
    for (int e = 0; e < ne; ++e) {
      for (int64_t k = 0; k < r; ++k) {
        ga[e][k] = act == kIdentity ? gz[e][k] : gz[e][k] * act_grad(u[ent[e] * r + k], act);
        mgz[e][k] = -gz[e][k];
      }
      dhs[e] = dh ? dh + rows[e] * d : nullptr;
      srcs[e] = dh_from_g ? gi[e] : dhs[e];
    }
    if (D) {  // the difference form: P, Q, the bias sums, and dh rows g + gz D
      if (dA) add_terms_in_fours(dA, ne, gz, xi, r, d);
      if (dB) add_terms_in_fours(dB, ne, zi, gi, r, d);
      for (int e = 0; e < ne; ++e) {
        for (int64_t k = 0; k < r; ++k) {
          if (da) da[k] += gz[e][k];
          if (dc) dc[k] -= gz[e][k];
        }
      }
      if (dh) add_group(ne, dhs, srcs, gz, D, r, d);
      continue;
    }
    // each sum's terms in index order, as one entry at a time adds them; -(s v) as (-s) v, equal
    if (dA) add_terms_in_fours(dA, ne, ga, xi, r, d);
    if (dB) {
      if (tied) {  // each entry's z g, then its -gz x
        const A* s2[2 * kGroup];
        const S* v2[2 * kGroup];
        for (int e = 0; e < ne; ++e) {
          s2[2 * e] = zi[e];
          v2[2 * e] = gi[e];
          s2[2 * e + 1] = mgz[e];
          v2[2 * e + 1] = xi[e];
        }
        add_terms_in_fours(dB, 2 * ne, s2, v2, r, d);
      } else {
        add_terms_in_fours(dB, ne, zi, gi, r, d);
      }
    }
    if (dC) add_terms_in_fours(dC, ne, mgz, xi, r, d);
    for (int e = 0; e < ne; ++e) {
      for (int64_t k = 0; k < r; ++k) {
        if (da) da[k] += ga[e][k];
        if (dc) dc[k] -= gz[e][k];
      }
    }
    // the dh rows: g's + ga A - gz Cm, one rounding each
    if (!dh) continue;
    if (Aw && Cm) {
      for (int e = 0; e < ne; ++e) add_rows2(dhs[e], srcs[e], ga[e], Aw, mgz[e], Cm, r, d);
    } else if (Aw) {
      add_group(ne, dhs, srcs, ga, Aw, r, d);
    } else if (Cm) {
      add_group(ne, dhs, srcs, mgz, Cm, r, d);
    } else if (dh_from_g) {
      for (int e = 0; e < ne; ++e) std::memcpy(dhs[e], srcs[e], sizeof(S) * d);
    }
  }
}

// The backward over entries [0, n) (bwd_kernel's arguments) into the gradients dA .. dc (each
// nullptr: not wanted; the sums start from zero and the caller zeroes nothing). The parameter
// sums go by fixed blocks of `block` entries, each summed in entry order, the blocks' partials
// then added in block order: the same bits whatever the number of threads (the blocks run on the
// intra-op threads; the rows of dh they write are distinct), no atomics. The difference form
// (identity activation, both A and Cm: D = A - Cm) sums P = sum gz^T x into dA (or a scratch when
// dA is not wanted) and Q = sum z^T g into dB, then forms dC = -P and the tied dB = Q - P.
template <typename A, typename S>
void bwd_blocked(const S* g, S* dh, bool dh_from_g, const S* x, const int64_t* idx, int64_t n, int64_t block,
                 int64_t d, int64_t r, const A* z, const A* u, const A* Aw, const A* B, const A* Cm, bool tied,
                 int64_t act, A* dA, A* da, A* dB, A* dC, A* dc, const at::TensorOptions& opts) {
  const int64_t rd = r * d;
  const std::vector<A> D = difference(Aw, Cm, act, rd);
  const A* Dp = D.empty() ? nullptr : D.data();
  std::vector<A> P_scratch;
  A *sumA = dA, *sumC = dC;
  if (Dp) {
    if (!dA && (dC || (tied && dB))) {
      P_scratch.assign(rd, A(0));
      sumA = P_scratch.data();
    }
    sumC = nullptr;
  }
  for (A* t : {sumA, da, dB, sumC, dc}) {
    if (t) std::fill(t, t + (t == da || t == dc ? r : rd), A(0));
  }
  const int64_t blocks = (n + block - 1) / block;
  if (blocks <= 1) {  // one block: its sums are the gradients
    bwd_kernel<A, S>(g, dh, dh_from_g, x, idx, 0, n, d, r, z, u, Aw, B, Cm, Dp, tied, act, sumA, da, dB, sumC, dc);
  } else {
    // each block sums into a partial of its own: the wanted sums side by side
    const int64_t oA = 0, oB = oA + (sumA ? rd : 0), oC = oB + (dB ? rd : 0), oa = oC + (sumC ? rd : 0);
    const int64_t oc = oa + (da ? r : 0), stride = oc + (dc ? r : 0);
    at::Tensor part = at::zeros({blocks, stride}, opts);
    A* pp = part.template data_ptr<A>();
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        A* q = pp + b * stride;
        bwd_kernel<A, S>(g, dh, dh_from_g, x, idx, b * block, std::min(n, (b + 1) * block), d, r, z, u, Aw, B, Cm,
                         Dp, tied, act, sumA ? q + oA : nullptr, da ? q + oa : nullptr, dB ? q + oB : nullptr,
                         sumC ? q + oC : nullptr, dc ? q + oc : nullptr);
      }
    });
    for (int64_t b = 0; b < blocks; ++b) {
      const A* q = pp + b * stride;
      if (sumA) axpy(sumA, A(1), q + oA, rd);
      if (dB) axpy(dB, A(1), q + oB, rd);
      if (sumC) axpy(sumC, A(1), q + oC, rd);
      if (da) axpy(da, A(1), q + oa, r);
      if (dc) axpy(dc, A(1), q + oc, r);
    }
  }
  if (Dp && sumA) {
    if (dC) for (int64_t j = 0; j < rd; ++j) dC[j] = -sumA[j];
    if (tied && dB) for (int64_t j = 0; j < rd; ++j) dB[j] -= sumA[j];
  }
}

}  // namespace reft_cpu
