#include "ops/sparse_delta_merge.h"

#include <cmath>

#include <torch/library.h>

#include "cpu/sparse_delta_merge.h"
#include "ops/common.h"

namespace slimtune {

void check_sparse_delta_merge(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& values,
                              double alpha) {
  constexpr const char* op = "sparse_delta_merge_";
  const auto wt = weight.scalar_type();
  SLIMTUNE_CHECK_ARG(wt == at::kFloat || wt == at::kHalf || wt == at::kBFloat16 || wt == at::kDouble, op, "weight",
                     "must be float32, float16, bfloat16 or float64, got ", wt);
  SLIMTUNE_CHECK_ARG(weight.is_contiguous(), op, "weight",
                     "must be contiguous (flat indices address its storage order); got strides ", weight.strides());
  SLIMTUNE_CHECK_ARG(values.scalar_type() == wt || values.scalar_type() == at::kFloat, op, "values",
                     "must have the weight's dtype (", wt, ") or float32, got ", values.scalar_type());
  SLIMTUNE_CHECK_ARG(values.dim() == 1, op, "values", "must be 1-D, got shape ", values.sizes());
  SLIMTUNE_CHECK_ARG(values.numel() == indices.numel(), op, "values", "has ", values.numel(),
                     " elements but 'indices' has ", indices.numel());
  check_same_device(op, weight, "weight", indices, "indices");
  check_same_device(op, weight, "weight", values, "values");
  SLIMTUNE_CHECK_ARG(std::isfinite(alpha), op, "alpha", "must be finite, got ", alpha);
  check_flat_indices(op, indices, "indices", weight.numel());
  SLIMTUNE_CHECK_ARG(all_finite(values), op, "values", "holds NaN or infinite entries");
}

namespace {

void sparse_delta_merge_cpu(at::Tensor weight, const at::Tensor& indices, const at::Tensor& values, double alpha) {
  check_sparse_delta_merge(weight, indices, values, alpha);
  cpu::sparse_delta_merge(weight, indices.contiguous(), values.contiguous(), alpha);
}

}  // namespace
}  // namespace slimtune

TORCH_LIBRARY_IMPL(slimtune, CPU, m) {
  m.impl("sparse_delta_merge_", &slimtune::sparse_delta_merge_cpu);
}
