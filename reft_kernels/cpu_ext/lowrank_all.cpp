// The low-rank edit of every row, out of place, forward and backward each one pass in C++, with
// its autograd node in C++ (reft_kernels/cpu_ext/__init__.py says when it is taken):
//
//     y = h + (act(h A^T + a) - h C^T - c) B      on every row of h (..., d)
//
// Ops (namespace reft_kernels_cpu):
//   lowrank_all(h, A, a, B, C, c, act, tied) -> y     the autograd entry: y a new tensor shaped
//       like h; when a gradient is needed, one node whose backward is one call of lowrank_all_bwd
//   lowrank_all_fwd(h, A, a, B, C, c, act, tied, save) -> (y, z, u)
//       z (n, r) the latent, u (n, r) the pre-activation h A^T + a (0 rows for the identity), in
//       the accumulation dtype; both (0,) when save is false
//   lowrank_all_bwd(g, h, z, u, A, B, C, act, tied, need, dh_in_g=False) -> (dh, dA, da, dB, dC, dc)
//       need = (dh, dA, da, dB, dC, dc) flags; a gradient not needed comes back as a 0-element
//       tensor; the parameter gradients in the accumulation dtype (the node casts each to its
//       parameter's dtype). dh_in_g (g contiguous in h's dtype): dh is written over g itself and
//       comes back as a 0-element tensor; the node asks for it when nothing else can see g
//       (common.h, may_take_over).
// Shapes and numerics: h (..., d) contiguous, float32, float64 or bfloat16; A, B, C (r, d) and a,
// c (r,) contiguous in h's dtype (or float32 beside bfloat16 h); C undefined when tied (C is B).
// The per-row kernels are row_kernels.h's, as lowrank_rows.cpp's: every product and sum in the
// accumulation dtype (float for bfloat16 rows), each row of y and dh rounded once; the parameter
// sums by fixed blocks of rows (blocks_of), the same bits whatever the number of threads, no
// atomics.
//
// Why: for bfloat16 rows the PyTorch path converts them to float32 (in blocks) for its matrix
// products, and ATen's conversions and mixed-dtype arithmetic on this CPU cost more than the
// products (common.h, "Storage and accumulation types"); here each row is read once in each pass
// and widened in registers. Measured: cpu_ext/__init__.py, LOWRANK_ALL_MAX_RANK.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include "common.h"
#include "row_kernels.h"
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace {

using reft_cpu::kIdentity;
using reft_cpu::maybe;
using reft_cpu::opt;

// Rows per thread below which the forward stays on one thread.
constexpr int64_t kGrainRows = 64;

// Rows per block of the backward's parameter sums: 64, or more where that would make more than
// 16 blocks (each block's partial sums take 2-3 (r, d) matrices, zeroed and added in order),
// rounded up to 64. A function of the number of rows only, so the bits do not depend on the
// number of threads.
int64_t blocks_of(int64_t n) {
  constexpr int64_t kMin = 64, kMaxBlocks = 16;
  const int64_t per = (n + kMaxBlocks - 1) / kMaxBlocks;
  return std::max(kMin, (per + kMin - 1) / kMin * kMin);
}

void check_args(const at::Tensor& h, const std::optional<at::Tensor>& A, const std::optional<at::Tensor>& a,
                const at::Tensor& B, const std::optional<at::Tensor>& C, const std::optional<at::Tensor>& c,
                int64_t act, bool tied) {
  TORCH_CHECK(h.device().is_cpu() && h.is_contiguous() && h.dim() >= 1,
              "lowrank_all: h must be a contiguous CPU tensor (..., d)");
  const auto ht = h.scalar_type();
  TORCH_CHECK(ht == at::kFloat || ht == at::kDouble || ht == at::kBFloat16,
              "lowrank_all: h must be float32, float64 or bfloat16, got ", ht);
  TORCH_CHECK(act >= 0 && act < reft_cpu::kNumAct, "lowrank_all: unknown activation code ", act);
  TORCH_CHECK(B.dim() == 2 && B.size(0) >= 1 && B.size(1) == h.size(-1),
              "lowrank_all: B must be (r, d) with r >= 1 and d = ", h.size(-1));
  TORCH_CHECK(!tied || !(C.has_value() && C->defined()), "lowrank_all: C must be absent when tied (C is B)");
  reft_cpu::check_params("lowrank_all", ht, A, a, B, C, c);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lowrank_all_fwd_cpu(
    const at::Tensor& h, const std::optional<at::Tensor>& A, const std::optional<at::Tensor>& a, const at::Tensor& B,
    const std::optional<at::Tensor>& C, const std::optional<at::Tensor>& c, int64_t act, bool tied, bool save) {
  check_args(h, A, a, B, C, c, act, tied);
  const int64_t d = B.size(1), r = B.size(0), n = d ? h.numel() / d : 0;
  const auto acc = reft_cpu::acc_type(h.scalar_type());
  const auto aopts = B.options().dtype(acc);
  at::Tensor y = at::empty_like(h, at::MemoryFormat::Contiguous);
  at::Tensor z = at::empty({save ? n : 0, r}, aopts);
  at::Tensor u = at::empty({save && act != kIdentity ? n : 0, r}, aopts);
  const at::Tensor Aa = reft_cpu::in_dtype(opt(A), acc), aa = reft_cpu::in_dtype(opt(a), acc);
  const at::Tensor Ba = reft_cpu::in_dtype(B, acc), Ca = reft_cpu::in_dtype(tied ? B : opt(C), acc);
  const at::Tensor ca = reft_cpu::in_dtype(opt(c), acc);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, h.scalar_type(), "lowrank_all_fwd", [&] {
    using acc_t = reft_cpu::acc_t<scalar_t>;
    using reft_cpu::ptr_or_null;
    const acc_t *Ap = ptr_or_null<acc_t>(Aa), *ap = ptr_or_null<acc_t>(aa), *Bp = Ba.data_ptr<acc_t>();
    const acc_t *Cp = ptr_or_null<acc_t>(Ca), *cp = ptr_or_null<acc_t>(ca);
    const std::vector<acc_t> D = reft_cpu::difference(Ap, Cp, act, r * d);
    const acc_t* Dp = D.empty() ? nullptr : D.data();
    const scalar_t* hp = h.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    acc_t* zp = save ? z.data_ptr<acc_t>() : nullptr;
    acc_t* up = save && act != kIdentity ? u.data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, n, kGrainRows, [&](int64_t i0, int64_t i1) {
      reft_cpu::fwd_kernel<acc_t, scalar_t>(hp, yp, nullptr, i0, i1, d, r, Ap, ap, Bp, Cp, cp, Dp, act, nullptr, zp,
                                            up);
    });
  });
  return {y, z, u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_all_bwd_cpu(
    const at::Tensor& g, const at::Tensor& h, const at::Tensor& z, const at::Tensor& u,
    const std::optional<at::Tensor>& A, const at::Tensor& B, const std::optional<at::Tensor>& C, int64_t act,
    bool tied, c10::List<bool> need, bool dh_in_g) {
  TORCH_CHECK(need.size() == 6, "lowrank_all_bwd: need has 6 flags (dh, dA, da, dB, dC, dc)");
  // what the memory accesses rest on, for direct calls of the op (the node passes the forward's
  // own tensors): h and the parameters as the forward checks them, g and the latents' shapes
  check_args(h, A, std::nullopt, B, C, std::nullopt, act, tied);
  const int64_t d = B.size(1), r = B.size(0), n = d ? h.numel() / d : 0;
  const auto acc = reft_cpu::acc_type(h.scalar_type());
  TORCH_CHECK(g.device().is_cpu() && g.numel() == h.numel() && g.dim() >= 1 && g.size(-1) == d &&
                  g.scalar_type() == h.scalar_type(),
              "lowrank_all_bwd: g must be a CPU tensor of h's shape and dtype");
  auto latent_ok = [&](const at::Tensor& t) {
    return t.sizes() == at::IntArrayRef({n, r}) && t.scalar_type() == acc && t.is_contiguous();
  };
  TORCH_CHECK(latent_ok(z) && (act == kIdentity || latent_ok(u)),
              "lowrank_all_bwd: z and u must be the forward's contiguous (n, r) latents");
  const at::Tensor gc = g.contiguous();
  TORCH_CHECK(!dh_in_g || (need[0] && gc.is_same(g)), "lowrank_all_bwd: dh_in_g needs need[0] and a contiguous g");
  const auto aopts = B.options().dtype(acc);
  auto grad = [&](bool needed, std::vector<int64_t> shape) {
    return needed ? at::empty(shape, aopts) : at::empty({0}, aopts);
  };
  const bool has_a = A.has_value() && A->defined(), has_c = C.has_value() && C->defined();
  at::Tensor dh = !need[0] ? at::empty({0}, g.options()) : dh_in_g ? g : at::empty_like(gc);
  at::Tensor dA = grad(need[1] && has_a, {r, d}), da = grad(need[2], {r}), dB = grad(need[3], {r, d});
  at::Tensor dC = grad(need[4] && has_c, {r, d}), dc = grad(need[5], {r});
  const at::Tensor Aa = reft_cpu::in_dtype(opt(A), acc), Ba = reft_cpu::in_dtype(B, acc);
  const at::Tensor Ca = reft_cpu::in_dtype(tied ? B : opt(C), acc);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, h.scalar_type(), "lowrank_all_bwd", [&] {
    using acc_t = reft_cpu::acc_t<scalar_t>;
    using reft_cpu::ptr_or_null;
    auto out = [&](const at::Tensor& t) { return t.numel() ? t.data_ptr<acc_t>() : nullptr; };
    scalar_t* dhp = need[0] ? dh.data_ptr<scalar_t>() : nullptr;
    reft_cpu::bwd_blocked<acc_t, scalar_t>(
        gc.data_ptr<scalar_t>(), dhp, !dh_in_g, h.data_ptr<scalar_t>(), nullptr, n, blocks_of(n), d, r,
        z.data_ptr<acc_t>(), act == kIdentity ? nullptr : u.data_ptr<acc_t>(), ptr_or_null<acc_t>(Aa),
        Ba.data_ptr<acc_t>(), ptr_or_null<acc_t>(Ca), tied, act, out(dA), out(da), out(dB), out(dC), out(dc), aopts);
  });
  if (dh_in_g) dh = reft_cpu::dh_written_into(g);
  return {dh, dA, da, dB, dC, dc};
}

constexpr char kFwdName[] = "reft_kernels_cpu::lowrank_all_fwd";
constexpr char kBwdName[] = "reft_kernels_cpu::lowrank_all_bwd";
const auto& fwd_op() { return reft_cpu::op_handle<decltype(lowrank_all_fwd_cpu), kFwdName>(); }
const auto& bwd_op() { return reft_cpu::op_handle<decltype(lowrank_all_bwd_cpu), kBwdName>(); }

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// The autograd node of lowrank_all: a plain Node (red.cpp says why). Edges: h, A, a, B, C, c (an
// absent parameter has an empty edge; C is absent when tied).
struct LowrankAllBackward : public torch::autograd::Node {
  SavedVariable h_, z_, u_, A_, B_, C_;
  int64_t act_ = 0;
  bool tied_ = false;
  at::ScalarType h_dtype_ = at::kFloat;
  at::ScalarType dtypes_[5] = {at::kFloat, at::kFloat, at::kFloat, at::kFloat, at::kFloat};  // A, a, B, C, c
  bool present_[5] = {false, false, true, false, false};

  std::string name() const override { return "reft_kernels::LowrankAllBackward"; }

  void release_variables() override {
    for (auto* v : {&h_, &z_, &u_, &A_, &B_, &C_}) v->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    const at::Tensor& g = grads[0];
    variable_list out(6);
    if (!g.defined()) return out;
    bool need_p[5];
    for (int k = 0; k < 5; ++k) need_p[k] = present_[k] && task_should_compute_output(k + 1);
    const bool need_h = task_should_compute_output(0);
    if (!need_h && !(need_p[0] || need_p[1] || need_p[2] || need_p[3] || need_p[4])) return out;
    const at::Tensor h = h_.unpack(), z = z_.unpack(), u = u_.unpack(), A = A_.unpack(), B = B_.unpack(),
                     C = C_.unpack();
    // dh over g's own memory where nothing else can see g (no (N, d) allocation), as
    // lowrank_rows.cpp's node does
    const bool take_g = need_h && reft_cpu::may_take_over(g, h_dtype_);
    at::Tensor dh, dA, da, dB, dC, dc;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(dh, dA, da, dB, dC, dc) =
          bwd_op().call(g, h, z, u, maybe(A), B, maybe(C), act_, tied_,
                        c10::List<bool>({need_h, need_p[0], need_p[1], need_p[2], need_p[3], need_p[4]}), take_g);
    }
    if (take_g) dh = g;
    if (need_h && !dh.sizes().equals(g.sizes())) {
      at::AutoDispatchBelowADInplaceOrView below;
      dh = dh.view(g.sizes());
    }
    const at::Tensor* grads_p[5] = {&dA, &da, &dB, &dC, &dc};
    variable_list res(6);
    if (need_h) res[0] = dh;
    for (int k = 0; k < 5; ++k) {
      if (need_p[k]) res[k + 1] = reft_cpu::in_dtype(*grads_p[k], dtypes_[k]);
    }
    reft_cpu::refuse_double_backward(res, g, {h, z, u, A, B, C}, "reft_kernels.lowrank_edit");
    return res;
  }
};

at::Tensor lowrank_all_autograd(const at::Tensor& h, const std::optional<at::Tensor>& A,
                                const std::optional<at::Tensor>& a, const at::Tensor& B,
                                const std::optional<at::Tensor>& C, const std::optional<at::Tensor>& c, int64_t act,
                                bool tied) {
  const at::Tensor At = opt(A), at_ = opt(a), Ct = opt(C), ct = opt(c);
  const bool grad = torch::autograd::compute_requires_grad(h, At, at_, B, Ct, ct);
  at::Tensor y, z, u;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    std::tie(y, z, u) = fwd_op().call(h, A, a, B, C, c, act, tied, grad);
  }
  if (!grad) return y;  // no gradient: nothing saved, no node
  auto node = reft_cpu::make_node<LowrankAllBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(h, At, at_, B, Ct, ct));
  node->act_ = act;
  node->tied_ = tied;
  node->h_dtype_ = h.scalar_type();
  const at::Tensor* params[5] = {&At, &at_, &B, &Ct, &ct};
  for (int k = 0; k < 5; ++k) {
    node->present_[k] = params[k]->defined();
    if (params[k]->defined()) node->dtypes_[k] = params[k]->scalar_type();
  }
  node->h_ = SavedVariable(h, false);
  node->z_ = SavedVariable(z, false);
  node->u_ = SavedVariable(u, false);
  node->A_ = SavedVariable(At, false);
  node->B_ = SavedVariable(B, false);
  node->C_ = SavedVariable(Ct, false);
  torch::autograd::set_history(y, node);
  return y;
}

at::Tensor lowrank_all_cpu(const at::Tensor& h, const std::optional<at::Tensor>& A, const std::optional<at::Tensor>& a,
                           const at::Tensor& B, const std::optional<at::Tensor>& C, const std::optional<at::Tensor>& c,
                           int64_t act, bool tied) {
  return std::get<0>(lowrank_all_fwd_cpu(h, A, a, B, C, c, act, tied, false));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(reft_kernels_cpu, m) {
  m.def("lowrank_all(Tensor h, Tensor? A, Tensor? a, Tensor B, Tensor? C, Tensor? c, int act, bool tied) -> Tensor");
  m.def("lowrank_all_fwd(Tensor h, Tensor? A, Tensor? a, Tensor B, Tensor? C, Tensor? c, int act, bool tied, "
        "bool save) -> (Tensor, Tensor, Tensor)");
  m.def("lowrank_all_bwd(Tensor(a!) g, Tensor h, Tensor z, Tensor u, Tensor? A, Tensor B, Tensor? C, int act, "
        "bool tied, bool[] need, bool dh_in_g=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(reft_kernels_cpu, CPU, m) {
  m.impl("lowrank_all", &lowrank_all_cpu);
  m.impl("lowrank_all_fwd", &lowrank_all_fwd_cpu);
  m.impl("lowrank_all_bwd", &lowrank_all_bwd_cpu);
}

TORCH_LIBRARY_IMPL(reft_kernels_cpu, Autograd, m) { m.impl("lowrank_all", &lowrank_all_autograd); }
