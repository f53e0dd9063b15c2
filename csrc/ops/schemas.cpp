// The one place every slimtune op's schema is declared. Kernels register per dispatch
// key in their own files; fake kernels and autograd live in python/slimtune/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(slimtune, m) {
  m.set_python_module("slimtune.ops");

  // weight.view(-1)[indices] += alpha * values, in place.
  m.def("sparse_delta_merge_(Tensor(a!) weight, Tensor indices, Tensor values, float alpha) -> ()");

  // Sparse-delta fine-tuning: y = x·(W0 + Δ)ᵀ (+ bias), Δ = scatter(indices, values) over W0's
  // shape; indices sorted flat positions, rowptr[r] the first entry of row r (int64, rows + 1).
  m.def("sparse_delta_linear(Tensor x, Tensor weight, Tensor? bias, Tensor indices, Tensor rowptr, Tensor values) -> Tensor");
  m.def("sparse_delta_linear_backward(Tensor grad, Tensor x, Tensor weight, Tensor indices, Tensor rowptr, Tensor values, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // out[k] = sum_t a[t, row_k] * b[t, col_k] in float32 (float64 for float64): the values' gradient.
  m.def("sparse_delta_sddmm(Tensor a, Tensor b, Tensor indices, Tensor rowptr) -> Tensor");
}
