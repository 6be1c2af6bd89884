// Plain parameter structs passed by value to the kernels of reft_kernels._C.
//
// Conventions: every size, stride and offset is int64_t (counted in elements, never bytes), so
// that tensors past 2^31 elements address correctly. Row tensors have a row stride and a column
// stride; the 16-byte vector paths are taken only where a `vec_ok` flag, set by the host after
// checking alignment and strides, allows them. Optional tensors are nullptr.
#pragma once

#include <cstdint>

namespace reft {

// y = h * scale + bias over (n_rows, d); h's column stride is 1, y is contiguous.
struct RedFwdParams {
  const void* h;
  const void* scale;  // (d,) or nullptr
  const void* bias;   // (d,) or nullptr
  void* y;
  int64_t n_rows, d;
  int64_t h_row_stride, y_row_stride;
  bool vec_ok;        // every row start, scale and bias allow 16-byte vectors of h's dtype
  int sm_count;
};

// One pass over (g, h): dh = g * scale, fp32 partial column sums of g * h and g per row block.
struct RedBwdParams {
  const void* g;
  const void* h;      // read only when need_ds
  const void* scale;  // (d,) or nullptr (dh = g)
  void* dh;           // (n_rows, d) contiguous, or nullptr
  float* ds_part;     // (n_blocks, d) or nullptr
  float* dt_part;     // (n_blocks, d) or nullptr
  int64_t n_rows, d;
  int64_t g_row_stride, h_row_stride, dh_row_stride;
  int64_t rows_per_block;  // row block b covers rows [b * rows_per_block, (b + 1) * rows_per_block)
  bool vec_ok;
  bool finish_split;  // the finish of ds, dt: PartialSumParams::split
};

// Low-rank edit forward, y = h + (act(h A^T + a) - h P^T - c) B, where P is C or, tied, B itself.
// Row i of the launch is row idx[i] of h/y when idx is given (-1: skipped), row i otherwise.
struct LowrankFwdParams {
  const void* h;
  void* y;            // may equal h (in place, with idx)
  void* hsave;        // (n_rows, d) dense copy of the edited rows, or nullptr
  const int64_t* idx; // (n_rows,) or nullptr
  const void* A;      // (r, d) or nullptr
  const void* a;      // (r,) or nullptr
  const void* B;      // (r, d)
  const void* P;      // (r, d): C, or B when tied; nullptr when there is no such term
  const void* c;      // (r,) or nullptr
  float* z;           // (n_rows, r) latent act(u) - h P^T - c, zero on skipped rows
  float* u;           // (n_rows, r) pre-activation h A^T + a, or nullptr
  int64_t n_rows, d, r;
  int64_t h_row_stride, h_col_stride, y_row_stride, y_col_stride;
  int act;            // activation code, as in reft_kernels/_activations.py
  bool vec_ok;        // h/y rows allow 16-byte vectors (column stride 1, aligned row starts)
  bool wvec_ok;       // the (r, d) weights allow vectors of the same number of elements
};

// Low-rank edit backward. Kernel 1 (dh): gz = g B^T, ga = gz * act'(u), dh = g + ga A - gz P.
// Kernel 2 (params): fp32 partials of dA = ga^T x, dB = z^T g (- gz^T x when tied),
// dC = -gz^T x over row blocks; kernel 3 (bias): fp32 partials of da = sum ga and dc = -sum gz
// over the same row blocks. All summed afterwards in a fixed order (PartialSumParams).
struct LowrankBwdParams {
  const void* g;      // rows follow idx when given
  const void* x;      // input rows, dense 0..n_rows-1 (the saved copy when idx is given)
  void* dh;           // rows follow idx; nullptr when not needed
  const int64_t* idx;
  const void* A;      // (r, d) or nullptr
  const void* B;      // (r, d)
  const void* P;      // (r, d) C or B (tied), or nullptr
  const float* z;     // (n_rows, r)
  const float* u;     // (n_rows, r) or nullptr (identity activation)
  float* gz;          // (n_rows, r) out
  float* ga;          // (n_rows, r) out, or nullptr (identity activation: ga is gz)
  float* dA_part;     // (n_blocks, r, d) or nullptr
  float* dB_part;
  float* dC_part;     // accumulates +gz^T x; the final sum negates it
  float* da_part;     // (n_blocks, r): sum of ga (gz for the identity activation), or nullptr
  float* dc_part;     // (n_blocks, r): -sum of gz, or nullptr
  int64_t n_rows, d, r;
  int64_t g_row_stride, g_col_stride, x_row_stride, x_col_stride, dh_row_stride, dh_col_stride;
  int64_t rows_per_block;  // row block b covers rows [b * rows_per_block, (b + 1) * rows_per_block)
  int act;
  bool tied;          // P is B itself (C is B): dB also carries -gz^T x. A flag, not a pointer
                      // comparison: a distinct C may share B's memory and still be untied.
  bool vec_ok;        // g/dh rows allow 16-byte vectors
  bool wvec_ok;
  // Kernel choices, made in Python (reft_kernels.kernels(cuda_params=..., cuda_finish=...)) and
  // passed down with the call: the extension reads no environment.
  bool params_vector;  // the 16-byte parameter-gradient kernel (else one column per thread)
  bool finish_split;   // the finishes: PartialSumParams::split
};

// Low-rank edit backward in one pass with thread-block clusters (lowrank_edit_bwd_cluster.cu):
// the split kernels' parameters (the matrix partials have one row per cluster of the grid;
// rows_per_block is the bias kernel's row split, params_vector unused) plus the column split. The
// cluster size C is the launch's; CTA c of a cluster owns columns [c * slice, min(d, (c + 1) * slice)).
struct LowrankBwdClusterParams {
  LowrankBwdParams b;
  int64_t slice;         // columns per CTA: a multiple of 16 (whole 16-byte vectors of any dtype)
  int64_t n_row_blocks;  // cdiv(n_rows, kClusterRows)
  bool x_vec_ok;         // x rows allow 16-byte vectors (as vec_ok for g and dh)
};

// Second stage of every deterministic reduction (partial_sum.cu): out[j] = sign * sum over
// b < n_blocks of parts[b * width + j], in an order fixed by (n_blocks, width, split).
struct PartialSumParams {
  const float* parts;  // (n_blocks, width) fp32
  float* out;          // (width,) fp32
  int64_t n_blocks, width;
  float sign;
  bool split;          // several threads per column and a fixed tree where it pays (else one thread
                       // per column, b = 0, 1, ...); chosen in Python: kernels(cuda_finish=...)
};

}  // namespace reft
