#pragma once
#include <ATen/ATen.h>

#include "cuda/memsave_maxpool.h"

namespace slimtune {

// Every check of memsave_maxpool_compact's / memsave_maxpool_backward's arguments, shared by
// the CPU and CUDA glue; returns the kernel geometry.
cuda::PoolGeometry check_maxpool_compact(const at::Tensor& indices, at::IntArrayRef input_size,
                                         at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                         at::IntArrayRef dilation);
cuda::PoolGeometry check_maxpool_backward(const at::Tensor& grad, const at::Tensor& offsets, at::IntArrayRef input_size,
                                          at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                          at::IntArrayRef dilation);

}  // namespace slimtune
