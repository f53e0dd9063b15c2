#pragma once
#include <ATen/ATen.h>

#include <array>

namespace slimtune {

// Checks shared by the CPU and CUDA glue of sparse_delta_linear{,_backward} and
// sparse_delta_sddmm. Metadata (dtypes, shapes, devices) is always checked; the O(K) index
// scan (sorted, unique, in range, consistent with rowptr) runs only for CPU tensors, where it
// is cheap and needs no host sync.
void check_sparse_delta_layout(const char* op, int64_t rows, int64_t cols, const at::Tensor& ref,
                               const at::Tensor& indices, const at::Tensor& rowptr);
void check_sparse_delta_linear(const char* op, const at::Tensor& x, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, const at::Tensor& indices,
                               const at::Tensor& rowptr, const at::Tensor& values);
// sparse_delta_linear_backward: the forward's checks plus grad's dtype, shape and device.
void check_sparse_delta_backward(const char* op, const at::Tensor& grad, const at::Tensor& x,
                                 const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& rowptr,
                                 const at::Tensor& values);
// sparse_delta_sddmm: float a, b of one dtype and device with the same tokens, and the layout.
void check_sparse_delta_sddmm(const char* op, const at::Tensor& a, const at::Tensor& b, const at::Tensor& indices,
                              const at::Tensor& rowptr);

// The delta is applied through a transient merged copy of W0 (one weight-sized copy, freed
// before returning) when that is cheaper than the sparse product: the T·K gathered
// multiply-adds of the SpMM against one pass over the weight. Measured on CPU (float32,
// 1024×1024, 1 %): the SpMM wins up to T ≈ 8–16 tokens and loses from T ≈ 64, a crossover
// near T·K ≈ numel / 4. The same rule is used on CUDA (not yet measured there).
inline bool sparse_delta_use_merge(int64_t tokens, int64_t nnz, int64_t numel) {
  return 4 * tokens * nnz >= numel;
}

// 2-D views: x as (T, d_in) contiguous, grad as (T, d_out) contiguous.
inline at::Tensor as_tokens(const at::Tensor& t) {
  return t.reshape({-1, t.size(-1)}).contiguous();
}

}  // namespace slimtune
