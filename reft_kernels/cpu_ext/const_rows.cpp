// The low-rank edit of every row with a latent that is one row for every row (no A, no C:
// LoBiReFT's h + b R and the other a/c-only term patterns), forward and backward each one op, with
// its autograd in C++ (reft_kernels/cpu_ext/__init__.py says when it is taken).
//
//     y = h + v,   v = z B,   z = act(a) - c      (a, c: (r,); absent a reads as 0, absent c as 0)
//
// Ops (namespace reft_kernels_cpu):
//   const_rows(h, a, B, c, act) -> y         the autograd entry: y a new tensor shaped like h
//   const_rows_fwd(h, a, B, c, act) -> (y, z)
//   const_rows_bwd(g, z, a, B, act, need) -> (da, dB, dc)
//       need = (da, dB, dc); one not needed comes back as a 0-element tensor. dh is g itself
//       (the edit adds a constant row), which the autograd node passes on without a copy.
// Shapes and numerics: h (..., d) contiguous, float32, float64 or bfloat16; a, c (r,), B (r, d)
// contiguous in h's dtype (or float32 beside bfloat16 h). Arithmetic in the accumulation dtype
// (float for bfloat16 h: common.h): v is summed over k in order, then y = h + v, one rounding (as
// eager h + b @ R). The backward's column sum s = sum_i g_i goes by fixed row blocks (common.h),
// the same bits whatever the number of threads; then dB = z^T s, dz = B s (in lanes: lanes_dot),
// da = dz act'(a), dc = -dz, each returned in its parameter's dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include "common.h"
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

namespace {

using reft_cpu::maybe;
using reft_cpu::opt;

// Rows per thread below which the forward stays on one thread.
constexpr int64_t kGrainRows = 256;

// act(u) and act'(u) of the (r,) latent row: common.h's, in double (r values).
using reft_cpu::act_fwd;
using reft_cpu::act_grad;

void check_args(const at::Tensor& h, const std::optional<at::Tensor>& a, const at::Tensor& B,
                const std::optional<at::Tensor>& c, int64_t act) {
  TORCH_CHECK(h.device().is_cpu() && h.is_contiguous() && h.dim() >= 1, "const_rows: h must be a contiguous CPU tensor (..., d)");
  const auto ht = h.scalar_type();
  TORCH_CHECK(ht == at::kFloat || ht == at::kDouble || ht == at::kBFloat16,
              "const_rows: h must be float32, float64 or bfloat16, got ", ht);
  TORCH_CHECK(act >= 0 && act < reft_cpu::kNumAct, "const_rows: unknown activation code ", act);
  TORCH_CHECK(B.dim() == 2 && B.size(0) >= 1 && B.size(1) == h.size(-1) && reft_cpu::param_dtype_ok(B.scalar_type(), ht) &&
                  B.is_contiguous() && B.device().is_cpu(),
              "const_rows: B must be a contiguous (r, d) CPU tensor in h's dtype (or float32 beside bfloat16 h), "
              "r >= 1, d = ", h.size(-1));
  for (const auto* t : {&a, &c}) {
    if (t->has_value() && (*t)->defined()) {
      const at::Tensor& p = **t;
      TORCH_CHECK(p.dim() == 1 && p.size(0) == B.size(0) && reft_cpu::param_dtype_ok(p.scalar_type(), ht) &&
                      p.is_contiguous() && p.device().is_cpu(),
                  "const_rows: a and c must be contiguous (r,) CPU tensors in h's dtype (or float32 beside bfloat16 "
                  "h), r = ", B.size(0));
    }
  }
}

// sum_j x[j] y[j] over d values in kLanes lanes (lane l takes j = l mod kLanes), the lanes then
// added in order, and the tail: the loop vectorizes (a single running sum cannot, its order being
// fixed), and the bits stay the same on every run. Measured on the 2-core CPU (fp32, r = 64,
// d = 768, every row of 1024, backward): 68 us with one running sum, 39 us in lanes, eager 56 us.
constexpr int64_t kLanes = 16;

template <typename T>
T lanes_dot(const T* x, const T* y, int64_t d) {
  T lane[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lane[l] += x[j + l] * y[j + l];
  }
  T sum = 0;
  for (int64_t l = 0; l < kLanes; ++l) sum += lane[l];
  for (; j < d; ++j) sum += x[j] * y[j];
  return sum;
}

// z (r,) comes back in the accumulation dtype (float32 for bfloat16 h).
std::tuple<at::Tensor, at::Tensor> const_rows_fwd_cpu(const at::Tensor& h, const std::optional<at::Tensor>& a,
                                                      const at::Tensor& B, const std::optional<at::Tensor>& c,
                                                      int64_t act) {
  check_args(h, a, B, c, act);
  const int64_t d = B.size(1), r = B.size(0), n = d ? h.numel() / d : 0;
  const auto acc = reft_cpu::acc_type(h.scalar_type());
  at::Tensor y = at::empty_like(h, at::MemoryFormat::Contiguous);
  at::Tensor z = at::empty({r}, B.options().dtype(acc));
  const at::Tensor at_ = reft_cpu::in_dtype(opt(a), acc), ct = reft_cpu::in_dtype(opt(c), acc);
  const at::Tensor Ba = reft_cpu::in_dtype(B, acc);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, h.scalar_type(), "const_rows_fwd", [&] {
    using acc_t = reft_cpu::acc_t<scalar_t>;
    using reft_cpu::ld;
    using reft_cpu::st;
    const acc_t* ap = at_.defined() ? at_.data_ptr<acc_t>() : nullptr;
    const acc_t* cp = ct.defined() ? ct.data_ptr<acc_t>() : nullptr;
    const acc_t* Bp = Ba.data_ptr<acc_t>();
    acc_t* zp = z.data_ptr<acc_t>();
    for (int64_t k = 0; k < r; ++k) {
      zp[k] = static_cast<acc_t>(act_fwd<double>(ap ? static_cast<double>(ap[k]) : 0.0, act)) - (cp ? cp[k] : acc_t(0));
    }
    std::vector<acc_t> v(d, acc_t(0));  // v = z B, summed over k in order
    for (int64_t k = 0; k < r; ++k) {
      const acc_t* Bk = Bp + k * d;
      for (int64_t j = 0; j < d; ++j) v[j] += zp[k] * Bk[j];
    }
    const scalar_t* x = h.data_ptr<scalar_t>();
    scalar_t* out = y.data_ptr<scalar_t>();
    const acc_t* vp = v.data();
    at::parallel_for(0, n, kGrainRows, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const scalar_t* xi = x + i * d;
        scalar_t* yi = out + i * d;
        for (int64_t j = 0; j < d; ++j) yi[j] = st<scalar_t>(ld(xi[j]) + vp[j]);
      }
    });
  });
  return {y, z};
}

// da, dB, dc come back in the accumulation dtype (float32 for bfloat16 g; the autograd node casts
// each to its parameter's dtype).
std::tuple<at::Tensor, at::Tensor, at::Tensor> const_rows_bwd_cpu(const at::Tensor& g, const at::Tensor& z,
                                                                  const std::optional<at::Tensor>& a, const at::Tensor& B,
                                                                  int64_t act, c10::List<bool> need) {
  TORCH_CHECK(need.size() == 3, "const_rows_bwd: need has 3 flags (da, dB, dc)");
  const int64_t d = B.size(1), r = B.size(0);
  TORCH_CHECK(g.device().is_cpu() && g.dim() >= 1 && g.size(-1) == d, "const_rows_bwd: g must be a CPU tensor (..., d)");
  const int64_t n = d ? g.numel() / d : 0;
  const at::Tensor gc = g.contiguous();
  check_args(gc, a, B, std::nullopt, act);  // g's dtype, B and a as the forward checks them (direct calls)
  const auto acc = reft_cpu::acc_type(g.scalar_type());
  TORCH_CHECK(z.numel() == r && z.scalar_type() == acc && z.is_contiguous(),
              "const_rows_bwd: z must be the forward's (r,) latent");
  auto opts = B.options().dtype(acc);
  const at::Tensor Ba = reft_cpu::in_dtype(B, acc), at_ = reft_cpu::in_dtype(opt(a), acc);
  at::Tensor da = need[0] ? at::empty({r}, opts) : at::empty({0}, opts);
  at::Tensor dB = need[1] ? at::empty({r, d}, opts) : at::empty({0}, opts);
  at::Tensor dc = need[2] ? at::empty({r}, opts) : at::empty({0}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, g.scalar_type(), "const_rows_bwd", [&] {
    using acc_t = reft_cpu::acc_t<scalar_t>;
    using reft_cpu::ld;
    std::vector<acc_t> s(d);
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    acc_t* const out[1] = {s.data()};
    reft_cpu::blocked_column_sums<acc_t>(n, d, 1, out, opts, [&](int64_t i0, int64_t i1, acc_t* partial) {
      for (int64_t i = i0; i < i1; ++i) {
        const scalar_t* gi = gp + i * d;
        for (int64_t j = 0; j < d; ++j) partial[j] += ld(gi[j]);
      }
    });
    const acc_t* zp = z.data_ptr<acc_t>();
    const acc_t* Bp = Ba.data_ptr<acc_t>();
    const acc_t* ap = at_.defined() ? at_.data_ptr<acc_t>() : nullptr;
    for (int64_t k = 0; k < r; ++k) {
      const acc_t* Bk = Bp + k * d;
      if (need[1]) {
        acc_t* o = dB.data_ptr<acc_t>() + k * d;
        for (int64_t j = 0; j < d; ++j) o[j] = zp[k] * s[j];
      }
      const acc_t dz = lanes_dot(Bk, s.data(), d);
      if (need[0]) da.data_ptr<acc_t>()[k] = dz * static_cast<acc_t>(act_grad<double>(ap ? static_cast<double>(ap[k]) : 0.0, act));
      if (need[2]) dc.data_ptr<acc_t>()[k] = -dz;
    }
  });
  return {da, dB, dc};
}

constexpr char kFwdName[] = "reft_kernels_cpu::const_rows_fwd";
constexpr char kBwdName[] = "reft_kernels_cpu::const_rows_bwd";
const auto& fwd_op() { return reft_cpu::op_handle<decltype(const_rows_fwd_cpu), kFwdName>(); }
const auto& bwd_op() { return reft_cpu::op_handle<decltype(const_rows_bwd_cpu), kBwdName>(); }

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// The autograd node of const_rows: a plain Node, as PyTorch's own generated ops have (a
// torch::autograd::Function's entry costs more per call: red.cpp). Edges: h, a, B, c (an absent
// a or c has an empty edge).
struct ConstRowsBackward : public torch::autograd::Node {
  SavedVariable z_, a_, B_;
  int64_t act_ = 0;
  bool has_a_ = false, has_c_ = false;
  at::ScalarType a_dtype_ = at::kFloat, B_dtype_ = at::kFloat, c_dtype_ = at::kFloat;  // the gradients' dtypes

  std::string name() const override { return "reft_kernels::ConstRowsBackward"; }

  void release_variables() override {
    z_.reset_data();
    a_.reset_data();
    B_.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    const at::Tensor& g = grads[0];
    const bool need_h = task_should_compute_output(0);
    const bool need_a = has_a_ && task_should_compute_output(1);
    const bool need_B = task_should_compute_output(2);
    const bool need_c = has_c_ && task_should_compute_output(3);
    variable_list out(4);
    if (!g.defined()) return out;
    // dh = g: the edit adds the same row to every row (passed on as it is, as eager's add does)
    if (need_h) out[0] = g;
    if (!(need_a || need_B || need_c)) return out;
    const at::Tensor z = z_.unpack(), a = a_.unpack(), B = B_.unpack();
    at::Tensor da, dB, dc;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(da, dB, dc) = bwd_op().call(g, z, maybe(a), B, act_, c10::List<bool>({need_a, need_B, need_c}));
    }
    variable_list params = {need_a ? reft_cpu::in_dtype(da, a_dtype_) : at::Tensor(),
                            need_B ? reft_cpu::in_dtype(dB, B_dtype_) : at::Tensor(),
                            need_c ? reft_cpu::in_dtype(dc, c_dtype_) : at::Tensor()};
    reft_cpu::refuse_double_backward(params, g, {z, a, B}, "reft_kernels.lowrank_edit");
    out[1] = params[0];
    out[2] = params[1];
    out[3] = params[2];
    return out;
  }
};

at::Tensor const_rows_autograd(const at::Tensor& h, const std::optional<at::Tensor>& a, const at::Tensor& B,
                               const std::optional<at::Tensor>& c, int64_t act) {
  const at::Tensor at_ = opt(a), ct = opt(c);
  at::Tensor y, z;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    std::tie(y, z) = fwd_op().call(h, a, B, c, act);
  }
  if (!torch::autograd::compute_requires_grad(h, at_, B, ct)) return y;  // no gradient: no node
  auto node = reft_cpu::make_node<ConstRowsBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(h, at_, B, ct));
  node->act_ = act;
  node->has_a_ = at_.defined();
  node->has_c_ = ct.defined();
  node->B_dtype_ = B.scalar_type();
  if (at_.defined()) node->a_dtype_ = at_.scalar_type();
  if (ct.defined()) node->c_dtype_ = ct.scalar_type();
  node->z_ = SavedVariable(z, false);
  node->a_ = SavedVariable(at_, false);
  node->B_ = SavedVariable(B, false);
  torch::autograd::set_history(y, node);
  return y;
}

at::Tensor const_rows_cpu(const at::Tensor& h, const std::optional<at::Tensor>& a, const at::Tensor& B,
                          const std::optional<at::Tensor>& c, int64_t act) {
  return std::get<0>(const_rows_fwd_cpu(h, a, B, c, act));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(reft_kernels_cpu, m) {
  m.def("const_rows(Tensor h, Tensor? a, Tensor B, Tensor? c, int act) -> Tensor");
  m.def("const_rows_fwd(Tensor h, Tensor? a, Tensor B, Tensor? c, int act) -> (Tensor, Tensor)");
  m.def("const_rows_bwd(Tensor g, Tensor z, Tensor? a, Tensor B, int act, bool[] need) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(reft_kernels_cpu, CPU, m) {
  m.impl("const_rows", &const_rows_cpu);
  m.impl("const_rows_fwd", &const_rows_fwd_cpu);
  m.impl("const_rows_bwd", &const_rows_bwd_cpu);
}

TORCH_LIBRARY_IMPL(reft_kernels_cpu, Autograd, m) { m.impl("const_rows", &const_rows_autograd); }
