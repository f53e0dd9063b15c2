#pragma once
#include <ATen/ATen.h>

#include "cuda/memsave_maxpool.h"

namespace slimtune {
namespace cpu {

// See cuda/memsave_maxpool.h: the same two passes over contiguous tensors.
void memsave_maxpool_compact(const at::Tensor& indices, at::Tensor& offsets, const cuda::PoolGeometry& g);
void memsave_maxpool_backward(const at::Tensor& grad, const at::Tensor& offsets, at::Tensor& grad_in,
                              const cuda::PoolGeometry& g);

}  // namespace cpu
}  // namespace slimtune
