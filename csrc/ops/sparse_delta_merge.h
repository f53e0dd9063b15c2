#pragma once
#include <ATen/ATen.h>

namespace slimtune {

// Throws (naming the argument) unless weight/indices/values/alpha form a valid merge.
void check_sparse_delta_merge(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& values,
                              double alpha);

}  // namespace slimtune
