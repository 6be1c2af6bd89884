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
//       back as a 0-element tensor. dh_in_g (g contiguous, in h's dtype): dh is written into g
//       itself (its listed rows updated in place) and comes back as a 0-element tensor; the
//       autograd node asks for it when nothing else can see g (see LowrankRowsFunction).
// Shapes and numerics: h (N, d) contiguous rows (any leading shape that merges into them),
// index (n,) int64 with entries in [-1, N), the non-negative ones distinct (the caller checks);
// A, B, C (r, d) and a, c (r,) contiguous, in h's dtype (float32, float64 or bfloat16), or float32
// beside bfloat16 h; the accumulation dtype is float32 for bfloat16 h, else h's (as the PyTorch
// path): z, u and the parameter gradients come back in it, hsave in h's. C undefined when tied
// (C is B). The per-row kernels
// are row_kernels.h's (shared with lowrank_all.cpp, the out-of-place edit of every row): each dot
// product over d summed in 8 lanes combined in a fixed order; each parameter gradient summed over
// fixed blocks of kBlockEntries entries, each in index order, and the blocks' partials in block
// order: deterministic whatever the number of threads, no atomics. Threads: at::parallel_for
// over the entries (forward) and over the blocks (backward).
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
#include "row_kernels.h"
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

using reft_cpu::kIdentity;
using reft_cpu::kNumAct;

using reft_cpu::bwd_blocked;
using reft_cpu::difference;
using reft_cpu::fwd_kernel;
using reft_cpu::ptr_or_null;

void check_args(const at::Tensor& h, const at::Tensor& index, const std::optional<at::Tensor>& A,
                const std::optional<at::Tensor>& a, const at::Tensor& B, const std::optional<at::Tensor>& C,
                const std::optional<at::Tensor>& c, int64_t act) {
  // The Python entry checks every argument first and comes here only with these holding; this
  // repeats the ones that memory safety rests on, for direct calls of the op.
  TORCH_CHECK(h.device().is_cpu() && h.is_contiguous(), "lowrank_rows: h must be a contiguous CPU tensor");
  TORCH_CHECK(h.scalar_type() == at::kFloat || h.scalar_type() == at::kDouble || h.scalar_type() == at::kBFloat16,
              "lowrank_rows: h must be float32, float64 or bfloat16, got ", h.scalar_type());
  TORCH_CHECK(B.dim() == 2 && h.dim() >= 1 && B.size(1) == h.size(-1), "lowrank_rows: B must be (r, d)");
  TORCH_CHECK(index.scalar_type() == at::kLong && index.dim() == 1 && index.is_contiguous() && index.device().is_cpu(),
              "lowrank_rows: index must be a contiguous 1-D int64 CPU tensor");
  TORCH_CHECK(act >= 0 && act < kNumAct, "lowrank_rows: unknown activation code ", act);
  reft_cpu::check_params("lowrank_rows", h.scalar_type(), A, a, B, C, c);
}


std::tuple<at::Tensor, at::Tensor, at::Tensor> lowrank_rows_fwd_cpu(
    at::Tensor h, const at::Tensor& index, const std::optional<at::Tensor>& A, const std::optional<at::Tensor>& a,
    const at::Tensor& B, const std::optional<at::Tensor>& C, const std::optional<at::Tensor>& c, int64_t act,
    bool tied, bool save) {
  check_args(h, index, A, a, B, C, c, act);
  const int64_t d = B.size(1), r = B.size(0), n = index.numel();
  const int64_t N = h.numel() / d;
  at::Tensor hsave, z, u;
  const auto acc = reft_cpu::acc_type(h.scalar_type());
  auto opts = h.options(), aopts = h.options().dtype(acc);  // rows in h's dtype, latents in acc's
  if (save) {
    hsave = at::empty({n, d}, opts);
    z = at::empty({n, r}, aopts);
    u = at::empty({act == kIdentity ? 0 : n, r}, aopts);
  } else {
    hsave = at::empty({0}, opts);
    z = at::empty({0}, aopts);
    u = at::empty({0}, aopts);
  }
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(idx[i] >= -1 && idx[i] < N, "lowrank_rows: index entry ", idx[i], " is outside [-1, ", N, ")");
  }
  // the parameters in the accumulation dtype (bfloat16 ones widened; no copy otherwise)
  const at::Tensor Aa = reft_cpu::in_dtype(opt(A), acc), aa = reft_cpu::in_dtype(opt(a), acc);
  const at::Tensor Ba = reft_cpu::in_dtype(B, acc), Ca = reft_cpu::in_dtype(tied ? B : opt(C), acc);
  const at::Tensor ca = reft_cpu::in_dtype(opt(c), acc);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, h.scalar_type(), "lowrank_rows_fwd", [&] {
    using acc_t = reft_cpu::acc_t<scalar_t>;
    scalar_t* hp = h.data_ptr<scalar_t>();
    const acc_t *Ap = ptr_or_null<acc_t>(Aa), *ap = ptr_or_null<acc_t>(aa);
    const acc_t *Bp = Ba.data_ptr<acc_t>(), *Cp = ptr_or_null<acc_t>(Ca), *cp = ptr_or_null<acc_t>(ca);
    scalar_t* hs = save ? hsave.data_ptr<scalar_t>() : nullptr;
    acc_t* zp = save ? z.data_ptr<acc_t>() : nullptr;
    acc_t* up = (save && act != kIdentity) ? u.data_ptr<acc_t>() : nullptr;
    const std::vector<acc_t> D = difference(Ap, Cp, act, r * d);
    const acc_t* Dp = D.empty() ? nullptr : D.data();
    // entries are independent (distinct rows): split across threads, kBlockEntries at least each
    at::parallel_for(0, n, kBlockEntries, [&](int64_t i0, int64_t i1) {
      fwd_kernel<acc_t, scalar_t>(hp, hp, idx, i0, i1, d, r, Ap, ap, Bp, Cp, cp, Dp, act, hs, zp, up);
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
  const auto acc = reft_cpu::acc_type(gc.scalar_type());
  auto saved_ok = [&](const at::Tensor& t, std::vector<int64_t> shape, at::ScalarType dtype) {
    return t.sizes() == at::IntArrayRef(shape) && t.scalar_type() == dtype && t.is_contiguous();
  };
  TORCH_CHECK(saved_ok(hsave, {n, d}, gc.scalar_type()) && saved_ok(z, {n, r}, acc) &&
                  (act == kIdentity || saved_ok(u, {n, r}, acc)),
              "lowrank_rows_bwd: hsave, z and u must be the forward's contiguous (n, d), (n, r) and (n, r)");
  const int64_t* ids = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(ids[i] >= -1 && ids[i] < N, "lowrank_rows_bwd: index entry ", ids[i], " is outside [-1, ", N, ")");
  }
  auto opts = B.options().dtype(acc);  // the parameter gradients in the accumulation dtype
  auto grad = [&](bool needed, std::vector<int64_t> shape) {
    return needed ? at::empty(shape, opts) : at::empty({0}, opts);
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
  const at::Tensor Aa = reft_cpu::in_dtype(opt(A), acc), Ba = reft_cpu::in_dtype(B, acc);
  const at::Tensor Ca = reft_cpu::in_dtype(tied ? B : opt(C), acc);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, g.scalar_type(), "lowrank_rows_bwd", [&] {
    using acc_t = reft_cpu::acc_t<scalar_t>;
    auto out = [&](const at::Tensor& t) { return t.numel() ? t.data_ptr<acc_t>() : nullptr; };
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    scalar_t* dhp = need[0] ? dh.data_ptr<scalar_t>() : nullptr;
    const scalar_t* xp = hsave.data_ptr<scalar_t>();
    const acc_t* zp = z.data_ptr<acc_t>();
    const acc_t* up = act == kIdentity ? nullptr : u.data_ptr<acc_t>();
    const acc_t *Ap = ptr_or_null<acc_t>(Aa), *Bp = Ba.data_ptr<acc_t>(), *Cp = ptr_or_null<acc_t>(Ca);
    const int64_t* idx = index.data_ptr<int64_t>();
    acc_t *dAp = out(dA), *dap = out(da), *dBp = out(dB), *dCp = out(dC), *dcp = out(dc);
    bwd_blocked<acc_t, scalar_t>(gp, dhp, false, xp, idx, n, kBlockEntries, d, r, zp, up, Ap, Bp, Cp, tied, act, dAp,
                                 dap, dBp, dCp, dcp, opts);
  });
  if (dh_in_g) dh = reft_cpu::dh_written_into(g);
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
    // the dtypes of the gradients of (A, a, B, C, c): each parameter's own (the op sums in the
    // accumulation dtype; float32 parameters may stand beside bfloat16 rows)
    auto dtype_of = [&](const std::optional<at::Tensor>& t) {
      return static_cast<int64_t>(t.has_value() && t->defined() ? t->scalar_type() : B.scalar_type());
    };
    ctx->saved_data["dtypes"] = c10::List<int64_t>({dtype_of(A), dtype_of(a), dtype_of(B), dtype_of(C), dtype_of(c)});
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
    const bool take_g = need[0] && reft_cpu::may_take_over(g, saved[0].scalar_type());
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
    const auto dtypes = ctx->saved_data["dtypes"].toIntList();
    auto param = [&](bool needed, const at::Tensor& t, size_t k) {
      return needed ? reft_cpu::in_dtype(t, static_cast<at::ScalarType>(dtypes.get(k))) : at::Tensor();
    };
    variable_list out = {keep(need[0], dh), param(need[1], dA, 0), param(need[2], da, 1), param(need[3], dB, 2),
                         param(need[4], dC, 3), param(need[5], dc, 4)};
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
