// Python bindings of reft_kernels._C: input checks, dtype dispatch, output allocation.
//
// These are low-level entry points for reft_kernels/ops/red/cuda_impl.py and
// reft_kernels/ops/lowrank_edit/cuda_impl.py (which reach this module through
// reft_kernels/_cuda.py), which register the torch.library ops on top of them (with fake
// implementations for torch.compile). Shapes and strides are checked here again so that a wrong
// call raises instead of touching bad memory.
// Activations may be float32, float16 or bfloat16; parameters either the activations' dtype or
// float32 (the Python side passes other parameter dtypes as fp32 copies).
// Only c10/cuda headers (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS and cuSPARSE
// headers that a minimal CUDA toolkit does not have).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "launch.h"
#include "lowrank_edit_bwd_cluster.h"

namespace reft {
namespace {

using OptTensor = std::optional<at::Tensor>;

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}, Tag<W>{}) for activation dtype `act` and parameter dtype `param`.
template <typename F>
void dispatch_dtypes(at::ScalarType act, at::ScalarType param, const char* op, F&& f) {
  const bool param_f32 = param == at::kFloat;
  TORCH_CHECK_TYPE(param_f32 || param == act, op, ": parameters must be float32 or the activations' dtype ", act,
                   ", got ", param);
  switch (act) {
    case at::kFloat: return f(Tag<float>{}, Tag<float>{});
    case at::kHalf:
      return param_f32 ? f(Tag<__half>{}, Tag<float>{}) : f(Tag<__half>{}, Tag<__half>{});
    case at::kBFloat16:
      return param_f32 ? f(Tag<__nv_bfloat16>{}, Tag<float>{}) : f(Tag<__nv_bfloat16>{}, Tag<__nv_bfloat16>{});
    default: TORCH_CHECK_TYPE(false, op, ": activations must be float32, float16 or bfloat16, got ", act);
  }
}

template <typename F>
void dispatch_act(at::ScalarType act, const char* op, F&& f) {
  switch (act) {
    case at::kFloat: return f(Tag<float>{});
    case at::kHalf: return f(Tag<__half>{});
    case at::kBFloat16: return f(Tag<__nv_bfloat16>{});
    default: TORCH_CHECK_TYPE(false, op, ": activations must be float32, float16 or bfloat16, got ", act);
  }
}

// Where the kernels' tensors live: CUDA memory, or host memory in the REFT_CPU_EMULATION build
// (tests/cuda/emulation), which runs the same kernels with one host thread per CUDA thread.
bool on_kernel_device(const at::Tensor& t) {
#ifdef REFT_CPU_EMULATION
  return t.is_cpu();
#else
  return t.is_cuda();
#endif
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// The (r, d) weights can be read in packs of V elements of `elem` bytes (those that are present).
bool weights_vec_ok(int64_t d, int V, size_t elem, const void* A, const void* B, const void* P) {
  const int64_t pack = V * static_cast<int64_t>(elem);
  return d % V == 0 && aligned(B, pack) && (!A || aligned(A, pack)) && (!P || aligned(P, pack));
}

const void* ptr_or_null(const OptTensor& t) { return t.has_value() ? t->data_ptr() : nullptr; }

void check_cuda(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK_VALUE(on_kernel_device(t) && t.device() == ref.device(), name, " must be on ", ref.device(), ", got ",
                    t.device());
}

// A parameter: contiguous, on h's device, of the given shape, float32 or h's dtype.
void check_param(const OptTensor& t, const at::Tensor& h, at::IntArrayRef shape, const char* name,
                 std::optional<at::ScalarType>& dtype) {
  if (!t.has_value()) return;
  check_cuda(*t, h, name);
  TORCH_CHECK_VALUE(t->sizes() == shape, name, " must have shape ", shape, ", got ", t->sizes());
  TORCH_CHECK_VALUE(t->is_contiguous(), name, " must be contiguous");
  if (dtype.has_value()) {
    TORCH_CHECK_TYPE(t->scalar_type() == *dtype, name, " has dtype ", t->scalar_type(),
                     " but the other parameters have ", *dtype);
  } else {
    dtype = t->scalar_type();
  }
}

// Row tensor view (rows, d) with strides: every addressed element must lie inside the storage.
void check_rows(const at::Tensor& t, int64_t rows, int64_t d, int64_t row_stride, int64_t col_stride,
                const char* name) {
  TORCH_CHECK_VALUE(row_stride >= 0 && col_stride >= 0, name, ": negative strides");
  if (rows == 0 || d == 0) return;
  const int64_t last = (rows - 1) * row_stride + (d - 1) * col_stride;
  const int64_t avail = static_cast<int64_t>(t.storage().nbytes() / t.element_size()) - t.storage_offset();
  TORCH_CHECK_VALUE(last < avail, name, ": rows x strides reach element ", last, " of ", avail);
}

int sm_count(const at::Tensor& t) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, t.device().index()));
  return count;
}

at::Tensor f32_empty(at::IntArrayRef shape, const at::Tensor& like) {
  return at::empty(shape, like.options().dtype(at::kFloat));
}

// ------------------------------------------------------------------------------------------ RED

// The RED kernels read rows as contiguous runs: unit column stride, which any stride satisfies
// for a single column or no element at all (PyTorch keeps e.g. (1, 2) strides on a (2, 1) view,
// and any strides on an empty one, through contiguous()).
bool unit_cols(const at::Tensor& t) { return t.numel() == 0 || t.size(1) == 1 || t.stride(1) == 1; }

at::Tensor red_fwd(const at::Tensor& h, const OptTensor& scale, const OptTensor& bias) {
  TORCH_CHECK_VALUE(on_kernel_device(h) && h.dim() == 2 && unit_cols(h), "red_fwd: h must be a CUDA (n, d) matrix ",
                    "with unit column stride");
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t n = h.size(0), d = h.size(1);
  std::optional<at::ScalarType> pdt;
  check_param(scale, h, {d}, "scale", pdt);
  check_param(bias, h, {d}, "bias", pdt);
  auto y = at::empty({n, d}, h.options());
  dispatch_dtypes(h.scalar_type(), pdt.value_or(h.scalar_type()), "red_fwd", [&](auto tt, auto tw) {
    using T = typename decltype(tt)::type;
    using W = typename decltype(tw)::type;
    constexpr int V = vec_of<T>();
    RedFwdParams p{};
    p.h = h.data_ptr();
    p.scale = ptr_or_null(scale);
    p.bias = ptr_or_null(bias);
    p.y = y.data_ptr();
    p.n_rows = n;
    p.d = d;
    p.h_row_stride = h.stride(0);
    p.y_row_stride = d;
    p.vec_ok = aligned(p.h, 16) && aligned(p.y, 16) && h.stride(0) % V == 0 && d % V == 0 &&
               (!p.scale || aligned(p.scale, V * sizeof(W))) && (!p.bias || aligned(p.bias, V * sizeof(W)));
    p.sm_count = sm_count(h);
    launch_red_fwd<T, W>(p, c10::cuda::getCurrentCUDAStream());
  });
  return y;
}

// Returns (dh, ds, dt); a gradient that is not needed is an empty tensor. ds, dt are float32.
std::vector<at::Tensor> red_bwd(const at::Tensor& g, const OptTensor& h, const OptTensor& scale, bool need_dh,
                                bool need_ds, bool need_dt) {
  TORCH_CHECK_VALUE(on_kernel_device(g) && g.dim() == 2 && unit_cols(g), "red_bwd: g must be a CUDA (n, d) matrix ",
                    "with unit column stride");
  const c10::cuda::CUDAGuard guard(g.device());
  const int64_t n = g.size(0), d = g.size(1);
  TORCH_CHECK_VALUE(!need_ds || (h.has_value() && h->sizes() == g.sizes() && unit_cols(*h) &&
                                 h->scalar_type() == g.scalar_type()),
                    "red_bwd: need_ds requires h shaped and typed like g, with unit column stride");
  if (h.has_value()) check_cuda(*h, g, "h");
  std::optional<at::ScalarType> pdt;
  check_param(scale, g, {d}, "scale", pdt);
  auto dh = need_dh ? at::empty({n, d}, g.options()) : at::empty({0}, g.options());
  at::Tensor ds = need_ds ? f32_empty({d}, g) : f32_empty({0}, g);
  at::Tensor dt = need_dt ? f32_empty({d}, g) : f32_empty({0}, g);
  if (n == 0) {
    if (need_ds) ds.zero_();
    if (need_dt) dt.zero_();
    return {dh, ds, dt};
  }
  dispatch_dtypes(g.scalar_type(), pdt.value_or(g.scalar_type()), "red_bwd", [&](auto tt, auto tw) {
    using T = typename decltype(tt)::type;
    using W = typename decltype(tw)::type;
    constexpr int V = vec_of<T>();
    const int64_t rpb = red_bwd_rows_per_block<T, W>(n, d, sm_count(g));  // one wave at the kernel's occupancy
    const int64_t blocks = cdiv(n, rpb);
    at::Tensor ds_part = need_ds ? f32_empty({blocks, d}, g) : at::Tensor();
    at::Tensor dt_part = need_dt ? f32_empty({blocks, d}, g) : at::Tensor();
    RedBwdParams p{};
    p.g = g.data_ptr();
    p.h = need_ds ? h->data_ptr() : nullptr;
    p.scale = ptr_or_null(scale);
    p.dh = need_dh ? dh.data_ptr() : nullptr;
    p.ds_part = need_ds ? ds_part.data_ptr<float>() : nullptr;
    p.dt_part = need_dt ? dt_part.data_ptr<float>() : nullptr;
    p.n_rows = n;
    p.d = d;
    p.g_row_stride = g.stride(0);
    p.h_row_stride = need_ds ? h->stride(0) : 0;
    p.dh_row_stride = d;
    p.rows_per_block = rpb;
    p.vec_ok = aligned(p.g, 16) && g.stride(0) % V == 0 && d % V == 0 && (!p.dh || aligned(p.dh, 16)) &&
               (!p.h || (aligned(p.h, 16) && h->stride(0) % V == 0)) &&
               (!p.scale || aligned(p.scale, V * sizeof(W)));
    auto stream = c10::cuda::getCurrentCUDAStream();
    launch_red_bwd<T, W>(p, stream);
    if (need_ds) launch_partial_sum(p.ds_part, blocks, d, 1.f, ds.data_ptr<float>(), stream);
    if (need_dt) launch_partial_sum(p.dt_part, blocks, d, 1.f, dt.data_ptr<float>(), stream);
  });
  return {dh, ds, dt};
}

// ------------------------------------------------------------------------------ low-rank edit

struct Weights {
  OptTensor A, a, P, c;
  at::Tensor B;
  at::ScalarType dtype;
};

Weights check_weights(const at::Tensor& ref, int64_t d, const OptTensor& A, const OptTensor& a, const at::Tensor& B,
                      const OptTensor& P, const OptTensor& c) {
  TORCH_CHECK_VALUE(B.dim() == 2 && B.size(1) == d && B.size(0) >= 1 && B.size(0) <= kMaxRank,
                    "lowrank_edit: B must have shape (r, ", d, ") with 1 <= r <= ", kMaxRank, ", got ", B.sizes());
  const int64_t r = B.size(0);
  std::optional<at::ScalarType> pdt;
  check_param(B, ref, {r, d}, "B", pdt);
  check_param(A, ref, {r, d}, "A", pdt);
  check_param(P, ref, {r, d}, "C", pdt);
  check_param(a, ref, {r}, "a", pdt);
  check_param(c, ref, {r}, "c", pdt);
  return {A, a, P, c, B, *pdt};
}

void check_index(const OptTensor& idx, const at::Tensor& ref, int64_t n) {
  if (!idx.has_value()) return;
  check_cuda(*idx, ref, "index");
  TORCH_CHECK_VALUE(idx->scalar_type() == at::kLong && idx->dim() == 1 && idx->size(0) == n && idx->is_contiguous(),
                    "index must be a contiguous int64 vector of length ", n);
}

// Forward. Launch row i reads row idx[i] (or i) of h at element offset row * h_row_stride and
// writes y likewise; y may be h itself (in place, with idx). Returns (z, u, hsave): z (n, r)
// fp32; u (n, r) fp32 when save_u, else empty; hsave (n, d) in h's dtype when save_h, else empty.
std::vector<at::Tensor> lowrank_edit_fwd(const at::Tensor& h, const at::Tensor& y, const OptTensor& idx, int64_t n,
                                         int64_t d, int64_t h_row_stride, int64_t h_col_stride, int64_t y_row_stride,
                                         int64_t y_col_stride, const OptTensor& A, const OptTensor& a,
                                         const at::Tensor& B, const OptTensor& P, const OptTensor& c, int64_t act,
                                         bool save_h, bool save_u) {
  TORCH_CHECK_VALUE(on_kernel_device(h), "lowrank_edit_fwd: h must be a CUDA tensor");
  check_cuda(y, h, "y");
  TORCH_CHECK_TYPE(y.scalar_type() == h.scalar_type(), "lowrank_edit_fwd: y must have h's dtype");
  TORCH_CHECK_VALUE(act >= 0 && act < kNumActivations, "lowrank_edit_fwd: unknown activation code ", act);
  const c10::cuda::CUDAGuard guard(h.device());
  const Weights w = check_weights(h, d, A, a, B, P, c);
  const int64_t r = B.size(0);
  check_index(idx, h, n);
  if (!idx.has_value()) {
    check_rows(h, n, d, h_row_stride, h_col_stride, "h");
    check_rows(y, n, d, y_row_stride, y_col_stride, "y");
  }  // with an index, its entries (validated in Python, < the row count of h) pick the rows
  at::Tensor z = f32_empty({n, r}, h);
  at::Tensor u = save_u ? f32_empty({n, r}, h) : f32_empty({0}, h);
  at::Tensor hsave = save_h ? at::empty({n, d}, h.options()) : at::empty({0}, h.options());
  if (n == 0) return {z, u, hsave};
  dispatch_dtypes(h.scalar_type(), w.dtype, "lowrank_edit_fwd", [&](auto tt, auto tw) {
    using T = typename decltype(tt)::type;
    using W = typename decltype(tw)::type;
    constexpr int V = vec_of<T>();
    LowrankFwdParams p{};
    p.h = h.data_ptr();
    p.y = y.data_ptr();
    p.hsave = save_h ? hsave.data_ptr() : nullptr;
    p.idx = idx.has_value() ? idx->data_ptr<int64_t>() : nullptr;
    p.A = ptr_or_null(A);
    p.a = ptr_or_null(a);
    p.B = B.data_ptr();
    p.P = ptr_or_null(P);
    p.c = ptr_or_null(c);
    p.z = z.data_ptr<float>();
    p.u = save_u ? u.data_ptr<float>() : nullptr;
    p.n_rows = n;
    p.d = d;
    p.r = r;
    p.h_row_stride = h_row_stride;
    p.h_col_stride = h_col_stride;
    p.y_row_stride = y_row_stride;
    p.y_col_stride = y_col_stride;
    p.act = static_cast<int>(act);
    p.vec_ok = aligned(p.h, 16) && aligned(p.y, 16) && h_col_stride == 1 && y_col_stride == 1 &&
               h_row_stride % V == 0 && y_row_stride % V == 0 && (!save_h || d % V == 0);
    p.wvec_ok = weights_vec_ok(d, V, sizeof(W), p.A, p.B, p.P);
    launch_lowrank_edit_fwd<T, W>(p, c10::cuda::getCurrentCUDAStream());
  });
  return {z, u, hsave};
}

// The backward's input checks (both kernels' entry points); returns the weights' dtype.
Weights check_bwd_inputs(const at::Tensor& g, const OptTensor& dh, const OptTensor& idx, int64_t n, int64_t d,
                         int64_t g_row_stride, int64_t g_col_stride, int64_t dh_row_stride, int64_t dh_col_stride,
                         const at::Tensor& x, const OptTensor& A, const at::Tensor& B, const OptTensor& P,
                         const at::Tensor& z, const OptTensor& u, int64_t act, bool tied, bool need_dA, bool need_dC) {
  TORCH_CHECK_VALUE(on_kernel_device(g), "lowrank_edit_bwd: g must be a CUDA tensor");
  TORCH_CHECK_VALUE(act >= 0 && act < kNumActivations, "lowrank_edit_bwd: unknown activation code ", act);
  const Weights w = check_weights(g, d, A, OptTensor(), B, P, OptTensor());
  const int64_t r = B.size(0);
  check_index(idx, g, n);
  check_cuda(x, g, "x");
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(0) == n && x.size(1) == d && x.scalar_type() == g.scalar_type(),
                    "lowrank_edit_bwd: x must be (", n, ", ", d, ") in g's dtype, got ", x.sizes());
  TORCH_CHECK_VALUE(on_kernel_device(z) && z.scalar_type() == at::kFloat && z.sizes() == at::IntArrayRef({n, r}) &&
                        z.is_contiguous(),
                    "lowrank_edit_bwd: z must be contiguous float32 (n, r)");
  const bool has_u = act != 0;
  TORCH_CHECK_VALUE(!has_u || (u.has_value() && u->scalar_type() == at::kFloat &&
                               u->sizes() == at::IntArrayRef({n, r}) && u->is_contiguous()),
                    "lowrank_edit_bwd: a non-identity activation needs u, contiguous float32 (n, r)");
  TORCH_CHECK_VALUE(!need_dA || A.has_value(), "lowrank_edit_bwd: need_dA without A");
  TORCH_CHECK_VALUE(!need_dC || (P.has_value() && !tied), "lowrank_edit_bwd: need_dC without an untied C");
  TORCH_CHECK_VALUE(!tied || (P.has_value() && P->data_ptr() == B.data_ptr()), "lowrank_edit_bwd: tied needs P = B");
  if (dh.has_value()) {
    check_cuda(*dh, g, "dh");
    TORCH_CHECK_TYPE(dh->scalar_type() == g.scalar_type(), "lowrank_edit_bwd: dh must have g's dtype");
  }
  if (!idx.has_value()) {
    check_rows(g, n, d, g_row_stride, g_col_stride, "g");
    if (dh.has_value()) check_rows(*dh, n, d, dh_row_stride, dh_col_stride, "dh");
  }
  return w;
}

// The backward's outputs, allocated alike by both entry points: gz, ga (n, r) fp32 (ga empty for
// the identity activation) and the (r, d) fp32 weight gradients (empty when not needed; zeroed
// when n == 0, where nothing is launched).
struct BwdOutputs {
  at::Tensor gz, ga, dA, dB, dC;
  std::vector<at::Tensor> list() const { return {gz, ga, dA, dB, dC}; }
};

BwdOutputs bwd_outputs(const at::Tensor& g, int64_t n, int64_t d, int64_t r, bool has_u, bool need_dA, bool need_dB,
                       bool need_dC) {
  auto grad_out = [&](bool need) { return need ? f32_empty({r, d}, g) : f32_empty({0}, g); };
  BwdOutputs o{f32_empty({n, r}, g), has_u ? f32_empty({n, r}, g) : f32_empty({0}, g), grad_out(need_dA),
               grad_out(need_dB), grad_out(need_dC)};
  if (n == 0)
    for (auto* t : {&o.dA, &o.dB, &o.dC})
      if (t->numel() > 0) t->zero_();
  return o;
}

// The fields of LowrankBwdParams that both backward kernels read: every pointer, size and stride
// but the partial buffers and the row split, and the 16-byte access flags for T and W.
template <typename T, typename W>
void fill_bwd_params(LowrankBwdParams& p, const at::Tensor& g, const OptTensor& dh, const OptTensor& idx, int64_t n,
                     int64_t d, int64_t r, int64_t g_row_stride, int64_t g_col_stride, int64_t dh_row_stride,
                     int64_t dh_col_stride, const at::Tensor& x, const OptTensor& A, const at::Tensor& B,
                     const OptTensor& P, const at::Tensor& z, const OptTensor& u, const BwdOutputs& out, int64_t act,
                     bool tied) {
  constexpr int V = vec_of<T>();
  const bool has_u = act != 0;
  p.g = g.data_ptr();
  p.x = x.data_ptr();
  p.dh = dh.has_value() ? dh->data_ptr() : nullptr;
  p.idx = idx.has_value() ? idx->data_ptr<int64_t>() : nullptr;
  p.A = ptr_or_null(A);
  p.B = B.data_ptr();
  p.P = ptr_or_null(P);
  p.z = z.data_ptr<float>();
  p.u = has_u ? u->data_ptr<float>() : nullptr;
  p.gz = out.gz.data_ptr<float>();
  p.ga = has_u ? out.ga.data_ptr<float>() : nullptr;
  p.n_rows = n;
  p.d = d;
  p.r = r;
  p.g_row_stride = g_row_stride;
  p.g_col_stride = g_col_stride;
  p.x_row_stride = x.stride(0);
  p.x_col_stride = x.stride(1);
  p.dh_row_stride = dh_row_stride;
  p.dh_col_stride = dh_col_stride;
  p.act = static_cast<int>(act);
  p.tied = tied;
  p.vec_ok = aligned(p.g, 16) && g_col_stride == 1 && g_row_stride % V == 0 &&
             (!p.dh || (aligned(p.dh, 16) && dh_col_stride == 1 && dh_row_stride % V == 0));
  p.wvec_ok = weights_vec_ok(d, V, sizeof(W), p.A, p.B, p.P);
}

// Backward. g rows (and dh rows, when dh is given) follow idx like the forward's h rows; x holds
// the n input rows densely. Returns (gz, ga, dA, dB, dC) as fp32: gz, ga (n, r) (ga empty for the
// identity activation), the (r, d) weight gradients or empty tensors when not needed.
std::vector<at::Tensor> lowrank_edit_bwd(const at::Tensor& g, const OptTensor& dh, const OptTensor& idx, int64_t n,
                                         int64_t d, int64_t g_row_stride, int64_t g_col_stride, int64_t dh_row_stride,
                                         int64_t dh_col_stride, const at::Tensor& x, const OptTensor& A,
                                         const at::Tensor& B, const OptTensor& P, const at::Tensor& z,
                                         const OptTensor& u, int64_t act, bool tied, bool need_dA, bool need_dB,
                                         bool need_dC) {
  const Weights w = check_bwd_inputs(g, dh, idx, n, d, g_row_stride, g_col_stride, dh_row_stride, dh_col_stride, x, A,
                                     B, P, z, u, act, tied, need_dA, need_dC);
  const c10::cuda::CUDAGuard guard(g.device());
  const int64_t r = B.size(0);
  const BwdOutputs out = bwd_outputs(g, n, d, r, act != 0, need_dA, need_dB, need_dC);
  if (n == 0) return out.list();
  dispatch_dtypes(g.scalar_type(), w.dtype, "lowrank_edit_bwd", [&](auto tt, auto tw) {
    using T = typename decltype(tt)::type;
    using W = typename decltype(tw)::type;
    const int64_t rpb = lowrank_edit_bwd_params_rows_per_block<T>(n, d, r, tied, sm_count(g));
    const int64_t blocks = cdiv(n, rpb);
    auto part = [&](bool need) { return need ? f32_empty({blocks, r, d}, g) : at::Tensor(); };
    at::Tensor dA_part = part(need_dA), dB_part = part(need_dB), dC_part = part(need_dC);
    LowrankBwdParams p{};
    fill_bwd_params<T, W>(p, g, dh, idx, n, d, r, g_row_stride, g_col_stride, dh_row_stride, dh_col_stride, x, A, B, P,
                          z, u, out, act, tied);
    p.dA_part = need_dA ? dA_part.data_ptr<float>() : nullptr;
    p.dB_part = need_dB ? dB_part.data_ptr<float>() : nullptr;
    p.dC_part = need_dC ? dC_part.data_ptr<float>() : nullptr;
    p.rows_per_block = rpb;
    auto stream = c10::cuda::getCurrentCUDAStream();
    launch_lowrank_edit_bwd_dh<T, W>(p, stream);
    launch_lowrank_edit_bwd_params<T>(p, stream);
    if (need_dA) launch_partial_sum(p.dA_part, blocks, r * d, 1.f, out.dA.data_ptr<float>(), stream);
    if (need_dB) launch_partial_sum(p.dB_part, blocks, r * d, 1.f, out.dB.data_ptr<float>(), stream);
    if (need_dC) launch_partial_sum(p.dC_part, blocks, r * d, -1.f, out.dC.data_ptr<float>(), stream);
  });
  return out.list();
}

// The one-pass cluster backward (lowrank_edit_bwd_cluster.cu) for (d, r) on `like`'s device:
// (cluster size, threads per CTA, columns per CTA, rank chunk); cluster size 0 where the kernel does
// not apply (r > 16, d > 4096 or a `cluster_size` that does not fit; a device below sm_90, or a
// build without sm_90 code). `cluster_size` 0 lets the plan choose.
std::vector<int64_t> lowrank_edit_bwd_cluster_plan(const at::Tensor& like, int64_t d, int64_t r, int64_t cluster_size) {
  TORCH_CHECK_VALUE(on_kernel_device(like), "lowrank_edit_bwd_cluster_plan: like must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(like.device());
  LowrankBwdClusterPlan plan = lowrank_bwd_cluster_plan(d, r, cluster_size);
  if (plan.cluster_size > 0 && !lowrank_bwd_cluster_device_ok(like.device().index())) plan.cluster_size = 0;
  return {plan.cluster_size, plan.threads, plan.slice, plan.rank_chunk};
}

// Backward in one pass with thread-block clusters: the arguments and outputs of lowrank_edit_bwd,
// plus `cluster_size` and `max_clusters` (0: chosen here; tests and tuning may set them). Raises
// ValueError where lowrank_edit_bwd_cluster_plan says the kernel does not apply.
std::vector<at::Tensor> lowrank_edit_bwd_cluster(const at::Tensor& g, const OptTensor& dh, const OptTensor& idx,
                                                 int64_t n, int64_t d, int64_t g_row_stride, int64_t g_col_stride,
                                                 int64_t dh_row_stride, int64_t dh_col_stride, const at::Tensor& x,
                                                 const OptTensor& A, const at::Tensor& B, const OptTensor& P,
                                                 const at::Tensor& z, const OptTensor& u, int64_t act, bool tied,
                                                 bool need_dA, bool need_dB, bool need_dC, int64_t cluster_size,
                                                 int64_t max_clusters) {
  const Weights w = check_bwd_inputs(g, dh, idx, n, d, g_row_stride, g_col_stride, dh_row_stride, dh_col_stride, x, A,
                                     B, P, z, u, act, tied, need_dA, need_dC);
  const c10::cuda::CUDAGuard guard(g.device());
  const int64_t r = B.size(0);
  const LowrankBwdClusterPlan plan = lowrank_bwd_cluster_plan(d, r, cluster_size);
  TORCH_CHECK_VALUE(plan.cluster_size > 0, "lowrank_edit_bwd_cluster: takes r <= ", kClusterMaxRank, " and d <= ",
                    kClusterMaxWidth, " (at most ", kClusterMaxSlice, " columns per CTA), got r = ", r, ", d = ", d,
                    ", cluster_size = ", cluster_size);
  TORCH_CHECK_VALUE(lowrank_bwd_cluster_device_ok(g.device().index()),
                    "lowrank_edit_bwd_cluster: needs a device of compute capability 9.0 or newer and a build with "
                    "sm_90 code");
  const BwdOutputs out = bwd_outputs(g, n, d, r, act != 0, need_dA, need_dB, need_dC);
  if (n == 0) return out.list();
  dispatch_dtypes(g.scalar_type(), w.dtype, "lowrank_edit_bwd_cluster", [&](auto tt, auto tw) {
    using T = typename decltype(tt)::type;
    using W = typename decltype(tw)::type;
    constexpr int V = vec_of<T>();
    LowrankBwdClusterParams cp{};
    LowrankBwdParams& p = cp.b;
    fill_bwd_params<T, W>(p, g, dh, idx, n, d, r, g_row_stride, g_col_stride, dh_row_stride, dh_col_stride, x, A, B, P,
                          z, u, out, act, tied);
    cp.slice = plan.slice;
    cp.n_row_blocks = cdiv(n, kClusterRows);
    cp.x_vec_ok = aligned(p.x, 16) && x.stride(1) == 1 && x.stride(0) % V == 0;
    const int64_t clusters = lowrank_bwd_cluster_count<T, W>(
        plan, cp.n_row_blocks, cluster_stages_x(need_dA, need_dB, need_dC, tied), max_clusters);
    auto part = [&](bool need) { return need ? f32_empty({clusters, r, d}, g) : at::Tensor(); };
    at::Tensor dA_part = part(need_dA), dB_part = part(need_dB), dC_part = part(need_dC);
    p.dA_part = need_dA ? dA_part.data_ptr<float>() : nullptr;
    p.dB_part = need_dB ? dB_part.data_ptr<float>() : nullptr;
    p.dC_part = need_dC ? dC_part.data_ptr<float>() : nullptr;
    auto stream = c10::cuda::getCurrentCUDAStream();
    launch_lowrank_edit_bwd_cluster<T, W>(cp, plan, clusters, stream);
    if (need_dA) launch_partial_sum(p.dA_part, clusters, r * d, 1.f, out.dA.data_ptr<float>(), stream);
    if (need_dB) launch_partial_sum(p.dB_part, clusters, r * d, 1.f, out.dB.data_ptr<float>(), stream);
    if (need_dC) launch_partial_sum(p.dC_part, clusters, r * d, -1.f, out.dC.data_ptr<float>(), stream);
  });
  return out.list();
}

}  // namespace
}  // namespace reft

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA C++ kernels of reft_kernels (low-level; use the reft_kernels.* functions)";
  m.def("red_fwd", &reft::red_fwd, "RED forward: y = h * scale + bias");
  m.def("red_bwd", &reft::red_bwd, "RED backward: (dh, dscale fp32, dbias fp32)");
  m.def("lowrank_edit_fwd", &reft::lowrank_edit_fwd, "low-rank edit forward: (z, u, hsave)");
  m.def("lowrank_edit_bwd", &reft::lowrank_edit_bwd, "low-rank edit backward: (gz, ga, dA, dB, dC)");
  m.def("lowrank_edit_bwd_cluster", &reft::lowrank_edit_bwd_cluster,
        "low-rank edit backward in one pass with thread-block clusters (sm_90): (gz, ga, dA, dB, dC)");
  m.def("lowrank_edit_bwd_cluster_plan", &reft::lowrank_edit_bwd_cluster_plan,
        "(cluster size, threads, columns per CTA, rank chunk) of the cluster backward; cluster size 0: not taken");
  // checked against reft_kernels/_constants.py when the extension is loaded
  m.attr("MAX_RANK") = reft::kMaxRank;
  m.attr("NUM_ACTIVATIONS") = reft::kNumActivations;
}
