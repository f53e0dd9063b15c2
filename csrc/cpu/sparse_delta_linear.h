#pragma once
#include <ATen/ATen.h>

namespace slimtune {
namespace cpu {

// The delta Δ of a weight of shape (rows, cols) is held as sorted flat indices (int32/int64),
// per-row offsets `rowptr` (int64, rows + 1) and values (the weight's dtype or float32).
// All inputs are contiguous and validated by the caller.

// y[t, r] += Σ_{k in row r} values[k] · x[t, col_k]       (x: T×cols, y: T×rows)
void sparse_delta_spmm(at::Tensor& y, const at::Tensor& x, const at::Tensor& indices, const at::Tensor& rowptr,
                       const at::Tensor& values, int64_t cols);

// dx[t, col_k] += values[k] · g[t, row_k]                  (g: T×rows, dx: T×cols)
void sparse_delta_spmm_t(at::Tensor& dx, const at::Tensor& g, const at::Tensor& indices, const at::Tensor& rowptr,
                         const at::Tensor& values, int64_t cols);

// out[k] = Σ_t a[t, row_k] · b[t, col_k] in the accumulation type (float64 for float64, else float32).
at::Tensor sparse_delta_sddmm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& indices,
                              const at::Tensor& rowptr, int64_t cols);

}  // namespace cpu
}  // namespace slimtune
