// Pieces shared by the ops of the CPU extension (lowrank_rows.cpp, red.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace reft_cpu {

// Activation codes: reft_kernels/_constants.py (IDENTITY, RELU, GELU, GELU_TANH, SILU, TANH, SIGMOID).
enum Act : int64_t { kIdentity = 0, kRelu, kGelu, kGeluTanh, kSilu, kTanh, kSigmoid, kNumAct };

template <typename T>
inline T sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }

template <typename T>
inline T act_fwd(T u, int64_t act) {
  switch (act) {
    case kRelu: return u > T(0) ? u : T(0);
    case kGelu: return T(0.5) * u * (T(1) + std::erf(u * T(0.7071067811865476)));
    case kGeluTanh: return T(0.5) * u * (T(1) + std::tanh(T(0.7978845608028654) * (u + T(0.044715) * u * u * u)));
    case kSilu: return u * sigmoid(u);
    case kTanh: return std::tanh(u);
    case kSigmoid: return sigmoid(u);
    default: return u;
  }
}

template <typename T>
inline T act_grad(T u, int64_t act) {
  switch (act) {
    case kRelu: return u > T(0) ? T(1) : T(0);
    case kGelu: {
      T cdf = T(0.5) * (T(1) + std::erf(u * T(0.7071067811865476)));
      return cdf + u * std::exp(T(-0.5) * u * u) * T(0.3989422804014327);
    }
    case kGeluTanh: {
      T k = T(0.7978845608028654);
      T t = std::tanh(k * (u + T(0.044715) * u * u * u));
      return T(0.5) * (T(1) + t) + T(0.5) * u * (T(1) - t * t) * k * (T(1) + T(3 * 0.044715) * u * u);
    }
    case kSilu: { T s = sigmoid(u); return s * (T(1) + u * (T(1) - s)); }
    case kTanh: { T t = std::tanh(u); return T(1) - t * t; }
    case kSigmoid: { T s = sigmoid(u); return s * (T(1) - s); }
    default: return T(1);
  }
}

// The typed handle of this extension's op Name (a constexpr char array holding e.g.
// "reft_kernels_cpu::red_fwd"), found once per op: the autograd nodes call their forward and
// backward ops through the dispatcher from below autograd, so that a dispatch mode sees them.
template <typename Fn, const char* Name>
const c10::TypedOperatorHandle<Fn>& op_handle() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(Name, "").template typed<Fn>();
  return op;
}

// A new autograd node of type N, held as the torch in use holds nodes: an intrusive pointer
// where Node is an intrusive_ptr_target (torch 2.13), a shared pointer before (torch 2.11).
template <typename N>
auto make_node() {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, N>) {
    return c10::make_intrusive<N>();
  } else {
    return std::shared_ptr<N>(new N());
  }
}

// Storage and accumulation types of red.cpp and const_rows.cpp. Their rows may be bfloat16: each
// element is widened to float on read (exact), the arithmetic and every sum is float, and each
// result is rounded to bfloat16 once on write (nearest even; NaN stays NaN), as c10::BFloat16's
// own conversion but on the raw 16 bits, so that the loops vectorize. Measured on the 2-core CPU
// (AVX-512, 2 threads, (4096, 2048) bfloat16 rows): adding an fp32 row 0.26 ms against 0.61 ms
// for eager bfloat16 `x + row` and 18.7 ms for ATen's mixed `torch.add(x, row_fp32, out=y)`; the
// column sum 0.11 ms against 0.59 ms for `x.sum(0)` (bfloat16 out) and 10.4 ms with dtype=float.
// float and double rows are read and written as they are (the accumulation type is their own).
template <typename T> struct AccType { using type = T; };
template <> struct AccType<c10::BFloat16> { using type = float; };
template <typename T> using acc_t = typename AccType<T>::type;

inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kBFloat16 ? at::kFloat : t; }

inline float ld(c10::BFloat16 x) {
  const uint32_t u = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float ld(float x) { return x; }
inline double ld(double x) { return x; }

template <typename T> inline T st(acc_t<T> v) { return v; }
template <> inline c10::BFloat16 st<c10::BFloat16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint16_t bits = v != v ? uint16_t(0x7FC0) : static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return c10::BFloat16(bits, c10::BFloat16::from_bits());
}

// Whether a parameter's dtype goes with rows of dtype h: the same, or float32 beside bfloat16 rows.
inline bool param_dtype_ok(at::ScalarType p, at::ScalarType h) { return p == h || (h == at::kBFloat16 && p == at::kFloat); }

// t in dtype (undefined stays undefined; no copy when it has it already): the parameters in the
// accumulation dtype, and the gradients computed there back in their parameters' dtypes.
inline at::Tensor in_dtype(const at::Tensor& t, at::ScalarType dtype) {
  return !t.defined() || t.scalar_type() == dtype ? t : t.to(dtype);
}

inline at::Tensor opt(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

inline bool wants_grad(const std::optional<at::Tensor>& t) { return t.has_value() && t->requires_grad(); }

inline std::optional<at::Tensor> maybe(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// Rows per block of the column sums below: fixed, so that a sum's bits do not depend on the
// number of threads.
constexpr int64_t kBlockRows = 128;

// Column sums over n rows of width d by fixed blocks of kBlockRows rows: `rows(i0, i1, partial)`
// adds the rows [i0, i1) of each of its `sums` sums into `partial` (sums x d, zeroed; it may also
// write per-row outputs of those rows); the blocks run on the intra-op threads, at least two
// blocks a thread, and their partials are added in block order into out[k] (d values; nullptr:
// not wanted). No rows: zeros.
template <typename T, typename F>
void blocked_column_sums(int64_t n, int64_t d, int64_t sums, T* const* out, const at::TensorOptions& opts, F rows) {
  const int64_t blocks = (n + kBlockRows - 1) / kBlockRows;
  at::Tensor part = at::zeros({std::max<int64_t>(blocks, 1), sums, d}, opts);
  T* pp = part.template data_ptr<T>();
  at::parallel_for(0, blocks, 2, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) rows(b * kBlockRows, std::min(n, (b + 1) * kBlockRows), pp + b * sums * d);
  });
  for (int64_t k = 0; k < sums; ++k) {
    T* o = out[k];
    if (!o) continue;
    std::fill(o, o + d, T(0));
    for (int64_t b = 0; b < blocks; ++b) {
      const T* q = pp + (b * sums + k) * d;
      for (int64_t j = 0; j < d; ++j) o[j] += q[j];
    }
  }
}

// Whether a node's backward may take the incoming gradient g over (write its own gradient for the
// input into g's memory and hand g on), as AccumulateGrad takes over a gradient it alone holds:
// nothing else can see g. The engine handed it to the node alone (one reference: the node's
// backward takes its gradients by reference, so none is added), its storage is shared with no
// other tensor, no graph is being recorded (no double backward reads it), and it is contiguous
// in `dtype`, with no lazy negation or conjugation. A gradient that something else still holds
// (another consumer's input buffer, a Python hook that keeps it, the caller's grad_outputs) has
// more references and is not taken (retain_grad keeps a copy of its own).
inline bool may_take_over(const at::Tensor& g, at::ScalarType dtype) {
  return !at::GradMode::is_enabled() && g.defined() && g.use_count() == 1 && g.storage().use_count() == 1 &&
         g.is_contiguous() && g.scalar_type() == dtype && !g.is_neg() && !g.is_conj() && !g.is_inference();
}

// What a backward op returns in dh's place once it has written dh into g itself (dh_in_g): a
// 0-element tensor, g's version bumped first (it was written behind autograd's back).
inline at::Tensor dh_written_into(const at::Tensor& g) {
  if (!g.is_inference()) torch::autograd::impl::bump_version(g);
  return at::empty({0}, g.options());
}

// For a backward run with create_graph=True: its gradients are right but carry no second-order
// terms, so each defined one in `out` gets a node that raises if it is differentiated again (the
// Python Functions do the same through ops/_autograd.py's once_differentiable, with this
// message). The node also takes a zero-size tensor that depends on every input of the backward
// that requires grad (the incoming gradient `g`, the saved tensors), so that a later
// differentiation towards those inputs reaches it and raises instead of calling them unused.
inline void refuse_double_backward(std::vector<at::Tensor>& out, const at::Tensor& g,
                                   const std::vector<at::Tensor>& saved, const char* op_name) {
  if (!at::GradMode::is_enabled()) return;
  std::vector<at::Tensor> anchors;
  auto link = [&](const at::Tensor& t) {
    if (t.defined() && t.requires_grad()) anchors.push_back(t.reshape(-1).narrow(0, 0, 0).sum().reshape(1));
  };
  link(g);
  for (const auto& t : saved) link(t);
  if (anchors.empty()) return;
  std::vector<at::Tensor> inputs;
  std::vector<size_t> where;
  for (size_t i = 0; i < out.size(); ++i) {
    if (out[i].defined()) {
      inputs.push_back(out[i].detach());
      where.push_back(i);
    }
  }
  inputs.push_back(at::cat(anchors).narrow(0, 0, 0));
  const std::string msg = std::string(op_name) +
                          " does not support double backward: its gradient was computed with "
                          "create_graph=True and is being differentiated again";
  auto wrapped = torch::autograd::DelayedError(msg, static_cast<int64_t>(inputs.size())).apply(std::move(inputs));
  for (size_t k = 0; k < where.size(); ++k) out[where[k]] = wrapped[k];
}

}  // namespace reft_cpu
