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

// Returns (dh, ds, dt); a gradient that is not needed is an empty tensor. ds, dt are float32,
// finished from per-row-block partials by the fixed-order sum; `finish_split`: its split kernel
// (PartialSumParams::split; Python passes kernels(cuda_finish=...)).
std::vector<at::Tensor> red_bwd(const at::Tensor& g, const OptTensor& h, const OptTensor& scale, bool need_dh,
                                bool need_ds, bool need_dt, bool finish_split) {
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
    p.finish_split = finish_split;
    auto stream = c10::cuda::getCurrentCUDAStream();
    launch_red_bwd<T, W>(p, stream);
    if (need_ds) launch_partial_sum({p.ds_part, ds.data_ptr<float>(), blocks, d, 1.f, p.finish_split}, stream);
    if (need_dt) launch_partial_sum({p.dt_part, dt.data_ptr<float>(), blocks, d, 1.f, p.finish_split}, stream);
  });
  return {dh, ds, dt};
}

// ------------------------------------------------------------------------------ low-rank edit
//
// The low-rank entry points take their arguments as a few records that mirror the parameter
// structs of reft_params.h (every integer int64):
//   weights  Tensor?[]: forward [A, a, B, P, c], backward [A, B, P]; None where a term is absent,
//            B always given; P is C, or B itself when tied.
//   rows     int[6]: [n, d, in_row_stride, in_col_stride, out_row_stride, out_col_stride]: the
//            launch's rows and width, and the element strides of the rows read (h; g) and of the
//            rows written (y; dh). Launch row i is row idx[i] of those tensors when idx is given.
//   flags    int[]: forward [act, save_h, save_u]; backward [act, tied, need_dA, need_da, need_dB,
//            need_dC, need_dc, params_vector, finish_split], the last two the kernel choices of
//            reft_kernels.kernels(cuda_params=..., cuda_finish=...).
// reft_kernels/ops/lowrank_edit/cuda_impl.py builds them; a record of the wrong length raises.

struct Weights {
  OptTensor A, a, P, c;
  at::Tensor B;
  at::ScalarType dtype;
};

// The weights on ref's device, of one dtype, B (r, d) with 1 <= r <= kMaxRank, A and P (r, d), a
// and c (r,).
Weights check_weights(const at::Tensor& ref, int64_t d, const OptTensor& A, const OptTensor& a, const OptTensor& B,
                      const OptTensor& P, const OptTensor& c, const char* op) {
  TORCH_CHECK_VALUE(B.has_value(), op, ": the weights must include B");
  TORCH_CHECK_VALUE(B->dim() == 2 && B->size(1) == d && B->size(0) >= 1 && B->size(0) <= kMaxRank, op,
                    ": B must have shape (r, ", d, ") with 1 <= r <= ", kMaxRank, ", got ", B->sizes());
  const int64_t r = B->size(0);
  std::optional<at::ScalarType> pdt;
  check_param(B, ref, {r, d}, "B", pdt);
  check_param(A, ref, {r, d}, "A", pdt);
  check_param(P, ref, {r, d}, "C", pdt);
  check_param(a, ref, {r}, "a", pdt);
  check_param(c, ref, {r}, "c", pdt);
  return {A, a, P, c, *B, *pdt};
}

void check_index(const OptTensor& idx, const at::Tensor& ref, int64_t n) {
  if (!idx.has_value()) return;
  check_cuda(*idx, ref, "index");
  TORCH_CHECK_VALUE(idx->scalar_type() == at::kLong && idx->dim() == 1 && idx->size(0) == n && idx->is_contiguous(),
                    "index must be a contiguous int64 vector of length ", n);
}

void check_act(int64_t act, const char* op) {
  TORCH_CHECK_VALUE(act >= 0 && act < kNumActivations, op, ": unknown activation code ", act);
}

// The `rows` record.
struct Rows {
  int64_t n, d, in_row, in_col, out_row, out_col;
};

Rows rows_arg(const std::vector<int64_t>& v, const char* op) {
  TORCH_CHECK_VALUE(v.size() == 6, op, ": rows must be [n, d, in_row_stride, in_col_stride, out_row_stride, ",
                    "out_col_stride], got ", v.size(), " values");
  TORCH_CHECK_VALUE(v[0] >= 0 && v[1] >= 0, op, ": rows: n and d must be >= 0, got n = ", v[0], ", d = ", v[1]);
  return {v[0], v[1], v[2], v[3], v[4], v[5]};
}

// The forward's `flags` record.
struct FwdFlags {
  int act;
  bool save_h, save_u;
};

FwdFlags fwd_flags(const std::vector<int64_t>& v) {
  TORCH_CHECK_VALUE(v.size() == 3, "lowrank_edit_fwd: flags must be [act, save_h, save_u], got ", v.size(),
                    " values");
  check_act(v[0], "lowrank_edit_fwd");
  return {static_cast<int>(v[0]), v[1] != 0, v[2] != 0};
}

// Forward. Launch row i reads row idx[i] (or i) of h at element offset row * in_row_stride and
// writes y likewise; y may be h itself (in place, with idx). Returns (z, u, hsave): z (n, r)
// fp32; u (n, r) fp32 when save_u, else empty; hsave (n, d) in h's dtype when save_h, else empty.
std::vector<at::Tensor> lowrank_edit_fwd(const at::Tensor& h, const at::Tensor& y, const OptTensor& idx,
                                         const std::vector<OptTensor>& weights, const std::vector<int64_t>& rows,
                                         const std::vector<int64_t>& flags) {
  TORCH_CHECK_VALUE(on_kernel_device(h), "lowrank_edit_fwd: h must be a CUDA tensor");
  check_cuda(y, h, "y");
  TORCH_CHECK_TYPE(y.scalar_type() == h.scalar_type(), "lowrank_edit_fwd: y must have h's dtype");
  const Rows rw = rows_arg(rows, "lowrank_edit_fwd");
  const FwdFlags f = fwd_flags(flags);
  TORCH_CHECK_VALUE(weights.size() == 5, "lowrank_edit_fwd: weights must be [A, a, B, P, c], got ", weights.size(),
                    " entries");
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t n = rw.n, d = rw.d;
  const Weights w = check_weights(h, d, weights[0], weights[1], weights[2], weights[3], weights[4], "lowrank_edit_fwd");
  const int64_t r = w.B.size(0);
  check_index(idx, h, n);
  if (!idx.has_value()) {
    check_rows(h, n, d, rw.in_row, rw.in_col, "h");
    check_rows(y, n, d, rw.out_row, rw.out_col, "y");
  }  // with an index, its entries (validated in Python, < the row count of h) pick the rows
  at::Tensor z = f32_empty({n, r}, h);
  at::Tensor u = f.save_u ? f32_empty({n, r}, h) : f32_empty({0}, h);
  at::Tensor hsave = f.save_h ? at::empty({n, d}, h.options()) : at::empty({0}, h.options());
  if (n == 0) return {z, u, hsave};
  dispatch_dtypes(h.scalar_type(), w.dtype, "lowrank_edit_fwd", [&](auto tt, auto tw) {
    using T = typename decltype(tt)::type;
    using W = typename decltype(tw)::type;
    constexpr int V = vec_of<T>();
    LowrankFwdParams p{};
    p.h = h.data_ptr();
    p.y = y.data_ptr();
    p.hsave = f.save_h ? hsave.data_ptr() : nullptr;
    p.idx = idx.has_value() ? idx->data_ptr<int64_t>() : nullptr;
    p.A = ptr_or_null(w.A);
    p.a = ptr_or_null(w.a);
    p.B = w.B.data_ptr();
    p.P = ptr_or_null(w.P);
    p.c = ptr_or_null(w.c);
    p.z = z.data_ptr<float>();
    p.u = f.save_u ? u.data_ptr<float>() : nullptr;
    p.n_rows = n;
    p.d = d;
    p.r = r;
    p.h_row_stride = rw.in_row;
    p.h_col_stride = rw.in_col;
    p.y_row_stride = rw.out_row;
    p.y_col_stride = rw.out_col;
    p.act = f.act;
    p.vec_ok = aligned(p.h, 16) && aligned(p.y, 16) && rw.in_col == 1 && rw.out_col == 1 && rw.in_row % V == 0 &&
               rw.out_row % V == 0 && (!f.save_h || d % V == 0);
    p.wvec_ok = weights_vec_ok(d, V, sizeof(W), p.A, p.B, p.P);
    launch_lowrank_edit_fwd<T, W>(p, c10::cuda::getCurrentCUDAStream());
  });
  return {z, u, hsave};
}

// The backward's `flags` record.
struct BwdFlags {
  int act;
  bool tied, need_dA, need_da, need_dB, need_dC, need_dc;
  bool params_vector, finish_split;  // kernel choices: LowrankBwdParams
};

BwdFlags bwd_flags(const std::vector<int64_t>& v, const char* op) {
  TORCH_CHECK_VALUE(v.size() == 9, op, ": flags must be [act, tied, need_dA, need_da, need_dB, need_dC, need_dc, ",
                    "params_vector, finish_split], got ", v.size(), " values");
  check_act(v[0], op);
  return {static_cast<int>(v[0]), v[1] != 0, v[2] != 0, v[3] != 0, v[4] != 0, v[5] != 0, v[6] != 0, v[7] != 0,
          v[8] != 0};
}

// The backward's arguments after their checks, shared by both entry points.
struct BwdArgs {
  at::Tensor g, x, z;
  OptTensor dh, idx, u;
  Weights w;
  Rows rows;
  BwdFlags f;
  int64_t r;
};

BwdArgs bwd_args(const at::Tensor& g, const OptTensor& dh, const OptTensor& idx, const at::Tensor& x,
                 const std::vector<OptTensor>& weights, const at::Tensor& z, const OptTensor& u,
                 const std::vector<int64_t>& rows, const std::vector<int64_t>& flags, const char* op) {
  TORCH_CHECK_VALUE(on_kernel_device(g), op, ": g must be a CUDA tensor");
  const Rows rw = rows_arg(rows, op);
  const BwdFlags f = bwd_flags(flags, op);
  const int64_t n = rw.n, d = rw.d;
  TORCH_CHECK_VALUE(weights.size() == 3, op, ": weights must be [A, B, P], got ", weights.size(), " entries");
  const OptTensor &A = weights[0], &B = weights[1], &P = weights[2];
  const Weights w = check_weights(g, d, A, OptTensor(), B, P, OptTensor(), op);
  const int64_t r = w.B.size(0);
  check_index(idx, g, n);
  check_cuda(x, g, "x");
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(0) == n && x.size(1) == d && x.scalar_type() == g.scalar_type(), op,
                    ": x must be (", n, ", ", d, ") in g's dtype, got ", x.sizes());
  TORCH_CHECK_VALUE(on_kernel_device(z) && z.scalar_type() == at::kFloat && z.sizes() == at::IntArrayRef({n, r}) &&
                        z.is_contiguous(),
                    op, ": z must be contiguous float32 (n, r)");
  const bool has_u = f.act != 0;
  TORCH_CHECK_VALUE(!has_u || (u.has_value() && u->scalar_type() == at::kFloat &&
                               u->sizes() == at::IntArrayRef({n, r}) && u->is_contiguous()),
                    op, ": a non-identity activation needs u, contiguous float32 (n, r)");
  TORCH_CHECK_VALUE(!f.need_dA || A.has_value(), op, ": need_dA without A");
  TORCH_CHECK_VALUE(!f.need_dC || (P.has_value() && !f.tied), op, ": need_dC without an untied C");
  TORCH_CHECK_VALUE(!f.tied || (P.has_value() && P->data_ptr() == w.B.data_ptr()), op, ": tied needs P = B");
  if (dh.has_value()) {
    check_cuda(*dh, g, "dh");
    TORCH_CHECK_TYPE(dh->scalar_type() == g.scalar_type(), op, ": dh must have g's dtype");
  }
  if (!idx.has_value()) {
    check_rows(g, n, d, rw.in_row, rw.in_col, "g");
    if (dh.has_value()) check_rows(*dh, n, d, rw.out_row, rw.out_col, "dh");
  }
  return {g, x, z, dh, idx, has_u ? u : OptTensor(), w, rw, f, r};
}

// The backward's outputs, allocated alike by both entry points: gz, ga (n, r) fp32 (ga empty for
// the identity activation; scratch for the kernels, not returned) and the fp32 parameter
// gradients, (r, d) per matrix and (r,) per bias (empty when not needed; zeroed when n == 0,
// where nothing is launched).
struct BwdOutputs {
  at::Tensor gz, ga, dA, da, dB, dC, dc;
  std::vector<at::Tensor> list() const { return {dA, da, dB, dC, dc}; }
};

BwdOutputs bwd_outputs(const BwdArgs& a) {
  const int64_t n = a.rows.n, d = a.rows.d, r = a.r;
  auto grad = [&](bool need, at::IntArrayRef shape) { return need ? f32_empty(shape, a.g) : f32_empty({0}, a.g); };
  BwdOutputs o;
  o.gz = f32_empty({n, r}, a.g);
  o.ga = grad(a.u.has_value(), {n, r});
  o.dA = grad(a.f.need_dA, {r, d});
  o.da = grad(a.f.need_da, {r});
  o.dB = grad(a.f.need_dB, {r, d});
  o.dC = grad(a.f.need_dC, {r, d});
  o.dc = grad(a.f.need_dc, {r});
  if (n == 0)
    for (auto* t : {&o.dA, &o.da, &o.dB, &o.dC, &o.dc})
      if (t->numel() > 0) t->zero_();
  return o;
}

// The fields of LowrankBwdParams that every backward kernel reads: every pointer, size and
// stride but the partial buffers and the row split, the 16-byte access flags for T and W, and
// the kernel choices.
template <typename T, typename W>
void fill_bwd_params(LowrankBwdParams& p, const BwdArgs& a, const BwdOutputs& out) {
  constexpr int V = vec_of<T>();
  const Rows& rw = a.rows;
  p.g = a.g.data_ptr();
  p.x = a.x.data_ptr();
  p.dh = a.dh.has_value() ? a.dh->data_ptr() : nullptr;
  p.idx = a.idx.has_value() ? a.idx->data_ptr<int64_t>() : nullptr;
  p.A = ptr_or_null(a.w.A);
  p.B = a.w.B.data_ptr();
  p.P = ptr_or_null(a.w.P);
  p.z = a.z.data_ptr<float>();
  p.u = a.u.has_value() ? a.u->data_ptr<float>() : nullptr;
  p.gz = out.gz.data_ptr<float>();
  p.ga = a.u.has_value() ? out.ga.data_ptr<float>() : nullptr;
  p.n_rows = rw.n;
  p.d = rw.d;
  p.r = a.r;
  p.g_row_stride = rw.in_row;
  p.g_col_stride = rw.in_col;
  p.x_row_stride = a.x.stride(0);
  p.x_col_stride = a.x.stride(1);
  p.dh_row_stride = rw.out_row;
  p.dh_col_stride = rw.out_col;
  p.act = a.f.act;
  p.tied = a.f.tied;
  p.vec_ok = aligned(p.g, 16) && rw.in_col == 1 && rw.in_row % V == 0 &&
             (!p.dh || (aligned(p.dh, 16) && rw.out_col == 1 && rw.out_row % V == 0));
  p.wvec_ok = weights_vec_ok(rw.d, V, sizeof(W), p.A, p.B, p.P);
  p.params_vector = a.f.params_vector;
  p.finish_split = a.f.finish_split;
}

// The fp32 partial buffers of the needed gradients, their pointers set in p: (mat_blocks, r, d)
// per matrix, (cdiv(n, p.rows_per_block), r) per bias. The caller keeps the returned tensors
// until the kernels that use them are queued.
std::vector<at::Tensor> bwd_partials(LowrankBwdParams& p, const BwdArgs& a, int64_t mat_blocks) {
  const int64_t r = a.r, d = a.rows.d, bias_blocks = cdiv(a.rows.n, p.rows_per_block);
  std::vector<at::Tensor> keep;
  auto part = [&](bool need, at::IntArrayRef shape) -> float* {
    if (!need) return nullptr;
    keep.push_back(f32_empty(shape, a.g));
    return keep.back().data_ptr<float>();
  };
  p.dA_part = part(a.f.need_dA, {mat_blocks, r, d});
  p.dB_part = part(a.f.need_dB, {mat_blocks, r, d});
  p.dC_part = part(a.f.need_dC, {mat_blocks, r, d});
  p.da_part = part(a.f.need_da, {bias_blocks, r});
  p.dc_part = part(a.f.need_dc, {bias_blocks, r});
  return keep;
}

// Every parameter gradient from its partials by the fixed-order sum (partial_sum.cu): the
// matrices over mat_blocks rows, the biases over the bias kernel's row blocks. dC's partials
// hold +gz^T x and dc's -sum gz already (lowrank_edit_bwd_bias_kernel).
void finish_bwd(const LowrankBwdParams& p, int64_t mat_blocks, const BwdOutputs& out, cudaStream_t stream) {
  const int64_t bias_blocks = cdiv(p.n_rows, p.rows_per_block);
  auto sum = [&](const float* part, int64_t blocks, int64_t width, float sign, const at::Tensor& to) {
    if (part != nullptr) launch_partial_sum({part, to.data_ptr<float>(), blocks, width, sign, p.finish_split}, stream);
  };
  sum(p.dA_part, mat_blocks, p.r * p.d, 1.f, out.dA);
  sum(p.dB_part, mat_blocks, p.r * p.d, 1.f, out.dB);
  sum(p.dC_part, mat_blocks, p.r * p.d, -1.f, out.dC);
  sum(p.da_part, bias_blocks, p.r, 1.f, out.da);
  sum(p.dc_part, bias_blocks, p.r, 1.f, out.dc);
}

// Backward with the split kernels: dh and the latents, then the parameter and bias partials,
// then their fixed-order sums. g rows (and dh rows, when dh is given) follow idx like the
// forward's h rows; x holds the n input rows densely. Returns (dA, da, dB, dC, dc), fp32, each
// empty when not needed.
std::vector<at::Tensor> lowrank_edit_bwd(const at::Tensor& g, const OptTensor& dh, const OptTensor& idx,
                                         const at::Tensor& x, const std::vector<OptTensor>& weights,
                                         const at::Tensor& z, const OptTensor& u, const std::vector<int64_t>& rows,
                                         const std::vector<int64_t>& flags) {
  const BwdArgs a = bwd_args(g, dh, idx, x, weights, z, u, rows, flags, "lowrank_edit_bwd");
  const c10::cuda::CUDAGuard guard(g.device());
  const BwdOutputs out = bwd_outputs(a);
  if (a.rows.n == 0) return out.list();
  dispatch_dtypes(g.scalar_type(), a.w.dtype, "lowrank_edit_bwd", [&](auto tt, auto tw) {
    using T = typename decltype(tt)::type;
    using W = typename decltype(tw)::type;
    LowrankBwdParams p{};
    fill_bwd_params<T, W>(p, a, out);
    p.rows_per_block = lowrank_edit_bwd_params_rows_per_block<T>(p, sm_count(g));
    const int64_t blocks = cdiv(p.n_rows, p.rows_per_block);
    const std::vector<at::Tensor> partials = bwd_partials(p, a, blocks);
    auto stream = c10::cuda::getCurrentCUDAStream();
    launch_lowrank_edit_bwd_dh<T, W>(p, stream);
    launch_lowrank_edit_bwd_params<T>(p, stream);
    launch_lowrank_edit_bwd_bias(p, stream);
    finish_bwd(p, blocks, out, stream);
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

// Backward in one pass with thread-block clusters: the arguments and outputs of lowrank_edit_bwd
// (params_vector is not read), plus `cluster` = [cluster size, clusters] (0: chosen here; tests
// and tuning may set them). The bias partials take one row block per cluster. Raises ValueError
// where lowrank_edit_bwd_cluster_plan says the kernel does not apply.
std::vector<at::Tensor> lowrank_edit_bwd_cluster(const at::Tensor& g, const OptTensor& dh, const OptTensor& idx,
                                                 const at::Tensor& x, const std::vector<OptTensor>& weights,
                                                 const at::Tensor& z, const OptTensor& u,
                                                 const std::vector<int64_t>& rows, const std::vector<int64_t>& flags,
                                                 const std::vector<int64_t>& cluster) {
  const BwdArgs a = bwd_args(g, dh, idx, x, weights, z, u, rows, flags, "lowrank_edit_bwd_cluster");
  TORCH_CHECK_VALUE(cluster.size() == 2 && cluster[0] >= 0 && cluster[1] >= 0,
                    "lowrank_edit_bwd_cluster: cluster must be [cluster_size, max_clusters], each >= 0 (0: chosen "
                    "here)");
  const c10::cuda::CUDAGuard guard(g.device());
  const int64_t n = a.rows.n, d = a.rows.d, r = a.r;
  const LowrankBwdClusterPlan plan = lowrank_bwd_cluster_plan(d, r, cluster[0]);
  TORCH_CHECK_VALUE(plan.cluster_size > 0, "lowrank_edit_bwd_cluster: takes r <= ", kClusterMaxRank, " and d <= ",
                    kClusterMaxWidth, " (at most ", kClusterMaxSlice, " columns per CTA), got r = ", r, ", d = ", d,
                    ", cluster_size = ", cluster[0]);
  TORCH_CHECK_VALUE(lowrank_bwd_cluster_device_ok(g.device().index()),
                    "lowrank_edit_bwd_cluster: needs a device of compute capability 9.0 or newer and a build with "
                    "sm_90 code");
  const BwdOutputs out = bwd_outputs(a);
  if (n == 0) return out.list();
  dispatch_dtypes(g.scalar_type(), a.w.dtype, "lowrank_edit_bwd_cluster", [&](auto tt, auto tw) {
    using T = typename decltype(tt)::type;
    using W = typename decltype(tw)::type;
    constexpr int V = vec_of<T>();
    LowrankBwdClusterParams cp{};
    LowrankBwdParams& p = cp.b;
    fill_bwd_params<T, W>(p, a, out);
    cp.slice = plan.slice;
    cp.n_row_blocks = cdiv(n, kClusterRows);
    cp.x_vec_ok = aligned(p.x, 16) && a.x.stride(1) == 1 && a.x.stride(0) % V == 0;
    const bool stage_x = cluster_stages_x(a.f.need_dA, a.f.need_dB, a.f.need_dC, a.f.tied);
    const int64_t clusters = lowrank_bwd_cluster_count<T, W>(plan, cp.n_row_blocks, stage_x, cluster[1]);
    p.rows_per_block = cdiv(n, clusters);  // the bias kernel's row split
    const std::vector<at::Tensor> partials = bwd_partials(p, a, clusters);
    auto stream = c10::cuda::getCurrentCUDAStream();
    launch_lowrank_edit_bwd_cluster<T, W>(cp, plan, clusters, stream);
    launch_lowrank_edit_bwd_bias(p, stream);
    finish_bwd(p, clusters, out, stream);
  });
  return out.list();
}

}  // namespace
}  // namespace reft

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "CUDA C++ kernels of reft_kernels (low-level; use the reft_kernels.* functions)";
  m.def("red_fwd", &reft::red_fwd, "RED forward: y = h * scale + bias", py::arg("h"), py::arg("scale"),
        py::arg("bias"));
  m.def("red_bwd", &reft::red_bwd, "RED backward: (dh, dscale fp32, dbias fp32)", py::arg("g"), py::arg("h"),
        py::arg("scale"), py::arg("need_dh"), py::arg("need_ds"), py::arg("need_dt"), py::arg("finish_split"));
  m.def("lowrank_edit_fwd", &reft::lowrank_edit_fwd,
        "low-rank edit forward: (z, u, hsave); weights [A, a, B, P, c], rows [n, d, h_row_stride, h_col_stride, "
        "y_row_stride, y_col_stride], flags [act, save_h, save_u]",
        py::arg("h"), py::arg("y"), py::arg("idx"), py::arg("weights"), py::arg("rows"), py::arg("flags"));
  m.def("lowrank_edit_bwd", &reft::lowrank_edit_bwd,
        "low-rank edit backward: (dA, da, dB, dC, dc); weights [A, B, P], rows [n, d, g_row_stride, g_col_stride, "
        "dh_row_stride, dh_col_stride], flags [act, tied, need_dA, need_da, need_dB, need_dC, need_dc, "
        "params_vector, finish_split]",
        py::arg("g"), py::arg("dh"), py::arg("idx"), py::arg("x"), py::arg("weights"), py::arg("z"), py::arg("u"),
        py::arg("rows"), py::arg("flags"));
  m.def("lowrank_edit_bwd_cluster", &reft::lowrank_edit_bwd_cluster,
        "low-rank edit backward in one pass with thread-block clusters (sm_90): lowrank_edit_bwd's arguments and "
        "outputs, plus cluster [cluster_size, max_clusters] (0: chosen by the extension)",
        py::arg("g"), py::arg("dh"), py::arg("idx"), py::arg("x"), py::arg("weights"), py::arg("z"), py::arg("u"),
        py::arg("rows"), py::arg("flags"), py::arg("cluster"));
  m.def("lowrank_edit_bwd_cluster_plan", &reft::lowrank_edit_bwd_cluster_plan,
        "(cluster size, threads, columns per CTA, rank chunk) of the cluster backward; cluster size 0: not taken",
        py::arg("like"), py::arg("d"), py::arg("r"), py::arg("cluster_size"));
  // checked against reft_kernels/_constants.py when the extension is loaded
  m.attr("MAX_RANK") = reft::kMaxRank;
  m.attr("NUM_ACTIVATIONS") = reft::kNumActivations;
}
