// RED on the CPU, y = h * scale + bias over every row, forward and backward each one pass in
// C++, with its autograd in C++ (reft_kernels/cpu_ext/__init__.py says when it is taken).
//
// Ops (namespace reft_kernels_cpu):
//   red(h, scale, bias) -> y            the autograd entry: y a new tensor shaped like h; when a
//                                       gradient is needed, one node whose backward is one call
//                                       of red_bwd
//   red_fwd(h, scale, bias) -> y        the forward pass
//   red_bwd(g, h, scale, need) -> (dh, dscale, dbias)
//                                       need = (dh, dscale, dbias); one not needed comes back as a
//                                       0-element tensor; h is read only for dscale
// Shapes and numerics: h (..., d) contiguous, float32, float64 or bfloat16; scale, bias (d,)
// contiguous in h's dtype (or float32 beside bfloat16 h), either may be absent (undefined).
// Arithmetic in the accumulation dtype (float for bfloat16 h: common.h, "Storage and accumulation
// types"): y = fma(h, scale, bias), one rounding, as the Triton and CUDA kernels. The column sums of the backward (dscale = sum g * h, dbias = sum g)
// are taken over fixed blocks of kBlockRows rows, each block's partial summed in row order and
// the partials then in block order: the same bits whatever the number of threads (the blocks
// run in parallel through at::parallel_for).
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

// Rows per thread below which at::parallel_for keeps a call on one thread: a fork costs more
// than a few hundred short rows.
constexpr int64_t kGrainRows = 256;


void check_args(const at::Tensor& h, const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(h.device().is_cpu() && h.is_contiguous() && h.dim() >= 1, "red: h must be a contiguous CPU tensor (..., d)");
  TORCH_CHECK(h.scalar_type() == at::kFloat || h.scalar_type() == at::kDouble || h.scalar_type() == at::kBFloat16,
              "red: h must be float32, float64 or bfloat16, got ", h.scalar_type());
  const int64_t d = h.size(-1);
  for (const auto* t : {&scale, &bias}) {
    if (t->has_value() && (*t)->defined()) {
      const at::Tensor& p = **t;
      TORCH_CHECK(p.dim() == 1 && p.size(0) == d && reft_cpu::param_dtype_ok(p.scalar_type(), h.scalar_type()) &&
                      p.is_contiguous() && p.device().is_cpu(),
                  "red: scale and bias must be contiguous (", d, ",) CPU tensors in h's dtype (or float32 beside "
                  "bfloat16 h)");
    }
  }
}

at::Tensor red_fwd_cpu(const at::Tensor& h, const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& bias) {
  check_args(h, scale, bias);
  at::Tensor y = at::empty_like(h, at::MemoryFormat::Contiguous);
  const int64_t d = h.size(-1), n = d ? h.numel() / d : 0;
  const auto acc = reft_cpu::acc_type(h.scalar_type());
  const at::Tensor s = reft_cpu::in_dtype(opt(scale), acc), t = reft_cpu::in_dtype(opt(bias), acc);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, h.scalar_type(), "red_fwd", [&] {
    using acc_t = reft_cpu::acc_t<scalar_t>;
    using reft_cpu::ld;
    using reft_cpu::st;
    const scalar_t* x = h.data_ptr<scalar_t>();
    scalar_t* out = y.data_ptr<scalar_t>();
    const acc_t* sp = s.defined() ? s.data_ptr<acc_t>() : nullptr;
    const acc_t* tp = t.defined() ? t.data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, n, kGrainRows, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* xi = x + i * d;
        scalar_t* yi = out + i * d;
        if (sp && tp) {
          for (int64_t j = 0; j < d; ++j) yi[j] = st<scalar_t>(std::fma(ld(xi[j]), sp[j], tp[j]));
        } else if (sp) {
          for (int64_t j = 0; j < d; ++j) yi[j] = st<scalar_t>(ld(xi[j]) * sp[j]);
        } else if (tp) {
          for (int64_t j = 0; j < d; ++j) yi[j] = st<scalar_t>(ld(xi[j]) + tp[j]);
        } else {
          for (int64_t j = 0; j < d; ++j) yi[j] = xi[j];
        }
      }
    });
  });
  return y;
}

// dscale and dbias come back in the accumulation dtype (float32 for bfloat16 g; the autograd
// node casts each to its parameter's dtype).
std::tuple<at::Tensor, at::Tensor, at::Tensor> red_bwd_cpu(const at::Tensor& g, const std::optional<at::Tensor>& h,
                                                           const std::optional<at::Tensor>& scale, c10::List<bool> need) {
  TORCH_CHECK(need.size() == 3, "red_bwd: need has 3 flags (dh, dscale, dbias)");
  TORCH_CHECK(g.device().is_cpu() && g.dim() >= 1 &&
                  (g.scalar_type() == at::kFloat || g.scalar_type() == at::kDouble || g.scalar_type() == at::kBFloat16),
              "red_bwd: g must be a float32, float64 or bfloat16 CPU tensor (..., d)");
  const int64_t d = g.size(-1), n = d ? g.numel() / d : 0;
  const at::Tensor gc = g.contiguous();
  const auto acc = reft_cpu::acc_type(g.scalar_type());
  const bool need_dh = need[0], need_ds = need[1], need_dt = need[2];
  TORCH_CHECK(!need_ds || (h.has_value() && h->sizes() == g.sizes() && h->is_contiguous() &&
                           h->scalar_type() == g.scalar_type()),
              "red_bwd: dscale needs h, contiguous, shaped and typed like g");
  TORCH_CHECK(!scale.has_value() || (scale->dim() == 1 && scale->size(0) == d && scale->is_contiguous() &&
                                     reft_cpu::param_dtype_ok(scale->scalar_type(), g.scalar_type())),
              "red_bwd: scale must be a contiguous (d,) tensor in g's dtype (or float32 beside bfloat16 g)");
  const at::Tensor s = reft_cpu::in_dtype(opt(scale), acc);
  auto opts = g.options();
  auto acc_opts = opts.dtype(acc);
  at::Tensor dh = need_dh ? at::empty({n, d}, opts) : at::empty({0}, opts);
  at::Tensor ds = need_ds ? at::empty({d}, acc_opts) : at::empty({0}, acc_opts);
  at::Tensor dt = need_dt ? at::empty({d}, acc_opts) : at::empty({0}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, g.scalar_type(), "red_bwd", [&] {
    using acc_t = reft_cpu::acc_t<scalar_t>;
    using reft_cpu::ld;
    using reft_cpu::st;
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    const scalar_t* hp = need_ds ? h->data_ptr<scalar_t>() : nullptr;
    const acc_t* sp = s.defined() ? s.data_ptr<acc_t>() : nullptr;
    scalar_t* dhp = need_dh ? dh.data_ptr<scalar_t>() : nullptr;
    acc_t* const out[2] = {need_ds ? ds.data_ptr<acc_t>() : nullptr, need_dt ? dt.data_ptr<acc_t>() : nullptr};
    // per block: dh's rows, and the partial column sums of g * h and of g
    reft_cpu::blocked_column_sums<acc_t>(n, d, 2, out, acc_opts, [&](int64_t i0, int64_t i1, acc_t* partial) {
      acc_t* psh = partial;
      acc_t* pst = partial + d;
      for (int64_t i = i0; i < i1; ++i) {
        const scalar_t* gi = gp + i * d;
        if (dhp) {
          scalar_t* o = dhp + i * d;
          if (sp) {
            for (int64_t j = 0; j < d; ++j) o[j] = st<scalar_t>(ld(gi[j]) * sp[j]);
          } else {
            for (int64_t j = 0; j < d; ++j) o[j] = gi[j];
          }
        }
        if (hp) {
          const scalar_t* hi = hp + i * d;
          for (int64_t j = 0; j < d; ++j) psh[j] += ld(gi[j]) * ld(hi[j]);
        }
        if (need_dt) {
          for (int64_t j = 0; j < d; ++j) pst[j] += ld(gi[j]);
        }
      }
    });
  });
  if (need_dh) dh = dh.view(g.sizes());
  return {dh, ds, dt};
}

constexpr char kFwdName[] = "reft_kernels_cpu::red_fwd";
constexpr char kBwdName[] = "reft_kernels_cpu::red_bwd";
const auto& fwd_op() { return reft_cpu::op_handle<decltype(red_fwd_cpu), kFwdName>(); }
const auto& bwd_op() { return reft_cpu::op_handle<decltype(red_bwd_cpu), kBwdName>(); }

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// The autograd node of red: a plain Node, as PyTorch's own generated ops have (a
// torch::autograd::Function's entry costs more per call; see red_autograd). Edges: h, scale,
// bias (an absent parameter's edge is empty).
struct RedBackward : public torch::autograd::Node {
  SavedVariable h_;      // only when scale needs a gradient (as the PyTorch path)
  SavedVariable scale_;  // when scale is present
  bool has_scale_ = false, has_bias_ = false;
  at::ScalarType scale_dtype_ = at::kFloat, bias_dtype_ = at::kFloat;  // the gradients' dtypes

  std::string name() const override { return "reft_kernels::RedBackward"; }

  void release_variables() override {
    h_.reset_data();
    scale_.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    const at::Tensor& g = grads[0];
    const bool need_dh = task_should_compute_output(0);
    const bool need_ds = has_scale_ && task_should_compute_output(1);
    const bool need_dt = has_bias_ && task_should_compute_output(2);
    variable_list out(3);
    if (!g.defined() || !(need_dh || need_ds || need_dt)) return out;
    const at::Tensor h = need_ds ? h_.unpack() : at::Tensor();
    const at::Tensor s = has_scale_ ? scale_.unpack() : at::Tensor();
    at::Tensor dh, ds, dt;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(dh, ds, dt) = bwd_op().call(g, maybe(h), maybe(s), c10::List<bool>({need_dh, need_ds, need_dt}));
    }
    if (need_dh) out[0] = dh;
    if (need_ds) out[1] = reft_cpu::in_dtype(ds, scale_dtype_);
    if (need_dt) out[2] = reft_cpu::in_dtype(dt, bias_dtype_);
    reft_cpu::refuse_double_backward(out, g, {h, s}, "reft_kernels.red");
    return out;
  }
};

at::Tensor red_autograd(const at::Tensor& h, const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& bias) {
  const at::Tensor s = opt(scale), t = opt(bias);
  at::Tensor y;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    y = fwd_op().call(h, scale, bias);
  }
  if (!torch::autograd::compute_requires_grad(h, s, t)) return y;  // no gradient: no node
  auto node = reft_cpu::make_node<RedBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(h, s, t));
  node->has_scale_ = s.defined();
  node->has_bias_ = t.defined();
  if (s.defined()) node->scale_dtype_ = s.scalar_type();
  if (t.defined()) node->bias_dtype_ = t.scalar_type();
  if (s.defined()) {
    node->scale_ = SavedVariable(s, false);
    if (s.requires_grad()) node->h_ = SavedVariable(h, false);
  }
  torch::autograd::set_history(y, node);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(reft_kernels_cpu, m) {
  m.def("red(Tensor h, Tensor? scale, Tensor? bias) -> Tensor");
  m.def("red_fwd(Tensor h, Tensor? scale, Tensor? bias) -> Tensor");
  m.def("red_bwd(Tensor g, Tensor? h, Tensor? scale, bool[] need) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(reft_kernels_cpu, CPU, m) {
  m.impl("red", &red_fwd_cpu);
  m.impl("red_fwd", &red_fwd_cpu);
  m.impl("red_bwd", &red_bwd_cpu);
}

TORCH_LIBRARY_IMPL(reft_kernels_cpu, Autograd, m) { m.impl("red", &red_autograd); }
