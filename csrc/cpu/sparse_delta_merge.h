#pragma once
#include <ATen/ATen.h>

namespace slimtune {
namespace cpu {

// weight.view(-1)[indices] += alpha * values on validated (in-range, unique), contiguous inputs.
void sparse_delta_merge(at::Tensor& weight, const at::Tensor& indices, const at::Tensor& values, double alpha);

}  // namespace cpu
}  // namespace slimtune
