// The in-place low-rank edit of listed rows on the CPU, forward and backward each one pass in
// C++, with its autograd in C++: the call a model's ReFT hooks make once per layer and step
// (reft_kernels/cpu_ext/__init__.py says when it is taken and how it is built).
//
//     y = h + (act(h A^T + a) - h C^T - c) B      on the rows index[i] >= 0 of h (N, d), in place
//
// Ops (namespace reft_kernels_cpu):
//   lowrank_rows_(h, index, A, a, B, C, c, act, tied) -> h
//       the autograd entry: edits h in place (marked dirty) and, when a gradient is needed,
//       records one node whose backward is one call of lowrank_rows_bwd;
//   lowrank_rows_fwd(h, index, A, a, B, C, c, act, tied, save) -> (hsave, z, u)
//       the forward pass: hsave (n, d) the original rows (row i of a -1 entry: zero), z (n, r)
//       the latent (zero at -1 entries), u (n, r) the pre-activation h A^T + a (zero at -1
//       entries; empty for the identity); all three empty when save is false;
//   lowrank_rows_bwd(g, hsave, index, z, u, A, B, C, act, tied, need, dh_in_g=False)
//       -> (dh, dA, da, dB, dC, dc)
//       the backward pass, need = (dh, dA, da, dB, dC, dc) flags; a gradient not needed comes
//       back as a 0-element tensor. dh_in_g (g contiguous, in B's dtype): dh is written into g
//       itself (its listed rows updated in place) and comes back as a 0-element tensor; the
//       autograd node asks for it when nothing else can see g (see LowrankRowsFunction).
// Shapes and numerics: h (N, d) contiguous rows (any leading shape that merges into them),
// index (n,) int64 with entries in [-1, N), the non-negative ones distinct (the caller checks);
// A, B, C (r, d) and a, c (r,) contiguous, in h's dtype, float32 or float64, which is also the
// accumulation dtype (as the PyTorch path). C undefined when tied (C is B). Each dot product over
// d is summed in 8 lanes combined in a fixed order; each parameter gradient is summed over fixed
// blocks of kBlockEntries entries, each in index order, and the blocks' partials in block order:
// deterministic whatever the number of threads, no atomics. Threads: at::parallel_for over the
// entries (forward) and over the blocks (backward).
//
// The difference form: with the identity activation and both A and C (LoReFT, NoReFT, and their
// untied kin), D = A - C is formed once per call and
//     z = x D^T + a - c,    dh = g + gz D,    dA = P,  dC = -P,  dB = Q - P (tied) or Q,
// with gz = g B^T, P = sum gz^T x and Q = sum z^T g: r dot products per row in the forward
// instead of 2r, and 4 r-term passes over a row in the backward instead of 6. The same sums in
// another rounding than the two-term form (D is rounded once; the parameter sums are combined
// after their blocks), checked against the float64 reference like every path. Measured on the
// 2-core CPU (AMD EPYC, fp32, d = 256, r = 8, LoReFT tied, every row of 1024 listed, one thread,
// a step of h * 1 then the edit, forward + backward, median of 270): 1149 us with the two-term
// form, 838 us with this one. In the d = 256 LLaMA step of `bench --e2e` at every position (6
// layers, under the profiler), the op's forward went from 1544 to 931 us per step, its backward
// from 1842 to 1310 us.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include "common.h"
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

namespace {

// Entries per block: the backward's parameter sums go by fixed blocks of entries (each summed
// in index order, the blocks' partials then in block order), so the result does not depend on
// the number of threads; the forward splits its entries across threads in chunks of at least
// this many. (A model's f7+l7 call over a few sequences is one block: one thread, no partials.)
constexpr int64_t kBlockEntries = 64;

using reft_cpu::maybe;
using reft_cpu::opt;

using reft_cpu::act_fwd;
using reft_cpu::act_grad;
using reft_cpu::kIdentity;
using reft_cpu::kNumAct;

// K dot products x . M[k] (M's rows k < K, each of length d) in one pass over x. Each product is
// summed in 8 lanes (so that the compiler vectorises it without reassociating on its own), the
// lanes then combined in a fixed order: the same result on every call, for every K. Measured on
// the 2-core CPU (AMD EPYC, fp32, d = 256, r = 8, one thread, 1024 listed rows), against one
// product after another: forward 306 against 338 us; forward + backward (whose g B^T takes the
// same products, with the groups of entries below) 653 against 1351 us.
template <typename T, int K>
inline void dots(const T* x, const T* M, int64_t d, T* out) {
  T lane[K][8] = {};
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) {
    for (int k = 0; k < K; ++k) {
      const T* m = M + k * d + j;
      for (int l = 0; l < 8; ++l) lane[k][l] += x[j + l] * m[l];
    }
  }
  for (; j < d; ++j) {
    for (int k = 0; k < K; ++k) lane[k][j & 7] += x[j] * M[k * d + j];
  }
  for (int k = 0; k < K; ++k) {
    const T* q = lane[k];
    out[k] = ((q[0] + q[1]) + (q[2] + q[3])) + ((q[4] + q[5]) + (q[6] + q[7]));
  }
}

// Lanes held at once: 8 products of fp32 (8 registers of 8 lanes in AVX2), 4 of fp64.
template <typename T>
constexpr int kDots = sizeof(T) == 4 ? 8 : 4;

// out[k] = x . M[k] for the r rows of M (r, d): groups of kDots<T> products, then 4, 2, 1.
template <typename T>
inline void dots_rows(const T* x, const T* M, int64_t r, int64_t d, T* out) {
  int64_t k = 0;
  for (; k + kDots<T> <= r; k += kDots<T>) dots<T, kDots<T>>(x, M + k * d, d, out + k);
  if (kDots<T> > 4 && k + 4 <= r) { dots<T, 4>(x, M + k * d, d, out + k); k += 4; }
  if (k + 2 <= r) { dots<T, 2>(x, M + k * d, d, out + k); k += 2; }
  if (k < r) dots<T, 1>(x, M + k * d, d, out + k);
}

// y[j] += s x[j]
template <typename T>
inline void axpy(T* y, T s, const T* x, int64_t d) {
  for (int64_t j = 0; j < d; ++j) y[j] += s * x[j];
}

// y[j] += sum_k s[k] M[k][j], added in k order (as r calls of axpy would), over chunks of y that
// stay in registers across the r rows instead of r passes that load and store all of y. A chunk
// of 64 values keeps 8 independent chains of fused multiply-adds in flight in 256-bit registers
// (4 in 512-bit ones); 32 kept 4 and waited on their latency. Measured on the 2-core CPU (AMD
// EPYC, fp32, d = 256, r = 8, LoReFT, every row of 1024 listed, one thread, the forward and
// backward ops alone, three runs each alternating): chunks of 32 with -mavx2, forward 215-229
// and backward 363-366 us; chunks of 64, 179-181 and 314-321 us; chunks of 64 with 512-bit
// vectors (cpu_ext/__init__.py, _flags), 130-132 and 220-224 us. The order of the additions,
// so every bit, is the same in all three.
template <typename T>
inline void add_rows(T* y, const T* s, const T* M, int64_t r, int64_t d) {
  constexpr int64_t kChunk = 64;
  int64_t j0 = 0;
  for (; j0 + kChunk <= d; j0 += kChunk) {
    T acc[kChunk];
    for (int64_t l = 0; l < kChunk; ++l) acc[l] = y[j0 + l];
    for (int64_t k = 0; k < r; ++k) {
      const T sk = s[k];
      const T* m = M + k * d + j0;
      for (int64_t l = 0; l < kChunk; ++l) acc[l] += sk * m[l];
    }
    for (int64_t l = 0; l < kChunk; ++l) y[j0 + l] = acc[l];
  }
  for (int64_t k = 0; k < r; ++k) axpy(y + j0, s[k], M + k * d + j0, d - j0);
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; }

// The difference form's D = A - Cm (rd values), when it applies: the identity activation and both
// A and Cm; else empty.
template <typename T>
std::vector<T> difference(const T* A, const T* Cm, int64_t act, int64_t rd) {
  std::vector<T> D;
  if (act != kIdentity || !A || !Cm) return D;
  D.resize(rd);
  for (int64_t j = 0; j < rd; ++j) D[j] = A[j] - Cm[j];
  return D;
}

// Entries [i0, i1) of the forward.
// D: A - Cm (the difference form; then A and Cm are not read), else nullptr.
template <typename T>
void fwd_kernel(T* h, const int64_t* idx, int64_t i0, int64_t i1, int64_t d, int64_t r, const T* A, const T* a,
                const T* B, const T* Cm, const T* c, const T* D, int64_t act, T* hsave, T* z, T* u) {
  std::vector<T> zi(r), ui(r), ci(r);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t row = idx[i];
    if (row < 0) {
      if (hsave) std::memset(hsave + i * d, 0, sizeof(T) * d);
      if (z) std::memset(z + i * r, 0, sizeof(T) * r);
      if (u) std::memset(u + i * r, 0, sizeof(T) * r);
      continue;
    }
    T* x = h + row * d;
    if (D) {  // z = x D^T + a - c
      dots_rows(x, D, r, d, zi.data());
      for (int64_t k = 0; k < r; ++k) {
        T zk = zi[k] + (a ? a[k] : T(0));
        if (c) zk -= c[k];
        zi[k] = zk;
        if (z) z[i * r + k] = zk;
      }
      if (hsave) std::memcpy(hsave + i * d, x, sizeof(T) * d);
      add_rows(x, zi.data(), B, r, d);
      continue;
    }
    if (A) dots_rows(x, A, r, d, ui.data());
    if (Cm) dots_rows(x, Cm, r, d, ci.data());
    for (int64_t k = 0; k < r; ++k) {
      T uk = (A ? ui[k] : T(0)) + (a ? a[k] : T(0));
      if (u) u[i * r + k] = uk;
      T zk = act_fwd(uk, act);
      if (Cm) zk -= ci[k];
      if (c) zk -= c[k];
      zi[k] = zk;
      if (z) z[i * r + k] = zk;
    }
    if (hsave) std::memcpy(hsave + i * d, x, sizeof(T) * d);
    add_rows(x, zi.data(), B, r, d);
  }
}

// Entries per group of the backward's parameter sums: each sum's row k takes the group's terms
// one after another, in index order (the order of one entry at a time, so the same bits), with
// one load and store of that row per group instead of per entry.
constexpr int kGroup = 4;

// out[k][j] += s[t][k] v[t][j] for the terms t < nt in order, for the r rows of out (r, d).
template <typename T>
inline void add_terms(T* out, int nt, const T* const* s, const T* const* v, int64_t r, int64_t d) {
  for (int64_t k = 0; k < r; ++k) {
    T* o = out + k * d;
    if (nt == 4) {
      const T s0 = s[0][k], s1 = s[1][k], s2 = s[2][k], s3 = s[3][k];
      const T *v0 = v[0], *v1 = v[1], *v2 = v[2], *v3 = v[3];
      for (int64_t j = 0; j < d; ++j) {
        T acc = o[j];
        acc += s0 * v0[j];
        acc += s1 * v1[j];
        acc += s2 * v2[j];
        acc += s3 * v3[j];
        o[j] = acc;
      }
    } else {
      for (int t = 0; t < nt; ++t) axpy(o, s[t][k], v[t], d);
    }
  }
}

// Up to 2 kGroup terms: in fours, in order.
template <typename T>
inline void add_terms_in_fours(T* out, int nt, const T* const* s, const T* const* v, int64_t r, int64_t d) {
  for (int t = 0; t < nt; t += 4) add_terms(out, std::min(4, nt - t), s + t, v + t, r, d);
}

// Entries [i0, i1) of the backward: their rows of dh, and their sums added to dA .. dc.
// With D (the difference form: A - Cm, identity activation) the sums go to dA <- P = sum gz^T x and
// dB <- Q = sum z^T g (dC is not written; the caller forms dA, dB and dC from P and Q) and a dh
// row takes gz D.
template <typename T>
void bwd_kernel(const T* g, T* dh, const T* x, const int64_t* idx, int64_t i0, int64_t i1, int64_t d, int64_t r,
                const T* z, const T* u, const T* A, const T* B, const T* Cm, const T* D, bool tied, int64_t act,
                T* dA, T* da, T* dB, T* dC, T* dc) {
  // per entry of the group: gz = g_row B^T, ga = gz act'(u), mgz = -gz
  std::vector<T> buf(3 * kGroup * r);
  T *gz[kGroup], *ga[kGroup], *mgz[kGroup];
  for (int e = 0; e < kGroup; ++e) {
    gz[e] = buf.data() + e * r;
    ga[e] = buf.data() + (kGroup + e) * r;
    mgz[e] = buf.data() + (2 * kGroup + e) * r;
  }
  const T *gi[kGroup], *xi[kGroup], *zi[kGroup];
  int64_t rows[kGroup];
  int64_t i = i0;
  while (i < i1) {
    int ne = 0;  // the next (up to) kGroup listed entries; padding entries (-1) get no gradient
    for (; i < i1 && ne < kGroup; ++i) {
      const int64_t row = idx[i];
      if (row < 0) continue;
      rows[ne] = row;
      gi[ne] = g + row * d;
      xi[ne] = x + i * d;
      zi[ne] = z + i * r;
      dots_rows(gi[ne], B, r, d, gz[ne]);
      for (int64_t k = 0; k < r; ++k) {
        ga[ne][k] = act == kIdentity ? gz[ne][k] : gz[ne][k] * act_grad(u[i * r + k], act);
        mgz[ne][k] = -gz[ne][k];
      }
      ++ne;
    }
    if (ne == 0) break;
    if (D) {  // the difference form: P, Q, the bias sums, and dh rows g + gz D
      if (dA) add_terms_in_fours(dA, ne, gz, xi, r, d);
      if (dB) add_terms_in_fours(dB, ne, zi, gi, r, d);
      for (int e = 0; e < ne; ++e) {
        for (int64_t k = 0; k < r; ++k) {
          if (da) da[k] += gz[e][k];
          if (dc) dc[k] -= gz[e][k];
        }
        if (dh) add_rows(dh + rows[e] * d, gz[e], D, r, d);
      }
      continue;
    }
    // each sum's terms in index order, as one entry at a time adds them; -(s v) as (-s) v, equal
    if (dA) add_terms_in_fours(dA, ne, ga, xi, r, d);
    if (dB) {
      if (tied) {  // each entry's z g, then its -gz x
        const T* s2[2 * kGroup];
        const T* v2[2 * kGroup];
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
      if (dh) {
        T* out = dh + rows[e] * d;  // dh is a copy of g: add ga A - gz Cm to the listed row
        if (A) add_rows(out, ga[e], A, r, d);
        if (Cm) add_rows(out, mgz[e], Cm, r, d);
      }
    }
  }
}

void check_args(const at::Tensor& h, const at::Tensor& index, const std::optional<at::Tensor>& A,
                const std::optional<at::Tensor>& a, const at::Tensor& B, const std::optional<at::Tensor>& C,
                const std::optional<at::Tensor>& c, int64_t act) {
  // The Python entry checks every argument first and comes here only with these holding; this
  // repeats the ones that memory safety rests on, for direct calls of the op.
  TORCH_CHECK(h.device().is_cpu() && h.is_contiguous(), "lowrank_rows: h must be a contiguous CPU tensor");
  TORCH_CHECK(h.scalar_type() == at::kFloat || h.scalar_type() == at::kDouble,
              "lowrank_rows: h must be float32 or float64, got ", h.scalar_type());
  TORCH_CHECK(B.dim() == 2 && h.dim() >= 1 && B.size(1) == h.size(-1), "lowrank_rows: B must be (r, d)");
  TORCH_CHECK(index.scalar_type() == at::kLong && index.dim() == 1 && index.is_contiguous() && index.device().is_cpu(),
              "lowrank_rows: index must be a contiguous 1-D int64 CPU tensor");
  TORCH_CHECK(act >= 0 && act < kNumAct, "lowrank_rows: unknown activation code ", act);
  const auto r = B.size(0), d = B.size(1);
  auto check = [&](const at::Tensor& t, std::vector<int64_t> shape, const char* name) {
    TORCH_CHECK(t.sizes() == at::IntArrayRef(shape) && t.scalar_type() == h.scalar_type() && t.is_contiguous() &&
                    t.device().is_cpu(),
                "lowrank_rows: ", name, " must be a contiguous CPU tensor of shape ", at::IntArrayRef(shape),
                " in h's dtype");
  };
  check(B, {r, d}, "B");
  if (A && A->defined()) check(*A, {r, d}, "A");
  if (C && C->defined()) check(*C, {r, d}, "C");
  if (a && a->defined()) check(*a, {r}, "a");
  if (c && c->defined()) check(*c, {r}, "c");
}


std::tuple<at::Tensor, at::Tensor, at::Tensor> lowrank_rows_fwd_cpu(
    at::Tensor h, const at::Tensor& index, const std::optional<at::Tensor>& A, const std::optional<at::Tensor>& a,
    const at::Tensor& B, const std::optional<at::Tensor>& C, const std::optional<at::Tensor>& c, int64_t act,
    bool tied, bool save) {
  check_args(h, index, A, a, B, C, c, act);
  const int64_t d = B.size(1), r = B.size(0), n = index.numel();
  const int64_t N = h.numel() / d;
  at::Tensor hsave, z, u;
  auto opts = h.options();
  if (save) {
    hsave = at::empty({n, d}, opts);
    z = at::empty({n, r}, opts);
    u = at::empty({act == kIdentity ? 0 : n, r}, opts);
  } else {
    hsave = at::empty({0}, opts);
    z = at::empty({0}, opts);
    u = at::empty({0}, opts);
  }
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(idx[i] >= -1 && idx[i] < N, "lowrank_rows: index entry ", idx[i], " is outside [-1, ", N, ")");
  }
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "lowrank_rows_fwd", [&] {
    const at::Tensor Cm = tied ? B : opt(C);
    scalar_t* hp = h.data_ptr<scalar_t>();
    const scalar_t *Ap = ptr_or_null<scalar_t>(opt(A)), *ap = ptr_or_null<scalar_t>(opt(a));
    const scalar_t *Bp = B.data_ptr<scalar_t>(), *Cp = ptr_or_null<scalar_t>(Cm), *cp = ptr_or_null<scalar_t>(opt(c));
    scalar_t* hs = save ? hsave.data_ptr<scalar_t>() : nullptr;
    scalar_t* zp = save ? z.data_ptr<scalar_t>() : nullptr;
    scalar_t* up = (save && act != kIdentity) ? u.data_ptr<scalar_t>() : nullptr;
    const std::vector<scalar_t> D = difference(Ap, Cp, act, r * d);
    const scalar_t* Dp = D.empty() ? nullptr : D.data();
    // entries are independent (distinct rows): split across threads, kBlockEntries at least each
    at::parallel_for(0, n, kBlockEntries, [&](int64_t i0, int64_t i1) {
      fwd_kernel<scalar_t>(hp, idx, i0, i1, d, r, Ap, ap, Bp, Cp, cp, Dp, act, hs, zp, up);
    });
  });
  if (!h.is_inference()) torch::autograd::impl::bump_version(h);  // h was written behind autograd's back
  return {hsave, z, u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_rows_bwd_cpu(
    const at::Tensor& g, const at::Tensor& hsave, const at::Tensor& index, const at::Tensor& z, const at::Tensor& u,
    const std::optional<at::Tensor>& A, const at::Tensor& B, const std::optional<at::Tensor>& C, int64_t act,
    bool tied, c10::List<bool> need, bool dh_in_g) {
  TORCH_CHECK(need.size() == 6, "lowrank_rows_bwd: need has 6 flags (dh, dA, da, dB, dC, dc)");
  TORCH_CHECK(B.dim() == 2 && g.dim() >= 1 && g.size(-1) == B.size(1), "lowrank_rows_bwd: g must be (..., d), B (r, d)");
  const at::Tensor gc = g.contiguous();
  // what the memory accesses rest on, for direct calls of the op (the autograd node passes the
  // forward's own tensors): the parameters and index as the forward checks them, the saved
  // tensors' shapes, and every index entry inside g's rows
  check_args(gc, index, A, std::nullopt, B, C, std::nullopt, act);
  const int64_t d = B.size(1), r = B.size(0), n = index.numel(), N = gc.numel() / d;
  auto saved_ok = [&](const at::Tensor& t, std::vector<int64_t> shape) {
    return t.sizes() == at::IntArrayRef(shape) && t.scalar_type() == B.scalar_type() && t.is_contiguous();
  };
  TORCH_CHECK(saved_ok(hsave, {n, d}) && saved_ok(z, {n, r}) && (act == kIdentity || saved_ok(u, {n, r})),
              "lowrank_rows_bwd: hsave, z and u must be the forward's contiguous (n, d), (n, r) and (n, r)");
  const int64_t* ids = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(ids[i] >= -1 && ids[i] < N, "lowrank_rows_bwd: index entry ", ids[i], " is outside [-1, ", N, ")");
  }
  auto opts = B.options();
  auto grad = [&](bool needed, std::vector<int64_t> shape) {
    return needed ? at::zeros(shape, opts) : at::empty({0}, opts);
  };
  const bool has_a = A.has_value() && A->defined(), has_c = C.has_value() && C->defined();
  at::Tensor dh;
  TORCH_CHECK(!dh_in_g || (need[0] && gc.is_same(g)), "lowrank_rows_bwd: dh_in_g needs need[0] and a contiguous g");
  if (need[0]) {
    // the rows of dh: g's own (dh_in_g: each listed row is read before it is written), or a
    // copy of g that is ours
    dh = dh_in_g ? g : gc.is_same(g) ? g.clone(at::MemoryFormat::Contiguous) : gc;
  } else {
    dh = at::empty({0}, g.options());
  }
  at::Tensor dA = grad(need[1] && has_a, {r, d}), da = grad(need[2], {r}), dB = grad(need[3], {r, d});
  at::Tensor dC = grad(need[4] && has_c, {r, d}), dc = grad(need[5], {r});
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "lowrank_rows_bwd", [&] {
    auto out = [&](const at::Tensor& t) { return t.numel() ? t.data_ptr<scalar_t>() : nullptr; };
    const at::Tensor Cm = tied ? B : opt(C);
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    scalar_t* dhp = need[0] ? dh.data_ptr<scalar_t>() : nullptr;
    const scalar_t *xp = hsave.data_ptr<scalar_t>(), *zp = z.data_ptr<scalar_t>();
    const scalar_t* up = act == kIdentity ? nullptr : u.data_ptr<scalar_t>();
    const scalar_t *Ap = ptr_or_null<scalar_t>(opt(A)), *Bp = B.data_ptr<scalar_t>(), *Cp = ptr_or_null<scalar_t>(Cm);
    const int64_t* idx = index.data_ptr<int64_t>();
    scalar_t *dAp = out(dA), *dap = out(da), *dBp = out(dB), *dCp = out(dC), *dcp = out(dc);
    const std::vector<scalar_t> D = difference(Ap, Cp, act, r * d);
    const scalar_t* Dp = D.empty() ? nullptr : D.data();
    // the difference form sums P into dA (or a scratch when dA is not wanted) and Q into dB, then
    // forms dC = -P and the tied dB = Q - P from them (finish_difference)
    at::Tensor P_scratch;
    scalar_t *sumA = dAp, *sumC = dCp;
    if (Dp) {
      if (!dAp && (dCp || (tied && dBp))) {
        P_scratch = at::zeros({r, d}, opts);
        sumA = P_scratch.data_ptr<scalar_t>();
      }
      sumC = nullptr;
    }
    auto finish_difference = [&] {
      if (!Dp || !sumA) return;
      const int64_t rd = r * d;
      if (dCp) for (int64_t j = 0; j < rd; ++j) dCp[j] = -sumA[j];
      if (tied && dBp) for (int64_t j = 0; j < rd; ++j) dBp[j] -= sumA[j];
    };
    const int64_t blocks = (n + kBlockEntries - 1) / kBlockEntries;
    if (blocks <= 1) {  // one block: its sums are the gradients
      bwd_kernel<scalar_t>(gp, dhp, xp, idx, 0, n, d, r, zp, up, Ap, Bp, Cp, Dp, tied, act, sumA, dap, dBp, sumC,
                           dcp);
      finish_difference();
      return;
    }
    // Each block of kBlockEntries entries sums into a partial of its own (blocks in parallel; the
    // rows of dh they write are distinct), then the partials are added in block order.
    const int64_t rd = r * d, stride = 3 * rd + 2 * r;
    at::Tensor part = at::zeros({blocks, stride}, B.options());
    scalar_t* pp = part.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        scalar_t* q = pp + b * stride;
        bwd_kernel<scalar_t>(gp, dhp, xp, idx, b * kBlockEntries, std::min(n, (b + 1) * kBlockEntries), d, r, zp, up,
                             Ap, Bp, Cp, Dp, tied, act, sumA ? q : nullptr, dap ? q + 3 * rd : nullptr,
                             dBp ? q + rd : nullptr, sumC ? q + 2 * rd : nullptr, dcp ? q + 3 * rd + r : nullptr);
      }
    });
    for (int64_t b = 0; b < blocks; ++b) {
      const scalar_t* q = pp + b * stride;
      if (sumA) axpy(sumA, scalar_t(1), q, rd);
      if (dBp) axpy(dBp, scalar_t(1), q + rd, rd);
      if (sumC) axpy(sumC, scalar_t(1), q + 2 * rd, rd);
      if (dap) axpy(dap, scalar_t(1), q + 3 * rd, r);
      if (dcp) axpy(dcp, scalar_t(1), q + 3 * rd + r, r);
    }
    finish_difference();
  });
  if (dh_in_g) {
    if (!g.is_inference()) torch::autograd::impl::bump_version(g);
    dh = at::empty({0}, g.options());
  }
  return {dh, dA, da, dB, dC, dc};
}

// The ops called through the dispatcher from below autograd (so that a dispatch mode sees them).
constexpr char kFwdName[] = "reft_kernels_cpu::lowrank_rows_fwd";
constexpr char kBwdName[] = "reft_kernels_cpu::lowrank_rows_bwd";
const auto& fwd_op() { return reft_cpu::op_handle<decltype(lowrank_rows_fwd_cpu), kFwdName>(); }
const auto& bwd_op() { return reft_cpu::op_handle<decltype(lowrank_rows_bwd_cpu), kBwdName>(); }

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Inputs: h, index, A, a, B, C, c (nullopt when absent: not inputs of the node), act, tied.
struct LowrankRowsFunction : public torch::autograd::Function<LowrankRowsFunction> {
  static at::Tensor forward(AutogradContext* ctx, at::Tensor h, const at::Tensor& index,
                            const std::optional<at::Tensor>& A, const std::optional<at::Tensor>& a,
                            const at::Tensor& B, const std::optional<at::Tensor>& C,
                            const std::optional<at::Tensor>& c, int64_t act, bool tied) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [hsave, z, u] = fwd_op().call(h, index, A, a, B, C, c, act, tied, true);
    ctx->mark_dirty({h});
    ctx->saved_data["act"] = act;
    ctx->saved_data["tied"] = tied;
    // which of (A, a, C, c) are inputs of the node: needs_input_grad counts only those
    ctx->saved_data["present"] = c10::List<bool>({A.has_value(), a.has_value(), C.has_value(), c.has_value()});
    ctx->save_for_backward({hsave, index, z, u, opt(A), B, opt(C)});
    return h;
  }

  // grads by reference: the backward may take grads[0] over as dh (see take_g)
  static variable_list backward(AutogradContext* ctx, variable_list& grads) {
    auto saved = ctx->get_saved_variables();
    const int64_t act = ctx->saved_data["act"].toInt();
    const bool tied = ctx->saved_data["tied"].toBool();
    // the node's inputs, in order: h, index, then A, a (when present), B, then C, c (when present)
    const auto present = ctx->saved_data["present"].toBoolList();
    size_t edge = 2;
    auto needs = [&](bool is_input) { return is_input && ctx->needs_input_grad(edge++); };
    const bool need_A = needs(present[0]), need_a = needs(present[1]), need_B = needs(true);
    const bool need_C = needs(present[2]), need_c = needs(present[3]);
    c10::List<bool> need({ctx->needs_input_grad(0), need_A, need_a, need_B, need_C, need_c});
    const at::Tensor& g = grads[0];  // defined: the Function materialises missing gradients as zeros
    // dh in g's own memory (its listed rows updated in place, no (N, d) copy) where nothing else
    // can see g; else in a copy. Measured on the 2-core CPU (fp32, 56 of 1024 rows, d = 256,
    // r = 8, one thread; h = x * 1, the edit, (y * w).sum() and its backward, median of 350):
    // 214-227 us against 238-247 us with the copy, three runs each.
    const bool take_g = need[0] && reft_cpu::may_take_over(g, saved[5].scalar_type());
    at::Tensor dh, dA, da, dB, dC, dc;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(dh, dA, da, dB, dC, dc) = bwd_op().call(g, saved[0], saved[1], saved[2], saved[3], maybe(saved[4]),
                                                       saved[5], maybe(saved[6]), act, tied, need, take_g);
    }
    auto keep = [](bool needed, const at::Tensor& t) { return needed ? t : at::Tensor(); };
    if (take_g) dh = g;
    if (need[0] && !dh.sizes().equals(g.sizes())) {
      // an alias of the op's (N, d) rows in g's shape, not a tracked view: a view would keep its
      // base, so its storage would count two owners and the engine, summing it with another
      // gradient later (the residual stream's), could not add into it in place (a new (N, d)
      // tensor per edited layer, counted in the d = 256 LLaMA step under the profiler)
      at::AutoDispatchBelowADInplaceOrView below;
      dh = dh.view(g.sizes());
    }
    variable_list out = {keep(need[0], dh), keep(need[1], dA), keep(need[2], da), keep(need[3], dB),
                         keep(need[4], dC), keep(need[5], dc)};
    reft_cpu::refuse_double_backward(out, g, saved, "reft_kernels.lowrank_edit");
    return {out[0], at::Tensor(), out[1], out[2], out[3], out[4], out[5], at::Tensor(), at::Tensor()};
  }
};

at::Tensor lowrank_rows_autograd(at::Tensor h, const at::Tensor& index, const std::optional<at::Tensor>& A,
                                 const std::optional<at::Tensor>& a, const at::Tensor& B,
                                 const std::optional<at::Tensor>& C, const std::optional<at::Tensor>& c, int64_t act,
                                 bool tied) {
  if (!torch::autograd::GradMode::is_enabled() ||
      !(h.requires_grad() || B.requires_grad() || reft_cpu::wants_grad(A) || reft_cpu::wants_grad(a) || reft_cpu::wants_grad(C) || reft_cpu::wants_grad(c))) {
    // no gradient: the forward alone, nothing saved and no node (as the PyTorch path's run())
    at::AutoDispatchBelowADInplaceOrView below;
    fwd_op().call(h, index, A, a, B, C, c, act, tied, false);
    return h;
  }
  return LowrankRowsFunction::apply(h, index, A, a, B, C, c, act, tied);
}

// Below autograd (no gradient recorded: inference, or called under AutoDispatchBelowAutograd).
at::Tensor lowrank_rows_cpu(at::Tensor h, const at::Tensor& index, const std::optional<at::Tensor>& A,
                            const std::optional<at::Tensor>& a, const at::Tensor& B, const std::optional<at::Tensor>& C,
                            const std::optional<at::Tensor>& c, int64_t act, bool tied) {
  lowrank_rows_fwd_cpu(h, index, A, a, B, C, c, act, tied, false);
  return h;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(reft_kernels_cpu, m) {
  m.def("lowrank_rows_(Tensor(a!) h, Tensor index, Tensor? A, Tensor? a, Tensor B, Tensor? C, Tensor? c, "
        "int act, bool tied) -> Tensor(a!)");
  m.def("lowrank_rows_fwd(Tensor(a!) h, Tensor index, Tensor? A, Tensor? a, Tensor B, Tensor? C, Tensor? c, "
        "int act, bool tied, bool save) -> (Tensor, Tensor, Tensor)");
  m.def("lowrank_rows_bwd(Tensor(a!) g, Tensor hsave, Tensor index, Tensor z, Tensor u, Tensor? A, Tensor B, "
        "Tensor? C, int act, bool tied, bool[] need, bool dh_in_g=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
        "Tensor)");
}

TORCH_LIBRARY_IMPL(reft_kernels_cpu, CPU, m) {
  m.impl("lowrank_rows_", &lowrank_rows_cpu);
  m.impl("lowrank_rows_fwd", &lowrank_rows_fwd_cpu);
  m.impl("lowrank_rows_bwd", &lowrank_rows_bwd_cpu);
}

TORCH_LIBRARY_IMPL(reft_kernels_cpu, Autograd, m) {
  m.impl("lowrank_rows_", &lowrank_rows_autograd);
}
